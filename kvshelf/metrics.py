"""Prometheus metrics under one configurable prefix (`kvshelf_` by default, `lmcache_` for LMCache rules).

One `Metrics` per shelf: the assembly (kvshelf/assembly) makes it and passes it down to whatever
observes events (codec timings, layer loads, blend lookups, bypasses, requests); totals that the engine
and tiers already count are read at scrape time by a collector, so nothing is counted twice. Two shelves
in one process have two registries and never see each other's series.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


class Metrics:
    def __init__(self, prefix: str = "kvshelf_"):
        self.prefix = prefix
        self.registry = CollectorRegistry()
        p, r = prefix, self.registry
        self.compression_seconds = Histogram(
            p + "compression_duration_seconds",
            "Time to encode one chunk for a tier",
            ["codec"],
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.decompression_seconds = Histogram(
            p + "decompression_duration_seconds",
            "Time to verify and decode one chunk from a tier",
            ["codec"],
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.codec_raw_bytes = Counter(p + "codec_input_bytes", "KV bytes handed to a codec", ["codec"], registry=r)
        self.codec_encoded_bytes = Counter(p + "codec_output_bytes", "Bytes a codec produced", ["codec"], registry=r)
        self.compression_ratio = Gauge(
            p + "compression_ratio", "KV bytes / stored bytes since start, per codec", ["codec"], registry=r
        )
        self.layerwise_load_latency = Histogram(
            p + "layerwise_load_latency_seconds",
            "Time the model waited for one layer's KV",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.blend_lookups = Counter(p + "blend_lookups", "Documents looked up for blending", registry=r)
        self.blend_hits = Counter(p + "blend_hits", "Blend document lookups that hit", registry=r)
        self.blend_fallbacks = Counter(
            p + "blend_fallbacks",
            "Blended requests served by an exact prefill: first answer token below blend_fallback_margin",
            registry=r,
        )
        self.bypasses = Counter(p + "bypasses", "Requests or chunks that skipped the cache", ["reason"], registry=r)
        self.load_failures = Counter(
            p + "load_failures", "Cached KV loads that failed; the tokens were recomputed", ["integration"], registry=r
        )
        self.requests = Counter(p + "requests", "Generation requests", ["endpoint"], registry=r)
        self.request_errors = Counter(p + "request_errors", "Requests that failed", ["endpoint"], registry=r)
        self.rejected_requests = Counter(
            p + "rejected_requests", "Requests refused before generation", ["reason"], registry=r
        )
        self.cancelled_requests = Counter(p + "cancelled_requests", "Requests stopped early", ["reason"], registry=r)
        self.ttft_seconds = Histogram(
            p + "time_to_first_token_seconds", "Request start to first token", registry=r, buckets=_TTFT_BUCKETS
        )
        self._ratio_lock = threading.Lock()
        self._codec_totals: dict[str, list[float]] = {}

    def observe_codec(self, codec: str, direction: str, seconds: float, raw_bytes: int, encoded_bytes: int):
        if direction == "encode":
            self.compression_seconds.labels(codec).observe(seconds)
            self.codec_raw_bytes.labels(codec).inc(raw_bytes)
            self.codec_encoded_bytes.labels(codec).inc(encoded_bytes)
            with self._ratio_lock:
                totals = self._codec_totals.setdefault(codec, [0.0, 0.0])
                totals[0] += raw_bytes
                totals[1] += encoded_bytes
                self.compression_ratio.labels(codec).set(totals[0] / max(totals[1], 1))
        else:
            self.decompression_seconds.labels(codec).observe(seconds)

    def watch_engine(self, engine, requests=None) -> None:
        """Export the engine's and its tiers' own counters at scrape time. With `requests` (a
        RequestStats), requested/hit tokens are counted per request, bypasses included, and the engine's
        own lookup counts become lookup_requested_tokens / lookup_hit_tokens."""
        self.registry.register(_EngineCollector(self.prefix, engine, requests))


class _EngineCollector:
    def __init__(self, prefix: str, engine, requests=None):
        self.prefix = prefix
        self.engine = engine
        self.requests = requests

    def _request_families(self):
        p, r = self.prefix, self.requests.as_dict()
        requested = CounterMetricFamily(
            p + "requested_tokens",
            "Prompt tokens of every request; reason: looked_up, or why the cache was not asked",
            labels=["reason"],
        )
        for reason, v in r["by_reason"].items():
            requested.add_metric([reason], v["tokens"])
        yield requested
        yield CounterMetricFamily(p + "hit_tokens", "Prompt tokens whose KV came from the cache", value=r["hit_tokens"])

    def collect(self):
        p = self.prefix
        s = self.engine.stats
        lookup = "lookup_" if self.requests is not None else ""
        if self.requests is not None:
            yield from self._request_families()
        for name, value, doc in [
            (lookup + "requested_tokens", s.requested_tokens, "Prompt tokens looked up in the cache"),
            (lookup + "hit_tokens", s.hit_tokens, "Looked-up prompt tokens whose KV came from the cache"),
            ("stored_tokens", s.stored_tokens, "Tokens whose KV a tier accepted (write-behind may drop it later)"),
            ("retrieved_bytes", s.retrieved_bytes, "KV bytes loaded from the cache"),
            ("rejected_chunks", s.rejected_chunks, "Cached chunks that failed verification"),
        ]:
            yield CounterMetricFamily(p + name, doc, value=value)
        tiers = self.engine.backend.stats()
        families = {
            "usage": GaugeMetricFamily(p + "tier_usage_bytes", "Bytes held by a tier", labels=["tier"]),
            "capacity": GaugeMetricFamily(p + "tier_capacity_bytes", "Byte capacity of a tier", labels=["tier"]),
            "breaker": GaugeMetricFamily(p + "tier_breaker_open", "1 while a tier's breaker is open", labels=["tier"]),
        }
        counters = {
            field: CounterMetricFamily(p + f"tier_{field}", doc, labels=["tier"])
            for field, doc in [
                ("hits", "Chunk reads that hit in a tier"),
                ("misses", "Chunk reads that missed in a tier"),
                ("errors", "Tier calls that failed (refused, timeout, I/O error)"),
                ("puts", "Chunk writes a tier completed"),
                ("dropped_writes", "Writes a tier never got (full queue, open breaker, error)"),
                ("corrupt_objects", "Stored objects that failed verification and were deleted"),
                ("promotions", "Chunks copied up into a tier from a lower one"),
            ]
        }
        for tier, t in tiers.items():
            if t["used_bytes"] is not None:
                families["usage"].add_metric([tier], t["used_bytes"])
            if t["capacity_bytes"] is not None:
                families["capacity"].add_metric([tier], t["capacity_bytes"])
            families["breaker"].add_metric([tier], 1.0 if t["breaker_open"] else 0.0)
            for field, family in counters.items():
                family.add_metric([tier], t[field])
        yield from families.values()
        yield from counters.values()
