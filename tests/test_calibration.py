"""cachegen's calibrated mode: RoPE undone by position, per-model transforms, calibration files."""

import dataclasses

import pytest
import torch

from kvshelf.codecs import calibration as calib
from kvshelf.codecs import get_codec
from kvshelf.codecs.cachegen import CacheGenCodec
from kvshelf.config import KVShelfConfig
from kvshelf.errors import ConfigError
from kvshelf.model import calibrate as calibrate_mod
from kvshelf.model.runner import ModelRunner
from kvshelf.storage.base import ChunkMeta, StoredChunk
from kvshelf.storage.format import FormatError, decode_chunk, encode_chunk, open_chunk

KEY = b"c" * 16


@pytest.fixture(scope="module")
def gemma_runner(tiny_models):
    return ModelRunner(tiny_models("gemma3"))


@pytest.fixture(scope="module")
def gemma_calibration(gemma_runner):
    ids = torch.randint(3, 250, (160,), generator=torch.Generator().manual_seed(0)).tolist()
    cal = calibrate_mod.calibrate(gemma_runner, ids)
    calib.register(cal)
    return cal


def kv_of(runner, ids, start=0):
    buf = runner.new_kv(start + len(ids))
    if start:
        runner.forward(list(range(5, 5 + start)), 0, buf)
    runner.forward(ids, start, buf)
    return buf.data[:, :, :, start:].clone()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_rotating_back_by_position_gives_the_same_keys_at_any_position(family, tiny_models):
    runner = ModelRunner(tiny_models(family))
    ids = [7, 8, 9, 10, 11, 12]
    # Layer 0's keys depend only on each token, so before RoPE they are equal wherever the tokens sit.
    at0, at40 = kv_of(runner, ids), kv_of(runner, ids, start=40)
    assert not torch.allclose(at0[0, 0], at40[0, 0], atol=1e-3)  # after RoPE they differ
    for layer in range(runner.num_layers):
        f = runner.inv_freq(layer)
        back0 = calib.rotate(at0[layer, 0], f, 0, -1.0)
        back40 = calib.rotate(at40[layer, 0], f, 40, -1.0)
        if layer == 0:
            assert torch.allclose(back0, back40, atol=1e-5)
        again = calib.rotate(back40, f, 40, 1.0)
        assert torch.allclose(again, at40[layer, 0], atol=1e-5)


def test_fit_transform_inverts_and_decorrelates():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 8, generator=g) @ torch.randn(8, 8, generator=g) + 3.0
    a = torch.randn(8, 8, generator=g)
    weight = a @ a.T
    mean, fwd, inv = calib.fit_transform(x, weight)
    assert torch.allclose(fwd @ inv, torch.eye(8), atol=1e-4)
    c = (x - mean) @ fwd.T
    cov = c.T @ c / len(c)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 1e-3 * cov.diag().max()


@pytest.mark.parametrize("family", ["gemma3", "llama", "qwen3"])
def test_calibrated_round_trip_quantises_each_coefficient_to_half_a_step(family, tiny_models):
    runner = ModelRunner(tiny_models(family))
    cal = calibrate_mod.calibrate(runner, torch.randint(3, 250, (120,), generator=torch.Generator()).tolist())
    assert bool((cal.step > 0).all()) and cal.layout == (runner.num_layers, runner.num_kv_heads, runner.head_dim)
    calib.register(cal)
    ids = torch.randint(3, 250, (48,), generator=torch.Generator().manual_seed(2)).tolist()
    kv = kv_of(runner, ids, start=100)
    codec = get_codec("cachegen", {"bits": 5, "calibration": cal.digest})
    chunk = StoredChunk(ChunkMeta(b"\0" * 32, kv.shape[3], tuple(kv.shape), kv.dtype, 100), kv)
    blob = encode_chunk(KEY, chunk, codec)
    back = decode_chunk(blob, KEY)
    assert back.meta.position == 100
    t = cal.tensors_on("cpu")
    for layer in range(kv.shape[0]):
        f = t["inv_freq"][layer]
        for kind in range(2):
            orig, dec = kv[layer, kind], back.kv[layer, kind]
            if kind == 0:
                orig, dec = calib.rotate(orig, f, 100, -1.0), calib.rotate(dec, f, 100, -1.0)
            fwd, mean = t["forward"][layer, kind], t["mean"][layer, kind][:, None]
            c_orig = torch.einsum("hij,htj->hti", fwd, orig - mean)
            c_dec = torch.einsum("hij,htj->hti", fwd, dec - mean)
            step = float(t["step"][layer, kind])
            assert (c_orig - c_dec).abs().max() <= step * 0.5 + 1e-3 * max(1.0, step)
    # One layer decodes alone, identically.
    opened = open_chunk(blob, KEY)
    assert torch.equal(opened.layer(2), back.kv[2])
    # Smaller than the uncalibrated mode at its default (real sizes: bench/codec_quality.py).
    plain = encode_chunk(KEY, chunk, CacheGenCodec())
    assert len(blob) < len(plain)


