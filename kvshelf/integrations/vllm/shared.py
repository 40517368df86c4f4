"""The connector's kvshelf engine: its configuration, the model fingerprint from vLLM's config, and one
engine per process and configuration (the worker half owns it; the scheduler half asks it, see
connector.py), assembled by kvshelf.assembly like every runtime's, with its metrics exported from the
process that holds it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from kvshelf.assembly import autocalibration
from kvshelf.assembly.engine import Owned, open_engine
from kvshelf.assembly.runtimes import check_runtime
from kvshelf.cache.engine import CacheEngine
from kvshelf.cache.fingerprint import (
    WEIGHT_SUFFIXES,
    ModelFingerprint,
    cached_digest,
    file_identity,
    hash_files,
    weight_files,
)
from kvshelf.config import KVShelfConfig, load_config
from kvshelf.errors import ConfigError

log = logging.getLogger(__name__)

# Keys of kv_connector_extra_config that are not kvshelf config keys.
CONFIG_FILE_KEYS = ("kvshelf_config_file", "config_file")

_lock = threading.Lock()
# The connector is built twice per process (scheduler and worker roles): they share one engine here.
_engines: dict[str, tuple[CacheEngine, Owned, int]] = {}


def connector_config(extra: dict[str, Any] | None) -> KVShelfConfig:
    """kvshelf config for the connector: a config file (extra `kvshelf_config_file`, or KVSHELF_CONFIG_FILE /
    LMCACHE_CONFIG_FILE), then env vars, then the other keys of `kv_connector_extra_config`."""
    extra = dict(extra or {})
    path = None
    for key in CONFIG_FILE_KEYS:
        path = extra.pop(key, None) or path
    config = load_config(path, overrides=extra)
    check_runtime(config, "vllm")
    return config


def _files_digest(paths: list[Path]) -> str:
    """Every byte of a local checkpoint's files, hashed once and remembered by (path, size, mtime, inode)."""
    return cached_digest("files", file_identity(paths), lambda: hash_files(paths))


def weights_digest(model: str, revision: str | None) -> str:
    """What pins the weights vLLM loads: a local folder's (or single file's) bytes, or a hub model's
    snapshot commit from the local Hugging Face cache. Never the bare model name."""
    path = Path(model).expanduser()
    if path.is_dir():
        files = weight_files(path)
        if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
            raise ConfigError(f"model folder {str(path)!r} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
        return "files:" + _files_digest(files)
    if path.is_file():
        return "files:" + _files_digest([path])
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id=model, revision=revision, local_files_only=True))
    except Exception as err:  # not in the local cache (or not a hub id): keys must not guess
        raise ConfigError(
            f"kvshelf cannot pin the weights of {model!r} (revision {revision or 'main'}): no local snapshot "
            f"({type(err).__name__}); download the model first or pass its local folder"
        ) from None
    return f"hub:{model}@{snapshot.name}"


def kv_head_shard(total_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int, int]:
    """(first head, end head, replicas) of the KV heads tensor-parallel `rank` holds, as vLLM's QKV
    projection splits them: T <= H gives rank r the heads [r*H/T, (r+1)*H/T); T > H replicates each head on
    T/H consecutive ranks (rank r holds head r // (T/H)). `replicas` ranks hold the same heads."""
    if tp_size < 1 or not 0 <= rank < tp_size:
        raise ConfigError(f"tensor parallel rank {rank} is outside 0..{tp_size - 1}")
    if total_kv_heads < 1:
        raise ConfigError(f"the model has {total_kv_heads} KV heads")
    if tp_size <= total_kv_heads:
        if total_kv_heads % tp_size:
            raise ConfigError(f"{total_kv_heads} KV heads do not split over tensor_parallel_size={tp_size}")
        per = total_kv_heads // tp_size
        return rank * per, (rank + 1) * per, 1
    if tp_size % total_kv_heads:
        raise ConfigError(f"tensor_parallel_size={tp_size} is not a multiple of the {total_kv_heads} KV heads")
    replicas = tp_size // total_kv_heads
    head = rank // replicas
    return head, head + 1, replicas


def stores_shard(tp_size: int, total_kv_heads: int, rank: int, *, shared_tier: bool = True) -> bool:
    """Whether `rank` stores its shard: of the ranks holding a replicated head (identical KV, identical
    keys), only the first stores when the ranks share a tier (remote: they all load from it); without
    one every rank stores into its own tiers, or the others would never hit."""
    _, _, replicas = kv_head_shard(total_kv_heads, tp_size, rank)
    return rank % replicas == 0 or not shared_tier


def shares_tiers(config: KVShelfConfig) -> bool:
    """Whether the tensor-parallel ranks (one process each) share a tier that one rank's writes reach the
    others through: the remote tier. Not the disk tier: each process keeps its own index of the folder
    (built at start), so a chunk another live process wrote there is not seen."""
    return config.remote_url is not None


