"""Pytest fixtures around a real Nutshell test mint (tests/mint/start-mint.sh).

- `mint_url` / `mint_url_fee`: one mint per session each (input_fee_ppk 0 and 100), on a free
  port with a temporary data dir, stopped at session end.
- `wallet_tool`: the reference (Nutshell) wallet, run with the mint venv's python.
- `MintProcess`: start / pause (SIGSTOP) / resume / kill / restart a mint on the same port and
  data dir, for outage tests (same keys, same spent-proof records after a restart).

The mint lives in its own virtual environment (`MINT_VENV`, default `.cache/mint-venv` in the
repository): `cashu` pins h11<0.15 and must never share the node's venv. `mint_url_current` /
`wallet_tool_current`: Nutshell 0.21.0 (NUT-11's current SIG_ALL message, keyset ids v2), in
`.cache/mint-venv-0.21.0`, for the tests that need the newer mint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
MINT_DIR = REPO / "tests" / "mint"
START_MINT = MINT_DIR / "start-mint.sh"
WALLET_TOOL = MINT_DIR / "wallet_tool.py"
MINT_VENV = Path(os.environ.get("MINT_VENV") or REPO / ".cache" / "mint-venv")
DEFAULT_CASHU = "0.19.2"
CURRENT_CASHU = "0.21.0"


def venv_for(cashu: str) -> Path:
    """The mint venv of one Nutshell version (start-mint.sh builds it on first use)."""
    return MINT_VENV if cashu == DEFAULT_CASHU else REPO / ".cache" / f"mint-venv-{cashu}"

#: First start may build the venv (~1 min); later starts take ~2-5 s.
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 10.0
WALLET_TOOL_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as dead: the mint is not our child to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class MintProcess:
    """One Nutshell mint process: port, data dir and fee stay the same across restarts."""

    def __init__(self, port: int, data_dir: Path, fee_ppk: int = 0,
                 cashu: str = DEFAULT_CASHU) -> None:
        self.port = port
        self.data_dir = Path(data_dir)
        self.fee_ppk = fee_ppk
        self.cashu = cashu
        self.url = f"http://127.0.0.1:{port}"
        self.pid: int | None = None

    @classmethod
    def fresh(cls, fee_ppk: int = 0, cashu: str = DEFAULT_CASHU) -> MintProcess:
        data = Path(tempfile.mkdtemp(prefix=f"mint-{fee_ppk}-"))
        return cls(free_port(), data, fee_ppk, cashu)

    def start(self) -> MintProcess:
        env = dict(os.environ, MINT_VENV=str(venv_for(self.cashu)), MINT_CASHU=self.cashu)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _port_open(self.port) and time.monotonic() < deadline:  # a previous run lingering
            time.sleep(0.1)
        out = subprocess.run(
            ["bash", str(START_MINT), str(self.port), str(self.data_dir), str(self.fee_ppk)],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"start-mint.sh failed ({out.returncode}): {out.stderr[-2000:]}")
        fields = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        self.pid = int(fields["MINT_PID"])
        return self

    def _signal(self, sig: int) -> None:
        if self.pid is not None and _alive(self.pid):
            os.kill(self.pid, sig)

    def pause(self) -> None:
        """Hang the mint (connections are accepted by the kernel, nothing answers)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the mint (SIGTERM, then SIGKILL after a bounded wait); connections are refused."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        if not _alive(pid):
            return
        os.kill(pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
        os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> MintProcess:
        self.stop()
        return self.start()

    def log(self) -> str:
        try:
            return (self.data_dir / "mint.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


class WalletTool:
    """The Nutshell reference wallet (tests/mint/wallet_tool.py), ~2 s per call."""

    def __init__(self, python: Path = MINT_VENV / "bin" / "python") -> None:
        self.python = python

    def run(self, mint_url: str, cmd: str, arg: str, wallet_dir: str | None = None) -> str:
        """One command in a fresh wallet, or in the wallet kept in `wallet_dir` (its keys)."""
        out = subprocess.run(
            [str(self.python), str(WALLET_TOOL), mint_url, cmd, arg],
            env=dict(os.environ, CASHU_DIR=wallet_dir or tempfile.mkdtemp(prefix="wallet-tool-")),
            capture_output=True,
            text=True,
            timeout=WALLET_TOOL_TIMEOUT_S,
            check=False,
        )
        lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"wallet_tool {cmd} failed ({out.returncode}): {out.stderr[-3000:]}")
        return lines[-1].strip()

    def mint_token(self, mint_url: str, sats: int) -> str:
        return self.run(mint_url, "mint", str(sats))

    def receive(self, mint_url: str, token: str) -> int:
        return int(self.run(mint_url, "receive", token).split()[0])

    def state(self, mint_url: str, token: str) -> list[str]:
        return self.run(mint_url, "state", token).split()

    def lock(self, mint_url: str, sats: int, pubkey: str, **spec: Any) -> str:
        """A token worth `sats` locked (NUT-11 P2PK) by Nutshell's wallet: to `pubkey`, with
        `sig_all`, `n_sigs`, `pubkeys`, `locktime`, `refund` as given."""
        return self.run(mint_url, "lock",
                        json.dumps({"amount": sats, "pubkey": pubkey, **spec})).strip()

    def receive_locked(self, mint_url: str, token: str, wallet_dir: str | None = None) -> int:
        """Nutshell's wallet redeeming a locked token with its key (a fresh wallet's, or the
        one kept in `wallet_dir`): raises unless the lock lets that key (or anyone) spend it."""
        return int(self.run(mint_url, "receive-locked", token, wallet_dir).split()[0])

    def pubkey(self, mint_url: str, wallet_dir: str) -> str:
        """The P2PK public key of the Nutshell wallet kept in `wallet_dir`."""
        return self.run(mint_url, "pubkey", "-", wallet_dir)


def _session_mint(fee_ppk: int, cashu: str = DEFAULT_CASHU) -> Iterator[MintProcess]:
    proc = MintProcess.fresh(fee_ppk, cashu).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def mint_process() -> Iterator[MintProcess]:
    """The session's fee-less mint as a process handle (do not stop it in a test)."""
    yield from _session_mint(0)


@pytest.fixture(scope="session")
def mint_process_fee() -> Iterator[MintProcess]:
    """The session's mint charging input_fee_ppk=100 (0.1 sat per input, rounded up per swap)."""
    yield from _session_mint(100)


@pytest.fixture(scope="session")
def mint_process_current() -> Iterator[MintProcess]:
    """A fee-less mint of Nutshell 0.21.0 (NUT-11's current SIG_ALL message)."""
    yield from _session_mint(0, CURRENT_CASHU)


@pytest.fixture(scope="session")
def mint_url_current(mint_process_current: MintProcess) -> str:
    return mint_process_current.url


@pytest.fixture(scope="session")
def wallet_tool_current(mint_process_current: MintProcess) -> WalletTool:
    """Nutshell 0.21.0's wallet (its venv exists once its mint has started)."""
    return WalletTool(venv_for(CURRENT_CASHU) / "bin" / "python")


@pytest.fixture(scope="session")
def mint_url(mint_process: MintProcess) -> str:
    return mint_process.url


@pytest.fixture(scope="session")
def mint_url_fee(mint_process_fee: MintProcess) -> str:
    return mint_process_fee.url


@pytest.fixture()
def own_mint() -> Iterator[MintProcess]:
    """A private mint for one test (outage tests may pause, kill and restart it)."""
    yield from _session_mint(0)


@pytest.fixture(scope="session")
def wallet_tool() -> WalletTool:
    return WalletTool()


class UrllibTransport:
    """A `routstr.cashu.mint.Transport` on stdlib urllib in a worker thread (tests only).

    Independent of the node's HTTP client, so the wallet can be tested on its own; the
    node's adapter (`routstr.walletstore.client_transport`) is tested separately.
    Connection refused -> ConnectionRefusedError (never delivered); timeout -> TimeoutError.
    """

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self.calls = 0

    def _sync(self, method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        import urllib.error

        headers = {"accept": "application/json"}
        if body is not None:
            headers["content-type"] = "application/json"
        req = urllib.request.Request(url, data=body, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ConnectionRefusedError):
                raise ConnectionRefusedError(str(reason)) from exc
            if isinstance(reason, TimeoutError | socket.timeout):
                raise TimeoutError(str(reason)) from exc
            if isinstance(reason, OSError):
                raise ConnectionResetError(str(reason)) from exc
            raise ConnectionError(str(reason)) from exc
        except TimeoutError as exc:
            raise TimeoutError(str(exc)) from exc

    async def __call__(self, method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        import anyio.to_thread

        self.calls += 1
        return await anyio.to_thread.run_sync(self._sync, method, url, body)


def wait_http(url: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url + "/v1/info", timeout=1).close()  # noqa: S310
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


__all__ = ["MintProcess", "UrllibTransport", "WalletTool", "free_port", "wait_http"]
