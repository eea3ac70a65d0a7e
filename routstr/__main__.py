"""Composition root: argv/env → Config, logging, database, app, server, one task group.

`python -m routstr [flags]` runs the node; `python -m routstr keys|admin-token|doctor …` is the
operator's command line (`cli`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence

import anyio
from anyio.abc import Listener, SocketStream

from . import cli, demo
from .admin import check_admin_token, ensure_admin_token
from .app import Node, build_app
from .config import Config, ConfigError, listen_error, load_config, where
from .server import Server, ServerOptions, listen
from .status import setup_warnings
from .workers import WORKER_COMMAND, WorkerRole, supervise, worker_boot_id

log = logging.getLogger("routstr")


def _setup_logging(level: str, tag: str = "") -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s",
    )


def server_options(config: Config) -> ServerOptions:
    return ServerOptions(
        max_body_bytes=config.max_body_bytes,
        header_timeout=config.header_timeout,
        keepalive_timeout=config.keepalive_timeout,
        cors_origins=config.cors_origins,
    )


MIN_STRONG_ADMIN_TOKEN_CHARS = 24


def _start_up(node: Node, config: Config, *, single_process: bool) -> None:
    if config.admin_token and len(config.admin_token) < MIN_STRONG_ADMIN_TOKEN_CHARS:
        # failed tokens are slowed down but never lock the right one out, so a short token is
        # guessable: its length is the only defence
        log.warning("--admin-token is shorter than %d characters and can be guessed; use a"
                    " long random one (or none: a 192-bit token is generated)",
                    MIN_STRONG_ADMIN_TOKEN_CHARS)
    for warning in setup_warnings(config) if single_process else ():  # once, not per worker
        log.warning("%s", warning)
    token_file = ensure_admin_token(node.db, config)
    if token_file:  # the token is in that 0600 file, never in the log
        print(f"routstr: generated the admin token; it is in {os.path.abspath(token_file)}"
              " (readable by this user only; `python -m routstr admin-token show` prints it)",
              file=sys.stderr, flush=True)
    # Other workers' reservations are live: only a sole process may release them all.
    released = node.ledger.startup_sweep(single_process=single_process)
    if released:
        log.warning("released %d reservations left by a previous run", released)


async def prepare_database(config: Config) -> None:
    """`--workers N`: the supervisor's start-up work, done once before any worker runs."""
    node = Node.open(config)
    try:
        _start_up(node, config, single_process=True)
    finally:
        with anyio.CancelScope(shield=True):
            await node.aclose()


async def run_node(config: Config, worker: WorkerRole | None = None) -> None:
    """Serve until SIGTERM. `worker`: one of `--workers N` processes (see `workers`)."""
    try:  # first: a port in use or a bad host touches nothing
        listener = await listen(config.host, config.port, reuse_port=worker is not None)
    except OSError as exc:
        raise listen_error(exc, config.host, config.port) from exc
    async with listener, anyio.create_task_group() as demo_tg:
        if config.demo:  # this process's own upstream, on a free loopback port
            demo_server = Server(demo.app(), dataclasses.replace(
                server_options(config), access_log="routstr.demo"))
            demo_port = await demo_tg.start(demo_server.serve, "127.0.0.1", 0)
            config = dataclasses.replace(
                config, upstream_base_url=f"http://127.0.0.1:{demo_port}/v1")
        node = Node.open(config, boot_id=worker_boot_id(os.getpid()) if worker else None)
        try:
            _start_up(node, config, single_process=worker is None)
            server = Server(build_app(node), dataclasses.replace(
                server_options(config), observer=node.platform.metrics.observe_request))
            await _serve(node, server, listener, worker)
        finally:
            with anyio.CancelScope(shield=True):
                await node.aclose()
            demo_tg.cancel_scope.cancel()
    log.info("stopped")


async def _serve(node: Node, server: Server, listener: Listener[SocketStream],
                 worker: WorkerRole | None) -> None:
    config = node.config
    async with anyio.create_task_group() as tg:
        jobs = worker is None or worker.runs_jobs
        if not jobs:
            # The jobs process checkpoints the shared WAL from a thread; sqlite's automatic
            # checkpoint here would fsync the database file on this event loop.
            node.db.move_checkpoints_off_this_connection()
        # every process renews its own requests' holds; one releases the expired ones
        tg.start_soon(functools.partial(node.sweep_forever, release_expired=jobs))
        tg.start_soon(functools.partial(node.rates_forever, jobs=jobs))
        if jobs:  # background jobs: in exactly one process
            tg.start_soon(node.checkpoint_forever)
            if config.relays:
                tg.start_soon(node.nostr.run)
            tg.start_soon(node.wallet_forever)
            tg.start_soon(node.payout_forever)
            tg.start_soon(node.platform.run_forever)
        # The receiver stays open while draining: a second signal cannot cut the grace short.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            port = await tg.start(server.serve_on, listener)
            if worker is None:
                log.info("listening on http://%s:%d", config.host, port)
                log.info("%s", where(config, port))
            else:
                tg.start_soon(worker.watch_parent)
                worker.ready()
                log.info("worker %d of %d serving port %d (background jobs: %s)", worker.index,
                         worker.count, port, "yes" if worker.runs_jobs else "no")
            async for signum in signals:
                log.info("signal %d: shutting down (grace %.0fs)", signum, config.shutdown_grace)
                break
            await server.shutdown(config.shutdown_grace)
            tg.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] and args[0] in cli.COMMANDS:  # keys, admin-token, doctor: the operator's
        return cli.main(args, os.environ)
    worker = None
    if args[:1] == [WORKER_COMMAND]:  # started by the --workers supervisor
        worker, args = WorkerRole.parse(args[1:])
    try:
        config = load_config(args, os.environ)
        check_admin_token(config.admin_token)
    except ConfigError as exc:
        print(f"routstr: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config.log_level, "" if worker is None else f"[w{worker.index}]")
    failure: ConfigError | None = None
    try:
        if worker is None and config.workers > 1:
            return supervise(config, args, prepare_database)
        anyio.run(run_node, config, worker)
    except* ConfigError as group:  # the node could not start: a setting to fix, not a bug
        failure = _first(group)
    if failure is not None:
        log.debug("start-up failed", exc_info=failure)
        print(f"routstr: {failure}", file=sys.stderr)
        return 2
    return 0


def _first(group: BaseExceptionGroup[ConfigError]) -> ConfigError:
    found = group.exceptions[0]
    return _first(found) if isinstance(found, BaseExceptionGroup) else found


if __name__ == "__main__":
    sys.exit(main())
