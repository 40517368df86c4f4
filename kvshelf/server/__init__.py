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


def uvicorn_config(app, config: KVShelfConfig, **overrides):
    """uvicorn settings that bound what one client can hold: a request head must arrive within
    read_timeout_s, idle keep-alive connections are closed after 5 s, and connections beyond what the
    queue can use are refused with 503."""
    import uvicorn

    from kvshelf.server.transport import HeadDeadlineProtocol

    settings = dict(
        host=config.host,
        port=config.port,
        log_level="info",
        timeout_keep_alive=5,
        limit_concurrency=max(64, 4 * (config.max_waiting_requests + 1)),
        server_header=False,
        timeout_graceful_shutdown=30,
        http=HeadDeadlineProtocol.with_timeout(config.read_timeout_s),
    )
    settings.update(overrides)
    return uvicorn.Config(app, **settings)


def serve(config: KVShelfConfig) -> None:
    import uvicorn

    from kvshelf import metrics as metrics_mod
    from kvshelf.app import open_shelf
    from kvshelf.server.app import create_app

    if not is_loopback(config.host) and not (config.api_key or config.api_keys_file):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", config.host)
    metrics = metrics_mod.configure(config.metrics_prefix)  # before the shelf: its generator observes into it
    shelf = open_shelf(config)
    app = create_app(shelf, metrics)
    stop_metrics = start_metrics_server(config, metrics)
    try:
        uvicorn.Server(uvicorn_config(app, config)).run()
    finally:
        stop_metrics()


def start_metrics_server(config: KVShelfConfig, metrics):
    """/metrics on its own address when `server_metrics_port` is set (then not on the API port); returns
    the function that stops it (and joins its thread)."""
    if config.server_metrics_port is None:
        return lambda: None
    from prometheus_client import start_http_server

    server, thread = start_http_server(config.server_metrics_port, addr=config.metrics_host, registry=metrics.registry)
    log.info("metrics on http://%s:%d/metrics", config.metrics_host, config.server_metrics_port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return stop
