"""GPU decoding of cachegen's rANS parts (Triton). Placeholder until the kernel lands."""

from __future__ import annotations


def available(device) -> bool:
    return False
