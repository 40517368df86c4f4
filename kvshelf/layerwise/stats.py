"""Per-layer load statistics, summed over requests, for the stats endpoint."""

from __future__ import annotations

import threading


class LayerwiseStats:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._lock = threading.Lock()
        self.requests = 0
        self.fallbacks = 0  # loads that failed mid-way and were recomputed instead
        self.load_s = [0.0] * num_layers  # loader thread: fetch, decode and copy of the layer
        self.wait_s = [0.0] * num_layers  # model runner: time blocked waiting for the layer
        self.bytes = [0] * num_layers

    def record(self, layer: int, *, load_s: float = 0.0, wait_s: float = 0.0, nbytes: int = 0) -> None:
        with self._lock:
            self.load_s[layer] += load_s
            self.wait_s[layer] += wait_s
            self.bytes[layer] += nbytes

    def count(self, *, requests: int = 0, fallbacks: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.fallbacks += fallbacks

    def as_dict(self) -> dict:
        with self._lock:
            n = max(self.requests, 1)
            return {
                "requests": self.requests,
                "fallbacks": self.fallbacks,
                "layer_times": [t / n for t in self.load_s],
                "wait_times": [t / n for t in self.wait_s],
                "bytes_per_layer": [b / n for b in self.bytes],
            }
