"""Per-key rate limits through the real node: exact boundaries, headers, nothing charged on 429.

Money is checked on every refusal: a 429 happens before the reservation, so the key's balance
moves only by the requests that ran and nothing stays reserved.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import urllib.request
from typing import Any

import pytest

from routstr.db import Database
from routstr.errors import RateLimited
from routstr.keys import hash_key
from routstr.ledger import Ledger
from routstr.pricing import actual_cost, load_price_table
from routstr.ratelimit import Limits, RateLimiter
from tests.support.node import NodeProcess
from tests.support.upstream import Behaviour, ScriptedUpstream

ADMIN = "adm-ratelimit-test"
DEPOSIT = 10_000_000
CHAT_COST = actual_cost(load_price_table(None).at(100_000).get("gpt-4o-mini"), 12, 5).total_msats
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def start(node_factory: Any, upstream: ScriptedUpstream, *flags: str) -> NodeProcess:
    node: NodeProcess = node_factory("--upstream-base-url", upstream.url, "--admin-token", ADMIN,
                                     *flags)
    return node


def new_key(node: NodeProcess) -> str:
    status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": DEPOSIT},
                            {"Authorization": f"Bearer {ADMIN}"})
    assert status == 201, doc
    return str(doc["api_key"])


def chat(node: NodeProcess, key: str, body: dict[str, Any] | None = None
         ) -> tuple[int, dict[str, str], Any]:
    status, headers, raw = node.request("POST", "/v1/chat/completions", body or CHAT,
                                        {"Authorization": f"Bearer {key}"})
    return status, headers, raw


def account(node: NodeProcess, key: str) -> Any:
    db = Database(node.database)
    try:
        acct = Ledger(db).get_account(hash_key(key))
        Ledger(db).check_invariant()
    finally:
        db.close()
    assert acct is not None
    return acct


def test_requests_per_minute_boundary_and_headers(node_factory: Any,
                                                  upstream: ScriptedUpstream) -> None:
    node = start(node_factory, upstream, "--rate-limit-requests", "5")
    key = new_key(node)
    sent_before = len(upstream.requests)
    remaining = []
    for _ in range(5):
        before = time.time()
        status, headers, _ = chat(node, key)
        assert status == 200
        assert headers["x-ratelimit-limit"] == "5"
        remaining.append(int(headers["x-ratelimit-remaining"]))
        reset = int(headers["x-ratelimit-reset"])
        assert before <= reset <= time.time() + 61  # epoch seconds: full again within a minute
    assert remaining == [4, 3, 2, 1, 0]
    status, headers, raw = chat(node, key)
    assert status == 429
    err = json.loads(raw)["error"]
    assert err["type"] == "rate_limit_exceeded" and err["code"] == "rate_limit_exceeded"
    assert err["details"]["limit"] == "requests"
    assert 1 <= int(headers["retry-after"]) <= 12  # one request refills every 12 s
    assert headers["x-ratelimit-remaining"] == "0"
    # Only the five admitted requests reached the upstream and were charged.
    assert len(upstream.requests) - sent_before == 5
    acct = account(node, key)
    assert acct.balance_msats == DEPOSIT - 5 * CHAT_COST and acct.reserved_msats == 0
    # Another key has its own allowance; a request without a credential carries no headers.
    status, headers, _ = chat(node, new_key(node))
    assert status == 200 and headers["x-ratelimit-remaining"] == "4"
    status, headers, _ = node.request("GET", "/v1/info")
    assert status == 200 and "x-ratelimit-limit" not in headers


def test_tokens_per_hour_from_settled_usage(node_factory: Any, upstream: ScriptedUpstream) -> None:
    node = start(node_factory, upstream, "--rate-limit-tokens", "20")
    key = new_key(node)
    status, headers, _ = chat(node, key)  # 17 tokens settled: 3 left
    assert status == 200 and headers["x-ratelimit-limit-tokens"] == "20"
    status, headers, _ = chat(node, key)  # admitted (bucket above zero), overdraws it
    assert status == 200 and headers["x-ratelimit-remaining-tokens"] == "3"
    status, headers, raw = chat(node, key)
    assert status == 429
    err = json.loads(raw)["error"]
    assert err["details"]["limit"] == "tokens" and headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(headers["retry-after"]) >= 1
    acct = account(node, key)
    assert acct.balance_msats == DEPOSIT - 2 * CHAT_COST and acct.reserved_msats == 0


def _stream_in_thread(node: NodeProcess, key: str, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        req = urllib.request.Request(
            node.url + "/v1/chat/completions", method="POST",
            data=json.dumps({**CHAT, "stream": True}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=20) as resp:
            out["status"] = resp.status
            out["body"] = resp.read()
        out["ended"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_concurrency_slot_held_until_the_stream_ends(node_factory: Any,
                                                     upstream: ScriptedUpstream) -> None:
    node = start(node_factory, upstream, "--rate-limit-concurrent", "1",
                 "--rate-limit-queue-wait", "0")
    key = new_key(node)
    upstream.enqueue(Behaviour(event_delay_s=0.25))  # 5 pieces: the stream lasts ~1.5 s
    out: dict[str, Any] = {}
    thread = _stream_in_thread(node, key, out)
    deadline = time.monotonic() + 5
    while not upstream.requests or upstream.requests[-1].json().get("stream") is not True:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status, headers, raw = chat(node, key)  # while the stream is being relayed
    refused_at = time.monotonic()
    assert status == 429
    assert json.loads(raw)["error"]["details"]["limit"] == "concurrent"
    assert headers["retry-after"] == "1"
    thread.join(15)
    assert out["status"] == 200 and b"[DONE]" in out["body"] and out["ended"] > refused_at
    status, _, _ = chat(node, key)  # the stream's slot was released when it ended
    assert status == 200
    acct = account(node, key)
    assert acct.balance_msats == DEPOSIT - 2 * CHAT_COST and acct.reserved_msats == 0


def test_over_the_concurrency_limit_waits_for_a_slot(node_factory: Any,
                                                     upstream: ScriptedUpstream) -> None:
    node = start(node_factory, upstream, "--rate-limit-concurrent", "2",
                 "--rate-limit-queue-wait", "5")
    key = new_key(node)
    upstream.enqueue(*[Behaviour(delay_s=0.1) for _ in range(12)])
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda _: chat(node, key)[0], range(12)))
    elapsed = time.monotonic() - started
    assert statuses == [200] * 12  # queued for a slot, none refused
    assert elapsed >= 0.55  # two at a time: six rounds of 0.1 s (unlimited would take ~0.1 s)
    acct = account(node, key)
    assert acct.balance_msats == DEPOSIT - 12 * CHAT_COST and acct.reserved_msats == 0


def test_memory_is_bounded_and_idle_keys_expire() -> None:
    now = [1000.0]
    limiter = RateLimiter(Limits(60, 3600, 2), clock=lambda: now[0], wall=lambda: now[0],
                          max_keys=100)
    for i in range(500):
        limiter.release(limiter.admit(f"key-{i}"))
    assert len(limiter) <= 100  # the cap evicts the least recently used states
    now[0] += 61.0  # every bucket has refilled: those states carry no information
    for i in range(20):
        limiter.release(limiter.admit(f"fresh-{i}"))
    assert len(limiter) == 20  # each admission dropped up to 8 idle states: only the new remain
    held = limiter.admit("busy")  # a key with a request in flight is never forgotten as idle
    now[0] += 3600.0
    for i in range(50):  # scans that drop idle states pass over the one in flight
        limiter.release(limiter.admit(f"later-{i}"))
    assert limiter.admit("busy", hold_slot=True).holds_slot  # slot 2 of 2 ...
    with pytest.raises(RateLimited) as info:  # ... a third is refused: slot 1 still counted
        limiter.admit("busy")
    assert info.value.details["limit"] == "concurrent"
    limiter.release(held)
    assert len(limiter) <= 100
