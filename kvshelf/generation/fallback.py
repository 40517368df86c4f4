"""Confidence fallback of a blended prefill (issue #18, twelfth session; config `blend_fallback_margin`).

A blend's answer differs from full prefill's mostly where full prefill itself nearly tied between two tokens
(BENCHMARKS.md, issue #18, eleventh session): the blend's own first answer token then has a small top-1 over
top-2 log-probability margin too. With a threshold `margin` (nats, > 0), a blended request whose first answer
token is picked by less than it is served by an exact prefill instead: the blended KV is discarded, the whole
prompt prefilled again into the same buffer, and the first token chosen from exact logits. That request costs
a blend plus a full prefill; the others keep the blend's speed.

"First answer token": the first token that is not white space alone. An answer that starts with a token of
white space (after "is", a number starts with a space token of its own, picked with a wide margin that says
nothing of the digits) is decoded a step further over the blended KV before the first token is streamed (at
most `BLANK_LOOKAHEAD` such tokens, held back so that a fallback never contradicts a token already sent).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from kvshelf.blend.blender import Blender
from kvshelf.generation.outcome import PrefillOutcome, PrefillRequest
from kvshelf.model.kv_buffer import KVBuffer

log = logging.getLogger(__name__)

BLANK_LOOKAHEAD = 2  # white-space tokens decoded over the blended KV, at most, before the answer's first one

# The first tokens of an answer, each with the logits it was chosen from: chosen before the first is streamed.
Start = list[tuple[int, torch.Tensor]]


def top_margin(logits: torch.Tensor) -> float:
    """The log-probability of the likeliest token minus that of the runner-up (nats): how firmly it was picked."""
    top = torch.log_softmax(logits.float().view(-1), -1).topk(2).values
    return float(top[0] - top[1])


def applies(blender: Blender | None, outcome: PrefillOutcome) -> bool:
    """Whether `outcome` is a blend (not an exact prefill) that a fallback margin watches."""
    blend = outcome.blend
    return blender is not None and blender.fallback_margin > 0 and blend is not None and not blend.exact


def confident_start(
    blender: Blender,
    request: PrefillRequest,
    kv: KVBuffer,
    outcome: PrefillOutcome,
    pick: Callable[[torch.Tensor], int],
    blank: Callable[[int], bool],
    max_new_tokens: int,
) -> tuple[Start, PrefillOutcome]:
    """The answer's first tokens over the blended KV, or, when its first answer token's margin is below
    `blender.fallback_margin`, the first token of an exact prefill (then `kv` holds exact KV and the outcome
    returned says so). `pick` chooses a token from logits; `blank` says whether a token is white space alone."""
    start: Start = []
    logits, n = outcome.logits, len(request.ids)
    token = pick(logits)
    while blank(token) and len(start) < BLANK_LOOKAHEAD and len(start) + 1 < max_new_tokens:
        start.append((token, logits))
        logits = blender.runner.forward([token], n + len(start) - 1, kv)
        token = pick(logits)
    start.append((token, logits))
    info = outcome.blend
    info.answer_margin = top_margin(logits)
    if info.answer_margin >= blender.fallback_margin:
        return start, outcome
    t0 = time.perf_counter()
    kv.reweight, kv.length = None, 0  # the blend's reweighting of the question's attention goes with its KV
    exact = blender.runner.forward(request.ids, 0, kv)
    compute_s = time.perf_counter() - t0
    info.fallback = True
    blender.metrics.blend_fallbacks.inc()
    log.info(
        "blend fallback: first answer token (after %d white-space tokens) picked by %.3f nats < "
        "blend_fallback_margin %.3f; served by an exact prefill of %d tokens (%.2f s, after a %.2f s blend)",
        len(start) - 1,
        info.answer_margin,
        blender.fallback_margin,
        n,
        compute_s,
        outcome.compute_s,
    )
    served = PrefillOutcome(
        exact,
        loaded_bytes=outcome.loaded_bytes,  # loaded, then not used for the answer: no hit tokens
        exact=True,
        store_prefix=False,  # a blended prompt is served from document KV, never from prefix KV
        compute_s=compute_s,  # the exact prefill alone: what the guard learns a prefill's speed from
        blend=info,
        deferred=outcome.deferred,  # the missing documents are still stored (now from exact KV)
    )
    return [(pick(exact), exact)], served
