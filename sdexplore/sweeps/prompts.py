"""Prompt files for a sweep: plain text, CSV or JSONL, with optional per-item seed, negative prompt and words."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from .._checks import MAX_SEED
from ..errors import InvalidArgumentError

#: Columns a CSV prompt file may have (``prompt`` is required); JSONL objects take the same keys.
COLUMNS = ("prompt", "seed", "negative_prompt", "words")
_ALIASES = {"negative": "negative_prompt"}


@dataclass(frozen=True)
class PromptRow:
    """One prompt of a prompt file; ``seed``, ``negative_prompt`` and ``words`` are ``None`` when not given."""

    prompt: str
    line: int  # 1-based line of the file it came from (for messages)
    seed: int | None = None
    negative_prompt: str | None = None
    words: tuple[str, ...] | None = None


def read_prompts(path: str | Path) -> list[PromptRow]:
    """Read a prompt file; the format follows the suffix: ``.csv``, ``.jsonl``/``.ndjson``, anything else text.

    - text: one prompt per line; blank lines and lines starting with ``#`` are skipped.
    - CSV: a header row naming ``prompt`` and optionally ``seed``, ``negative_prompt`` (or ``negative``) and
      ``words`` (several words separated by ``;``, e.g. ``circle;blue background``).
    - JSONL: one JSON object per line, ``{"prompt": ..., "seed": 3, "negative_prompt": ..., "words": [...]}``.

    Every problem is an :class:`~sdexplore.errors.InvalidArgumentError` naming the file and the line.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InvalidArgumentError(
            f"cannot read the prompt file {path}: {e.strerror}; pass a readable file"
        ) from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _read_csv(path, text)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _read_jsonl(path, text)
    else:
        rows = _read_text(text)
    if not rows:
        raise InvalidArgumentError(
            f"{path} holds no prompts: write one prompt per line (text), a CSV with a 'prompt' column, or JSONL "
            'objects such as {"prompt": "a red circle"}'
        )
    return rows


def _read_text(text: str) -> list[PromptRow]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        prompt = line.strip()
        if prompt and not prompt.startswith("#"):
            rows.append(PromptRow(prompt, number))
    return rows


def _read_csv(path: Path, text: str) -> list[PromptRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise InvalidArgumentError(f"{path} line 1: not valid CSV ({e})") from e
    if header is None:
        return []
    names = [_ALIASES.get(h.strip().lower(), h.strip().lower()) for h in header]
    unknown = [h for h, n in zip(header, names, strict=True) if n not in COLUMNS]
    if unknown or "prompt" not in names or len(set(names)) != len(names):
        problem = (
            f"unknown column {unknown[0]!r}"
            if unknown
            else ("no 'prompt' column" if "prompt" not in names else "a column named twice")
        )
        raise InvalidArgumentError(
            f"{path} line 1: the CSV header {header} has {problem}; the columns are {', '.join(COLUMNS)} "
            "(prompt required; words separated by ';')"
        )
    rows = []
    try:
        for record in reader:
            number = reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            if len(record) != len(names):
                raise InvalidArgumentError(
                    f"{path} line {number}: {len(record)} cells for {len(names)} columns ({', '.join(names)}); "
                    "quote cells that contain commas"
                )
            cells = dict(zip(names, record, strict=True))
            words = cells.get("words", "").strip()
            rows.append(
                _row(
                    path,
                    number,
                    prompt=cells["prompt"],
                    seed=cells.get("seed", "").strip() or None,
                    negative_prompt=cells.get("negative_prompt") or None,
                    words=[w for w in words.split(";")] if words else None,
                )
            )
    except csv.Error as e:
        raise InvalidArgumentError(f"{path} line {reader.line_num}: not valid CSV ({e})") from e
    return rows


def _read_jsonl(path: Path, text: str) -> list[PromptRow]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(
                f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno}); write one object per line, "
                'e.g. {"prompt": "a red circle", "seed": 3}'
            ) from e
        if not isinstance(obj, dict):
            raise InvalidArgumentError(
                f"{path} line {number}: a JSON {type(obj).__name__}, not an object; write "
                '{"prompt": "...", "seed": 3, "negative_prompt": "...", "words": ["..."]}'
            )
        unknown = sorted(set(obj) - set(COLUMNS) - set(_ALIASES))
        if unknown:
            raise InvalidArgumentError(
                f"{path} line {number}: unknown key {unknown[0]!r}; the keys are {', '.join(COLUMNS)}"
            )
        fields = {_ALIASES.get(k, k): v for k, v in obj.items()}
        if "prompt" not in fields:
            raise InvalidArgumentError(f'{path} line {number}: no "prompt" key')
        words = fields.get("words")
        if words is not None and (not isinstance(words, list) or not all(isinstance(w, str) for w in words)):
            raise InvalidArgumentError(
                f'{path} line {number}: "words" is {words!r}; give a list of strings, e.g. ["circle"]'
            )
        rows.append(
            _row(
                path,
                number,
                prompt=fields["prompt"],
                seed=fields.get("seed"),
                negative_prompt=fields.get("negative_prompt"),
                words=words,
            )
        )
    return rows


def _row(
    path: Path, number: int, *, prompt: object, seed: object, negative_prompt: object, words: list[str] | None
) -> PromptRow:
    where = f"{path} line {number}"
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidArgumentError(f"{where}: the prompt is {prompt!r}; give a non-empty string")
    if seed is not None:
        if isinstance(seed, str):
            try:
                seed = int(seed)
            except ValueError:
                pass
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise InvalidArgumentError(
                f"{where}: the seed is {seed!r}; give a whole number from 0 to 2**64 - 1"
            )
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise InvalidArgumentError(f"{where}: negative_prompt is {negative_prompt!r}; give a string")
    if words is not None:
        words = [" ".join(w.split()) for w in words]
        if not words or not all(words):
            raise InvalidArgumentError(f"{where}: an empty word in words; give words of the prompt")
    return PromptRow(
        prompt=prompt.strip(),
        line=number,
        seed=seed,
        negative_prompt=negative_prompt,
        words=tuple(words) if words is not None else None,
    )