def vllm_fingerprint(vllm_config, tp_rank: int = 0) -> ModelFingerprint:
    """What makes vLLM's KV for this model reusable, from vLLM's own config (both roles compute it alike).
    With tensor parallelism each rank holds a shard of the KV heads: the fingerprint (so every chunk key)
    carries the TP size and this rank's head range, so ranks never read each other's shards, nor an
    instance of another TP size its chunks (a miss; kvshelf does not re-shard)."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    if pc.pipeline_parallel_size != 1:
        raise ConfigError(
            f"kvshelf's vLLM connector supports pipeline_parallel_size=1 only (got {pc.pipeline_parallel_size})"
        )
    tp_size = pc.tensor_parallel_size
    total_heads = mc.get_total_num_kv_heads()
    first, end, _ = kv_head_shard(total_heads, tp_size, tp_rank)
    if end - first != mc.get_num_kv_heads(pc):
        raise ConfigError(
            f"vLLM gives each rank {mc.get_num_kv_heads(pc)} KV heads, kvshelf's split gives {end - first}"
        )
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in (None, "auto"):
        raise ConfigError(f"kv_cache_dtype={cache_dtype!r}: kvshelf's connector needs kv_cache_dtype='auto'")
    weights = weights_digest(str(mc.model), mc.revision)
    text = mc.hf_text_config
    extra = {
        "engine": "vllm",
        "model_type": getattr(mc.hf_config, "model_type", None),
        "rope": getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None),
        "rope_theta": getattr(text, "rope_theta", None),
        "sliding_window": getattr(text, "sliding_window", None),
        "layer_types": getattr(text, "layer_types", None),
        "quantization": mc.quantization,
        "tp": {"size": tp_size, "kv_heads": [first, end], "total_kv_heads": total_heads},
    }
    return ModelFingerprint(
        model_id=str(mc.served_model_name or mc.model),
        weights_digest=weights,
        dtype=str(mc.dtype).removeprefix("torch."),
        num_layers=mc.get_num_layers(pc),
        num_kv_heads=end - first,
        head_dim=mc.get_head_size(),
        extra=json.loads(json.dumps(extra, default=str)),
    )


def _key(fp: ModelFingerprint, config: KVShelfConfig) -> str:
    return fp.hex() + ":" + config.model_dump_json() + f":{os.getpid()}"


def model_folder(model: str, revision: str | None) -> Path | None:
    """The local folder of the model vLLM loads (a folder, or a hub model's local snapshot), or None."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=model, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - no local snapshot: nothing to calibrate from
        return None


def acquire_engine(
    fp: ModelFingerprint, config: KVShelfConfig, model: Path | None = None, *, tp_rank: int = 0
) -> CacheEngine:
    """This process's engine for `config`, made on first use (see `owned_by` for what it owns). `model`:
    the model's local folder, from which `codec_calibration: auto` computes cachegen's calibration. Its
    metrics are served on `metrics_port` + `tp_rank` (each tensor-parallel rank is its own process)."""
    key = _key(fp, config)
    with _lock:
        if key in _engines:
            engine, owned, users = _engines[key]
            _engines[key] = (engine, owned, users + 1)
            return engine
        owned = Owned.for_config(config)
        # vLLM runs the model: no runner; `auto` is the model's calibration if it exists, else made (below)
        calibrated = autocalibration.existing(config, fp)
        engine = open_engine(config, fp, owned=owned, auto_calibration=calibrated)
        if engine is None:
            owned.close()
            raise ConfigError("the kvshelf connector needs at least one tier: local_cpu, local_disk or remote_url")
        _engines[key] = (engine, owned, 1)
        if calibrated is None:
            _auto_calibrate(engine, owned, config, fp, model)
        _export_metrics(engine, owned, config, port_offset=tp_rank)
        log.info("kvshelf engine for %s: tiers %s", fp.model_id, [t.backend.name for t in engine.backend.tiers])
        return engine


def _auto_calibrate(engine, owned: Owned, config: KVShelfConfig, fp: ModelFingerprint, model: Path | None) -> None:
    """issue #17: cachegen tiers with calibration auto get the model's calibration when it exists."""
    if not autocalibration.auto_tiers(engine, config):
        return
    if model is None:
        log.warning("kvshelf: no local model folder to calibrate cachegen from; it runs uncalibrated")
        return
    job = autocalibration.start(engine, config, fp, model, owned)
    if job is not None:
        owned.jobs.append(job)


def owned_by(engine: CacheEngine) -> Owned:
    """What an engine from acquire_engine owns: its metrics, codec processes and calibrations."""
    with _lock:
        for held, owned, _ in _engines.values():
            if held is engine:
                return owned
    raise KeyError("engine not acquired here")


_metrics_server_port: int | None = None


def _export_metrics(engine: CacheEngine, owned: Owned, config: KVShelfConfig, *, port_offset: int = 0) -> None:
    """kvshelf's metrics (engine, tiers, codecs, load failures) on their own port: vLLM's /metrics may be
    served by another process than the one holding the connector."""
    global _metrics_server_port
    from prometheus_client import start_http_server

    owned.metrics.watch_engine(engine)
    if config.metrics_port is not None and _metrics_server_port is None:
        port = config.metrics_port + port_offset
        if port > 65535:
            raise ConfigError(f"metrics_port {config.metrics_port} + tensor-parallel rank {port_offset} is over 65535")
        start_http_server(port, addr=config.metrics_host, registry=owned.metrics.registry)
        _metrics_server_port = port
        log.info("kvshelf metrics on http://%s:%d/metrics", config.metrics_host, port)


def release_engine(engine: CacheEngine) -> None:
    """Drop one user; the last one closes the engine (flushing write-behind)."""
    with _lock:
        for key, (held, owned, users) in list(_engines.items()):
            if held is engine:
                if users > 1:
                    _engines[key] = (held, owned, users - 1)
                    return
                del _engines[key]
                break
        else:
            return
    engine.close()
    owned.close()


@atexit.register
def close_all() -> None:
    """Close every engine still open (flushes write-behind to disk and remote tiers) at exit."""
    with _lock:
        held = [(engine, owned) for engine, owned, _ in _engines.values()]
        _engines.clear()
    for engine, owned in held:
        try:
            engine.close()
            owned.close()
        except Exception as err:  # exiting anyway: say so, do not mask the exit
            log.warning("kvshelf: closing an engine at exit failed: %s", err)
