"""CacheBlend inside vLLM (issue #19), without a vLLM engine.

The runner adapter (kvshelf.model.vllm_runner) is checked against kvshelf's HF runner on the tiny models
of every family, through modules shaped like vLLM's (fused QKV and gate/up projections that return
(output, bias), a rotary module with vLLM's cos|sin table, the attention's scale and window on `attn`);
the real vLLM classes run in tests/slow/test_vllm_blend_e2e.py. Also: splitting token prompts, the
scheduler's handling of blended regions, and the start-up checks.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import FAMILIES
from test_vllm_connector import new_req, request, step
from torch import nn

from kvshelf.assembly.vllm_blend import _cut
from kvshelf.blend.blender import Blender, BlendInfo
from kvshelf.blend.segment import Segmented
from kvshelf.blend.selection import SelectionPolicy
from kvshelf.cache.engine import CacheEngine
from kvshelf.cache.fingerprint import ModelFingerprint
from kvshelf.errors import ConfigError
from kvshelf.integrations.vllm.blending import check_blend_settings, find_model
from kvshelf.integrations.vllm.scheduler import BLEND_HIT, SchedulerSide
from kvshelf.integrations.vllm.shared import connector_config
from kvshelf.model.runner import ModelRunner
from kvshelf.model.vllm_runner import VllmModelRunner
from kvshelf.storage.memory import MemoryBackend

LOGIT_ATOL = 1e-4


# -- modules shaped like vLLM's, over a tiny HF model's weights --------------------------------------------
class _Fused(nn.Module):
    """A fused projection returning (output, bias) as vLLM's parallel linear layers do."""

    def __init__(self, *linears):
        super().__init__()
        self.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]))
        biases = [lin.bias for lin in linears]
        self.bias = nn.Parameter(torch.cat(biases)) if biases[0] is not None else None

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias), None


class _Rotary(nn.Module):
    def __init__(self, inv_freq: torch.Tensor, max_positions: int):
        super().__init__()
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None].float()
        self.cos_sin_cache = torch.cat((angles.cos(), angles.sin()), dim=-1)  # vLLM's [positions, cos | sin]
        self.is_neox_style = True
        self.rotary_dim = 2 * inv_freq.numel()

    def forward(self, positions, query, key):
        """vLLM's rotary module: neox-style rotation of [tokens, heads * dim] queries and keys by position."""
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        cos, sin = cos[:, None], sin[:, None]

        def rotate(x):
            x1, x2 = x.reshape(positions.numel(), -1, self.rotary_dim).chunk(2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).reshape(x.shape)

        return rotate(query), rotate(key)


