"""Paying with Cashu end to end: the real node, the real Nutshell mint, the real OpenAI SDK.

A token is only "paid" when the mint says so: every test checks token states at the mint,
exact msat balances, and the ledger's conservation invariant.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from routstr.cashu.tokens import PaymentRequest, parse_token
from routstr.db import Database
from routstr.keys import hash_key, token_api_key
from routstr.ledger import Ledger
from routstr.pricing import actual_cost, load_price_table
from tests.support.minter import Minter
from tests.support.node import NodeProcess
from tests.support.upstream import Behaviour, ScriptedUpstream

pytestmark = pytest.mark.mint

ADMIN = "pay-admin"
PRICES = load_price_table(None).at(100_000)
CHAT_COST = actual_cost(PRICES.get("gpt-4o-mini"), 12, 5).total_msats
MSG = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def node(upstream: ScriptedUpstream, mint_url: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("paynode"), [
        "--upstream-base-url", upstream.url, "--admin-token", ADMIN, "--cashu-mints", mint_url])
    n.start()
    yield n
    n.stop()


def ledger_of(node: NodeProcess) -> tuple[Database, Ledger]:
    db = Database(node.database)
    return db, Ledger(db)


def check_books(node: NodeProcess) -> dict[str, int]:
    """Ledger invariant, and the wallet holds at least what the node owes its users."""
    db, ledger = ledger_of(node)
    try:
        totals = ledger.check_invariant()
        proofs_sats = db.read(lambda c: c.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM wallet_proofs WHERE state = 'unspent'"
        ).fetchone()[0])
        assert proofs_sats * 1000 >= totals["liability_msats"], (proofs_sats, totals)
        return totals
    finally:
        db.close()


def account(node: NodeProcess, key_hash: str) -> Any:
    db, ledger = ledger_of(node)
    try:
        return ledger.get_account(key_hash)
    finally:
        db.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---- a token as the key ----------------------------------------------------------------------
def test_token_as_bearer_key_with_the_openai_sdk(node: NodeProcess, minter: Minter, mint_url: str,
                                                 upstream: ScriptedUpstream) -> None:
    token = minter.token(mint_url, 100)
    client = OpenAI(api_key=token, base_url=node.base_url, max_retries=0)
    r = client.chat.completions.create(model="gpt-4o-mini", messages=MSG)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "Hello from upstream!"
    assert minter.state(mint_url, token) == ["SPENT"] * len(parse_token(token).proofs)
    r2 = client.chat.completions.create(model="gpt-4o-mini", messages=MSG)  # type: ignore[arg-type]
    assert r2.usage and r2.usage.model_dump()["remaining_balance_msats"] == 100_000 - 2 * CHAT_COST
    # the client learns its sk- key from /v1/wallet/info and can use it instead of the token
    status, info = node.json("GET", "/v1/wallet/info", headers=auth(token))
    assert status == 200 and info["api_key"] == token_api_key(token)
    assert info["balance"] == 100_000 - 2 * CHAT_COST and info["reserved"] == 0
    assert info["refundable_msats"] + info["sub_sat_msats"] == info["balance"]
    assert info["refundable_msats"] % 1000 == 0 and 0 <= info["sub_sat_msats"] < 1000
    assert ("sub_sat_note" in info) == (info["sub_sat_msats"] > 0)
    status, info2 = node.json("GET", "/v1/balance/info", headers=auth(info["api_key"]))
    assert status == 200 and info2["balance"] == info["balance"]
    assert account(node, hash_key(token_api_key(token))).deposited_msats == 100_000
    check_books(node)


def test_nutshell_token_accepted_and_refund_accepted_by_nutshell(
        node: NodeProcess, mint_url: str, wallet_tool: Any) -> None:
    token = wallet_tool.mint_token(mint_url, 64)
    status, doc = node.json("POST", "/v1/balance/create", {"initial_balance_token": token})
    assert status == 200 and doc["balance"] == 64_000 and doc["api_key"].startswith("sk-")
    key = doc["api_key"]
    status, doc = node.json("POST", "/v1/wallet/refund", headers=auth(key))
    assert status == 200, doc
    assert doc["sats"] == "64" and doc["msats"] == 64_000 and doc["token"].startswith("cashuB")
    assert wallet_tool.receive(mint_url, doc["token"]) == 64
    status, doc = node.json("POST", "/v1/wallet/refund", headers=auth(key))
    assert status == 400 and "No balance to refund" in doc["error"]["message"]
    check_books(node)


def test_create_by_get_topup_by_query_and_body(node: NodeProcess, minter: Minter, mint_url: str) -> None:
    t1, t2, t3 = (minter.token(mint_url, n) for n in (10, 20, 30))
    status, doc = node.json("GET", f"/v1/balance/create?initial_balance_token={t1}")
    assert status == 200 and doc["balance"] == 10_000
    key = doc["api_key"]
    status, doc = node.json("POST", f"/v1/balance/topup?cashu_token={t2}", headers=auth(key))
    assert status == 200 and doc["msats"] == 20_000 and doc["balance"] == 30_000
    status, doc = node.json("POST", "/v1/wallet/topup", {"cashu_token": t3}, auth(key))
    assert status == 200 and doc["amount_added"] == 30_000 and doc["balance"] == 60_000
    # a client whose answer was lost retries: told what was credited, never credited twice
    status, doc = node.json("POST", "/v1/wallet/topup", {"cashu_token": t3}, auth(key))
    assert status == 200 and doc["amount_added"] == 30_000 and doc["balance"] == 60_000
    status, info = node.json("GET", "/v1/balance", headers=auth(key))
    assert info["balance"] == 60_000
    # the same (spent) token on another key is refused
    status, other = node.json("POST", "/v1/balance/create",
                              {"initial_balance_token": minter.token(mint_url, 5)})
    status, doc = node.json("POST", "/v1/wallet/topup", {"cashu_token": t3}, auth(other["api_key"]))
    assert status == 400 and doc["error"]["code"] == "cashu_token_already_spent"
    # create is idempotent per token too: a retry returns the same key, credited once
    t4 = minter.token(mint_url, 7)
    first = node.json("POST", "/v1/balance/create", {"initial_balance_token": t4})[1]
    again = node.json("POST", "/v1/balance/create", {"initial_balance_token": t4})[1]
    assert first == again == {"api_key": first["api_key"], "balance": 7_000}
    check_books(node)


def test_too_small_token_as_key_says_it_was_redeemed(node: NodeProcess, minter: Minter,
                                                      mint_url: str) -> None:
    """Unlike X-Cashu (handed back untouched), a token used as the key is redeemed on first use:
    the 402 says so, with the key it now is and what it holds — the token is spent, not lost."""
    token = minter.token(mint_url, 1)
    status, _, raw = node.request("POST", "/v1/chat/completions",
                                  {"model": "gpt-4o", "messages": MSG, "max_tokens": 4000},
                                  auth(token))
    assert status == 402, raw
    err = json.loads(raw)["error"]
    assert err["code"] == "insufficient_balance"
    assert err["details"]["token_redeemed"] is True
    assert err["details"]["api_key"] == token_api_key(token)
    assert err["details"]["balance_msats"] == err["details"]["available"] == 1000
    assert "was redeemed" in err["message"] and "holding 1.000 sats (1000 msats)" in err["message"]
    assert token_api_key(token) in err["message"] and "/v1/balance/refund" in err["message"]
    assert minter.state(mint_url, token) == ["SPENT"]
    status, info = node.json("GET", "/v1/balance", headers=auth(token_api_key(token)))
    assert status == 200 and info["balance"] == 1000 and info["reserved"] == 0
    # an sk- key's 402 stays as it was: nothing about tokens
    status, _, raw = node.request("POST", "/v1/chat/completions",
                                  {"model": "gpt-4o", "messages": MSG, "max_tokens": 4000},
                                  auth(token_api_key(token)))
    assert status == 402 and "token_redeemed" not in json.loads(raw)["error"]["details"]
    check_books(node)


def test_refund_keeps_sub_sat_remainder(node: NodeProcess, minter: Minter, mint_url: str,
                                        wallet_tool: Any) -> None:
    status, doc = node.json("POST", "/v1/balance/create",
                            {"initial_balance_token": minter.token(mint_url, 50)})
    key = doc["api_key"]
    OpenAI(api_key=key, base_url=node.base_url).chat.completions.create(
        model="gpt-4o-mini", messages=MSG)  # type: ignore[arg-type]
    left = 50_000 - CHAT_COST
    status, doc = node.json("POST", "/v1/balance/refund", headers=auth(key))
    assert status == 200 and doc["msats"] == (left // 1000) * 1000
    assert doc["remaining_msats"] == left % 1000 > 0
    assert doc["remaining_reason"].startswith(f"{left % 1000} msats stay on this key")
    assert "whole sats" in doc["remaining_reason"]
    assert wallet_tool.receive(mint_url, doc["token"]) == left // 1000
    status, info = node.json("GET", "/v1/balance", headers=auth(key))
    assert info["balance"] == left % 1000
    assert (info["refundable_msats"], info["sub_sat_msats"]) == (0, left % 1000)
    assert info["sub_sat_note"] == doc["remaining_reason"]
    status, again = node.json("POST", "/v1/balance/refund", headers=auth(key))
    assert status == 400 and again["error"]["code"] == "no_balance"
    assert doc["remaining_reason"] in again["error"]["message"]
    check_books(node)


# ---- X-Cashu per request -----------------------------------------------------------------------
def test_xcashu_change_in_header(node: NodeProcess, minter: Minter, mint_url: str,
                                 wallet_tool: Any) -> None:
    token = minter.token(mint_url, 200)
    status, headers, raw = node.request("POST", "/v1/chat/completions",
                                        {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 100},
                                        {"X-Cashu": token})
    assert status == 200, raw
    change = headers["x-cashu"]
    expected = 200 - -(-CHAT_COST // 1000)  # paid − ceil(cost in sats)
    assert parse_token(change).amount == expected
    assert wallet_tool.receive(mint_url, change) == expected
    assert headers["x-routstr-cost-msats"] == str(CHAT_COST)
    # lost change is recoverable with the original token
    status, doc = node.json("POST", "/v1/wallet/refund", headers={"X-Cashu": token})
    assert status == 200 and doc["token"] == change
    # the same token cannot pay twice
    status, doc = node.json("POST", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MSG},
                            {"X-Cashu": token})
    assert status == 400 and doc["error"]["code"] == "cashu_token_already_spent"
    check_books(node)


def test_xcashu_stream_change_event(node: NodeProcess, minter: Minter, mint_url: str) -> None:
    token = minter.token(mint_url, 100)
    body = {"model": "gpt-4o-mini", "messages": MSG, "stream": True, "max_tokens": 3000}
    status, headers, raw = node.request("POST", "/v1/chat/completions", body, {"X-Cashu": token})
    assert status == 200
    text = raw.decode()
    assert text.index("data: [DONE]") < text.index("event: cashu-change")
    event = text.split("event: cashu-change\ndata: ", 1)[1].split("\n", 1)[0]
    change = json.loads(event)
    split = parse_token(headers["x-cashu"]).amount * 1000  # in the head: beyond the worst case
    assert split > 0 and split + change["msats"] == (100 - -(-CHAT_COST // 1000)) * 1000
    assert parse_token(change["token"]).amount * 1000 == change["msats"]
    check_books(node)


def test_xcashu_stream_change_rides_in_the_usage_chunk(node: NodeProcess, minter: Minter,
                                                       mint_url: str) -> None:
    """With a usage chunk to carry it, the in-band change is in it: nothing follows [DONE]."""
    token = minter.token(mint_url, 100)
    body = {"model": "gpt-4o-mini", "messages": MSG, "stream": True, "max_tokens": 3000,
            "stream_options": {"include_usage": True}}
    status, headers, raw = node.request("POST", "/v1/chat/completions", body, {"X-Cashu": token})
    assert status == 200
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n") and "event:" not in text
    last = json.loads(text.rsplit("data: ", 2)[1])
    assert last["choices"] == [] and last["usage"]["cost"]["total_msats"] == CHAT_COST
    change = last["cashu_change"]
    assert parse_token(change["token"]).amount * 1000 == change["msats"]
    header = parse_token(headers["x-cashu"]).amount * 1000
    assert header > 0 and header + change["msats"] == (100 - -(-CHAT_COST // 1000)) * 1000
    check_books(node)


def test_xcashu_too_small_gets_402_with_payment_request(node: NodeProcess, minter: Minter,
                                                        mint_url: str) -> None:
    token = minter.token(mint_url, 1)
    status, headers, raw = node.request("POST", "/v1/chat/completions",
                                        {"model": "gpt-4o", "messages": MSG}, {"X-Cashu": token})
    assert status == 402
    err = json.loads(raw)["error"]
    assert err["type"] == "insufficient_balance"
    req = PaymentRequest.decode(headers["x-cashu"])
    assert req.unit == "sat" and req.mints == (mint_url,)
    assert req.amount == -(-err["details"]["required"] // 1000)
    assert minter.state(mint_url, token) == ["UNSPENT"]  # left unredeemed


def test_xcashu_sized_for_one_choice_cannot_buy_128(node: NodeProcess, minter: Minter,
                                                     mint_url: str,
                                                     upstream: ScriptedUpstream) -> None:
    """Issue 13: n=128 × 1 000 max tokens on a payment sized for one choice was served. Now the
    402 asks for all 128 choices' output before anything is swapped or forwarded."""
    body = {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 1000, "n": 128}
    token = minter.token(mint_url, 2)  # one choice: 1 000 × 0.6 msats = 0.6 sat, plus the prompt
    before = len(upstream.requests)
    status, headers, raw = node.request("POST", "/v1/chat/completions", body, {"X-Cashu": token})
    assert status == 402
    err = json.loads(raw)["error"]
    assert err["details"]["required"] >= 128 * 1000 * 600 // 1000
    assert PaymentRequest.decode(headers["x-cashu"]).amount == -(-err["details"]["required"]
                                                                 // 1000)
    assert len(upstream.requests) == before
    assert minter.state(mint_url, token) == ["UNSPENT"] * len(minter.state(mint_url, token))
    check_books(node)


def test_untrusted_mint_token_untouched(node: NodeProcess, minter: Minter, mint_url_fee: str) -> None:
    token = minter.token(mint_url_fee, 50)
    status, headers, raw = node.request("POST", "/v1/chat/completions",
                                        {"model": "gpt-4o-mini", "messages": MSG}, {"X-Cashu": token})
    assert status == 400
    err = json.loads(raw)["error"]
    assert err["code"] == "untrusted_mint" and err["details"]["accepted_mints"]
    assert headers["x-cashu"] == token  # echoed: still the client's
    assert set(minter.state(mint_url_fee, token)) == {"UNSPENT"}


def test_xcashu_upstream_failure_refunds_everything(node: NodeProcess, minter: Minter, mint_url: str,
                                                    upstream: ScriptedUpstream, wallet_tool: Any) -> None:
    token = minter.token(mint_url, 80)
    upstream.enqueue(Behaviour(status=500))
    status, headers, raw = node.request("POST", "/v1/chat/completions",
                                        {"model": "gpt-4o-mini", "messages": MSG}, {"X-Cashu": token})
    assert status == 502
    err = json.loads(raw)["error"]
    assert err["details"]["refund_token"] == headers["x-cashu"]
    assert wallet_tool.receive(mint_url, headers["x-cashu"]) == 80
    check_books(node)


def test_parallel_requests_with_one_token_credit_once(node: NodeProcess, minter: Minter,
                                                      mint_url: str) -> None:
    token = minter.token(mint_url, 300)

    def call(_: int) -> int:
        status, _, _ = node.request("POST", "/v1/chat/completions",
                                    {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 50},
                                    auth(token))
        return status

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(call, range(50)))
    assert statuses.count(200) >= 1
    assert set(statuses) <= {200, 402, 425}
    acct = account(node, hash_key(token_api_key(token)))
    assert acct.deposited_msats == 300_000  # redeemed and credited once
    assert acct.balance_msats == 300_000 - statuses.count(200) * CHAT_COST
    check_books(node)