def test_escapes_keep_values_far_outside_their_class(gemma_calibration):
    codec = CacheGenCodec(calibration=gemma_calibration.digest)
    layers, heads, dim = gemma_calibration.layout
    kv = torch.randn(layers, 2, heads, 32, dim, generator=torch.Generator().manual_seed(3))
    kv[:, :, :, 0] *= 500.0  # one token far beyond the others: symbols outside their class's range
    back = decode_chunk(
        encode_chunk(KEY, StoredChunk(ChunkMeta(b"\0" * 32, 32, tuple(kv.shape), kv.dtype), kv), codec), KEY
    )
    rel = (back.kv[:, :, :, 0] - kv[:, :, :, 0]).norm() / kv[:, :, :, 0].norm()
    assert rel < 0.05


def test_a_chunk_whose_calibration_is_unknown_is_a_miss_not_garbage(gemma_calibration, tmp_path, monkeypatch):
    layers, heads, dim = gemma_calibration.layout
    kv = torch.randn(layers, 2, heads, 16, dim)
    codec = CacheGenCodec(calibration=gemma_calibration.digest)
    blob = encode_chunk(KEY, StoredChunk(ChunkMeta(b"\0" * 32, 16, tuple(kv.shape), kv.dtype), kv), codec)
    monkeypatch.setattr(calib, "_registry", {})
    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path))
    with pytest.raises(FormatError, match="calibration"):
        decode_chunk(blob, KEY)


def test_calibration_file_round_trip_and_damage(gemma_calibration, tmp_path):
    path = calib.save(gemma_calibration, tmp_path)
    assert path.name == f"{gemma_calibration.digest}.kvcal"
    again = calib.load(path)
    assert again.digest == gemma_calibration.digest and torch.equal(again.forward, gemma_calibration.forward)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(calib.CalibrationError, match="digest"):
        calib.load(path)
    (tmp_path / "x.kvcal").write_bytes(b"not a calibration")
    with pytest.raises(calib.CalibrationError, match="not a calibration"):
        calib.load(tmp_path / "x.kvcal")
    with pytest.raises(calib.CalibrationError, match="does not exist"):
        calib.load(tmp_path / "missing.kvcal")


def test_calibration_refuses_kv_of_another_layout(gemma_calibration):
    codec = CacheGenCodec(calibration=gemma_calibration.digest)
    layers, heads, dim = gemma_calibration.layout
    with pytest.raises(calib.CalibrationError, match="calibration for"):
        codec.encode_layer(torch.zeros(2, heads, 4, dim * 2), 0, layers)


def test_sensitive_layers_get_finer_steps_and_steps_are_bounded():
    slope = torch.tensor([[1.0, 4.0], [1.0, 1e6], [1e-9, 1.0]])
    step = calibrate_mod.allocate_steps(slope, kl_per_layer=1.0)
    median = float(step.median())
    assert step[0, 1] < step[0, 0]  # 4x the KL per step**2: half the step
    assert torch.isclose(step[0, 1], step[0, 0] / 2)
    assert float(step.max()) <= median * 2.0 + 1e-6 and float(step.min()) >= median / 16.0 - 1e-6


