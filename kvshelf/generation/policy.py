"""What the generator asks of the never-slower guard, declared here so that generation does not depend on
the advice package (kvshelf.advice.guard.Guard implements it)."""

from __future__ import annotations

from typing import Protocol

from kvshelf.model.runner import ModelRunner


class CachePolicy(Protocol):
    def use_cache(self, prompt_tokens: int) -> bool:
        """False when the prompt is too short for the cache to pay: no lookup, no store."""

    def budget_s(self, prompt_tokens: int) -> float:
        """Longest the request's tier reads may take."""

    def load_decision(self, tokens_by_tier: dict[str, int]) -> str | None:
        """None when the planned prefix should be loaded, else the reason not to (kvshelf.cache.requests)."""

    def observe(self, tokens_by_tier: dict[str, int], seconds: float) -> None:
        """A load of the planned tokens was tried and took `seconds`."""

    def observe_prefill(self, tokens: int, seconds: float, runner: ModelRunner) -> None:
        """A full prefill (nothing loaded) of `tokens` took `seconds`."""
