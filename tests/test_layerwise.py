"""Layerwise loading and storing: same output as whole-prompt loading, bounded buffer, failures, soak."""

import threading
import time

import psutil
import pytest
import torch
from conftest import build_tiny_model

from kvshelf.cache.engine import CacheEngine
from kvshelf.codecs import get_codec
from kvshelf.generation import CachedGenerator
from kvshelf.layerwise.loader import LayerwiseLoader
from kvshelf.layerwise.stats import LayerwiseStats
from kvshelf.model.runner import ModelRunner
from kvshelf.storage.disk import DiskBackend
from kvshelf.storage.memory import MemoryBackend
from kvshelf.storage.tiers import TierManager


def prompt(n, seed):
    return torch.randint(4, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def gens(model, backend, **kw):
    runner = ModelRunner(model)
    engine = CacheEngine(runner.fingerprint(), backend, chunk_size=16)
    kw.setdefault("layerwise_store", True)
    return CachedGenerator(runner, engine), CachedGenerator(runner, engine, use_layerwise=True, **kw)


@pytest.mark.parametrize("codec", ["none", "int8", "cachegen"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_layerwise_equals_whole_prompt_loading(tmp_path, tiny_models, codec, family):
    tiers = TierManager([DiskBackend(tmp_path, 1 << 28, get_codec(codec))])
    whole, layered = gens(tiny_models(family), tiers, buffer_size=2)
    ids = prompt(70, 1)
    whole.generate(ids, max_new_tokens=1)
    tiers.flush()
    a = whole.generate(ids, max_new_tokens=8, stop_at_eos=False)
    b = layered.generate(ids, max_new_tokens=8, stop_at_eos=False)
    assert a.hit_tokens == b.hit_tokens == 69
    assert a.token_ids == b.token_ids
    assert torch.allclose(a.first_logits, b.first_logits, atol=1e-5)
    stats = layered.layerwise_stats.as_dict()
    assert stats["requests"] == 1 and all(t > 0 for t in stats["layer_times"]) and stats["bytes_per_layer"][0] > 0
    tiers.close()


def test_layerwise_store_then_whole_load(tiny_models):
    backend = MemoryBackend(1 << 28)
    whole, layered = gens(tiny_models("qwen2"), backend)
    ids = prompt(50, 2)
    first = layered.generate(ids, max_new_tokens=5, stop_at_eos=False)  # miss: stores layer by layer
    assert first.stored_tokens >= 50
    again = whole.generate(ids, max_new_tokens=5, stop_at_eos=False)
    assert again.hit_tokens == 49 and again.token_ids == first.token_ids
    plain = whole.generate(ids, max_new_tokens=5, stop_at_eos=False, use_cache=False)
    assert plain.token_ids == first.token_ids


class SlowRetrieval:
    def __init__(self, inner, delay=0.01, fail_at=None):
        self.inner, self.delay, self.fail_at = inner, delay, fail_at
        self.num_layers, self.num_tokens = inner.num_layers, inner.num_tokens
        self.loaded = []

    def device_decoding(self, device):
        return None  # every layer through layer_parts, where the delay and the failure are

    def layer_parts(self, i, j=None):
        time.sleep(self.delay)
        j = i + 1 if j is None else j
        if self.fail_at is not None and i <= self.fail_at < j:
            raise OSError("tier went away")
        self.loaded.extend(range(i, j))
        return self.inner.layer_parts(i, j)


def test_loader_never_runs_more_than_buffer_size_ahead(tiny_models):
    model = build_tiny_model("llama")
    model.model.layers.extend([model.model.layers[0]] * 0)
    runner = ModelRunner(model)
    engine = CacheEngine(runner.fingerprint(), MemoryBackend(1 << 26), chunk_size=16)
    ids = prompt(40, 3)
    CachedGenerator(runner, engine).generate(ids, max_new_tokens=1)
    slow = SlowRetrieval(engine.retrieve_layerwise(ids, max_tokens=39), delay=0.0)
    kv = runner.new_kv(40)
    loader = LayerwiseLoader(slow, kv, buffer_size=1, stats=LayerwiseStats(runner.num_layers))
    ahead = []
    for i in range(runner.num_layers):
        time.sleep(0.02)  # the "compute" is slow: the loader must wait for it
        ahead.append(len(slow.loaded) - i)
        loader.wait(i)
    loader.close()
    assert max(ahead) <= 1 and slow.loaded == list(range(runner.num_layers))


def test_failed_layer_load_recomputes_and_is_correct(tiny_models, monkeypatch):
    backend = MemoryBackend(1 << 26)
    whole, layered = gens(tiny_models("qwen3"), backend)
    ids = prompt(60, 4)
    whole.generate(ids, max_new_tokens=1)
    real = layered.engine.retrieve_layerwise
    monkeypatch.setattr(
        layered.engine, "retrieve_layerwise", lambda *a, **k: SlowRetrieval(real(*a, **k), delay=0, fail_at=2)
    )
    out = layered.generate(ids, max_new_tokens=6, stop_at_eos=False)
    plain = whole.generate(ids, max_new_tokens=6, stop_at_eos=False, use_cache=False)
    assert out.token_ids == plain.token_ids and out.hit_tokens == 0
    assert layered.layerwise_stats.as_dict()["fallbacks"] == 1


def test_synchronous_mode(tiny_models):
    backend = MemoryBackend(1 << 26)
    whole, layered = gens(tiny_models("mistral"), backend, use_async_load=False)
    ids = prompt(45, 5)
    whole.generate(ids, max_new_tokens=1)
    assert layered.generate(ids, max_new_tokens=4).token_ids == whole.generate(ids, max_new_tokens=4).token_ids


def test_concurrent_requests_never_mix_layers(tiny_models):
    backend = MemoryBackend(1 << 28)
    whole, layered = gens(tiny_models("gemma3"), backend, buffer_size=1)
    prompts = [prompt(40, 100 + i) for i in range(6)]
    expected = [whole.generate(p, max_new_tokens=4, use_cache=False, stop_at_eos=False).token_ids for p in prompts]
    for p in prompts:
        whole.generate(p, max_new_tokens=1)
    wrong = []

    def worker(k):
        for r in range(10):
            i = (k + r) % len(prompts)
            out = layered.generate(prompts[i], max_new_tokens=4, stop_at_eos=False)
            if out.token_ids != expected[i] or out.hit_tokens != 39:
                wrong.append((k, r, i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


@pytest.mark.slow
def test_soak_2000_requests_bounded_memory_no_leaked_threads(tiny_models):
    backend = MemoryBackend(64 << 20)  # small: eviction runs throughout
    _, layered = gens(tiny_models("llama"), backend, buffer_size=2)
    proc = psutil.Process()
    threads_before = threading.active_count()
    rss = []
    for r in range(2000):
        ids = prompt(24, r % 50) + prompt(8, 10_000 + r)  # shared and fresh parts
        out = layered.generate(ids, max_new_tokens=2, stop_at_eos=False)
        assert len(out.token_ids) == 2
        if r in (200, 1999):
            rss.append(proc.memory_info().rss)
    assert threading.active_count() == threads_before
    assert rss[1] - rss[0] < 64 << 20, rss  # growth is bounded by the tier, not by the request count
    assert backend.used_bytes <= 64 << 20
    assert layered.layerwise_stats.as_dict()["requests"] > 1000


def test_row_layout_of_kv_buffer_slices():
    from kvshelf.kvmath.strided_copy import copy_to_device, row_layout

    kv = torch.zeros(6, 2, 3, 40, 8)  # [layers, K/V, heads, capacity, dim]
    # layers 1..4 of tokens 16..32: 3 * 2 * 3 rows of 16 * 8 values, one token-capacity (40 * 8) apart
    assert row_layout(kv[1:4, :, :, 16:32]) == (18, 128, 320)
    assert row_layout(kv[2:3, :, :, 0:40]) == (1, 1920, 1920)  # one layer, all tokens: contiguous
    assert row_layout(kv[:, :, :, 16:32].transpose(0, 1)) is None  # rows not equally spaced
    assert row_layout(kv[:, :, :, ::2]) == (720, 8, 16)  # every other token: rows of one token
    # off a GPU the copy is PyTorch's own
    src = torch.randn(3, 2, 3, 16, 8)
    copy_to_device(kv[1:4, :, :, 16:32], src)
    assert torch.equal(kv[1:4, :, :, 16:32], src)


def test_the_high_priority_compute_stream_is_only_taken_on_a_gpu(monkeypatch):
    from kvshelf.layerwise import loader as loader_module

    def no_cuda(*_a, **_k):
        raise AssertionError("CUDA touched for a CPU forward")

    monkeypatch.setattr(torch.cuda, "current_stream", no_cuda)
    monkeypatch.setattr(torch.cuda, "Stream", no_cuda)
    for flag in (True, False):
        monkeypatch.setattr(loader_module, "PRIORITY_COMPUTE", flag)
        with loader_module.prioritized(torch.device("cpu")):
            x = torch.ones(3) * 2
        assert x.sum() == 6
    monkeypatch.setattr(loader_module, "PRIORITY_COMPUTE", False)
    with loader_module.prioritized(torch.device("cuda")):  # off: not even on a GPU
        pass
