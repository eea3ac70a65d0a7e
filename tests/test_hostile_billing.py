"""Issue 13, money classes 1–3: every request has a ceiling, its reservation covers the output in
full, a charge is the priced usage of what was served capped at the ceiling, and a hold lives as
long as its request. The real node, raw HTTP (so the test knows every body byte), a scripted
upstream that lies about usage, the ledger read from the database.

Besides conservation (checked after every test), each request's charge is checked on its own
against the test's own statement of the rule (`expected_charge`), not the node's code.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from routstr.db import Database
from routstr.keys import hash_key
from routstr.ledger import Ledger
from routstr.pricing import actual_cost, load_price_table
from tests.support.node import NodeProcess
from tests.support.upstream import Behaviour, ScriptedUpstream

ADMIN = "hostile-billing-admin"
PRICES = load_price_table(None).at(100_000)
MINI = PRICES.get("gpt-4o-mini")  # 150 / 600 msats per 1k tokens, 16 384 max output, 128k context
OVERHEAD = 16  # chat-template tokens a prompt may have beyond its body's bytes


def expected_charge(raw_body: bytes, prompt: int, completion: int) -> int:
    """The rule, written independently of routstr/pricing.py: prompt ≤ body bytes + 16 (≤ the
    context), output ≤ n × the largest token limit set (else the model's), ≤ the model's limit;
    each reported count clamped to its bound; never above the bounds' price."""
    body = json.loads(raw_body)
    prompt_bound = min(len(raw_body) + OVERHEAD, MINI.context_length)
    limits = [body[k] for k in ("max_tokens", "max_completion_tokens") if k in body]
    per_choice = min(max(limits) if limits else MINI.max_output_tokens, MINI.max_output_tokens)
    choices = max(body.get("n", 1), body.get("best_of", 1))
    output_bound = choices * per_choice
    cost = actual_cost(MINI, min(prompt, prompt_bound), min(completion, output_bound)).total_msats
    return min(cost, actual_cost(MINI, prompt_bound, output_bound).total_msats)


@pytest.fixture(scope="module")
def node(upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("hostile-billing"), [
        "--upstream-base-url", upstream.url, "--upstream-api-key", "up-key",
        "--admin-token", ADMIN, "--reservation-ttl", "3", "--upstream-read-timeout", "20",
        "--rate-limit-tokens", "1000000"])
    n.start()
    yield n
    n.stop()


@pytest.fixture
def ledger(node: NodeProcess) -> Iterator[Ledger]:
    db = Database(node.database)
    lg = Ledger(db)  # another process's ledger on the node's database (as a second worker)
    yield lg
    lg.check_invariant()
    db.close()


def new_key(node: NodeProcess, msats: int) -> str:
    status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": msats},
                            {"Authorization": f"Bearer {ADMIN}"})
    assert status == 201, doc
    return str(doc["api_key"])


def chat_body(**fields: Any) -> bytes:
    doc = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
    doc.update(fields)
    return json.dumps(doc).encode()


