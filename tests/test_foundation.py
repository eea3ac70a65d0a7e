"""The real node process: configuration, /health and /v1/info over curl, SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from routstr.config import Config, ConfigError, env_example, load_config

ROOT = Path(__file__).resolve().parents[1]


def run_main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "routstr", *args], capture_output=True, text=True,
                          env=full_env, timeout=30, cwd=ROOT)


def test_flags_win_over_env_over_defaults() -> None:
    env = {"UPSTREAM_BASE_URL": "http://env.example/v1", "PORT": "9001", "CASHU_MINTS": "http://a/, http://b"}
    c = load_config(["--port", "9002"], env)
    assert c.port == 9002
    assert c.upstream_base_url == "http://env.example/v1"
    assert c.cashu_mints == ("http://a", "http://b")
    assert c.primary_mint == "http://a"
    d = load_config([], {})
    assert (d.host, d.port, d.database, d.max_body_bytes, d.cors_origins) == (
        "127.0.0.1", 8000, "routstr.sqlite3", 10 * 1024 * 1024, ("*",))


@pytest.mark.parametrize("args", [["--port", "70000"], ["--port", "abc"],
                                  ["--upstream-base-url", "ftp://x"], ["--log-level", "LOUD"],
                                  ["--max-body-bytes", "-1"], ["--cashu-mints", "nope"]])
def test_invalid_values_raise_one_clear_error(args: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(args, {})
    assert args[0] in str(info.value)


def test_invalid_value_exits_2_with_one_line() -> None:
    proc = run_main("--port", "70000")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--port" in proc.stderr


def test_help_lists_every_setting_with_env_and_default() -> None:
    proc = run_main("--help")
    assert proc.returncode == 0
    for name in Config.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in proc.stdout
        assert name.upper() in proc.stdout
    assert "default: 8000" in proc.stdout


def test_env_example_covers_every_setting() -> None:
    text = env_example()
    for name in Config.__dataclass_fields__:
        assert f"#{name.upper()}=" in text
    assert (ROOT / "contrib" / "routstr.env.example").read_text() == text


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_health_and_info(node_factory: Any) -> None:
    node = node_factory("--name", "TestNode", "--onion-url", "http://abc.onion")
    out = subprocess.run(["curl", "-si", f"{node.url}/health"], capture_output=True, text=True,
                         timeout=10).stdout
    head, _, body = out.partition("\n\n")
    assert head.startswith("HTTP/1.1 200")
    doc = json.loads(body)
    # served, but with no upstream or mint configured: degraded, with the reasons
    assert doc["status"] == "degraded" and set(doc["checks"]) == {"database", "upstream", "mint",
                                                                  "btc_usd"}
    assert len(doc["reasons"]) == 2
    assert {"version", "timestamp"} <= set(doc)
    status, info = node.json("GET", "/v1/info")
    assert status == 200
    assert info["name"] == "TestNode" and info["onion_url"] == "http://abc.onion"
    assert {"description", "version", "npub", "mints", "http_url", "child_key_cost_msats"} <= set(info)


def test_sigterm_with_request_in_flight_exits_0(node_factory: Any) -> None:
    node = node_factory("--header-timeout", "5")
    s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers not finished yet: in flight
    time.sleep(0.2)
    t0 = time.monotonic()
    rc = node.stop(signal.SIGTERM)
    assert rc == 0
    assert time.monotonic() - t0 < 12
    s.close()
    assert "stopped" in node.log_text()


def test_access_log_line(node_factory: Any) -> None:
    node = node_factory()
    node.request("GET", "/v1/info?initial_balance_token=cashuBsecret", headers={"X-Request-ID": "abc-123"})
    node.stop()
    lines = [ln for ln in node.log_text().splitlines() if "routstr.access" in ln]
    assert any("abc-123" in ln and "GET /v1/info 200" in ln for ln in lines)
    assert "cashuBsecret" not in node.log_text()
