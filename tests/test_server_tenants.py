"""Tenants: keys map to tenants, salts are derived on the server, a client salt never replaces them;
cached-token details, /metrics and remote clears are for those allowed to see or do them."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml
from serving import RunningServer, make_shelf

from kvshelf.config import KVShelfConfig
from kvshelf.errors import ConfigError
from kvshelf.server.tenants import Tenant, Tenants, load_keys_file

ALICE, BOB, ROOT = "alice-key-0001", "bob-key-00002", "admin-key-0003"
DOC = "The quick brown fox jumps over the lazy dog. " * 2


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(yaml.safe_dump({ALICE: "alice", BOB: {"tenant": "bob"}, ROOT: {"tenant": "ops", "admin": True}}))
    return str(path)


@pytest.fixture(scope="module")
def server(keys_file):
    with RunningServer(make_shelf(api_key=None, api_keys_file=keys_file, tenant_secret="s3cret")) as running:
        yield running


def ask(server, key: str, prompt: str = DOC, **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, **extra}
    return httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, json=body)


def hits(server, key: str, prompt: str = DOC, **extra) -> int:
    r = ask(server, key, prompt, **extra)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["kvshelf"]["hit_tokens"]


def test_tenants_never_share_kv_and_a_client_salt_cannot_reach_another_tenant(server):
    server.shelf.engine.clear()
    prompt = DOC + "tenancy"
    assert hits(server, ALICE, prompt) == 0
    assert hits(server, ALICE, prompt) > 0  # alice's own reuse works
    assert hits(server, BOB, prompt) == 0  # bob does not see alice's prompt cached
    # a client salt is combined with the tenant's salt: the same client salt in two tenants differs, and
    # neither equals the tenant's plain salt
    assert hits(server, BOB, prompt, cache_salt="team") == 0
    assert hits(server, ALICE, prompt, cache_salt="team") == 0
    assert hits(server, ALICE, prompt, cache_salt="team") > 0
    assert ask(server, "no-such-key-123").status_code == 401


def test_salts_are_keyed_by_the_server_secret():
    a = Tenants(KVShelfConfig(tenant_secret="one"))
    b = Tenants(KVShelfConfig(tenant_secret="two"))
    alice = Tenant("alice")
    assert a.salt(alice, None) != b.salt(alice, None)
    assert a.salt(alice, None) == Tenants(KVShelfConfig(tenant_secret="one")).salt(alice, None)
    assert a.salt(alice, "x") != a.salt(alice, None) != a.salt(Tenant("bob"), None)
    assert a.salt(Tenant("a"), "bc") != a.salt(Tenant("ab"), "c")  # no ambiguity from concatenation


def test_metrics_and_stats_need_an_admin_key_and_clear_touches_local_tiers_only(server):
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {BOB}"}).status_code == 403
    r = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ROOT}"})
    assert r.status_code == 200 and "kvshelf_hit_tokens_total" in r.text
    for path in ("/api/v1/cache/stats", "/api/v1/layerwise/stats"):
        assert httpx.get(server.url + path, headers={"Authorization": f"Bearer {BOB}"}).status_code == 403
        assert httpx.get(server.url + path, headers={"Authorization": f"Bearer {ROOT}"}).status_code == 200
    bob = {"Authorization": f"Bearer {BOB}"}
    assert httpx.post(server.url + "/api/v1/cache/clear", headers=bob).json() == {"cleared": ["cpu"]}
    denied = httpx.post(server.url + "/api/v1/cache/clear", headers=bob, json={"remote": True})
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    root = {"Authorization": f"Bearer {ROOT}"}
    assert httpx.post(server.url + "/api/v1/cache/clear", headers=root, json={"remote": True}).status_code == 200


def test_clear_leaves_the_shared_remote_tier_unless_an_admin_asks(redis_server, keys_file):
    shelf = make_shelf(api_key=None, api_keys_file=keys_file, tenant_secret="s3cret", remote_url=redis_server.url)
    with RunningServer(shelf) as s:
        bob, root = {"Authorization": f"Bearer {BOB}"}, {"Authorization": f"Bearer {ROOT}"}
        prompt = DOC + "remote clear"
        assert hits(s, BOB, prompt) == 0
        shelf.engine.backend.flush()
        assert httpx.post(s.url + "/api/v1/cache/clear", headers=bob).json() == {"cleared": ["cpu"]}
        assert hits(s, BOB, prompt) > 0  # still in Redis, which other instances share
        cleared = httpx.post(s.url + "/api/v1/cache/clear", headers=root, json={"remote": True}).json()
        assert cleared == {"cleared": ["cpu", "redis"]}
        assert hits(s, BOB, prompt) == 0


def test_usage_details_only_when_enabled():
    with RunningServer(make_shelf(usage_details=False)) as s:
        r = httpx.post(
            s.url + "/v1/completions",
            headers={"Authorization": "Bearer test-key"},
            json={"prompt": DOC, "max_tokens": 1},
        )
        usage = r.json()["usage"]
        assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_metrics_on_their_own_port_leave_the_api_port():
    import socket

    from kvshelf.server import start_metrics_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    shelf = make_shelf(server_metrics_port=port, api_key=None)
    with RunningServer(shelf) as s:
        assert httpx.get(s.url + "/metrics").status_code == 404
        stop = start_metrics_server(shelf.config, s.metrics)
        try:
            httpx.post(s.url + "/v1/completions", json={"prompt": DOC, "max_tokens": 1}).raise_for_status()
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            assert 'kvshelf_requests_total{endpoint="completions"} 1.0' in text
        finally:
            stop()


def test_bad_keys_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "keys.yaml"
    bad.write_text("short: alice\n")
    with pytest.raises(ConfigError, match="8 characters"):
        load_keys_file(str(bad))
    bad.write_text(f"{ALICE}: {{tenant: alice, role: x}}\n")
    with pytest.raises(ConfigError, match="unknown fields"):
        load_keys_file(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        load_keys_file(str(tmp_path / "missing.yaml"))
    good = tmp_path / "keys.json"
    good.write_text(json.dumps({ALICE: {"tenant": "alice", "admin": True}}))
    assert load_keys_file(str(good)) == {ALICE: Tenant("alice", admin=True)}


def test_without_a_configured_secret_salts_survive_a_restart(tmp_path, monkeypatch):
    """The host's own secret is made once (0600) and read again, so disk KV is found after a restart."""
    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path))
    alice = Tenant("alice")
    first = Tenants(KVShelfConfig()).salt(alice, None)
    assert Tenants(KVShelfConfig()).salt(alice, None) == first
    secret = tmp_path / "server" / "tenant_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path / "other-host"))
    assert Tenants(KVShelfConfig()).salt(alice, None) != first
