"""POST /v1/batch through the real node: mixed results billed exactly, bounded concurrency,
limits on count and size, per-item rate limiting."""

from __future__ import annotations

import json
import time
from typing import Any

from routstr.db import Database
from routstr.keys import hash_key
from routstr.ledger import Ledger
from routstr.pricing import actual_cost, load_price_table
from tests.support.node import NodeProcess
from tests.support.upstream import Behaviour, ScriptedUpstream

ADMIN = "adm-batch-test"
DEPOSIT = 10_000_000
CHAT_COST = actual_cost(load_price_table(None).at(100_000).get("gpt-4o-mini"), 12, 5).total_msats
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def new_key(node: NodeProcess) -> str:
    status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": DEPOSIT},
                            {"Authorization": f"Bearer {ADMIN}"})
    assert status == 201, doc
    return str(doc["api_key"])


def batch(node: NodeProcess, key: str, items: Any, headers: dict[str, str] | None = None
          ) -> tuple[int, Any]:
    status, _, raw = node.request("POST", "/v1/batch",
                                  items if isinstance(items, bytes) else {"requests": items},
                                  {"Authorization": f"Bearer {key}", **(headers or {})})
    return status, json.loads(raw)


def account(node: NodeProcess, key: str) -> Any:
    db = Database(node.database)
    try:
        acct = Ledger(db).get_account(hash_key(key))
        Ledger(db).check_invariant()
    finally:
        db.close()
    assert acct is not None
    return acct


def test_mixed_batch_in_order_billed_exactly(node_factory: Any,
                                            upstream: ScriptedUpstream) -> None:
    node = node_factory("--upstream-base-url", upstream.url, "--admin-token", ADMIN,
                        "--batch-concurrency", "1")
    key = new_key(node)
    sent = len(upstream.requests)
    upstream.enqueue(Behaviour(), Behaviour(status=500))
    status, doc = batch(node, key, [
        {"method": "POST", "endpoint": "/chat/completions", "body": CHAT},
        {"method": "POST", "endpoint": "/chat/completions", "body": CHAT},  # upstream 500
        {"method": "GET", "endpoint": "/models?limit=2&fields=id"},
        {"method": "GET", "endpoint": "/balance"},
        {"method": "GET", "endpoint": "/no-such-thing"},
        {"method": "POST", "endpoint": "/chat/completions", "body": {**CHAT, "stream": True}},
        {"method": "PUT", "endpoint": "/balance"},
    ])
    assert status == 200 and doc["object"] == "batch"
    items = doc["data"]
    assert [i["index"] for i in items] == list(range(7))
    assert [i["status"] for i in items] == [200, 502, 200, 200, 404, 400, 400]
    assert items[0]["body"]["choices"][0]["message"]["content"] == "Hello from upstream!"
    assert items[0]["headers"]["x-routstr-cost-msats"] == str(CHAT_COST)
    assert items[1]["body"]["error"]["type"] == "upstream_error"
    assert items[1]["headers"] == {}
    models = items[2]["body"]
    assert len(models["data"]) == 2 and models["limit"] == 2 and models["has_more"] is True
    assert all(set(m) == {"id"} for m in models["data"])
    assert items[3]["body"]["balance"] == DEPOSIT - CHAT_COST  # items ran in order
    assert items[4]["body"]["error"]["type"] == "not_found"
    assert items[5]["body"]["error"]["code"] == "stream_not_supported_in_batch"
    assert doc["total_cost_msats"] == CHAT_COST
    assert len(upstream.requests) - sent == 2
    acct = account(node, key)
    assert acct.balance_msats == DEPOSIT - CHAT_COST and acct.reserved_msats == 0
    assert acct.usage_msats == CHAT_COST


def test_items_run_with_bounded_concurrency(node_factory: Any,
                                            upstream: ScriptedUpstream) -> None:
    node = node_factory("--upstream-base-url", upstream.url, "--admin-token", ADMIN,
                        "--batch-concurrency", "2")
    key = new_key(node)
    upstream.enqueue(*[Behaviour(delay_s=0.4) for _ in range(4)])
    started = time.monotonic()
    status, doc = batch(node, key, [{"method": "POST", "endpoint": "/v1/chat/completions",
                                     "body": CHAT}] * 4)
    elapsed = time.monotonic() - started
    assert status == 200 and [i["status"] for i in doc["data"]] == [200] * 4
    assert 0.75 <= elapsed < 1.5  # two at a time: two rounds of 0.4 s (not one, not four)
    assert doc["total_cost_msats"] == 4 * CHAT_COST
    assert account(node, key).balance_msats == DEPOSIT - 4 * CHAT_COST


def test_limits_and_per_item_rate_limit(node_factory: Any, upstream: ScriptedUpstream) -> None:
    node = node_factory("--upstream-base-url", upstream.url, "--admin-token", ADMIN,
                        "--batch-max-requests", "3", "--batch-max-bytes", "2000",
                        "--rate-limit-requests", "7")
    key = new_key(node)
    balance = {"method": "GET", "endpoint": "/balance"}
    status, doc = batch(node, key, [balance] * 4)
    assert status == 400 and doc["error"]["code"] == "batch_too_many_requests"
    big = json.dumps({"requests": [{"method": "POST", "endpoint": "/chat/completions", "body": {
        **CHAT, "messages": [{"role": "user", "content": "x" * 3000}]}}]}).encode()
    status, doc = batch(node, key, big)
    assert status == 413 and doc["error"]["code"] == "batch_too_large"
    status, doc = batch(node, key, [balance], {"X-Cashu": "cashuBxyz"})
    assert status == 400 and doc["error"]["code"] == "batch_requires_api_key"
    status, doc = batch(node, key, [{"method": "POST", "endpoint": "/batch", "body": {}}])
    assert status == 200 and doc["data"][0]["body"]["error"]["code"] == "nested_batch"
    # 4 of 7 requests used; this batch takes one more and each item one: the third is refused.
    status, doc = batch(node, key, [balance] * 3)
    assert status == 200
    assert sorted(i["status"] for i in doc["data"]) == [200, 200, 429]
    refused = next(i for i in doc["data"] if i["status"] == 429)
    assert refused["body"]["error"]["type"] == "rate_limit_exceeded"
    acct = account(node, key)
    assert acct.balance_msats == DEPOSIT and acct.reserved_msats == 0
