"""`kvshelf advise`: from a workload trace and the measured cost model, which optimisations pay.

The trace is simulated against kvshelf's own chunking: prefix reuse is what chained chunk keys would hit
given every earlier request; blend reuse is what position-independent chunk keys would hit (documents in
any order); the storage a tier would need follows from the unique tokens and the codec's measured size.
Predictions use the cost model (this model's prefill speed here, tier speeds) so that they can be
checked with `kvshelf bench --config FILE --trace FILE`.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass, field

from kvshelf.advice.cost import CostModel
from kvshelf.blend.selection import budget_for
from kvshelf.config import KVShelfConfig

# Stored size per fp32 value of each codec, measured on the default model (BENCHMARKS.md; cachegen:
# calibrated, level 5).
CODEC_BITS = {"none": 32.0, "int8": 8.13, "cachegen": 2.65}

# What CacheBlend costs in answers, measured on bench/rag_eval.py's unseen RAG set (issue #18, BENCHMARKS.md,
# fifth session: 100 samples, 0.7-2.8K tokens, the default model; 4-8K: eleventh and twelfth sessions): the
# trade-off the recommendation states.
BLEND_QUALITY = (
    "measured on 100 varied RAG prompts of ~2K tokens: 15% recompute, documents cached from the prompt that first "
    "held them, answered as often as full prefill (65 and 66 of 100, paired difference -1 point [-9, +7]) at ~4.3x "
    "faster TTFT; documents cached alone lost 10 points at 15%. On 4-8K prompts (15% of 2,048 tokens, then 6%, "
    "picked by the question pass) it is ~6.6x faster and answered 53 of 78 on three sets where full prefill "
    "answered 58 (21 vs 21, 18 vs 20, 14 vs 17; the answers lost were near ties of full prefill's own): check "
    "answers on long prompts. The trade-off if answers matter more than throughput: blend_fallback_margin 0.15 "
    "(a blend whose first answer token beats the next by under 0.15 nats is served by an exact prefill instead) "
    "answered 56 of those 78 (21, 19, 16) at the same median speed-up (~6.7x) but ~3.8x over all requests: 9 of "
    "78 paid a blend plus a full prefill; on the ~2K prompts it gained nothing (65 of 100 either way, 4.2x -> 2.9x "
    "aggregate). Off by default"
)


# CacheBlend as configured by default (the ratio and check layer follow issue #18's measurements).
_DEFAULTS = KVShelfConfig()
BLEND_RATIO = _DEFAULTS.blend_recompute_ratios[-1]
BLEND_LABEL = f"CacheBlend {BLEND_RATIO:.0%}"
BLEND_MIN_CACHED_SHARE = _DEFAULTS.blend_min_cached_share
_CHECK = max(_DEFAULTS.blend_check_layers)


def blend_placed_cost(placed: int) -> float:
    """Prefill-equivalent tokens of `placed` cached document tokens in a blend: every layer below the check layer
    computes them all, the others the recompute budget (smaller past blend_ratio_tokens; the default model's
    18 layers)."""
    recomputed = budget_for(BLEND_RATIO, placed, _DEFAULTS.blend_ratio_tokens, _DEFAULTS.blend_ratio_beyond_share)
    return (_CHECK * placed + (18 - _CHECK) * recomputed) / 18


# The question pass (issue #18, third session), when configured, computes the question's tokens once more; with
# blend_long_question_pass (tenth session) only in blends of more than blend_ratio_tokens placed tokens.
BLEND_QUESTION_PASS = _DEFAULTS.blend_question_pass and _DEFAULTS.blend_selection_signal in ("question", "kv+question")
BLEND_LONG_QUESTION_PASS = _DEFAULTS.blend_long_question_pass and _DEFAULTS.blend_ratio_tokens is not None


def blend_question_pass(placed: int) -> bool:
    """Whether a blend of `placed` cached document tokens runs the question pass with the default settings."""
    return BLEND_QUESTION_PASS or (BLEND_LONG_QUESTION_PASS and placed > _DEFAULTS.blend_ratio_tokens)


@dataclass
class Request:
    tokens: list[int]
    chunks: list[list[int]] | None = None  # the documents, when the prompt is built from separable chunks
    node: int = 0  # which instance/node served it (cross-node traces): nodes share only a remote tier


@dataclass
class Advice:
    requests: int
    mean_prompt_tokens: float
    prefix_hit_rate: float  # share of prompt tokens prefix reuse would serve from the cache
    blend_hit_rate: float  # share of chunk tokens position-independent chunk reuse would serve
    unique_tokens: int
    predicted_ttft_s: dict[str, float]
    predicted_storage_gb: dict[str, float]
    config: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    nodes: int = 1
    local_hit_rate: float | None = None  # with several nodes: prefix reuse from each node's own tiers only


def _chain(tokens: list[int], chunk: int) -> list[bytes]:
    keys, prev = [], b""
    for s in range(0, len(tokens) - len(tokens) % chunk, chunk):
        prev = hashlib.blake2b(prev + repr(tokens[s : s + chunk]).encode(), digest_size=16).digest()
        keys.append(prev)
    return keys


def analyse(
    trace: list[Request],
    cost: CostModel,
    *,
    chunk_size: int = 256,
    gpu: bool = False,
    cpu_capacity_gb: float = 5.0,
    shared: bool = False,
    link_gbit: float = 10.0,
) -> Advice:
    """Recommend settings for a workload. `shared`: several instances or nodes should share the cache;
    `link_gbit`: the network to the shared tier (the remote codec is chosen for it)."""
    if not trace:
        raise ValueError("the trace holds no requests")
    seen_prefix: set[bytes] = set()
    seen_on_node: dict[int, set[bytes]] = {}
    nodes = len({r.node for r in trace})
    hit_local = 0
    seen_chunks: set[bytes] = set()
    prompt_tokens = hit_prefix = chunk_tokens = hit_blend = unique_chunk_tokens = 0
    ttft = {"no cache": 0.0}
    if len({r.node for r in trace}) > 1:
        ttft.update({"prefix reuse, each node alone": 0.0, "prefix reuse + shared remote tier": 0.0})
    else:
        ttft["prefix reuse"] = 0.0
    ttft[BLEND_LABEL] = 0.0
    for req in trace:
        n = len(req.tokens)
        prompt_tokens += n
        keys = _chain(req.tokens, chunk_size)
        hit = 0
        for k in keys:
            if k not in seen_prefix:
                break
            hit += chunk_size
        hit = min(hit, n - 1)
        seen_prefix.update(keys)
        hit_prefix += hit
        base = cost.recompute_s(n)
        ttft["no cache"] += base
        if nodes > 1:
            # Each node's own tiers hold what that node saw; the rest of the hit is on other nodes, reachable
            # only through a shared remote tier (at the remote tier's speed).
            own = seen_on_node.setdefault(req.node, set())
            local = 0
            for k in keys:
                if k not in own:
                    break
                local += chunk_size
            local = min(local, hit)
            own.update(keys)
            hit_local += local
            ttft["prefix reuse, each node alone"] += cost.recompute_s(n - local) + cost.load_s({"cpu": local})
            ttft["prefix reuse + shared remote tier"] += cost.recompute_s(n - hit) + cost.load_s(
                {"cpu": local, "redis": hit - local}
            )
        else:
            ttft["prefix reuse"] += cost.recompute_s(n - hit) + cost.load_s({"cpu": hit})
        blend_hit = first_seen = 0
        for chunk in req.chunks or []:
            key = hashlib.blake2b(repr(chunk).encode(), digest_size=16).digest()
            chunk_tokens += len(chunk)
            if key in seen_chunks:
                blend_hit += len(chunk)
            else:
                first_seen += len(chunk)
            seen_chunks.add(key)
        unique_chunk_tokens += first_seen
        hit_blend += blend_hit
        # CacheBlend: a request with less than BLEND_MIN_CACHED_SHARE of its document tokens cached is an exact
        # plain prefill (its documents computed after the first token, off the TTFT: issue #18); otherwise
        # the missing documents are computed in place with the question and the cached ones blended.
        if req.chunks and blend_hit >= BLEND_MIN_CACHED_SHARE * (blend_hit + first_seen) and blend_hit:
            question = n - sum(len(c) for c in req.chunks) if blend_question_pass(blend_hit) else 0
            blended = n - blend_hit + blend_placed_cost(blend_hit) + question
            ttft[BLEND_LABEL] += cost.recompute_s(blended) + cost.load_s({"cpu": blend_hit})
        else:
            ttft[BLEND_LABEL] += base  # cold, or no chunks: an ordinary prompt
    k = len(trace)
    # What the tiers would hold: every distinct prefix chunk, plus the distinct blend chunks.
    unique = len(seen_prefix) * chunk_size + unique_chunk_tokens
    gb_per_token = cost.kv_bytes_per_token / 1e9
    storage = {codec: unique * gb_per_token * bits / 32.0 for codec, bits in CODEC_BITS.items()}
    advice = Advice(
        requests=k,
        mean_prompt_tokens=prompt_tokens / k,
        prefix_hit_rate=hit_prefix / max(prompt_tokens, 1),
        blend_hit_rate=hit_blend / max(chunk_tokens, 1),
        unique_tokens=unique,
        predicted_ttft_s={m: t / k for m, t in ttft.items()},
        predicted_storage_gb=storage,
        nodes=nodes,
        local_hit_rate=hit_local / max(prompt_tokens, 1) if nodes > 1 else None,
    )
    _recommend(
        advice,
        cost,
        chunk_size=chunk_size,
        gpu=gpu,
        cpu_capacity_gb=cpu_capacity_gb,
        shared=shared,
        has_chunks=chunk_tokens > 0,
        link_bytes_per_s=link_gbit * 1e9 / 8,
    )
    return advice


def remote_codec(cost: CostModel, link_bytes_per_s: float) -> tuple[str, str]:
    """(codec, why) for a shared tier over a link of `link_bytes_per_s`: the one that loads a byte of KV
    soonest, fetch then decode, with the decode speeds measured here (issue #17). Codecs not measured are
    not candidates; without a measured cachegen, cachegen (the smallest) and a note."""
    value_bits = 8 * cost.kv_value_bytes
    times = {
        codec: min(1.0, CODEC_BITS[codec] / value_bits) / link_bytes_per_s + 1.0 / cost.codec_bytes_per_s[codec]
        for codec in CODEC_BITS
        if codec in cost.codec_bytes_per_s
    }
    link = f"{link_bytes_per_s * 8 / 1e9:g} Gbit/s"
    if "cachegen" not in times:
        return (
            "cachegen",
            f"(its decode speed here is not measured: it pays on links slower than its decoding, {link} assumed)",
        )
    best = min(times, key=times.get)
    speeds = ", ".join(f"{c} {cost.codec_bytes_per_s[c] / 1e6:.0f} MB/s" for c in times)
    per_gb = ", ".join(f"{c} {t * 1e9:.2f} s" for c, t in times.items())
    return best, f"over {link}, with decode speeds measured here ({speeds}), a GB of KV loads in: {per_gb}"


def _recommend(
    a: Advice, cost: CostModel, *, chunk_size, gpu, cpu_capacity_gb, shared, has_chunks, link_bytes_per_s
) -> None:
    cfg: dict = {"chunk_size": chunk_size, "guard": True, "local_cpu": True}
    why = a.reasons
    t = dict(a.predicted_ttft_s)
    if a.nodes > 1:
        # Several nodes: the prefix-reuse figure to weigh is the better of alone and shared.
        t["prefix reuse"] = min(t["prefix reuse, each node alone"], t["prefix reuse + shared remote tier"])
    gain_prefix = 1 - t["prefix reuse"] / t["no cache"]
    if a.mean_prompt_tokens < chunk_size:
        why.append(
            f"prompts average {a.mean_prompt_tokens:.0f} tokens, under one chunk: caching cannot pay; "
            "the guard skips them"
        )
        cfg["local_cpu"] = True
    elif gain_prefix > 0.05:
        why.append(
            f"prefix reuse serves {a.prefix_hit_rate:.0%} of prompt tokens: predicted TTFT "
            f"{t['no cache']:.2f} s -> {t['prefix reuse']:.2f} s"
        )
    else:
        why.append(f"prefix reuse would serve only {a.prefix_hit_rate:.0%} of prompt tokens: little to gain")
    if has_chunks and a.blend_hit_rate > a.prefix_hit_rate + 0.1 and t[BLEND_LABEL] < 0.8 * t["prefix reuse"]:
        cfg["enable_blending"] = True
        why.append(
            f"documents recur in other orders ({a.blend_hit_rate:.0%} of chunk tokens seen before, prefix "
            f"reuse {a.prefix_hit_rate:.0%}): CacheBlend, predicted TTFT {t[BLEND_LABEL]:.2f} s; {BLEND_QUALITY}"
        )
    need_gb = a.predicted_storage_gb["none"]
    if need_gb > cpu_capacity_gb:
        cfg.update(
            {
                "local_disk": "/var/cache/kvshelf",
                "local_disk_codec": "int8",
                "max_local_disk_size": round(a.predicted_storage_gb["int8"] * 1.5 + 1, 1),
            }
        )
        why.append(
            f"the reusable KV is {need_gb:.1f} GB raw, over the {cpu_capacity_gb:.0f} GB CPU tier: a disk "
            f"tier with int8 ({a.predicted_storage_gb['int8']:.1f} GB)"
        )
    if a.nodes > 1:
        alone, together = t["prefix reuse, each node alone"], t["prefix reuse + shared remote tier"]
        if together < 0.95 * alone:
            shared = True
            why.append(
                f"{a.nodes} nodes: each node alone reuses {a.local_hit_rate:.0%} of prompt tokens, a shared remote "
                f"tier {a.prefix_hit_rate:.0%}: predicted TTFT {alone:.2f} s -> {together:.2f} s"
            )
        else:
            why.append(
                f"{a.nodes} nodes, but a shared remote tier adds little ({a.local_hit_rate:.0%} -> "
                f"{a.prefix_hit_rate:.0%} of prompt tokens reused; predicted {alone:.2f} s -> {together:.2f} s)"
            )
    if shared:
        codec, codec_why = remote_codec(cost, link_bytes_per_s)
        cfg.update({"remote_url": "redis://cache-host:6379/0", "remote_serde": codec})
        why.append(
            f"instances share KV: a remote tier with {codec}, {a.predicted_storage_gb[codec]:.2f} GB of storage "
            f"{codec_why}"
            + (" (calibrated once per model; every instance needs the same .kvcal file)" if codec == "cachegen" else "")
        )
    if gpu and a.mean_prompt_tokens >= 8192:
        cfg.update({"use_layerwise": True, "buffer_size": 4})
        why.append(
            "long prompts on a GPU: layerwise loading overlaps the load with the compute "
            "(measured: BENCHMARKS.md, Layerwise loading)"
        )
    else:
        why.append(
            "layerwise loading off: it pays only on GPUs with long cached prefixes, and costs a little on a small "
            "CPU (BENCHMARKS.md, Layerwise loading)"
        )
    a.config = cfg


SCENARIOS = ("short-chat", "long-rag", "multi-turn", "cross-node")
CROSS_NODE_NODES = 4
_REMOVED = {
    "disaggregated": "kvshelf has no prefill/decode disaggregation (LMCache's PD over NIXL), so there is nothing "
    "to advise for it; `--scenario cross-node` covers instances that share KV through a remote tier",
}


def synthetic_trace(scenario: str, *, requests: int = 20, seed: int = 0) -> list[Request]:
    """Token traces shaped like common workloads (tests, and `kvshelf advise --scenario`)."""
    import random

    rng = random.Random(seed)

    def words(n):
        return [rng.randrange(10, 50000) for _ in range(n)]

    if scenario == "short-chat":
        return [Request(words(rng.randrange(20, 120))) for _ in range(requests)]
    if scenario == "long-rag":
        docs = [words(600) for _ in range(8)]
        trace = []
        for _ in range(requests):
            picked = rng.sample(docs, 4)
            trace.append(Request([2] + [t for d in picked for t in d] + words(30), chunks=picked))
        return trace
    if scenario == "cross-node":
        # A few long shared contexts (system prompts, documents), each asked about many times; a load
        # balancer sends requests to the nodes round-robin, so a node often meets a context first seen
        # on another node.
        contexts = [[2] + words(1500) for _ in range(3)]
        return [
            Request(contexts[i % len(contexts)] + words(40), node=(i * 7 + i // 3) % CROSS_NODE_NODES)
            for i in range(requests)
        ]
    if scenario == "multi-turn":
        system, history, trace = words(400), [], []
        for _ in range(requests):
            history += words(60)
            trace.append(Request([2] + system + history))
            history += words(80)
        return trace
    check_scenario(scenario)
    raise AssertionError(scenario)


def check_scenario(scenario: str) -> None:
    """A ValueError naming the problem unless `scenario` is one of SCENARIOS."""
    if scenario in _REMOVED:
        raise ValueError(f"scenario {scenario!r} was removed: {_REMOVED[scenario]}")
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")


def summary_stats(trace: list[Request]) -> dict:
    lengths = [len(r.tokens) for r in trace]
    return {"requests": len(trace), "median_tokens": statistics.median(lengths), "max_tokens": max(lengths)}
