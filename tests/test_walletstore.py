"""routstr.walletstore: the wallet's sqlite store, its purposes through the ledger, the transport.

No mint here: the store is exercised with the intents the wallet records, and the ledger's
invariant is checked after every step (money moves only through `routstr.ledger`, atomically
with the proof changes that justify it).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routstr import ledger
from routstr.cashu.secp256k1 import mul_g
from routstr.cashu.tokens import DLEQProof, Proof
from routstr.cashu.wallet import (
    InputsBusy,
    Intent,
    Outcome,
    ProofsUnavailable,
    PurposeRefused,
    QuoteBusy,
    QuoteRecord,
    WalletError,
)
from routstr.client import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from routstr.db import Database
from routstr.walletstore import SqliteWalletStore, client_transport

MINT = "http://mint.test"
KS = "00" + "ab" * 7
_counter = iter(range(1, 1 << 30))


def proof(amount: int, *, dleq: bool = False) -> Proof:
    k = next(_counter)
    d = DLEQProof("11" * 32, "22" * 32, "33" * 32) if dleq else None
    return Proof(amount, KS, os.urandom(32).hex(), mul_g(k + 1000).to_hex(), dleq=d)


class RecordingDatabase(Database):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.durable: list[bool] = []

    def transaction(self, fn: Any, *, durable: bool = False) -> Any:
        self.durable.append(durable)
        return super().transaction(fn, durable=durable)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[RecordingDatabase]:
    d = RecordingDatabase(tmp_path / "node.sqlite3")
    yield d
    d.close()


@pytest.fixture
def store(db: RecordingDatabase) -> SqliteWalletStore:
    return SqliteWalletStore(db, clock=lambda: 1_000_000.0)


def account(db: Database, msats: int = 0, *, seed: str = "acct") -> int:
    key_hash = hashlib.sha256(f"{seed}{os.urandom(8).hex()}".encode()).hexdigest()
    acct = db.transaction(lambda c: ledger.create_account(
        c, key_hash=key_hash, kind="api", deposit_msats=msats, now=1))
    return acct.id


def acct(db: Database, account_id: int) -> ledger.Account:
    a = db.read(lambda c: ledger.get_account_by_id(c, account_id))
    assert a is not None
    return a


def invariant(db: Database) -> dict[str, int]:
    return db.read(ledger.check_invariant)


def receive_intent(inputs: list[Proof], purpose: dict[str, Any] | None = None,
                   outputs: tuple[tuple[str, int, str], ...] = ((KS, 4, "keep"), (KS, 8, "keep")),
                   ) -> Intent:
    return Intent(kind="receive", mint=MINT, unit="sat", inputs=tuple(inputs), own_inputs=False,
                  outputs=outputs, purpose=purpose, purpose_at="finish",
                  amount=sum(a for _, a, _ in outputs), fee=0)


def seed_proofs(store: SqliteWalletStore, amounts: list[int]) -> list[Proof]:
    """Put proofs in the store as the result of a (finished) receive."""
    ps = [proof(a, dleq=True) for a in amounts]
    op = store.begin(receive_intent([proof(sum(amounts))], outputs=()))
    store.finish(op.id, Outcome(proofs=tuple(ps), amount=sum(amounts), fee=0))
    return ps


def send_intent(inputs: list[Proof], amount: int, purpose: dict[str, Any] | None = None,
                ref: str | None = None, outputs: tuple[tuple[str, int, str], ...] | None = None,
                ) -> Intent:
    if outputs is None:
        outputs = ((KS, amount, "send"),)
    return Intent(kind="send", mint=MINT, unit="sat", inputs=tuple(inputs), own_inputs=True,
                  outputs=outputs, purpose=purpose, purpose_at="begin", amount=amount, fee=0,
                  ref=ref)


def test_counters_are_allocated_in_the_intent_and_never_reused(store: SqliteWalletStore) -> None:
    other = "00" + "cd" * 7
    a = store.begin(receive_intent([proof(8)], outputs=((KS, 1, "keep"), (other, 2, "keep"),
                                                        (KS, 4, "keep"))))
    assert [(o.keyset_id, o.counter) for o in a.outputs] == [(KS, 0), (other, 0), (KS, 1)]
    store.abort(a.id, "test")  # a rolled-back intent keeps its counters spent
    b = store.begin(receive_intent([proof(8)], outputs=((KS, 8, "keep"),)))
    assert [o.counter for o in b.outputs] == [2]
    with pytest.raises(InputsBusy):  # a refused begin allocates nothing
        store.begin(receive_intent(list(b.inputs), outputs=((KS, 8, "keep"),)))
    c = store.begin(receive_intent([proof(8)], outputs=((KS, 8, "keep"),)))
    assert [o.counter for o in c.outputs] == [3]


def test_receive_credits_once_with_the_proofs(store: SqliteWalletStore, db: RecordingDatabase
                                               ) -> None:
    key_hash = hashlib.sha256(b"cashuBtoken").hexdigest()
    token_proofs = [proof(8), proof(4)]
    purpose = {"action": "create_account", "key_hash": key_hash, "kind": "token",
               "ref": key_hash}
    op = store.begin(receive_intent(token_proofs, purpose))
    assert op.state == "pending" and op.purpose == purpose
    assert db.read(lambda c: ledger.get_account(c, key_hash)) is None  # only on finish
    with pytest.raises(InputsBusy) as busy:  # the same token again, concurrently
        store.begin(receive_intent(token_proofs[1:], purpose))
    assert busy.value.op_id == op.id
    new = (proof(8), proof(4))
    done = store.finish(op.id, Outcome(proofs=new, amount=12, fee=0))
    assert done.state == "done" and done.amount == 12
    a = db.read(lambda c: ledger.get_account(c, key_hash))
    assert a is not None and a.balance_msats == a.deposited_msats == 12_000
    assert store.finish(op.id, Outcome(proofs=new, amount=12, fee=0)).state == "done"  # no-op
    assert acct(db, a.id).balance_msats == 12_000
    assert store.balances("sat") == {MINT: 12}
    assert {p.secret for p in store.unspent(MINT, "sat")} == {p.secret for p in new}
    with pytest.raises(InputsBusy):  # a finished receive keeps its inputs: no second credit
        store.begin(receive_intent(token_proofs, purpose))
    assert invariant(db)["deposited_msats"] == 12_000
    assert all(db.durable)  # every write of the store is durable


def test_receive_rollback_watch_and_revival(store: SqliteWalletStore, db: Database) -> None:
    acc = account(db)
    token_proofs = [proof(16)]
    op = store.begin(receive_intent(token_proofs, {"action": "credit", "account_id": acc}))
    failed = store.abort(op.id, "not executed", recheck_until=2_000_000.0)
    assert failed.state == "failed" and failed.result["error"] == "not executed"
    assert store.abort(op.id, "again").state == "failed"  # no-op
    assert store.pending() == [] and [w.id for w in store.watched(1_500_000.0)] == [op.id]
    assert store.watched(3_000_000.0) == []
    assert acct(db, acc).balance_msats == 0
    # the lock is gone: the same token may be tried again ...
    again = store.begin(receive_intent(token_proofs, {"action": "credit", "account_id": acc}))
    store.abort(again.id, "refused by the mint")
    # ... and if the mint executed the first attempt after all, it is finished late, once
    store.finish(op.id, Outcome(proofs=(proof(16),), amount=16, fee=0))
    assert acct(db, acc).balance_msats == 16_000
    assert store.get(op.id).state == "done"  # type: ignore[union-attr]
    assert store.watched(1_500_000.0) == []
    with pytest.raises(WalletError):  # a plain rollback (not watched) cannot finish
        store.finish(again.id, Outcome(proofs=(), amount=16, fee=0))
    invariant(db)


def test_send_debits_with_the_intent_and_reverses_on_rollback(
    store: SqliteWalletStore, db: Database
) -> None:
    acc = account(db, 50_000)
    ps = seed_proofs(store, [8, 16, 32])
    purpose = {"action": "debit", "account_id": acc, "amount_msats": 20_000, "kind": "change"}
    op = store.begin(send_intent(ps[:2], 20, purpose, ref="orig-token-hash"))
    assert acct(db, acc).balance_msats == 30_000 and acct(db, acc).refunded_msats == 20_000
    assert store.balances("sat") == {MINT: 32}  # reserved proofs are not spendable
    with pytest.raises(ProofsUnavailable):
        store.begin(send_intent(ps[1:], 40))
    assert store.balances("sat") == {MINT: 32}  # the refused begin changed nothing
    store.abort(op.id, "mint refused")
    assert acct(db, acc).balance_msats == 50_000
    # the money never left: the refund is undone, not booked as a new deposit
    assert acct(db, acc).refunded_msats == 0 and acct(db, acc).deposited_msats == 50_000
    assert store.balances("sat") == {MINT: 56}
    store.abort(op.id, "again")  # no second reversal
    assert acct(db, acc).balance_msats == 50_000
    invariant(db)


def test_send_finish_issues_the_token_by_reference(store: SqliteWalletStore, db: Database) -> None:
    ps = seed_proofs(store, [8, 16, 32])
    op = store.begin(send_intent(ps[1:], 40, ref="ref-1",
                                 outputs=((KS, 8, "send"), (KS, 32, "send"), (KS, 8, "keep"))))
    sent, keep = (proof(8), proof(32)), (proof(8),)
    done = store.finish(op.id, Outcome(proofs=keep, amount=40, fee=0, issued=sent,
                                       token="cashuBxyz"))
    assert done.token == "cashuBxyz"
    by_ref = store.by_ref("ref-1")
    assert by_ref is not None and by_ref.id == op.id and by_ref.token == "cashuBxyz"
    t = store.totals()
    assert (t["unspent"], t["issued"], t["spent"], t["reserved"]) == (16, 40, 48, 0)
    # exact proofs handed out as they are: inputs become issued, nothing new
    op2 = store.begin(send_intent([ps[0]], 8, outputs=()))
    store.finish(op2.id, Outcome(proofs=(), amount=8, fee=0, issued=(ps[0],), token="cashuB8"))
    t = store.totals()
    assert (t["unspent"], t["issued"], t["spent"]) == (8, 48, 48)


def test_begin_purpose_failure_records_nothing(store: SqliteWalletStore, db: Database) -> None:
    acc = account(db, 5_000)
    ps = seed_proofs(store, [8])
    counters_before = db.read(lambda c: c.execute("SELECT * FROM wallet_counters").fetchall())
    purpose = {"action": "debit", "account_id": acc, "amount_msats": 8_000, "kind": "refund"}
    with pytest.raises(ledger.errors.InsufficientBalance):
        store.begin(send_intent(ps, 8, purpose))
    assert store.pending() == [] and store.balances("sat") == {MINT: 8}
    assert db.read(lambda c: c.execute("SELECT * FROM wallet_counters").fetchall()) == \
        counters_before
    assert acct(db, acc).balance_msats == 5_000


def test_finish_purpose_is_checked_before_the_mint_call(store: SqliteWalletStore,
                                                         db: Database) -> None:
    """A credit the ledger would refuse refuses the intent itself: nothing recorded, so the
    token is never swapped (see the module docstring)."""
    acc = account(db)
    db.transaction(lambda c: ledger.credit(c, acc, 1_000, ref="dup-ref", now=1))
    with pytest.raises(PurposeRefused) as refused:
        store.begin(receive_intent([proof(8)], {"action": "credit", "account_id": acc,
                                                "ref": "dup-ref"}))
    assert "DuplicateDeposit" in str(refused.value)
    assert store.pending() == [] and acct(db, acc).balance_msats == 1_000
    invariant(db)


def test_finish_purpose_failure_takes_the_fallback_else_keeps_the_proofs(
        store: SqliteWalletStore, db: Database) -> None:
    """What changes between begin and finish (here: the ref credited meanwhile) lands on the
    purpose's fallback; with none, the proofs are still stored and the error recorded."""
    acc = account(db)
    purpose = {"action": "credit", "account_id": acc, "ref": "late-ref",
               "fallback": {"action": "create_account", "key_hash": "f" * 64, "kind": "token",
                            "ref": "rescue:late-ref"}}
    op = store.begin(receive_intent([proof(8)], purpose))
    db.transaction(lambda c: ledger.credit(c, acc, 1_000, ref="late-ref", now=1))
    done = store.finish(op.id, Outcome(proofs=(proof(8),), amount=8, fee=0))
    assert done.state == "done" and "DuplicateDeposit" in done.result["purpose_fallback"]
    rescued = db.read(lambda c: ledger.get_account(c, "f" * 64))
    assert rescued is not None and rescued.balance_msats == 8_000
    assert acct(db, acc).balance_msats == 1_000

    bare = {"action": "credit", "account_id": acc, "ref": "late-ref-2"}
    op = store.begin(receive_intent([proof(4)], bare))
    db.transaction(lambda c: ledger.credit(c, acc, 1_000, ref="late-ref-2", now=1))
    done = store.finish(op.id, Outcome(proofs=(proof(4),), amount=4, fee=0))
    assert done.state == "done" and "DuplicateDeposit" in done.result["purpose_error"]
    assert store.balances("sat") == {MINT: 12} and acct(db, acc).balance_msats == 2_000
    invariant(db)


