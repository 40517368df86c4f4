"""Start-up: an unusable disk path is a one-line error; an unreachable remote tier is one warning line."""

from __future__ import annotations

import logging
import os

import pytest

from kvshelf.assembly.tiers import build_tiers, check_disk_path
from kvshelf.config import KVShelfConfig
from kvshelf.errors import ConfigError


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda tmp: "/proc/kvshelf-cache", "under /proc"),
        (lambda tmp: "/sys/fs/kvshelf", "under /sys"),
        (lambda tmp: (tmp / "file.txt", (tmp / "file.txt").write_text("x"))[0] / "cache", "which is a file"),
        (lambda tmp: (tmp / "plain", (tmp / "plain").write_text("x"))[0], "is a file"),
    ],
)
def test_unusable_disk_paths_are_one_line_errors(tmp_path, make, words):
    path = str(make(tmp_path))
    with pytest.raises(ConfigError) as caught:
        build_tiers(KVShelfConfig(local_disk=path))
    message = str(caught.value)
    assert words in message and "\n" not in message and message.startswith("local_disk:")


def test_a_read_only_folder_is_refused(tmp_path, monkeypatch):
    # Tests run as root here, which may write anywhere: the permission answer is what is simulated.
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    with pytest.raises(ConfigError, match="not writable"):
        check_disk_path(str(ro / "cache"))


def test_a_good_disk_path_passes(tmp_path):
    assert check_disk_path(f"file://{tmp_path}/new/cache") == tmp_path / "new" / "cache"


def test_an_unreachable_remote_tier_is_one_warning_line(caplog):
    with socket_closed_port() as port:
        config = KVShelfConfig(
            remote_url=f"redis://:secretpw@127.0.0.1:{port}/0", remote_timeout_s=0.5, remote_auth_key="k" * 32
        )
        with caplog.at_level(logging.WARNING, logger="kvshelf.assembly.tiers"):
            tiers = build_tiers(config)
    try:
        lines = [r.getMessage() for r in caplog.records if r.name == "kvshelf.assembly.tiers"]
        assert len(lines) == 1 and "unreachable at start-up" in lines[0] and "\n" not in lines[0]
        assert "secretpw" not in lines[0]
        assert [t.name for t in tiers.tiers] == ["cpu", "redis"]  # still used: it may come back
    finally:
        tiers.close()


def test_a_reachable_remote_tier_is_quiet(redis_server, caplog):
    with caplog.at_level(logging.WARNING, logger="kvshelf.assembly.tiers"):
        tiers = build_tiers(KVShelfConfig(remote_url=redis_server.url, remote_auth_key="k" * 32))
    tiers.close()
    assert not [r for r in caplog.records if r.name == "kvshelf.assembly.tiers"]


class socket_closed_port:
    """A loopback port nobody listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        return False
