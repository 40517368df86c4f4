"""The model runner's per-layer forward against the HF model's own forward, for every supported family."""

import pytest
import torch
from conftest import FAMILIES

from kvshelf.errors import UnsupportedModelError
from kvshelf.model.runner import ModelRunner

# fp32 on CPU: our attention and HF's differ only in summation order.
LOGIT_ATOL = 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_match_hf_forward(family, tiny_models):
    model = tiny_models(family)
    runner = ModelRunner(model)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (90,))  # longer than the tiny sliding window (24)
    with torch.no_grad():
        ref = model(ids.view(1, -1)).logits[0]

    kv = runner.new_kv(90)
    assert torch.allclose(runner.forward(ids, 0, kv), ref[-1], atol=LOGIT_ATOL)

    # Same logits when the prompt is computed in pieces over the KV buffer, then decoded token by token.
    kv = runner.new_kv(90)
    runner.forward(ids[:37], 0, kv)
    assert torch.allclose(runner.forward(ids[37:80], 37, kv), ref[79], atol=LOGIT_ATOL)
    for pos in range(80, 90):
        assert torch.allclose(runner.forward(ids[pos : pos + 1], pos, kv), ref[pos], atol=LOGIT_ATOL)
    assert kv.length == 90


def test_layer_specs_reflect_sliding_and_global_layers(tiny_models):
    gemma = ModelRunner(tiny_models("gemma3"))
    assert [s.window for s in gemma.layer_specs] == [24, None, 24, None]
    assert [s.rope_key for s in gemma.layer_specs] == [
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
    ]
    assert [s.window for s in ModelRunner(tiny_models("qwen2")).layer_specs] == [None, None, 24, 24]
    assert [s.window for s in ModelRunner(tiny_models("llama")).layer_specs] == [None] * 4


def test_layer_hook_sees_every_layer_in_order(tiny_models):
    runner = ModelRunner(tiny_models("llama"))
    seen = []
    runner.forward(list(range(10)), 0, runner.new_kv(10), layer_hook=lambda i, r, kv: seen.append(i))
    assert seen == [0, 1, 2, 3]


def test_fingerprint_is_stable_and_weight_sensitive(tiny_models):
    from conftest import build_tiny_model

    a = ModelRunner(tiny_models("llama")).fingerprint()
    assert a == ModelRunner(build_tiny_model("llama")).fingerprint()
    assert a.digest() != ModelRunner(build_tiny_model("llama", seed=1)).fingerprint().digest()
    assert a.digest() != ModelRunner(tiny_models("qwen2")).fingerprint().digest()


def test_unsupported_model_type_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        ModelRunner(model)


def test_one_changed_embedding_row_changes_the_fingerprint():
    from conftest import build_tiny_model

    from kvshelf.model import weights as weights_mod

    base = build_tiny_model("gemma3")
    tuned = build_tiny_model("gemma3")
    with torch.no_grad():  # a fine-tune that touched one token's row, off the old strided sample
        tuned.model.embed_tokens.weight[77, 1] += 1e-3
    assert weights_mod.sampled_digest(base) == weights_mod.sampled_digest(tuned)  # what the old digest saw
    assert ModelRunner(base).fingerprint().digest() != ModelRunner(tuned).fingerprint().digest()


def test_a_folder_model_is_hashed_once_and_again_when_its_files_change(tmp_path, monkeypatch):
    from conftest import build_tiny_model
    from transformers import AutoModelForCausalLM

    from kvshelf.model import weights as weights_mod

    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    build_tiny_model("llama").save_pretrained(folder)

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    first = ModelRunner(load()).fingerprint().weights_digest
    assert first == weights_mod.full_digest(load())
    assert len(list((tmp_path / "cache" / "digests").glob("weights-*.json"))) == 1

    calls = []
    full = weights_mod.full_digest
    monkeypatch.setattr(weights_mod, "full_digest", lambda m: calls.append(1) or full(m))
    assert ModelRunner(load()).fingerprint().weights_digest == first and not calls  # remembered

    changed = load()
    with torch.no_grad():
        changed.model.embed_tokens.weight[5] += 1.0  # changed in memory after loading: hashed again
    assert ModelRunner(changed).fingerprint().weights_digest != first and len(calls) == 1

    tuned = load()
    with torch.no_grad():
        tuned.model.embed_tokens.weight[9, 3] += 1e-3
    tuned.save_pretrained(folder)  # the files changed (size/mtime/inode): hashed again
    assert ModelRunner(load()).fingerprint().weights_digest not in (first,) and len(calls) == 2


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_forward_reads_no_tensor_value_per_layer(family, tiny_models, monkeypatch):
    """Every int() or item() of a tensor waits for a GPU: a forward may not need one per layer (its launches then
    run ahead of the kernels); with tokens selected, the new positions are read once."""
    runner = ModelRunner(tiny_models(family))
    reads = []
    to_int, item = torch.Tensor.__int__, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: reads.append("int") or to_int(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append("item") or item(t))
    kv = runner.new_kv(60)
    runner.forward(list(range(50)), 0, kv, logits=False)
    assert reads == []
    keep = torch.tensor([0, 3, 7, 9])

    def select(i, hidden, positions, rope):
        return keep if i == 1 else None

    runner.forward(list(range(50, 60)), 50, kv, select_tokens=select, logits=False)
    assert reads == ["int", "int"]  # first and last of the kept positions, once for the layers after the selection


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_sliding_layers_in_window_blocks_equal_one_masked_attention(family, tiny_models, monkeypatch):
    """A sliding layer's queries are cut into blocks that read only the keys their window reaches; the KV and
    logits equal one attention over every key with most of them masked, for contiguous and for scattered
    (CacheBlend-selected) queries."""
    import kvshelf.model.runner as runner_module

    runner = ModelRunner(tiny_models(family))
    torch.manual_seed(3)
    ids = torch.randint(0, runner.config.vocab_size, (150,))
    keep = torch.tensor([0, 1, 2, 30, 31, 77, 78, 79, 80, 100, 140, 149])  # gaps wider than the window (24)

    def select(i, hidden, positions, rope):
        return keep if i == 1 else None

    def run():
        kv = runner.new_kv(150)
        full = runner.forward(ids, 0, kv)
        picked = runner.forward(ids, 0, kv, select_tokens=select)
        return full, picked, kv.data[:, :, :, :150].clone()

    blocks_seen = []
    window_blocks = runner_module._window_blocks
    monkeypatch.setattr(runner_module, "_window_blocks", lambda *a: blocks_seen.append(b := window_blocks(*a)) or b)
    blocked = run()
    assert any(b is not None and len(b) >= 3 for b in blocks_seen)  # the blocked path ran
    monkeypatch.setattr(runner_module, "_window_blocks", lambda *a: None)
    masked = run()
    for got, want in zip(blocked, masked, strict=True):
        assert torch.allclose(got, want, atol=LOGIT_ATOL), float((got - want).abs().max())