def test_mint_quotes_are_minted_by_one_operation(store: SqliteWalletStore) -> None:
    store.save_quote(QuoteRecord(MINT, "sat", "q1", 64, "lnbc640n1...", 123))
    store.save_quote(QuoteRecord(MINT, "sat", "q1", 64, "lnbc640n1...", 123))  # idempotent
    assert store.quote("q1") == QuoteRecord(MINT, "sat", "q1", 64, "lnbc640n1...", 123)
    assert store.quote("nope") is None

    def mint_intent() -> Intent:
        return Intent(kind="mint", mint=MINT, unit="sat", inputs=(), own_inputs=True,
                      outputs=((KS, 64, "keep"),), purpose=None, purpose_at="finish", amount=64,
                      fee=0, quote="q1")

    op = store.begin(mint_intent())
    with pytest.raises(QuoteBusy) as busy:
        store.begin(mint_intent())
    assert busy.value.op_id == op.id and store.by_quote("q1").id == op.id  # type: ignore[union-attr]
    store.abort(op.id, "refused")
    assert store.by_quote("q1") is None
    op2 = store.begin(mint_intent())
    store.finish(op2.id, Outcome(proofs=(proof(64),), amount=64, fee=0))
    assert store.by_quote("q1").state == "done"  # type: ignore[union-attr]
    with pytest.raises(QuoteBusy):
        store.begin(mint_intent())