class _MLP(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.gate_up_proj = _Fused(mlp.gate_proj, mlp.up_proj)
        self.down_proj, self.act = mlp.down_proj, mlp.act_fn

    def forward(self, x):
        gate, up = self.gate_up_proj(x)[0].chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def vllm_shaped(hf_model) -> nn.Module:
    """A model with vLLM's module layout over `hf_model`'s weights (what VllmModelRunner reads)."""
    runner = ModelRunner(hf_model)
    config = hf_model.config
    model = nn.Module()
    inner = nn.Module()
    inner.embed_tokens = hf_model.model.embed_tokens  # Gemma 3's scales by sqrt(hidden) itself, as vLLM's does
    inner.embed_input_ids = lambda ids: inner.embed_tokens(ids)
    inner.norm = hf_model.model.norm
    inner.layers = nn.ModuleList()
    rotaries: dict = {}
    for i, hf_layer in enumerate(hf_model.model.layers):
        hf_attn = hf_layer.self_attn
        layer = nn.Module()
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm"):
            if hasattr(hf_layer, name):
                setattr(layer, name, getattr(hf_layer, name))
        if hasattr(hf_layer, "post_feedforward_layernorm"):
            layer.post_feedforward_layernorm = hf_layer.post_feedforward_layernorm
        layer.mlp = _MLP(hf_layer.mlp)
        attn = nn.Module()
        attn.qkv_proj = _Fused(hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj)
        attn.o_proj = _Fused(hf_attn.o_proj)
        attn.head_dim = runner.head_dim
        attn.num_kv_heads = config.num_key_value_heads
        attn.q_size = hf_attn.q_proj.out_features
        attn.kv_size = hf_attn.k_proj.out_features
        key = runner.layer_specs[i].rope_key
        if key not in rotaries:
            rotaries[key] = _Rotary(runner.inv_freq(i), runner.max_positions)
        attn.rotary_emb = rotaries[key]
        attn.attn = SimpleNamespace(
            sliding_window=runner.layer_specs[i].window, impl=SimpleNamespace(scale=hf_attn.scaling)
        )
        if runner.layer_specs[i].q_norm is not None:
            attn.q_norm, attn.k_norm = hf_attn.q_norm, hf_attn.k_norm
        layer.self_attn = attn
        inner.layers.append(layer)
    model.model = inner

    def compute_logits(hidden):
        logits = hf_model.lm_head(hidden)
        cap = getattr(config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap is not None else logits

    model.compute_logits = compute_logits
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_forward_equals_kvshelfs_hf_runner(family, tiny_models):
    hf = tiny_models(family)
    ref, adapter = ModelRunner(hf), VllmModelRunner(vllm_shaped(hf), hf.config)
    assert [s.window for s in adapter.layer_specs] == [s.window for s in ref.layer_specs]
    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (90,))  # longer than the tiny sliding window (24)
    want = ref.forward(ids, 0, ref.new_kv(90), all_logits=True)
    kv = adapter.new_kv(90)
    assert torch.allclose(adapter.forward(ids, 0, kv, all_logits=True), want, atol=LOGIT_ATOL)
    ref_kv = ref.new_kv(90)
    ref.forward(ids, 0, ref_kv)
    assert torch.allclose(kv.data, ref_kv.data, atol=1e-4)  # the KV it hands to vLLM's blocks
    # in pieces over the buffer, then one decode step
    kv = adapter.new_kv(91)
    adapter.forward(ids[:40], 0, kv)
    assert torch.allclose(adapter.forward(ids[40:], 40, kv), want[-1], atol=LOGIT_ATOL)


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_adapter_sliding_layers_read_only_their_windows_keys_for_scattered_tokens(family, tiny_models, monkeypatch):
    """A blend's selected tokens (scattered, gaps wider than the window) at the adapter's sliding layers attend
    in ModelRunner's window blocks: no read of a layer's keys spans more than 2 x window, and the KV and logits
    equal kvshelf's HF runner's (which attends so too) for the full and the selected forward."""
    from kvshelf.model.kv_buffer import KVBuffer

    hf = tiny_models(family)
    ref, adapter = ModelRunner(hf), VllmModelRunner(vllm_shaped(hf), hf.config)
    windows = [s.window for s in adapter.layer_specs]
    assert any(w is not None for w in windows)
    torch.manual_seed(3)
    ids = torch.randint(0, hf.config.vocab_size, (150,))
    keep = torch.tensor([0, 1, 2, 30, 31, 77, 78, 79, 80, 100, 140, 149])  # gaps wider than the window (24)

    def select(i, hidden, positions, rope):
        return keep if i == 1 else None

    reads: list[tuple[int, int, int]] = []
    layer_kv = KVBuffer.layer_kv
    monkeypatch.setattr(
        KVBuffer, "layer_kv", lambda self, i, start, end: reads.append((i, start, end)) or layer_kv(self, i, start, end)
    )

    def run(runner):
        kv = runner.new_kv(150)
        full = runner.forward(ids, 0, kv)
        picked = runner.forward(ids, 0, kv, select_tokens=select)
        return full, picked, kv.data[:, :, :, :150].clone()

    got = run(adapter)
    sliding = [(i, start, end) for i, start, end in reads if windows[i] is not None]
    assert sliding and all(end - start <= 2 * windows[i] for i, start, end in sliding), sliding
    want = run(ref)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=LOGIT_ATOL), float((g - w).abs().max())


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_adapter_rerotation_moves_keys_exactly(family, tiny_models):
    hf = tiny_models(family)
    adapter = VllmModelRunner(vllm_shaped(hf), hf.config)
    ids = torch.randint(0, hf.config.vocab_size, (20,))
    at_one, at_thirty = adapter.new_kv(21), adapter.new_kv(50)
    adapter.forward(torch.cat([ids[:1], ids]), 0, at_one)  # ids at positions 1..20
    # the same tokens' layer-0 keys computed at positions 30..49 (layer 0 sees no context effect on K)
    adapter.write_kv(
        0, adapter.embed(ids), torch.arange(30, 50), at_thirty, adapter.rope_tables(None, torch.arange(30, 50))
    )
    moved = adapter.rerotate(at_one.data[0, 0, :, 1:21], 29, 0)
    assert torch.allclose(moved, at_thirty.data[0, 0, :, 30:50], atol=1e-4)
    assert torch.allclose(adapter.rerotate(moved, -29, 0), at_one.data[0, 0, :, 1:21], atol=1e-4)


