"""Entropy coding for cachegen, with constriction's ANS coder (its stack coder: encode in reverse).

Two probability models, neither keyed by model name:
- a histogram of a segment's own symbols, stored with it (the uncalibrated mode);
- spread classes: each row of symbols (one coefficient over a chunk's tokens) gets the class of its RMS
  (quarter octaves, one byte) and is coded against a discretised Gaussian of that spread; rows of one
  class are coded together. Nothing but the class bytes is stored. Symbols beyond a class's range
  (8 spreads) are coded at the range's edge and kept exactly as escapes.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

try:
    import constriction
except ImportError:  # pragma: no cover - a declared dependency; the error names it
    constriction = None

_COUNTS = struct.Struct("<II")  # ANS words, escapes
_SPREAD_CLASSES = 64  # spreads 2**-3 .. 2**12.75 symbols, in quarter octaves


def _histogram_model(counts: np.ndarray):
    probs = counts.astype(np.float64)
    probs /= probs.sum()
    # perfect=False: constriction gives every symbol a non-zero probability, so any symbol decodes.
    return constriction.stream.model.Categorical(probs, perfect=False)


def encode_symbols(symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(symbols, minlength=alphabet).astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols.astype(np.int32), _histogram_model(counts))
    return counts, coder.get_compressed().astype(np.uint32)


def decode_symbols(words: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    coder = constriction.stream.stack.AnsCoder(words.astype(np.uint32))
    return coder.decode(_histogram_model(counts), n)


def _spread_of(cls: int) -> float:
    return 2.0 ** (cls / 4 - 3)


_class_models: dict[int, tuple] = {}


def _class_model(cls: int):
    """(model, half-range) for a spread class: a discretised Gaussian over [-r, r], built once."""
    if cls not in _class_models:
        sigma = _spread_of(cls)
        r = int(np.ceil(8 * sigma)) + 2
        edges = torch.arange(-r - 0.5, r + 1.5, dtype=torch.float64) / sigma
        probs = torch.diff(torch.special.ndtr(edges)).clamp_min(1e-12).numpy()
        _class_models[cls] = (constriction.stream.model.Categorical(probs / probs.sum(), perfect=False), r)
    return _class_models[cls]


def encode_by_class(q: np.ndarray) -> list[bytes]:
    """Symbols [heads, tokens, dim] -> classes, ANS words and escapes, coded column by column of the same class."""
    heads, tokens, dim = q.shape
    cols = q.transpose(0, 2, 1).reshape(heads * dim, tokens)  # one row per (head, channel) coefficient
    spread = np.sqrt((cols.astype(np.float64) ** 2).mean(axis=1))
    classes = np.clip(np.round(4 * (np.log2(np.maximum(spread, 2.0**-3)) + 3)), 0, _SPREAD_CLASSES - 1)
    classes = classes.astype(np.uint8)
    order = np.argsort(classes, kind="stable")
    coder = constriction.stream.stack.AnsCoder()
    esc_pos, esc_val = [], []
    groups = np.split(order, np.flatnonzero(np.diff(classes[order])) + 1)
    for group in reversed(groups):  # a stack: the first group is encoded last, decoded first
        model, r = _class_model(int(classes[group[0]]))
        block = cols[group]
        out = np.abs(block) >= r
        if out.any():
            rows, toks = np.nonzero(out)
            h, d = np.divmod(group[rows], dim)
            esc_pos.append((h * tokens + toks) * dim + d)
            esc_val.append(block[out])
        coder.encode_reverse((np.clip(block, -r, r) + r).reshape(-1).astype(np.int32), model)
    words = coder.get_compressed().astype(np.uint32)
    pos = np.concatenate(esc_pos).astype(np.int32) if esc_pos else np.zeros(0, np.int32)
    val = np.concatenate(esc_val).astype(np.int32) if esc_val else np.zeros(0, np.int32)
    return [classes.tobytes(), _COUNTS.pack(len(words), len(pos)), words.tobytes(), pos.tobytes(), val.tobytes()]


def decode_by_class(buf: memoryview, off: int, heads: int, tokens: int, dim: int) -> tuple[np.ndarray, int]:
    """The inverse of encode_by_class, reading at `off`; returns (symbols [heads, tokens, dim], new offset).
    The caller's (validated) shape fixes how many symbols are decoded: never more, whatever the bytes say."""
    n_cols = heads * dim
    if len(buf) < off + n_cols + _COUNTS.size:
        raise ValueError("cachegen segment is truncated")
    classes = np.frombuffer(buf[off : off + n_cols], np.uint8)
    if (classes >= _SPREAD_CLASSES).any():
        raise ValueError("cachegen spread class out of range")
    n_words, n_esc = _COUNTS.unpack_from(buf, off + n_cols)
    if n_esc > n_cols * tokens:
        raise ValueError("cachegen segment has more escapes than values")
    off += n_cols + _COUNTS.size
    end = off + 4 * n_words + 8 * n_esc
    if len(buf) < end:
        raise ValueError("cachegen segment is truncated")
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(buf[off : off + 4 * n_words], np.uint32).copy())
    off += 4 * n_words
    pos = np.frombuffer(buf[off : off + 4 * n_esc], np.int32)
    val = np.frombuffer(buf[off + 4 * n_esc : end], np.int32)
    cols = np.empty((n_cols, tokens), np.int32)
    order = np.argsort(classes, kind="stable")
    for group in np.split(order, np.flatnonzero(np.diff(classes[order])) + 1):
        model, r = _class_model(int(classes[group[0]]))
        cols[group] = coder.decode(model, len(group) * tokens).reshape(len(group), tokens) - r
    q = cols.reshape(heads, dim, tokens).transpose(0, 2, 1).copy()
    if n_esc:
        if (pos < 0).any() or (pos >= q.size).any():
            raise ValueError("cachegen escape index out of range")
        q.reshape(-1)[pos] = val
    return q, end
