"""The one table of remote-tier URL schemes: which store each scheme reaches and how.

The config's validation, the assembly (which builds the remote tier) and the Redis client all read it, so
a scheme cannot be accepted in one place and refused in another.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scheme:
    store: str  # "redis" or "s3"
    tls: bool = False
    cluster: bool = False
    native: str | None = None  # the scheme redis-py understands, for single-node Redis/Valkey URLs


REMOTE_SCHEMES: dict[str, Scheme] = {
    "redis": Scheme("redis", native="redis"),
    "rediss": Scheme("redis", tls=True, native="rediss"),
    "unix": Scheme("redis", native="unix"),
    "valkey": Scheme("redis", native="redis"),
    "valkeys": Scheme("redis", tls=True, native="rediss"),
    "redis-cluster": Scheme("redis", cluster=True),
    "rediss-cluster": Scheme("redis", tls=True, cluster=True),
    "valkey-cluster": Scheme("redis", cluster=True),
    "valkeys-cluster": Scheme("redis", tls=True, cluster=True),
    "s3": Scheme("s3", tls=True),
}


def url_scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def remote_scheme(url: str) -> Scheme:
    """The scheme entry of a remote_url; ValueError naming the accepted schemes when it has none."""
    scheme = url_scheme(url)
    if scheme not in REMOTE_SCHEMES:
        known = ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
        raise ValueError(f"unsupported scheme in {url!r}; use one of {known}")
    return REMOTE_SCHEMES[scheme]