def test_mark_spent_and_proof_round_trip(store: SqliteWalletStore) -> None:
    ps = seed_proofs(store, [1, 2, 4])
    assert sorted(store.unspent(MINT, "sat"), key=lambda p: p.amount) == ps  # dleq kept
    store.mark_spent(MINT, [ps[0].secret])
    assert store.balances("sat") == {MINT: 6}
    assert store.unspent("http://other", "sat") == [] and store.balances("usd") == {}


def test_schema_rejects_a_reserved_proof_without_operation(db: Database) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        db.transaction(lambda c: c.execute(
            "INSERT INTO wallet_proofs (secret, mint, unit, keyset_id, amount, c, state,"
            " created_at) VALUES ('s', 'm', 'sat', 'k', 1, 'c', 'reserved', 0)"))


class FakeHttp:
    def __init__(self, exc: BaseException | None = None) -> None:
        self.exc = exc
        self.seen: list[tuple[str, str, list[tuple[str, str]], bytes]] = []

    async def fetch(self, method: str, url: str, headers: Any = (), body: bytes = b""
                    ) -> tuple[int, list[tuple[str, str]], bytes]:
        self.seen.append((method, url, list(headers), body))
        if self.exc is not None:
            raise self.exc
        return 200, [], b'{"ok": true}'


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_client_transport_maps_errors() -> None:
    ok = FakeHttp()
    call = client_transport(ok)  # type: ignore[arg-type]
    assert await call("POST", "http://m/v1/swap", b"{}") == (200, b'{"ok": true}')
    assert ("content-type", "application/json") in ok.seen[0][2]
    await call("GET", "http://m/v1/info", None)
    assert ok.seen[1][3] == b"" and all(h[0] != "content-type" for h in ok.seen[1][2])
    cases: list[tuple[BaseException, type[BaseException]]] = [
        (UpstreamConnectError("x", detail="refused"), ConnectionRefusedError),
        (UpstreamConnectTimeout("x", detail="connect"), ConnectionRefusedError),  # never sent
        (UpstreamTimeout("x", detail="read"), TimeoutError),
        (UpstreamProtocolError("x", detail="closed"), ConnectionResetError),
    ]
    for exc, expected in cases:
        with pytest.raises(expected):
            await client_transport(FakeHttp(exc))("GET", "http://m/v1/info", None)  # type: ignore[arg-type]
