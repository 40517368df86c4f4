"""Compute a cachegen calibration (kvshelf.codecs.calibration) from a model's own KV.

One prefill of a calibration text gives, per layer: keys rotated back to before RoPE, values, the
queries' energy per rotation pair (what an error in K costs) and the output projection (what an error
in V costs); from those, each (layer, K|V, head) gets its transform. Then, per (layer, K|V), the
continuation's next-token KL divergence is measured with only that layer quantised at a known step;
each layer's step is set so that every layer adds the same KL (`KL_PER_LAYER` at precision level 5).
One prefill and 36 short forwards for Gemma 3 270M: 2-3 minutes on two CPU cores, once per model.
"""

from __future__ import annotations

import inspect
import logging
import math
import pydoc_data.topics
import string
import textwrap

import torch

from kvshelf.codecs import calibration as calib
from kvshelf.kvmath.rope import rotate_keys
from kvshelf.model.runner import ModelRunner

log = logging.getLogger(__name__)

# Next-token KL that each quantised (layer, K|V) may add at precision level 5. On Gemma 3 270M this
# level measured ~2.6 bits/value (6x smaller than fp16) and ~+1% perplexity (BENCHMARKS.md).
KL_PER_LAYER = 1.5e-4
_PROBE = 0.25  # probe step, as a fraction of the coefficients' RMS: fine enough that KL grows as step**2
_COARSEST, _FINEST = 2.0, 16.0  # limits of a layer's step against the median layer's


def calibration_text() -> str:
    """Text from the standard library, always present, unrelated to the texts the benchmarks score."""
    topics = pydoc_data.topics.topics
    prose = "\n\n".join(topics[k] for k in ("if", "while", "lambda", "assignment", "types", "numbers", "global"))
    return prose + inspect.getsource(textwrap) + inspect.getsource(string)