def _engine(adapter) -> CacheEngine:
    fp = ModelFingerprint("tiny", "w", "float32", adapter.num_layers, adapter.num_kv_heads, adapter.head_dim)
    return CacheEngine(fp, MemoryBackend(1 << 28), chunk_size=16)


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_blend_over_the_adapter_at_ratio_one_is_the_plain_prefill(family, tiny_models):
    """kvshelf's blender runs unchanged over the adapter: documents computed alone, stored, placed elsewhere
    with re-rotated keys; recomputing every token reproduces the plain prefill's KV and logits."""
    hf = tiny_models(family)
    adapter = VllmModelRunner(vllm_shaped(hf), hf.config)
    engine = _engine(adapter)
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (30, 25, 40)]
    seg = Segmented([1], docs, [], [2, 3])
    exact = Blender(adapter, engine, check_layers=[1], ratios=[1.0])
    approx = Blender(adapter, engine, check_layers=[1], ratios=[0.0])
    documents = exact.documents(seg, None)
    assert not any(d.cached for d in documents)
    for doc in documents:  # what the connector does for missing documents, between vLLM's steps
        for _ in exact.compute_missing(seg, [doc], None, BlendInfo(deferred=1)):
            pass
    documents = exact.documents(seg, None)
    assert all(d.cached for d in documents)
    n = len(seg.token_ids)
    plain = adapter.new_kv(n)
    want = adapter.forward(seg.token_ids, 0, plain)
    kv = adapter.new_kv(n)
    got, info = exact.prefill(seg, kv, None, documents)
    assert info.placed_tokens == sum(d.tokens for d in documents) and info.reused_tokens == 0
    assert torch.allclose(got, want, atol=LOGIT_ATOL) and torch.allclose(kv.data, plain.data, atol=1e-4)
    # with nothing recomputed the fused KV differs (documents computed without each other): a real blend
    reused = adapter.new_kv(n)
    _, info = approx.prefill(seg, reused, None, exact.documents(seg, None))
    assert info.reused_tokens == info.placed_tokens > 0
    assert not torch.allclose(reused.data, plain.data, atol=1e-3)


