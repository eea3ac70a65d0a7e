"""Issue 16, resources: hostile clients against the real node (subprocess, real sockets).

* 10a — garbage credentials with fresh ``Idempotency-Key``s never grow the database; a real
  key's answers are replayed and bounded per owner.
* 11 — failed admin-token checks are limited, the right token never is (``/metrics`` too).
* 15 — the generated admin token is never written to the log, only to a 0600 file.
* 16 — a slow durable commit (fsync) does not stall the event loop.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from routstr.db import Database
from routstr.errors import Conflict
from routstr.idempotency import IdempotencyStore, StoreLimits, owner_of
from routstr.keys import hash_key
from routstr.messages import Request, Response
from tests.support.minter import Minter
from tests.support.node import NodeProcess
from tests.support.upstream import ScriptedUpstream

ADMIN = "adm-hostile-resources-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CHAT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def owner_of_header(authorization: str) -> str | None:
    return owner_of(Request("POST", "/", (("authorization", authorization),)))


def is_error(doc: Any, status: int, code: str) -> bool:
    """The spec's error shape: {"error": {"type", "code", "message", ...}}."""
    err = doc.get("error") if isinstance(doc, dict) else None
    return (isinstance(err, dict) and err.get("code") == code
            and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)
            and status in (401, 429))


# --------------------------------------------------------------------------------------------
# 15: the generated admin token goes to a 0600 file next to the database, never to the log
# --------------------------------------------------------------------------------------------


def test_a_short_admin_token_is_warned_about_at_start(node_factory: Any) -> None:
    """Failures never lock the right token out (class 11), so only its length protects it."""
    short = node_factory("--admin-token", "adm-short")
    assert "--admin-token is shorter than 24 characters" in short.log_text()
    assert "adm-short" not in short.log_text()
    long = node_factory("--admin-token", "adm-" + "x" * 40)
    assert "can be guessed" not in long.log_text()


def test_generated_admin_token_is_in_a_private_file_not_in_the_log(
        node_factory: Any, tmp_path: Path) -> None:
    node = node_factory()
    token_file = Path(node.database + ".admin-token")
    assert token_file.exists(), node.log_text()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert re.fullmatch(r"adm-[A-Za-z0-9_\-]{20,}", token), token
    log_text = node.log_text()
    assert token not in log_text
    assert not re.search(r"\badm-[A-Za-z0-9_\-]{16,}", log_text), log_text
    assert str(token_file) in log_text  # the operator is told where to look
    status, _ = node.json("GET", "/admin/api/health", None,
                          {"Authorization": f"Bearer {token}"})
    assert status == 200
    status, doc = node.json("POST", "/admin/login", {"token": token})
    assert status == 200 and doc["ok"] is True
    # The login page and --help tell the operator where the token is.
    status, _, page = node.request("GET", "/admin/", None, {"Accept": "text/html"})
    assert status == 401 and b"&lt;database&gt;.admin-token" in page
    helped = subprocess.run([sys.executable, "-m", "routstr", "--help"], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).parents[1])
    assert "<database>.admin-token" in helped.stdout
    node.stop()
    # A restart neither generates a new token nor rewrites the file; the token keeps working.
    again = node_factory(workdir=tmp_path)
    assert token_file.read_text().strip() == token
    assert token not in again.log_text()
    status, _ = again.json("GET", "/admin/api/health", None,
                           {"Authorization": f"Bearer {token}"})
    assert status == 200


# --------------------------------------------------------------------------------------------
# 11: wrong admin tokens are limited; the right one always gets in
# --------------------------------------------------------------------------------------------


def test_wrong_admin_tokens_never_lock_out_the_right_one(node_factory: Any) -> None:
    node = node_factory("--admin-token", ADMIN)
    answers = []
    for i in range(50):  # behind Tor every client is 127.0.0.1: this is "everyone"
        status, headers, raw = node.request(
            "GET", "/admin/api/overview", None, {"Authorization": f"Bearer wrong-{i:04d}"})
        answers.append((status, headers, json.loads(raw)))
    assert all(s == 401 for s, _, _ in answers[:5]), [s for s, _, _ in answers]
    limited = [(s, h, d) for s, h, d in answers[5:]]
    for status, headers, doc in limited:
        assert status == 429 and is_error(doc, status, "admin_login_rate_limited"), doc
        assert 1 <= int(headers["retry-after"]) <= 60
    # The right token: as Bearer, on the login form, and on /metrics — all while limited.
    assert node.json("GET", "/admin/api/overview", None, AUTH)[0] == 200
    status, doc = node.json("POST", "/admin/login", {"token": ADMIN})
    assert status == 200 and doc["ok"] is True
    status, headers, _ = node.request("GET", "/metrics", None, AUTH)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    # Failures go on being limited after the admin got in (a success does not reset them all).
    status, doc = node.json("POST", "/admin/login", {"token": "guess"})
    assert status in (401, 429) and doc["error"]["code"] in ("invalid_admin_token",
                                                             "admin_login_rate_limited")