def test_calibration_is_made_once_per_model_and_found_again(gemma_runner, tmp_path, monkeypatch):
    from tests.conftest import tiny_tokenizer

    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path))
    tok = tiny_tokenizer()
    first = calibrate_mod.calibration_for(gemma_runner, tok)
    assert (tmp_path / "calibrations" / f"{first.digest}.kvcal").is_file()

    def no_second_time(*a, **k):
        raise AssertionError("calibrated twice")

    monkeypatch.setattr(calibrate_mod, "calibrate", no_second_time)
    monkeypatch.setattr(calib, "_registry", {})
    assert calibrate_mod.calibration_for(gemma_runner, tok).digest == first.digest


def test_engine_tiers_code_with_the_calibration(gemma_runner, tmp_path, monkeypatch):
    from kvshelf.assembly import build_engine
    from tests.conftest import tiny_tokenizer

    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path / "cache"))
    config = KVShelfConfig(
        local_cpu=False, local_disk=str(tmp_path / "disk"), local_disk_codec="cachegen", chunk_size=16
    )
    engine = build_engine(config, gemma_runner, tiny_tokenizer())
    try:
        disk = engine.backend.tiers[0].backend
        assert disk.codec.calibration is not None
        ids = list(range(10, 74))
        kv = kv_of(gemma_runner, ids)
        assert engine.store(ids, kv) == len(ids)
        engine.backend.flush()
        got = engine.retrieve(ids)
        assert got.num_tokens == len(ids)
        # Each chunk was coded at its own position: the same as coding it alone at that position.
        for start in range(0, len(ids), 16):
            piece = kv[:, :, :, start : start + 16].contiguous()
            expect = {}
            for pos in (start, 0):
                meta = ChunkMeta(b"\0" * 32, 16, tuple(piece.shape), piece.dtype, pos)
                expect[pos] = decode_chunk(encode_chunk(KEY, StoredChunk(meta, piece), disk.codec), KEY).kv
            assert torch.allclose(got.kv[:, :, :, start : start + 16], expect[start], atol=1e-5)
            if start:
                assert not torch.allclose(expect[start], expect[0], atol=1e-3)
    finally:
        engine.close()
    off = KVShelfConfig(
        local_cpu=False, local_disk=str(tmp_path / "d2"), local_disk_codec="cachegen", codec_calibration="off"
    )
    engine = build_engine(off, gemma_runner, None)
    assert engine.backend.tiers[0].backend.codec.calibration is None
    engine.close()


def test_config_names_a_bad_calibration_setting():
    with pytest.raises(ValueError, match="codec_calibration"):
        KVShelfConfig(codec_calibration="sometimes")
    with pytest.raises(ConfigError, match="codec_calibration"):
        from kvshelf.assembly import codec_calibration

        codec_calibration(
            KVShelfConfig(local_disk="/tmp/x", local_disk_codec="cachegen", codec_calibration="/nonexistent/a.kvcal"),
            None,
        )


def test_instances_with_other_calibrations_neither_block_nor_reuse_each_other(gemma_calibration, redis_server):
    """The codec and its calibration name the stored object: an instance with another calibration (or
    none) sees a miss, stores its own object next to it, and deletes nothing of the other's."""
    from kvshelf.storage.redis import RedisBackend

    layers, heads, dim = gemma_calibration.layout
    kv = torch.randn(layers, 2, heads, 16, dim)
    chunk = StoredChunk(ChunkMeta(b"\0" * 32, 16, tuple(kv.shape), kv.dtype), kv)
    calibrated = RedisBackend(redis_server.url, CacheGenCodec(calibration=gemma_calibration.digest), prefix="cal:")
    plain = RedisBackend(redis_server.url, CacheGenCodec(), prefix="cal:")
    assert calibrated.put(KEY, chunk)
    assert not plain.contains(KEY) and plain.get(KEY) is None  # not blocked: not even seen
    assert plain.put(KEY, chunk) and plain.get(KEY) is not None
    assert calibrated.get(KEY) is not None  # both objects live side by side
    assert calibrated.corrupt_objects == plain.corrupt_objects == 0
    calibrated.clear()
    calibrated.close()
    plain.close()


