"""The digest a stored object's header lists for each layer segment (kvshelf.storage.format): BLAKE3-256 in an
object with a MAC (collision-resistant: the MAC covers the head only), xxh3-128 in one without (damage only: without
a MAC the store is trusted as is, and xxh3 is ~6x faster).

Both hash a large segment with the GIL released: a layerwise loader's tier workers check every layer range they
read (~1,500 segments of ~350 KB per 12K-token Llama-3-8B request) while the model's forward launches kernels on
another thread, and each launch waits for the GIL. xxhash's one-shot xxh3_128_digest holds the GIL throughout
(~18 us per such segment); its hasher object's update releases it, and gives the same digest (issue #17, ninth
session; BENCHMARKS.md).
"""

from __future__ import annotations

import xxhash
from blake3 import blake3

_THREADED_DIGEST = 4 << 20  # segments at least this large are hashed on several threads (BLAKE3)
_RELEASED_DIGEST = 64 << 10  # segments at least this large are hashed by xxh3's hasher object (GIL released)


def segment_digest(segment, mac: bool) -> bytes:
    """The digest a header lists for a layer segment: BLAKE3-256 in an object with a MAC, else xxh3-128."""
    view = memoryview(segment)
    if not mac:
        if view.nbytes >= _RELEASED_DIGEST:
            return xxhash.xxh3_128(view).digest()
        return xxhash.xxh3_128_digest(view)
    threads = blake3.AUTO if view.nbytes >= _THREADED_DIGEST else 1
    return blake3(view, max_threads=threads).digest(32)