class _RecordingPaged:
    """A `PagedAttention` over tokens [0, end) that records what it is asked and attends as the dense path."""

    def __init__(self, runner: VllmModelRunner, end: int):
        self.runner, self.end, self.calls = runner, end, []

    def attend(self, layer, q, k, v, positions, kv):
        self.calls.append((kv, int(positions[-1])))
        window, scale = self.runner.layer_specs[layer].window, self.runner._scales[layer]
        return self.runner._attend(layer, q.transpose(0, 1).unsqueeze(0), positions, kv, {}, window, scale)[
            0
        ].transpose(0, 1)


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_question_pass_over_the_adapter_equals_kvshelfs_runner(family, tiny_models, monkeypatch):
    """The question pass inside vLLM: the adapter's query_states (fused QKV, q norm, vLLM's rotary op from the
    positions, the layer's scale) gives kvshelf's HF runner's per-position shares of the question's attention
    on the same weights (Gemma 3: sliding layers with a window shorter than the documents), so the same tokens
    are recomputed. Inside vLLM the blend computes the document region only and the question is vLLM's
    (`question=`): the pass runs it after the region all the same, and the region's fused KV equals the own
    runner's blend of the whole prompt. Only the region's own forward goes to the paged attention (the
    request's blocks hold the region only): the pass and the prefix it computes alone attend over buffers."""
    hf = tiny_models(family)
    ref, adapter = ModelRunner(hf), VllmModelRunner(vllm_shaped(hf), hf.config)
    engine = _engine(adapter)
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (30, 25, 40)]
    question = torch.randint(5, 300, (12,), generator=g).tolist()
    seg, region = Segmented([1], docs, question, [2, 3]), Segmented([1], docs, [], [2, 3])
    policy = SelectionPolicy(signal="question", question_pass=True)
    blenders = [Blender(r, engine, check_layers=[1], ratios=[0.15], selection=policy) for r in (ref, adapter)]
    for doc in blenders[1].documents(seg, None):  # stored once (computed alone), placed by both runners
        for _ in blenders[1].compute_missing(seg, [doc], None, BlendInfo(deferred=1)):
            pass
    documents = blenders[1].documents(seg, None)
    assert all(d.cached for d in documents)
    shares = []
    for blender in blenders:
        inner = blender._question_pass
        monkeypatch.setattr(blender, "_question_pass", lambda *a, inner=inner: shares.append(s := inner(*a)) or s)
    n, end = len(seg.token_ids), len(region.token_ids)
    want_kv, got_kv = ref.new_kv(n), adapter.new_kv(n)  # the pass writes the question's KV after the region
    _, want = blenders[0].prefill(seg, want_kv, None, documents)
    paged = _RecordingPaged(adapter, end)
    with adapter.attending_in(paged, got_kv):
        _, got = blenders[1].prefill(region, got_kv, None, documents, question=question)
    assert paged.calls and all(kv is got_kv and last < end for kv, last in paged.calls)
    assert want.question_pass_tokens == got.question_pass_tokens == len(question)
    placed = shares[0][:end]
    assert shares[0].shape == shares[1].shape == (n,) and float(placed.std() / placed.mean()) > 0.05  # not uniform
    assert torch.allclose(shares[1], shares[0], atol=1e-5), float((shares[1] - shares[0]).abs().max())
    assert got.recomputed_tokens == want.recomputed_tokens and want.selected_per_check == got.selected_per_check
    assert torch.allclose(got_kv.data[:, :, :, :end], want_kv.data[:, :, :, :end], atol=1e-4)


# -- token prompts cut at the separator -------------------------------------------------------------------
def test_cut_reassembles_the_prompt_exactly_or_refuses():
    sep = [7, 8]
    seg = _cut([1, 10, 11, 7, 8, 12, 7, 8, 13, 14], [1], sep)
    assert seg.prefix == [1] and seg.documents == [[10, 11], [12]] and seg.suffix == [13, 14]
    assert seg.token_ids == [1, 10, 11, 7, 8, 12, 7, 8, 13, 14]
    assert _cut([1, 10, 11, 12], [1], sep) is None  # no separator: not a blend prompt
    assert _cut([1, 7, 8, 7, 8, 13], [1], sep) is None  # an empty document would not reassemble


