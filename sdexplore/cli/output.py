"""The command line's output, written whole or not at all: a temporary folder or file beside ``--out``, renamed
into place when complete, with a manifest of what sdexplore wrote; a lock beside it against a second run;
``--force`` replaces a folder only when its manifest lists every file in it, unchanged, and leaves no stale files;
Ctrl-C, SIGTERM and failures leave the old output as it was. Also the command line's input error and message helpers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from .._signals import interrupts_deferred

PROG = "sdexplore"


class InputError(ValueError):
    """Bad command-line input, found before any expensive work (exit code 2)."""


def _note(message: str) -> None:
    print(f"{PROG}: note: {message}", file=sys.stderr)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, KeyError) and text.startswith("'") and text.endswith("'"):
        text = text[1:-1]
    return text


# ---------------------------------------------------------------- output: atomic, exclusive, no stale files

#: The file in every --out folder that lists what sdexplore wrote there (names and SHA-256): --force replaces a
#: folder only when it holds exactly these files, unchanged, so a user's file is never deleted for its name.
MANIFEST = ".sdexplore-manifest.json"
_MANIFEST_FORMAT = "sdexplore.output"
_STALE_LOCK_AGE_S = 30.0  # an empty or garbled lock file older than this is a leftover, not a run starting up


def _side_name(target: Path, kind: str) -> str:
    """``.NAME.sdexplore-KIND``: the lock, temporary and set-aside paths beside ``target`` (short enough for
    any file system: a long name is cut and a hash of it added)."""
    name = target.name
    if len(name.encode()) > 120:
        name = name[:60] + "-" + hashlib.sha1(target.name.encode()).hexdigest()[:12]
    return f".{name}.sdexplore-{kind}"


def _lock_path(target: Path) -> Path:
    """The lock file of an output path (beside it, in its parent folder)."""
    return target.parent / _side_name(target, "lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _ordinary_mode(path: Path, folder: bool) -> None:
    """The mode a plain mkdir / open(path, "w") would give (mkdtemp and mkstemp make private 0700 / 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)


class OutputBusyError(InputError):
    """Another run holds the lock of the same --out."""


