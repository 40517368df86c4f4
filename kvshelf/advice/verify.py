"""Check `kvshelf advise`'s recommendation by a short A/B on the user's own trace before it is written.

The first requests of the trace are replayed in order with each candidate config on a fresh, empty
cache, each request right after the same request without a cache: pairs close in time, so that a busy
machine slows both sides alike. The first candidate whose mean TTFT beats its no-cache runs is the one
recommended; when none does, the advice is to run without a cache, and says so. Tiers that cannot be reached from here (a remote tier's
placeholder URL) are left out of the measurement, and that is said too.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from dataclasses import dataclass, field

from kvshelf.config import KVShelfConfig

NO_CACHE = {"local_cpu": False}  # no tier at all: every request recomputes, as without kvshelf
_BLEND_KEYS = ("enable_blending", "blend_recompute_ratios", "blend_check_layers")
_LAYERWISE_KEYS = ("use_layerwise", "buffer_size", "use_async_load", "layerwise_store")


@dataclass
class Trial:
    label: str
    config: dict
    mean_ttft_s: float
    no_cache_ttft_s: float  # the same requests without a cache, each run just before

    @property
    def faster(self) -> bool:
        return self.mean_ttft_s < self.no_cache_ttft_s


@dataclass
class Verdict:
    requests: int
    trials: list[Trial] = field(default_factory=list)
    chosen: dict = field(default_factory=dict)
    chosen_label: str = ""
    notes: list[str] = field(default_factory=list)


def candidates(config: dict) -> list[tuple[str, dict]]:
    """The recommendation, then simpler fallbacks (without CacheBlend, without layerwise loading)."""
    out = [("recommended", dict(config))]
    current = dict(config)
    for label, keys in (("without CacheBlend", _BLEND_KEYS), ("without layerwise loading", _LAYERWISE_KEYS)):
        if current.get(keys[0]):
            current = {k: v for k, v in current.items() if k not in keys}
            out.append((label, dict(current)))
    return out


def baseline(gen, texts: list, cost, *, step) -> list[float]:
    """TTFT of each text without a cache; each full prefill is also an observation of the prefill speed."""
    ttfts = []
    for i, text in enumerate(texts, 1):
        r = step(f"request {i}/{len(texts)} without a cache", gen.generate, text, max_new_tokens=1, use_cache=False)
        cost.observe_prefill(r.prompt_tokens, r.ttft_s)
        ttfts.append(r.ttft_s)
    return ttfts


def _measurable(base: KVShelfConfig, candidate: dict, disk_dir: str, notes: list[str]) -> KVShelfConfig:
    data = {**base.model_dump(), **candidate}
    if data.get("local_disk"):
        data["local_disk"] = disk_dir  # the recommended path may not exist here; the codec and size stay
    if candidate.get("remote_url"):
        note = (
            f"the remote tier ({candidate['remote_url']}) was not part of the measurement: it is a placeholder "
            "for your cache host; check it there with `kvshelf bench`"
        )
        if note not in notes:
            notes.append(note)
        data["remote_url"] = None
    return KVShelfConfig.model_validate(data)


def verify(loaded, base: KVShelfConfig, config: dict, texts: list, plain, *, step, open_shelf) -> Verdict:
    """Replay `texts` with each candidate on a fresh cache, each request paired with a no-cache run by
    the generator `plain`; choose the first candidate that beats its no-cache runs. `open_shelf` is the
    assembly's (passed in: advice/ sits below the assembly, which builds its guard)."""

    verdict = Verdict(len(texts))
    n = len(texts)
    for label, candidate in candidates(config):
        disk_dir = tempfile.mkdtemp(prefix="kvshelf-advise-")
        without, with_cache = [], []
        try:
            # runtime=None: the caller checked the user's keys; the candidate sets every key on purpose
            shelf = open_shelf(_measurable(base, candidate, disk_dir, verdict.notes), loaded=loaded, runtime=None)
            try:
                for i, t in enumerate(texts, 1):
                    r = step(
                        f"{label}: request {i}/{n} without a cache",
                        plain.generate,
                        t,
                        max_new_tokens=1,
                        use_cache=False,
                    )
                    without.append(r.ttft_s)
                    r = step(f"{label}: request {i}/{n} with it", shelf.generator.generate, t, max_new_tokens=1)
                    with_cache.append(r.ttft_s)
            finally:
                shelf.close()
        finally:
            shutil.rmtree(disk_dir, ignore_errors=True)
        trial = Trial(label, candidate, statistics.fmean(with_cache), statistics.fmean(without))
        verdict.trials.append(trial)
        if trial.faster:
            verdict.chosen, verdict.chosen_label = candidate, label
            if label != "recommended":
                first = verdict.trials[0]
                verdict.notes.append(
                    f"the recommended config measured slower than no cache ({first.mean_ttft_s:.2f} s vs "
                    f"{first.no_cache_ttft_s:.2f} s): falling back to the config {label}"
                )
            return verdict
    verdict.chosen, verdict.chosen_label = dict(NO_CACHE), "no cache"
    verdict.notes.append(
        f"every candidate measured slower than no cache on the first {n} requests of this trace: recommending no cache"
    )
    return verdict
