"""A request's prompt as token ids: encoded, cut into CacheBlend documents, checked against the context."""

from __future__ import annotations

from collections.abc import Sequence

from kvshelf.blend.segment import Segmented, split_text, split_tokens
from kvshelf.errors import PromptError


def encode(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise PromptError("prompt is empty")
        if tokenizer is None:
            raise PromptError("a text prompt needs a tokenizer; pass token ids instead")
        ids = tokenizer(prompt)["input_ids"]
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise PromptError("prompt is empty")
    return ids


def segment(
    tokenizer, prompt: str | Sequence[int], documents: Sequence[str] | None, *, blending: bool, separator: str
) -> Segmented | None:
    """The prompt cut into CacheBlend documents, or None when blending does not apply to it."""
    if not blending:
        if documents is not None:
            raise PromptError("documents were given but blending is off (set enable_blending)")
        return None
    if tokenizer is None:
        raise PromptError("blending needs a tokenizer to find or encode the documents")
    if documents is not None:
        if not isinstance(prompt, str):
            raise PromptError("with explicit documents, the prompt is the text that follows them (the question)")
        seg = split_text(tokenizer, None, separator, documents=list(documents), suffix=prompt)
    elif isinstance(prompt, str):
        seg = split_text(tokenizer, prompt, separator)
    else:
        seg = split_tokens(tokenizer, prompt, separator)
    if not seg.documents:
        return None  # no separator: an ordinary prompt, served by prefix reuse
    if not seg.suffix:
        raise PromptError("the blended prompt has nothing after its last document: add the question")
    return seg


def check_length(n_prompt: int, max_new_tokens: int, limit: int) -> None:
    if n_prompt > limit:
        raise PromptError(f"prompt has {n_prompt} tokens, more than the model's context of {limit}")
    if n_prompt + max_new_tokens > limit:
        raise PromptError(
            f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of {limit}"
        )
    if max_new_tokens < 1:
        raise PromptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def eos_ids(runner, tokenizer) -> set[int]:
    """The tokens that end generation: the model's end-of-sequence ids and the tokenizer's."""
    gen_cfg = getattr(runner.model, "generation_config", None)  # a HF model attribute, not a kvshelf capability
    eos = getattr(gen_cfg, "eos_token_id", None) or getattr(runner.config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None:
        # Chat-tuned Gemma ends a turn with <end_of_turn>, which its generation config may not list.
        for token in (tokenizer.eos_token, "<end_of_turn>"):
            tid = tokenizer.convert_tokens_to_ids(token) if token else None
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
    return ids
