"""What a generation turns into on the wire: text deltas cut at stop strings, and OpenAI logprobs."""

from __future__ import annotations

import torch

_FLOOR = -9999.0  # OpenAI's own floor for a token's log probability; keeps JSON free of -Infinity


class TextStream:
    """Turns token ids into text deltas, cutting at the first stop string and never emitting half of one."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self._flush(len(self.text))
        hold = max((len(s) - 1 for s in self.stops), default=0)
        end = len(self.text) - hold
        if self.text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            end = min(end, len(self.text) - 1)
        return self._flush(end)

    def finish(self) -> str:
        return self._flush(len(self.text.rstrip("\ufffd")))

    def _flush(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta


class Logprobs:
    """Per generated token: its log probability and the `top` most likely alternatives, from the logits
    the token was chosen from (the model's distribution, before temperature and top_p)."""

    def __init__(self, tokenizer, top: int):
        self.tokenizer, self.top = tokenizer, top
        self.entries: list[tuple[int, float, list[tuple[int, float]]]] = []
        self._taken = 0

    def add(self, logits: torch.Tensor, token_id: int) -> None:
        lp = torch.log_softmax(logits.reshape(-1).float(), dim=-1)
        alternatives = []
        if self.top:
            values, ids = torch.topk(lp, self.top)
            alternatives = [(int(i), max(float(v), _FLOOR)) for v, i in zip(values, ids, strict=True)]
        self.entries.append((token_id, max(float(lp[token_id]), _FLOOR), alternatives))

    def take(self) -> list:
        """Entries not yet sent (for streaming chunks)."""
        new, self._taken = self.entries[self._taken :], len(self.entries)
        return new

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion_format(self, entries: list) -> dict:
        """Completions API: parallel lists of tokens, their logprobs, top alternatives and text offsets."""
        tokens, offsets, at = [], [], 0
        for tid, _, _ in entries:
            text = self.token(tid)
            tokens.append(text)
            offsets.append(at)
            at += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{self.token(i): v for i, v in alts} for _, _, alts in entries] if self.top else None,
            "text_offset": offsets,
        }

    def chat_format(self, entries: list) -> dict:
        """Chat API: one object per token with its bytes and top alternatives."""

        def item(tid: int, lp: float) -> dict:
            text = self.token(tid)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8", "replace"))}

        return {
            "content": [{**item(tid, lp), "top_logprobs": [item(i, v) for i, v in alts]} for tid, lp, alts in entries]
        }
