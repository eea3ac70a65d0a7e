"""routstr.cashu.wallet (+ the node's sqlite store) against the real Nutshell mint.

Mint, send, receive, melt, LNURL payouts; fees on and off (credited = value − fee, exactly);
tokens exchanged both ways with the Nutshell wallet; double spends; a mint that is down.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routstr import ledger
from routstr.cashu import bdhke, lnurl
from routstr.cashu.mint import BlindedMessage, MintClient, MintUnreachable, ProofsAlreadySpent
from routstr.cashu.tokens import Token, parse_token
from routstr.cashu.wallet import InsufficientFunds, TokenTooSmall, Wallet, proof_y
from routstr.db import Database
from routstr.walletstore import SqliteWalletStore
from tests.support.lnurl import LnurlService
from tests.support.mint import MintProcess, UrllibTransport, WalletTool

pytestmark = [pytest.mark.mint, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Node:
    """A wallet with its own database, as the node runs it."""

    def __init__(self, path: Path, seed: bytes | None = None, **kw: Any) -> None:
        self.db = Database(path)
        self.store = SqliteWalletStore(self.db)
        self.transport = UrllibTransport(timeout_s=kw.pop("timeout_s", 10.0))
        self.wallet = Wallet(self.store, self.transport, seed or os.urandom(64), **kw)

    def account(self, key_hash: str) -> ledger.Account | None:
        return self.db.read(lambda c: ledger.get_account(c, key_hash))

    def ledger_totals(self) -> dict[str, int]:
        return self.db.read(ledger.check_invariant)

    async def fund(self, mint: str, amount: int) -> None:
        q = await self.wallet.mint_quote(amount, mint)
        got = await self.wallet.mint_paid(q.quote)
        assert got is not None and got.amount == amount

    async def assert_proofs_unspent_at_mint(self, mint: str) -> None:
        proofs = self.store.unspent(mint.rstrip("/"), "sat")
        states = await MintClient(mint, self.transport).check_state([proof_y(p.secret)
                                                                     for p in proofs])
        assert {s.state for s in states} <= {"UNSPENT"}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path / "a.sqlite3")
    yield n
    n.db.close()


@pytest.fixture
def node2(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path / "b.sqlite3")
    yield n
    n.db.close()


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def as_account(token: str) -> dict[str, Any]:
    """The purpose the payments code uses for a token presented as a Bearer key."""
    return {"action": "create_account", "key_hash": token_key(token), "kind": "token",
            "ref": token_key(token)}


async def test_mint_send_receive_without_fees(node: Node, node2: Node, mint_url: str) -> None:
    acc = node.db.transaction(lambda c: ledger.create_account(
        c, key_hash="ab" * 32, kind="api", now=1))
    q = await node.wallet.mint_quote(100, mint_url)
    assert q.amount == 100 and q.request.startswith("lnbc")
    topup = {"action": "credit", "account_id": acc.id, "ref": f"invoice:{q.quote}"}
    first = await node.wallet.mint_paid(q.quote, topup)
    assert first is not None and first.amount == 100
    again = await node.wallet.mint_paid(q.quote, topup)  # minted once, credited once
    assert again is not None and again.amount == 100 and again.op_id == first.op_id
    assert node.wallet.balance(mint_url) == 100
    assert node.ledger_totals()["deposited_msats"] == 100_000

    token = await node.wallet.send(13, mint_url, ref="change-for-x", memo="change")
    assert token.amount == 13 and token.unit == "sat" and token.memo == "change"
    assert all(p.dleq is not None and p.dleq.r is not None for p in token.proofs)  # NUT-12
    assert node.wallet.balance(mint_url) == 87  # no fee, no loss
    op = node.wallet.issued_token("change-for-x")
    assert op is not None and op.token is not None and parse_token(op.token) == token

    got = await node2.wallet.receive(token.serialize(), as_account(token.serialize()))
    assert (got.amount, got.fee) == (13, 0)
    acct = node2.account(token_key(token.serialize()))
    assert acct is not None and acct.balance_msats == 13_000
    assert node2.wallet.balance(mint_url) == 13
    await node.assert_proofs_unspent_at_mint(mint_url)
    await node2.assert_proofs_unspent_at_mint(mint_url)
    assert node.store.totals()["issued"] == 13


async def test_fees_are_charged_exactly(node: Node, node2: Node, mint_url_fee: str,
                                        wallet_tool: WalletTool) -> None:
    text = wallet_tool.mint_token(mint_url_fee, 64)
    n = len(parse_token(text).proofs)
    fee = (n * 100 + 999) // 1000
    got = await node.wallet.receive(text, as_account(text))
    assert (got.amount, got.fee) == (64 - fee, fee)
    acct = node.account(token_key(text))
    assert acct is not None and acct.deposited_msats == (64 - fee) * 1000
    have = node.wallet.balance(mint_url_fee)
    assert have == 64 - fee

    token = await node.wallet.send(20, mint_url_fee)
    assert token.amount == 20
    spent = have - node.wallet.balance(mint_url_fee)
    assert spent - 20 in (0, 1)  # an exact-proof send is free; a swap pays 100 ppk per input
    got2 = await node2.wallet.receive(token)
    assert got2.amount == 20 - (len(token.proofs) * 100 + 999) // 1000
    with pytest.raises(TokenTooSmall):  # a 1-sat token cannot pay its own fee
        one = await node.wallet.send(1, mint_url_fee)
        await node2.wallet.receive(one)
    await node.assert_proofs_unspent_at_mint(mint_url_fee)


async def test_tokens_interoperate_with_the_nutshell_wallet(
    node: Node, mint_url: str, wallet_tool: WalletTool
) -> None:
    theirs = wallet_tool.mint_token(mint_url, 40)
    assert (await node.wallet.receive(theirs)).amount == 40
    ours = await node.wallet.send(21, mint_url)
    assert wallet_tool.state(mint_url, ours.serialize()) == ["UNSPENT"] * len(ours.proofs)
    assert wallet_tool.receive(mint_url, ours.serialize()) == 21
    assert set(wallet_tool.state(mint_url, ours.serialize())) == {"SPENT"}
    v3 = await node.wallet.send(5, mint_url)
    assert wallet_tool.receive(mint_url, v3.serialize(version=3)) == 5


async def test_double_receive_is_refused(node: Node, node2: Node, mint_url: str,
                                         wallet_tool: WalletTool) -> None:
    text = wallet_tool.mint_token(mint_url, 16)
    await node.wallet.receive(text, as_account(text))
    with pytest.raises(ProofsAlreadySpent):  # same wallet: its own record says so
        await node.wallet.receive(text, as_account(text))
    with pytest.raises(ProofsAlreadySpent):  # another wallet: the mint says so (11001)
        await node2.wallet.receive(text, as_account(text))
    assert node2.account(token_key(text)) is None and node2.store.pending() == []
    assert node2.wallet.balances() == {}
    acct = node.account(token_key(text))
    assert acct is not None and acct.balance_msats == 16_000
    assert node.ledger_totals()["deposited_msats"] == 16_000


async def test_melt_pays_an_invoice_and_returns_the_fee_reserve(
    node: Node, mint_url: str, mint_url_fee: str
) -> None:
    await node.fund(mint_url, 200)
    acc = node.db.transaction(lambda c: ledger.create_account(
        c, key_hash="cd" * 32, kind="api", deposit_msats=80_000, now=1))
    invoice = (await MintClient(mint_url_fee, node.transport).mint_quote(50)).request
    quote = await node.wallet.melt_quote(invoice, mint_url)
    purpose = {"action": "debit", "account_id": acc.id, "amount_msats": 50_000, "kind": "payout"}
    res = await node.wallet.melt(invoice, mint_url, purpose, quote=quote)
    assert res.amount == 50 and res.preimage is not None
    assert 0 <= res.fee <= quote.fee_reserve
    assert node.wallet.balance(mint_url) == 200 - 50 - res.fee  # change came back
    paid = node.db.read(lambda c: ledger.get_account_by_id(c, acc.id))
    assert paid is not None and paid.balance_msats == 30_000 and paid.refunded_msats == 50_000
    await node.assert_proofs_unspent_at_mint(mint_url)
    with pytest.raises(InsufficientFunds):
        inv = (await MintClient(mint_url_fee, node.transport).mint_quote(500)).request
        await node.wallet.melt(inv, mint_url)
    assert node.wallet.balance(mint_url) == 200 - 50 - res.fee  # nothing reserved by the refusal
    assert node.store.pending() == []


async def test_pay_lightning_address(node: Node, mint_url: str, mint_url_fee: str) -> None:
    svc = LnurlService(mint_url_fee)
    try:
        await node.fund(mint_url, 100)
        res = await node.wallet.pay_lightning_address(svc.address, 21_000)
        assert res.amount == 21
        assert node.wallet.balance(mint_url) == 100 - 21 - res.fee
        with pytest.raises(lnurl.LnurlError, match="outside"):
            await node.wallet.pay_lightning_address(svc.address, 2_000_000)
        svc.lie = True  # an invoice for more than was asked is never paid
        with pytest.raises(lnurl.LnurlError, match="asked for"):
            await node.wallet.pay_lightning_address(svc.address, 5_000)
        with pytest.raises(lnurl.LnurlError, match="no such user"):
            await node.wallet.pay_lightning_address(svc.address.replace("alice", "bob"), 5_000)
        assert node.wallet.balance(mint_url) == 100 - 21 - res.fee
    finally:
        svc.server.shutdown()


def test_bolt11_amounts_and_lnurl_resolution() -> None:
    assert lnurl.bolt11_amount_msat("lnbc640n1p4sg4qn9qypq") == 64_000
    assert lnurl.bolt11_amount_msat("LNBC1U1P4SG5099QYP") == 100_000
    assert lnurl.bolt11_amount_msat("lnbc2500u1pvjluez") == 250_000_000
    assert lnurl.bolt11_amount_msat("lntb20m1pvjluez") == 2_000_000_000
    assert lnurl.bolt11_amount_msat("lnbcrt10p1abc") == 1
    assert lnurl.bolt11_amount_msat("lnbc1pvjluezpp5qq") is None  # no amount
    for bad in ("lnbc15p1xyz", "notaninvoice", "lnbc"):
        with pytest.raises(lnurl.LnurlError):
            lnurl.bolt11_amount_msat(bad)
    assert lnurl.resolve_url("Satoshi@Example.com") == \
        "https://example.com/.well-known/lnurlp/satoshi"
    assert lnurl.resolve_url("a@127.0.0.1:8080") == "http://127.0.0.1:8080/.well-known/lnurlp/a"
    # LUD-01's example
    enc = ("LNURL1DP68GURN8GHJ7UM9WFMXJCM99E3K7MF0V9CXJ0M385EKVCENXC6R2C35XVUKXEFCV5MKVV34X5EKZD3E"
           "V56NYD3HXQURZEPEXEJXXEPNXSCRVWFNV9NXZCN9XQ6XYEFHVGCXXCMYXYMNSERXFQ5FNS")
    assert lnurl.resolve_url(enc) == (
        "https://service.com/api?q=3fc3645b439ce8e7f2553a69e5267081d96dcd340693afabe04be7b0ccd178df")
    for bad in ("http://example.com/x", "not an address", enc[:-1] + "t"):
        with pytest.raises(lnurl.LnurlError):
            lnurl.resolve_url(bad)


async def test_balances_over_several_mints(node: Node, mint_url: str, mint_url_fee: str) -> None:
    await node.fund(mint_url, 30)
    await node.fund(mint_url_fee, 12)
    assert node.wallet.balances() == {mint_url: 30, mint_url_fee: 12}
    with pytest.raises(InsufficientFunds):
        await node.wallet.send(31, mint_url)
    assert node.wallet.balances() == {mint_url: 30, mint_url_fee: 12}


async def test_mint_down_refused_then_hung(tmp_path: Path, own_mint: MintProcess,
                                           wallet_tool: WalletTool) -> None:
    node = Node(tmp_path / "c.sqlite3", timeout_s=1.0, inflight_grace_s=0.0)
    url = own_mint.url
    text = wallet_tool.mint_token(url, 32)
    await node.wallet.client(url).keysets()  # keysets known, as in a running node
    await node.wallet.client(url).active_keyset()
    own_mint.stop()  # refused: the swap never left, the intent is rolled back at once
    with pytest.raises(MintUnreachable):
        await node.wallet.receive(text, as_account(text))
    assert node.store.pending() == [] and node.account(token_key(text)) is None
    own_mint.start()
    assert wallet_tool.state(url, text) == ["UNSPENT"] * len(parse_token(text).proofs)

    own_mint.pause()  # hung: the request may sit in the mint's socket; outcome unknown
    try:
        with pytest.raises(MintUnreachable):
            await node.wallet.receive(text, as_account(text))
        assert len(node.store.pending()) == 1
    finally:
        own_mint.resume()
    deadline = time.monotonic() + 10
    report = await node.wallet.recover()
    while report.still_pending and time.monotonic() < deadline:
        report = await node.wallet.recover()
    assert node.store.pending() == []
    states = set(wallet_tool.state(url, text))
    acct = node.account(token_key(text))
    if states == {"SPENT"}:  # the mint executed the queued swap: credited, once
        assert acct is not None and acct.balance_msats == 32_000
        assert node.wallet.balance(url) == 32
    else:  # it did not: rolled back, the token is still the client's
        assert states == {"UNSPENT"} and acct is None
        assert (await node.wallet.receive(text, as_account(text))).amount == 32
    assert node.ledger_totals()["deposited_msats"] == 32_000
    node.db.close()


async def test_measure_swap_of_8_proofs(node: Node, mint_url: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """ms per swap of 8 proofs on loopback: the bare NUT-03 call, and a full receive."""
    await node.fund(mint_url, 255 * 12)
    client = node.wallet.client(mint_url)
    tokens: list[Token] = []
    for _ in range(12):
        tokens.append(await node.wallet.send(255, mint_url))  # 255 = 8 proofs
    assert all(len(t.proofs) == 8 for t in tokens)
    ks = await client.active_keyset()
    t0 = time.perf_counter()
    for t in tokens[:6]:
        outs = []
        for a in (1, 2, 4, 8, 16, 32, 64, 128):
            B_, _r = bdhke.blind(os.urandom(32).hex().encode())
            outs.append(BlindedMessage(a, ks.id, B_.to_hex()))
        await client.swap(t.proofs, outs)  # blinding + 8 DLEQ checks + the HTTP call
    bare_ms = (time.perf_counter() - t0) / 6 * 1000
    t0 = time.perf_counter()
    for t in tokens[6:]:
        await node.wallet.receive(t)  # + NUT-13 derivation, unblinding, 2 durable commits
    receive_ms = (time.perf_counter() - t0) / 6 * 1000
    with capsys.disabled():
        print(f"\nswap of 8 proofs on loopback: {bare_ms:.1f} ms (MintClient.swap), "
              f"{receive_ms:.1f} ms (Wallet.receive, write-ahead included)")
    assert receive_ms < 2000


async def test_through_the_nodes_http_client(tmp_path: Path, mint_url: str,
                                             wallet_tool: WalletTool) -> None:
    """The same flows over `routstr.client.HttpClient` via `walletstore.client_transport`."""
    from routstr.client import HttpClient
    from routstr.walletstore import client_transport
    from tests.support.mint import free_port

    db = Database(tmp_path / "h.sqlite3")
    async with HttpClient(connect_timeout=2, read_timeout=10) as http:
        wallet = Wallet(SqliteWalletStore(db), client_transport(http), os.urandom(64))
        text = wallet_tool.mint_token(mint_url, 24)
        assert (await wallet.receive(text)).amount == 24
        token = await wallet.send(10, mint_url)
        assert (await wallet.receive(token)).amount == 10
        assert wallet.balance(mint_url) == 24
        down = MintClient(f"http://127.0.0.1:{free_port()}", client_transport(http))
        with pytest.raises(MintUnreachable) as exc:
            await down.info()
        assert not exc.value.maybe_delivered
    db.close()


async def test_bad_dleq_credits_nothing_until_an_honest_answer(
    tmp_path: Path, mint_url: str, wallet_tool: WalletTool
) -> None:
    from routstr.cashu.mint import DleqInvalid

    class Tampering(UrllibTransport):
        on = True

        async def __call__(self, method: str, url: str, body: bytes | None
                           ) -> tuple[int, bytes]:
            status, raw = await super().__call__(method, url, body)
            if self.on and status == 200 and url.endswith(("/v1/swap", "/v1/restore")):
                doc = json.loads(raw)
                sig = doc["signatures"][0]
                sig["dleq"]["e"] = f"{int(sig['dleq']['e'], 16) ^ 1:064x}"
                raw = json.dumps(doc).encode()
            return status, raw

    db = Database(tmp_path / "d.sqlite3")
    transport = Tampering()
    wallet = Wallet(SqliteWalletStore(db), transport, os.urandom(64), inflight_grace_s=0.0)
    text = wallet_tool.mint_token(mint_url, 8)
    with pytest.raises(DleqInvalid):
        await wallet.receive(text, as_account(text))
    assert len(wallet.store.pending()) == 1  # swapped at the mint, nothing credited
    assert db.read(lambda c: ledger.get_account(c, token_key(text))) is None
    report = await wallet.recover()  # the restore is tampered with too: still nothing
    assert report.still_pending and wallet.balances() == {}
    transport.on = False
    report = await wallet.recover()
    assert report.finished and wallet.balance(mint_url) == 8
    acct = db.read(lambda c: ledger.get_account(c, token_key(text)))
    assert acct is not None and acct.balance_msats == 8_000
    db.close()
