"""Real services for tests, started on loopback ports: Debian's redis-server (single node and a 3-master
cluster), an S3 endpoint (moto in server mode). They are never mocked and never skipped: a missing binary fails the test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, fixed by Redis) is a valid port and free too: an
    ephemeral port above 55535 makes a cluster node exit at start."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000) for a redis cluster node")


def redis_bin(name: str = "redis-server") -> str:
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: install Debian's redis-server and redis-tools (.ci/run does)")
    return found


def wait_for(check, timeout_s: float = 15.0, what: str = "service"):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as err:  # not up yet
            last = err
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up in {timeout_s} s (last error: {last})")


class RedisServer:
    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        extra_args: list[str] | None = None,
        password: str | None = None,
        pick_port=free_port,
    ):
        self.workdir = workdir
        self.pick_port = pick_port
        self.port = port or pick_port()
        self.password = password
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, *, attempts: int = 3) -> RedisServer:
        for attempt in range(attempts):
            args = [
                redis_bin(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *self.extra_args,
            ]
            if self.password:
                args += ["--requirepass", self.password]
            log = open(self.workdir / "server.log", "ab")  # noqa: SIM115 - kept open for the server's life
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
            client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password)

            def up(client=client):
                if self.proc.poll() is not None:  # died, e.g. the port was taken meanwhile
                    raise ProcessLookupError(f"redis-server exited with {self.proc.returncode}")
                return client.ping()

            try:
                wait_for(up, what=f"redis-server on port {self.port}")
                return self
            except RuntimeError:
                self.kill()
                if attempt == attempts - 1:
                    raise
                self.port = self.pick_port()
            finally:
                client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)


class RedisCluster:
    def __init__(self, workdir: Path, masters: int = 3):
        self.nodes = [
            RedisServer(
                workdir / f"node{i}",
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
                pick_port=free_cluster_port,
            )
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                redis_bin("redis-cli"),
                "--cluster",
                "create",
                *[f"127.0.0.1:{n.port}" for n in self.nodes],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        for node in self.nodes:
            wait_for(lambda n=node: n.client().cluster("info")["cluster_state"] == "ok", 30, what="redis cluster")
        return self

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


class S3Server:
    """moto's S3-compatible HTTP server in its own process."""

    def __init__(self):
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        exe = Path(sys.executable).with_name("moto_server")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        self.proc = subprocess.Popen(
            [*cmd, "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        import urllib.request

        wait_for(lambda: urllib.request.urlopen(self.endpoint, timeout=1).status == 200, what="moto S3 server")
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def s3_env() -> None:
    # moto accepts any credentials; boto3 only needs some to sign requests.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
