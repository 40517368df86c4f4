"""Alert rules and dashboard are valid and use only metrics kvshelf exports; the prefix is configurable."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from helpers import key, make_chunk

from kvshelf.cache.engine import CacheEngine
from kvshelf.cache.fingerprint import ModelFingerprint
from kvshelf.codecs import get_codec
from kvshelf.metrics import Metrics
from kvshelf.storage.disk import DiskBackend
from kvshelf.storage.memory import MemoryBackend
from kvshelf.storage.tiers import TierManager

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "kvshelf-dashboard.json"
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}


def exported_names(prefix: str, tmp_path) -> set[str]:
    m = Metrics(prefix)
    fp = ModelFingerprint("m", "w", "float32", 3, 2, 8)
    tiers = TierManager([MemoryBackend(1 << 20), DiskBackend(tmp_path, 1 << 20, get_codec("int8"))])
    m.watch_engine(CacheEngine(fp, tiers, chunk_size=16))
    names = set()
    for family in m.registry.collect():
        names |= {family.name + s for s in SUFFIXES.get(family.type, [""])}
    tiers.close()
    return names


def referenced_names() -> set[str]:
    exprs = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    exprs += [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    return {n for e in exprs for n in re.findall(r"\bkvshelf_[a-z_]+", e)}


def test_promtool_accepts_the_rules():
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: scripts/test installs Debian's prometheus package"
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_metric_in_rules_and_dashboard_is_exported(tmp_path):
    used = referenced_names()
    assert {
        "kvshelf_decompression_duration_seconds_bucket",
        "kvshelf_blend_hits_total",
        "kvshelf_layerwise_load_latency_seconds_bucket",
        "kvshelf_compression_ratio",
    } <= used
    missing = used - exported_names("kvshelf_", tmp_path)
    assert not missing, f"used in rules/dashboard but not exported: {sorted(missing)}"


def test_lmcache_prefix(tmp_path):
    names = exported_names("lmcache_", tmp_path)
    assert "lmcache_hit_tokens_total" in names and "lmcache_compression_ratio" in names
    assert not any(n.startswith("kvshelf_") for n in names)


def test_codec_metrics_record_real_traffic(tmp_path):
    m = Metrics()
    disk = DiskBackend(tmp_path, 1 << 24, get_codec("int8"), metrics=m)
    disk.put(key(1), make_chunk(tokens=256))  # a chunk's usual size: the header (a digest per layer) amortised
    disk.get(key(1))
    ratio = m.registry.get_sample_value("kvshelf_compression_ratio", {"codec": "int8"})
    assert 3.0 < ratio < 4.0  # fp32 -> int8 plus scales and header
    assert m.registry.get_sample_value("kvshelf_decompression_duration_seconds_count", {"codec": "int8"}) == 1


def test_promtool_unit_tests_fire_the_alerts_on_their_series():
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: scripts/test installs Debian's prometheus package"
    tests = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
    proc = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_request_level_counts_replace_the_engine_lookup_counts(tmp_path):
    from kvshelf.cache.requests import RequestStats

    m = Metrics("kvshelf_")
    fp = ModelFingerprint("m", "w", "float32", 3, 2, 8)
    tiers = TierManager([MemoryBackend(1 << 20)])
    requests = RequestStats()
    m.watch_engine(CacheEngine(fp, tiers, chunk_size=16), requests)
    requests.record(100, 40, "looked_up")
    requests.record(10, 0, "short_prompt")
    get = m.registry.get_sample_value
    assert get("kvshelf_requested_tokens_total", {"reason": "looked_up"}) == 100
    assert get("kvshelf_requested_tokens_total", {"reason": "short_prompt"}) == 10
    assert get("kvshelf_hit_tokens_total") == 40
    assert get("kvshelf_lookup_requested_tokens_total") == 0  # the engine was never asked
    tiers.close()