def post(node: NodeProcess, key: str, raw: bytes, path: str = "/v1/chat/completions",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    hdrs = {"Authorization": f"Bearer {key}", **(headers or {})}
    status, resp_headers, body = node.request("POST", path, raw, hdrs)
    return status, resp_headers, json.loads(body) if body else None


def account(ledger: Ledger, key: str) -> Any:
    acct = ledger.get_account(hash_key(key))
    assert acct is not None
    return acct


def settled_rows(ledger: Ledger, key: str) -> list[int]:
    rows = ledger.transactions(account(ledger, key).id, limit=1000)[0]
    return [t.amount_msats for t in rows if t.kind == "settle"]


def metric(node: NodeProcess, name: str) -> float:
    status, _, raw = node.request("GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert status == 200
    m = re.search(rf"^{name} (\S+)$", raw.decode(), re.M)
    assert m, name
    return float(m.group(1))


# ---- 1. the reservation covers the ceiling's output part in full -----------------------------
@pytest.mark.parametrize("fields", [
    {"n": 128, "max_tokens": 1000},
    {"max_tokens": 10, "max_completion_tokens": 4000},
    {"n": 4},  # no limit: every choice may write the model's 16 384 tokens
])
def test_a_multiplied_output_is_reserved_in_full_or_refused(
    node: NodeProcess, upstream: ScriptedUpstream, ledger: Ledger, fields: dict[str, Any]
) -> None:
    raw = chat_body(**fields)
    body = json.loads(raw)
    choices = body.get("n", 1)
    per_choice = max(body.get("max_tokens", 0), body.get("max_completion_tokens", 0)) or 16384
    output_msats = actual_cost(MINI, 0, choices * per_choice).total_msats
    key = new_key(node, output_msats - 1)  # enough for the client formula, not for the output
    before = len(upstream.requests)
    status, _, doc = post(node, key, raw)
    assert status == 402, doc
    assert doc["error"]["code"] == "insufficient_balance"
    assert doc["error"]["details"]["required"] >= output_msats
    assert len(upstream.requests) == before  # nothing forwarded
    acct = account(ledger, key)
    assert (acct.balance_msats, acct.reserved_msats, acct.spent_msats) == (output_msats - 1, 0, 0)

    # funded: the upstream really writes all of it, and the whole of it is charged
    key = new_key(node, 10 * output_msats)
    usage = {"prompt_tokens": 30, "completion_tokens": choices * per_choice,
             "total_tokens": 30 + choices * per_choice}
    upstream.enqueue(Behaviour(usage=usage))
    status, headers, doc = post(node, key, raw)
    assert status == 200, doc
    charge = expected_charge(raw, 30, choices * per_choice)
    assert int(headers["x-routstr-cost-msats"]) == charge
    assert settled_rows(ledger, key) == [charge]
    acct = account(ledger, key)
    assert (acct.balance_msats, acct.reserved_msats) == (10 * output_msats - charge, 0)


@pytest.mark.parametrize("n", [0, 129, 1e30, 2.5, "3"])
def test_a_bad_choice_count_is_a_400_and_costs_nothing(
    node: NodeProcess, upstream: ScriptedUpstream, ledger: Ledger, n: Any
) -> None:
    key = new_key(node, 1_000_000)
    before = len(upstream.requests)
    for path, raw in (("/v1/chat/completions", chat_body(n=n)),
                      ("/v1/images/generations",
                       json.dumps({"model": "dall-e-3", "prompt": "x", "n": n}).encode())):
        status, _, doc = post(node, key, raw, path)
        assert status == 400, doc
        assert doc["error"]["code"] == "invalid_n"
    assert len(upstream.requests) == before
    assert account(ledger, key).balance_msats == 1_000_000


def test_images_are_reserved_and_charged_per_image_served(
    node: NodeProcess, upstream: ScriptedUpstream, ledger: Ledger
) -> None:
    one = actual_cost(PRICES.get("dall-e-3"), 0, 0).total_msats
    key = new_key(node, 3 * one - 1)
    raw = json.dumps({"model": "dall-e-3", "prompt": "a cat", "n": 3}).encode()
    status, _, doc = post(node, key, raw, "/v1/images/generations")
    assert status == 402 and doc["error"]["details"]["required"] == 3 * one
    key = new_key(node, 10 * one)
    status, headers, doc = post(node, key, raw, "/v1/images/generations")
    assert status == 200 and len(doc["data"]) == 3
    assert int(headers["x-routstr-cost-msats"]) == 3 * one
    # an upstream that serves fewer than asked: only what it served
    upstream.enqueue(Behaviour(json={"created": 1, "data": [{"url": "https://x/1.png"}]}))
    status, headers, doc = post(node, key, raw, "/v1/images/generations")
    assert status == 200 and int(headers["x-routstr-cost-msats"]) == one
    assert settled_rows(ledger, key) == [one, 3 * one]


# ---- 2. a charge is the priced usage, capped at the ceiling ----------------------------------
@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 10**12, "completion_tokens": 5},
    {"prompt_tokens": 12, "completion_tokens": 10**15},
    {"prompt_tokens": 10**30, "completion_tokens": 10**30},
])
def test_an_over_report_is_charged_the_ceiling_at_most(
    node: NodeProcess, upstream: ScriptedUpstream, ledger: Ledger, usage: dict[str, int]
) -> None:
    key = new_key(node, 50_000_000)
    raw = chat_body(max_tokens=100)
    reports = metric(node, "routstr_upstream_overreports_total")
    upstream.enqueue(Behaviour(usage={**usage, "total_tokens": 1}))
    status, headers, doc = post(node, key, raw)
    assert status == 200, doc
    charge = expected_charge(raw, usage["prompt_tokens"], usage["completion_tokens"])
    assert charge <= actual_cost(MINI, len(raw) + OVERHEAD, 100).total_msats
    assert int(headers["x-routstr-cost-msats"]) == charge
    assert settled_rows(ledger, key) == [charge]
    acct = account(ledger, key)
    assert (acct.balance_msats, acct.reserved_msats) == (50_000_000 - charge, 0)
    assert metric(node, "routstr_upstream_overreports_total") == reports + 1
    # the tokens/hour window saw the clamped counts: the key is not locked out for ages
    status, doc = node.json("GET", "/v1/balance/info", headers={"Authorization": f"Bearer {key}"})
    assert status == 200, doc


def test_a_longer_prompt_than_estimated_is_charged_from_what_is_left_never_below_zero(
    node: NodeProcess, upstream: ScriptedUpstream, ledger: Ledger
) -> None:
    raw = chat_body(max_tokens=10)
    prompt = len(raw) + OVERHEAD  # the most an honest upstream can count
    truth = expected_charge(raw, prompt, 10)
    # enough to start (the estimate: 3 prompt tokens + 10 output) but not for the whole truth
    key = new_key(node, truth - 5)
    unbilled = metric(node, "routstr_unbilled_msats_total")
    upstream.enqueue(Behaviour(usage={"prompt_tokens": prompt, "completion_tokens": 10,
                                      "total_tokens": prompt + 10}))
    status, headers, _ = post(node, key, raw)
    assert status == 200
    assert int(headers["x-routstr-cost-msats"]) == truth - 5  # all it had, not more
    acct = account(ledger, key)
    assert (acct.balance_msats, acct.reserved_msats, acct.spent_msats) == (0, 0, truth - 5)
    assert metric(node, "routstr_unbilled_msats_total") == unbilled + 5


