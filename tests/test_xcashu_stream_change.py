"""X-Cashu streams hand the change back in the response header, before the first byte.

The Routstr SDK and routstr-python read change from the `X-Cashu` response header only, on
streams too. The swap that redeems the payment token splits it: the node keeps the request's
worst case, the rest is a fresh token in the stream's response head; what the worst case leaves
after the actual cost comes back at the end of the stream (in its final usage event, or
`event: cashu-change`), and all of it stays recoverable with `POST /v1/balance/refund` and the
payment token in `X-Cashu` (the part the client already redeemed is dropped, NUT-07).

Real node, real Nutshell mint and wallet, a scripted upstream; every sat checked per request.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routstr.cashu.tokens import parse_token
from routstr.cashupay import xcashu_key_hash
from routstr.db import Database
from routstr.ledger import Ledger
from routstr.pricing import actual_cost, load_price_table
from tests.support.minter import Minter
from tests.support.node import NodeProcess
from tests.support.upstream import Behaviour, ScriptedUpstream

pytestmark = pytest.mark.mint

PRICES = load_price_table(None).at(100_000)
COST = actual_cost(PRICES.get("gpt-4o-mini"), 12, 5).total_msats
MSG = [{"role": "user", "content": "Hello!"}]
STREAM = {"model": "gpt-4o-mini", "messages": MSG, "stream": True, "max_tokens": 2000}


def sats(msats: int) -> int:
    return -(-msats // 1000)


@pytest.fixture(scope="module")
def node(upstream: ScriptedUpstream, mint_url: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("splitnode"), [
        "--upstream-base-url", upstream.url, "--cashu-mints", mint_url])
    n.start()
    yield n
    n.stop()


def txlog(node: NodeProcess, token: str) -> list[tuple[str, int]]:
    db = Database(node.database)
    try:
        acct = Ledger(db).get_account(xcashu_key_hash(token))
        assert acct is not None
        return db.read(lambda c: c.execute(
            "SELECT kind, amount_msats FROM txlog WHERE key_id = ? ORDER BY id", (acct.id,)
        ).fetchall())
    finally:
        db.close()


def books(node: NodeProcess) -> None:
    db = Database(node.database)
    try:
        totals = Ledger(db).check_invariant()
        held = db.read(lambda c: c.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM wallet_proofs WHERE state = 'unspent'"
        ).fetchone()[0])
        assert held * 1000 >= totals["liability_msats"], (held, totals)
    finally:
        db.close()


def required(node: NodeProcess, minter: Minter, mint_url: str, body: dict[str, Any]) -> int:
    status, doc = node.json("POST", "/v1/chat/completions", body,
                            {"X-Cashu": minter.token(mint_url, 1)})
    assert status == 402, doc
    return int(doc["error"]["details"]["required"])


def final_change(text: str) -> dict[str, Any]:
    """The in-band change at the end of a stream (usage chunk, else `event: cashu-change`)."""
    if "event: cashu-change" in text:
        return dict(json.loads(text.split("event: cashu-change\ndata: ", 1)[1].split("\n")[0]))
    last = json.loads(text.rsplit("data: ", 2)[1])
    return dict(last["cashu_change"])


def test_stream_change_beyond_the_worst_case_is_in_the_head(
        node: NodeProcess, minter: Minter, mint_url: str, wallet_tool: Any) -> None:
    worst = required(node, minter, mint_url, STREAM)
    token = minter.token(mint_url, 200)
    status, headers, raw = node.request("POST", "/v1/chat/completions", STREAM,
                                        {"X-Cashu": token})
    assert status == 200
    text = raw.decode()
    head = parse_token(headers["x-cashu"])
    assert head.amount == 200 - sats(worst)  # paid − worst case, in the head
    rest = final_change(text)
    assert rest["msats"] == (sats(worst) * 1000 - COST) // 1000 * 1000  # worst − actual
    assert head.amount * 1000 + rest["msats"] == (200 - sats(COST)) * 1000
    # the per-request charge is the priced usage, nothing more; the log shows both payouts
    log = txlog(node, token)
    assert [a for k, a in log if k == "settle"] == [COST]
    assert [a for k, a in log if k == "deposit"] == [200_000]
    assert [a for k, a in log if k == "change"] == [head.amount * 1000, rest["msats"]]
    assert wallet_tool.receive(mint_url, headers["x-cashu"]) == head.amount  # Nutshell takes it
    assert wallet_tool.receive(mint_url, rest["token"]) == rest["msats"] // 1000
    books(node)


def test_the_head_change_is_spendable_while_the_stream_still_runs(
        node: NodeProcess, minter: Minter, mint_url: str, upstream: ScriptedUpstream,
        wallet_tool: Any) -> None:
    upstream.enqueue(Behaviour(event_delay_s=0.8))  # ~6 events: the stream runs for ~5 s
    token = minter.token(mint_url, 150)
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    t0 = time.monotonic()
    conn.request("POST", "/v1/chat/completions", json.dumps(STREAM),
                 {"Content-Type": "application/json", "X-Cashu": token})
    resp = conn.getresponse()
    head_after = time.monotonic() - t0
    assert resp.status == 200 and head_after < 2.0, head_after
    change = resp.getheader("x-cashu")
    assert change
    got = wallet_tool.receive(mint_url, change)  # redeemed by the client mid-stream
    assert got == parse_token(change).amount > 0
    assert time.monotonic() - t0 < 4.0  # ... before the upstream finished
    text = resp.read().decode()
    conn.close()
    assert got * 1000 + final_change(text)["msats"] == (150 - sats(COST)) * 1000
    books(node)


def test_lost_head_change_is_recovered_with_the_rest(
        node: NodeProcess, minter: Minter, mint_url: str, wallet_tool: Any) -> None:
    token = minter.token(mint_url, 120)
    status, headers, raw = node.request("POST", "/v1/chat/completions", STREAM,
                                        {"X-Cashu": token})
    assert status == 200
    head = parse_token(headers["x-cashu"]).amount
    rest = final_change(raw.decode())["msats"] // 1000
    # the client lost both: one refund call returns both, as one token
    status, doc = node.json("POST", "/v1/balance/refund", headers={"X-Cashu": token})
    assert status == 200 and doc["msats"] == (head + rest) * 1000
    assert parse_token(doc["token"]).amount == head + rest
    # it redeemed the head's part meanwhile: the refund now returns only what is unspent
    assert wallet_tool.receive(mint_url, headers["x-cashu"]) == head
    status, doc = node.json("POST", "/v1/balance/refund", headers={"X-Cashu": token})
    assert status == 200 and doc["msats"] == rest * 1000
    assert wallet_tool.receive(mint_url, doc["token"]) == rest
    books(node)


def test_stream_that_fails_before_its_head_returns_everything_in_the_error(
        node: NodeProcess, minter: Minter, mint_url: str, upstream: ScriptedUpstream,
        wallet_tool: Any) -> None:
    upstream.enqueue(Behaviour(status=500))
    token = minter.token(mint_url, 90)
    status, headers, raw = node.request("POST", "/v1/chat/completions", STREAM,
                                        {"X-Cashu": token})
    assert status == 502
    err = json.loads(raw)["error"]
    assert err["details"]["refund_token"] == headers["x-cashu"]
    assert err["details"]["refund_msats"] == 90_000
    assert wallet_tool.receive(mint_url, headers["x-cashu"]) == 90  # split part and rest
    assert [k for k, _ in txlog(node, token) if k in ("settle", "charge")] == []
    books(node)


def test_stream_answered_as_json_carries_all_change_in_its_header(
        node: NodeProcess, minter: Minter, mint_url: str, upstream: ScriptedUpstream,
        wallet_tool: Any) -> None:
    """An upstream that ignores `stream: true` and answers one JSON document: the change is
    the whole paid − cost, in that answer's header (split-off part and rest merged)."""
    upstream.enqueue(Behaviour(headers=[("content-type", "application/json")], body=json.dumps({
        "id": "x", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}).encode()))
    token = minter.token(mint_url, 110)
    status, headers, raw = node.request("POST", "/v1/chat/completions", STREAM,
                                        {"X-Cashu": token})
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["message"]["content"] == "hi"
    assert wallet_tool.receive(mint_url, headers["x-cashu"]) == 110 - sats(COST)
    assert [a for k, a in txlog(node, token) if k == "settle"] == [COST]
    books(node)


