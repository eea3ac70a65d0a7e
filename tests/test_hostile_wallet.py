"""Hostile uses of the Cashu wallet paths (issue 16, classes 4-7 and 10b): the real node, the
real Nutshell mint, real sockets. Every test checks money per request, not only the books."""

from __future__ import annotations

import concurrent.futures
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
from tests.support.minter import Minter
from tests.support.node import NodeProcess
from tests.support.upstream import ScriptedUpstream

pytestmark = pytest.mark.mint

ADMIN = "hostile-wallet-admin"
MSG = [{"role": "user", "content": "Hello!"}]
G_HEX = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"  # a valid point


@pytest.fixture(scope="module")
def node(upstream: ScriptedUpstream, mint_url: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("hostile-wallet"), [
        "--upstream-base-url", upstream.url, "--admin-token", ADMIN, "--cashu-mints", mint_url])
    n.start()
    yield n
    n.stop()


def books(node: NodeProcess) -> dict[str, int]:
    """Conservation, and the wallet holds at least what the node owes its users."""
    db = Database(node.database)
    try:
        totals = Ledger(db).check_invariant()
        held = db.read(lambda c: c.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM wallet_proofs WHERE state = 'unspent'"
        ).fetchone()[0])
        assert held * 1000 >= totals["liability_msats"], (held, totals)
        return totals
    finally:
        db.close()


def txlog(node: NodeProcess, key_hash: str) -> list[tuple[str, int]]:
    db = Database(node.database)
    try:
        acct = Ledger(db).get_account(key_hash)
        if acct is None:
            return []
        return db.read(lambda c: c.execute(
            "SELECT kind, amount_msats FROM txlog WHERE key_id = ? ORDER BY id", (acct.id,)
        ).fetchall())
    finally:
        db.close()


# ---- class 4: one token, many parallel X-Cashu requests ---------------------------------------
def test_one_xcashu_token_in_parallel_each_request_served_exactly_or_refused(
        node: NodeProcess, minter: Minter, mint_url: str, wallet_tool: Any) -> None:
    """N threads post the same X-Cashu token at once. Each answer is either a 200 charged
    exactly its cost with its own change (redeemable at the mint), or a refusal with nothing
    charged; change + charges (+ the sub-sat rounding) add up to the token's value."""
    value_sats, n = 40, 8
    for _round in range(4):
        token = minter.token(mint_url, value_sats)
        body = {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 50}

        def call(_: int, token: str = token, body: dict[str, Any] = body
                 ) -> tuple[int, dict[str, str], bytes]:
            return node.request("POST", "/v1/chat/completions", body, {"X-Cashu": token})

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(call, range(n)))
        served = [(h, raw) for s, h, raw in answers if s == 200]
        refused = [(s, h, raw) for s, h, raw in answers if s != 200]
        assert served, [(s, raw[:200]) for s, _, raw in answers]
        charged = 0
        change_msats = 0
        changes = []
        for headers, raw in served:
            cost = int(headers["x-routstr-cost-msats"])
            assert cost > 0
            assert "x-cashu" in headers, "a served request got no change"
            change = headers["x-cashu"]
            assert change not in changes, "two requests were handed the same change"
            changes.append(change)
            amount = parse_token(change).amount
            change_msats += amount * 1000
            charged += cost
        for status, headers, raw in refused:
            err = json.loads(raw)["error"]
            assert status in (400, 402, 425), (status, err)
            assert "x-routstr-cost-msats" not in headers
            assert "x-cashu" not in headers or status == 402, (status, err)
        for change in changes:
            assert wallet_tool.receive(mint_url, change) == parse_token(change).amount
        log = txlog(node, xcashu_key_hash(token))
        kinds = [k for k, _ in log]
        assert kinds.count("deposit") == 1
        settled = sum(a for k, a in log if k == "settle")
        rounding = sum(a for k, a in log if k == "charge")
        assert settled == charged, (log, [(s, raw[:120]) for s, _, raw in answers])
        assert 0 <= rounding < 1000
        assert change_msats + charged + rounding == value_sats * 1000, log
    books(node)