def test_lightning_invoice_create_and_poll(node: NodeProcess) -> None:
    status, inv = node.json("POST", "/lightning/invoice", {"amount_sats": 21, "purpose": "create"})
    assert status == 200 and inv["bolt11"].startswith("ln") and inv["amount_sats"] == 21
    deadline = time.monotonic() + 15
    while True:
        status, st = node.json("GET", f"/lightning/invoice/{inv['invoice_id']}/status")
        if st["status"] == "paid" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert st["status"] == "paid" and st["api_key"].startswith("sk-")
    status, info = node.json("GET", "/v1/balance/info", headers=auth(st["api_key"]))
    assert info["balance"] == 21_000
    # polling again never credits twice
    node.json("GET", f"/v1/balance/lightning/invoice/{inv['invoice_id']}")
    status, info = node.json("GET", "/v1/balance/info", headers=auth(st["api_key"]))
    assert info["balance"] == 21_000
    # top-up of that key by invoice
    status, inv2 = node.json("POST", "/v1/balance/lightning/invoice",
                             {"amount_sats": 5, "purpose": "topup"}, auth(st["api_key"]))
    assert status == 200
    deadline = time.monotonic() + 15
    while node.json("GET", f"/lightning/invoice/{inv2['invoice_id']}/status")[1]["status"] != "paid":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    status, info = node.json("GET", "/v1/balance/info", headers=auth(st["api_key"]))
    assert info["balance"] == 26_000
    check_books(node)


