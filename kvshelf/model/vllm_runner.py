"""The model runner's per-layer forward over a vLLM model's own modules (CacheBlend inside vLLM, issue #19).

vLLM's decoder layers fuse Q, K and V into one projection (`qkv_proj`, returning (output, bias)), gate and
up into `gate_up_proj`, keep one rotary module per layer (`rotary_emb`, with a cos/sin table per position)
and do attention over the paged cache inside `attn`. This adapter runs the same layers piece by piece:
vLLM's embedding, norms, projections, rotary ops, MLP and final logits, writing every layer's K/V into
kvshelf's dense `KVBuffer` (the HF runner's, so the blend code in kvshelf.blend runs unchanged on top of
it); attention goes either over that buffer (torch SDPA) or, given a `PagedAttention`, over the request's
own paged blocks with vLLM's kernel.

Supported families: Llama/Mistral, Qwen2/Qwen3 (pre-norm layers, Qwen3's per-head q/k norms) and Gemma 3
(sandwich norms, q/k norms, sliding and global layers with their own rotary tables), tensor parallel size
1, neox-style rotary over the whole head.

Speed (issue #19, third session): rotary goes through each layer's own `rotary_emb` (vLLM's fused in-place
op, as vLLM's attention modules call it) instead of five elementwise ops per tensor. Inside the connector
the blend attends with vLLM's own attention kernel over the request's paged blocks (`attending_in`, with
the connector's `PagedAttention`): the blocks then hold the fused KV layer by layer, and no scatter is
left at the end. Without one (documents computed alone, other backends, tests), kvshelf attends over its
dense buffer with torch SDPA and the connector scatters the result into the blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch

from kvshelf.cache.fingerprint import ModelFingerprint
from kvshelf.errors import UnsupportedModelError
from kvshelf.model.kv_buffer import KVBuffer
from kvshelf.model.runner import LayerSpec, ModelRunner, has_sandwich_norms, position_bounds

SUPPORTED_VLLM_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma3_text"}


class PagedAttention(Protocol):
    """Attention over a request's paged blocks, layer by layer (the connector's, see
    kvshelf.integrations.vllm.blend_attention): before computing a layer's tokens it copies the layer's
    other region tokens from the dense buffer into the blocks, then writes the computed tokens' K/V there
    too and attends over the blocks. It covers the region's tokens [0, end)."""

    end: int

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, kv: KVBuffer
    ) -> torch.Tensor:
        """q [n, heads, dim], k and v [n, kv_heads, dim] of the tokens at `positions` (ascending); returns the
        attention output [n, heads, dim]."""
        ...


