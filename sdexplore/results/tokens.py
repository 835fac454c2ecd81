"""TokenList: the key positions of a prompt labelled (BOS, text, EOS, padding) and merged into words.

One list may hold several segments, each labelled by its own tokenizer from the prompt its encoder encoded: SD3's
joint sequence is CLIP's 77 positions (from ``prompt``), then T5's (from ``prompt_3``). Where two encoders' features
sit side by side at the same positions (SDXL's and SD3's CLIP-L ‖ CLIP-G) and encoded different prompts
(``prompt_2``), the segment carries the second encoder's labels too (:class:`SharedLabels`): a word of either prompt
is found there. Words are merged per segment by the tokenizer's own word marker: CLIP's BPE pieces end a word with
``</w>`` ("cir", "cle</w>"), T5's sentencepiece pieces start one with ``▁`` ("▁cir", "cle").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..errors import WordNotFoundError

BOS, TEXT, EOS, PAD = "bos", "text", "eos", "pad"
_END_OF_WORD = "</w>"
WORD_END, WORD_START = "end", "start"  # where a tokenizer's word marker sits on a piece


class _LabelSet(NamedTuple):
    """One set of labels over some positions: a segment's own, or its shared labels."""

    name: str
    source: str  # the call argument that was encoded
    merger: Segment  # merges its pieces into words (its tokenizer's word marker)
    positions: list[int]  # key positions of its text pieces
    pieces: list[str]  # those pieces


@dataclass(frozen=True)
class SharedLabels:
    """A second encoder's labels of a segment's positions, where two encoders fill the same positions side by side
    along the features and encoded different prompts (SDXL's and SD3's CLIP-G from ``prompt_2`` beside CLIP-L
    from ``prompt``).

    A key at such a position is computed from both encoders' features: position i holds token i of each prompt,
    so a word of ``prompt_2`` is found at its own positions, whose maps also carry whatever ``prompt`` has there.
    """

    name: str  # "clip_g"
    source: str  # the call argument that was encoded: "prompt_2"
    text: str  # its text
    ids: tuple[int, ...]  # one per position of the segment
    pieces: tuple[str, ...]
    kinds: tuple[str, ...]
    marker: str = _END_OF_WORD
    marker_at: str = WORD_END

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "name": self.name,
            "source": self.source,
            "text": self.text,
            "ids": list(self.ids),
            "pieces": list(self.pieces),
            "kinds": list(self.kinds),
            "marker": self.marker,
            "marker_at": self.marker_at,
        }