def test_metrics_wrong_tokens_share_the_admin_limiter(node_factory: Any) -> None:
    node = node_factory("--admin-token", ADMIN)
    statuses = []
    for i in range(12):
        status, headers, raw = node.request("GET", "/metrics", None,
                                            {"Authorization": f"Bearer nope-{i}"})
        statuses.append(status)
        if status == 429:
            assert is_error(json.loads(raw), status, "admin_login_rate_limited")
            assert int(headers["retry-after"]) >= 1
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}, statuses
    # The admin API is limited by the same counter, and the right token still works on both.
    status, doc = node.json("GET", "/admin/api/overview", None,
                            {"Authorization": "Bearer another-guess"})
    assert status == 429, doc
    assert node.request("GET", "/metrics", None, AUTH)[0] == 200
    assert node.json("GET", "/admin/api/overview", None, AUTH)[0] == 200


# --------------------------------------------------------------------------------------------
# 10a: Idempotency-Key answers are stored only for owners the node knows, and bounded
# --------------------------------------------------------------------------------------------


def _stored_bytes(database: str) -> int:
    return sum(p.stat().st_size for p in Path(database).parent.glob(Path(database).name + "*")
               if not p.name.endswith(".admin-token"))


def _idempotency_rows(database: str) -> int:
    with sqlite3.connect(database) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM idempotency").fetchone()[0])


def test_garbage_credentials_with_idempotency_keys_store_nothing(node_factory: Any) -> None:
    with ScriptedUpstream() as upstream:
        node = node_factory("--upstream-base-url", upstream.url, "--admin-token", ADMIN)
        status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": 10_000_000}, AUTH)
        assert status == 201, doc
        key = doc["api_key"]
        time.sleep(1.2)  # the node's checkpoint settles the files after its start-up writes
        before = _stored_bytes(node.database)
        items = [{"method": "POST", "endpoint": "/chat/completions",
                  "body": {**CHAT_BODY, "pad": "x" * 2000}} for _ in range(50)]
        for i in range(20):
            garbage = {"Authorization": f"Bearer sk-garbage{i:04d}{'z' * 40}",
                       "Idempotency-Key": f"fresh-batch-{i}"}
            status, raw_headers, raw = node.request("POST", "/v1/batch", {"requests": items},
                                                    garbage)
            assert status in (200, 401), raw[:200]
            garbage["Idempotency-Key"] = f"fresh-chat-{i}"
            status, _, _ = node.request("POST", "/v1/chat/completions", CHAT_BODY, garbage)
            assert status == 401
            xcashu = {"X-Cashu": f"cashuBgarbage{i}", "Idempotency-Key": f"fresh-x-{i}"}
            assert node.request("POST", "/v1/chat/completions", CHAT_BODY, xcashu)[0] >= 400
        assert _idempotency_rows(node.database) == 0
        time.sleep(1.2)
        grown = _stored_bytes(node.database) - before
        assert grown < 64 * 1024, grown
        # A real key still gets its answer replayed, charged once.
        headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "real-1"}
        s1, h1, b1 = node.request("POST", "/v1/chat/completions", CHAT_BODY, headers)
        s2, h2, b2 = node.request("POST", "/v1/chat/completions", CHAT_BODY, headers)
        assert s1 == s2 == 200 and b1 == b2 and h2["idempotent-replayed"] == "true"
        assert "idempotent-replayed" not in h1
        assert len(upstream.requests) == 1
        assert _idempotency_rows(node.database) == 1


def _run_store(store: IdempotencyStore, owner_header: str, key: str, body: bytes) -> Response:
    async def app(request: Request) -> Response:
        return Response(200, [("content-type", "text/plain")], body)

    request = Request("POST", "/v1/thing", (("authorization", owner_header),
                                            ("idempotency-key", key)), b"{}")
    return anyio.run(store.wrap(app), request)


