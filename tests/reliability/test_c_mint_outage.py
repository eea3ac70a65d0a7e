"""(c) Mint outage and recovery during payments: a private Nutshell mint is hung (SIGSTOP) and
then killed and restarted while clients pay in every way the node accepts — tokens as keys,
new keys from tokens, top-ups, X-Cashu per request (with change), refunds.

No money is lost, judged by the mint and the ledger together once the mint is back, the node
has reconciled its pending wallet operations, and every client retried as a real one would:

* every token a client handed over is either unspent at the mint (it is still the client's)
  or spent and credited exactly once in the ledger — never spent and uncredited; a client who
  paid for a new key holds that key;
* every token the node handed out (change, refunds) is unspent at the mint: spendable;
* the node's wallet holds exactly what it received minus what it paid out (the test mint
  charges no fees), i.e. deposited − refunded to the msat, and its proofs are unspent at the
  mint; no wallet operation is left pending; the ledger invariant holds.

Two defects this scenario found (fixed) keep a deterministic reproduction each at the end:
a retried POST whose first attempt reached the mint, and a lost answer to `/v1/balance/create`.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from routstr.cashu.wallet import DEFAULT_INFLIGHT_GRACE_S, proof_y
from routstr.db import Database
from routstr.keys import token_deposit_ref
from routstr.ledger import Ledger
from tests.reliability.support import NODE_FLAGS, DroppingProxy, FaultyUpstream, unhandled_errors
from tests.support.mint import MintProcess
from tests.support.minter import Minter
from tests.support.node import NodeProcess

pytestmark = [pytest.mark.reliability, pytest.mark.mint]

TOKEN_SATS = 64
MSG = [{"role": "user", "content": "scenario:ok"}]
CHAT = {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 20}
RETRY_BUG = (
    "routstr/client.py retries a request whose pooled connection died before any response byte;"
    " when the fresh connect is refused (the mint just died) the wallet hears 'refused, never"
    " delivered' although the first attempt reached the mint, and rolls back a swap the mint"
    " executed: the client's token is spent and nobody is credited"
)
CREATE_BUG = (
    "routstr/cashupay.py create_key: when the mint's answer to the swap is lost, the wallet"
    " reconciles the swap (the key's account is created and funded) but the client is told 503"
    " 'the token was not redeemed' and never learns the key; a retry says 'already spent'"
)


@dataclass
class Payment:
    kind: str  # bearer | create | topup | xcashu | refund
    token: str = ""  # what the client paid with ("" for a refund)
    key: str = ""  # the key used or obtained
    results: list[tuple[int, bytes]] = field(default_factory=list)
    received: list[str] = field(default_factory=list)  # tokens the node handed back


class Clients:
    """Clients of one node, paying with tokens of one mint; they may ask the mint about their
    own tokens (any Cashu wallet can)."""

    def __init__(self, node: NodeProcess, minter: Minter, mint_url: str) -> None:
        self.node = node
        self.minter = minter
        self.mint_url = mint_url

    def states(self, token: str) -> set[str]:
        return set(self.minter.state(self.mint_url, token))

    def attempt(self, p: Payment) -> None:
        """One try of `p`, as a client makes it."""
        node = self.node
        auth = {"Authorization": f"Bearer {p.key or p.token}"}
        headers: dict[str, str] = {}
        if p.kind == "bearer":
            status, _, raw = node.request("POST", "/v1/chat/completions", CHAT, auth, 20)
        elif p.kind == "create":
            status, _, raw = node.request("POST", "/v1/balance/create",
                                          {"initial_balance_token": p.token}, None, 20)
            if status == 200:
                p.key = json.loads(raw)["api_key"]
        elif p.kind == "topup":
            status, _, raw = node.request("POST", "/v1/wallet/topup", {"cashu_token": p.token},
                                          auth, 20)
        elif p.kind == "xcashu":
            if not p.results:
                status, headers, raw = node.request("POST", "/v1/chat/completions", CHAT,
                                                    {"X-Cashu": p.token}, 20)
            else:  # the change, or the refund after a failure, asked for again by the token
                status, headers, raw = node.request("POST", "/v1/balance/refund", None,
                                                    {"X-Cashu": p.token}, 20)
                if status == 200:
                    headers = {"x-cashu": json.loads(raw)["token"]}
            change = headers.get("x-cashu", "")
            if change.startswith("cashu") and change != p.token:
                p.received.append(change)
        else:  # refund of a key's balance
            status, _, raw = node.request("POST", "/v1/balance/refund", None, auth, 20)
            if status == 200:
                p.received.append(json.loads(raw)["token"])
        p.results.append((status, raw[:300]))

    def done(self, p: Payment) -> bool:
        if not p.results:
            return False
        status, raw = p.results[-1]
        if p.kind == "refund":
            return status == 200 or b"no_balance" in raw
        if status == 200 and (p.kind != "xcashu" or p.received):
            return True
        # failed: settled only if the client still holds its token (or it paid for good)
        states = self.states(p.token)
        if states == {"PENDING"}:  # the mint itself has not settled it: nothing to retry yet
            return True
        if p.kind == "xcashu":
            return bool(p.received) or states == {"UNSPENT"}
        if p.kind in ("bearer", "topup"):
            return states == {"UNSPENT"} or (states == {"SPENT"} and b"already_spent" in raw)
        return states == {"UNSPENT"}  # create: a spent token without a key is never done


def run_batch(clients: Clients, payments: list[Payment], during: Any) -> None:
    """Start `payments` concurrently, call `during()` while they run, wait for all."""
    with concurrent.futures.ThreadPoolExecutor(len(payments)) as pool:
        futures = [pool.submit(clients.attempt, p) for p in payments]
        during()
        for f in futures:
            f.result(60)


def wait_no_pending(database: str, timeout_s: float = 5.0) -> None:
    db = Database(database)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and db.read(lambda c: c.execute(
                "SELECT COUNT(*) FROM wallet_ops WHERE state = 'pending'").fetchone()[0]):
            time.sleep(0.1)
    finally:
        db.close()


@pytest.mark.parametrize("rounds", [pytest.param(1, id="1-round"),
                                    pytest.param(4, id="4-rounds", marks=pytest.mark.slow)])
def test_mint_outage_during_payments_loses_nothing(tmp_path: Path, own_mint: MintProcess,
                                                   spawn: Any, rounds: int) -> None:
    seed = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 10**6))
    print(f"seed {seed}")
    rng = random.Random(seed)
    minter = Minter(tmp_path)
    t0 = time.monotonic()
    with FaultyUpstream() as upstream:
        args = ["--upstream-base-url", upstream.url, "--cashu-mints", own_mint.url,
                *NODE_FLAGS, "--upstream-read-timeout", "2"]
        node = spawn(tmp_path, args)
        clients = Clients(node, minter, own_mint.url)
        tokens = [minter.token(own_mint.url, TOKEN_SATS) for _ in range(4 + 8 * 2 * rounds)]
        funded = [Payment("create", tokens.pop()) for _ in range(4)]
        for p in funded:
            clients.attempt(p)
            assert p.key, p.results
        payments = list(funded)

        def batch(i: int) -> list[Payment]:
            out = [Payment("bearer", tokens.pop()), Payment("create", tokens.pop()),
                   Payment("create", tokens.pop()), Payment("xcashu", tokens.pop()),
                   Payment("xcashu", tokens.pop()), Payment("xcashu", tokens.pop()),
                   Payment("topup", tokens.pop(), key=funded[0].key),
                   Payment("topup", tokens.pop(), key=funded[1].key),
                   Payment("refund", key=funded[2 + i % 2].key)]
            rng.shuffle(out)
            return out

        def hang() -> None:  # longer than the node's mint timeout, then back
            time.sleep(rng.uniform(0.05, 0.3))
            own_mint.pause()
            time.sleep(3.0)
            own_mint.resume()

        def crash() -> None:  # the mint dies and comes back on the same port and database
            time.sleep(rng.uniform(0.05, 0.3))
            own_mint.kill()
            time.sleep(1.0)
            own_mint.start()

        for i in range(rounds):
            for fault in (hang, crash):
                b = batch(i)
                run_batch(clients, b, fault)
                payments += b
        first_tries = sorted({p.results[0][0] for p in payments})

        # Once the node's in-flight grace has passed (a younger intent may still be executing
        # at the mint), a restart reconciles every pending wallet operation with the mint;
        # clients retry what did not complete.
        time.sleep(DEFAULT_INFLIGHT_GRACE_S + 1)
        for _round in range(3):
            node.stop()
            assert not unhandled_errors(node)
            node = clients.node = spawn(tmp_path, args)
            wait_no_pending(node.database)
            todo = [p for p in payments if not clients.done(p)]
            if not todo:
                break
            run_batch(clients, todo, lambda: None)
        try:
            audit_cashu(clients, payments)
            assert not unhandled_errors(node)
        finally:
            node.stop()
            minter.close()
    print(f"mint outage x{rounds}: {len(payments)} payments, first-try statuses {first_tries}, "
          f"{time.monotonic() - t0:.1f}s")


def audit_cashu(clients: Clients, payments: list[Payment]) -> None:
    """The checks of the module docstring (asserts)."""
    db = Database(clients.node.database)
    try:
        totals = Ledger(db).check_invariant()
        pending = db.read(lambda c: c.execute(
            "SELECT id, kind, inputs FROM wallet_ops WHERE state = 'pending'").fetchall())
        credited = {ref for (ref,) in db.read(lambda c: c.execute(
            "SELECT ref FROM txlog WHERE kind = 'deposit'").fetchall())}
        proofs = db.read(lambda c: c.execute(
            "SELECT secret, amount FROM wallet_proofs WHERE state = 'unspent'").fetchall())
        refused = {json.loads(purpose).get("ref") for (purpose,) in db.read(lambda c: c.execute(
            "SELECT purpose FROM wallet_ops WHERE state = 'failed' AND purpose IS NOT NULL"
            " AND error LIKE '%ConnectionRefusedError%'").fetchall())}
    finally:
        db.close()
    async def mint_states(secrets: list[str]) -> set[str]:
        got = await clients.minter.wallet.client(clients.mint_url).check_state(
            [proof_y(secret) for secret in secrets])
        return {s.state for s in got}

    # An operation may stay pending only while the mint itself holds its inputs as PENDING
    # (it died mid-swap and has not settled that swap): then nobody can know the outcome yet.
    for op_id, kind, inputs in pending:
        in_states = anyio.run(mint_states, [p["secret"] for p in json.loads(inputs)])
        assert "PENDING" in in_states, f"wallet operation {op_id} ({kind}) left pending"
    for p in payments:
        if not p.token:
            continue
        states = clients.states(p.token)
        ref = token_deposit_ref(p.token)
        if states == {"PENDING"}:  # in limbo at the mint: checked above
            continue
        assert states in ({"UNSPENT"}, {"SPENT"}), (p, states)
        if states == {"UNSPENT"}:
            assert ref not in credited, f"credited but still the client's: {p}"
            continue
        assert ref in credited, f"token spent but never credited ({RETRY_BUG}): {p}" \
            if ref in refused else f"token spent but never credited: {p}"
        if p.kind == "create":
            assert p.key, f"token spent and credited, but the client has no key ({CREATE_BUG}): {p}"
    for p in payments:
        for tok in p.received:
            assert clients.states(tok) == {"UNSPENT"}, (p, tok)
    # the wallet's proofs are really spendable, and add up to the books
    assert anyio.run(mint_states, [secret for secret, _ in proofs]) <= {"UNSPENT"}
    wallet_msats = sum(amount for _, amount in proofs) * 1000
    if not pending:
        assert wallet_msats == totals["deposited_msats"] - totals["refunded_msats"], totals
        assert wallet_msats >= totals["liability_msats"]
    else:
        print(f"{len(pending)} wallet operation(s) wait for the mint to settle a swap it holds")


# ---- the defects, one deterministic reproduction each -------------------------------------------
def test_post_delivered_then_refused_is_ambiguous() -> None:
    """The mint receives POST /v1/swap on a kept-alive connection and dies before answering.

    The wallet must see an ambiguous failure (ConnectionResetError or TimeoutError: 'may have
    reached the mint', so the intent stays pending and is reconciled), never
    ConnectionRefusedError ('never delivered', so the intent is rolled back)."""
    import socket
    import threading

    from routstr.client import HttpClient
    from routstr.walletstore import client_transport

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    delivered: list[bytes] = []

    def mint() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        delivered.append(conn.recv(65536).split(b"\r\n")[0])  # the swap arrives
        srv.close()  # the mint dies: new connections are refused...
        conn.close()  # ...and this one closes without an answer

    thread = threading.Thread(target=mint, daemon=True)
    thread.start()

    async def run() -> BaseException | None:
        http = HttpClient(connect_timeout=2, read_timeout=2)
        call = client_transport(http)
        try:
            await call("GET", f"http://127.0.0.1:{port}/v1/info", None)
            await call("POST", f"http://127.0.0.1:{port}/v1/swap", b"{}")
        except OSError as exc:
            return exc
        finally:
            await http.aclose()
        return None

    exc = anyio.run(run)
    thread.join(5)
    assert delivered == [b"POST /v1/swap HTTP/1.1"]
    assert isinstance(exc, ConnectionResetError | TimeoutError), repr(exc)


def test_create_key_when_the_mints_answer_is_lost(tmp_path: Path, mint_url: str,
                                                  spawn: Any) -> None:
    """The swap reaches the mint but its answer is lost: the client must end up with a key
    holding the token's value (at once, or by retrying) — or keep an unspent token."""
    proxy = DroppingProxy(int(mint_url.rsplit(":", 1)[1]))
    minter = Minter(tmp_path)
    try:
        token = minter.token(proxy.url, 50)
        node = spawn(tmp_path, ["--cashu-mints", proxy.url, *NODE_FLAGS])
        try:
            proxy.drop_next(b"POST /v1/swap")
            status, doc = node.json("POST", "/v1/balance/create", {"initial_balance_token": token})
            assert proxy.dropped == 1
            for _ in range(3):  # a client retries
                if status == 200:
                    break
                time.sleep(1)
                status, doc = node.json("POST", "/v1/balance/create",
                                        {"initial_balance_token": token})
            states = set(minter.state(proxy.url, token))
            if states != {"UNSPENT"}:
                assert status == 200, doc
                _, info = node.json("GET", "/v1/balance/info",
                                    headers={"Authorization": f"Bearer {doc['api_key']}"})
                assert info["balance"] == 50_000
        finally:
            node.stop()
    finally:
        proxy.close()
        minter.close()