def test_fee_mint_split_keeps_the_worst_case_after_the_swap_fee(
        upstream: ScriptedUpstream, minter: Minter, mint_url_fee: str, wallet_tool: Any,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    n = NodeProcess(tmp_path_factory.mktemp("feenode"), [
        "--upstream-base-url", upstream.url, "--cashu-mints", mint_url_fee]).start()
    try:
        worst = required(n, minter, mint_url_fee, STREAM)
        token = minter.token(mint_url_fee, 200)
        fee = sats(len(parse_token(token).proofs) * 100)
        status, headers, raw = n.request("POST", "/v1/chat/completions", STREAM,
                                         {"X-Cashu": token})
        assert status == 200
        head = parse_token(headers["x-cashu"]).amount
        assert head == 200 - fee - sats(worst)
        rest = final_change(raw.decode())["msats"]
        assert head * 1000 + rest == (200 - fee - sats(COST)) * 1000
        assert wallet_tool.receive(mint_url_fee, headers["x-cashu"]) > 0
        books(n)
    finally:
        n.stop()


def test_exact_payment_has_no_head_change(node: NodeProcess, minter: Minter,
                                          mint_url: str) -> None:
    worst = required(node, minter, mint_url, STREAM)
    token = minter.token(mint_url, sats(worst))
    status, headers, raw = node.request("POST", "/v1/chat/completions", STREAM,
                                        {"X-Cashu": token})
    assert status == 200 and "x-cashu" not in headers
    assert final_change(raw.decode())["msats"] == (sats(worst) - sats(COST)) * 1000
    books(node)


class _LateSwap:
    """The real mint behind a transport whose first swap times out without reaching it, and
    that the test delivers later: a mint that executed a queued swap after the wallet had seen
    its inputs unspent and rolled it back ("not executed", still watched)."""

    def __init__(self) -> None:
        from tests.support.mint import UrllibTransport
        self.inner = UrllibTransport()
        self.held: tuple[str, bytes | None] | None = None

    async def __call__(self, method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        if url.endswith("/v1/swap") and self.held is None:
            self.held = (url, body)
            raise TimeoutError("timed out")
        return await self.inner(method, url, body)

    async def deliver(self) -> None:
        assert self.held is not None
        status, _ = await self.inner("POST", *self.held)
        assert status == 200


def test_split_of_a_swap_the_mint_executed_late_is_recovered(
        tmp_path: Path, minter: Minter, mint_url: str) -> None:
    """The first redemption timed out and was rolled back as not executed; the client retried
    with the same token after the mint executed the first swap after all: the retry fails
    (spent), the first is revived with its split, and the refund returns everything — the
    retry's rolled-back operation under the same reference hides nothing."""
    import secrets as _secrets

    import anyio

    from routstr.cashu.wallet import Wallet
    from routstr.cashupay import CashuConfig, CashuPayments
    from routstr.errors import ApiError
    from routstr.walletstore import SqliteWalletStore

    db = Database(tmp_path / "node.sqlite3")
    try:
        ledger = Ledger(db)
        transport = _LateSwap()
        wallet = Wallet(SqliteWalletStore(db), transport, _secrets.token_bytes(64),
                        inflight_grace_s=0.0)
        cashu = CashuPayments(CashuConfig((mint_url,), 900), ledger, wallet, db)
        token = minter.token(mint_url, 21)

        async def pay() -> ApiError | None:
            try:
                await cashu.xcashu_payer(token, 5_500, "gpt-4o-mini", "r1",
                                        keep_msats=5_500)
            except ApiError as exc:
                return exc
            return None

        async def run() -> tuple[ApiError | None, ApiError | None, tuple[str, int]]:
            first = await pay()  # timed out, rolled back: "not executed"
            await transport.deliver()  # ... but the mint executes it now
            second = await pay()  # spent: the first is revived, with its split
            return first, second, await cashu.recover_change(token)

        first, second, (refund, msats) = anyio.run(run)
        assert first is not None and second is not None
        assert second.code == "cashu_token_already_spent", second.code
        assert msats == 21_000 and parse_token(refund).amount == 21  # split + kept
        ledger.check_invariant()
    finally:
        db.close()


def test_stream_prompt_beyond_its_estimate_is_charged_in_full(
        node: NodeProcess, minter: Minter, mint_url: str, upstream: ScriptedUpstream) -> None:
    """The reservation holds the prompt at its estimate; a longer prompt is charged at
    settlement up to the ceiling from what the payment has left. The split must leave that
    on the account: the charge is the priced usage, never an overdraft the head gave away."""
    body = {**STREAM, "max_tokens": 100,
            "messages": [{"role": "user", "content": "Hello! " * 3000}]}
    usage = {"prompt_tokens": 21_000, "completion_tokens": 5, "total_tokens": 21_005}
    cost = actual_cost(PRICES.get("gpt-4o-mini"), 21_000, 5).total_msats
    worst = required(node, minter, mint_url, body)
    assert sats(worst) * 1000 < cost  # the estimate holds less than this prompt costs
    upstream.enqueue(Behaviour(usage=usage))
    token = minter.token(mint_url, 100)
    status, headers, raw = node.request("POST", "/v1/chat/completions", body,
                                        {"X-Cashu": token})
    assert status == 200
    head = parse_token(headers["x-cashu"]).amount * 1000 if "x-cashu" in headers else 0
    text = raw.decode()
    rest = final_change(text)["msats"] if "cashu_change" in text else 0
    assert [a for k, a in txlog(node, token) if k == "settle"] == [cost]
    assert head + rest == (100 - sats(cost)) * 1000
    books(node)
