"""The connector's scheduler side: how many prompt tokens kvshelf can supply, and per step what the
worker must load into which blocks and which finished prefills it must store.

Plain Python over vLLM's request and scheduler-output objects (duck-typed), so it is testable alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kvshelf.errors import ConfigError

log = logging.getLogger(__name__)

# vLLM's KVTransferConfig.kv_role -> (loads cached prompts, stores prompts). A producer (prefill instance
# of a disaggregated pair) stores every prompt and never loads; a consumer (decode instance) loads and
# never stores prompts; kv_both (and no role) does both.
KV_ROLES: dict[str | None, tuple[bool, bool]] = {
    "kv_producer": (False, True),
    "kv_consumer": (True, False),
    "kv_both": (True, True),
    None: (True, True),
}


# Set in a lookup answer (bit 62 of the int64) when the tokens are a CacheBlend region (issue #19): the
# worker blends them from cached documents instead of loading prefix chunks; never stored as prefix KV.
BLEND_HIT = 1 << 62


def role_flags(kv_role: str | None) -> tuple[bool, bool]:
    """(loads, stores) for vLLM's `kv_role`; an unknown role is refused, naming it."""
    try:
        return KV_ROLES[kv_role]
    except KeyError:
        known = ", ".join(repr(r) for r in KV_ROLES if r is not None)
        raise ConfigError(f"kv_role {kv_role!r} is not one kvshelf knows ({known})") from None


def least_hit(hits: Iterable[int]) -> int:
    """The cached tokens all tensor-parallel ranks hold (each looked up in turn; stops at the first miss)."""
    least = None
    for hit in hits:
        least = hit if least is None else min(least, hit)
        if least <= 0:
            return 0
    return least or 0


@dataclass
class LoadSpec:
    """Load cached tokens [start, end) of `tokens` into the request's blocks (tokens before `start` are
    already computed by vLLM itself, e.g. its own prefix cache, and are left alone)."""

    req_id: str
    tokens: list[int]
    block_ids: list[int]
    start: int
    end: int
    salt: str | None
    # CacheBlend: `tokens` is the whole prompt but its last token (what the worker's lookup split into
    # documents); the worker blends its document region and writes [start, end) of it. `last`: that last
    # token, the end of the question (the blend's question pass reads it).
    blend: bool = False
    last: list[int] = field(default_factory=list)


@dataclass
class SaveSpec:
    """Store the KV of the whole prompt `tokens` (its prefill finishes in this step) from its blocks."""

    req_id: str
    tokens: list[int]
    block_ids: list[int]
    salt: str | None
    # vLLM computes the whole prompt in this step, in blocks it allocated for it in this step (nothing computed
    # or loaded before): every block holds its tokens even where a sliding-window KV manager frees blocks
    # outside the window in later steps (worker.WorkerSide.start_saves)
    one_step: bool = False


@dataclass
class StepPlan:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Tracked:
    tokens: list[int]
    salt: str | None
    block_ids: list[int] = field(default_factory=list)
    saved: bool = False
    blend: bool = False  # served from blended (approximate) KV: never stored as prefix chunks