# ---- class 5: a second worker never finishes another's live wallet operation -------------------
def test_two_workers_one_token_twenty_parallel_creates_never_a_partial_credit(
        upstream: ScriptedUpstream, mint_url: str, minter: Minter, tmp_path: Path) -> None:
    """`--workers 2`: one token posted 20× at once to /v1/balance/create, several rounds. The
    worker that loses the race must not "recover" the winner's swap while it is in flight (a
    NUT-09 restore then finds only some outputs): exactly one account, credited the token's
    full value; every 200 names that key with that balance; the rest are clear 4xx."""
    value_sats, n, rounds = 127, 20, 6
    node = NodeProcess(tmp_path, ["--workers", "2", "--upstream-base-url", upstream.url,
                                  "--admin-token", ADMIN, "--cashu-mints", mint_url]).start()
    try:
        for r in range(rounds):
            token = minter.token(mint_url, value_sats)

            def create(_: int, token: str = token) -> tuple[int, Any]:
                return node.json("POST", "/v1/balance/create", {"initial_balance_token": token})

            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                answers = list(pool.map(create, range(n)))
            ok = [doc for status, doc in answers if status == 200]
            assert ok, answers
            keys = {doc["api_key"] for doc in ok}
            assert len(keys) == 1, (r, keys)
            for doc in ok:
                assert doc["balance"] == value_sats * 1000, (r, answers)
            for status, doc in answers:
                assert status == 200 or (400 <= status < 500 and doc["error"]["code"]), doc
            status, info = node.json("GET", "/v1/balance/info",
                                     headers={"Authorization": f"Bearer {keys.pop()}"})
            assert status == 200 and info["balance"] == value_sats * 1000, (r, info)
        assert "Traceback" not in node.log_text()
    finally:
        assert node.stop() == 0
    db = Database(node.database)
    try:
        Ledger(db).check_invariant()
        held = db.read(lambda c: c.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM wallet_proofs WHERE state = 'unspent'"
        ).fetchone()[0])
        assert held == value_sats * rounds
    finally:
        db.close()


def test_a_live_processs_wallet_operation_is_not_taken_over(tmp_path: Path) -> None:
    """Ownership is visible across processes: another store (process) may not claim a pending
    operation whose owner lives and holds the lease; it may once the owner is gone or the lease
    ran out. (Deterministic companion of the --workers test above.)"""
    import os

    from routstr.cashu.tokens import Proof
    from routstr.cashu.wallet import Intent
    from routstr.walletstore import SqliteWalletStore, process_owner

    db = Database(tmp_path / "w.sqlite3")
    now = [1_000.0]
    try:
        mine = SqliteWalletStore(db, clock=lambda: now[0])
        other = SqliteWalletStore(db, clock=lambda: now[0], owner="x|1|y")
        assert mine.owner == process_owner() and str(os.getpid()) in mine.owner
        proof = Proof(amount=1, id="00" * 8, secret="s" * 64, C=G_HEX)
        intent = Intent(kind="receive", mint="http://m", unit="sat", inputs=(proof,),
                        own_inputs=False, outputs=(("00" * 8, 1, "keep"),), purpose=None,
                        purpose_at="finish", amount=1, fee=0)
        op = mine.begin(intent)
        assert op.owner == mine.owner and op.lease_until > now[0]
        assert other.claim(op.id) is None  # this live process holds it
        assert mine.claim(op.id) is not None  # its owner may always act on it
        now[0] += 301  # the lease ran out (a live owner that stopped acting on it)
        taken = other.claim(op.id)
        assert taken is not None and taken.owner == "x|1|y"
        # a dead owner's operation is free at once, whatever its lease
        dead = SqliteWalletStore(db, clock=lambda: now[0], owner=_dead_owner())
        op2 = dead.begin(Intent(**{**intent.__dict__, "inputs": (
            Proof(amount=1, id="00" * 8, secret="t" * 64, C=G_HEX),)}))
        assert mine.claim(op2.id) is not None
        assert other.claim(op2.id) is None  # now mine (alive, fresh lease)
    finally:
        db.close()