@dataclass(frozen=True)
class Segment:
    """A run of key positions ``[start, stop)`` labelled by one tokenizer.

    ``marker`` is that tokenizer's word marker and ``marker_at`` where it sits: ``"end"`` for CLIP's BPE
    (``"circle</w>"`` ends a word), ``"start"`` for sentencepiece (``"▁cir"`` starts one, ``"cle"`` continues it).
    ``source`` is the call argument whose text the segment's encoder encoded ("prompt"; SD3's T5 part
    "prompt_3", Flux's "prompt_2" where they differ from ``prompt``), ``text`` that text where it is not the token
    list's ``prompt``; ``shared`` a second encoder's labels of the same positions (:class:`SharedLabels`).
    """

    name: str  # "clip", "t5" or "qwen"
    start: int
    stop: int
    marker: str = _END_OF_WORD
    marker_at: str = WORD_END  # "end" | "start"
    source: str = "prompt"
    text: str | None = None
    shared: SharedLabels | None = None

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
        """Plain-JSON form (``source``, ``text`` and ``shared`` only where set)."""
        out: dict[str, Any] = {
            "name": self.name,
            "start": self.start,
            "stop": self.stop,
            "marker": self.marker,
            "marker_at": self.marker_at,
        }
        if self.source != "prompt":
            out["source"] = self.source
        if self.text is not None:
            out["text"] = self.text
        if self.shared is not None:
            out["shared"] = self.shared.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Segment:
        """Inverse of :meth:`to_json`."""
        shared = data.get("shared")
        return cls(
            str(data["name"]),
            int(data["start"]),
            int(data["stop"]),
            str(data["marker"]),
            str(data["marker_at"]),
            str(data.get("source", "prompt")),
            None if data.get("text") is None else str(data["text"]),
            None
            if shared is None
            else SharedLabels(
                str(shared["name"]),
                str(shared["source"]),
                str(shared["text"]),
                tuple(int(i) for i in shared["ids"]),
                tuple(str(p) for p in shared["pieces"]),
                tuple(str(k) for k in shared["kinds"]),
                str(shared["marker"]),
                str(shared["marker_at"]),
            ),
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
    padding id differs). Each segment is labelled from the prompt its encoder encoded (its ``source``): SD3's T5
    part from ``prompt_3``, Flux's from ``prompt_2``; where ``prompt_2`` differs on SDXL and SD3, the CLIP
    segment's ``shared`` labels hold CLIP-G's tokens of it. ``prompt`` is the call's ``prompt``.
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
        """The segment called ``name`` ("clip", "t5"; a shared label set's name, "clip_g", gives the segment whose
        positions it labels); WordNotFoundError listing the names otherwise."""
        for s in self.parts():
            if name in (s.name, s.shared.name if s.shared is not None else None):
                return s
        raise WordNotFoundError(
            f"segment={name!r} is not a part of this sequence; its parts: {self._label_names()}."
        )

    def _label_names(self) -> list[str]:
        return [n for s in self.parts() for n in [s.name] + ([s.shared.name] if s.shared is not None else [])]

    def _label_sets(self, name: str | None = None) -> list[_LabelSet]:
        """Each set of labels in sequence order: every segment's own, then its shared labels (if any); ``name``
        keeps the one of that name."""
        out: list[_LabelSet] = []
        for s in self.parts():
            if name in (None, s.name):
                text = [i for i in range(s.start, s.stop) if self.kinds[i] == TEXT]
                out.append(_LabelSet(s.name, s.source, s, text, [self.pieces[i] for i in text]))
            sh = s.shared
            if sh is not None and name in (None, sh.name):
                text = [s.start + j for j, k in enumerate(sh.kinds) if k == TEXT]
                merger = Segment(sh.name, s.start, s.stop, sh.marker, sh.marker_at)
                out.append(
                    _LabelSet(sh.name, sh.source, merger, text, [sh.pieces[i - s.start] for i in text])
                )
        if not out:
            raise WordNotFoundError(
                f"segment={name!r} is not a part of this sequence; its parts: {self._label_names()}."
            )
        return out

    @property
    def tokens(self) -> list[str]:
        """Display strings, one per key position (word markers removed; special tokens as the tokenizer writes them)."""
        out: list[str] = []
        for s in self.parts():
            out += [s.display(p) for p in self.pieces[s.start : s.stop]]
        return out

    def word_spans(self, segment: str | None = None) -> list[tuple[str, list[int]]]:
        """Words of the prompt with the key positions of their sub-word tokens, segment by segment.

        A CLIP word ends at a ``</w>`` piece, a T5 word begins at a ``▁`` piece. ``segment`` ("clip", "t5",
        "clip_g") keeps one set of labels; by default every set's words are listed, in sequence order (on SD3 each
        word then appears twice: once among CLIP's positions, once among T5's; a segment's shared labels, the
        words of ``prompt_2``, follow its own).
        """
        spans: list[tuple[str, list[int]]] = []
        for ls in self._label_sets(segment):
            spans += [(w, [ls.positions[j] for j in idx]) for w, idx in ls.merger.merge(ls.pieces)]
        return spans

    def _main(self) -> Segment:
        """The segment that saw the most of the prompt (T5's on SD3 with a long prompt; the first on a tie), among
        those labelled from ``prompt`` itself where there are any (not SD3's T5 part from another ``prompt_3``)."""
        parts = [s for s in self.parts() if s.source == "prompt"] or self.parts()
        counts = [sum(k == TEXT for k in self.kinds[s.start : s.stop]) for s in parts]
        return parts[counts.index(max(counts))]

    def words_of(self, source: str) -> list[str]:
        """The words of the call argument ``source`` ("prompt", "prompt_2", "prompt_3") as the encoder that
        encoded it saw them (its label set that saw the most; empty where no part was labelled from it)."""
        best: list[str] = []
        for ls in self._label_sets():
            if ls.source == source:
                words = [w for w, _ in ls.merger.merge(ls.pieces)]
                best = words if len(words) > len(best) else best
        return best

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
        ``segment="t5"`` keeps one. Each part is searched in the prompt its encoder encoded: a word of SD3's
        ``prompt_3`` is found among T5's positions, one of ``prompt_2`` among CLIP's (SDXL, SD3: CLIP-G's labels,
        ``segment="clip_g"``). Raises :class:`~sdexplore.errors.WordNotFoundError` listing the prompts' words and
        tokens otherwise.
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
        for ls in self._label_sets(segment):
            spans = self.word_spans(ls.name)
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
        main = self._main().source
        others = "".join(
            f" Words of {src}: {self.words_of(src)}."
            for src in dict.fromkeys(ls.source for ls in self._label_sets())
            if src != main
        )
        return (
            f"{word!r} is not a word of the prompt. Words: {self.words}.{others} "
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
        unknown = sorted(
            set(d) - {"name", "start", "stop", "marker", "marker_at", "source", "text", "shared"}
        )
        if unknown:
            c.fail(f"{where}.{unknown[0]}", "is not a field of a segment")
        start = c.int(c.get(d, "start", f"{where}.start"), f"{where}.start", lo=0, hi=length)
        stop = c.int(c.get(d, "stop", f"{where}.stop"), f"{where}.stop", lo=start + 1, hi=length)
        text = d.get("text")
        out.append(
            Segment(
                c.str(c.get(d, "name", f"{where}.name"), f"{where}.name"),
                start,
                stop,
                c.str(c.get(d, "marker", f"{where}.marker"), f"{where}.marker"),
                c.str(
                    c.get(d, "marker_at", f"{where}.marker_at"),
                    f"{where}.marker_at",
                    choices=(WORD_END, WORD_START),
                ),
                c.str(d.get("source", "prompt"), f"{where}.source"),
                None if text is None else c.str(text, f"{where}.text"),
                None
                if d.get("shared") is None
                else _shared_from_json(c, d["shared"], stop - start, f"{where}.shared"),
            )
        )
    edges = [0] + [e for s in out for e in (s.start, s.stop)] + [length]
    if out and any(edges[j] != edges[j + 1] for j in range(0, len(edges), 2)):
        c.fail(field, f"do not cover the {length} positions in order without gaps or overlaps")
    return out


def _shared_from_json(c: Any, value: Any, length: int, field: str) -> SharedLabels:
    """Checked shared labels of a segment of ``length`` positions (``c``: a result file's Checker)."""
    d = c.dict(value, field)
    keys = {"name", "source", "text", "ids", "pieces", "kinds", "marker", "marker_at"}
    unknown = sorted(set(d) - keys)
    if unknown:
        c.fail(f"{field}.{unknown[0]}", "is not a field of shared labels")

    def items(key: str) -> list[Any]:
        return c.list(c.get(d, key, f"{field}.{key}"), f"{field}.{key}", length=length)

    return SharedLabels(
        c.str(c.get(d, "name", f"{field}.name"), f"{field}.name"),
        c.str(c.get(d, "source", f"{field}.source"), f"{field}.source"),
        c.str(c.get(d, "text", f"{field}.text"), f"{field}.text"),
        tuple(c.int(v, f"{field}.ids[{i}]") for i, v in enumerate(items("ids"))),
        tuple(c.str(v, f"{field}.pieces[{i}]") for i, v in enumerate(items("pieces"))),
        tuple(
            c.str(v, f"{field}.kinds[{i}]", choices=(BOS, TEXT, EOS, PAD))
            for i, v in enumerate(items("kinds"))
        ),
        c.str(c.get(d, "marker", f"{field}.marker"), f"{field}.marker"),
        c.str(
            c.get(d, "marker_at", f"{field}.marker_at"), f"{field}.marker_at", choices=(WORD_END, WORD_START)
        ),
    )


def _example(tokens: TokenList) -> str:
    return repr(tokens.words[-1]) if tokens.words else "'cat'"