def test_each_request_is_charged_its_own_priced_usage(
    node: NodeProcess, upstream: ScriptedUpstream, ledger: Ledger
) -> None:
    """The second invariant, over a seeded mix of honest, short and lying usage reports."""
    rng = random.Random(13)
    key = new_key(node, 500_000_000)
    expected: list[int] = []
    for _ in range(40):
        fields: dict[str, Any] = {}
        if rng.random() < 0.7:
            fields["max_tokens"] = rng.choice([1, 50, 700, 20_000])
        if rng.random() < 0.3:
            fields["max_completion_tokens"] = rng.choice([5, 3000])
        if rng.random() < 0.3:
            fields["n"] = rng.choice([1, 2, 7])
        raw = chat_body(**fields)
        prompt = rng.choice([0, 3, len(raw), len(raw) + 16, len(raw) + 17, 10**9])
        completion = rng.choice([0, 1, 49, 700, 5000, 40_000, 10**12])
        upstream.enqueue(Behaviour(usage={"prompt_tokens": prompt, "completion_tokens": completion,
                                          "total_tokens": prompt + completion}))
        status, headers, doc = post(node, key, raw)
        assert status == 200, doc
        charge = expected_charge(raw, prompt, completion)
        assert int(headers["x-routstr-cost-msats"]) == charge, (fields, prompt, completion)
        expected.append(charge)
    assert sorted(settled_rows(ledger, key)) == sorted(expected)
    acct = account(ledger, key)
    assert (acct.balance_msats, acct.reserved_msats) == (500_000_000 - sum(expected), 0)


# ---- 3. a reservation lives as long as its request -------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_a_request_outliving_the_ttl_keeps_its_hold(
    node: NodeProcess, upstream: ScriptedUpstream, ledger: Ledger, stream: bool
) -> None:
    """ttl 3 s; the upstream takes 7 s. Another worker's sweep (this test's ledger) must find the
    hold renewed, a second request on the same money must be refused, and the slow one is then
    charged in full."""
    raw = chat_body(max_tokens=100, stream=stream)
    key = new_key(node, 0)
    status, _, doc = post(node, key, raw)
    need = doc["error"]["details"]["required"]
    key = new_key(node, need + need // 2)  # room for one hold, not two
    if stream:
        upstream.enqueue(Behaviour(delay_s=3, event_delay_s=2, stream_chunks=list("abc")))
    else:
        upstream.enqueue(Behaviour(delay_s=7))
    result: dict[str, Any] = {}

    def slow() -> None:
        result["r"] = node.request("POST", "/v1/chat/completions", raw,
                                   {"Authorization": f"Bearer {key}"})

    t = threading.Thread(target=slow)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while account(ledger, key).reserved_msats == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(4.5)  # past the ttl
        assert ledger.sweep_expired() == 0
        assert account(ledger, key).reserved_msats == need
        status, _, doc = post(node, key, chat_body(max_tokens=100))
        assert status == 402, doc
    finally:
        t.join(20)
    status, headers, body = result["r"]
    assert status == 200, body
    if stream:
        assert b"data: [DONE]" in body
    rows = settled_rows(ledger, key)
    assert len(rows) == 1 and rows[0] > 0
    acct = account(ledger, key)
    assert acct.reserved_msats == 0 and acct.balance_msats == need + need // 2 - rows[0]


def test_with_two_workers_every_live_request_keeps_its_hold(
    upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Only worker 0 runs the expiry sweep; every worker must renew its own requests' holds.
    8 slow requests spread over both workers (reuse-port), ttl 3 s, upstream 7 s: none is
    released while it runs."""
    n = NodeProcess(tmp_path_factory.mktemp("hostile-workers"), [
        "--upstream-base-url", upstream.url, "--admin-token", ADMIN, "--workers", "2",
        "--reservation-ttl", "3", "--upstream-read-timeout", "20"])
    n.start()
    db = Database(n.database)
    lg = Ledger(db)
    try:
        raw = chat_body(max_tokens=100)
        keys = [new_key(n, 1_000_000) for _ in range(8)]
        upstream.enqueue(*[Behaviour(delay_s=7) for _ in keys])
        results: list[Any] = []
        threads = [threading.Thread(target=lambda k=k: results.append(post(n, k, raw)))
                   for k in keys]
        for t in threads:
            t.start()
        time.sleep(5)  # past the ttl, and past at least one sweep by worker 0
        held = [account(lg, k).reserved_msats for k in keys]
        for t in threads:
            t.join(20)
        assert all(h > 0 for h in held), held
        assert [r[0] for r in results] == [200] * 8
        for k in keys:
            acct = account(lg, k)
            assert acct.reserved_msats == 0 and len(settled_rows(lg, k)) == 1
            assert acct.balance_msats == 1_000_000 - settled_rows(lg, k)[0]
        lg.check_invariant()
    finally:
        db.close()
        n.stop()
