"""Generation over real tiers while they fail: every output must equal plain recompute (0 wrong outputs)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from services import RedisServer, S3Server

from kvshelf.assembly.tiers import build_tiers
from kvshelf.cache.engine import CacheEngine
from kvshelf.codecs import get_codec
from kvshelf.config import KVShelfConfig, load_config
from kvshelf.errors import ConfigError
from kvshelf.generation import CachedGenerator
from kvshelf.model.runner import ModelRunner
from kvshelf.storage.disk import DiskBackend
from kvshelf.storage.redis import RedisBackend
from kvshelf.storage.s3 import S3Backend
from kvshelf.storage.tiers import TierManager

RAW = get_codec("none")


def prompts(n: int, length: int = 48) -> list[list[int]]:
    g = torch.Generator().manual_seed(42)
    docs = [torch.randint(4, 320, (length,), generator=g).tolist() for _ in range(3)]
    return [docs[i % 3] + torch.randint(4, 320, (5,), generator=g).tolist() for i in range(n)]


def generator(model, tiers) -> CachedGenerator:
    runner = ModelRunner(model)
    return CachedGenerator(runner, CacheEngine(runner.fingerprint(), tiers, chunk_size=16))


def plain_outputs(model, batch):
    gen = CachedGenerator(ModelRunner(model), None)
    return [gen.generate(p, max_new_tokens=6, stop_at_eos=False).token_ids for p in batch]


def test_redis_killed_mid_run_and_restarted(tmp_path, tiny_models):
    model = tiny_models("qwen2")
    batch = prompts(18)
    expected = plain_outputs(model, batch)
    server = RedisServer(tmp_path / "redis").start()
    tiers = TierManager([RedisBackend(server.url, RAW, timeout_s=0.5)], breaker_failures=2, breaker_reset_s=0.2)
    gen = generator(model, tiers)
    wrong, hits = 0, []
    try:
        for i, p in enumerate(batch):
            if i == 6:
                server.kill()
            if i == 12:
                server.start()  # same port, empty: the breaker lets a trial through after its cool-down
                import time

                time.sleep(0.3)
            out = gen.generate(p, max_new_tokens=6, stop_at_eos=False)
            tiers.flush()
            wrong += out.token_ids != expected[i]
            hits.append(out.hit_tokens)
    finally:
        server.kill()
        tiers.close()
    assert wrong == 0
    s = tiers.stats()["redis"]
    assert s["errors"] >= 2 and s["skipped"] > 0
    assert any(hits[3:6]) and not any(hits[6:12]) and any(hits[15:])  # hits before, none while down, after


def test_corrupted_redis_values_and_disk_files_never_give_wrong_output(tmp_path, tiny_models, redis_server):
    model = tiny_models("gemma3")
    batch = prompts(9)
    expected = plain_outputs(model, batch)
    redis_tier = RedisBackend(redis_server.url, RAW, prefix="fault:")
    disk_tier = DiskBackend(tmp_path / "disk", 1 << 30, RAW)
    for tiers_list in ([redis_tier], [disk_tier]):
        tiers = TierManager(tiers_list)
        gen = generator(model, tiers)
        wrong = 0
        for i, p in enumerate(batch):
            out = gen.generate(p, max_new_tokens=6, stop_at_eos=False)
            tiers.flush()
            wrong += out.token_ids != expected[i]
            if i % 3 == 2:  # damage every stored object: flip bytes in Redis, truncate files on disk
                if tiers_list[0] is redis_tier:
                    client = redis_server.client()
                    for k in client.scan_iter(match="fault:*"):
                        v = bytearray(client.get(k))
                        v[-1] ^= 0xFF
                        client.set(k, bytes(v))
                else:
                    for f in (tmp_path / "disk").glob("*/*.kvs"):
                        f.write_bytes(f.read_bytes()[:-10])
        assert wrong == 0
        assert tiers_list[0].corrupt_objects > 0
    redis_tier.clear()


def test_s3_down_is_a_miss(tmp_path, tiny_models):
    import boto3
    from services import s3_env

    s3_env()
    server = S3Server().start()
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="kvshelf")
    model = tiny_models("llama")
    batch = prompts(6)
    expected = plain_outputs(model, batch)
    tiers = TierManager(
        [S3Backend.from_url(f"s3://kvshelf/x?endpoint={server.endpoint}", RAW, timeout_s=0.5)], breaker_reset_s=60
    )
    gen = generator(model, tiers)
    outs = []
    for i, p in enumerate(batch):
        if i == 3:
            server.kill()
        outs.append(gen.generate(p, max_new_tokens=6, stop_at_eos=False))
        tiers.flush()
    tiers.close()
    assert [o.token_ids for o in outs] == expected
    assert outs[1].hit_tokens == 0 and outs[2].hit_tokens == 0 and outs[0].hit_tokens == 0
    assert tiers.stats()["s3"]["errors"] >= 1


CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    from conftest import build_tiny_model
    from kvshelf.cache.engine import CacheEngine
    from kvshelf.codecs import get_codec
    from kvshelf.generation import CachedGenerator
    from kvshelf.model.runner import ModelRunner
    from kvshelf.storage.redis import RedisBackend
    from kvshelf.storage.tiers import TierManager
    runner = ModelRunner(build_tiny_model("llama"))
    tiers = TierManager([RedisBackend({url!r}, get_codec("int8"), prefix="share:")])
    gen = CachedGenerator(runner, CacheEngine(runner.fingerprint(), tiers, chunk_size=16))
    out = []
    for p in json.loads(sys.argv[1]):
        r = gen.generate(p, max_new_tokens=6, stop_at_eos=False)
        out.append({{"hit": r.hit_tokens, "ids": r.token_ids}})
    tiers.close()
    print(json.dumps(out))
    """
)


def test_two_processes_share_chunks_through_a_redis_cluster(redis_cluster, tiny_models):
    batch = prompts(3, length=64)
    script = CHILD.format(tests=str(Path(__file__).parent), url=redis_cluster.url)

    def run():
        proc = subprocess.run(
            [sys.executable, "-c", script, json.dumps(batch)], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert [r["hit"] for r in first] == [0, 0, 0]
    assert [r["hit"] for r in second] == [68, 68, 68]  # the second process finds the first one's chunks
    expected = plain_outputs(tiny_models("llama"), batch)
    assert [r["ids"] for r in first] == expected
    assert [r["ids"] for r in second] == expected  # int8 on the remote tier, still the same greedy output


def test_factory_builds_the_configured_stack(tmp_path, redis_server):
    tiers = build_tiers(KVShelfConfig(local_disk=f"file://{tmp_path}", remote_url=redis_server.url))
    assert [t.name for t in tiers.tiers] == ["cpu", "disk", "redis"]
    assert tiers.tiers[1].backend.codec.name == "int8" and tiers.tiers[2].backend.codec.name == "int8"
    tiers.close()
    assert build_tiers(KVShelfConfig(local_cpu=False)) is None
    with pytest.raises(ConfigError, match="remote_url"):
        build_tiers(KVShelfConfig(remote_url="ftp://x"))
    with pytest.raises(ConfigError, match="remote_serde"):
        load_config(environ={}, overrides={"remote_serde": "zip"})