def test_worker_processes_decode_calibrated_chunks_exactly(gemma_calibration):
    from kvshelf.codecs import pool

    layers, heads, dim = gemma_calibration.layout
    kv = torch.randn(layers, 2, heads, 40, dim, generator=torch.Generator().manual_seed(4))
    blob = encode_chunk(
        KEY,
        StoredChunk(ChunkMeta(b"\0" * 32, 40, tuple(kv.shape), kv.dtype, 300), kv),
        CacheGenCodec(calibration=gemma_calibration.digest),
    )
    alone = decode_chunk(blob, KEY).kv
    processes = pool.CodecProcesses(2)  # workers entropy-decode; the transforms run here (workers need no calibration)
    try:
        spread = decode_chunk(blob, KEY, CacheGenCodec(calibration=gemma_calibration.digest, processes=processes)).kv
    finally:
        processes.close()
    assert torch.equal(spread, alone)


def test_damaged_calibrated_segments_raise_instead_of_decoding_garbage(gemma_calibration):
    layers, heads, dim = gemma_calibration.layout
    kv = torch.randn(2, heads, 24, dim, generator=torch.Generator().manual_seed(5))
    codec = CacheGenCodec(calibration=gemma_calibration.digest)
    seg = codec.encode_layer(kv, 1, layers, 50)
    shape = tuple(kv.shape)
    assert codec.decode_layer(seg, shape, torch.float32, 1, layers, 50).shape == shape
    for bad in (seg[:-3], seg + b"\0", seg[:2], b"XY" + seg[2:]):
        with pytest.raises(ValueError, match="cachegen"):
            codec.decode_layer(bad, shape, torch.float32, 1, layers, 50)
    wrong_class = bytearray(seg)
    wrong_class[4] = 200  # first spread class of K: out of range
    with pytest.raises(ValueError, match="class"):
        codec.decode_layer(bytes(wrong_class), shape, torch.float32, 1, layers, 50)
    other_level = CacheGenCodec(bits=6, calibration=gemma_calibration.digest)
    with pytest.raises(ValueError, match="header"):
        other_level.decode_layer(seg, shape, torch.float32, 1, layers, 50)


def test_vllm_side_uses_a_calibration_file_or_runs_uncalibrated(gemma_runner, gemma_calibration, tmp_path):
    from kvshelf.assembly import tier_calibration

    def _calibration(fp, config):  # what the connector's engine gets: vLLM runs the model (no runner here)
        cal = tier_calibration(config.tier_codecs()["disk"], fp)
        return cal.digest if cal is not None else None

    fp = gemma_runner.fingerprint()
    path = calib.save(gemma_calibration, tmp_path)
    disk = {"local_disk": str(tmp_path / "d"), "local_disk_codec": "cachegen"}
    assert _calibration(fp, KVShelfConfig(**disk, codec_calibration=str(path))) == gemma_calibration.digest
    assert _calibration(fp, KVShelfConfig(**disk)) is None  # auto: vLLM runs the model, nothing to calibrate on
    assert _calibration(fp, KVShelfConfig(local_disk=str(tmp_path / "d"), codec_calibration=str(path))) is None
    wrong = dataclasses.replace(fp, head_dim=fp.head_dim * 2)  # a model of another layout
    with pytest.raises(ConfigError, match="codec_calibration"):
        _calibration(wrong, KVShelfConfig(**disk, codec_calibration=str(path)))


def test_a_calibration_digest_is_never_a_path():
    with pytest.raises(ConfigError, match="not a calibration digest"):
        get_codec("cachegen", {"calibration": "../../etc/passwd"})


def test_worker_processes_encode_calibrated_chunks_byte_for_byte(gemma_calibration):
    from kvshelf.codecs import pool

    layers, heads, dim = gemma_calibration.layout
    kv = torch.randn(layers, 2, heads, 40, dim, generator=torch.Generator().manual_seed(6))
    chunk = StoredChunk(ChunkMeta(b"\0" * 32, 40, tuple(kv.shape), kv.dtype, 77), kv)
    codec = CacheGenCodec(calibration=gemma_calibration.digest)
    alone = encode_chunk(KEY, chunk, codec)
    processes = pool.CodecProcesses(2)  # transforms here, entropy coding in the workers
    try:
        spread = encode_chunk(KEY, chunk, CacheGenCodec(calibration=gemma_calibration.digest, processes=processes))
    finally:
        processes.close()
    assert spread == alone