def _query_energy(runner: ModelRunner, queries: list[torch.Tensor], layer: int) -> torch.Tensor:
    """[kv_heads, head_dim]: mean squared query per channel, over the query heads that share each KV head,
    averaged within RoPE pairs (channels j and j + dim/2 rotate into each other)."""
    q = torch.cat(queries).double()  # [n, q_heads, dim]
    per_q_head = q.pow(2).mean(0)
    groups = per_q_head.view(runner.num_kv_heads, -1, runner.head_dim).mean(1)
    return (groups + groups.roll(runner.head_dim // 2, dims=-1)) / 2


def _output_gram(runner: ModelRunner, layer: int) -> torch.Tensor:
    """[kv_heads, head_dim, head_dim]: sum of W_o,h^T W_o,h over the query heads h of each KV head."""
    w = runner.layers[layer].self_attn.o_proj.weight.detach().double().cpu()  # [hidden, q_heads * dim]
    d = runner.head_dim
    q_heads = w.shape[1] // d
    per_kv = q_heads // runner.num_kv_heads
    out = torch.zeros(runner.num_kv_heads, d, d, dtype=torch.float64)
    for h in range(q_heads):
        block = w[:, h * d : (h + 1) * d]
        out[h // per_kv] += block.T @ block
    return out


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    logq = torch.log_softmax(logits.float(), -1)
    return float((ref_logp.exp() * (ref_logp - logq)).sum(-1).mean())


def allocate_steps(slope: torch.Tensor, kl_per_layer: float = KL_PER_LAYER) -> torch.Tensor:
    """Steps [layers, 2] from KL slopes (KL per step**2 of each layer quantised alone): equal KL per layer,
    except that no step is coarser than COARSEST x the median step. A slope measured on one calibration
    text is a noisy estimate; a layer that looked insensitive there may not be on other text, and a too
    coarse step costs far more quality than a too fine one costs bits."""
    step = (kl_per_layer / slope.clamp_min(1e-30)).sqrt()
    median = float(step.median())
    return step.clamp(median / _FINEST, median * _COARSEST)


def _kl_slopes(runner, kv, cached, continuation, ref_logp, draft: calib.Calibration, advance=None) -> torch.Tensor:
    """[layers, 2]: KL of the continuation with only that (layer, K|V) coded at the draft's step, / step**2."""
    from kvshelf.codecs.cachegen import CacheGenCodec

    layers, prefix = cached.shape[0], cached.shape[3]
    codec = CacheGenCodec(bits=5)
    codec.calibration = draft  # a draft: used here only, never registered or stored
    slope = torch.zeros(layers, 2)
    for i in range(layers):
        exact = kv.data[i, :, :, :prefix].clone()
        decoded = codec.decode_layer(codec.encode_layer(cached[i], i, layers), exact.shape, exact.dtype, i, layers)
        for kind in range(2):
            kv.data[i, kind, :, :prefix] = decoded[kind].to(kv.data.device)
            kl = _kl(ref_logp, runner.forward(continuation, prefix, kv, all_logits=True))
            slope[i, kind] = kl / float(draft.step[i, kind]) ** 2
            kv.data[i, :, :, :prefix] = exact
        if advance is not None:
            advance(f"sensitivity of layer {i + 2}" if i + 1 < layers else "done")
    return slope


def _progress(show: bool):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]cachegen calibration[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not show,
    )


@torch.inference_mode()
def calibrate(
    runner: ModelRunner,
    token_ids: list[int] | list[list[int]],
    *,
    continuation: int | None = None,
    combine: str = "mean",
    show_progress: bool = False,
) -> calib.Calibration:
    """A calibration from one text (a list of ids) or several (a list of lists): the first part of each
    is cached, the rest scores the sensitivity. With several texts the transforms are fitted on all of
    them pooled, and each layer's KL slope is measured per text, then combined (`combine`: "mean", or
    "max": every layer as sensitive as on the text where it was most sensitive: a safety margin)."""
    texts = [token_ids] if token_ids and isinstance(token_ids[0], int) else list(token_ids)
    if not texts or combine not in ("mean", "max"):
        raise ValueError(f"calibration needs token ids and combine mean or max, got {combine!r}")
    with _progress(show_progress) as progress:
        # Steps: per text a prefill and one probe per layer; the transform fits; the reference continuations.
        task = progress.add_task("prefill of the calibration text", total=(len(texts) + 1) * runner.num_layers + 2)

        def advance(next_step: str) -> None:
            progress.update(task, advance=1, description=next_step)

        return _calibrate(runner, texts, continuation, combine, advance)


def _prefill(runner: ModelRunner, token_ids: list[int], prefix: int):
    """The KV buffer after prefilling `prefix` tokens, and the queries of every layer."""
    dim = runner.head_dim
    queries: dict[int, list[torch.Tensor]] = {i: [] for i in range(runner.num_layers)}
    hooks = []
    for i, layer in enumerate(runner.layers):

        def grab(_m, _inp, out, i=i, q_norm=runner.layer_specs[i].q_norm):
            q = out.view(out.shape[0], out.shape[1], -1, dim)
            if q_norm is not None:
                q = q_norm(q)
            queries[i].append(q[0].detach().float().cpu())

        hooks.append(layer.self_attn.q_proj.register_forward_hook(grab))
    kv = runner.new_kv(len(token_ids))
    try:
        runner.forward(token_ids[:prefix], 0, kv)
    finally:
        for h in hooks:
            h.remove()
    return kv, queries


def _calibrate(runner: ModelRunner, texts: list[list[int]], continuation, combine, advance) -> calib.Calibration:
    splits = []
    for ids in texts:
        n = len(ids)
        cont = continuation or max(8, n // 5)
        if n - cont < 32 or cont < 8:
            raise ValueError(f"calibration needs at least 40 tokens per text, got {n}")
        splits.append(n - cont)
    layers, heads, dim = runner.num_layers, runner.num_kv_heads, runner.head_dim
    inv_freq = torch.stack([runner.inv_freq(i).float().cpu() for i in range(layers)])
    prefilled = []
    for ids, prefix in zip(texts, splits, strict=True):
        kv, queries = _prefill(runner, ids, prefix)
        prefilled.append((kv, kv.data[:, :, :, :prefix].float().cpu().clone(), queries))
    advance("transforms of layer 1")
    mean = torch.zeros(layers, 2, heads, dim)
    forward = torch.zeros(layers, 2, heads, dim, dim)
    inverse = torch.zeros(layers, 2, heads, dim, dim)
    rms = torch.zeros(layers, 2)
    for i in range(layers):
        # K is coded before RoPE; every text's vectors pooled
        keys = torch.cat([rotate_keys(c[i, 0], inv_freq[i], 0, -1.0) for _, c, _ in prefilled], dim=1)
        values = torch.cat([c[i, 1] for _, c, _ in prefilled], dim=1)
        energy = _query_energy(runner, [q for _, _, qs in prefilled for q in qs[i]], i)
        weights = (torch.diag_embed(energy), _output_gram(runner, i))
        for kind, vals in enumerate((keys, values)):
            sq = 0.0
            for h in range(heads):
                m, f, b = calib.fit_transform(vals[h], weights[kind][h])
                mean[i, kind, h], forward[i, kind, h], inverse[i, kind, h] = m, f, b
                sq += float(((vals[h] - m) @ f.T).pow(2).mean())
            rms[i, kind] = math.sqrt(sq / heads)
        advance(f"transforms of layer {i + 2}" if i + 1 < layers else "reference continuation")
    # Sensitivity: KL of the continuation with one (layer, K|V) quantised at a probe step (a fraction of
    # its RMS). Measuring again at the allocated steps was tried: no better on held-out text.
    draft = calib.Calibration(inv_freq, mean, forward, inverse, (rms * _PROBE).clamp_min(1e-6))
    slopes = []
    for ids, prefix, (kv, cached, _) in zip(texts, splits, prefilled, strict=True):
        ref = runner.forward(ids[prefix:], prefix, kv, all_logits=True)
        ref_logp = torch.log_softmax(ref.float(), -1)
        advance("sensitivity of layer 1")
        slopes.append(_kl_slopes(runner, kv, cached, ids[prefix:], ref_logp, draft, advance))
    stacked = torch.stack(slopes)
    slope = stacked.max(0).values if combine == "max" else stacked.mean(0)
    step = allocate_steps(slope)
    info = {
        "model": runner.fingerprint().digest().hex(),
        "tokens": sum(len(ids) for ids in texts),
        "kl_per_layer_at_level_5": KL_PER_LAYER,
        "kl_slopes": [[round(float(x), 9) for x in row] for row in slope],
    }
    if len(texts) > 1:
        info.update(texts=len(texts), combine=combine)
        info["kl_slopes_per_text"] = [[[round(float(x), 9) for x in row] for row in s] for s in slopes]
    cal = calib.Calibration(inv_freq, mean, forward, inverse, step, info)
    log.info("cachegen calibration %s from %d tokens", cal.digest, info["tokens"])
    return cal


def calibration_for(
    runner: ModelRunner, tokenizer, *, path: str | None = None, show_progress: bool = True
) -> calib.Calibration:
    """The model's calibration: from `path` if given; else from the calibration folder when one was made
    for this model; else computed now (from the built-in text) and saved there for next time."""
    if path:
        cal = calib.load(path)
        cal.check_layout((runner.num_layers, runner.num_kv_heads, runner.head_dim))
        return cal
    model = runner.fingerprint().digest().hex()
    folder = calib.default_dir()
    index = folder / f"model-{model}.txt"  # the digest of this model's calibration
    if index.is_file():
        try:
            return calib.load(folder / f"{index.read_text().strip()}{calib.SUFFIX}")
        except calib.CalibrationError as err:
            log.warning("ignoring the saved calibration for this model (%s); computing a new one", err)
    ids = tokenizer(calibration_text())["input_ids"][: min(2048, runner.max_positions)]
    log.info("calibrating cachegen for this model from %d tokens (once; it is saved in %s)", len(ids), folder)
    cal = calibrate(runner, ids, continuation=len(ids) // 4, show_progress=show_progress)
    calib.save(cal, folder)
    tmp = index.with_suffix(".tmp")
    tmp.write_text(cal.digest)
    tmp.replace(index)
    calib.register(cal)
    return cal
