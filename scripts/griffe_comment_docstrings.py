"""A griffe extension for sdexplore's docstrings: ``#:`` comments become attribute docstrings; Sphinx-isms read.

sdexplore documents its constants the Sphinx way (``#: The embedded model's folder.`` above the assignment) and
its docstrings use a few reST forms (``:class:`~sdexplore.results.trace.Trace```, a ``::`` before a code block). griffe,
which mkdocstrings uses, reads only string literals below an assignment, and Markdown shows reST verbatim; this
extension closes both gaps at build time, without touching the sources. Loaded by ``mkdocs.yml``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :func:`~sdexplore.record.observe.observe` / :class:`Trace` -> `observe` / `Trace`
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj|const):`~?(?:[\w.]*\.)?([^`<>]+?)`")
_LITERAL_MARKER = re.compile(r"(?m)^[ \t]*::[ \t]*\n")  # a line holding only "::" (reST: code block follows)
_TRAILING_MARKER = re.compile(r"(?m)(\S)::\s*$")  # "Example::" -> "Example:"


def comment_docstring(lines: list[str], lineno: int) -> str | None:
    """The ``#:`` block ending just above 1-based line ``lineno`` (markers stripped), or None."""
    block: list[str] = []
    i = lineno - 2  # 0-based index of the line above the assignment
    while i >= 0 and lines[i].lstrip().startswith("#:"):
        text = lines[i].lstrip()[2:]
        block.append(text[1:] if text.startswith(" ") else text)
        i -= 1
    return "\n".join(reversed(block)) or None


def markdown_from_rest(text: str) -> str:
    """Rewrite the reST forms sdexplore's docstrings use into Markdown that reads the same."""
    text = _ROLE.sub(r"`\1`", text)
    text = _LITERAL_MARKER.sub("", text)
    return _TRAILING_MARKER.sub(r"\1:", text)


class CommentDocstrings(griffe.Extension):
    """Give undocumented attributes their ``#:`` comment block; read reST roles in every docstring as code."""

    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, agent: Any, **kwargs: Any) -> None:
        if attr.docstring is not None or attr.lineno is None:
            return
        try:
            lines = attr.lines_collection[attr.filepath]
        except (KeyError, TypeError):  # an object built by inspection has no source lines
            return
        text = comment_docstring(lines, attr.lineno)
        if text:
            attr.docstring = griffe.Docstring(text, lineno=attr.lineno, parent=attr)

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_from_rest(obj.docstring.value)
