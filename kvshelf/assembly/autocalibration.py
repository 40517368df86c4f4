"""`codec_calibration: auto` where kvshelf does not run the model (inside vLLM): cachegen's calibration is
computed once per model, in a separate process, kept in the cache folder under the model's digest, and
used by every instance (issue #17).

- Key: a hash of the fingerprint's weights digest (a local folder's bytes, or a hub snapshot's commit).
- `python -m kvshelf.assembly.autocalibration MODEL_FOLDER KEY` computes it with kvshelf's own runner on
  the CPU (fp32, from the built-in calibration text, as `kvshelf calibrate` does). A separate process keeps
  the second copy of the model, its threads and numba out of the serving process (vLLM's CPU worker
  start-up scan of loaded modules fails on numba's llvmlite objects).
- One instance computes, the others wait: the child holds an exclusive lock (flock) on `auto-KEY.lock`
  while it works; a child that finds it held exits with BUSY and its parent polls for the result. The
  lock dies with its process, so a crashed computation is taken over by the next instance that tries.
- No reader sees a half-written file: the .kvcal file is written under a temporary name and renamed,
  then the index `auto-KEY.txt` (the calibration's digest) likewise, and a file is checked against its
  digest when loaded.
- Until the calibration exists the tiers code with uncalibrated cachegen or raw (`codec_calibration_pending`),
  then switch (ByteStore.use_codec). Objects are named by their codec: chunks written before the switch
  are not found after it (misses, recomputed), never decoded wrongly.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from kvshelf.cache.fingerprint import ModelFingerprint
from kvshelf.codecs import calibration as calib
from kvshelf.config import KVShelfConfig

log = logging.getLogger(__name__)

BUSY = 75  # exit status of a child that found another computing the same calibration (EX_TEMPFAIL)


def cache_key(weights_digest: str, tokens: int = 2048) -> str:
    """Names a model's auto calibration (from `tokens` tokens of text) in the cache folder."""
    text = f"{weights_digest}\n{tokens}".encode()
    return hashlib.blake2b(text, digest_size=16, person=b"kvshelf-autocal").hexdigest()


def _paths(key: str, folder: Path | None) -> tuple[Path, Path]:
    folder = Path(folder or calib.default_dir())
    return folder / f"auto-{key}.txt", folder / f"auto-{key}.lock"


def cached(key: str, folder: Path | None = None) -> calib.Calibration | None:
    """The calibration computed for `key`, or None when there is none yet (or it is damaged: logged)."""
    index, _ = _paths(key, folder)
    try:
        digest = index.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        return calib.load(index.parent / f"{digest}{calib.SUFFIX}")
    except calib.CalibrationError as err:
        log.warning("kvshelf: ignoring the auto calibration %s: %s", index, err)
        return None


def compute(model_dir: str | Path, key: str, folder: Path | None = None, *, tokens: int = 2048) -> int:
    """Compute and store the calibration for `key` unless another process is doing it (BUSY) or it exists
    (0). Runs in the child process."""
    index, lock = _paths(key, folder)
    index.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return BUSY
        if cached(key, folder) is not None:
            return 0
        from kvshelf.model.calibrate import calibrate, calibration_text
        from kvshelf.model.loader import load_model

        lm = load_model(model_dir, device="cpu", dtype="float32", show_progress=False)
        ids = lm.tokenizer(calibration_text())["input_ids"][: min(tokens, lm.runner.max_positions)]
        cal = calibrate(lm.runner, ids, continuation=len(ids) // 4)
        calib.save(cal, index.parent)
        tmp = index.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(cal.digest)
        tmp.replace(index)
        log.info("kvshelf: auto calibration %s for %s saved in %s", cal.digest, model_dir, index.parent)
        return 0


def shard(cal: calib.Calibration, fingerprint: ModelFingerprint) -> calib.Calibration:
    """The part of a whole model's calibration that fits this rank's KV (tensor parallelism holds a range
    of the KV heads, see vllm_fingerprint); the calibration itself when it fits as it is."""
    layout = (fingerprint.num_layers, fingerprint.num_kv_heads, fingerprint.head_dim)
    if cal.layout == layout:
        return cal
    first, end = (fingerprint.extra.get("tp") or {}).get("kv_heads", (0, cal.layout[1]))
    if (cal.layout[0], end - first, cal.layout[2]) != layout or not 0 <= first < end <= cal.layout[1]:
        raise calib.CalibrationError(f"calibration for (layers, kv heads, head dim) {cal.layout}, the KV is {layout}")
    part = {name: getattr(cal, name)[:, :, first:end].contiguous() for name in ("mean", "forward", "inverse")}
    return calib.Calibration(cal.inv_freq, step=cal.step, info={**cal.info, "kv_heads": [first, end]}, **part)


class AutoCalibration:
    """Gets a model's calibration for a running engine: at once when it is cached, else from a child
    process (or another instance's), and hands it to `ready`, once, from a background thread."""

    def __init__(
        self,
        model_dir: str | Path,
        key: str,
        ready: Callable[[calib.Calibration], None],
        *,
        threads: int = 2,
        tokens: int = 2048,
        folder: Path | None = None,
        poll_s: float = 5.0,
    ):
        self.model_dir, self.key, self.folder = str(model_dir), key, folder
        self._ready, self.threads, self.tokens, self.poll_s = ready, threads, tokens, poll_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self.calibration: calib.Calibration | None = None
        self.error: str | None = None  # why no calibration came (the child's exit status, an exception)
        self.done = threading.Event()

    def start(self) -> AutoCalibration:
        cal = cached(self.key, self.folder)
        if cal is not None:
            self._deliver(cal)
        elif not (Path(self.model_dir) / "config.json").is_file():
            self.error = f"{self.model_dir} is not a Hugging Face model folder (no config.json)"
            log.warning("kvshelf: cannot calibrate cachegen: %s; it stays as it is", self.error)
            self.done.set()
        else:
            self._thread = threading.Thread(target=self._run, name="kvshelf-autocalibration", daemon=True)
            self._thread.start()
        return self

    def _deliver(self, cal: calib.Calibration) -> None:
        try:
            self._ready(cal)
            self.calibration = cal
        except Exception as err:  # said loudly; the tiers keep the codec they have
            self.error = f"{type(err).__name__}: {err}"
            log.exception("kvshelf: using the auto calibration of %s failed", self.model_dir)
        finally:
            self.done.set()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                cal = cached(self.key, self.folder)
                if cal is not None:
                    return self._deliver(cal)
                code = self._child()
                if self._stop.is_set():
                    break
                if code == BUSY:  # another instance computes it: wait for its file
                    self._stop.wait(self.poll_s)
                    continue
                cal = cached(self.key, self.folder)
                if code == 0 and cal is not None:
                    return self._deliver(cal)
                self.error = f"the calibration process exited with status {code}"
                log.error(
                    "kvshelf: auto calibration of %s failed (%s); cachegen stays as it is", self.model_dir, self.error
                )
                break
        except Exception as err:  # a background thread fails loudly
            self.error = f"{type(err).__name__}: {err}"
            log.exception("kvshelf: auto calibration of %s failed", self.model_dir)
        self.done.set()

    def _child(self) -> int:
        cmd = [sys.executable, "-m", __name__, self.model_dir, self.key, "--threads", str(self.threads)]
        cmd += ["--tokens", str(self.tokens)]
        if self.folder is not None:
            cmd += ["--folder", str(self.folder)]
        root = str(Path(__file__).resolve().parents[2])  # this kvshelf, wherever the parent found it
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), PYTHONPATH=path)
        with self._lock:
            if self._stop.is_set():
                return BUSY
            self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        log.info("kvshelf: computing the cachegen calibration of %s in process %d", self.model_dir, self._proc.pid)
        return self._proc.wait()

    def stop(self) -> None:
        """Stop waiting; end the child this instance started (its lock goes with it), join the thread."""
        with self._lock:
            self._stop.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join()


