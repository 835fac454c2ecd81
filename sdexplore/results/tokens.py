"""TokenList: the key positions of a prompt labelled (BOS, text, EOS, padding) and merged into words.

One list may hold several segments, each labelled by its own tokenizer: SD3's joint sequence is CLIP's 77
positions, then T5's. Words are merged per segment by the tokenizer's own word marker: CLIP's BPE pieces end a
word with ``</w>`` ("cir", "cle</w>"), T5's sentencepiece pieces start one with ``▁`` ("▁cir", "cle").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import WordNotFoundError

BOS, TEXT, EOS, PAD = "bos", "text", "eos", "pad"
_END_OF_WORD = "</w>"
WORD_END, WORD_START = "end", "start"  # where a tokenizer's word marker sits on a piece


@dataclass(frozen=True)
class Segment:
    """A run of key positions ``[start, stop)`` labelled by one tokenizer.

    ``marker`` is that tokenizer's word marker and ``marker_at`` where it sits: ``"end"`` for CLIP's BPE
    (``"circle</w>"`` ends a word), ``"start"`` for sentencepiece (``"▁cir"`` starts one, ``"cle"`` continues it).
    """

    name: str  # "clip" or "t5"
    start: int
    stop: int
    marker: str = _END_OF_WORD
    marker_at: str = WORD_END  # "end" | "start"

    def display(self, piece: str) -> str:
        """A piece without its word marker ("circle</w>" → "circle", "▁cir" → "cir"; a lone "▁" stays)."""
        if self.marker_at == WORD_END:
            return piece.removesuffix(self.marker)
        return piece.removeprefix(self.marker) or piece

    def merge(self, pieces: list[str]) -> list[tuple[str, list[int]]]:
        """Words of consecutive text pieces, each with the indices (into ``pieces``) of its pieces.

        Under sentencepiece a punctuation-only piece is a word of its own (it glues punctuation to the word
        before, "▁circle" ","; CLIP's tokenizer splits it off already), so both schemes give the same words.
        """
        words: list[tuple[str, list[int]]] = []
        text, idx = "", []
        prev_punct = False
        for i, piece in enumerate(pieces):
            if self.marker_at == WORD_END:
                body, starts, ends = piece.removesuffix(self.marker), False, piece.endswith(self.marker)
            else:
                starts = piece.startswith(self.marker)
                body, ends = piece[len(self.marker) :] if starts else piece, False
            punct = self.marker_at == WORD_START and bool(body) and not any(c.isalnum() for c in body)
            if text and (starts or punct or prev_punct):
                words.append((text, idx))
                text, idx = "", []
            text += body
            idx.append(i)
            prev_punct = punct
            if ends:
                words.append((text, idx))
                text, idx, prev_punct = "", [], False
        if idx:  # a word cut by truncation
            words.append((text, idx))
        return words

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "name": self.name,
            "start": self.start,
            "stop": self.stop,
            "marker": self.marker,
            "marker_at": self.marker_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Segment:
        """Inverse of :meth:`to_json`."""
        return cls(
            str(data["name"]),
            int(data["start"]),
            int(data["stop"]),
            str(data["marker"]),
            str(data["marker_at"]),
        )


@dataclass
class TokenList:
    """The tokens that label the key positions of one prompt's text conditioning.

    ``ids`` has one entry per key position: for the UNet families 77 (BOS, the prompt's tokens, EOS, then
    padding); for SD3 CLIP's 77 followed by T5's ``max_sequence_length`` positions (the prompt's pieces, ``</s>``,
    then ``<pad>``), the sequence its joint attention sees; for Flux T5's alone. ``segments`` say which tokenizer
    labelled which positions (empty: one CLIP segment over all positions). ``truncated`` lists the prompt's
    tokens that no segment had room for (the text encoders never saw them, so they have no map). For SDXL the
    ids are those of ``pipe.tokenizer`` (the two SDXL tokenizers give identical ids for the same text; only the
    padding id differs).
    """

    ids: list[int]  # one id per key position
    pieces: list[str]  # raw pieces ("circle</w>", "▁cir", "<|startoftext|>", "</s>"), one per key position
    kinds: list[str]  # "bos" | "text" | "eos" | "pad", one per key position
    truncated: list[str] = field(default_factory=list)  # tokens cut off beyond the key positions
    prompt: str | None = None  # the text, when it was seen
    segments: list[Segment] = field(default_factory=list)  # which tokenizer labelled which positions

    def parts(self) -> list[Segment]:
        """The segments, or one CLIP segment over every position where none were given."""
        return self.segments or [Segment("clip", 0, len(self.ids))]

    def segment(self, name: str) -> Segment:
        """The segment called ``name`` ("clip", "t5"); WordNotFoundError listing the segments otherwise."""
        for s in self.parts():
            if s.name == name:
                return s
        raise WordNotFoundError(
            f"segment={name!r} is not a part of this sequence; its parts: {[s.name for s in self.parts()]}."
        )

    @property
    def tokens(self) -> list[str]:
        """Display strings, one per key position (word markers removed; special tokens as the tokenizer writes them)."""
        out: list[str] = []
        for s in self.parts():
            out += [s.display(p) for p in self.pieces[s.start : s.stop]]
        return out

    def word_spans(self, segment: str | None = None) -> list[tuple[str, list[int]]]:
        """Words of the prompt with the key positions of their sub-word tokens, segment by segment.

        A CLIP word ends at a ``</w>`` piece, a T5 word begins at a ``▁`` piece. ``segment`` ("clip", "t5")
        keeps one segment's words; by default every segment's words are listed, in sequence order (on SD3 each
        word then appears twice: once among CLIP's positions, once among T5's).
        """
        spans: list[tuple[str, list[int]]] = []
        for s in [self.segment(segment)] if segment is not None else self.parts():
            text = [i for i in range(s.start, s.stop) if self.kinds[i] == TEXT]
            spans += [(w, [text[j] for j in idx]) for w, idx in s.merge([self.pieces[i] for i in text])]
        return spans

    def _main(self) -> Segment:
        """The segment that saw the most of the prompt (T5's on SD3 with a long prompt; the first on a tie)."""
        parts = self.parts()
        counts = [sum(k == TEXT for k in self.kinds[s.start : s.stop]) for s in parts]
        return parts[counts.index(max(counts))]

    @property
    def words(self) -> list[str]:
        """The prompt's words in order (sub-word tokens merged; punctuation tokens are words of their own).

        With several segments, those of the segment that saw the most of the prompt.
        """
        return [w for w, _ in self.word_spans(self._main().name)]

    @property
    def truncated_words(self) -> list[str]:
        """``truncated`` merged into words (by the word marker of the segment that saw the most)."""
        return [w for w, _ in self._main().merge(self.truncated)]

    def positions(self, word: str, occurrence: int | None = None, *, segment: str | None = None) -> list[int]:
        """Key positions of ``word`` (one or several space-separated words, case-insensitive).

        Every occurrence is included unless ``occurrence`` (0-based) picks one. With several segments (SD3's
        CLIP and T5 parts) the word's positions in each are included, ``occurrence`` counting within each;
        ``segment="t5"`` keeps one. Raises :class:`~sdexplore.errors.WordNotFoundError` listing the prompt's
        words and tokens otherwise.
        """
        if not isinstance(word, str):
            raise WordNotFoundError(
                f"word={word!r} ({type(word).__name__}) is not a word: pass a string of the prompt's words, e.g. "
                f"{_example(self)} (words: {self.words}); for a key position use .token(i)."
            )
        if occurrence is not None and (isinstance(occurrence, bool) or not isinstance(occurrence, int)):
            raise WordNotFoundError(
                f"occurrence={occurrence!r} is not an occurrence index: pass None (all) or an int from 0."
            )
        query = word.lower().split()
        if not query:
            raise WordNotFoundError("Empty word: pass a word of the prompt, e.g. " + _example(self))
        per_segment: list[list[list[int]]] = []
        for s in [self.segment(segment)] if segment is not None else self.parts():
            spans = self.word_spans(s.name)
            words = [w.lower() for w, _ in spans]
            hits: list[list[int]] = []
            for start in range(len(words) - len(query) + 1):
                if words[start : start + len(query)] == query:
                    hits.append([p for _, ps in spans[start : start + len(query)] for p in ps])
            per_segment.append(hits)
        if not any(per_segment):
            raise WordNotFoundError(self._not_found_message(word))
        if occurrence is not None:
            most = max(len(h) for h in per_segment)
            if not 0 <= occurrence < most:
                raise WordNotFoundError(
                    f"{word!r} occurs {most} time(s) in the prompt; occurrence={occurrence} is out of range."
                )
            return [p for hits in per_segment if occurrence < len(hits) for p in hits[occurrence]]
        return [p for hits in per_segment for hit in hits for p in hit]

    def _not_found_message(self, word: str) -> str:
        cut = {w.lower() for w in self.truncated_words}
        if any(w in cut for w in word.lower().split()):
            return (
                f"{word!r} was cut off: the prompt is longer than the text encoders' {len(self.ids)} positions and "
                f"they never saw these tokens: {' '.join(self.truncated_words)!r}. Shorten the prompt to get a map "
                "for it (on SD3 and Flux a larger max_sequence_length, up to 512, also helps)."
            )
        if self.prompt is None and not self.words:
            return (
                f"{word!r}: the prompt's text was not seen (prompt_embeds passed directly?), so tokens are unlabelled; "
                "use .token(i) with a key position instead."
            )
        tokens = " ".join(f"{i}:{t}" for i, t in enumerate(self.tokens) if self.kinds[i] != PAD)
        return (
            f"{word!r} is not a word of the prompt. Words: {self.words}. "
            f"Tokens (position:token, padding omitted): {tokens}. Use .token(i) for a single position."
        )

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (for :meth:`AttentionMaps.save`); ``segments`` only where not one CLIP window."""
        out: dict[str, Any] = {
            "ids": self.ids,
            "pieces": self.pieces,
            "kinds": self.kinds,
            "truncated": self.truncated,
            "prompt": self.prompt,
        }
        if self.parts() != [Segment("clip", 0, len(self.ids))]:  # a UNet family's one CLIP window: implied
            out["segments"] = [s.to_json() for s in self.segments]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenList:
        """Inverse of :meth:`to_json`."""
        return cls(
            ids=[int(i) for i in data["ids"]],
            pieces=list(data["pieces"]),
            kinds=list(data["kinds"]),
            truncated=list(data.get("truncated", [])),
            prompt=data.get("prompt"),
            segments=[Segment.from_json(s) for s in data.get("segments", [])],
        )


def segments_from_json(c: Any, value: Any, length: int, field: str) -> list[Segment]:
    """Checked segments of a saved token list of ``length`` positions (``c``: a result file's Checker).

    Each needs a name, ``0 <= start < stop``, a marker string and ``marker_at`` "end" or "start"; together they
    cover ``[0, length)`` in order with neither gap nor overlap. An empty list is one implied CLIP window.
    """
    out: list[Segment] = []
    for i, raw in enumerate(c.list(value, field)):
        d, where = c.dict(raw, f"{field}[{i}]"), f"{field}[{i}]"
        unknown = sorted(set(d) - {"name", "start", "stop", "marker", "marker_at"})
        if unknown:
            c.fail(f"{where}.{unknown[0]}", "is not a field of a segment")
        start = c.int(c.get(d, "start", f"{where}.start"), f"{where}.start", lo=0, hi=length)
        out.append(
            Segment(
                c.str(c.get(d, "name", f"{where}.name"), f"{where}.name"),
                start,
                c.int(c.get(d, "stop", f"{where}.stop"), f"{where}.stop", lo=start + 1, hi=length),
                c.str(c.get(d, "marker", f"{where}.marker"), f"{where}.marker"),
                c.str(
                    c.get(d, "marker_at", f"{where}.marker_at"),
                    f"{where}.marker_at",
                    choices=(WORD_END, WORD_START),
                ),
            )
        )
    edges = [0] + [e for s in out for e in (s.start, s.stop)] + [length]
    if out and any(edges[j] != edges[j + 1] for j in range(0, len(edges), 2)):
        c.fail(field, f"do not cover the {length} positions in order without gaps or overlaps")
    return out


def _example(tokens: TokenList) -> str:
    return repr(tokens.words[-1]) if tokens.words else "'cat'"
