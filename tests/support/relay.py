"""A real Nostr relay on loopback for tests: `nostr-relay` from PyPI, in its own venv.

The relay lives in its own virtual environment (`RELAY_VENV`, default `.cache/relay-venv` in the
repository, git-ignored), created on first use from `tests/relay/constraints.txt` (~30 s once);
`nostr-relay -c CONFIG serve` then starts in ~1.5 s, bound to 127.0.0.1 and a free port, with a
SQLite file in a temporary directory. The relay checks every event's id and signature before it
stores it (its `is_signed` validator), so what it stores was accepted by an independent
implementation of NIP-01 and BIP-340.

- `RelayProcess`: start / stop / restart (optionally on a fresh database) on the same port.
- `relay`: one relay per test module; `own_relay`: one for a single test (restart tests).
- `RelayProcess.query` / `.publish`: an independent client (`tests/relay/relay_tool.py`, run
  with the relay venv's python and its `websockets` package).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RELAY_DIR = REPO / "tests" / "relay"
RELAY_TOOL = RELAY_DIR / "relay_tool.py"
CONSTRAINTS = RELAY_DIR / "constraints.txt"
RELAY_VENV = Path(os.environ.get("RELAY_VENV") or REPO / ".cache" / "relay-venv")
NOSTR_RELAY_VERSION = "1.14"

INSTALL_TIMEOUT_S = 600.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
TOOL_TIMEOUT_S = 30.0

_CONFIG = """\
DEBUG: false
relay_name: routstr test relay
relay_description: loopback relay for routstr tests
storage:
  sqlalchemy.url: sqlite+aiosqlite:///{db}
  num_concurrent_reqs: 4
  num_concurrent_adds: 1
  validators:
    - nostr_relay.validators.is_not_too_large
    - nostr_relay.validators.is_signed
    - nostr_relay.validators.is_recent
gunicorn:
  bind: 127.0.0.1:{port}
  workers: 1
  loglevel: warning
  reload: false
  control_socket_disable: true
authentication:
  enabled: false
message_timeout: 1800
subscription_limit: 32
max_limit: 6000
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def ensure_relay_venv() -> Path:
    """The relay's venv, created on first use (pinned by tests/relay/constraints.txt)."""
    exe = RELAY_VENV / "bin" / "nostr-relay"
    if exe.exists():
        return RELAY_VENV
    RELAY_VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["python3", "-m", "venv", str(RELAY_VENV)], check=True,
                   timeout=INSTALL_TIMEOUT_S)
    subprocess.run(
        [str(RELAY_VENV / "bin" / "pip"), "install", "-q", "-c", str(CONSTRAINTS),
         f"nostr-relay=={NOSTR_RELAY_VERSION}"],
        check=True, timeout=INSTALL_TIMEOUT_S,
    )
    return RELAY_VENV


class RelayProcess:
    """One nostr-relay (gunicorn master + worker, in a process group of its own)."""

    def __init__(self, port: int | None = None, data_dir: Path | None = None) -> None:
        self.port = port or free_port()
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="relay-"))
        self.url = f"ws://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.generation = 0

    @property
    def log_path(self) -> Path:
        return self.data_dir / "relay.log"

    def start(self) -> RelayProcess:
        venv = ensure_relay_venv()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _port_open(self.port) and time.monotonic() < deadline:  # a previous run lingering
            time.sleep(0.05)
        db = self.data_dir / f"nostr-{self.generation}.sqlite3"
        config = self.data_dir / "relay.yaml"
        config.write_text(_CONFIG.format(db=db, port=self.port))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(venv / "bin" / "nostr-relay"), "-c", str(config), "serve"],
                stdout=log, stderr=log, cwd=self.data_dir, start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _port_open(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"nostr-relay exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nostr-relay did not listen in {START_TIMEOUT_S}s:\n"
                                   f"{self.log()}")
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)  # the group we created: master and worker
            except ProcessLookupError:
                pass
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT_S)
        try:  # the worker, if it outlived its master
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, fresh: bool = False) -> RelayProcess:
        """Stop and start on the same port; `fresh`: with an empty database."""
        self.stop()
        if fresh:
            self.generation += 1
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _tool(self, cmd: str, arg: str) -> list[str]:
        out = subprocess.run(
            [str(RELAY_VENV / "bin" / "python"), str(RELAY_TOOL), self.url, cmd, arg],
            capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"relay_tool {cmd} failed ({out.returncode}): {out.stderr[-2000:]}")
        return [line for line in out.stdout.splitlines() if line.strip()]

    def query(self, flt: dict[str, Any]) -> list[dict[str, Any]]:
        """Stored events matching `flt`, read by an independent client."""
        return [json.loads(line) for line in self._tool("req", json.dumps(flt))]

    def publish(self, event: dict[str, Any]) -> list[Any]:
        """The relay's answer (["OK", id, accepted, message]) to publishing `event`."""
        lines = self._tool("publish", json.dumps(event))
        return list(json.loads(lines[-1])) if lines else []

    def wait_for(self, flt: dict[str, Any], timeout: float = 10.0,
                 pred: Any = None) -> list[dict[str, Any]]:
        """Poll `query(flt)` until it returns something (matching `pred`) or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.query(flt) if pred is None or pred(e)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.2)


@pytest.fixture(scope="module")
def relay() -> Iterator[RelayProcess]:
    proc = RelayProcess().start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(proc.data_dir, ignore_errors=True)


@pytest.fixture
def own_relay() -> Iterator[RelayProcess]:
    proc = RelayProcess().start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(proc.data_dir, ignore_errors=True)


__all__ = ["RelayProcess", "ensure_relay_venv", "free_port", "own_relay", "relay"]
