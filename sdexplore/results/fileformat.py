"""The one file format of every saved result: safetensors tensors + a JSON header with a checksum per tensor."""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from .._files import as_ordinary_file
from ..errors import ResultFileError

if TYPE_CHECKING:
    from ..families import Family

#: Version of every result header written now. Version 1 (sdexplore 0.1.0 before checksums) is refused: its
#: files record no shapes, dtypes or checksums, so a flipped byte in them could never be told from real data.
VERSION = 2
TABLE = "tensors"  # header key of the checksum table: tensor name -> {"shape", "dtype", "sha256"}
HEADER_SUM = "header_sha256"  # header key of the header's own checksum (over every other key)


# ---------------------------------------------------------------- checksums


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` → ``"float16"``: the dtype as recorded in headers."""
    return str(dtype).removeprefix("torch.")


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in C order (the bytes safetensors stores)."""
    flat = t.detach().cpu().contiguous().reshape(-1)  # (numel,) same bytes, any dtype
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


def _canonical(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def seal(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``header`` plus the checksum table of ``tensors`` plus the checksum of all of it.

    Raises :class:`ResultFileError` when the header is not JSON-serialisable (nothing is written then).
    """
    out = {k: v for k, v in header.items() if k not in (TABLE, HEADER_SUM)}
    out[TABLE] = {
        name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "sha256": tensor_sha256(t)}
        for name, t in sorted(tensors.items())
    }
    try:
        out[HEADER_SUM] = hashlib.sha256(_canonical(out)).hexdigest()
    except (TypeError, ValueError) as e:
        raise ResultFileError(
            f"The result's header is not JSON-serialisable ({e}); keep its metadata to plain numbers, strings, "
            "lists and dicts."
        ) from e
    return out


def header_sum(header: Mapping[str, Any]) -> str:
    """The checksum a sealed header carries (for an index that ties files together)."""
    return str(header[HEADER_SUM])


# ---------------------------------------------------------------- atomic writes


def write_files(writers: Mapping[Path, Callable[[Path], None]]) -> None:
    """Write several files as one: each to a temporary file beside it, then all renamed into place.

    ``writers`` maps each target path to a function that writes a given path. If any write or rename fails,
    every target is left as it was before (new files removed, replaced files restored) and no temporary
    remains. Files get the mode a plain ``open(path, "w")`` gives.
    """
    temps: dict[Path, Path] = {}
    try:
        for target, write in writers.items():
            target = Path(target)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            temps[target] = Path(tmp)
            write(Path(tmp))
            as_ordinary_file(tmp)
        _commit(temps)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def _commit(temps: Mapping[Path, Path]) -> None:
    """Rename every temporary onto its target; on any failure, undo the renames already made."""
    done: list[tuple[Path, Path | None]] = []  # (target, backup of what it replaced)
    try:
        for target, tmp in temps.items():
            if target.is_dir():
                raise IsADirectoryError(f"{target} is a folder; cannot write a result file there.")
            backup = None
            if os.path.lexists(target):
                backup = target.with_name(f".{target.name}.{secrets.token_hex(4)}.bak")
                os.replace(target, backup)
            try:
                os.replace(tmp, target)
            except BaseException:
                if backup is not None:
                    os.replace(backup, target)
                raise
            done.append((target, backup))
    except BaseException:
        for target, backup in reversed(done):
            target.unlink(missing_ok=True)
            if backup is not None:
                os.replace(backup, target)
        raise
    for _, backup in done:
        if backup is not None:
            backup.unlink(missing_ok=True)


def safetensors_writer(
    tensors: Mapping[str, torch.Tensor], key: str, header: Mapping[str, Any]
) -> Callable[[Path], None]:
    """A writer for :func:`write_files`: ``tensors`` with the sealed ``header`` as JSON under metadata ``key``."""
    text = json.dumps(header)

    def write(path: Path) -> None:
        from safetensors.torch import save_file

        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata={key: text}
        )

    return write


def text_writer(text: str) -> Callable[[Path], None]:
    """A writer for :func:`write_files` of a text (JSON) file."""
    return lambda path: path.write_text(text)


def save_result(path: Path, key: str, header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Seal ``header`` and write ``tensors`` + it to ``path`` atomically. Returns the path."""
    write_files({path: safetensors_writer(tensors, key, seal(header, tensors))})
    return path


# ---------------------------------------------------------------- reading and checking


class Checker:
    """Typed access to a parsed JSON header: every failure is a ResultFileError naming the file and the field."""

    def __init__(self, source: str) -> None:
        self.source = source or "this result"

    def fail(self, field: str, problem: str) -> NoReturn:
        """Raise the error for ``field``."""
        raise ResultFileError(
            f"{self.source}: {field} {problem}. The file is corrupt, edited or mismatched: save the result again."
        )

    def get(self, obj: Mapping[str, Any], key: str, field: str) -> Any:
        """``obj[key]``, or an error naming ``field`` when it is missing."""
        if key not in obj:
            self.fail(field, "is missing")
        return obj[key]

    def dict(self, value: Any, field: str) -> dict[str, Any]:
        """A JSON object."""
        if not isinstance(value, dict):
            self.fail(field, f"is {_show(value)}, expected a JSON object")
        return value

    def list(self, value: Any, field: str, *, length: int | None = None) -> list[Any]:
        """A JSON list, of ``length`` items where given."""
        if not isinstance(value, list):
            self.fail(field, f"is {_show(value)}, expected a list")
        if length is not None and len(value) != length:
            self.fail(field, f"has {len(value)} entries, which does not match the {length} expected")
        return value

    def int(self, value: Any, field: str, *, lo: int | None = None, hi: int | None = None) -> int:
        """An integer (booleans refused) in ``[lo, hi]``."""
        if isinstance(value, bool) or not isinstance(value, Integral):
            self.fail(field, f"is {_show(value)}, expected an integer")
        value = int(value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.fail(field, f"is {value}, expected an integer in [{lo}, {'∞' if hi is None else hi}]")
        return value

    def number(
        self,
        value: Any,
        field: str,
        *,
        finite: bool = True,
        lo: float | None = None,
        hi: float | None = None,
    ) -> float:
        """A real number (never NaN; infinite only with ``finite=False``) in ``[lo, hi]``."""
        if isinstance(value, bool) or not isinstance(value, Real):
            self.fail(field, f"is {_show(value)}, expected a number")
        value = float(value)
        if math.isnan(value) or (finite and math.isinf(value)):
            self.fail(field, f"is {value}, expected a {'finite ' if finite else ''}number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.fail(field, f"is {value}, expected a number in [{lo}, {hi}]")
        return value

    def str(self, value: Any, field: str, *, choices: Iterable[str] | None = None) -> str:
        """A string (one of ``choices`` where given)."""
        if not isinstance(value, str):
            self.fail(field, f"is {_show(value)}, expected a string")
        if choices is not None and value not in (allowed := tuple(choices)):
            self.fail(field, f"is {value!r}, expected one of {', '.join(map(repr, allowed))}")
        return value

    def bool(self, value: Any, field: str) -> bool:
        """A JSON boolean."""
        if not isinstance(value, bool):
            self.fail(field, f"is {_show(value)}, expected true or false")
        return value

    def kind(self, header: Any, key: str, kind: str) -> dict[str, Any]:
        """Check the header is an object of format ``key`` at the current version; returns it."""
        if not isinstance(header, dict):
            self.fail("the header", f"is {_show(header)}, expected a JSON object holding a saved {kind}")
        fmt = header.get("format")
        if fmt != key:
            self.fail("format", f"is {_show(fmt)}: this is not a saved {kind} (format {key!r})")
        version = self.get(header, "version", "version")
        if isinstance(version, bool) or not isinstance(version, int):
            self.fail("version", f"is {_show(version)}, expected an integer")
        if version == 1:
            raise ResultFileError(
                f"{self.source} is a version-1 {kind} file: it predates checksums (sdexplore 0.1.0), so its "
                f"contents cannot be verified. Record the result again and save it with this sdexplore."
            )
        if version > VERSION:
            raise ResultFileError(
                f"{self.source} was written by a newer sdexplore ({kind} file version {version}; this one reads "
                f"{VERSION}): upgrade sdexplore to read it."
            )
        if version != VERSION:
            self.fail("version", f"is {version}, expected {VERSION}")
        return header


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})" if value is not None else "null"


@dataclass
class ResultFile:
    """A result file read back: its JSON header and its tensors, with checks that raise ResultFileError."""

    path: Path
    header: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def check(self) -> Checker:
        """A :class:`Checker` naming this file."""
        return Checker(str(self.path))

    def verify_checksums(self) -> None:
        """Every tensor against the header's checksum table, then the header against its own checksum."""
        check, header = self.check, self.header
        table = header.get(TABLE)
        if table is None:
            check.fail(f"the checksum table {TABLE!r}", "is missing")
        table = check.dict(table, TABLE)
        if set(table) != set(self.tensors):
            odd = sorted(set(table) ^ set(self.tensors))
            check.fail(TABLE, f"does not list the file's tensors (differs at {odd[:3]})")
        for name, t in self.tensors.items():
            entry = check.dict(table[name], f"{TABLE}[{name!r}]")
            shape = check.list(
                check.get(entry, "shape", f"{TABLE}[{name!r}].shape"), f"{TABLE}[{name!r}].shape"
            )
            if shape != list(t.shape):
                check.fail(f"tensor {name!r}", f"has shape {list(t.shape)}, but the header recorded {shape}")
            dtype = check.get(entry, "dtype", f"{TABLE}[{name!r}].dtype")
            if dtype != dtype_name(t.dtype):
                check.fail(
                    f"tensor {name!r}", f"has dtype {dtype_name(t.dtype)}, but the header recorded {dtype!r}"
                )
            if check.get(entry, "sha256", f"{TABLE}[{name!r}].sha256") != tensor_sha256(t):
                check.fail(f"tensor {name!r}", "does not match its checksum (its bytes changed after saving)")
        claimed = check.get(header, HEADER_SUM, HEADER_SUM)
        rest = {k: v for k, v in header.items() if k != HEADER_SUM}
        if claimed != hashlib.sha256(_canonical(rest)).hexdigest():
            check.fail("the header", "does not match its checksum (a field changed after saving)")


def require_tensors(check: Checker, tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> None:
    """The file holds exactly the tensors ``names`` that its header describes."""
    names = set(names)
    missing = sorted(names - set(tensors))
    if missing:
        raise ResultFileError(
            f"{check.source} is missing tensor {missing[0]!r}: the file is truncated or mismatched. Save it again."
        )
    extra = sorted(set(tensors) - names)
    if extra:
        check.fail(f"tensor {extra[0]!r}", "is in the file but not described by its header")


def read_json(path: Path, kind: str) -> Any:
    """Parse a JSON file; an unreadable or invalid one raises ResultFileError."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ResultFileError(f"{path} is not a readable {kind} JSON file ({e}). Save it again.") from e


def read_result(path: str | Path, key: str, kind: str) -> ResultFile:
    """Read a safetensors result file whose header is stored as JSON under metadata ``key``.

    Checks the file is readable, has the header, that it is a JSON object of format ``key`` and the current
    version. The caller then checks its fields and calls :meth:`ResultFile.verify_checksums`.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ResultFileError(f"No {kind} file at {str(path)!r}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ResultFileError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {e}. Save it again."
        ) from e
    if key not in meta:
        if meta.get("format") == key:
            raise ResultFileError(
                f"{path} is a version-1 {kind} file: it predates checksums (sdexplore 0.1.0), so its contents "
                "cannot be verified. Record the result again and save it with this sdexplore."
            )
        found = meta.get("format") or next((k for k in meta if k.startswith("sdexplore.")), None)
        raise ResultFileError(
            f"{path} has no {key!r} header: it holds {found or 'no sdexplore result'}, not {kind}."
        )
    try:
        header = json.loads(meta[key])
    except (ValueError, RecursionError) as e:
        raise ResultFileError(f"{path}: its {key!r} header is not valid JSON ({e}). Save it again.") from e
    check = Checker(str(path))
    return ResultFile(path, check.kind(header, key, kind), tensors)


# ---------------------------------------------------------------- tensor shape checks


def check_tensor(
    check: Checker,
    name: str,
    t: torch.Tensor,
    shape: tuple[int | None, ...],
    *,
    dtype: torch.dtype | None = None,
    floating: bool = False,
) -> tuple[int, ...]:
    """``t`` has ``len(shape)`` dims, matching every non-None size, of ``dtype`` (or any floating dtype)."""
    if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape, strict=True)):
        want = "(" + ", ".join("·" if s is None else str(s) for s in shape) + ")"
        check.fail(f"tensor {name!r}", f"has shape {tuple(t.shape)}, expected {want}")
    if dtype is not None and t.dtype != dtype:
        check.fail(f"tensor {name!r}", f"has dtype {dtype_name(t.dtype)}, expected {dtype_name(dtype)}")
    if floating and not t.dtype.is_floating_point:
        check.fail(f"tensor {name!r}", f"has dtype {dtype_name(t.dtype)}, expected a floating-point dtype")
    return tuple(t.shape)


# ---------------------------------------------------------------- cross-field checks (cheap: no model is loaded)


def family_of(check: Checker, name: str, field: str) -> Family | None:
    """The :mod:`sdexplore.families` record a header's family ``name`` names; None for ``""`` (built by hand).

    A name no family has fails: a result's other fields can only be checked against a family sdexplore knows.
    """
    from ..families import FAMILIES

    if not name:
        return None
    if name not in FAMILIES:
        check.fail(
            field, f"is {name!r}, not a model family this sdexplore knows ({', '.join(map(repr, FAMILIES))})"
        )
    return FAMILIES[name]


def check_channels(check: Checker, family: Family | None, field: str, channels: int, what: str) -> None:
    """``channels`` latent channels (of ``what``) fit ``family``: at most its VAE's channel count.

    At most, not exactly: a model of a family may have a smaller latent (the embedded MMDiT is an SD3-family model
    with 4 channels), while more channels than the family's are never recorded (the step recorder reads the extra
    input channels of an inpainting UNet as its mask and masked image, and keeps the family's latent channels).
    """
    if family is not None and channels > family.latent_channels:
        check.fail(
            field,
            f"is {family.name!r} ({family.label}: {family.latent_channels} latent channels), but {what} has "
            f"{channels} channels",
        )


def check_scale(check: Checker, field: str, small: tuple[int, int], large: tuple[int, int], what: str) -> int:
    """``large`` (H, W) is ``small`` (h, w) times one integer factor on both axes (a VAE decode); returns it."""
    (h, w), (H, W) = small, large
    f = H // h if h else 0
    if not f or H != f * h or W != f * w:
        check.fail(field, f"is {H}×{W} pixels, which is not one whole multiple of {what}'s {h}×{w}")
    return f
