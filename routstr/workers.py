"""`--workers N`: N processes serving one port and sharing the one sqlite file.

The process started with ``--workers N`` (N > 1) is a small supervisor that serves nothing:

1. It prepares the database once, while no worker runs yet (`prepare`, from `__main__`):
   opens the node (migrations, first-start secrets such as the wallet seed and the admin
   token), runs the start-up sweep in single-process mode (every reservation still held
   belongs to a previous run, so all are released), and closes it again.
2. With ``--port 0`` it binds a free port with ``SO_REUSEPORT`` and keeps that socket bound
   but not listening, so the port stays ours; the kernel spreads new connections over the
   *listening* sockets of the same port only, i.e. over the workers.
3. It starts the workers, ``python -m routstr _worker INDEX COUNT READY_FD PARENT_PID <the same
   flags> --port P``. Each opens its own listener on P with ``SO_REUSEPORT`` and writes one
   byte to its ready pipe. Worker 0, and only worker 0, runs the background jobs (expiry
   sweep, wallet recovery and invoice settlement, …): a restarted worker keeps its index, so
   at no moment do two processes run them.
4. Once every worker is ready it logs ``listening on http://HOST:PORT (N workers)``.
5. SIGTERM/SIGINT: it sends SIGTERM once to each worker (each drains its connections within
   ``--shutdown-grace``), waits, then SIGKILLs stragglers. A worker that exits on its own is
   restarted after `RESTART_DELAY_S`; more than `MAX_RESTARTS` restarts within
   `RESTART_WINDOW_S` stop the whole node with exit code 1 (systemd restarts the service).

Workers run in a session of their own (a terminal's Ctrl-C reaches only the supervisor, which
forwards it once) and shut down by themselves when the supervisor disappears (their parent
pid changes). A worker killed outright leaves its in-flight reservations held until the
periodic expiry sweep (``--reservation-ttl``): the other workers share the database and
cannot tell a dead worker's reservation from a live one. Wallet operations (write-ahead mint
calls) carry their owner process and a lease in their row (`walletstore.process_owner`): a
worker reconciles another's operation only once that worker is gone or the lease ran out.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio

from .config import Config, listen_error, where
from .db import Database
from .ledger import Ledger

log = logging.getLogger("routstr.workers")

WORKER_COMMAND = "_worker"
READY_TIMEOUT_S = 60.0
RESTART_DELAY_S = 1.0
RESTART_WINDOW_S = 60.0
MAX_RESTARTS = 5
KILL_MARGIN_S = 5.0
POLL_S = 0.2
PARENT_CHECK_S = 1.0

Prepare = Callable[[Config], Awaitable[None]]


def worker_boot_id(pid: int) -> str:
    """The ledger owner id of a worker's reservations: the supervisor knows its workers' pids,
    so it can release what a dead one held at once (a pid is reused only after the release)."""
    return f"worker-{pid}"


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process was told by its supervisor (parsed from its argv)."""

    index: int
    count: int
    ready_fd: int
    parent_pid: int

    @property
    def runs_jobs(self) -> bool:
        return self.index == 0

    @classmethod
    def parse(cls, argv: Sequence[str]) -> tuple[WorkerRole, list[str]]:
        """``INDEX COUNT READY_FD PARENT_PID flags…`` → (role, flags)."""
        if len(argv) < 4 or not all(a.isdigit() for a in argv[:4]):
            raise ValueError("usage: _worker INDEX COUNT READY_FD PARENT_PID [flags]")
        index, count, fd, ppid = (int(a) for a in argv[:4])
        return cls(index, count, fd, ppid), list(argv[4:])

    def ready(self) -> None:
        """Tell the supervisor this worker listens (once; a supervisor gone is not an error)."""
        try:
            os.write(self.ready_fd, b"R")
        except OSError:
            pass
        try:
            os.close(self.ready_fd)
        except OSError:
            pass

    async def watch_parent(self) -> None:
        """Shut this worker down (as on SIGTERM) once its supervisor is gone."""
        while True:
            await anyio.sleep(PARENT_CHECK_S)
            if os.getppid() != self.parent_pid:
                break
        log.warning("supervisor %d gone: worker %d shutting down", self.parent_pid, self.index)
        os.kill(os.getpid(), signal.SIGTERM)


