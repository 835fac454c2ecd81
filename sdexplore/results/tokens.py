"""TokenList: the 77 key positions of a prompt labelled (BOS, text, EOS, padding) and merged into words."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import WordNotFoundError

BOS, TEXT, EOS, PAD = "bos", "text", "eos", "pad"
_END_OF_WORD = "</w>"


@dataclass
class TokenList:
    """The tokens that label the key positions of one prompt's cross-attention.

    ``ids`` has one entry per key position (77 for every SD family): BOS, the prompt's tokens, EOS, then
    padding. ``truncated`` lists the prompt's tokens that did not fit in the 77 positions (the text encoder
    never saw them, so they have no map). For SDXL the ids are those of ``pipe.tokenizer`` (the two SDXL
    tokenizers give identical ids for the same text; only the padding id differs).
    """

    ids: list[int]  # one id per key position
    pieces: list[str]  # raw BPE pieces ("circle</w>", "<|startoftext|>"), one per key position
    kinds: list[str]  # "bos" | "text" | "eos" | "pad", one per key position
    truncated: list[str] = field(default_factory=list)  # tokens cut off beyond the key positions
    prompt: str | None = None  # the text, when it was seen

    @property
    def tokens(self) -> list[str]:
        """Display strings, one per key position (BOS, EOS and padding shown as the tokenizer writes them)."""
        return [p.removesuffix(_END_OF_WORD) for p in self.pieces]

    def word_spans(self) -> list[tuple[str, list[int]]]:
        """Words of the prompt with the key positions of their sub-word tokens (a word ends at ``</w>``)."""
        spans: list[tuple[str, list[int]]] = []
        current: list[int] = []
        for i, (piece, kind) in enumerate(zip(self.pieces, self.kinds, strict=True)):
            if kind != TEXT:
                continue
            current.append(i)
            if piece.endswith(_END_OF_WORD):
                spans.append(("".join(self.tokens[j] for j in current), current))
                current = []
        if current:  # a word cut by truncation
            spans.append(("".join(self.tokens[j] for j in current), current))
        return spans

    @property
    def words(self) -> list[str]:
        """The prompt's words in order (sub-word tokens merged; punctuation tokens are words of their own)."""
        return [w for w, _ in self.word_spans()]

    def positions(self, word: str, occurrence: int | None = None) -> list[int]:
        """Key positions of ``word`` (one or several space-separated words, case-insensitive).

        Every occurrence is included unless ``occurrence`` (0-based) picks one. Raises
        :class:`~sdexplore.errors.WordNotFoundError` listing the prompt's words and tokens otherwise.
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
        spans = self.word_spans()
        words = [w.lower() for w, _ in spans]
        hits: list[list[int]] = []
        for start in range(len(words) - len(query) + 1):
            if words[start : start + len(query)] == query:
                hits.append([p for _, ps in spans[start : start + len(query)] for p in ps])
        if not hits:
            raise WordNotFoundError(self._not_found_message(word))
        if occurrence is not None:
            if not 0 <= occurrence < len(hits):
                raise WordNotFoundError(
                    f"{word!r} occurs {len(hits)} time(s) in the prompt; occurrence={occurrence} is out of range."
                )
            return hits[occurrence]
        return [p for hit in hits for p in hit]

    def _not_found_message(self, word: str) -> str:
        cut = {w.lower() for w in _merge_pieces(self.truncated)}
        if any(w in cut for w in word.lower().split()):
            return (
                f"{word!r} was cut off: the prompt is longer than {len(self.ids)} tokens and the text encoder "
                f"never saw these tokens: {' '.join(self.truncated)!r}. Shorten the prompt to get a map for it."
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
        """Plain-JSON form (for :meth:`AttentionMaps.save`)."""
        return {
            "ids": self.ids,
            "pieces": self.pieces,
            "kinds": self.kinds,
            "truncated": self.truncated,
            "prompt": self.prompt,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenList:
        """Inverse of :meth:`to_json`."""
        return cls(
            ids=[int(i) for i in data["ids"]],
            pieces=list(data["pieces"]),
            kinds=list(data["kinds"]),
            truncated=list(data.get("truncated", [])),
            prompt=data.get("prompt"),
        )


def _merge_pieces(pieces: list[str]) -> list[str]:
    words, current = [], ""
    for piece in pieces:
        current += piece.removesuffix(_END_OF_WORD)
        if piece.endswith(_END_OF_WORD):
            words.append(current)
            current = ""
    if current:
        words.append(current)
    return words


def _example(tokens: TokenList) -> str:
    return repr(tokens.words[-1]) if tokens.words else "'cat'"
