"""A real kvshelf server on loopback (uvicorn in a thread) over a tiny model, for the server tests."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from conftest import build_tiny_model, tiny_tokenizer

from kvshelf.advice.cost import CostModel
from kvshelf.advice.guard import Guard
from kvshelf.assembly import Owned, Shelf, build_engine
from kvshelf.config import KVShelfConfig
from kvshelf.generation import CachedGenerator
from kvshelf.model.loader import LoadedModel
from kvshelf.model.runner import ModelRunner
from kvshelf.server import uvicorn_config
from kvshelf.server.app import create_app

KEY = "test-key"


def make_shelf(*, guard: bool = False, **overrides) -> Shelf:
    settings = dict(chunk_size=16, served_model_name="tiny", api_key=KEY, usage_details=True)
    settings.update(overrides)
    config = KVShelfConfig(**settings)
    runner = ModelRunner(build_tiny_model("llama"))
    tok = tiny_tokenizer()
    owned = Owned.for_config(config)
    engine = build_engine(config, runner, owned=owned)
    rules = (
        Guard(CostModel.for_runner(runner), min_tokens=config.min_cached_tokens or 16, metrics=owned.metrics)
        if guard
        else None
    )
    gen = CachedGenerator(runner, engine, tok, guard=rules)
    return Shelf(config, LoadedModel(runner, tok, Path("tiny")), engine, gen, owned)


class SlowModel:
    """Adds `delay` seconds to every forward pass of the shelf's model and counts the passes."""

    def __init__(self, shelf: Shelf, delay: float = 0.0):
        self.delay, self.calls = delay, 0
        forward = shelf.runner.forward

        def slow(*args, **kwargs):
            self.calls += 1
            time.sleep(self.delay)
            return forward(*args, **kwargs)

        shelf.runner.forward = slow


class RunningServer:
    def __init__(self, shelf: Shelf):
        self.shelf = shelf
        self.metrics = shelf.metrics  # the shelf's own set, as `kvshelf serve` does
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        app = create_app(shelf, self.metrics)
        self.server = uvicorn_config_server(app, shelf.config, self.port)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sample(self, name: str, labels: dict | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0

    def wait_for(self, name: str, labels: dict | None, value: float, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.sample(name, labels) < value:
            assert time.monotonic() < deadline, f"{name}{labels} stayed at {self.sample(name, labels)}, not {value}"
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def uvicorn_config_server(app, config, port):
    import uvicorn

    return uvicorn.Server(uvicorn_config(app, config, port=port, host="127.0.0.1", log_level="warning"))
