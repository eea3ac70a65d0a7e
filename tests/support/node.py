"""Run the real node (`python -m routstr`) as a subprocess on 127.0.0.1, port 0.

The node logs `listening on http://HOST:PORT` once it accepts connections; the fixture reads
the port from its log file (stderr goes to a file, so the pipe can never fill up).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0
#: The BTC/USD rate a test node is pinned at unless told otherwise: the built-in USD list prices
#: are then whole msats (gpt-4o-mini: $0.15 / $0.60 per 1M → 150 / 600 msats per 1k tokens).
TEST_BTC_USD = 100_000
_LISTEN = re.compile(r"listening on (http://[\d.]+:\d+)")


class NodeProcess:
    def __init__(self, workdir: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.args = args
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log_path = workdir / f"node-{id(self)}.log"
        self.database = str(workdir / "node.sqlite3")
        self.started_at = 0.0
        self.ready_after = 0.0

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def start(self) -> NodeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("UPSTREAM_", "CASHU_"))}
        env.update(self.env)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [
            sys.executable,
            "-m",
            "routstr",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--database",
            self.database,
            *self.args,
        ]
        if not {"--btc-usd", "--price-feeds"} & set(self.args) \
                and not {"BTC_USD", "PRICE_FEEDS"} & set(self.env):
            cmd += ["--btc-usd", str(TEST_BTC_USD)]  # no exchange is reachable from tests
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=self.log, env=env, cwd=self.workdir
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = _LISTEN.search(self.log_text())
            if match:
                self.url = match.group(1)
                self.ready_after = time.monotonic() - self.started_at
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"node did not start in {START_TIMEOUT_S}s:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """A plain urllib call (no SDK) returning (status, headers, body)."""
        data = None
        hdrs = dict(headers or {})
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()

    def json(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        status, _, raw = self.request(method, path, body, headers)
        return status, json.loads(raw) if raw else None


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[NodeProcess] = []

    def make(
        *args: str,
        env: dict[str, str] | None = None,
        workdir: Path | None = None,
        start: bool = True,
    ) -> NodeProcess:
        node = NodeProcess(workdir or tmp_path, list(args), env)
        started.append(node)
        return node.start() if start else node

    yield make
    for node in started:
        if node.proc is not None and node.proc.poll() is None:
            node.kill()
        if node.proc is not None:
            node.log.close()
