"""Cut a prompt into blendable documents and a suffix.

Text prompts are split on the separator string before tokenizing, and every piece is tokenized on its
own: the separator can then never merge with its neighbours into other tokens, whatever the tokenizer
does at the boundary. Token prompts (e.g. from an engine) are split where the separator's token ids
occur, trying the ways a tokenizer may spell it next to whitespace.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Segmented:
    prefix: list[int]  # tokens before the first document (BOS), always computed
    documents: list[list[int]]  # blendable documents, each followed in the prompt by `separator`
    suffix: list[int]  # the question: always computed fully
    separator: list[int]

    def layout(self) -> list[tuple[str, int, int]]:
        """(kind, start, end) spans in prompt order: prefix, document, sep, document, sep, ..., suffix."""
        spans, pos = [], 0

        def add(kind, n):
            nonlocal pos
            if n:
                spans.append((kind, pos, pos + n))
            pos += n

        add("prefix", len(self.prefix))
        for document in self.documents:
            add("document", len(document))
            add("sep", len(self.separator))
        add("suffix", len(self.suffix))
        return spans

    @property
    def token_ids(self) -> list[int]:
        ids = list(self.prefix)
        for document in self.documents:
            ids += document + self.separator
        return ids + self.suffix


def fixed_prefix(seg: Segmented, documents: int) -> Segmented:
    """`seg` with its first `documents` documents (and their separators) moved into the prefix: the fixed
    start every request shares (an instruction) is then always computed, and every other document is cached
    behind it instead of behind BOS alone, so that no document's first tokens are where its forward put the
    attention sink (issue #18). The token ids are unchanged; the blend keys change (the prefix is in them)."""
    if documents <= 0:
        return seg
    head = seg.documents[:documents]
    prefix = list(seg.prefix)
    for document in head:
        prefix += document + seg.separator
    return Segmented(prefix, seg.documents[documents:], seg.suffix, seg.separator)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer) -> list[int]:
    with_special = tokenizer("x")["input_ids"]
    plain = _encode(tokenizer, "x")
    return list(with_special[: len(with_special) - len(plain)])


def split_text(
    tokenizer, text: str | None, separator: str, *, documents: Sequence[str] | None = None, suffix: str | None = None
) -> Segmented:
    """Split `text` on `separator` (the last piece is the suffix), or take `documents` + `suffix` as given.

    Empty pieces (adjacent separators, a separator at either end) are dropped. Returns no documents when
    the separator does not occur.
    """
    if not separator:
        raise ValueError("blend_special_str must not be empty")
    if documents is None:
        if text is None:
            raise ValueError("give either a text with separators or a list of documents")
        pieces = text.split(separator)
        documents, suffix = pieces[:-1], pieces[-1]
    sep_ids = _encode(tokenizer, separator)
    seg = Segmented(_bos(tokenizer), [], _encode(tokenizer, suffix or ""), sep_ids)
    for piece in documents:
        if separator in piece:
            log.warning(
                "blend document contains the separator %r inside its own text; choose a rarer separator "
                "such as <|CHUNK_SEP|>",
                separator,
            )
        if piece.strip():
            seg.documents.append(_encode(tokenizer, piece))
    return seg


def separator_variants(tokenizer, separator: str) -> list[list[int]]:
    """Token spellings of the separator as it may appear inside tokenized text, longest first."""
    variants = {tuple(_encode(tokenizer, separator))}
    for left, right in ((" ", ""), ("", " "), (" ", " "), ("\n", ""), ("", "\n"), ("\n", "\n")):
        variants.add(tuple(_encode(tokenizer, f"{left}{separator}{right}")))
    return [list(v) for v in sorted(variants, key=len, reverse=True) if v]


def split_tokens(tokenizer, ids: Sequence[int], separator: str) -> Segmented:
    """Split a token prompt at occurrences of the separator's token spellings."""
    ids = list(ids)
    bos = _bos(tokenizer)
    prefix = ids[: len(bos)] if bos and ids[: len(bos)] == bos else []
    body = ids[len(prefix) :]
    variants = separator_variants(tokenizer, separator)
    pieces, current, i = [], [], 0
    while i < len(body):
        match = next((v for v in variants if body[i : i + len(v)] == v), None)
        if match is None:
            current.append(body[i])
            i += 1
        else:
            pieces.append(current)
            current, i = [], i + len(match)
    pieces.append(current)
    return Segmented(prefix, [p for p in pieces[:-1] if p], pieces[-1], _encode(tokenizer, separator))
