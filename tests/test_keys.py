import numpy as np
import pytest

from kvshelf.cache.keys import chain_root, chunk_keys

FP_A = b"a" * 32
FP_B = b"b" * 32


def test_keys_cover_tokens_in_chunks_with_partial_tail():
    keys = chunk_keys(list(range(70)), 32, chain_root(FP_A))
    assert [(k.start, k.end) for k in keys] == [(0, 32), (32, 64), (64, 70)]
    assert [k.start for k in chunk_keys(list(range(70)), 32, chain_root(FP_A), include_unfull_chunk=False)] == [0, 32]


def test_keys_are_deterministic_and_chained():
    root = chain_root(FP_A)
    a = chunk_keys(list(range(96)), 32, root)
    b = chunk_keys(np.arange(96), 32, root)
    assert [k.digest for k in a] == [k.digest for k in b]
    changed = list(range(96))
    changed[5] = 999  # a change in chunk 0 changes every later key: keys commit to the whole prefix
    c = chunk_keys(changed, 32, root)
    assert all(x.digest != y.digest for x, y in zip(a, c, strict=True))
    changed = list(range(96))
    changed[70] = 999
    d = chunk_keys(changed, 32, root)
    assert [k.digest for k in d[:2]] == [k.digest for k in a[:2]] and d[2].digest != a[2].digest


def test_fingerprint_and_salt_change_every_key():
    tokens = list(range(64))
    base = chunk_keys(tokens, 32, chain_root(FP_A))
    for root in (chain_root(FP_B), chain_root(FP_A, "tenant-1"), chain_root(FP_A, b"tenant-1x")):
        other = chunk_keys(tokens, 32, root)
        assert not {k.digest for k in base} & {k.digest for k in other}
    assert chain_root(FP_A, "t") == chain_root(FP_A, b"t")


def test_partial_chunk_key_differs_from_full_chunk_that_extends_it():
    root = chain_root(FP_A)
    partial = chunk_keys(list(range(40)), 32, root)[1]
    full = chunk_keys(list(range(64)), 32, root)[1]
    assert partial.digest != full.digest


def test_tokens_must_be_flat():
    with pytest.raises(ValueError, match="flat"):
        chunk_keys([[1, 2], [3, 4]], 32, chain_root(FP_A))
