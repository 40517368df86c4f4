"""The OpenAI-compatible request shapes kvshelf serves, and how chat messages become a prompt."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvshelf.server.tenants import MAX_SALT_CHARS

MAX_LOGPROBS = 20


def _find_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string holding a lone surrogate (not encodable as UTF-8), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for k, v in value.items():
            found = _find_surrogate(k, path) or _find_surrogate(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _find_surrogate(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _must_be_default(name: str, value, default) -> None:
    if value != default and value is not None:
        raise ValueError(f"{name}={value!r} is not supported by this server (only {default!r})")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    # Every field kvshelf does not honour is refused with a 400 naming it, rather than silently ignored.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256)  # accepted for compatibility; not used
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_SALT_CHARS,
        description="mixed into the tenant's own salt: requests with different salts share no KV",
    )

    @model_validator(mode="before")
    @classmethod
    def _utf8_only(cls, data):
        where = _find_surrogate(data, "")
        if where:
            raise ValueError(f"{where} holds a lone UTF-16 surrogate, which is not valid Unicode text")
        return data

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        _must_be_default("n", v, 1)
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v, info):
        _must_be_default(info.field_name, v, 0.0)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v

    @model_validator(mode="after")
    def _options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def token_budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def top_logprobs_wanted(self) -> int | None:
        """None: no logprobs; k >= 0: the chosen token's logprob and the k most likely alternatives."""
        raise NotImplementedError


class CompletionRequest(_Request):
    prompt: str | list[int] = Field(description="text, or token ids (one prompt per request)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
            if len(v) != 1:
                raise ValueError("one prompt per request (batches of prompts are not supported)")
            return v[0]
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        _must_be_default("echo", v, False)
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v):
        _must_be_default("best_of", v, 1)
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported by this server")
        return v

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, v):
        if isinstance(v, list):
            for part in v:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(part["text"] for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


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
