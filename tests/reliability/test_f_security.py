"""(f) Security: admin routes are closed without the admin credential, webhook URLs that point
inside the network (SSRF) are refused, and no secret — API key, Cashu token, proof secret,
Lightning preimage, wallet seed, webhook secret, admin or upstream token — appears in any log
line of any node the whole test session started.

The log audit runs last in the session (tests/reliability/conftest.py moves it there) and
reads every ``node-*.log`` under the session's temporary directory, next to each node's
database, from which it also takes the secrets to look for (proof secrets, issued tokens,
preimages, node settings, webhook secrets). On top of those exact values it looks for the
shapes of secrets (``sk-…``, ``cashuA…``/``cashuB…``, ``nsec1…``, ``whsec_…``).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.support import ADMIN, NODE_FLAGS, UPSTREAM_KEY, FaultyUpstream, new_key
from tests.support.lnurl import LnurlService
from tests.support.minter import Minter
from tests.support.node import NodeProcess

pytestmark = pytest.mark.reliability

#: Secrets this module handled itself (the others are read from each node's database).
HANDLED: set[str] = {ADMIN, UPSTREAM_KEY}
SHAPES = [
    ("API key", re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}")),
    ("Cashu token", re.compile(r"\bcashu[AB][A-Za-z0-9_\-+/=]{16,}")),
    ("Nostr secret key", re.compile(r"\bnsec1[02-9ac-hj-np-z]{20,}")),
    ("webhook secret", re.compile(r"\bwhsec_[A-Za-z0-9]{8,}")),
    ("admin token", re.compile(r"\badm-[A-Za-z0-9_\-]{16,}")),
]


@pytest.fixture(scope="module")
def secure_node(tmp_path_factory: pytest.TempPathFactory, mint_url: str) -> Iterator[NodeProcess]:
    workdir = tmp_path_factory.mktemp("security")
    with FaultyUpstream() as upstream:
        node = NodeProcess(workdir, ["--upstream-base-url", upstream.url, "--cashu-mints",
                                     mint_url, *NODE_FLAGS, "--upstream-read-timeout", "20",
                                     "--lnurl-allow-private"]
                           ).start()
        try:
            yield node
        finally:
            node.stop()


def admin_routes(node: NodeProcess) -> list[tuple[str, str]]:
    status, doc = node.json("GET", "/openapi.json")
    assert status == 200
    out = [(m.upper(), re.sub(r"\{[^}]+\}", "1", path)) for path, ops in doc["paths"].items()
           for m in ops if path.startswith("/admin") or path == "/metrics"]
    assert len(out) >= 15, out
    return out


def test_admin_routes_closed_without_auth(node_factory: Any) -> None:
    node = node_factory(*NODE_FLAGS)  # its own node: failed logins get rate limited (429)
    user_key = new_key(node, 10_000)
    status, _ = node.json("GET", "/admin/api/keys", None, {"Authorization": f"Bearer {ADMIN}"})
    assert status == 200  # with the token the API answers
    for method, path in admin_routes(node):
        for headers in ({}, {"Authorization": "Bearer wrong-admin-token-0000000000"},
                        {"Authorization": f"Bearer {user_key}"},
                        {"Cookie": "routstr_admin=forged; session=forged"}):
            body = {} if method in ("POST", "PUT", "PATCH") else None
            status, hdrs, raw = node.request(method, path, body, headers)
            redirect_to_login = 300 <= status < 400 and "login" in hdrs.get("location", "")
            assert status in (400, 401, 403, 405, 422, 429) or redirect_to_login, \
                (method, path, headers, status, raw[:200])
            assert "set-cookie" not in hdrs, (method, path, hdrs)
            assert user_key.encode() not in raw and b"sk-" not in raw, (method, path, raw[:200])


def test_webhook_ssrf_refused(secure_node: NodeProcess) -> None:
    hits: list[bytes] = []
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def receiver() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            hits.append(conn.recv(4096))
            conn.close()

    thread = threading.Thread(target=receiver, daemon=True)
    thread.start()
    key = new_key(secure_node, 1_000_000)
    targets = [
        f"http://127.0.0.1:{port}/hook", f"http://localhost:{port}/hook", "http://127.1/",
        "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/", "http://2130706433/",
        "http://0x7f000001/", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/",
        "http://172.16.0.1/", "http://192.168.1.1/", "http://100.64.0.1/", "http://[fd00::1]/",
        "http://[fe80::1]/", "http://224.0.0.1/", "http://user:pass@example.com/",
        "ftp://example.com/", "file:///etc/passwd", "gopher://127.0.0.1:70/", "http:///x",
        "http://" + "a" * 3000 + ".com/",
    ]
    try:
        for url in targets:
            status, doc = secure_node.json("POST", "/v1/webhooks",
                                           {"url": url, "events": ["balance.low"]},
                                           {"Authorization": f"Bearer {key}"})
            assert status == 400, (url, status, doc)
            assert doc["error"]["code"].startswith(("webhook_url", "invalid_webhook")), doc
        status, doc = secure_node.json("GET", "/v1/webhooks", None,
                                       {"Authorization": f"Bearer {key}"})
        assert status == 200 and not doc.get("data", doc.get("webhooks", [])), doc
        time.sleep(0.5)
        assert hits == []
    finally:
        stop.set()
        thread.join(2)
        srv.close()


@pytest.mark.mint
def test_secret_bearing_traffic(secure_node: NodeProcess, mint_url: str, mint_url_fee: str,
                                tmp_path: Path) -> None:
    """Every kind of secret passes through the node once, so the log audit has them to find."""
    node = secure_node
    minter = Minter(tmp_path)
    lnurl = LnurlService(mint_url_fee)
    try:
        key = new_key(node, 1_000_000)
        HANDLED.add(key)
        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "scenario:ok"}],
                "max_tokens": 10}
        assert node.request("POST", "/v1/chat/completions", chat,
                            {"Authorization": f"Bearer {key}"})[0] == 200
        bearer = minter.token(mint_url, 40)
        xcashu = minter.token(mint_url, 40)
        created = minter.token(mint_url, 60)
        HANDLED.update({bearer, xcashu, created})
        HANDLED.add("sk-" + hashlib.sha256(bearer.encode()).hexdigest())
        assert node.request("POST", "/v1/chat/completions", {**chat, "stream": True},
                            {"Authorization": f"Bearer {bearer}"})[0] == 200
        status, headers, _ = node.request("POST", "/v1/chat/completions", chat,
                                          {"X-Cashu": xcashu})
        assert status == 200 and headers["x-cashu"].startswith("cashu")
        HANDLED.add(headers["x-cashu"])
        status, doc = node.json("POST", "/v1/balance/create", {"initial_balance_token": created})
        assert status == 200
        HANDLED.add(doc["api_key"])
        # a refund paid over Lightning: the mint returns a preimage
        refund_to = doc["api_key"]
        status, _, _ = node.request("POST", "/v1/chat/completions", chat,
                                    {"Authorization": f"Bearer {refund_to}",
                                     "Refund-LNURL": lnurl.address})
        assert status == 200
        status, doc = node.json("POST", "/v1/balance/refund", None,
                                {"Authorization": f"Bearer {refund_to}"})
        assert status == 200, doc
        status, doc = node.json("POST", "/v1/webhooks",
                                {"url": "https://example.com/hook", "events": ["balance.low"]},
                                {"Authorization": f"Bearer {key}"})
        if status == 201:
            HANDLED.add(doc["secret"])
        status, _ = node.json("GET", "/admin/api/keys", None,
                              {"Authorization": "Bearer adm-wrong-token-but-long-enough"})
        assert status == 401
        with sqlite3.connect(node.database) as conn:
            results = [json.loads(r) for (r,) in conn.execute(
                "SELECT result FROM wallet_ops WHERE kind = 'melt' AND state = 'done'")]
        assert any(r.get("preimage") for r in results), results  # the audit will look for it
    finally:
        lnurl.close()
        minter.close()


# ---- the audit ----------------------------------------------------------------------------------
def node_secrets(database: Path) -> set[str]:
    """Secret values a node stored: proof secrets and signatures, issued tokens, preimages,
    settings (wallet seed, Nostr key, …), webhook secrets."""
    found: set[str] = set()
    try:
        conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return found
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "wallet_proofs" in tables:
            for secret, c in conn.execute("SELECT secret, c FROM wallet_proofs"):
                found.update((secret, c))
        if "wallet_ops" in tables:
            for token, result, inputs in conn.execute(
                    "SELECT token, result, inputs FROM wallet_ops"):
                if token:
                    found.add(token)
                doc = json.loads(result or "{}")
                if isinstance(doc, dict) and doc.get("preimage"):
                    found.add(str(doc["preimage"]))
                for proof in json.loads(inputs or "[]"):
                    if isinstance(proof, dict) and proof.get("secret"):
                        found.add(str(proof["secret"]))
        if "node_settings" in tables:
            found.update(v for (v,) in conn.execute("SELECT value FROM node_settings"))
        if "webhooks" in tables:
            cols = [r[1] for r in conn.execute("PRAGMA table_info(webhooks)")]
            if "secret" in cols:
                found.update(v for (v,) in conn.execute("SELECT secret FROM webhooks"))
    except (sqlite3.Error, ValueError):
        pass
    finally:
        conn.close()
    return {s for s in found if isinstance(s, str) and len(s) >= 16}


def leaks(line: str, secrets: set[str]) -> list[str]:
    found = [what for what, shape in SHAPES if shape.search(line)]
    found += [f"value {s[:6]}…" for s in secrets if s in line]
    return found


def test_no_secret_in_any_log_line(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.getbasetemp()
    logs = sorted(base.rglob("node-*.log"))
    assert logs, f"no node logs under {base}"
    secrets = {s for s in HANDLED if len(s) >= 16}
    databases = {p for log in logs for p in log.parent.glob("*.sqlite3")}
    for db in databases:
        secrets |= node_secrets(db)
    problems: list[str] = []
    lines = 0
    for log in logs:
        for n, line in enumerate(log.read_text(errors="replace").splitlines(), 1):
            lines += 1
            for what in leaks(line, secrets):
                problems.append(f"{log.relative_to(base)}:{n}: {what}: {line[:160]}")
    print(f"log audit: {lines} lines in {len(logs)} node logs, {len(secrets)} secret values "
          f"from {len(databases)} databases")
    assert not problems, "\n".join(problems[:20])


def test_the_audit_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The audit's own check: each shape and a stored value are caught (no exceptions)."""
    samples = ["key sk-" + "a" * 32, "cashuB" + "o2F0gaJhaUgA" * 3, "nsec1" + "q" * 58,
               "whsec_" + "0" * 48, "token adm-" + "x" * 30]
    for line in samples:
        assert leaks(line, set()), line
    assert leaks("preimage " + "f" * 64, {"f" * 64})
    # No exception any more: a generated admin token goes to a 0600 file, never to the log.
    assert leaks("routstr: generated the admin token (shown only now): adm-" + "x" * 32, set())
    assert not leaks("INFO routstr.access: 3f2a… 127.0.0.1:5 POST /v1/chat/completions 200 1.0ms",
                     {"f" * 64})
