"""The run folder of a sweep: settings file, lock, atomic per-item folders with checksummed manifests, index."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .._files import write_text_atomic
from ..errors import InvalidArgumentError, ResultFileError
from .plan import SweepItem

FORMAT = "sdexplore.sweep"
VERSION = 1
SETTINGS = "sweep.json"
INDEX = "index.jsonl"
ITEMS = "items"
MANIFEST = "manifest.json"
LOCK = ".sweep.lock"
_TMP = ".tmp-"  # prefix of an item folder being written (items/.tmp-000012-<random>)


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that make the images (stored in the settings file)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for package in ("sdexplore", "torch", "diffusers", "transformers", "accelerate", "safetensors"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def model_fingerprint(folder: Path | None) -> str | None:
    """SHA-256 over a local model folder's JSON configs (contents) and weight files (names and sizes); None for
    a hub id. Changed weights or configs make another fingerprint, so a resumed sweep notices a new model."""
    if folder is None or not folder.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".txt"):
            rel = p.relative_to(folder).as_posix()
            h.update(rel.encode())
            h.update(p.read_bytes() if p.suffix == ".json" else str(p.stat().st_size).encode())
    return h.hexdigest()


def check_settings(out: Path, settings: dict[str, Any]) -> bool:
    """Refuse a folder that holds another sweep (another plan, model or generation settings).

    Returns True when the folder already holds this sweep, False when it holds none yet. Reads only.
    """
    path = out / SETTINGS
    if not path.exists():
        if out.exists() and (not out.is_dir() or any(p.name != LOCK for p in out.iterdir())):
            raise InvalidArgumentError(
                f"{out} exists and is not a sweep folder (no {SETTINGS}); choose an empty or new --out"
            )
        return False
    try:
        stored = json.loads(path.read_text())
        assert stored["format"] == FORMAT
        old = stored["settings"]
    except Exception as e:  # noqa: BLE001 - any unreadable settings file gets the same message
        raise ResultFileError(
            f"{path} is not a readable sweep settings file ({type(e).__name__}); choose another --out"
        ) from e
    if stored.get("version") != VERSION:
        raise ResultFileError(
            f"{path} is from sweep format version {stored.get('version')}; choose another --out"
        )
    if old != settings:
        keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        diff = "; ".join(f"{k}: {_short(settings.get(k))} now, {_short(old.get(k))} there" for k in keys)
        raise InvalidArgumentError(
            f"{out} holds a sweep with other settings ({diff}); rerun with that sweep's settings to resume it, "
            "or choose another --out"
        )
    return True


def check_writable(out: Path) -> None:
    """Refuse an ``out`` this process cannot create or write into, with a sentence saying so (InvalidArgumentError),
    before anything loads: a real probe file in the nearest existing folder (``os.access`` says yes to root even
    on /proc or a read-only mount). Writes nothing that stays."""
    probe = Path(os.path.abspath(out))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InvalidArgumentError(
            f"cannot write into {out}: {probe} is a file, not a folder; choose another --out"
        )
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".sdexplore-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise InvalidArgumentError(
            f"cannot write into {out}: {e.strerror or e} ({probe}); choose another --out"
        ) from e


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def write_settings(out: Path, settings: dict[str, Any], environment: dict[str, Any]) -> None:
    """Write ``sweep.json`` (atomically): the settings a rerun must match and the versions that made it."""
    doc = {"format": FORMAT, "version": VERSION, "settings": settings, **environment}
    write_text_atomic(out / SETTINGS, json.dumps(doc, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------- lock (held by the main process)


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold ``out/.sweep.lock`` (pid and host) while the sweep runs; a dead run's lock on this host is taken
    over; a live one is refused. Two sweeps never write one folder at once."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _stale(lock):
                continue
            owner = (_read(lock) or "? ?").split()
            raise InvalidArgumentError(
                f"another sweep (pid {owner[0]} on {owner[-1]}) is writing {out}; wait for it to end, or delete "
                f"{lock} if no sweep is running"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:
        raise InvalidArgumentError(f"cannot take {lock}; delete it if no sweep is running")
    try:
        yield
    finally:
        if _read(lock) == me:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _stale(lock: Path) -> bool:
    """True (and the lock removed) when it was left by a dead process on this host."""
    parts = (_read(lock) or "").split()
    if len(parts) != 2 or not parts[0].isdigit() or parts[1] != socket.gethostname():
        return False
    try:
        os.kill(int(parts[0]), 0)
        return False
    except ProcessLookupError:
        pass
    except PermissionError:
        return False
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    return True


# ---------------------------------------------------------------- items


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def clear_leftovers(out: Path) -> int:
    """Remove item folders a killed run was still writing (``items/.tmp-*``); returns how many. Main process
    only, before any process writes."""
    root = out / ITEMS
    if not root.is_dir():
        return 0
    stale = [p for p in root.iterdir() if p.name.startswith(".")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return len(stale)


def read_item(out: Path, item: SweepItem) -> dict[str, Any] | None:
    """The item's manifest when its folder is complete and intact (every file's checksum matches, and it is
    this plan's item), else None: missing, partial or corrupt items are redone."""
    folder = out / ITEMS / item.name
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("key") != item.key:
            return None
        files = manifest["files"]
        present = {p.name for p in folder.iterdir()} - {MANIFEST}
        if present != set(files):
            return None
        for name, digest in files.items():
            if sha256_file(folder / name) != digest:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_item(
    out: Path, item: SweepItem, files: dict[str, bytes], row: dict[str, Any], run: dict[str, Any]
) -> None:
    """Write an item's files and manifest into a temporary folder, then rename it into place.

    A corrupt or partial folder already there is moved aside and removed first; the rename itself is atomic,
    so ``items/<name>`` is either absent, an old folder, or complete.
    """
    root = out / ITEMS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP}{item.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        digests = {}
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            digests[name] = hashlib.sha256(data).hexdigest()
        manifest = {"item": item.spec(), "key": item.key, "files": digests, "row": row, "run": run}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        final = root / item.name
        if final.exists():
            aside = root / f"{_TMP}{item.name}-old-{secrets.token_hex(4)}"
            os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- index


def index_rows(out: Path, items: Sequence[SweepItem]) -> list[dict[str, Any]]:
    """One row per planned item, in plan order: the item, ``status`` ("done" or "pending") and, when done, its
    figures and files (from its verified manifest) and ``seconds`` it took."""
    rows = []
    for item in items:
        manifest = read_item(out, item)
        row: dict[str, Any] = {"item": item.index, "name": item.name, **_flat(item)}
        if manifest is None:
            row["status"] = "pending"
        else:
            row["status"] = "done"
            row.update(manifest["row"])
            row["files"] = sorted(manifest["files"])
            row["seconds"] = manifest["run"].get("seconds")
            row["rank"] = manifest["run"].get("rank")
        rows.append(row)
    return rows


def _flat(item: SweepItem) -> dict[str, Any]:
    spec = item.spec()
    spec.pop("index")
    return spec


def write_index(out: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``index.jsonl`` atomically (one JSON object per line: ``pandas.read_json(path, lines=True)``)."""
    path = out / INDEX
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path


def read_index(path: Path) -> list[dict[str, Any]]:
    """Rows of an ``index.jsonl``."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ResultFileError(
                    f"{path} line {number} is not JSON ({e.msg}); rerun the sweep to rebuild it"
                ) from e
    return rows
