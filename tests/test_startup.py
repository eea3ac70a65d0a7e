"""Start-up failures an operator meets on a first start: each is one line on stderr saying what
is wrong and what to do, exit code 2, no traceback (`LOG_LEVEL=DEBUG` adds it).

The node runs as a real `python -m routstr` subprocess; a port in use is a real listener."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.node import ROOT, TEST_BTC_USD

QUIET = ["--admin-token", "t" * 32, "--btc-usd", str(TEST_BTC_USD), "--host", "127.0.0.1"]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("UPSTREAM_", "CASHU_", "DATABASE", "PRICING", "LOG_LEVEL"))}
    environ.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "routstr", *QUIET, *args], cwd=cwd,
                          env=environ, capture_output=True, text=True, timeout=30)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def one_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("routstr: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_in_use(tmp_path: Path, busy_port: int, workers: str) -> None:
    result = run(["--port", str(busy_port), "--workers", workers], tmp_path)
    one_line(result, f"port {busy_port}", "already in use", "--port")


@pytest.mark.parametrize(("host", "fragments"), [
    ("no-such-host.invalid", ("'no-such-host.invalid'", "resolve", "127.0.0.1")),
    ("192.0.2.1", ("not an address of this machine",)),  # TEST-NET-1: never local
])
def test_bad_host(tmp_path: Path, host: str, fragments: tuple[str, ...]) -> None:
    one_line(run(["--port", "0", "--host", host], tmp_path), *fragments)


def test_missing_pricing_file(tmp_path: Path) -> None:
    one_line(run(["--port", "0", "--pricing", str(tmp_path / "prices.toml")], tmp_path),
             "cannot read the pricing file", "No such file", "--pricing")


@pytest.mark.parametrize(("text", "fragment"), [
    ("models = [", "Invalid value"),
    ('[models."x"]\ninput_usd_per_1m = -1\n', "models.x.input_usd_per_1m"),
])
def test_bad_pricing_file(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "prices.toml").write_text(text)
    one_line(run(["--port", "0", "--pricing", "prices.toml"], tmp_path),
             "pricing file prices.toml", fragment)


def test_database_in_a_missing_directory(tmp_path: Path) -> None:
    one_line(run(["--port", "0", "--database", str(tmp_path / "no" / "node.sqlite3")],
                 tmp_path), "cannot open the database", "--database",
             "directory this user can write")
    assert not (tmp_path / "no").exists()


def test_database_that_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not sqlite " * 20)
    one_line(run(["--port", "0", "--database", "notes.txt"], tmp_path),
             "cannot open the database notes.txt", "not a database", "node's sqlite database")
    assert (tmp_path / "notes.txt").read_text() == "not sqlite " * 20


@pytest.mark.parametrize("workers", ["1", "2"])
def test_debug_adds_the_traceback(tmp_path: Path, busy_port: int, workers: str) -> None:
    result = run(["--port", str(busy_port), "--workers", workers], tmp_path,
                 LOG_LEVEL="DEBUG")
    assert result.returncode == 2, result.stderr
    assert "Traceback" in result.stderr and "Address already in use" in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"routstr: port {busy_port} on")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_log_says_where_the_dashboard_and_the_database_are(node_factory: Any,
                                                               workers: str) -> None:
    node = node_factory("--workers", workers)
    lines = [line for line in node.log_text().splitlines() if "dashboard:" in line]
    assert len(lines) == 1, node.log_text()
    assert lines[0].endswith(f"dashboard: {node.url}/admin/ · database: {node.database}")
    status, _, page = node.request("GET", "/admin/", None, {"Accept": "text/html"})
    assert status == 401 and b"<form" in page  # the login form: the URL leads to the dashboard
