"""Observation: what observe() recorded (per-step traces and attention maps), saved as one checksummed folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RecorderStateError, ResultFileError
from . import attention_maps as _maps
from . import fileformat as ff
from . import trace as _trace
from .attention_maps import AttentionMaps
from .trace import Trace

_FORMAT = "sdexplore.observation"
_INDEX = "observation.json"


@dataclass
class Observation:
    """What :func:`~sdexplore.record.observe.observe` recorded: per-step traces and attention maps.

    ``steps`` is the :class:`~sdexplore.results.Trace` of the latest pipeline call in the block (``runs`` holds
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
    def mask(self) -> Any:
        """The latest call's inpainting mask, (M, H, W) float32 in [0, 1] (1 = repainted), or None (not an
        inpainting call, or steps were not recorded: the mask travels with the trace). Views draw its outline:
        ``sdexplore.views.render.heat_overlay(image, obs.attention.word("cat"), mask=obs.mask)``."""
        return self.runs[-1].mask if self.runs else None

    @property
    def attention(self) -> Any:
        """AttentionMaps of the latest pipeline call, or None if attention was not observed."""
        if self._attention is None and self._attention_recorder is not None:
            return self._attention_recorder.maps
        return self._attention

    def save_html(
        self,
        path: str | Path,
        *,
        image: Any = None,
        index: int = 0,
        model: str | None = None,
        seed: int | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        channels: bool = False,
        layers: bool = True,
        title: str | None = None,
    ) -> Path:
        """One self-contained HTML page to explore this observation without a kernel: a step scrubber (noisy
        latents, predicted x0 and, when recorded, the VAE decode of every step) and the attention per word (step
        range, layer, opacity) over ``image``. It opens from ``file://`` with no network; written atomically.

        ``image``: the generated picture to draw the maps over (default: the last step's decode, else its x0
        preview); ``index``: which image of the batch; ``model``, ``seed``, ``prompt``, ``negative_prompt``:
        override the provenance the page shows, which is otherwise what the recording kept of the call (model,
        scheduler, seed or "unseeded", prompts, steps, guidance and size of image ``index``; sdexplore's version is
        always written; an observation loaded from a file saved before provenance was kept has only its family,
        scheduler, steps and guidance); ``channels``: add the noise-prediction and latent-channel
        panels (larger pages); ``layers``: keep each layer's maps (the layer menu). A bad path raises
        :class:`~sdexplore.errors.InvalidArgumentError`, an observation with nothing recorded
        :class:`~sdexplore.errors.NotRecordedError`, both before any work. Returns the path.
        """
        from ..views import pages  # the views layer, imported only when a page is asked for

        return pages.save_observation(
            self,
            path,
            image=image,
            index=index,
            model=model,
            seed=seed,
            prompt=prompt,
            negative_prompt=negative_prompt,
            channels=channels,
            layers=layers,
            title=title,
        )

    def save(self, folder: str | Path) -> Path:
        """Write ``steps.safetensors`` (latest trace), ``attention.safetensors`` and ``observation.json``.

        The index records each file's header checksum, so files from different saves are never mixed up; all
        files are written as one (temporaries, then renames): a failure leaves the folder as it was.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index: dict[str, Any] = {"format": _FORMAT, "version": ff.VERSION, "steps": None, "attention": None}
        writers = {}
        parts = [("steps", self.steps if self.runs else None, _trace._FORMAT)]
        parts.append(("attention", self.attention, _maps._FORMAT))
        for name, result, key in parts:
            if result is None:
                continue
            tensors, header = result.to_state()
            sealed = ff.seal(header, tensors)
            file = f"{name}.safetensors"
            writers[folder / file] = ff.safetensors_writer(tensors, key, sealed)
            index[name] = {"file": file, ff.HEADER_SUM: ff.header_sum(sealed)}
        writers[folder / _INDEX] = ff.text_writer(json.dumps(index, indent=1))
        ff.write_files(writers)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Observation:
        """Read a folder written by :meth:`save`; every file is checked, and checked to belong to this save.

        Any failure raises :class:`~sdexplore.errors.ResultFileError` naming the file and the field.
        """
        folder = Path(folder)
        path = folder / _INDEX
        if not path.is_file():
            raise ResultFileError(
                f"{folder} is not a saved sdexplore Observation folder: it has no {_INDEX}."
            )
        check = ff.Checker(str(path))
        index = check.kind(ff.read_json(path, "Observation index"), _FORMAT, "Observation")
        unknown = sorted(set(index) - {"format", "version", "steps", "attention"})
        if unknown:
            check.fail(f"field {unknown[0]!r}", "is not a field of an Observation index")
        trace = _part(check, folder, index, "steps", _trace._FORMAT, "Trace", Trace._parse)
        maps = _part(
            check,
            folder,
            index,
            "attention",
            _maps._FORMAT,
            "AttentionMaps",
            lambda c, h, t: AttentionMaps.from_state(t, h, c.source),
        )
        if trace is not None and maps is not None:
            _check_together(check, trace, maps)
        return cls(runs=[trace] if trace is not None else [], _attention=maps)


def _check_together(check: ff.Checker, trace: Trace, maps: AttentionMaps) -> None:
    """The steps and the maps of one save are of one pipeline call: one family, one batch of images."""
    if trace.family and maps.family and trace.family != maps.family:
        check.fail(
            "steps / attention",
            f"name families {trace.family!r} (steps) and {maps.family!r} (attention): they are not of one call",
        )
    latents = next((t for s in trace for t in s._tensors().values() if t.dim() == 4), trace.final_latents)
    if latents is not None and latents.shape[0] != maps.num_images:
        check.fail(
            "steps / attention",
            f"hold {latents.shape[0]} image(s) (steps) and {maps.num_images} (attention): they are not of one call",
        )


def _part(
    check: ff.Checker,
    folder: Path,
    index: dict[str, Any],
    name: str,
    key: str,
    kind: str,
    parse: Callable[[ff.Checker, dict[str, Any], dict[str, Any]], Any],
) -> Any:
    """Load the file an index entry names, checked, and tied to the index by its header checksum."""
    entry = check.get(index, name, name)
    if entry is None:
        return None
    entry = check.dict(entry, name)
    unknown = sorted(set(entry) - {"file", ff.HEADER_SUM})
    if unknown:
        check.fail(f"{name}.{unknown[0]}", "is not a field of an index entry")
    file = check.str(check.get(entry, "file", f"{name}.file"), f"{name}.file")
    if not file or file in (".", "..") or "/" in file or "\\" in file:
        check.fail(f"{name}.file", f"is {file!r}, expected a file name inside {folder}")
    expected = check.str(
        check.get(entry, ff.HEADER_SUM, f"{name}.{ff.HEADER_SUM}"), f"{name}.{ff.HEADER_SUM}"
    )
    rf = ff.read_result(folder / file, key, kind)
    result = parse(rf.check, rf.header, rf.tensors)
    rf.verify_checksums()
    if ff.header_sum(rf.header) != expected:
        check.fail(f"{name}.{ff.HEADER_SUM}", f"does not match {rf.path}: that file is from another save")
    return result
