"""Property tests: any corruption of a saved result either loads back exactly what was saved or is a ResultFileError."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_results import (
    MAPS_KEY,
    TRACE_KEY,
    WALK_KEY,
    make_maps,
    make_observation,
    make_trace,
    make_walk,
    read_file,
    rewrite,
    same_maps,
    same_observation,
    same_trace,
    same_walk,
)

from sdexplore.errors import ResultFileError
from sdexplore.results import AttentionMaps, Observation, Trace, Walk

KINDS: dict[str, tuple[Any, Any, Any]] = {  # kind -> (build, load, equal)
    "trace": (make_trace, Trace.load, same_trace),
    "maps": (make_maps, AttentionMaps.load, same_maps),
    "walk": (make_walk, Walk.load, same_walk),
    "observation": (make_observation, Observation.load, same_observation),
}
ORIGINALS = {kind: build() for kind, (build, _, _) in KINDS.items()}
KEYS = {"trace": TRACE_KEY, "maps": MAPS_KEY, "walk": WALK_KEY, "steps": TRACE_KEY, "attention": MAPS_KEY}
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _save(kind: str, folder: Path) -> tuple[Path, list[Path]]:
    """Save the original; returns (what load() takes, the files that make it up)."""
    if kind == "observation":
        out = ORIGINALS[kind].save(folder / "obs")
        return out, sorted(out.iterdir())
    path = ORIGINALS[kind].save(folder / "r.safetensors")
    return path, [path, *([Path(str(path) + ".json")] if kind == "walk" else [])]


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):  # the first few items of long lists (token ids) are enough
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple, value: Any, delete: bool) -> Any:
    if not path:
        return value
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _header_key(file: Path) -> str | None:
    return KEYS.get(file.name.split(".")[0]) if file.suffix == ".safetensors" else None


def corrupt_header(data: st.DataObject, file: Path, kind: str) -> None:
    """Replace or delete one value anywhere in the file's JSON header (a walk's embedded one, both or sidecar)."""
    key = _header_key(file) or (KEYS[kind] if file.suffix == ".safetensors" else None)
    if key is None:  # a JSON file: the walk's sidecar or the observation index
        doc = json.loads(file.read_text())
    else:
        tensors, meta = read_file(file)
        doc = json.loads(meta[key])
    path = data.draw(st.sampled_from([(), *_paths(doc)]), label="path")
    doc = _set(doc, path, data.draw(json_values, label="value"), data.draw(st.booleans(), label="delete"))
    if key is None:
        file.write_text(json.dumps(doc))
    else:
        meta[key] = json.dumps(doc)
        rewrite(file, tensors, meta)


def corrupt_tensors(data: st.DataObject, file: Path) -> None:
    """Reshape, retype, swap, drop or add a tensor, keeping the header as it was."""
    tensors, meta = read_file(file)
    names = sorted(tensors)
    name = data.draw(st.sampled_from(names), label="tensor")
    t = tensors[name]
    how = data.draw(st.sampled_from(["reshape", "retype", "swap", "drop", "add", "perturb"]), label="how")
    if how == "reshape":
        tensors[name] = t.reshape(data.draw(st.sampled_from([(-1,), (1, -1), (-1, 1)]), label="shape"))
    elif how == "retype":
        tensors[name] = t.to(
            data.draw(st.sampled_from([torch.float32, torch.float16, torch.uint8, torch.int64]))
        )
    elif how == "swap":
        other = data.draw(st.sampled_from(names), label="other")
        tensors[name], tensors[other] = tensors[other], t
    elif how == "drop":
        del tensors[name]
    elif how == "add":
        tensors[f"{name}.extra"] = t.clone()
    else:  # one element changed
        flat = t.clone().reshape(-1)  # (numel,)
        if flat.numel():
            i = data.draw(st.integers(0, flat.numel() - 1), label="element")
            flat[i] = flat[i] + 1 if t.dtype != torch.uint8 else (int(flat[i]) + 1) % 256
        tensors[name] = flat.reshape(t.shape)
    rewrite(file, tensors, meta)


def corrupt_bytes(data: st.DataObject, file: Path) -> None:
    """Flip bits of one byte anywhere in the file, or cut the file short."""
    raw = bytearray(file.read_bytes())
    i = data.draw(st.integers(0, len(raw) - 1), label="offset")
    if data.draw(st.booleans(), label="truncate"):
        file.write_bytes(bytes(raw[:i]))
    else:
        raw[i] ^= data.draw(st.integers(1, 255), label="mask")
        file.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind", sorted(KINDS))
@FAST
@given(data=st.data())
def test_a_corrupted_result_loads_exactly_or_raises_result_file_error(kind, data):
    _, load, equal = KINDS[kind]
    with tempfile.TemporaryDirectory() as tmp:
        target, files = _save(kind, Path(tmp))
        file = data.draw(st.sampled_from(files), label="file")
        way = data.draw(st.sampled_from(["header", "tensors", "bytes"]), label="corruption")
        if way == "tensors" and file.suffix == ".safetensors":
            corrupt_tensors(data, file)
        elif way == "bytes":
            corrupt_bytes(data, file)
        else:
            corrupt_header(data, file, kind)
        try:
            back = load(target)
        except ResultFileError as e:
            assert tmp in str(e)  # the message names the file
            return
        assert equal(back, ORIGINALS[kind]), "a corrupted file loaded as something other than what was saved"
