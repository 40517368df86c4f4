"""The question pass of a blend: the question run alone over the placed KV, to read which prompt positions it
attends to before the blend decides which tokens to recompute (issue #18).

It costs the question's tokens once more (1-3% of a prefill at ~2K tokens) and reads what the question attends
to in the deep layers, where the answer is retrieved, not at the check layer only. The blended prefill then
recomputes the question over the fused KV.
"""

from __future__ import annotations

import torch

from kvshelf.blend.segment import Segmented
from kvshelf.blend.selection import SelectionPolicy
from kvshelf.model.kv_buffer import KVBuffer
from kvshelf.model.runner import ModelRunner


class QuestionPass:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self._prefix_kv: tuple[tuple[int, ...], torch.Tensor] | None = None  # the prefix's KV, kept

    def shares(
        self, seg: Segmented, kv: KVBuffer, policy: SelectionPolicy, question: list[int] | None = None
    ) -> torch.Tensor:
        """Each prompt position's share of the question's attention (`seg`'s suffix, or `question` after `seg`;
        mean, or max, over the layers `policy` reads), from a pass of the question alone over the prefix's KV
        (kept from an earlier request) and the placed document KV, as at 0% recompute. Documents not cached are
        still empty in `kv` here (their share is meaningless; they are computed in place anyway)."""
        runner, shares = self.runner, []
        if question is None:
            question, start = seg.suffix, len(seg.token_ids) - len(seg.suffix)
        else:
            start = len(seg.token_ids)
        if not question:
            return torch.ones(start, device=runner.device)
        if seg.prefix:
            self.place_prefix(seg.prefix, kv)
        windows = [spec.window for spec in runner.layer_specs]
        read = [w is None for w in windows] if policy.question_layers == "global" else [True] * len(windows)
        if not any(read):  # no global layer: every layer
            read = [True] * len(windows)
        queries = {}

        def probe(layer: int, hidden: torch.Tensor, positions: torch.Tensor, rope: dict) -> None:
            if read[layer]:
                queries[layer] = (hidden, positions, rope)

        def after(layer: int, _runner, _kv) -> None:
            # The layer has written the question's own keys: its queries' shares over every key up to them.
            if layer in queries:
                hidden, positions, rope = queries.pop(layer)
                shares.append(self.attention(layer, hidden, positions, rope, kv, hidden.shape[1], windows[layer]))

        runner.forward(question, start, kv, select_tokens=probe, layer_hook=after, logits=False)
        stacked = torch.stack(shares)
        return stacked.amax(0) if policy.question_reduce == "max" else stacked.mean(0)

    def place_prefix(self, prefix: list[int], kv: KVBuffer) -> None:
        """The prefix's KV (position 0, no context before it: the same in every prompt) into `kv`, computed
        once per prefix and kept (one prefix: BOS, or BOS and a fixed instruction)."""
        key = tuple(prefix)
        if self._prefix_kv is None or self._prefix_kv[0] != key:
            alone = self.runner.new_kv(len(prefix))
            self.runner.forward(prefix, 0, alone, logits=False)
            self._prefix_kv = (key, alone.data.clone())
        kv.write_layers(0, self.runner.num_layers, 0, self._prefix_kv[1])

    def attention(
        self, layer: int, hidden, positions, rope: dict, kv: KVBuffer, question: int, window: int | None = None
    ) -> torch.Tensor:
        """Each prompt position's share of the attention of the question's queries at this layer ([positions
        up to the last], mean over heads and question tokens). The question is the last `question` of the active
        tokens; the keys are this layer's (fresh for every token computed here). A sliding window is ignored
        unless given: at an early, sliding check layer it would hide the first documents from the question, and
        the share is a proxy for what later, global layers read (`shares` passes each layer's window: it reads
        every layer as the model does)."""
        m = max(1, min(question, hidden.shape[1]))
        tail = {key: (cos[:, -m:], sin[:, -m:]) for key, (cos, sin) in rope.items()}
        q = self.runner.query_states(layer, hidden[:, -m:], positions[-m:], tail).float()  # [heads, m, dim]
        end = int(positions[-1]) + 1
        keys = kv.data[layer, 0, :, :end].float()  # [kv_heads, end, dim]
        group = q.shape[0] // keys.shape[0]
        q = q.reshape(keys.shape[0], group * m, -1)  # query head h reads KV head h // group
        logits = q @ keys.transpose(1, 2)  # [kv_heads, group * m, end]
        keys_at = torch.arange(end, device=keys.device).view(1, -1)
        at = positions[-m:].repeat(group).view(-1, 1)
        hidden_keys = keys_at > at
        if window is not None:
            hidden_keys |= at - keys_at >= window
        return logits.masked_fill(hidden_keys, float("-inf")).softmax(-1).mean(dim=(0, 1))