def pending_codec(config: KVShelfConfig):
    """What an auto-calibrated tier codes with until its calibration exists, or None: as built."""
    from kvshelf.codecs import get_codec

    return get_codec("none") if config.codec_calibration_pending == "raw" else None


def auto_tiers(engine, config: KVShelfConfig) -> list:
    """The byte tiers of `engine` whose codec is cachegen with calibration `auto`."""
    from kvshelf.storage.disk import DiskBackend
    from kvshelf.storage.serialized import ByteStore

    specs = config.tier_codecs()
    out = []
    for tier in engine.backend.tiers:
        store = tier.backend
        spec = specs.get("disk" if isinstance(store, DiskBackend) else "remote")
        if isinstance(store, ByteStore) and spec is not None and spec.name == "cachegen" and spec.calibration == "auto":
            out.append((store, spec))
    return out


def existing(config: KVShelfConfig, fingerprint: ModelFingerprint) -> calib.Calibration | None:
    """The model's auto calibration, fitted to this rank's KV, when it exists already: the tiers are then
    built with it (a disk tier's start-up scan keeps only objects of the codec it is built with)."""
    if not any(spec.name == "cachegen" and spec.calibration == "auto" for spec in config.tier_codecs().values()):
        return None
    cal = cached(cache_key(fingerprint.weights_digest, config.codec_calibration_tokens))
    try:
        return shard(cal, fingerprint) if cal is not None else None
    except calib.CalibrationError as err:
        log.error("kvshelf: the auto calibration does not fit this model's KV (%s); cachegen stays uncalibrated", err)
        return None


def start(
    engine, config: KVShelfConfig, fingerprint: ModelFingerprint, model_dir: str | Path, owned
) -> AutoCalibration | None:
    """Auto-calibrate `engine`'s cachegen tiers (codec_calibration auto): switch them to the pending codec
    now, and to calibrated cachegen once the calibration exists. None when no tier asks for it."""
    from kvshelf.assembly.tiers import tier_codec

    tiers = auto_tiers(engine, config)
    if not tiers:
        return None
    pending = pending_codec(config)
    if pending is not None:
        for store, _ in tiers:
            store.use_codec(pending)

    def ready(cal: calib.Calibration) -> None:
        fitted = owned.calibrations.add(shard(cal, fingerprint))
        for store, spec in tiers:
            store.use_codec(tier_codec(spec, fitted, processes=owned.codec_processes, calibrations=owned.calibrations))
        log.info("kvshelf: cachegen tiers now code with calibration %s", fitted.digest)

    threads, tokens = config.codec_calibration_threads, config.codec_calibration_tokens
    key = cache_key(fingerprint.weights_digest, tokens)
    return AutoCalibration(model_dir, key, ready, threads=threads, tokens=tokens).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="compute a model's cachegen calibration for codec_calibration auto")
    ap.add_argument("model_dir")
    ap.add_argument("key")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--folder", type=Path, default=None)
    args = ap.parse_args(argv)
    parent = os.getppid()

    def orphaned() -> None:  # the instance that started it is gone (killed): stop, freeing the lock
        while os.getppid() == parent:
            threading.Event().wait(2.0)
        os._exit(1)

    threading.Thread(target=orphaned, name="kvshelf-calibration-parent", daemon=True).start()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kvshelf calibration: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    return compute(args.model_dir, args.key, args.folder, tokens=args.tokens)


if __name__ == "__main__":
    sys.exit(main())