def test_stored_answers_are_bounded_per_owner_and_in_total(tmp_path: Path) -> None:
    db = Database(tmp_path / "idem.sqlite3")
    owners = {"Bearer sk-alice", "Bearer sk-bob", "Bearer sk-carol"}

    async def known(request: Request) -> bool:
        return request.authorization() in owners

    limits = StoreLimits(answer_bytes=4000, owner_keys=5, owner_bytes=10_000,
                         total_bytes=25_000)
    store = IdempotencyStore(db, ttl_s=3600, boot_id="t", known=known, limits=limits)
    for i in range(8):  # count: only the newest 5 of alice's small answers stay
        assert _run_store(store, "Bearer sk-alice", f"a{i}", b"a%d" % i).status == 200
    kept = [r[0] for r in db.query("SELECT idem_key FROM idempotency WHERE state = 'done'"
                                   " ORDER BY created_at, idem_key")]
    assert kept == ["a3", "a4", "a5", "a6", "a7"]
    replay = _run_store(store, "Bearer sk-alice", "a7", b"different")
    assert replay.body == b"a7" and replay.header("idempotent-replayed") == "true"
    evicted = _run_store(store, "Bearer sk-alice", "a0", b"again")
    assert evicted.body == b"again" and evicted.header("idempotent-replayed") is None
    for i in range(4):  # bytes: 3000-byte answers, at most 10 000 bytes per owner
        _run_store(store, "Bearer sk-bob", f"b{i}", b"b" * 3000)
    bob = db.query("SELECT COUNT(*), SUM(length(body)) FROM idempotency"
                   " WHERE owner_hash = ?", (owner_of_header("Bearer sk-bob"),))[0]
    assert bob[0] == 3 and bob[1] == 9000
    for i in range(4):  # total: 25 000 bytes over all owners, the oldest go first
        _run_store(store, "Bearer sk-carol", f"c{i}", b"c" * 3000)
    total = db.query("SELECT SUM(length(body)) FROM idempotency")[0][0]
    assert total <= 25_000
    assert db.query("SELECT COUNT(*) FROM idempotency WHERE idem_key = 'c3'")[0][0] == 1
    # An unknown owner's answer is served but never stored.
    before = db.query("SELECT COUNT(*) FROM idempotency")[0][0]
    assert _run_store(store, "Bearer sk-mallory", "m1", b"m" * 3000).status == 200
    assert db.query("SELECT COUNT(*) FROM idempotency")[0][0] == before
    db.close()


# --------------------------------------------------------------------------------------------
# 16: a slow fsync (an SD card) never stalls the event loop
# --------------------------------------------------------------------------------------------

SLOW_FSYNC_MS = 1500
HEALTH_MAX_S = 0.5  # far below the fsync: an answer this fast was not waiting behind it


def _slow_fsync_library(tmp_path: Path) -> Path:
    """tests/support/slowfsync.c built into a shared library (see its header)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler is needed to build the slow-disk library"
    out = tmp_path / "libslowfsync.so"
    source = Path(__file__).parent / "support" / "slowfsync.c"
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(out), str(source), "-ldl"],
                   check=True, capture_output=True)
    return out


def _slow_disk_node(node_factory: Any, tmp_path: Path, *args: str) -> tuple[NodeProcess, Path]:
    flag = tmp_path / "fsync-is-slow"
    node = node_factory("--admin-token", ADMIN, *args, env={
        "LD_PRELOAD": str(_slow_fsync_library(tmp_path)), "SLOW_FSYNC_FLAG": str(flag),
        "SLOW_FSYNC_MS": str(SLOW_FSYNC_MS)})
    return node, flag


def _health_while(node: NodeProcess, flag: Path, action: Callable[[], Any]
                  ) -> tuple[Any, float, list[float]]:
    """Run `action` (durable work) in a thread with every fsync slow; meanwhile ask /health.
    Returns the action's result, how long it took, and the /health latencies."""
    done: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            done["result"] = action()
        finally:
            done["took"] = time.monotonic() - started

    flag.touch()  # from now on every fsync of the node takes SLOW_FSYNC_MS
    worker = threading.Thread(target=run)
    worker.start()
    latencies = []
    try:
        while worker.is_alive():
            started = time.monotonic()
            assert node.request("GET", "/health", timeout=10)[0] == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
    finally:
        worker.join()
        flag.unlink()
    return done.get("result"), done["took"], latencies