def _reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind (not listen) a SO_REUSEPORT socket: a port in use or a bad host fails here, once,
    before any worker starts; for port 0 it also picks the free port the workers share."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise listen_error(exc, host, port) from exc
    return sock, int(sock.getsockname()[1])


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_r = -1

    def start(self, count: int, flags: Sequence[str], port: int) -> None:
        ready_r, ready_w = os.pipe()
        cmd = [sys.executable, "-m", "routstr", WORKER_COMMAND, str(self.index), str(count),
               str(ready_w), str(os.getpid()), *flags, "--port", str(port)]
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(ready_w,), start_new_session=True)  # noqa: S603
        finally:
            os.close(ready_w)
        self.ready_r = ready_r

    def wait_ready(self, deadline: float) -> bool:
        """Block until the worker reported ready (True) or died / the deadline passed."""
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                readable, _, _ = select.select([self.ready_r], [], [], min(left, POLL_S))
                if readable:
                    return os.read(self.ready_r, 1) == b"R"
        finally:
            os.close(self.ready_r)
            self.ready_r = -1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            assert self.proc is not None
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass


class Supervisor:
    def __init__(self, config: Config, flags: Sequence[str], prepare: Prepare) -> None:
        self.config = config
        self.prepare = prepare
        self.flags = list(flags)
        self.workers = [_Worker(i) for i in range(config.workers)]
        self._stop_signal = 0
        self._restarts: list[float] = []

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop_signal = self._stop_signal or signum

    def run(self) -> int:
        c = self.config
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        placeholder, port = _reserve_port(c.host, c.port)  # first: a port in use touches nothing
        try:
            anyio.run(self.prepare, c)
            for w in self.workers:
                w.start(c.workers, self.flags, port)
            deadline = time.monotonic() + READY_TIMEOUT_S
            if not all(w.wait_ready(deadline) for w in self.workers):
                log.error("a worker did not start; stopping")
                self._stop_all()
                return 1
            log.info("listening on http://%s:%d (%d workers)", c.host, port, c.workers)
            log.info("%s", where(c, port))
            code = self._supervise(port)
            self._stop_all()
            log.info("stopped")
            return code
        finally:
            placeholder.close()

    def _supervise(self, port: int) -> int:
        while not self._stop_signal:
            for w in self.workers:
                if w.alive() or self._stop_signal:
                    continue
                assert w.proc is not None
                log.warning("worker %d exited with %s; restarting", w.index, w.proc.returncode)
                self._release_held_by(w.proc.pid)
                now = time.monotonic()
                self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
                self._restarts.append(now)
                if len(self._restarts) > MAX_RESTARTS:
                    log.error("%d worker restarts within %.0fs: stopping", len(self._restarts),
                              RESTART_WINDOW_S)
                    return 1
                time.sleep(RESTART_DELAY_S)
                w.start(self.config.workers, self.flags, port)
                if not w.wait_ready(time.monotonic() + READY_TIMEOUT_S):
                    log.warning("restarted worker %d did not report ready", w.index)
            time.sleep(POLL_S)
        log.info("signal %d: stopping %d workers", self._stop_signal, len(self.workers))
        return 0

    def _release_held_by(self, pid: int) -> None:
        """The dead worker's requests can never settle: release their reservations now rather
        than when they expire."""
        db = Database(self.config.database)
        try:
            released = Ledger(db).release_owner(worker_boot_id(pid))
        finally:
            db.close()
        if released:
            log.warning("released %d reservations held by the dead worker", released)

    def _stop_all(self) -> None:
        for w in self.workers:
            w.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace + KILL_MARGIN_S
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in time: killing it", w.index)
                w.proc.kill()
                w.proc.wait()


def supervise(config: Config, flags: Sequence[str], prepare: Prepare) -> int:
    """Run the node as `config.workers` worker processes; returns the exit code.

    `prepare(config)` runs first, alone: migrations, first-start secrets, start-up sweep."""
    return Supervisor(config, flags, prepare).run()
