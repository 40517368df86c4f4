"""Recycled memory for CPU-decoded chunks (kvshelf.codecs.outputs.OutputBuffers, CodecProcesses.outputs): a
buffer comes back only when no tensor on it is left, is never handed out twice at once, at most keep_bytes
are kept, and a decoded chunk in recycled memory equals one in fresh memory."""

from __future__ import annotations

import gc

import pytest
import torch

from kvshelf.codecs import pool
from kvshelf.codecs.cachegen import CacheGenCodec
from kvshelf.codecs.outputs import OutputBuffers
from kvshelf.config import KVShelfConfig


def test_a_dropped_tensors_memory_serves_the_next_one_of_its_size():
    buffers = OutputBuffers(1 << 20)
    a = buffers.empty((2, 3, 64), torch.float16)
    ptr = a.data_ptr()
    assert ptr % 64 == 0 and a.is_contiguous() and a.shape == (2, 3, 64) and a.dtype == torch.float16
    del a
    assert buffers.kept_bytes == 2 * 3 * 64 * 2
    b = buffers.empty((3, 2, 32), torch.float32)  # another shape and dtype of the same size
    assert b.data_ptr() == ptr and buffers.kept_bytes == 0
    c = buffers.empty((3, 2, 32), torch.bfloat16)  # another size: fresh
    assert c.data_ptr() != ptr


def test_memory_in_use_is_never_handed_out_again():
    buffers = OutputBuffers(1 << 20)
    a = buffers.empty((4, 16), torch.float16)
    b = buffers.empty((4, 16), torch.float16)
    assert a.data_ptr() != b.data_ptr()
    row = a[1]  # a view keeps a's memory in use
    ptr = a.data_ptr()
    del a
    gc.collect()
    c = buffers.empty((4, 16), torch.float16)
    assert c.data_ptr() != ptr and buffers.kept_bytes == 0
    row.fill_(1.0)
    del row
    assert buffers.empty((4, 16), torch.float16).data_ptr() == ptr


def test_at_most_keep_bytes_are_kept_and_zero_keeps_none():
    buffers = OutputBuffers(3 * 1024)
    made = [buffers.empty((512,), torch.float16) for _ in range(5)]  # 1 KB each
    del made
    assert buffers.kept_bytes == 3 * 1024
    none = OutputBuffers(0)
    t = none.empty((512,), torch.float16)
    del t
    assert none.kept_bytes == 0
    big = OutputBuffers(1024)
    t = big.empty((1024,), torch.float16)  # larger than what may be kept: plain memory
    del t
    assert big.kept_bytes == 0
    with pytest.raises(ValueError, match=">= 0"):
        OutputBuffers(-1)


def test_a_tensor_made_under_inference_mode_is_a_normal_tensor():
    buffers = OutputBuffers(1 << 20)
    with torch.inference_mode():
        t = buffers.empty((8,), torch.float32)
    t.fill_(2.0)  # an inference tensor would refuse this outside inference mode
    assert not t.is_inference() and float(t.sum()) == 16.0


def test_chunks_decoded_into_recycled_memory_equal_fresh_ones():
    """Two different chunks decoded one after the other on codec threads, the first dropped: the second lands
    in the first's memory and equals its decoding into fresh memory (nothing stale left)."""
    from test_cachegen_cpu import _calibration

    layers, heads, tokens, dim = 4, 2, 16, 8
    cal = _calibration(layers, heads, dim, 7)
    fresh = CacheGenCodec(calibration=cal.digest, processes=pool.CodecProcesses(3))
    processes = pool.CodecProcesses(3, output_pool_bytes=1 << 20)
    codec = CacheGenCodec(calibration=cal.digest, processes=processes)
    shape = (2, heads, tokens, dim)
    gen = torch.Generator().manual_seed(11)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        one, two = (torch.randn(layers, *shape, generator=gen).to(dtype) * s for s in (1.0, 30.0))
        segs_one, segs_two = codec.encode_layers(one, 32), codec.encode_layers(two, 48)
        first = codec.decode_stacked(segs_one, shape, dtype, list(range(layers)), layers, 32)
        ptr = first.data_ptr()
        del first
        second = codec.decode_stacked(segs_two, shape, dtype, list(range(layers)), layers, 48)
        assert second.data_ptr() == ptr  # the recycled memory
        want = fresh.decode_stacked(segs_two, shape, dtype, list(range(layers)), layers, 48)
        assert torch.equal(second, want)
    processes.close()
    fresh.processes.close()


def test_the_config_key_sizes_the_shelfs_output_pool():
    from kvshelf.assembly.engine import Owned

    owned = Owned.for_config(KVShelfConfig(codec_workers=2, codec_output_pool_mb=3))
    assert owned.codec_processes.outputs.keep_bytes == 3 << 20
    owned.close()
    assert KVShelfConfig().codec_output_pool_mb == 256