def _balance(node: NodeProcess, key_hash: str) -> int:
    with sqlite3.connect(node.database) as conn:
        return int(conn.execute("SELECT balance_msats FROM keys WHERE key_hash = ?",
                                (key_hash,)).fetchone()[0])


def test_a_slow_durable_commit_does_not_stall_other_requests(
        node_factory: Any, tmp_path: Path) -> None:
    node, flag = _slow_disk_node(node_factory, tmp_path)
    status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": 1000}, AUTH)
    assert status == 201, doc
    key, key_id = doc["api_key"], doc["key"]["id"]
    # A grant is money entering the node: a durable commit.
    (status, doc), took, latencies = _health_while(node, flag, lambda: node.json(
        "POST", f"/admin/api/keys/{key_id}/grant", {"amount_msats": 5000}, AUTH))
    assert status == 200, doc
    # The grant itself waited for its fsync (it is durable when it answers) ...
    assert took >= SLOW_FSYNC_MS / 1000 * 0.9, took
    # ... while the node kept answering everyone else.
    assert len(latencies) >= 5 and max(latencies) < HEALTH_MAX_S, latencies
    assert _balance(node, hash_key(key)) == 6000


def test_a_deposit_on_a_slow_disk_does_not_stall_other_requests(
        node_factory: Any, tmp_path: Path, mint_url: str) -> None:
    node, flag = _slow_disk_node(node_factory, tmp_path, "--cashu-mints", mint_url)
    minter = Minter(tmp_path)
    token = minter.token(mint_url, 21)
    # The wallet's intent is fsynced before the mint hears of the swap, the credit before the
    # answer: at least two slow fsyncs, none of them on the event loop.
    (status, doc), took, latencies = _health_while(node, flag, lambda: node.json(
        "POST", "/v1/balance/create", {"initial_balance_token": token}))
    minter.db.close()
    assert status == 200, doc
    assert took >= 2 * SLOW_FSYNC_MS / 1000 * 0.9, took
    assert len(latencies) >= 10 and max(latencies) < HEALTH_MAX_S, latencies
    assert _balance(node, hash_key(doc["api_key"])) == 21_000


def test_an_accepted_xcashu_payment_gets_its_answer_replayed(
        node_factory: Any, tmp_path: Path, mint_url: str) -> None:
    """The owner of an X-Cashu request is known only once its payment was accepted: the
    answer is stored then (not claimed in the database before), and a retry replays it."""
    minter = Minter(tmp_path)
    token = minter.token(mint_url, 200)
    minter.db.close()
    with ScriptedUpstream() as upstream:
        node = node_factory("--upstream-base-url", upstream.url, "--admin-token", ADMIN,
                            "--cashu-mints", mint_url)
        headers = {"X-Cashu": token, "Idempotency-Key": "pay-once"}
        body = {**CHAT_BODY, "max_tokens": 100}
        s1, h1, b1 = node.request("POST", "/v1/chat/completions", body, headers)
        assert s1 == 200, b1
        s2, h2, b2 = node.request("POST", "/v1/chat/completions", body, headers)
        assert s2 == 200 and b2 == b1 and h2["idempotent-replayed"] == "true"
        assert h2["x-cashu"] == h1["x-cashu"]  # the same change, not a second redemption
        assert len(upstream.requests) == 1
        assert _idempotency_rows(node.database) == 1


def test_an_unknown_owners_duplicate_in_flight_is_refused_without_a_database_write(
        tmp_path: Path) -> None:
    db = Database(tmp_path / "idem.sqlite3")

    async def nobody(request: Request) -> bool:
        return False

    store = IdempotencyStore(db, ttl_s=3600, boot_id="t", known=nobody)
    release = anyio.Event()

    async def slow(request: Request) -> Response:
        await release.wait()
        return Response(200, [], b"ok")

    request = Request("POST", "/v1/x", (("authorization", "Bearer sk-who"),
                                        ("idempotency-key", "k")), b"{}")
    app = store.wrap(slow)
    answers: list[Any] = []

    async def main() -> None:
        async def first() -> None:
            answers.append(await app(request))

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await anyio.sleep(0.05)
            try:
                await app(request)
            except Conflict as exc:
                answers.append(exc)
            release.set()
        answers.append(await app(request))  # not in flight any more: runs again

    anyio.run(main)
    assert isinstance(answers[0], Conflict)
    assert answers[0].code == "idempotency_request_in_progress"
    assert [a.status for a in answers[1:]] == [200, 200]
    assert db.query("SELECT COUNT(*) FROM idempotency")[0][0] == 0
    db.close()
