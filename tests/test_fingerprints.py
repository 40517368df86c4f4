"""Fingerprints that mean what they say: every weight byte counts, hashed once per file set; a hub model is
pinned by its snapshot commit, never by its name."""

import os

import huggingface_hub.constants
import pytest

from kvshelf.errors import ConfigError
from kvshelf.integrations.vllm import shared


def checkpoint(folder, size=4 << 20):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * (size // 256))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def test_a_local_folder_is_hashed_in_full(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path / "cache"))
    a = checkpoint(tmp_path / "a")
    b = checkpoint(tmp_path / "b")
    data = bytearray((b / "model.safetensors").read_bytes())
    data[200 << 10] ^= 1  # one byte between the 64 KiB windows the old digest sampled
    (b / "model.safetensors").write_bytes(bytes(data))
    assert shared.weights_digest(str(a), None) != shared.weights_digest(str(b), None)
    assert shared.weights_digest(str(a), None) == shared.weights_digest(str(checkpoint(tmp_path / "c")), None)


def test_a_folder_digest_is_remembered_until_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path / "cache"))
    folder = checkpoint(tmp_path / "m")
    first = shared.weights_digest(str(folder), None)
    calls = []
    real = shared.hash_files
    monkeypatch.setattr(shared, "hash_files", lambda paths: calls.append(1) or real(paths))
    assert shared.weights_digest(str(folder), None) == first and not calls
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # touched
    assert shared.weights_digest(str(folder), None) == first and len(calls) == 1  # same bytes, hashed again


def test_a_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no weight files"):
        shared.weights_digest(str(tmp_path / "empty"), None)


def test_a_hub_id_is_pinned_by_its_snapshot_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--tiny"
    for commit, ref in (("a" * 40, "main"), ("b" * 40, "v2")):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    assert shared.weights_digest("org/tiny", None) == f"hub:org/tiny@{'a' * 40}"
    assert shared.weights_digest("org/tiny", "v2") == f"hub:org/tiny@{'b' * 40}"
    with pytest.raises(ConfigError, match="cannot pin the weights"):
        shared.weights_digest("org/absent", None)
