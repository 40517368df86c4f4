"""An explicit per-layer forward over a HF causal LM's own modules, with kvshelf owning the KV.

The runner reuses the model's weights, norms, MLPs and rotary embeddings, and does attention itself so that
KV can be loaded, stored, re-positioned or partially recomputed between layers. It is the one place on the
HF path where prefill and decode run.

Supported: Llama/Mistral, Qwen2/Qwen3 (pre-norm blocks) and Gemma 3 (sandwich norms, sliding and global
layers with their own rope bases).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvshelf.cache.fingerprint import ModelFingerprint
from kvshelf.errors import Interrupted, UnsupportedModelError
from kvshelf.kvmath.rope import apply_rope, shift_keys
from kvshelf.model.kv_buffer import KVBuffer
from kvshelf.model.reweight import reweighted_attention
from kvshelf.model.weights import weights_digest

# Asked between layers by every forward of this thread's context: a long prefill whose caller has gone
# stops at the next layer instead of running to its end (see `interruptible`).
_stop_check: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("kvshelf_stop", default=None)


@contextlib.contextmanager
def interruptible(should_stop: Callable[[], bool] | None) -> Iterator[None]:
    """Forwards inside the block raise Interrupted between layers once `should_stop()` is true."""
    token = _stop_check.set(should_stop)
    try:
        yield
    finally:
        _stop_check.reset(token)


SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma3_text"}

# Called before / after each layer's forward: (layer index, runner, kv buffer). Layerwise load and store
# hook in here.
LayerHook = Callable[[int, "ModelRunner", KVBuffer], None]

# Called before each layer with (layer index, hidden states, positions, rope tables) of the tokens still
# computed; returns the indices (into those tokens) that continue through this layer and above, or None
# for all of them. CacheBlend narrows the computed tokens at its check layers this way.
TokenSelector = Callable[[int, torch.Tensor, torch.Tensor, dict], "torch.Tensor | None"]


# The forward's per-positions cache (`masks`) keeps the first and last position as ints under this key: reading
# them from a GPU tensor waits for the GPU, and a wait in every layer kept the launches from running ahead of the
# kernels, so that any stall of the launching thread (a layerwise loader's threads taking the GIL) left the GPU
# idle (issue #17, fifth session: 4 such waits per layer in a torch.profiler trace; BENCHMARKS.md).
_BOUNDS = "positions"


def position_bounds(positions: torch.Tensor, masks: dict) -> tuple[int, int]:
    """(first, last) of `positions` as ints, read once per set of positions (kept in `masks`)."""
    bounds = masks.get(_BOUNDS)
    if bounds is None:
        bounds = masks[_BOUNDS] = (int(positions[0]), int(positions[-1]))
    return bounds


def _window_blocks(positions: torch.Tensor, masks: dict, window: int, n: int) -> list[tuple] | None:
    """A sliding layer's queries cut where their positions cross a multiple of `window` past the first:
    (lo, hi, first position, last position) per block, or None when the queries span at most two windows.
    Each block then reads at most 2 x window keys instead of scoring every key up to the last query and masking
    most of them (a 4K-token prefill of Gemma 3 spent over half its time so). Kept in `masks` (once per set of
    positions: reading cut positions waits for a GPU)."""
    key = ("window blocks", window)
    if key not in masks:
        first, last = position_bounds(positions, masks)
        blocks = None
        if last - first + 1 > 2 * window:
            edges = torch.arange(first + window, last + 1, window, device=positions.device)
            cuts = [0, *torch.searchsorted(positions, edges).tolist(), n]
            cuts = sorted(set(cuts))
            ends = positions[torch.tensor(cuts[:-1] + [c - 1 for c in cuts[1:]], device=positions.device)].tolist()
            k = len(cuts) - 1
            blocks = [(cuts[i], cuts[i + 1], ends[i], ends[k + i]) for i in range(k)]
        masks[key] = blocks
    return masks[key]


def has_sandwich_norms(layer: torch.nn.Module) -> bool:
    """Whether a decoder layer norms its MLP's input and output too (Gemma 3's pre/post_feedforward_layernorm),
    HF's or vLLM's alike. A probe of the third-party module, not a model-type list: the modules it holds are
    what the forward calls, and neither library declares this in an interface."""
    return hasattr(layer, "pre_feedforward_layernorm")


@dataclass(frozen=True)
class LayerSpec:
    window: int | None  # sliding window in tokens, None for global attention
    rope_key: str | None  # layer type passed to a per-type rotary embedding (Gemma 3), else None
    q_norm: Callable | None = None  # per-head RMSNorm of queries / keys (Qwen3, Gemma 3), else None
    k_norm: Callable | None = None


class ModelRunner:
    def __init__(self, model, *, model_id: str | None = None):
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model type {model_type!r} is not supported; supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
            )
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise UnsupportedModelError("attention logit soft-capping (Gemma 2 style) is not supported")
        self.model = model.eval()
        self.config = config
        self.model_id = model_id or getattr(config, "_name_or_path", None) or model_type
        inner = model.model
        self.embed_tokens = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.rotary = inner.rotary_emb
        self._rotary_takes_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self._sandwich_norms = has_sandwich_norms(self.layers[0])
        attn0 = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.head_dim = attn0.head_dim
        self.num_kv_heads = config.num_key_value_heads
        self.max_positions = int(getattr(config, "max_position_embeddings", 1 << 31))
        self.layer_specs = [self._layer_spec(i, layer) for i, layer in enumerate(self.layers)]
        self._fingerprint: ModelFingerprint | None = None

    def _layer_spec(self, index: int, layer) -> LayerSpec:
        attn = layer.self_attn
        # HF attention modules: an absent attribute (config-wide window) differs from None (a global layer),
        # which getattr with a default cannot tell apart.
        if hasattr(attn, "sliding_window"):  # Gemma 3, Qwen2/3: per-layer attribute (None on global layers)
            window = attn.sliding_window
        else:  # Mistral: one window for every layer, or None
            window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        rope_key = layer_types[index] if (self._rotary_takes_type and layer_types) else None
        # Found once here, not probed on every forward.
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return LayerSpec(window=window, rope_key=rope_key, q_norm=q_norm, k_norm=k_norm)

    # -- identity ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def fingerprint(self) -> ModelFingerprint:
        if self._fingerprint is None:
            cfg = self.config
            extra = {
                "model_type": cfg.model_type,
                "rope": getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None),
                "layers": [(s.window, s.rope_key) for s in self.layer_specs],
                "scaling": [float(layer.self_attn.scaling) for layer in self.layers[:1]],
            }
            self._fingerprint = ModelFingerprint(
                model_id=str(self.model_id),
                weights_digest=weights_digest(self.model),
                dtype=str(self.dtype).removeprefix("torch."),
                num_layers=self.num_layers,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                extra=extra,
            )
        return self._fingerprint

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token over all layers (K and V) in the runner's dtype."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def new_kv(self, capacity: int) -> KVBuffer:
        return KVBuffer(
            self.num_layers, self.num_kv_heads, self.head_dim, capacity, dtype=self.dtype, device=self.device
        )

    # -- forward pieces ------------------------------------------------------------------------------
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids.view(1, -1))

    def rope_tables(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict:
        """cos/sin per rope kind for these positions, computed once per forward and shared by layers."""
        pos = positions.view(1, -1)
        tables = {}
        for spec in self.layer_specs:
            if spec.rope_key not in tables:
                if self._rotary_takes_type:
                    tables[spec.rope_key] = self.rotary(hidden, pos, spec.rope_key)
                else:
                    tables[spec.rope_key] = self.rotary(hidden, pos)
        return tables

    def inv_freq(self, layer: int) -> torch.Tensor:
        """The rotary inverse frequencies a layer uses (Gemma 3 has one set per layer type)."""
        key = self.layer_specs[layer].rope_key
        return getattr(self.rotary, f"{key}_inv_freq") if key is not None else self.rotary.inv_freq

    def rerotate(self, k: torch.Tensor, delta: int, layer: int) -> torch.Tensor:
        """Move keys ([..., tokens, head_dim], already rotated) by `delta` positions (kvmath.rope.shift_keys)."""
        return shift_keys(k, self.inv_freq(layer), delta)

    @staticmethod
    def attention_mask(positions: torch.Tensor, key_end: int, key_start: int, window: int | None):
        """Boolean [queries, keys] mask: query at position p sees key j iff j <= p and p - j < window."""
        keys = torch.arange(key_start, key_end, device=positions.device)
        q = positions.view(-1, 1)
        allowed = keys.view(1, -1) <= q
        if window is not None:
            allowed &= (q - keys.view(1, -1)) < window
        return allowed

    def layer_forward(
        self,
        index: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv: KVBuffer,
        rope: dict,
        masks: dict,
    ) -> torch.Tensor:
        """Run decoder layer `index` for the tokens at `positions` (KV index = position), writing their K/V
        into `kv` and attending over every cached token up to the last position."""
        layer = self.layers[index]
        spec = self.layer_specs[index]
        residual = hidden
        x = layer.input_layernorm(hidden)
        x = self._attention(index, layer.self_attn, x, positions, kv, rope[spec.rope_key], masks, spec.window)
        if self._sandwich_norms:
            x = layer.post_attention_layernorm(x)
            hidden = residual + x
            x = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
        else:
            hidden = residual + x
            x = layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden + x

    def _kv_states(self, index, attn, x, cos, sin):
        n = x.shape[1]
        k = attn.k_proj(x).view(1, n, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, n, -1, self.head_dim).transpose(1, 2)
        if (k_norm := self.layer_specs[index].k_norm) is not None:
            k = k_norm(k)
        return apply_rope(k, cos, sin), v

    @staticmethod
    def _slots(positions: torch.Tensor, n: int) -> slice | torch.Tensor:
        first, last = int(positions[0]), int(positions[-1])
        return slice(first, last + 1) if last - first + 1 == n else positions

    def write_kv(self, index: int, hidden: torch.Tensor, positions: torch.Tensor, kv: KVBuffer, rope: dict) -> None:
        """Compute and store layer `index`'s K and V for these tokens without running the rest of the layer
        (CacheBlend compares them with cached KV before deciding which tokens to compute)."""
        layer = self.layers[index]
        cos, sin = rope[self.layer_specs[index].rope_key]
        k, v = self._kv_states(
            index, layer.self_attn, layer.input_layernorm(hidden), cos.unsqueeze(1), sin.unsqueeze(1)
        )
        kv.write_layer(index, self._slots(positions, hidden.shape[1]), k[0], v[0])

    def query_states(self, index: int, hidden: torch.Tensor, positions: torch.Tensor, rope: dict) -> torch.Tensor:
        """Layer `index`'s rotated queries of tokens `hidden` [1, n, hidden] at `positions` times the layer's
        attention scale, [heads, n, head_dim] (CacheBlend's question-aware selection asks which keys the question
        attends to). `rope`: this forward's tables (`rope_tables`) for those tokens; this runner rotates with
        them, vLLM's adapter from the positions."""
        layer = self.layers[index]
        attn = layer.self_attn
        cos, sin = rope[self.layer_specs[index].rope_key]
        x = layer.input_layernorm(hidden)
        n = x.shape[1]
        q = attn.q_proj(x).view(1, n, -1, self.head_dim).transpose(1, 2)
        if (q_norm := self.layer_specs[index].q_norm) is not None:
            q = q_norm(q)
        return apply_rope(q, cos.unsqueeze(1), sin.unsqueeze(1))[0] * attn.scaling

    def _attention(self, index, attn, x, positions, kv: KVBuffer, cos_sin, masks, window):
        n = x.shape[1]
        cos, sin = cos_sin
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = attn.q_proj(x).view(1, n, -1, self.head_dim).transpose(1, 2)
        if (q_norm := self.layer_specs[index].q_norm) is not None:
            q = q_norm(q)
        q = apply_rope(q, cos, sin)
        k, v = self._kv_states(index, attn, x, cos, sin)
        first, last = position_bounds(positions, masks)
        contiguous = last - first + 1 == n
        kv.write_layer(index, slice(first, last + 1) if contiguous else positions, k[0], v[0])
        out = self._attend(index, q, positions, kv, masks, window, attn.scaling)
        if (reweight := kv.reweight) is not None and reweight.applies(index, last):
            # The question's and decoded tokens' attention over placed documents, APE-style (model.reweight).
            start = max(0, first - window + 1) if window is not None else 0
            keys, values = kv.layer_kv(index, start, last + 1)
            rows = (positions >= reweight.from_position).nonzero().view(-1)
            out[0, :, rows] = reweighted_attention(
                q[0, :, rows], keys, values, positions[rows], start, window, attn.scaling, reweight
            )
        return attn.o_proj(out.transpose(1, 2).reshape(1, n, -1))

    def _attend(self, index, q, positions, kv: KVBuffer, masks: dict, window, scale) -> torch.Tensor:
        """Attention of queries q [1, heads, n, dim] at `positions` (ascending, contiguous or CacheBlend's scattered
        selection) over the buffer, which already holds their K/V. A sliding layer's queries go in window blocks
        (`_window_blocks`), each reading only the keys its window reaches. vLLM's runner adapter attends so too."""
        first, last = position_bounds(positions, masks)
        blocks = _window_blocks(positions, masks, window, q.shape[2]) if window is not None else None
        if blocks is None:
            return self._sdpa(index, q, positions, first, last, kv, window, masks, scale)
        return torch.cat(
            [
                self._sdpa(index, q[:, :, lo:hi], positions[lo:hi], p0, p1, kv, window, masks, scale)
                for lo, hi, p0, p1 in blocks
            ],
            dim=2,
        )

    def _sdpa(self, index, q, positions, first: int, last: int, kv: KVBuffer, window, masks: dict, scale):
        """Attention of queries q [1, heads, n, dim] at `positions` (first..last) over the buffer's keys up to the
        last one; keys a sliding layer can never see are not read at all."""
        n = q.shape[2]
        end = last + 1
        start = max(0, first - window + 1) if window is not None else 0
        keys, values = kv.layer_kv(index, start, end)
        mask = None
        if n > 1 or last - first + 1 != n:
            mask_key = (window, start, end)  # one mask per key range, shared by the layers of that window
            if mask_key not in masks:
                masks[mask_key] = self.attention_mask(positions, end, start, window)
            mask = masks[mask_key]
        return F.scaled_dot_product_attention(
            q, keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=True
        )

    def final_logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden_last))
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits.view(-1).float()

    # -- whole forward: the one per-layer loop ------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor | list[int],
        start: int,
        kv: KVBuffer,
        *,
        layer_hook: LayerHook | None = None,
        layer_pre_hook: LayerHook | None = None,
        select_tokens: TokenSelector | None = None,
        all_logits: bool = False,
        logits: bool = True,
    ) -> torch.Tensor | None:
        """Compute tokens at positions [start, start + n) over KV already in `kv` for [0, start).

        Returns the logits of the last position only (float32, [vocab]), or of every position
        ([n, vocab]) with `all_logits` (perplexity measurements). With `select_tokens`, layers compute
        only the tokens it keeps (their KV elsewhere stays as it is in `kv`); it must keep the last token.
        `logits=False` fills the KV only and returns None (no vocabulary projection).
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).view(-1)
        n = ids.numel()
        if n == 0:
            raise ValueError("forward needs at least one token")
        if all_logits and select_tokens is not None:
            raise ValueError("all_logits needs every token computed in every layer (no select_tokens)")
        positions = torch.arange(start, start + n, device=self.device)
        hidden = self.embed(ids)
        rope = self.rope_tables(hidden, positions)
        masks: dict = {_BOUNDS: (start, start + n - 1)}  # what the layers share while the positions stay
        should_stop = _stop_check.get()
        for i in range(self.num_layers):
            if should_stop is not None and should_stop():
                raise Interrupted(f"forward stopped before layer {i}: its caller no longer wants it")
            if layer_pre_hook is not None:  # e.g. wait until layer i's cached KV has been loaded
                layer_pre_hook(i, self, kv)
            if select_tokens is not None and (keep := select_tokens(i, hidden, positions, rope)) is not None:
                positions, hidden = positions[keep], hidden[:, keep]
                rope = {key: (cos[:, keep], sin[:, keep]) for key, (cos, sin) in rope.items()}
                masks = {}
            hidden = self.layer_forward(i, hidden, positions, kv, rope, masks)
            if layer_hook is not None:  # e.g. start storing layer i while layer i+1 computes
                layer_hook(i, self, kv)
        kv.length = max(kv.length, start + n)
        if not logits:
            return None
        if all_logits:
            return self.final_logits(hidden).view(n, -1)
        return self.final_logits(hidden[:, -1:])
