"""Idempotency-Key through the real node: charged once (also across a restart), mismatches,
concurrent duplicates, errors not stored, streamed answers replayed, expiry."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routstr.db import Database
from routstr.keys import hash_key
from routstr.ledger import Ledger
from routstr.pricing import actual_cost, load_price_table
from tests.support.node import NodeProcess
from tests.support.upstream import Behaviour, ScriptedUpstream

ADMIN = "adm-idempotency-test"
DEPOSIT = 10_000_000
CHAT_COST = actual_cost(load_price_table(None).at(100_000).get("gpt-4o-mini"), 12, 5).total_msats
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
COST_HEADERS = ("x-routstr-cost", "x-routstr-cost-msats", "x-routstr-balance-msats",
                "content-type")


@pytest.fixture(scope="module")
def node(upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("idem"), ["--upstream-base-url", upstream.url,
                                                      "--admin-token", ADMIN])
    n.start()
    yield n
    n.stop()


def new_key(node: NodeProcess) -> str:
    status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": DEPOSIT},
                            {"Authorization": f"Bearer {ADMIN}"})
    assert status == 201, doc
    return str(doc["api_key"])


def post(node: NodeProcess, key: str, idem: str | None, body: Any = None,
         path: str = "/v1/chat/completions") -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {key}"}
    if idem is not None:
        headers["Idempotency-Key"] = idem
    return node.request("POST", path, CHAT if body is None else body, headers)


def balance(node: NodeProcess, key: str) -> tuple[int, int]:
    db = Database(node.database)
    try:
        ledger = Ledger(db)
        acct = ledger.get_account(hash_key(key))
        ledger.check_invariant()
    finally:
        db.close()
    assert acct is not None
    return acct.balance_msats, acct.reserved_msats


def test_duplicate_charged_once_also_after_restart(upstream: ScriptedUpstream,
                                                   tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, ["--upstream-base-url", upstream.url, "--admin-token", ADMIN])
    node.start()
    try:
        key = new_key(node)
        sent = len(upstream.requests)
        s1, h1, b1 = post(node, key, "order-42")
        s2, h2, b2 = post(node, key, "order-42")
        assert s1 == s2 == 200 and b1 == b2
        assert "idempotent-replayed" not in h1 and h2["idempotent-replayed"] == "true"
        assert [h1[k] for k in COST_HEADERS] == [h2[k] for k in COST_HEADERS]
        assert h1["x-routstr-cost-msats"] == str(CHAT_COST)
        assert len(upstream.requests) - sent == 1
        assert balance(node, key) == (DEPOSIT - CHAT_COST, 0)
    finally:
        node.stop()
    node = NodeProcess(tmp_path, node.args)  # same database: the answer survives a restart
    node.start()
    try:
        s3, h3, b3 = post(node, key, "order-42")
        assert s3 == 200 and b3 == b1 and h3["idempotent-replayed"] == "true"
        assert h3["x-routstr-cost-msats"] == str(CHAT_COST)
        assert len(upstream.requests) - sent == 1
        assert balance(node, key) == (DEPOSIT - CHAT_COST, 0)
    finally:
        node.stop()


def test_same_key_other_request_is_422_and_keys_are_per_credential(
        node: NodeProcess, upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    assert post(node, key, "k-1")[0] == 200
    sent = len(upstream.requests)
    other = {**CHAT, "messages": [{"role": "user", "content": "something else"}]}
    status, _, raw = post(node, key, "k-1", other)
    err = json.loads(raw)["error"]
    assert status == 422 and err["code"] == "idempotency_key_reused"
    assert "different request" in err["message"]
    status, _, _ = post(node, key, "k-1", path="/chat/completions")  # another path: another request
    assert status == 422
    assert len(upstream.requests) == sent
    assert balance(node, key) == (DEPOSIT - CHAT_COST, 0)
    # The same Idempotency-Key sent with another key is that key's own, executed afresh.
    key2 = new_key(node)
    status, headers, _ = post(node, key2, "k-1")
    assert status == 200 and "idempotent-replayed" not in headers
    assert balance(node, key2) == (DEPOSIT - CHAT_COST, 0)
    status, _, raw = post(node, key, "bad key with spaces")
    assert status == 400 and json.loads(raw)["error"]["code"] == "invalid_idempotency_key"


def test_concurrent_duplicate_gets_409_then_the_replay(node: NodeProcess,
                                                       upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    upstream.enqueue(Behaviour(delay_s=0.8))
    first: list[tuple[int, dict[str, str], bytes]] = []
    sent = len(upstream.requests) + 1
    thread = threading.Thread(target=lambda: first.append(post(node, key, "slow-1")))
    thread.start()
    deadline = time.monotonic() + 5
    while len(upstream.requests) < sent:  # the first request is now at the slow upstream
        assert time.monotonic() < deadline
        time.sleep(0.01)
    status, headers, raw = post(node, key, "slow-1")
    assert status == 409
    assert json.loads(raw)["error"]["code"] == "idempotency_request_in_progress"
    assert headers["retry-after"] == "1"
    thread.join(10)
    assert first[0][0] == 200
    status, headers, raw = post(node, key, "slow-1")
    assert status == 200 and raw == first[0][2] and headers["idempotent-replayed"] == "true"
    assert len(upstream.requests) == sent
    assert balance(node, key) == (DEPOSIT - CHAT_COST, 0)


def test_an_error_is_not_stored_so_a_retry_runs(node: NodeProcess,
                                                upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    upstream.enqueue(Behaviour(status=500))
    status, _, _ = post(node, key, "retry-me")
    assert status == 502
    assert balance(node, key) == (DEPOSIT, 0)  # nothing charged, so nothing to replay
    status, headers, _ = post(node, key, "retry-me")
    assert status == 200 and "idempotent-replayed" not in headers
    status, headers, _ = post(node, key, "retry-me")
    assert status == 200 and headers["idempotent-replayed"] == "true"
    assert balance(node, key) == (DEPOSIT - CHAT_COST, 0)


def test_streamed_answer_is_replayed_whole(node: NodeProcess, upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    s1, h1, b1 = post(node, key, "stream-1", body)
    s2, h2, b2 = post(node, key, "stream-1", body)
    assert s1 == s2 == 200
    assert h1["content-type"].startswith("text/event-stream")
    assert h2["content-type"].startswith("text/event-stream")
    assert b2 == b1 and b1.endswith(b"data: [DONE]\n\n")
    assert f'"total_msats":{CHAT_COST}'.encode() in b1  # the usage chunk's cost
    assert h2["idempotent-replayed"] == "true"
    assert balance(node, key) == (DEPOSIT - CHAT_COST, 0)


def test_keys_expire_after_the_retention_period(node_factory: Any,
                                                upstream: ScriptedUpstream) -> None:
    node = node_factory("--upstream-base-url", upstream.url, "--admin-token", ADMIN,
                        "--idempotency-ttl", "1")
    key = new_key(node)
    assert post(node, key, "short-lived")[0] == 200
    assert post(node, key, "short-lived")[1]["idempotent-replayed"] == "true"
    time.sleep(1.2)
    status, headers, _ = post(node, key, "short-lived")
    assert status == 200 and "idempotent-replayed" not in headers
    assert balance(node, key) == (DEPOSIT - 2 * CHAT_COST, 0)