class VllmModelRunner(ModelRunner):
    """`ModelRunner`'s forward loop (token selection, layer hooks) over a loaded vLLM `*ForCausalLM`."""

    def __init__(self, model, hf_text_config, *, model_id: str | None = None):
        # ModelRunner.__init__ reads HF modules; everything it sets is set here from vLLM's instead.
        config = hf_text_config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_VLLM_MODEL_TYPES:
            raise UnsupportedModelError(
                f"CacheBlend inside vLLM supports model types {', '.join(sorted(SUPPORTED_VLLM_MODEL_TYPES))}; "
                f"this model is {model_type!r}"
            )
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise UnsupportedModelError("attention logit soft-capping (Gemma 2 style) is not supported")
        # vLLM's causal LMs share no base class; its VllmModelForTextGeneration protocol declares compute_logits
        # but not the `.model.layers` this adapter walks, so the structure is probed (a clear error, not a crash).
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(model, "compute_logits") or not hasattr(inner, "layers"):
            raise UnsupportedModelError(f"{type(model).__name__} is not a vLLM causal LM with a `.model` inside")
        self.model = model
        self.config = config
        self.model_id = model_id or model_type
        self.inner = inner
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.num_layers = len(self.layers)
        attn0 = self.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.num_kv_heads = attn0.num_kv_heads
        if attn0.num_kv_heads * attn0.head_dim != attn0.kv_size:
            raise UnsupportedModelError("the QKV projection's K size is not heads x head_dim")
        self.max_positions = int(getattr(config, "max_position_embeddings", 1 << 31))
        self._sandwich_norms = has_sandwich_norms(self.layers[0])
        self._rotary: list = []
        self.layer_specs = [self._vllm_layer_spec(layer) for layer in self.layers]
        self._scales = [float(layer.self_attn.attn.impl.scale) for layer in self.layers]
        self._weight = inner.embed_tokens.weight
        self._fingerprint: ModelFingerprint | None = None
        self._paged: PagedAttention | None = None
        self._paged_kv: KVBuffer | None = None  # the buffer whose tokens [0, paged.end) the blocks mirror
        self._logits = True
        self._rotations: dict[tuple, torch.Tensor] = {}  # (rotary table, delta) -> rotation matrix (rerotate)

    def _vllm_layer_spec(self, layer) -> LayerSpec:
        attn = layer.self_attn
        rotary = attn.rotary_emb
        if not getattr(rotary, "is_neox_style", False) or getattr(rotary, "rotary_dim", None) != self.head_dim:
            raise UnsupportedModelError("only neox-style rotary embeddings over the whole head are supported")
        if not isinstance(getattr(rotary, "cos_sin_cache", None), torch.Tensor):
            raise UnsupportedModelError(f"rotary embedding {type(rotary).__name__} has no cos/sin table")
        # Layers sharing one rotary module (vLLM caches them by parameters) share one table per forward.
        key = next((i for i, r in enumerate(self._rotary) if r is rotary), len(self._rotary))
        self._rotary.append(rotary)
        window = getattr(attn.attn, "sliding_window", None)
        return LayerSpec(
            window=window, rope_key=str(key), q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None)
        )

    # -- identity: the connector's engine carries vLLM's fingerprint ---------------------------------------
    @property
    def device(self) -> torch.device:
        return self._weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._weight.dtype

    def fingerprint(self) -> ModelFingerprint:
        raise NotImplementedError("inside vLLM the connector's engine holds the fingerprint (vllm_fingerprint)")

    def new_kv(self, capacity: int) -> KVBuffer:
        return KVBuffer(
            self.num_layers, self.num_kv_heads, self.head_dim, capacity, dtype=self.dtype, device=self.device
        )

    # -- forward pieces --------------------------------------------------------------------------------------
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_input_ids(token_ids.view(-1)).unsqueeze(0)

    def rope_tables(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict:
        """Nothing: each layer's rotary module rotates Q and K from the positions themselves."""
        return {}

    @contextlib.contextmanager
    def attending_in(self, paged: PagedAttention | None, kv: KVBuffer) -> Iterator[None]:
        """Forwards of tokens [0, paged.end) into `kv` inside the block attend through `paged` (None: over the
        dense buffer). Other forwards there attend over their buffer: the blend's question pass (the question
        after the region, into `kv`) and the prefix it computes alone (into a buffer of its own)."""
        self._paged, self._paged_kv = paged, kv
        try:
            yield
        finally:
            self._paged, self._paged_kv = None, None

    @contextlib.contextmanager
    def without_logits(self) -> Iterator[None]:
        """Forwards inside the block skip the final norm and vocabulary projection (the connector only
        needs the KV: vLLM samples from its own forward of the rest of the prompt)."""
        self._logits = False
        try:
            yield
        finally:
            self._logits = True

    def rerotate(self, k: torch.Tensor, delta: int, layer: int) -> torch.Tensor:
        """Move keys by `delta` positions with the layer's own rotary table (its frequencies and scaling):
        one matrix product with the rotation (cached per table and delta: a blend moves each document by one
        delta in every layer) instead of five elementwise passes per layer."""
        if delta == 0:
            return k
        key = (self.layer_specs[layer].rope_key, delta)
        rotation = self._rotations.get(key)
        if rotation is None:
            if len(self._rotations) >= 512:
                self._rotations.clear()
            row = self._rotary[layer].cos_sin_cache[abs(delta)].float()
            cos, sin = row.chunk(2)
            # A table scaled by a constant (YaRN's mscale) would scale twice: keep the pure rotation.
            norm = torch.sqrt(cos * cos + sin * sin).clamp_min(1e-12)
            cos, sin = cos / norm, sin / norm * (1.0 if delta > 0 else -1.0)
            # neox rotate-half: out = x * [cos, cos] + [-x2, x1] * [sin, sin], as x @ rotation
            half = cos.numel()
            rotation = torch.zeros(2 * half, 2 * half, dtype=torch.float32, device=row.device)
            idx = torch.arange(half, device=row.device)
            rotation[idx, idx] = cos
            rotation[idx + half, idx + half] = cos
            rotation[idx + half, idx] = -sin
            rotation[idx, idx + half] = sin
            self._rotations[key] = rotation
        return (k.float() @ rotation).to(k.dtype)

    def inv_freq(self, layer: int) -> torch.Tensor:
        raise NotImplementedError("vLLM's rotary tables are used directly (rerotate)")

    def _qkv(self, index: int, attn, x: torch.Tensor, positions: torch.Tensor):
        """Q [n, heads, dim], K and V [n, kv_heads, dim] of tokens x [n, hidden] at `positions`, rotated, as
        vLLM's own attention modules compute them (norms per head, then the layer's rotary op)."""
        n = x.shape[0]
        spec = self.layer_specs[index]
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        if spec.q_norm is not None:
            q = spec.q_norm(q.reshape(n, -1, self.head_dim)).reshape(n, -1)
        if spec.k_norm is not None:
            k = spec.k_norm(k.reshape(n, -1, self.head_dim)).reshape(n, -1)
        q, k = attn.rotary_emb(positions, q, k)
        return q.view(n, -1, self.head_dim), k.view(n, -1, self.head_dim), v.view(n, -1, self.head_dim)

    def query_states(self, index: int, hidden: torch.Tensor, positions: torch.Tensor, rope: dict) -> torch.Tensor:
        """As ModelRunner's: the layer's rotated queries [heads, n, head_dim] times its attention scale, from
        vLLM's fused projection, q norm and rotary op (which rotates from the positions)."""
        layer = self.layers[index]
        q, _, _ = self._qkv(index, layer.self_attn, layer.input_layernorm(hidden[0]), positions)
        return q.transpose(0, 1) * self._scales[index]

    def write_kv(self, index: int, hidden: torch.Tensor, positions: torch.Tensor, kv: KVBuffer, rope: dict) -> None:
        layer = self.layers[index]
        x = layer.input_layernorm(hidden[0])
        _, k, v = self._qkv(index, layer.self_attn, x, positions)
        kv.write_layer(index, self._slots(positions, hidden.shape[1]), k.transpose(0, 1), v.transpose(0, 1))

    def layer_forward(self, index, hidden, positions, kv: KVBuffer, rope: dict, masks: dict) -> torch.Tensor:
        layer = self.layers[index]
        spec = self.layer_specs[index]
        h = hidden[0]
        x = layer.input_layernorm(h)
        x = self._vllm_attention(index, layer.self_attn, x, positions, kv, masks, spec.window)
        if self._sandwich_norms:
            h = h + layer.post_attention_layernorm(x)
            x = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        else:
            h = h + x
            x = layer.mlp(layer.post_attention_layernorm(h))
        return (h + x).unsqueeze(0)

    def _vllm_attention(self, index, attn, x, positions, kv: KVBuffer, masks, window):
        n = x.shape[0]
        q, k, v = self._qkv(index, attn, x, positions)
        kv.write_layer(index, self._slots(positions, n), k.transpose(0, 1), v.transpose(0, 1))
        if self._paged is not None and kv is self._paged_kv and position_bounds(positions, masks)[1] < self._paged.end:
            out = self._paged.attend(index, q, k, v, positions, kv)
        else:
            # ModelRunner's attention over the buffer: a sliding layer's queries (contiguous, or a blend's
            # scattered selection) in window blocks, each reading only the keys its window reaches.
            out = self._attend(index, q.transpose(0, 1).unsqueeze(0), positions, kv, masks, window, self._scales[index])
            out = out[0].transpose(0, 1)
        out, _ = attn.o_proj(out.reshape(n, -1))
        return out

    def final_logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        if not self._logits:
            return torch.empty(0)
        logits = self.model.compute_logits(self.norm(hidden_last.reshape(-1, hidden_last.shape[-1])))
        return logits.reshape(hidden_last.shape[1], -1).float().squeeze(0)
