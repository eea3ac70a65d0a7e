"""/health checks for real: the database takes a write, the upstream answers, every mint
answers /v1/info — and a failing one makes the node unhealthy (503), naming it."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.support.upstream import ScriptedUpstream


class FakeMint:
    """Answers GET /v1/info like a Cashu mint (and 404 to everything else)."""

    def __init__(self) -> None:
        self.info_requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/v1/info":
                    outer.info_requests += 1
                    body = json.dumps({"name": "fake mint", "version": "test/0"}).encode()
                    self.send_response(200)
                else:
                    body = b'{"detail": "not found", "code": 0}'
                    self.send_response(404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mint() -> Iterator[FakeMint]:
    m = FakeMint()
    yield m
    m.close()


def dead_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_healthy_node_checks_everything(node_factory: Any, upstream: ScriptedUpstream,
                                        mint: FakeMint) -> None:
    node = node_factory("--upstream-base-url", upstream.url, "--cashu-mints", mint.url)
    before = time.time()
    status, doc = node.json("GET", "/health")
    assert status == 200 and doc["status"] == "healthy", doc
    assert doc["checks"] == {"database": "ok", "upstream": "ok", "mint": "ok", "btc_usd": "ok"}
    assert mint.info_requests >= 1
    assert any(r.path == "/v1/models" for r in upstream.requests)
    conn = sqlite3.connect(node.database)
    try:  # the database check wrote its row
        (at,) = conn.execute("SELECT at FROM health_probe WHERE id = 1").fetchone()
    finally:
        conn.close()
    assert at >= before - 1


def test_what_cannot_serve_is_warned_at_start_and_degrades_health(node_factory: Any) -> None:
    """No upstream (every chat 503), no mint (no Cashu payment), relays but no public URL
    (nothing announced): each is a warning in the start-up log and a reason on /health."""
    node = node_factory("--relays", "ws://127.0.0.1:9")
    status, doc = node.json("GET", "/health")
    assert status == 200 and doc["status"] == "degraded", doc
    assert doc["checks"]["upstream"] == "not_configured"
    reasons = doc["reasons"]
    assert len(reasons) == 3 and "no upstream" in reasons[0] and "--demo" in reasons[0]
    assert "no trusted mint" in reasons[1] and "nothing will be announced" in reasons[2]
    warned = [line for line in node.log_text().splitlines() if " WARNING " in line]
    for reason in reasons:
        assert any(line.endswith(reason) for line in warned), (reason, warned)
    assert node.json("POST", "/v1/chat/completions",
                     {"model": "gpt-4o-mini", "messages": []})[0] in (401, 503)


def test_an_upstream_without_a_key_is_only_warned(node_factory: Any, upstream: ScriptedUpstream,
                                                  mint: FakeMint) -> None:
    node = node_factory("--upstream-base-url", upstream.url, "--cashu-mints", mint.url)
    assert node.json("GET", "/health")[1]["status"] == "healthy"
    assert "the upstream has no API key" in node.log_text()
    keyed = node_factory("--upstream-base-url", upstream.url, "--cashu-mints", mint.url,
                         "--upstream-api-key", "sk-upstream-secret")
    assert "no API key" not in keyed.log_text() and "sk-upstream-secret" not in keyed.log_text()


def test_failing_dependencies_make_it_unhealthy(node_factory: Any, mint: FakeMint) -> None:
    dead = dead_url()
    node = node_factory("--upstream-base-url", dead_url() + "/v1",
                        "--cashu-mints", f"{mint.url},{dead}")
    status, doc = node.json("GET", "/health")
    assert status == 503 and doc["status"] == "unhealthy"
    assert doc["checks"]["database"] == "ok"
    assert doc["checks"]["upstream"].startswith("error")
    mint_check = doc["checks"]["mint"]
    assert mint_check.startswith("error") and dead.removeprefix("http://") in mint_check
    assert mint.url.removeprefix("http://") not in mint_check


def test_database_that_takes_no_write_is_unhealthy(node_factory: Any) -> None:
    node = node_factory()
    assert node.json("GET", "/health")[0] == 200
    blocker = sqlite3.connect(node.database, timeout=1, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # hold the write lock past the node's busy timeout
        status, doc = node.json("GET", "/health")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert status == 503 and doc["checks"]["database"].startswith("error")
    assert "locked" in doc["checks"]["database"]
    assert node.json("GET", "/health")[0] == 200
