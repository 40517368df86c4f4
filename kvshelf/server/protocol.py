"""The OpenAI-compatible request shapes kvshelf serves, and how chat messages become a prompt."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    # OpenAI clients send fields kvshelf does not use (n=1, logprobs=None, ...): accept and ignore them
    # rather than fail, except where ignoring would change the answer (checked in the app).
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    cache_salt: str | None = Field(None, description="tenant salt: requests with different salts share no KV")

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def token_budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Request):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


def chat_prompt(tokenizer, model_type: str, messages: list[ChatMessage]) -> str:
    """The model's own chat template when it has one; Gemma's turn format for Gemma; a plain one otherwise."""
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    if model_type.startswith("gemma"):
        # Gemma has no system role: a system message is prefixed to the first user turn.
        system = "\n\n".join(m["content"] for m in plain if m["role"] in ("system", "developer"))
        turns = []
        for m in plain:
            if m["role"] in ("system", "developer"):
                continue
            role = "model" if m["role"] == "assistant" else "user"
            content = m["content"]
            if system and role == "user":
                content, system = f"{system}\n\n{content}", ""
            turns.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
        return "".join(turns) + "<start_of_turn>model\n"
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in plain]
    return "\n".join(lines) + "\nAssistant:"