# -- scheduler: blended regions --------------------------------------------------------------------------
def test_scheduler_loads_a_blended_region_with_the_whole_prompt_and_never_saves_it():
    tokens = list(range(300))
    side = SchedulerSide(lambda t, s: BLEND_HIT | 200, block_size=64, min_cached_tokens=64)
    # the whole region, not block-aligned: vLLM computes only the question (its prefix caching is off)
    assert side.num_new_matched_tokens(request("r", tokens), 0) == (200, False)
    side.after_alloc(request("r", tokens), 200)
    plan = side.build_plan(step(new=[new_req("r", tokens, [4, 5, 6, 7, 8], 200, 300)], scheduled={"r": 100}))
    (load,) = plan.loads
    assert load.blend and (load.start, load.end) == (0, 200)
    assert load.tokens == tokens[:-1]  # what the worker's lookup split into documents
    assert plan.saves == []  # the prefill completes in this step, but fused KV never becomes prefix chunks
    # a plain prefix hit still loads its chunks and saves the prompt
    plain = SchedulerSide(lambda t, s: 128, block_size=64, min_cached_tokens=64)
    plain.num_new_matched_tokens(request("p", tokens), 0)
    plain.after_alloc(request("p", tokens), 128)
    plan = plain.build_plan(step(new=[new_req("p", tokens, [1, 2, 3, 4, 5], 128, 300)], scheduled={"p": 172}))
    assert not plan.loads[0].blend and plan.loads[0].tokens == tokens[:128] and len(plan.saves) == 1


# -- start-up checks --------------------------------------------------------------------------------------
def _vllm_config(prefix_caching=False, tp=1):
    return SimpleNamespace(
        cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp),
    )


def test_blending_refuses_prefix_caching_tensor_parallel_and_other_vllm_versions(monkeypatch):
    config = connector_config({"enable_blending": True, "local_cpu": True})
    check_blend_settings(_vllm_config(), config)
    with pytest.raises(ConfigError, match="prefix caching off"):
        check_blend_settings(_vllm_config(prefix_caching=True), config)
    with pytest.raises(ConfigError, match="tensor_parallel_size=1"):
        check_blend_settings(_vllm_config(tp=2), config)
    question = connector_config({"enable_blending": True, "local_cpu": True, "blend_selection_signal": "question"})
    with pytest.raises(ConfigError, match="question is computed after it: set blend_question_pass"):
        check_blend_settings(_vllm_config(), question)
    # with the question pass the question's attention is read in a pass of its own: allowed, as are its keys
    passing = {"blend_selection_signal": "kv+question", "blend_question_pass": True, "blend_question_weight": 4.0}
    passing |= {"blend_question_span": 8, "blend_question_budget": 0.5}
    check_blend_settings(_vllm_config(), connector_config({"enable_blending": True, "local_cpu": True, **passing}))
    with pytest.raises(ConfigError, match="blend_context_temperature"):  # kvshelf's own runner only
        connector_config({"enable_blending": True, "blend_context_temperature": 0.5})
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.33.1")
    with pytest.raises(ConfigError, match="this is vLLM 0.33.1"):
        check_blend_settings(_vllm_config(), config)


def test_blend_settings_are_vllm_connector_keys():
    config = connector_config({"enable_blending": True, "blend_recompute_ratios": [0.2], "blend_check_layers": [2]})
    assert config.enable_blending and config.blend_recompute_ratios == [0.2] and config.blend_check_layers == [2]


def test_find_model_finds_the_one_model_holding_the_attention_layer(tiny_models):
    model = vllm_shaped(tiny_models("llama"))
    attention = nn.Module()
    model.model.layers[0].self_attn.attn_module = attention  # a registered submodule, as vLLM's `attn` is
    assert find_model(attention) is model
    with pytest.raises(ConfigError, match="found 0"):
        find_model(nn.Linear(2, 2))


def test_the_seeds_env_names_turn_blending_on(monkeypatch):
    monkeypatch.setenv("LMCACHE_ENABLE_BLENDING", "true")
    monkeypatch.setenv("LMCACHE_BLEND_SPECIAL_STR", "<|DOC|>")
    monkeypatch.setenv("LMCACHE_BLEND_CHECK_LAYERS", "1")
    monkeypatch.setenv("LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.15")
    config = connector_config({"local_cpu": True})
    assert config.enable_blending and config.blend_special_str == "<|DOC|>"
    assert config.blend_check_layers == [1] and config.blend_recompute_ratios == [0.15]
    monkeypatch.setenv("LMCACHE_BLEND_CHECK_LAYERS", "1,3")
    assert connector_config({}).blend_check_layers == [1, 3]


