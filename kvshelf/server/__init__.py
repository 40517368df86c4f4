"""`kvshelf serve`: build the shelf from a config and run the OpenAI-compatible server with uvicorn."""

from __future__ import annotations

import ipaddress
import logging

from kvshelf.config import KVShelfConfig

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: KVShelfConfig) -> None:
    import uvicorn

    from kvshelf import metrics as metrics_mod
    from kvshelf.app import open_shelf
    from kvshelf.server.app import create_app

    if not is_loopback(config.host) and not config.api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", config.host)
    shelf = open_shelf(config)
    app = create_app(shelf, metrics_mod.configure(config.metrics_prefix))
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
