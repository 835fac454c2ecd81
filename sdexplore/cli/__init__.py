"""The ``sdexplore`` command: describe a model, record steps, attention maps and walks headless, into files.

One module per command (``describe``, ``steps``, ``attention``, ``walk``, ``direction``, ``invert``, ``edit``,
``sweep``); the checks and helpers they share are in ``_common``, the output transaction in ``output``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from typing import NoReturn

from .._signals import sigterm_as_interrupt
from .output import PROG, InputError, _one_line


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one line (``sdexplore: error: ...``), not usage plus a message."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{message} (see `{self.prog} --help`)")


_MAIN_EPILOG = """\
examples:
  sdexplore describe
  sdexplore steps "a big red circle at the top left on a blue background" --out run1
  sdexplore attention "a big red circle at the top left on a blue background" --words circle blue --out att
  sdexplore walk "a red circle" "a blue square" --seeds 0 1 --frames 24 --out walk.gif
  sdexplore invert photo.png "a big red circle at the top left on a blue background" --out inv
  sdexplore edit "a big red circle at the top left on a blue background" \
      "a big green circle at the top left on a blue background" --out edit
  sdexplore attention "a big red circle at the top left on a blue background" --image photo.png --out att
  sdexplore direction "a red circle" "a blue circle" --out red-to-blue.safetensors
  sdexplore steps "a red square at the top" --direction red-to-blue.safetensors:1.0 --out blue
  sdexplore steps "an astronaut riding a horse" --model stable-diffusion-v1-5/stable-diffusion-v1-5 --steps 30

Without --model every command uses the embedded tiny model (offline, CPU, seconds).
`sdexplore COMMAND --help` lists each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``sdexplore`` argument parser: one subcommand per module of this package."""
    from .. import __version__
    from . import attention, describe, direction, edit, invert, steps, sweep, walk

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Look inside Stable Diffusion from the command line: every denoising step, attention "
        "per word, walks between prompts.",
        epilog=_MAIN_EPILOG,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")

    for command in (describe, steps, attention, walk, direction, invert, edit, sweep):  # the order of --help
        command.add_parser(sub)
    return parser


@contextlib.contextmanager
def _quiet_libraries(debug: bool) -> Iterator[None]:
    """Hide diffusers' and transformers' informational chatter (not our own notes) unless --debug."""
    if debug:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)  # their root loggers are set up on first use
    levels = [lib.get_verbosity() for lib in libraries]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        for lib in libraries:
            lib.set_verbosity(logging.ERROR)
        try:
            yield
        finally:
            for lib, level in zip(libraries, levels, strict=True):
                lib.set_verbosity(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sdexplore`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    0 on success; 2 for bad input (one line on stderr: ``sdexplore: error: ...``); 1 when the work itself
    fails; 130 when interrupted (Ctrl-C or SIGTERM: temporary output removed, the old output as it was).
    ``--debug`` shows the full traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args: argparse.Namespace | None = None
    try:
        parser = build_parser()
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit as done:  # --help and --version
            return int(done.code or 0)
        if extra:
            where = f"{PROG} {args.command}" if args.command else PROG
            raise InputError(f"unrecognized arguments: {' '.join(extra)} (see `{where} --help`)")
        if args.command is None:
            raise InputError(
                "choose a command: describe, steps, attention, walk, invert, edit, direction, sweep or sweep-report "
                "(see "
                "`sdexplore --help`)"
            )
        with sigterm_as_interrupt(), _quiet_libraries(debug):  # SIGTERM (kill, a scheduler) as Ctrl-C
            return int(args.run(args))
    except KeyboardInterrupt:  # the output's temporary files and lock are already removed
        output = getattr(args, "output", None)
        if output is None:
            print(f"{PROG}: interrupted", file=sys.stderr)
        elif output.committed:
            print(f"{PROG}: interrupted after writing {output.shown}", file=sys.stderr)
        else:
            print(f"{PROG}: interrupted; nothing was written ({output.shown} is as it was)", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; --debug for the traceback
        from ..errors import SdexploreError

        if debug:
            traceback.print_exc()
        expected = isinstance(error, (SdexploreError, ValueError, OSError, LookupError, MemoryError))
        hint = "" if expected or debug else f" ({type(error).__name__}; run with --debug for the traceback)"
        print(f"{PROG}: error: {_one_line(error)}{hint}", file=sys.stderr)
        return 2 if isinstance(error, InputError) else 1