class _Output:
    """One command's output, written whole or not at all.

    Everything is written into a temporary folder (or file) beside ``--out`` and renamed into place when
    complete, a folder with its :data:`MANIFEST` (every file's SHA-256); ``--force`` replaces a folder only
    when it holds exactly what its manifest lists, unchanged (never a user's file that merely has an output's
    name): it sets the old output aside, checks it again, renames the new one in and deletes the old one, so no
    stale file survives and old and new never mix. A lock file beside ``--out`` (created with O_CREAT | O_EXCL,
    holding ``pid host``) refuses a second run into the same place; a lock whose process is dead is taken over.
    On any failure, Ctrl-C or SIGTERM the temporary output and the lock are removed and the old output is left as
    it was.
    """

    def __init__(
        self,
        out: str,
        *,
        folder: bool,
        force: bool,
        option: str = "--out",
        suffixes: str = ".gif or .mp4",
    ) -> None:
        # the option the path came from and, for a file, the suffixes it takes (named in every message)
        self.option, self.suffixes = option, suffixes
        try:
            os.fsencode(out)  # a name the file system cannot store (a lone surrogate, a NUL byte) fails here
            if "\0" in out:
                raise ValueError("embedded null byte")
            self.shown = Path(out).expanduser()  # as the user spelled it: for messages and "wrote" lines
            self.target = Path(os.path.abspath(self.shown))
            if self.target.parent.exists():  # follow a symlinked parent, so renames stay in one folder
                self.target = self.target.parent.resolve() / self.target.name
            if self.target.is_symlink():  # replace what the link points to, keep the link
                self.target = self.target.resolve()
        except (OSError, ValueError, RuntimeError) as e:
            raise InputError(
                f"{option} {out!r} is not a usable path ({_one_line(e)}); choose another {option}"
            ) from e
        self.folder, self.force = folder, force
        self.parent = self.target.parent
        self.lock = _lock_path(self.target)
        self.path: Path | None = None  # the temporary folder or file to write into
        self.committed = False
        self._locked = False

    # -- before the model loads

    def check(self) -> None:
        """Every check that needs no model: a real write probe, what exists, the cwd. Writes nothing."""
        t, shown = self.target, self.shown
        if self.folder:
            if t.exists() and not t.is_dir():
                raise InputError(f"--out {shown} is a file; pass a folder (it is created if missing)")
            cwd = Path.cwd().resolve()
            if t == cwd or t in cwd.parents:
                raise InputError(
                    f"--out {shown} is the current folder or holds it, and a command replaces its whole --out "
                    "folder; pass a new folder name such as run1"
                )
        elif t.is_dir():
            raise InputError(f"{self.option} {shown} is a folder; pass a file name ending in {self.suffixes}")
        probe = self.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        where = shown if self.folder else shown.parent
        if not probe.is_dir():
            raise InputError(
                f"cannot write into {where}: {probe} is a file, not a folder; choose another {self.option}"
            )
        try:
            name_max = os.pathconf(probe, "PC_NAME_MAX")
        except (OSError, ValueError):
            name_max = 255
        for part in t.relative_to(probe).parts:
            if len(os.fsencode(part)) > name_max:
                raise InputError(
                    f"{self.option} {shown}: the name {part[:24]}... is longer than this file system allows "
                    f"({name_max} bytes); choose a shorter {self.option}"
                )
        try:  # a real probe: os.access says yes to root everywhere, even on /proc or a read-only mount
            fd, name = tempfile.mkstemp(dir=probe, prefix=".sdexplore-probe-")
            os.close(fd)
            os.unlink(name)
        except OSError as e:
            raise InputError(
                f"cannot write into {where}: {e.strerror or _one_line(e)} ({probe}); choose another {self.option}"
            ) from e
        self._check_existing()

    def _check_existing(self) -> None:
        t, shown = self.target, self.shown
        if not t.exists():
            return
        if not self.folder:
            if not self.force:
                raise InputError(
                    f"{shown} already exists; pass --force to replace it, or choose another {self.option}"
                )
            return
        try:
            entries = sorted(os.listdir(t))
        except OSError as e:
            raise InputError(f"cannot read --out {shown}: {e.strerror}; choose another --out") from e
        if not entries:
            return  # an empty folder is simply filled
        problem = _not_ours(t)
        if problem is not None:
            raise InputError(
                f"{shown} holds {problem}, and a command replaces its whole --out folder; choose a new --out "
                "folder (or move your files out of it)"
            )
        if not self.force:
            more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
            raise InputError(
                f"{shown} already exists ({entries[0]}{more}); pass --force to replace it, or choose another --out"
            )

    def acquire(self) -> None:
        """Create the parent folder, take the lock, clear a dead run's leftovers, make the temporary output."""
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(
                f"cannot create {self.parent}: {e.strerror}; choose another {self.option}"
            ) from e
        self._take_lock()
        try:
            self._clear_leftovers()
            self._check_existing()  # again, under the lock
            prefix = _side_name(self.target, "tmp-")
            if self.folder:
                self.path = Path(tempfile.mkdtemp(dir=self.parent, prefix=prefix))
            else:
                fd, name = tempfile.mkstemp(dir=self.parent, prefix=prefix, suffix=self.target.suffix)
                os.close(fd)
                self.path = Path(name)
            _ordinary_mode(self.path, self.folder)
        except BaseException:
            self.close()
            raise

    def _take_lock(self) -> None:
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(3):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._lock_is_stale():
                    break
                continue  # taken over: try again
            except OSError as e:
                raise InputError(
                    f"cannot write into {self.shown.parent}: {e.strerror} ({self.lock}); choose another {self.option}"
                ) from e
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self._locked = True
            return
        owner = self._read_lock() or "?"
        raise OutputBusyError(
            f"another sdexplore run (pid {owner.split()[0]}) is writing {self.shown}; wait for it to end or choose "
            f"another {self.option} (if no run is going on, delete {self.lock})"
        )

    def _read_lock(self, path: Path | None = None) -> str | None:
        try:
            return (path or self.lock).read_text()
        except (OSError, UnicodeDecodeError):
            return None

    def _lock_is_stale(self) -> bool:
        """True when the lock was left by a dead run and has been moved away by this call (taken over)."""
        text = self._read_lock()
        if text is None:
            return False
        parts = text.split()
        if len(parts) == 2 and parts[0].isdigit():
            if parts[1] != socket.gethostname() or _pid_alive(int(parts[0])):
                return False  # a live run, or one on another machine sharing this folder: never taken over
        else:  # empty or garbled: a run that has just created it, unless it is old
            try:
                if time.time() - self.lock.stat().st_mtime < _STALE_LOCK_AGE_S:
                    return False
            except OSError:
                return False
        # Move it aside, then make sure what was moved is the dead lock read above, not a new run's lock.
        aside = self.parent / _side_name(self.target, f"deadlock-{secrets.token_hex(4)}")
        try:
            os.rename(self.lock, aside)
        except OSError:
            return False
        if self._read_lock(aside) != text:  # another run took it over first: put its lock back
            with contextlib.suppress(OSError):
                os.link(aside, self.lock)
            with contextlib.suppress(OSError):
                os.unlink(aside)
            return False
        with contextlib.suppress(OSError):
            os.unlink(aside)
        return True

    def _clear_leftovers(self) -> None:
        """Remove what a killed run (kill -9, power loss) left beside this output; only the lock holder does."""
        pattern = re.compile(
            re.escape(_side_name(self.target, ""))
            + r"(tmp|old)-[A-Za-z0-9_]{8}"
            + re.escape(self.target.suffix)
            if not self.folder
            else re.escape(_side_name(self.target, "")) + r"(tmp|old)-[A-Za-z0-9_]{8}"
        )
        for name in os.listdir(self.parent):
            m = pattern.fullmatch(name)
            if m is None:
                continue
            left = self.parent / name
            if m.group(1) == "old" and not self.target.exists():  # killed between the two renames
                os.rename(left, self.target)
                _note(f"restored {self.shown} from an interrupted earlier run")
            else:
                _remove(left)

    # -- after the work

    def commit(self) -> None:
        """Rename the finished output into place (replacing the old one with --force); Ctrl-C waits till done."""
        assert self.path is not None and not self.committed
        if self.folder:
            _write_manifest(self.path)
        with interrupts_deferred():
            t = self.target
            if not self.folder:
                if t.exists() and not self.force:
                    raise InputError(
                        f"{self.shown} appeared while this run was writing; nothing was replaced"
                    )
                os.replace(self.path, t)
            elif t.exists() and os.listdir(t):
                if not self.force:
                    raise InputError(
                        f"{self.shown} appeared while this run was writing; nothing was replaced"
                    )
                old = self.parent / (_side_name(t, "old-") + secrets.token_hex(4))
                os.rename(t, old)
                problem = _not_ours(old)  # checked again once set aside: a file may have been added meanwhile
                if problem is not None:
                    os.rename(old, t)
                    raise InputError(
                        f"{self.shown} now holds {problem} (added while this run was writing); nothing was "
                        "replaced: choose a new --out folder"
                    )
                try:
                    os.rename(self.path, t)
                except BaseException:
                    os.rename(old, t)
                    raise
                _remove(old)
            else:
                with contextlib.suppress(FileNotFoundError):
                    t.rmdir()  # empty
                os.rename(self.path, t)
            self.committed = True
            self.path = None

    def close(self) -> None:
        """Remove the temporary output (if not committed) and release the lock."""
        try:
            if self.path is not None:
                _remove(self.path)
                self.path = None
        finally:
            if self._locked:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.lock)
                self._locked = False

    def __enter__(self) -> _Output:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    """List every file of a finished output folder with its SHA-256 in ``folder/MANIFEST``."""
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    doc = {"format": _MANIFEST_FORMAT, "version": 1, "files": files}
    (folder / MANIFEST).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def _not_ours(folder: Path) -> str | None:
    """None when ``folder`` holds exactly the files its manifest lists, each unchanged (sdexplore's own output,
    safe to replace as a whole); else what is not, in words for an error message."""
    try:
        doc = json.loads((folder / MANIFEST).read_text())
        listed = doc["files"] if doc.get("format") == _MANIFEST_FORMAT else None
        if not isinstance(listed, dict):
            raise ValueError("not an sdexplore manifest")
    except FileNotFoundError:
        first = sorted(os.listdir(folder))[0]
        return f"files sdexplore did not write (e.g. {first}; it has no {MANIFEST} listing sdexplore's files)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"an unreadable {MANIFEST}, so sdexplore cannot tell its files from yours"
    for name in sorted(os.listdir(folder)):
        if name == MANIFEST:
            continue
        path = folder / name
        if name not in listed or path.is_symlink() or not path.is_file():
            return f"files sdexplore did not write (e.g. {name})"
        try:
            changed = _sha256(path) != listed[name]
        except OSError:
            changed = True
        if changed:
            return f"{name}, changed since sdexplore wrote it"
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------- loading
