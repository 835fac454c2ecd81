"""observe(pipe, steps=..., attention=...): one context manager around the user's own call, all recorders."""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecorderStateError, ResultFileError
from .steps import StepRecorder
from .trace import Trace


@dataclass
class Observation:
    """What :func:`observe` recorded: per-step traces and attention maps.

    ``steps`` is the :class:`~sdexplore.trace.Trace` of the latest pipeline call in the block (``runs`` holds
    one per call); ``attention`` the ``AttentionMaps`` of the latest call (``None`` when not requested).
    Both are readable live inside the block and stay valid after it.
    """

    runs: list[Trace] = field(default_factory=list)
    _attention: Any = None  # AttentionMaps once frozen, or None
    _attention_recorder: Any = field(default=None, repr=False)

    @property
    def steps(self) -> Trace:
        """Trace of the latest pipeline call."""
        if not self.runs:
            raise RecorderStateError(
                "No steps were recorded: call the pipeline inside `with sdexplore.observe(pipe, steps=True)`."
            )
        return self.runs[-1]

    @property
    def attention(self) -> Any:
        """AttentionMaps of the latest pipeline call, or None if attention was not observed."""
        if self._attention is None and self._attention_recorder is not None:
            return self._attention_recorder.maps
        return self._attention

    def save(self, folder: str | Path) -> Path:
        """Write ``steps.safetensors`` (latest trace), ``attention.safetensors`` and ``observation.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index: dict[str, Any] = {
            "format": "sdexplore.observation",
            "version": 1,
            "steps": None,
            "attention": None,
        }
        if self.runs:
            self.steps.save(folder / "steps.safetensors")
            index["steps"] = "steps.safetensors"
        if self.attention is not None:
            self.attention.save(folder / "attention.safetensors")
            index["attention"] = "attention.safetensors"
        (folder / "observation.json").write_text(json.dumps(index, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Observation:
        """Read a folder written by :meth:`save`."""
        folder = Path(folder)
        try:
            index = json.loads((folder / "observation.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ResultFileError(f"{folder} is not a saved sdexplore Observation folder: {e}") from e
        if index.get("format") != "sdexplore.observation":
            raise ResultFileError(f"{folder}/observation.json is not an sdexplore observation index.")
        runs = [Trace.load(folder / index["steps"])] if index.get("steps") else []
        att = None
        if index.get("attention"):
            from .attention import AttentionMaps

            att = AttentionMaps.load(folder / index["attention"])
        return cls(runs=runs, _attention=att)


class _Observe:
    """The context manager :func:`observe` returns."""

    def __init__(
        self, pipe: Any, steps: bool | dict, attention: bool | dict, options: dict[str, Any]
    ) -> None:
        if not steps and not attention:
            raise ValueError("observe() needs steps=True and/or attention=True (or a dict of their options).")
        if options and not steps:
            raise ValueError(
                f"Step options {sorted(options)} given with steps=False; pass steps=True or drop them."
            )
        step_opts = {**(steps if isinstance(steps, dict) else {}), **options}
        self._step_recorder = StepRecorder(pipe, **step_opts) if steps else None
        self._attention_recorder = None
        if attention:
            from .attention import (
                AttentionRecorder,
            )  # imported lazily: steps work without the attention package

            self._attention_recorder = AttentionRecorder(
                pipe, **(attention if isinstance(attention, dict) else {})
            )
        self._stack: ExitStack | None = None
        self.observation = Observation(_attention_recorder=self._attention_recorder)

    def __enter__(self) -> Observation:
        with ExitStack() as stack:
            if self._attention_recorder is not None:
                stack.enter_context(self._attention_recorder)
            if self._step_recorder is not None:
                stack.enter_context(self._step_recorder)
                self.observation.runs = self._step_recorder.traces
            self._stack = stack.pop_all()
        return self.observation

    def __exit__(self, *exc: Any) -> bool | None:
        assert self._stack is not None
        try:
            return self._stack.__exit__(*exc)
        finally:
            rec = self._attention_recorder
            if rec is not None:
                try:
                    self.observation._attention = rec.maps
                except Exception:  # no call was made in the block: keep None
                    self.observation._attention = None
                self.observation._attention_recorder = None


def observe(pipe: Any, steps: bool | dict = True, attention: bool | dict = False, **options: Any) -> _Observe:
    """Observe the pipeline calls made inside a ``with`` block; yields an :class:`Observation`.

    ::

        with sdexplore.observe(pipe, steps=True, attention=True) as obs:
            image = pipe("a big red circle", generator=torch.Generator().manual_seed(0)).images[0]
        obs.steps[10].x0, obs.steps[-1].preview, obs.attention.word("circle")

    ``steps``: True or a dict of :class:`~sdexplore.steps.StepRecorder` options; extra keyword ``options`` go to
    the step recorder too (``quantities``, ``every``, ``on_step``, steering such as ``stop_at``...).
    ``attention``: True or a dict of ``sdexplore.attention.AttentionRecorder`` options.
    The pipeline is restored exactly on exit, also after an exception or KeyboardInterrupt.
    """
    return _Observe(pipe, steps, attention, options)
