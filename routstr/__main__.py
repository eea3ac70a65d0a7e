"""Composition root: argv/env → Config, logging, database, app, server, one task group.

`python -m routstr [flags]` runs the node; `python -m routstr keys create --balance-msats N`
creates a prepaid key from the shell (printed once, stored hashed).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence

import anyio

from .app import Node, build_app
from .config import Config, ConfigError, load_config
from .server import Server, ServerOptions

log = logging.getLogger("routstr")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def server_options(config: Config) -> ServerOptions:
    return ServerOptions(
        max_body_bytes=config.max_body_bytes,
        header_timeout=config.header_timeout,
        keepalive_timeout=config.keepalive_timeout,
        cors_origins=config.cors_origins,
    )


async def run_node(config: Config) -> None:
    node = Node(config)
    server = Server(build_app(node), server_options(config))
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            port = await tg.start(server.serve, config.host, config.port)
            log.info("listening on http://%s:%d", config.host, port)
            async for signum in signals:
                log.info("signal %d: shutting down (grace %.0fs)", signum, config.shutdown_grace)
                break
        await server.shutdown(config.shutdown_grace)
        tg.cancel_scope.cancel()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args, os.environ)
    except ConfigError as exc:
        print(f"routstr: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config.log_level)
    anyio.run(run_node, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
