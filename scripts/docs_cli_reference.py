"""Write the command-line reference page (Markdown) from ``sdexplore.cli.build_parser()``, so it never drifts."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

WIDTH = 100  # characters per line of the help text on the page
HEADER = """# Command-line reference

Generated from `sdexplore.cli.build_parser()` by `scripts/docs_cli_reference.py` at every documentation build:
it is exactly what `sdexplore COMMAND --help` prints. The [command-line guide](../cli.md) explains the output
files and guarantees.
"""


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's sub-commands in the order they were added."""
    for action in parser._actions:  # argparse keeps no public list of sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    """One Markdown row per argument: flags, value, default, help."""
    rows = ["| argument | value | default | meaning |", "| --- | --- | --- | --- |"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        flags = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
        if action.nargs == 0 or not action.option_strings:  # a flag, or a positional named in its own column
            value = ""
        else:
            value = f"`{action.metavar or action.dest.upper()}`"
            if action.choices is not None and not action.metavar:
                value = " / ".join(f"`{c}`" for c in action.choices)
        default = action.default
        shown = "" if default in (None, False, argparse.SUPPRESS) or action.nargs == 0 else f"`{default}`"
        meaning = (action.help or "").replace("|", "\\|").replace("\n", " ")
        if meaning == argparse.SUPPRESS:
            continue
        meaning = meaning.replace("%(default)s", str(default)).replace("%(prog)s", parser.prog)
        rows.append(f"| {flags} | {value} | {shown} | {meaning} |")
    return rows


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole reference page as Markdown: the top-level help, then one section per command."""
    if parser is None:
        from sdexplore.cli import build_parser

        parser = build_parser()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)  # argparse wraps help to the terminal's width: fix it for the page
    try:
        return _render(parser)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _render(parser: argparse.ArgumentParser) -> str:
    lines = [HEADER, f"## `{parser.prog}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in _subcommands(parser).items():
        lines += [f"## `{parser.prog} {name}`", "", *_options_table(sub), ""]
        lines += ["```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python scripts/docs_cli_reference.py OUT.md`` (or ``-`` for standard output)."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: docs_cli_reference.py OUT.md  (or - for standard output)", file=sys.stderr)
        return 2
    text = render()
    if args[0] == "-":
        sys.stdout.write(text)
    else:
        out = Path(args[0])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)  # atomic
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