def test_child_keys(node: NodeProcess, minter: Minter, mint_url: str) -> None:
    status, doc = node.json("POST", "/v1/balance/create",
                            {"initial_balance_token": minter.token(mint_url, 100)})
    parent = doc["api_key"]
    status, doc = node.json("POST", "/v1/balance/child-key",
                            {"count": 2, "balance_limit": CHAT_COST, "balance_limit_reset": "daily"},
                            auth(parent))
    assert status == 200 and len(doc["api_keys"]) == 2
    child = doc["api_keys"][0]
    ok = node.json("POST", "/v1/chat/completions",
                   {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 5}, auth(child))
    assert ok[0] == 200
    status, err = node.json("POST", "/v1/chat/completions",
                            {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 5}, auth(child))
    assert status == 402 and err["error"]["code"] == "balance_limit_exceeded"
    status, err = node.json("POST", "/v1/balance/refund", headers=auth(child))
    assert status == 400
    status, info = node.json("GET", "/v1/balance", headers=auth(parent))
    assert info["balance"] == 100_000 - CHAT_COST
    check_books(node)


# ---- faults ------------------------------------------------------------------------------------
def test_mint_down_is_503_and_token_stays_spendable(node_factory: Any, own_mint: Any,
                                                    minter: Minter, upstream: ScriptedUpstream) -> None:
    token = minter.token(own_mint.url, 40)
    n = node_factory("--upstream-base-url", upstream.url, "--cashu-mints", own_mint.url)
    own_mint.stop()
    try:
        status, headers, raw = n.request("POST", "/v1/chat/completions",
                                         {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 10},
                                         {"X-Cashu": token})
        assert status == 503 and json.loads(raw)["error"]["code"] == "cashu_mint_unreachable"
    finally:
        own_mint.restart()
    assert minter.state(own_mint.url, token) == ["UNSPENT"] * len(parse_token(token).proofs)
    status, _, _ = n.request("POST", "/v1/chat/completions",
                             {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 10},
                             {"X-Cashu": token})
    assert status == 200


