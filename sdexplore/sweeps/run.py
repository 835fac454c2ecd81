"""sweep(): prompts × seeds through a pipeline with observation on, sharded over accelerate's processes,
resumable; each process writes only its own items and the main process merges the index after a barrier."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._signals import sigterm_as_interrupt
from ..errors import InvalidArgumentError, SweepAbortedError
from . import folder as fs
from .plan import DEFAULT_KEEP, KEEP, SweepItem, batches, plan_digest, plan_items, shard
from .prompts import PromptRow, read_prompts


@dataclass
class SweepResult:
    """What a :func:`sweep` call did: the folder, how many items it holds done, how many this call made."""

    out: Path
    items: int  # planned items
    done: int  # items complete in the folder after this call (all processes)
    made: int  # items this process generated in this call
    seconds: float  # wall time of this call in this process
    index: Path | None  # the merged index (main process), None on other processes

    def __str__(self) -> str:
        return (
            f"{self.done}/{self.items} items done in {self.out} ({self.made} made by this process in "
            f"{self.seconds:.1f} s); index: {self.index or '(main process)'}"
        )


def sweep(
    prompts: str | Path | Sequence[str | PromptRow],
    out: str | Path,
    *,
    seeds: Sequence[int] = (0,),
    model: str | None = None,
    keep: Sequence[str] = DEFAULT_KEEP,
    words: Sequence[str] | None = None,
    steps: int = 25,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    scheduler: str | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    on_item: Callable[[SweepItem], None] | None = None,
) -> SweepResult:
    """Generate every prompt × seed with observation on and write each item into ``out/items/<index>/``.

    ``prompts``: a prompt file (:func:`~sdexplore.sweeps.read_prompts`: text, CSV or JSONL with optional
    per-item seed, negative prompt and words) or a list of prompts. Each item keeps (``keep``) its ``images``
    (``image.png``), ``maps`` (``maps.safetensors``: the aggregated map of each of ``words``, default every
    word of its prompt) and ``trace-summary`` (``steps.json``); with the embedded model also ``scene.json``
    (the scene scorer's reading and the shape word's attention IoU, as on the model card). ``out/index.jsonl``
    lists every item with its status and figures (``pandas.read_json(path, lines=True)``); ``out/sweep.json``
    holds the settings and package versions.

    Launched as several processes (``accelerate launch``, ``torchrun``), the batches are split between them
    with accelerate (:func:`~sdexplore.sweeps.plan.shard`). Rerunning skips complete items and redoes missing,
    partial or corrupt ones; a rerun with other settings is refused (:class:`~sdexplore.errors.InvalidArgumentError`).
    SIGINT/SIGTERM stop at once, losing at most the batch in flight. ``guidance_scale=None``: the embedded
    model's recommended scale, else the pipeline's default. ``batch_size`` images per pipeline call: part of
    the settings, since batched arithmetic may round differently.
    """
    from accelerate import PartialState

    from .execute import run_batch  # torch and numpy load here, not on `import sdexplore`

    t0 = time.perf_counter()
    keep = _check_keep(keep)
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name}={value!r}: give a whole number ≥ 1")
    rows = _rows(prompts)
    if negative_prompt is not None:
        rows = [r if r.negative_prompt else _with_negative(r, negative_prompt) for r in rows]
    items = plan_items(rows, seeds, words)
    out = Path(out).expanduser()
    embedded = model is None
    if embedded:
        from ..loading import EMBEDDED_GUIDANCE_SCALE, EMBEDDED_MODEL_DIR, embedded_model_available

        scene = embedded_model_available()
        if guidance_scale is None:
            guidance_scale = EMBEDDED_GUIDANCE_SCALE
        model_folder: Path | None = Path(EMBEDDED_MODEL_DIR)
    else:
        scene = False
        model_folder = Path(model).expanduser() if Path(model).expanduser().exists() else None
    settings = {
        "model": model or "embedded",
        "model_fingerprint": fs.model_fingerprint(model_folder),
        "scheduler": scheduler,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
        "dtype": dtype,
        "batch_size": batch_size,
        "keep": sorted(keep),
        "scene": scene,
        "items": len(items),
        "plan": plan_digest(items),
    }
    fs.check_settings(out, settings)  # every process, before anything loads or is written
    fs.check_writable(out)
    cpu = device == "cpu" or not _cuda()
    state = PartialState(cpu=cpu)
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_as_interrupt())  # SIGTERM as Ctrl-C: the lock and the item in flight go
        _on_main(state, lambda: _prepare(stack, out, settings, prompts))
        # on GPUs each process takes its own (accelerate's local rank); an explicit "cuda:1" is kept
        own = str(state.device) if not cpu and device in ("auto", "cuda") else device
        pipe = _load(model, own, dtype, scheduler)
        _check_words(pipe, items)
        call_kwargs: dict[str, Any] = {"num_inference_steps": steps}
        for key, value in (("guidance_scale", guidance_scale), ("height", height), ("width", width)):
            if value is not None:
                call_kwargs[key] = value
        plan = batches(items, batch_size)
        todo = _on_main(
            state, lambda: [sorted(it.index for it in b if fs.read_item(out, it) is None) for b in plan]
        )
        work = [(b, set(t)) for b, t in zip(plan, todo, strict=True) if t]
        mine = shard(work, state)
        made = 0
        bar = _progress_bar(state, sum(len(t) for _, t in mine), progress)
        for batch, wanted in mine:
            start = time.perf_counter()
            results = run_batch(pipe, batch, call_kwargs, keep, scene)
            seconds = (time.perf_counter() - start) / len(batch)
            for item, (files, row) in zip(batch, results, strict=True):
                if item.index in wanted:
                    run = {"seconds": seconds, "rank": state.process_index, "host": os.uname().nodename}
                    fs.write_item(out, item, files, row, run)
                    made += 1
                    bar.update(1)
                    if on_item is not None:
                        on_item(item)
        bar.close()
        state.wait_for_everyone()  # every process's items are written: merge
        index = None
        done = 0
        if state.is_main_process:
            rows_out = fs.index_rows(out, items)
            index = fs.write_index(out, rows_out)
            done = sum(r["status"] == "done" for r in rows_out)
        done = _broadcast(state, done)
        return SweepResult(out, len(items), done, made, time.perf_counter() - t0, index)


def _check_keep(keep: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(keep, str):
        keep = [k.strip() for k in keep.split(",") if k.strip()]
    keep = tuple(dict.fromkeys(keep))
    bad = [k for k in keep if k not in KEEP]
    if bad:
        raise InvalidArgumentError(
            f"keep: {bad[0]!r} is not something an item keeps; choose from {', '.join(KEEP)}"
        )
    return keep


def _rows(prompts: str | Path | Sequence[str | PromptRow]) -> list[PromptRow]:
    if isinstance(prompts, (str, Path)):
        return read_prompts(prompts)
    rows = []
    for i, p in enumerate(prompts, 1):
        if isinstance(p, PromptRow):
            rows.append(p)
        elif isinstance(p, str) and p.strip():
            rows.append(PromptRow(p.strip(), i))
        else:
            raise InvalidArgumentError(f"prompt {i} is {p!r}; give non-empty strings (or a prompt file path)")
    if not rows:
        raise InvalidArgumentError("no prompts: give a prompt file or a list of prompts")
    return rows


def _with_negative(row: PromptRow, negative: str) -> PromptRow:
    return PromptRow(row.prompt, row.line, row.seed, negative, row.words)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _broadcast(state: Any, value: Any) -> Any:
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0] if state.use_distributed else value


def _on_main(state: Any, work: Callable[[], Any]) -> Any:
    """Run ``work`` on the main process and hand its result (or its error) to every process."""
    result: tuple[str, Any] = ("ok", None)
    error: BaseException | None = None
    if state.is_main_process:
        try:
            result = ("ok", work())
        except Exception as e:  # noqa: BLE001 - handed to the other processes, re-raised here below
            error, result = e, ("error", f"the main process stopped: {type(e).__name__}: {e}")
    kind, value = _broadcast(state, result)
    if error is not None:
        raise error
    if kind == "error":
        raise SweepAbortedError(value)
    return value


def _prepare(stack: contextlib.ExitStack, out: Path, settings: dict, prompts: Any) -> None:
    """Main process: take the folder's lock, remove a killed run's half-written items, store the settings."""
    stack.enter_context(fs.locked(out))
    if fs.check_settings(out, settings):  # again, under the lock
        fs.clear_leftovers(out)
        return
    environment = {
        "versions": fs.versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "prompts": str(prompts) if isinstance(prompts, (str, Path)) else "(a list given to sweep())",
        "command": sys.argv,
    }
    fs.write_settings(out, settings, environment)


def _load(model: str | None, device: str, dtype: str, scheduler: str | None) -> Any:
    from ..loading import load_pipeline

    pipe = load_pipeline(model, device=device, dtype=dtype, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_words(pipe: Any, items: Sequence[SweepItem]) -> None:
    """Every asked-for word must be in its prompt: checked for all items before anything is generated."""
    from ..errors import WordNotFoundError
    from ..record.tokens import sequence_tokens

    for item in items:
        if item.words:
            tokens = sequence_tokens(pipe, item.prompt)
            for word in item.words:
                try:
                    tokens.positions(word)
                except WordNotFoundError as e:
                    raise InvalidArgumentError(
                        f"item {item.index} ({item.prompt!r}): {e} Give words of each prompt (a words column "
                        "in the prompt file sets them per prompt)."
                    ) from e


def _progress_bar(state: Any, total: int, enabled: bool) -> Any:
    from accelerate.utils import tqdm

    return tqdm(
        total=total,
        desc=f"sweep (process 1 of {state.num_processes})" if state.num_processes > 1 else "sweep",
        unit="item",
        disable=not enabled,
        main_process_only=True,
    )