# -- the worker's blend half, with a stand-in for the blending assembly -----------------------------------
class _FakeBlending:
    """Plans from a fixed answer; 'blends' by returning known KV (or None: the documents went away)."""

    document_context = "alone"  # missing documents computed alone (test_vllm_blend_documents.py: prompt)

    def __init__(self, region_kv, missing=()):
        self.region_kv, self.missing, self.computed = region_kv, list(missing), []

    def plan(self, tokens, salt):
        docs = [SimpleNamespace(key=k, cached=False) for k in self.missing]
        return SimpleNamespace(
            segmented="seg",
            missing=docs,
            blend=self.region_kv is not None,
            region_end=0 if self.region_kv is None else self.region_kv.shape[3],
        )

    def prefill(self, tokens, salt, attention=None, last=()):
        if self.region_kv is None:
            return None
        return SimpleNamespace(kv=self.region_kv, info=BlendInfo(documents=1, document_hits=1), in_blocks=False)

    def compute_alone(self, segmented, doc, salt):
        self.computed.append(doc.key)


def test_blend_worker_scatters_the_region_or_fails_its_blocks_for_vllm_to_recompute():
    from test_vllm_connector import HEADS as H
    from test_vllm_connector import LAYERS as L
    from test_vllm_connector import engine, paged_caches, worker

    from kvshelf.integrations.vllm.blending import BlendWorker
    from kvshelf.integrations.vllm.scheduler import LoadSpec

    caches = paged_caches()
    side = worker(engine(), caches, layerwise=False, async_load=False)
    region = torch.randn(L, 2, H, 70, side.layout.head_dim)
    blend = BlendWorker(_FakeBlending(region), side)
    side.blend_lookup = blend.lookup
    assert side.lookup(list(range(80)), None) == BLEND_HIT | 70
    blocks = [3, 9, 4]
    blend.load(LoadSpec("r", list(range(80)), blocks, 0, 64, None, blend=True))
    for i, name in enumerate(side.names):
        got = side.layout.view(blocks, 0, 64).gather(caches[name])
        assert torch.equal(got, region[i, :, :, :64])
    assert side.take_failed_blocks() == set() and blend.stats["blended_tokens"] == 64

    gone = BlendWorker(_FakeBlending(None), side)  # the documents were evicted after the lookup
    gone.load(LoadSpec("s", list(range(80)), [5, 6, 7], 0, 64, None, blend=True))
    assert side.take_failed_blocks() == {5, 6} and gone.stats["blend_failed"] == 1


def test_missing_documents_wait_for_a_later_step_and_are_computed_once():
    from kvshelf.integrations.vllm.blending import BlendWorker

    fake = _FakeBlending(None, missing=[b"a", b"b"])
    blend = BlendWorker(fake, SimpleNamespace())
    assert blend.lookup([1, 2, 3], None) == 0  # nothing cached: vLLM prefills it exactly
    blend.lookup([1, 2, 3], None)  # looked up again (e.g. no free blocks): queued once
    blend.step_started()  # the step that serves the request's first token
    blend.step_finished()
    assert fake.computed == []
    blend.step_started()
    blend.step_finished()
    assert fake.computed == [b"a"]  # one document per step
    assert blend.compute_pending() == 1 and fake.computed == [b"a", b"b"]
    blend.lookup([1, 2, 3], None)  # still missing in the tiers (the fake stores nothing): queued again
    assert blend.compute_pending() == 2