def test_sigkill_while_making_change_then_recover(node_factory: Any, own_mint: Any, minter: Minter,
                                                  upstream: ScriptedUpstream, tmp_path: Path,
                                                  wallet_tool: Any) -> None:
    token = minter.token(own_mint.url, 100)
    args = ("--upstream-base-url", upstream.url, "--cashu-mints", own_mint.url)
    n = node_factory(*args)
    upstream.enqueue(Behaviour(delay_s=1.0))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(n.request, "POST", "/v1/chat/completions",
                          {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 10},
                          {"X-Cashu": token}, 20)
        time.sleep(0.6)  # redeemed; the upstream is answering
        own_mint.pause()  # making change will hang at the mint
        time.sleep(1.5)
        n.kill()  # SIGKILL while the change is being made
        with pytest.raises(Exception):
            fut.result(10)
    own_mint.resume()
    n2 = node_factory(*args, workdir=n.workdir)
    deadline = time.monotonic() + 20
    while True:
        status, doc = n2.json("POST", "/v1/wallet/refund", headers={"X-Cashu": token})
        if status == 200 or time.monotonic() > deadline:
            break
        assert status in (425, 400, 404), doc
        time.sleep(0.5)
    assert status == 200, doc
    assert wallet_tool.receive(own_mint.url, doc["token"]) == doc["msats"] // 1000 > 0
    check_books(n2)


