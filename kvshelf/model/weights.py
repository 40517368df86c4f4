"""The model fingerprint's weight digest: every byte of every tensor, remembered per weight files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from kvshelf.cache.fingerprint import WEIGHT_SUFFIXES, cached_digest, file_identity, weight_files


def sampled_digest(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """Names, shapes and a strided sample of each tensor: cheap, but blind to most single-row changes.
    Only used to notice that weights in memory no longer match a remembered full digest."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::stride][:samples_per_tensor].to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def full_digest(model: torch.nn.Module) -> str:
    """BLAKE2b over every byte of every tensor (names, shapes and dtypes too): any changed value changes it."""
    h = hashlib.blake2b(digest_size=32, person=b"kvshelf-weights")
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\0".encode())
        step = max(1, (64 << 20) // max(1, flat.element_size()))  # host copies of GPU tensors in 64 MiB pieces
        for i in range(0, flat.numel(), step):
            piece = flat[i : i + step].to("cpu").contiguous()
            h.update(piece.view(torch.uint8).numpy())
    return h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """The digest of all weights. A model loaded from a folder remembers it in the kvshelf cache folder by
    its files' (path, size, mtime, inode), the library versions and dtypes, and a cheap sample of the
    weights in memory (so weights changed after loading are hashed again): a restart does not re-hash."""
    folder = Path(str(getattr(model.config, "_name_or_path", "") or ""))
    files = weight_files(folder) if folder.is_dir() else []
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        return full_digest(model)
    import transformers

    identity = {
        "files": file_identity(files),
        "sample": sampled_digest(model),
        "dtypes": sorted({str(t.dtype) for t in model.state_dict().values()}),
        "versions": [torch.__version__, transformers.__version__],
    }
    return cached_digest("weights", identity, lambda: full_digest(model))