# -- the blend's attention with vLLM's CPU kernel over paged blocks ---------------------------------------
def _cpu_attention_layers(monkeypatch, windows, heads=4, kv_heads=2, dim=32, scale=0.2):
    from vllm.v1.attention.backends import cpu_attn

    # the impl reads the model dtype from vLLM's current config (set by the engine; none here)
    config = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32))
    monkeypatch.setattr(cpu_attn, "get_current_vllm_config", lambda: config)
    return [
        SimpleNamespace(
            impl=cpu_attn.CPUAttentionBackendImpl(heads, dim, scale, kv_heads, None, window, "auto"),
            isa="vec",
            _k_scale_float=1.0,
            _v_scale_float=1.0,
        )
        for window in windows
    ]


def test_paged_blend_attention_equals_dense_attention_for_scattered_tokens(monkeypatch):
    """Queries at scattered positions (runs and single tokens, as after a check layer) over K/V partly
    written from the dense buffer, partly computed: vLLM's kernel over the blocks gives what masked SDPA
    over the dense buffer gives, in a global and a sliding layer."""
    from kvshelf.integrations.vllm.blend_attention import for_backend
    from kvshelf.model.kv_buffer import KVBuffer

    heads, kv_heads, dim, bs, n = 4, 2, 32, 32, 150
    layers = _cpu_attention_layers(monkeypatch, [None, 16])
    caches = [torch.zeros(12, kv_heads, bs, 2 * dim) for _ in layers]
    make = for_backend(layers, caches)
    assert make is not None
    g = torch.Generator().manual_seed(5)
    kv = KVBuffer(len(layers), kv_heads, dim, n, dtype=torch.float32, device="cpu")
    kv.data.copy_(torch.randn(kv.data.shape, generator=g))
    block_ids = [7, 3, 9, 1, 11]  # 5 blocks of 32: tokens 0..159
    paged = make(block_ids, bs, n)
    positions = torch.tensor([0, 1, 2, 3, 17, 40, 41, 42, 90, 120, 121, 149])
    for layer, window in enumerate([None, 16]):
        q = torch.randn(len(positions), heads, dim, generator=g)
        fresh = torch.randn(2, kv_heads, len(positions), dim, generator=g)
        kv.data[layer, :, :, positions] = fresh  # the runner writes the computed tokens' K/V first
        k, v = fresh[0].transpose(0, 1), fresh[1].transpose(0, 1)
        got = paged.attend(layer, q, k, v, positions, kv)
        mask = ModelRunner.attention_mask(positions, n, 0, window)
        want = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            kv.data[layer, 0][None],
            kv.data[layer, 1][None],
            attn_mask=mask,
            scale=0.2,
            enable_gqa=True,
        )[0].transpose(0, 1)
        assert torch.allclose(got, want, atol=1e-5)
    # every token of the region is in the blocks, as the dense buffer holds it (nothing left to scatter)
    slots = torch.tensor(block_ids)[torch.arange(n) // bs] * bs + torch.arange(n) % bs
    for layer, cache in enumerate(caches):
        keys = cache.view(12, kv_heads, 2 * bs, dim)[:, :, :bs]  # [blocks, heads, dim, bs] in memory
        k_t = keys.reshape(12, kv_heads, dim, bs)
        got_k = k_t[slots // bs, :, :, slots % bs]  # [n, heads, dim]
        assert torch.equal(got_k, kv.data[layer, 0].transpose(0, 1))


def test_paged_blend_attention_refuses_tokens_without_a_block(monkeypatch):
    from kvshelf.integrations.vllm.blend_attention import for_backend

    layers = _cpu_attention_layers(monkeypatch, [128])
    make = for_backend(layers, [torch.zeros(8, 2, 32, 64)])
    with pytest.raises(ValueError, match="no block"):
        make([0, 0, 4, 5], 32, 120)  # a sliding-window KV manager's null blocks before the window
    with pytest.raises(ValueError, match="need 4 blocks"):
        make([3, 4], 32, 120)
    assert for_backend([SimpleNamespace(impl=object())], [torch.zeros(1)]) is None  # another backend