def test_same_token_on_two_nodes_only_one_wins(node_factory: Any, mint_url: str, minter: Minter,
                                               upstream: ScriptedUpstream, tmp_path: Path) -> None:
    token = minter.token(mint_url, 30)
    a = node_factory("--upstream-base-url", upstream.url, "--cashu-mints", mint_url,
                     workdir=tmp_path / "a" if (tmp_path / "a").mkdir() is None else None)
    b = node_factory("--upstream-base-url", upstream.url, "--cashu-mints", mint_url,
                     workdir=tmp_path / "b" if (tmp_path / "b").mkdir() is None else None)

    def use(n: NodeProcess) -> int:
        return n.request("GET", "/v1/wallet/info", headers=auth(token))[0]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = sorted(pool.map(use, [a, b]))
    assert results[0] == 200 and results[1] == 400


def test_operator_payout_of_earnings(node_factory: Any, mint_url: str, mint_url_fee: str,
                                     minter: Minter, upstream: ScriptedUpstream, tmp_path: Path) -> None:
    from tests.support.lnurl import LnurlService

    pricing = tmp_path / "prices.toml"
    pricing.write_text('[models."gpt-4o-mini"]\ninput_msats_per_1k = 0\noutput_msats_per_1k = 0\n'
                       'request_msats = 20000\nmax_output_tokens = 100\ncontext_length = 1000\n')
    svc = LnurlService(mint_url_fee)
    try:
        n = node_factory("--upstream-base-url", upstream.url, "--cashu-mints", mint_url,
                         "--pricing", str(pricing), "--receive-ln-address", svc.address,
                         "--min-payout-sats", "30", "--payout-interval", "1",
                         "--lnurl-allow-private")
        status, doc = n.json("POST", "/v1/balance/create",
                             {"initial_balance_token": minter.token(mint_url, 100)})
        key = doc["api_key"]
        for _ in range(3):  # 3 × 20 sats of earnings
            assert n.json("POST", "/v1/chat/completions",
                          {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 5}, auth(key))[0] == 200
        deadline = time.monotonic() + 15
        while "paid out" not in n.log_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "paid out" in n.log_text()
        totals = check_books(n)  # the users' 40 sats are still fully covered
        assert totals["liability_msats"] == 40_000
        db, _ = ledger_of(n)
        held = db.read(lambda c: c.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM wallet_proofs WHERE state = 'unspent'").fetchone()[0])
        db.close()
        assert 40 <= held < 100 - 30
    finally:
        svc.close()