def _dead_owner() -> str:
    """The owner string of a process that ran and exited."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c",
                          "from routstr.walletstore import process_owner; print(process_owner())"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    return out.stdout.strip()


# ---- class 6: a redeemed token is not a credential forever -------------------------------------
RECOVERY_WINDOW_S = 2


@pytest.fixture(scope="module")
def short_window_node(upstream: ScriptedUpstream, mint_url: str,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("short-window"), [
        "--upstream-base-url", upstream.url, "--admin-token", ADMIN, "--cashu-mints", mint_url,
        "--recovery-window", str(RECOVERY_WINDOW_S)])
    n.start()
    yield n
    n.stop()


def _past_window() -> None:
    import time
    time.sleep(RECOVERY_WINDOW_S + 1.2)


def test_reposted_create_token_returns_the_key_only_within_the_recovery_window(
        short_window_node: NodeProcess, minter: Minter, mint_url: str) -> None:
    node = short_window_node
    token = minter.token(mint_url, 20)
    status, doc = node.json("POST", "/v1/balance/create", {"initial_balance_token": token})
    assert status == 200
    key = doc["api_key"]
    status, again = node.json("POST", "/v1/balance/create", {"initial_balance_token": token})
    assert status == 200 and again["api_key"] == key  # the lost-answer case
    _past_window()
    status, late = node.json("POST", "/v1/balance/create", {"initial_balance_token": token})
    assert status == 400 and late["error"]["code"] == "cashu_token_already_spent", late
    assert key not in json.dumps(late)
    # a token used as Bearer stays its own key (the spec makes it one)
    bearer = minter.token(mint_url, 10)
    status, info = node.json("GET", "/v1/balance/info",
                             headers={"Authorization": f"Bearer {bearer}"})
    assert status == 200 and info["balance"] == 10_000
    _past_window()
    status, info = node.json("GET", "/v1/balance/info",
                             headers={"Authorization": f"Bearer {bearer}"})
    assert status == 200 and info["balance"] == 10_000
    books(node)


def test_xcashu_change_recovery_only_within_the_recovery_window(
        short_window_node: NodeProcess, minter: Minter, mint_url: str) -> None:
    node = short_window_node
    token = minter.token(mint_url, 30)
    status, headers, raw = node.request("POST", "/v1/chat/completions",
                                        {"model": "gpt-4o-mini", "messages": MSG,
                                         "max_tokens": 50}, {"X-Cashu": token})
    assert status == 200, raw
    change = headers["x-cashu"]
    status, doc = node.json("POST", "/v1/balance/refund", headers={"X-Cashu": token})
    assert status == 200 and doc["token"] == change
    _past_window()
    status, hdrs, raw = node.request("POST", "/v1/balance/refund", headers={"X-Cashu": token})
    assert status in (400, 404), raw
    assert change.encode() not in raw and "x-cashu" not in hdrs
    books(node)


def poll_paid(node: NodeProcess, invoice_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Poll an invoice's status as a client does: "pending" while the node's background settler
    holds its mint operation (the poll then cannot mint it), then "paid" with the key."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, polled = node.json("GET", f"/lightning/invoice/{invoice_id}/status")
        assert status == 200 and polled["status"] in ("pending", "paid"), polled
        if polled["status"] == "paid" or time.monotonic() > deadline:
            return dict(polled)
        assert polled["api_key"] is None  # no key before it is paid
        time.sleep(0.2)


def test_lightning_recover_by_bare_bolt11_only_until_the_key_was_collected(
        short_window_node: NodeProcess) -> None:
    node = short_window_node
    # routstr-core's flow: a client that lost the invoice id recovers by bolt11 ...
    status, inv = node.json("POST", "/lightning/invoice", {"amount_sats": 5, "purpose": "create"})
    assert status == 200
    for _ in range(50):  # "pending" while the background settler holds the mint operation
        status, first = node.json("POST", "/lightning/recover", {"bolt11": inv["bolt11"]})
        assert status == 200 and first["status"] in ("pending", "paid"), first
        if first["status"] == "paid":
            break
        assert first["api_key"] is None
        time.sleep(0.2)
    assert first["status"] == "paid" and first["api_key"], first
    # ... once; after that a bystander who saw the invoice gets nothing
    status, later = node.json("POST", "/lightning/recover", {"bolt11": inv["bolt11"]})
    assert status == 403 and "api_key" not in json.dumps(later), later
    # the creator, with the invoice id it got at creation, still does
    status, again = node.json("POST", "/lightning/recover",
                              {"bolt11": inv["bolt11"], "invoice_id": inv["invoice_id"]})
    assert status == 200 and again["api_key"] == first["api_key"]
    status, polled = node.json("GET", f"/lightning/invoice/{inv['invoice_id']}/status")
    assert status == 200 and polled["api_key"] == first["api_key"]
    # the usual flow: the creator polls the status (collects the key), the bolt11 alone is dead
    status, inv2 = node.json("POST", "/lightning/invoice", {"amount_sats": 6, "purpose": "create"})
    polled = poll_paid(node, inv2["invoice_id"])
    assert polled["api_key"]
    status, stolen = node.json("POST", "/lightning/recover", {"bolt11": inv2["bolt11"]})
    assert status == 403 and polled["api_key"] not in json.dumps(stolen)
    status, wrong = node.json("POST", "/lightning/recover",
                              {"bolt11": inv2["bolt11"], "invoice_id": inv["invoice_id"]})
    assert status == 403 and polled["api_key"] not in json.dumps(wrong)


# ---- class 7: a credit never fails silently after the mint swapped -----------------------------
class _DeleteDuringSwap:
    """The real transport to the real mint; while the swap is on its way the operator deletes
    the key being topped up (an empty key may be deleted at any time)."""

    def __init__(self, db: Database, key_id: int) -> None:
        from tests.support.mint import UrllibTransport
        self.inner = UrllibTransport()
        self.db = db
        self.key_id = key_id
        self.deleted = False

    async def __call__(self, method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        if url.endswith("/v1/swap") and not self.deleted:
            from routstr import admin_store
            self.db.transaction(lambda c: admin_store.delete_key(c, self.key_id, now=0))
            self.deleted = True
        return await self.inner(method, url, body)


def test_topup_of_a_key_deleted_during_the_swap_lands_on_the_token_as_key(
        tmp_path: Path, minter: Minter, mint_url: str) -> None:
    import secrets as _secrets

    import anyio

    from routstr.cashu.wallet import Wallet
    from routstr.cashupay import CashuConfig, CashuPayments
    from routstr.errors import ApiError
    from routstr.keys import generate_api_key, hash_key, token_api_key
    from routstr.walletstore import SqliteWalletStore

    db = Database(tmp_path / "node.sqlite3")
    try:
        ledger = Ledger(db)
        api_key = generate_api_key()
        acct = ledger.create_account(key_hash=hash_key(api_key), kind="api")
        transport = _DeleteDuringSwap(db, acct.id)
        wallet = Wallet(SqliteWalletStore(db), transport, _secrets.token_bytes(64))
        cashu = CashuPayments(CashuConfig((mint_url,), 900), ledger, wallet, db)
        token = minter.token(mint_url, 21)

        async def topup() -> ApiError | None:
            try:
                await cashu.topup(acct, token)
            except ApiError as exc:
                return exc
            return None

        err = anyio.run(topup)
        assert transport.deleted
        assert err is not None and err.status < 500, "the top-up claimed success"
        assert "Bearer" in err.message, err.message  # says where the value went
        gone = ledger.get_account_by_id(acct.id)
        assert gone is not None and gone.balance_msats == 0
        rescue = ledger.get_account(hash_key(token_api_key(token)))
        assert rescue is not None and rescue.balance_msats == 21_000
        assert not [op for op in wallet.store.operations() if op.result.get("purpose_error")]
        refund = anyio.run(cashu.refund, rescue)  # the token's owner gets it back as ecash
        assert refund["msats"] == 21_000
        ledger.check_invariant()
    finally:
        db.close()


def test_create_whose_options_the_ledger_refuses_leaves_the_token_unspent(
        node: NodeProcess, minter: Minter, mint_url: str) -> None:
    """Everything the credit needs is checked before the swap: a create the ledger would refuse
    (a limit beyond sqlite's integers) never reaches the mint — the token stays the client's."""
    for field_ in ("balance_limit", "validity_date"):
        token = minter.token(mint_url, 9)
        status, doc = node.json("POST", "/v1/balance/create",
                                {"initial_balance_token": token, field_: 10**30})
        assert 400 <= status < 500, (field_, status, doc)
        assert minter.state(mint_url, token) == ["UNSPENT"] * len(parse_token(token).proofs)
    assert "Traceback" not in node.log_text()
    books(node)


def test_lightning_topup_of_a_key_deleted_before_payment_lands_on_the_invoice_key(
        node: NodeProcess) -> None:
    status, made = node.json("POST", "/admin/api/keys", {"balance_msats": 0},
                             {"Authorization": f"Bearer {ADMIN}"})
    assert status == 201, made
    key = made["api_key"]
    status, inv = node.json("POST", "/lightning/invoice", {"amount_sats": 7, "purpose": "topup"},
                            {"Authorization": f"Bearer {key}"})
    assert status == 200, inv
    status, doc = node.json("DELETE", f"/admin/api/keys/{made['key']['id']}",
                            headers={"Authorization": f"Bearer {ADMIN}"})
    assert status == 200, doc
    status, st = node.json("GET", f"/lightning/invoice/{inv['invoice_id']}/status")
    assert status == 200 and st["status"] == "paid", st
    assert st["api_key"], "the paid value went to a deleted key"
    status, info = node.json("GET", "/v1/balance/info",
                             headers={"Authorization": f"Bearer {st['api_key']}"})
    assert status == 200 and info["balance"] == 7_000
    books(node)


# ---- class 10b: forged many-proof tokens, failed operations kept forever -----------------------
def _forged_token(mint_url: str, n: int, *, valid_points: bool, keyset: str = "00" + "ab" * 7
                  ) -> str:
    """A cashuB token of `n` 1-sat proofs nobody signed (C the generator, or not a point)."""
    import base64
    import os

    from routstr.cashu import cbor

    c = bytes.fromhex(G_HEX) if valid_points else b"\x02" + b"\x00" * 32
    tag = os.urandom(4).hex()
    proofs = [{"a": 1, "s": f"{tag}{i}", "c": c} for i in range(n)]  # short secrets: 8 000 fit
    raw = cbor.dumps({"m": mint_url, "u": "sat",
                      "t": [{"i": bytes.fromhex(keyset), "p": proofs}]})
    return "cashuB" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_a_token_of_too_many_proofs_is_refused_before_any_work(
        node: NodeProcess, minter: Minter, mint_url: str) -> None:
    """MAX_PROOFS_PER_TOKEN is checked while decoding, before any proof is built (point checks
    are the CPU cost) and so before any write-ahead row or mint call."""
    from routstr.cashu.tokens import MAX_PROOFS_PER_TOKEN, TokenError

    # the count is checked before any proof is built: a bad point past the limit is not seen
    with pytest.raises(TokenError, match="proofs"):
        parse_token(_forged_token(mint_url, MAX_PROOFS_PER_TOKEN + 1, valid_points=False))
    keyset = parse_token(minter.token(mint_url, 1)).proofs[0].id  # the mint's real keyset
    forged = _forged_token(mint_url, 8000, valid_points=True, keyset=keyset)
    db = Database(node.database)
    try:
        def ops() -> int:
            return int(db.read(lambda c: c.execute("SELECT COUNT(*) FROM wallet_ops"
                                                   ).fetchone()[0]))
        before = ops()
        status, doc = node.json("POST", "/v1/balance/create", {"initial_balance_token": forged})
        assert status == 400 and doc["error"]["code"] == "invalid_cashu_token", doc
        # (a header cannot carry such a token: the 64 KiB header limit stops it first)
        assert ops() == before  # no write-ahead row, so no mint call
    finally:
        db.close()


def test_failed_wallet_operations_are_swept_after_their_retention(tmp_path: Path) -> None:
    from routstr.cashu.tokens import Proof
    from routstr.cashu.wallet import FAILED_OP_RETENTION_S, Intent, Outcome
    from routstr.walletstore import SqliteWalletStore

    db = Database(tmp_path / "w.sqlite3")
    now = [1_000_000.0]
    try:
        store = SqliteWalletStore(db, clock=lambda: now[0])

        def receive(secret: str) -> Intent:
            return Intent(kind="receive", mint="http://m", unit="sat",
                          inputs=(Proof(amount=1, id="00" * 8, secret=secret, C=G_HEX),),
                          own_inputs=False, outputs=(("00" * 8, 1, "keep"),), purpose=None,
                          purpose_at="finish", amount=1, fee=0)

        refused = store.begin(receive("a" * 64))
        store.abort(refused.id, "the mint refused the proofs")
        watched = store.begin(receive("b" * 64))
        store.abort(watched.id, "not executed", recheck_until=now[0] + 2 * FAILED_OP_RETENTION_S)
        done = store.begin(receive("c" * 64))
        store.finish(done.id, Outcome(proofs=(Proof(amount=1, id="00" * 8, secret="d" * 64,
                                                    C=G_HEX),), amount=1, fee=0))
        assert store.sweep_failed() == 0  # within the retention: kept for the operator
        now[0] += FAILED_OP_RETENTION_S + 1
        assert store.sweep_failed() == 1
        assert store.get(refused.id) is None
        assert store.get(watched.id) is not None and store.get(done.id) is not None
        now[0] += 2 * FAILED_OP_RETENTION_S
        assert store.sweep_failed() == 1 and store.get(watched.id) is None
        assert store.get(done.id) is not None  # done operations are the wallet's history
    finally:
        db.close()


def test_expired_unpaid_invoices_are_swept_after_their_retention(tmp_path: Path) -> None:
    """Sibling of the failed-operations sweep: anyone may ask for an invoice (a row and a mint
    quote each); an expired, unpaid one does not stay forever. Paid ones are kept."""
    from routstr.cashu.wallet import QuoteRecord
    from routstr.walletstore import (
        EXPIRED_INVOICE_RETENTION_S,
        Invoice,
        SqliteWalletStore,
        invoice_get,
        invoice_insert,
        invoice_mark,
        invoices_sweep,
    )

    db = Database(tmp_path / "i.sqlite3")
    try:
        store = SqliteWalletStore(db)
        for i, state in enumerate(("pending", "paid")):
            store.save_quote(QuoteRecord("http://m", "sat", f"q{i}", 5, f"lnbc{i}", None))
            invoice_insert(db, Invoice(f"inv{i}", f"q{i}", "http://m", f"lnbc{i}", 5, "create",
                                       None, None, "pending", 0, 100, None))
            invoice_mark(db, f"inv{i}", "expired" if state == "pending" else "paid",
                         account_id=None, now=50)
        assert invoices_sweep(db, 100 + EXPIRED_INVOICE_RETENTION_S - 1) == 0
        assert invoices_sweep(db, 100 + EXPIRED_INVOICE_RETENTION_S + 1) == 1
        assert invoice_get(db, invoice_id="inv0") is None and store.quote("q0") is None
        assert invoice_get(db, invoice_id="inv1") is not None and store.quote("q1") is not None
    finally:
        db.close()


def test_a_restore_that_finds_part_of_a_swap_finishes_nothing(
        tmp_path: Path, minter: Minter, mint_url: str) -> None:
    """The swap's answer is lost (the intent stays pending); NUT-09 restore then shows only one
    of its outputs, as while the mint is still writing them. Recovery must not credit that part
    (and lose the rest): it leaves the intent pending until the restore shows all."""
    import secrets as _secrets

    import anyio

    from routstr.cashu.wallet import Wallet
    from routstr.keys import hash_key, token_api_key
    from routstr.walletstore import SqliteWalletStore
    from tests.support.mint import UrllibTransport

    class LoseSwapAnswerTruncateRestore(UrllibTransport):
        truncate = True

        async def __call__(self, method: str, url: str, body: bytes | None
                           ) -> tuple[int, bytes]:
            status, raw = await super().__call__(method, url, body)
            if url.endswith("/v1/swap"):
                raise ConnectionResetError("answer lost after the mint swapped")
            if self.truncate and url.endswith("/v1/restore") and status == 200:
                doc = json.loads(raw)
                for k in ("outputs", "signatures", "promises"):
                    if k in doc:
                        doc[k] = doc[k][:1]
                raw = json.dumps(doc).encode()
            return status, raw

    db = Database(tmp_path / "w.sqlite3")
    try:
        transport = LoseSwapAnswerTruncateRestore()
        wallet = Wallet(SqliteWalletStore(db), transport, _secrets.token_bytes(64),
                        inflight_grace_s=0.0)
        token = minter.token(mint_url, 7)  # three outputs: 1 + 2 + 4
        key_hash = hash_key(token_api_key(token))
        purpose = {"action": "create_account", "key_hash": key_hash, "kind": "token"}

        async def run() -> None:
            try:
                await wallet.receive(token, purpose)
            except Exception as exc:  # noqa: BLE001 - the lost answer, whatever its type
                assert "unreachable" in type(exc).__name__.lower() or "Pending" in repr(exc)
            assert len(wallet.store.pending()) == 1
            report = await wallet.recover()
            assert report.still_pending and not report.finished, report
            assert Ledger(db).get_account(key_hash) is None and wallet.balances() == {}
            transport.truncate = False
            report = await wallet.recover()
            assert report.finished, report

        anyio.run(run)
        acct = Ledger(db).get_account(key_hash)
        assert acct is not None and acct.balance_msats == 7_000
        assert wallet.balance(mint_url) == 7
    finally:
        db.close()


def test_one_xcashu_token_streamed_in_parallel_one_change_event_nothing_else_charged(
        node: NodeProcess, minter: Minter, mint_url: str) -> None:
    """The streamed sibling of the class-4 test: the change beyond the worst case comes in the
    served stream's X-Cashu header, the rest as `event: cashu-change`."""
    token = minter.token(mint_url, 30)
    body = {"model": "gpt-4o-mini", "messages": MSG, "stream": True, "max_tokens": 3000}

    def call(_: int) -> tuple[int, dict[str, str], bytes]:
        return node.request("POST", "/v1/chat/completions", body, {"X-Cashu": token})

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(call, range(6)))
    served = [(h, raw.decode()) for s, h, raw in answers if s == 200]
    assert len(served) == 1, [(s, raw[:100]) for s, _, raw in answers]
    assert all(s in (400, 425) for s, _, _ in answers if s != 200)
    head, text = served[0]
    event = text.split("event: cashu-change\ndata: ", 1)[1].split("\n", 1)[0]
    change = json.loads(event)
    split = parse_token(head["x-cashu"]).amount * 1000  # the change beyond the worst case
    log = txlog(node, xcashu_key_hash(token))
    charged = sum(a for k, a in log if k in ("settle", "charge"))
    assert [k for k, _ in log].count("settle") == 1
    assert [a for k, a in log if k == "change"] == [split, change["msats"]]
    assert split + change["msats"] + charged == 30_000 \
        and parse_token(change["token"]).amount * 1000 == change["msats"]
    books(node)