class SchedulerSide:
    def __init__(
        self,
        lookup: Callable[[list[int], str | None], int],
        *,
        block_size: int,
        min_cached_tokens: int,
        default_salt: str | None = None,
        loads: bool = True,
        stores: bool = True,
    ):
        self.loads, self.stores = loads, stores  # from kv_role (role_flags)
        self.lookup = lookup  # the worker's lookup (least over TP ranks), in this process or over its socket
        self.block_size = block_size
        self.min_cached_tokens = min_cached_tokens
        self.default_salt = default_salt
        self._asked: dict[str, tuple[int, int]] = {}  # req_id -> (tokens vLLM had computed, cached end)
        self._loads: dict[str, tuple[int, int]] = {}  # req_id -> token range to load in its first step
        self._tracked: dict[str, _Tracked] = {}

    def _salt(self, request) -> str | None:
        return getattr(request, "cache_salt", None) or self.default_salt

    def num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens past `num_computed_tokens` that kvshelf holds, block-aligned (a blended region: whole),
        never the prompt's last token (vLLM must compute at least one to sample from)."""
        tokens = list(request.prompt_token_ids or [])
        self._tracked.setdefault(request.request_id, _Tracked(tokens, self._salt(request)))
        if not self.loads or len(tokens) < self.min_cached_tokens:
            return 0, False  # a producer never loads: it computes (and stores) every prompt
        usable = len(tokens) - 1
        try:
            hit = self.lookup(tokens[:usable], self._salt(request))
        except Exception as err:  # a tier that cannot answer is a miss, never a failed request
            log.warning("kvshelf lookup failed for request %s: %s", request.request_id, err)
            return 0, False
        blend = bool(hit & BLEND_HIT)
        hit &= BLEND_HIT - 1
        if not blend:
            hit -= hit % self.block_size
        # A blended region is declared whole, to its last document token: vLLM's prefix caching is off with
        # blending (its partial last block is never shared), and vLLM then computes only the question.
        self._tracked[request.request_id].blend = blend
        if hit <= num_computed_tokens:
            return 0, False
        self._asked[request.request_id] = (num_computed_tokens, hit)
        return hit - num_computed_tokens, False

    def after_alloc(self, request, num_external_tokens: int) -> None:
        asked = self._asked.pop(request.request_id, None)
        if num_external_tokens > 0 and asked is not None:
            start = asked[0]
            self._loads[request.request_id] = (start, start + num_external_tokens)

    def build_plan(self, scheduler_output) -> StepPlan:
        plan = StepPlan()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is None:
                tracked = self._tracked[new.req_id] = _Tracked(list(new.prompt_token_ids or []), self.default_salt)
            tracked.block_ids = list(new.block_ids[0])
            load = self._loads.pop(new.req_id, None)
            if load is not None:
                plan.loads.append(self._load_spec(new.req_id, tracked, *load))
            self._maybe_save(
                plan,
                new.req_id,
                tracked,
                new.num_computed_tokens + scheduled.get(new.req_id, 0),
                one_step=new.num_computed_tokens == 0,
            )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # after preemption: the block list is replaced
                tracked.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                tracked.block_ids.extend(new_blocks[0])
            load = self._loads.pop(req_id, None)  # a resumed request is looked up (and loaded) again
            if load is not None:
                plan.loads.append(self._load_spec(req_id, tracked, *load))
            self._maybe_save(plan, req_id, tracked, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        return plan

    @staticmethod
    def _load_spec(req_id: str, tracked: _Tracked, start: int, end: int) -> LoadSpec:
        if tracked.blend:
            tokens, last = tracked.tokens[: len(tracked.tokens) - 1], tracked.tokens[len(tracked.tokens) - 1 :]
        else:
            tokens, last = tracked.tokens[:end], []
        return LoadSpec(
            req_id, tokens, list(tracked.block_ids), start, end, tracked.salt, blend=tracked.blend, last=last
        )

    def _maybe_save(
        self, plan: StepPlan, req_id: str, tracked: _Tracked, computed_after_step: int, *, one_step: bool = False
    ) -> None:
        if (
            not self.stores
            or tracked.blend
            or tracked.saved
            or len(tracked.tokens) < self.min_cached_tokens
            or computed_after_step < len(tracked.tokens)
        ):
            return
        tracked.saved = True
        plan.saves.append(SaveSpec(req_id, tracked.tokens, list(tracked.block_ids), tracked.salt, one_step=one_step))

    def blocks_failed(self, block_ids: set[int]) -> None:
        """The worker could not load these blocks; vLLM recomputes them, and the requests holding them are
        stored again once their prefill completes (the failed step's save was dropped)."""
        for tracked in self._tracked.values():
            if tracked.saved and block_ids.intersection(tracked.block_ids):
                tracked.saved = False

    def finished(self, req_id: str) -> None:
        self._tracked.pop(req_id, None)
        self._asked.pop(req_id, None)
        self._loads.pop(req_id, None)
