"""ledger.py: every money movement, the invariant under random operations, and races."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from routstr import errors, ledger
from routstr.db import Database
from routstr.keys import generate_api_key, hash_key
from routstr.ledger import (
    AccountExists,
    ChildKeyNotAllowed,
    DuplicateDeposit,
    Ledger,
    LedgerInvariantError,
    ReservationGone,
)

NOW = 1_750_000_000  # 2025-06-15T15:06:40Z, a Sunday


def new_hash() -> str:
    return hash_key(generate_api_key())


@pytest.fixture
def db(tmp_path: Path):
    d = Database(tmp_path / "ledger.sqlite3")
    yield d
    d.close()


@pytest.fixture
def lg(db: Database) -> Ledger:
    return Ledger(db, boot_id="boot-a", clock=lambda: NOW)


def funded(lg: Ledger, msats: int, **kw) -> ledger.Account:
    return lg.create_account(key_hash=new_hash(), kind="api", deposit_msats=msats, **kw)


# --------------------------------------------------------------------------------------------
# Accounts and credits
# --------------------------------------------------------------------------------------------


def test_create_account_and_lookup(lg: Ledger) -> None:
    h = new_hash()
    a = lg.create_account(key_hash=h, kind="api", deposit_msats=5000, ref="tok-1", hint="wxyz")
    assert (a.balance_msats, a.deposited_msats, a.granted_msats) == (5000, 5000, 0)
    assert lg.get_account(h) == a
    assert lg.get_account_by_id(a.id) == a
    assert lg.get_account(new_hash()) is None
    rows, total = lg.transactions(a.id)
    assert [r.kind for r in rows] == ["deposit", "create"]
    assert total == 2 and rows[0].ref == "tok-1"
    lg.check_invariant()


def test_duplicate_key_and_duplicate_deposit(lg: Ledger) -> None:
    a = funded(lg, 100, ref="invoice-1")
    with pytest.raises(AccountExists):
        lg.create_account(key_hash=a.key_hash, kind="api")
    with pytest.raises(DuplicateDeposit):
        lg.credit(a.id, 100, ref="invoice-1")
    with pytest.raises(DuplicateDeposit):  # the same payment cannot fund a second account
        lg.create_account(key_hash=new_hash(), kind="token", deposit_msats=100, ref="invoice-1")
    assert lg.get_account_by_id(a.id).balance_msats == 100
    lg.check_invariant()


def test_grants_are_kept_apart_from_deposits(lg: Ledger) -> None:
    a = lg.create_account(key_hash=new_hash(), kind="api", deposit_msats=700, source_kind="grant")
    a = lg.credit(a.id, 300, kind="deposit", ref="x")
    a = lg.credit(a.id, 50, kind="grant", memo="goodwill")
    assert (a.deposited_msats, a.granted_msats, a.balance_msats) == (300, 750, 1050)
    kinds = [r.kind for r in lg.transactions(a.id)[0]]
    assert kinds == ["grant", "deposit", "grant", "create"]
    lg.check_invariant()


def test_amounts_must_be_int_msats(lg: Ledger) -> None:
    a = funded(lg, 10)
    for bad in (1.5, True, "3"):
        with pytest.raises(TypeError):
            lg.credit(a.id, bad)  # type: ignore[arg-type]
    for bad_int in (-1, ledger.MAX_MSATS + 1):
        with pytest.raises(ValueError):
            lg.credit(a.id, bad_int)
    with pytest.raises(ValueError):
        lg.create_account(key_hash="not-a-hash", kind="api")
    with pytest.raises(ValueError):
        lg.create_account(key_hash=new_hash(), kind="weird")


# --------------------------------------------------------------------------------------------
# Reserve / settle / release
# --------------------------------------------------------------------------------------------


def test_reserve_settle_under_and_release(lg: Ledger) -> None:
    a = funded(lg, 10_000)
    r = lg.reserve(a.id, 4_000, request_id="req-1", ttl_s=60)
    acct = lg.get_account_by_id(a.id)
    assert (acct.balance_msats, acct.reserved_msats, acct.total_requests) == (6_000, 4_000, 1)
    s = lg.settle(r.id, 1_500)
    assert (s.charged_msats, s.released_msats, s.overdraft_msats, s.balance_msats) == (
        1_500,
        2_500,
        0,
        8_500,
    )
    r2 = lg.reserve(a.id, 8_500, request_id="req-2", ttl_s=60)
    with pytest.raises(errors.InsufficientBalance) as e:
        lg.reserve(a.id, 1, request_id="req-3", ttl_s=60)
    assert e.value.code == "insufficient_balance"
    assert e.value.details == {"required": 1, "available": 0}
    assert lg.release(r2.id).released_msats == 8_500
    acct = lg.get_account_by_id(a.id)
    assert (acct.balance_msats, acct.reserved_msats, acct.spent_msats) == (8_500, 0, 1_500)
    assert acct.usage_msats == 1_500
    lg.check_invariant()


def test_settle_above_reservation_charges_balance_down_to_zero(lg: Ledger) -> None:
    a = funded(lg, 1_000)
    r = lg.reserve(a.id, 300, request_id="r", ttl_s=60)
    s = lg.settle(r.id, 500)  # 200 more than held, balance 700 covers it
    assert (s.charged_msats, s.overdraft_msats, s.balance_msats) == (500, 0, 500)
    r = lg.reserve(a.id, 100, request_id="r2", ttl_s=60)
    s = lg.settle(r.id, 10_000)  # far more than held + balance
    assert (s.charged_msats, s.overdraft_msats, s.balance_msats) == (500, 9_500, 0)
    row = lg.transactions(a.id)[0][0]
    assert row.kind == "settle" and "overdraft=9500" in row.memo
    assert lg.get_account_by_id(a.id).spent_msats == 1_000
    lg.check_invariant()


def test_reservation_is_consumed_once(lg: Ledger) -> None:
    a = funded(lg, 1_000)
    r = lg.reserve(a.id, 400, request_id="r", ttl_s=60)
    lg.settle(r.id, 100)
    with pytest.raises(ReservationGone):
        lg.settle(r.id, 100)
    with pytest.raises(ReservationGone):
        lg.release(r.id)
    r = lg.reserve(a.id, 400, request_id="r", ttl_s=60)
    lg.release(r.id)
    with pytest.raises(ReservationGone):
        lg.release(r.id)
    assert lg.get_account_by_id(a.id).balance_msats == 900
    lg.check_invariant()


def test_sweep_expired_then_settle_is_gone_and_charge_is_bounded(lg: Ledger) -> None:
    a = funded(lg, 1_000)
    r = lg.reserve(a.id, 600, request_id="slow", ttl_s=30, now=NOW)
    keep = lg.reserve(a.id, 100, request_id="fresh", ttl_s=300, now=NOW)
    assert lg.sweep_expired(now=NOW + 29) == 0
    assert lg.sweep_expired(now=NOW + 30) == 1
    with pytest.raises(ReservationGone) as e:
        lg.settle(r.id, 500, now=NOW + 31)
    assert e.value.reservation_id == r.id
    assert lg.get_account_by_id(a.id).balance_msats == 900  # not charged by the late settle
    s = lg.charge(a.id, 5_000, request_id="slow", now=NOW + 31)  # late charge, explicit
    assert (s.charged_msats, s.overdraft_msats, s.balance_msats) == (900, 4_100, 0)
    assert lg.get_reservation(keep.id) is not None
    kinds = [t.kind for t in lg.transactions(a.id)[0]]
    assert kinds[:2] == ["charge", "expire"]
    lg.check_invariant()


def test_renew_extends_expiry(lg: Ledger) -> None:
    a = funded(lg, 1_000)
    r = lg.reserve(a.id, 10, request_id="stream", ttl_s=30, now=NOW)
    assert lg.renew(r.id, ttl_s=120, now=NOW + 20).expires_at == NOW + 140
    assert lg.renew(r.id, ttl_s=1, now=NOW + 21).expires_at == NOW + 140  # never shortens
    assert lg.sweep_expired(now=NOW + 139) == 0
    lg.settle(r.id, 5)
    with pytest.raises(ReservationGone):
        lg.renew(r.id, ttl_s=10)


def test_release_orphans_only_touches_other_boots(db: Database) -> None:
    old = Ledger(db, boot_id="old-boot", clock=lambda: NOW)
    a = funded(old, 1_000)
    old.reserve(a.id, 300, request_id="lost", ttl_s=3600)
    new = Ledger(db, boot_id="new-boot", clock=lambda: NOW)
    mine = new.reserve(a.id, 200, request_id="mine", ttl_s=3600)
    assert new.startup_sweep(single_process=False) == 0  # workers: only expiry counts
    assert new.startup_sweep(single_process=True) == 1
    acct = new.get_account_by_id(a.id)
    assert (acct.balance_msats, acct.reserved_msats) == (800, 200)
    assert new.get_reservation(mine.id) is not None
    assert new.transactions(a.id)[0][0].kind == "orphan"
    new.check_invariant()


# --------------------------------------------------------------------------------------------
# Refunds
# --------------------------------------------------------------------------------------------


def test_refund_rules(lg: Ledger) -> None:
    a = funded(lg, 5_000)
    r = lg.reserve(a.id, 1_000, request_id="inflight", ttl_s=60, now=NOW)
    with pytest.raises(errors.InvalidRequest) as e:
        lg.refund(a.id, 4_000, now=NOW)
    assert e.value.message == "Cannot refund key. There are ongoing requests for this api key."
    assert e.value.status == 400
    # an expired reservation no longer blocks: refund sweeps it first
    a2 = lg.refund(a.id, 5_000, kind="refund", ref="cashuB-out", now=NOW + 61)
    assert (a2.balance_msats, a2.refunded_msats, a2.reserved_msats) == (0, 5_000, 0)
    assert lg.get_reservation(r.id) is None
    with pytest.raises(errors.InvalidRequest, match="No balance to refund"):
        lg.refund(a.id, 0)
    b = funded(lg, 100)
    with pytest.raises(errors.InsufficientBalance):
        lg.refund(b.id, 101)
    lg.refund(b.id, 40, kind="change")
    lg.refund(b.id, 60, kind="payout")
    with pytest.raises(ValueError):
        lg.refund(b.id, 1, kind="theft")
    lg.check_invariant()


def test_reverse_refund_when_the_money_never_left(lg: Ledger) -> None:
    a = funded(lg, 5_000)
    lg.refund(a.id, 3_000, kind="payout", ref="ln-1")
    back = lg.reverse_refund(a.id, 3_000, ref="wallet-reversal:7", memo="melt failed")
    assert (back.balance_msats, back.refunded_msats, back.deposited_msats) == (5_000, 0, 5_000)
    with pytest.raises(ValueError):
        lg.reverse_refund(a.id, 1)  # more than was ever refunded
    lg.refund(a.id, 1_000)
    with pytest.raises(DuplicateDeposit):
        lg.reverse_refund(a.id, 1_000, ref="wallet-reversal:7")
    assert lg.transactions(a.id)[0][1].kind == "reversal"
    lg.check_invariant()


# --------------------------------------------------------------------------------------------
# Child keys and key policy
# --------------------------------------------------------------------------------------------


def test_child_spends_parent_within_limit(lg: Ledger) -> None:
    parent = funded(lg, 10_000)
    child = lg.create_child(parent.id, new_hash(), balance_limit_msats=3_000, cost_msats=500)
    assert child.kind == "child" and child.parent_id == parent.id and child.balance_msats == 0
    p = lg.get_account_by_id(parent.id)
    assert (p.balance_msats, p.spent_msats) == (9_500, 500)
    r1 = lg.reserve(child.id, 2_000, request_id="c1", ttl_s=60)
    assert r1.key_id == parent.id and r1.child_id == child.id
    assert lg.reserved_by(lg.get_account_by_id(child.id)) == 2_000
    with pytest.raises(errors.InsufficientBalance) as e:
        lg.reserve(child.id, 1_001, request_id="c2", ttl_s=60)
    assert e.value.code == "balance_limit_exceeded" and e.value.status == 402
    lg.settle(r1.id, 1_200)
    r2 = lg.reserve(child.id, 1_800, request_id="c3", ttl_s=60)  # 1200 spent + 1800 = limit
    lg.release(r2.id)
    c = lg.get_account_by_id(child.id)
    assert (c.usage_msats, c.limit_spent_msats, c.total_requests, c.balance_msats) == (
        1_200,
        1_200,
        2,
        0,
    )
    p = lg.get_account_by_id(parent.id)
    assert (p.spent_msats, p.total_requests, p.usage_msats) == (1_700, 2, 0)
    # the parent's own requests are not limited by the child's limit
    lg.settle(lg.reserve(parent.id, 5_000, request_id="p", ttl_s=60).id, 5_000)
    # history: the child's own rows; the parent's include the child's activity
    child_rows, child_total = lg.transactions(child.id)
    assert child_total == len(child_rows) and {r.child_id for r in child_rows} == {child.id}
    parent_rows, parent_total = lg.transactions(parent.id, limit=100)
    assert parent_total == len(parent_rows) > child_total
    lg.check_invariant()


def test_child_limit_resets_per_calendar_window(lg: Ledger) -> None:
    parent = funded(lg, 100_000)
    child = lg.create_child(
        parent.id, new_hash(), balance_limit_msats=1_000, balance_limit_reset="daily", now=NOW
    )
    lg.settle(lg.reserve(child.id, 1_000, request_id="a", ttl_s=60, now=NOW).id, 1_000, now=NOW)
    with pytest.raises(errors.InsufficientBalance, match="limit"):
        lg.reserve(child.id, 1, request_id="b", ttl_s=60, now=NOW + 60)
    next_day = int(dt.datetime(2025, 6, 16, 0, 0, 1, tzinfo=dt.UTC).timestamp())
    r = lg.reserve(child.id, 1_000, request_id="c", ttl_s=60, now=next_day)
    lg.release(r.id, now=next_day)
    # reset by the parent (routstr-core's child-key/reset)
    lg.settle(
        lg.reserve(child.id, 1_000, request_id="d", ttl_s=60, now=next_day).id, 1_000, now=next_day
    )
    with pytest.raises(errors.InsufficientBalance):
        lg.reserve(child.id, 1, request_id="e", ttl_s=60, now=next_day)
    other = funded(lg, 1)
    with pytest.raises(errors.Forbidden):
        lg.reset_child(other.id, child.id, now=next_day)
    lg.reset_child(parent.id, child.id, now=next_day)
    lg.release(lg.reserve(child.id, 1_000, request_id="f", ttl_s=60, now=next_day).id)
    lg.check_invariant()


@pytest.mark.parametrize(
    ("reset", "now", "start"),
    [
        ("daily", NOW, dt.datetime(2025, 6, 15, tzinfo=dt.UTC)),
        ("weekly", NOW, dt.datetime(2025, 6, 9, tzinfo=dt.UTC)),  # ISO week starts Monday
        ("monthly", NOW, dt.datetime(2025, 6, 1, tzinfo=dt.UTC)),
    ],
)
def test_window_start(reset: str, now: int, start: dt.datetime) -> None:
    assert ledger.window_start(reset, now) == int(start.timestamp())
    assert ledger.window_start(None, now) is None


def test_key_policy_disabled_and_expired(lg: Ledger) -> None:
    parent = funded(lg, 10_000, validity_date=NOW + 100)
    child = lg.create_child(parent.id, new_hash(), validity_date=NOW + 50)
    lg.release(lg.reserve(child.id, 10, request_id="ok", ttl_s=5, now=NOW + 49).id)
    with pytest.raises(errors.Forbidden) as e:
        lg.reserve(child.id, 10, request_id="late", ttl_s=5, now=NOW + 50)
    assert e.value.code == "key_expired" and e.value.status == 403
    with pytest.raises(errors.Forbidden):
        lg.reserve(parent.id, 10, request_id="late", ttl_s=5, now=NOW + 100)
    other = funded(lg, 10_000)
    other_child = lg.create_child(other.id, new_hash())
    lg.set_disabled(other.id, True, memo="abuse")
    for acct in (other, other_child):  # a disabled parent stops its children too
        with pytest.raises(errors.AuthenticationFailed) as e2:
            lg.reserve(acct.id, 10, request_id="x", ttl_s=5)
        assert e2.value.code == "key_disabled"
    lg.set_disabled(other.id, False)
    lg.release(lg.reserve(other_child.id, 10, request_id="y", ttl_s=5).id)
    lg.check_invariant()


def test_children_cannot_refund_nest_or_hold_money(lg: Ledger) -> None:
    parent = funded(lg, 1_000)
    child = lg.create_child(parent.id, new_hash())
    with pytest.raises(ChildKeyNotAllowed):
        lg.refund(child.id, 1)
    with pytest.raises(ChildKeyNotAllowed):
        lg.create_child(child.id, new_hash())
    credited = lg.credit(child.id, 500, ref="to-child")  # goes to the parent
    assert credited.id == parent.id and credited.balance_msats == 1_500
    assert lg.get_account_by_id(child.id).balance_msats == 0
    with pytest.raises(errors.InsufficientBalance):
        lg.create_children(parent.id, [new_hash(), new_hash()], cost_msats_each=800)
    assert lg.children(parent.id) == [lg.get_account_by_id(child.id)]  # all or none
    made = lg.create_children(parent.id, [new_hash(), new_hash()], cost_msats_each=700)
    assert len(made) == 2 and lg.get_account_by_id(parent.id).balance_msats == 100
    lg.check_invariant()


def test_refund_address_is_stored(lg: Ledger) -> None:
    a = funded(lg, 10)
    a = lg.set_refund_address(a.id, refund_address="me@example.com", refund_expiry=NOW + 5)
    assert (a.refund_address, a.refund_expiry) == ("me@example.com", NOW + 5)


# --------------------------------------------------------------------------------------------
# History, totals, invariant checker
# --------------------------------------------------------------------------------------------


def test_transactions_pages_newest_first_from_the_index(lg: Ledger, db: Database) -> None:
    a = funded(lg, 1_000_000)
    for i in range(30):
        lg.settle(lg.reserve(a.id, 100, request_id=f"r{i}", ttl_s=60).id, 10)
    rows, total = lg.transactions(a.id, limit=5, offset=0)
    assert total == 2 + 60 and len(rows) == 5
    assert [r.id for r in rows] == sorted((r.id for r in rows), reverse=True)
    assert rows[0].kind == "settle" and rows[0].request_id == "r29"
    page2, _ = lg.transactions(a.id, limit=5, offset=5)
    assert page2[0].id < rows[-1].id
    assert lg.transactions(a.id, limit=10, offset=100)[0] == []
    for column in ("key_id", "child_id"):
        plan = " ".join(
            str(r[-1])
            for r in db.conn.execute(
                f"EXPLAIN QUERY PLAN SELECT * FROM txlog WHERE {column} = 1"
                " ORDER BY id DESC LIMIT 5 OFFSET 0"
            )
        )
        assert "USING INDEX txlog_" in plan and "TEMP B-TREE" not in plan, plan


def test_totals_and_invariant_checker_catches_tampering(lg: Ledger, db: Database) -> None:
    a = funded(lg, 1_000)
    b = lg.create_account(key_hash=new_hash(), kind="xcashu", deposit_msats=500)
    lg.reserve(a.id, 100, request_id="r", ttl_s=60)
    lg.refund(b.id, 200, kind="change")
    t = lg.totals()
    assert t["accounts"] == 2 and t["deposited_msats"] == 1_500
    assert t["reserved_msats"] == t["reservations_msats"] == 100
    assert t["liability_msats"] == 1_300
    assert lg.check_invariant() == t
    # a reservation row that moved no money: I3 must notice
    db.transaction(
        lambda c: c.execute(
            "INSERT INTO reservations (key_id, amount_msats, request_id, created_at, expires_at)"
            " VALUES (?, 5, 'ghost', 0, 0)",
            (a.id,),
        )
    )
    with pytest.raises(LedgerInvariantError, match="reserved"):
        lg.check_invariant()


def test_ops_compose_inside_a_larger_transaction(lg: Ledger, db: Database) -> None:
    """Another module (the wallet) credits inside its own transaction: all or nothing."""
    a = funded(lg, 0)

    def receive_and_credit(conn: sqlite3.Connection) -> None:
        ledger.credit(conn, a.id, 2_000, ref="proofs-1", now=NOW)
        raise RuntimeError("mint said no")  # the proofs could not be stored: roll back

    with pytest.raises(RuntimeError):
        db.transaction(receive_and_credit)
    assert lg.get_account_by_id(a.id).balance_msats == 0
    db.transaction(lambda c: ledger.credit(c, a.id, 2_000, ref="proofs-1", now=NOW))
    assert lg.get_account_by_id(a.id).balance_msats == 2_000
    lg.check_invariant()


# --------------------------------------------------------------------------------------------
# Random operation sequences (hypothesis, stateful) against a model of the books
# --------------------------------------------------------------------------------------------

amounts = st.integers(min_value=0, max_value=50_000)


class LedgerMachine(RuleBasedStateMachine):
    accounts = Bundle("accounts")
    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = __import__("tempfile").TemporaryDirectory()
        self.db = Database(Path(self.tmp.name) / "h.sqlite3")
        self.now = NOW
        self.lg = Ledger(self.db, boot_id="boot", clock=lambda: self.now)
        self.balance: dict[int, int] = {}  # expected spendable balance of paying accounts
        self.held: dict[int, tuple[int, int]] = {}  # reservation id -> (payer, amount)
        self.gone: set[int] = set()

    def teardown(self) -> None:
        self.db.close()
        self.tmp.cleanup()

    def payer(self, account_id: int) -> int:
        acct = self.lg.get_account_by_id(account_id)
        assert acct is not None
        return acct.paying_id

    @initialize(target=accounts)
    def first(self) -> int:
        a = funded(self.lg, 10_000)
        self.balance[a.id] = a.balance_msats
        return a.id

    @rule(target=accounts, deposit=amounts, grant=st.booleans())
    def create(self, deposit: int, grant: bool) -> int:
        a = self.lg.create_account(
            key_hash=new_hash(),
            kind="api",
            deposit_msats=deposit,
            source_kind="grant" if grant else "deposit",
        )
        self.balance[a.id] = deposit
        return a.id

    @rule(target=accounts, parent=accounts, limit=st.none() | amounts, fee=st.integers(0, 500))
    def create_child(self, parent: int, limit: int | None, fee: int) -> int:
        try:
            child = self.lg.create_child(
                parent, new_hash(), balance_limit_msats=limit, cost_msats=fee
            )
        except ChildKeyNotAllowed:
            return parent
        except errors.InsufficientBalance:
            assert self.balance.get(parent, 0) < fee
            return parent
        self.balance[parent] -= fee
        return child.id

    @rule(account=accounts, amount=st.integers(1, 50_000))
    def credit(self, account: int, amount: int) -> None:
        got = self.lg.credit(account, amount, kind="deposit")
        self.balance[got.id] = self.balance.get(got.id, 0) + amount

    @rule(target=reservations, account=accounts, amount=amounts, ttl=st.integers(1, 100))
    def reserve(self, account: int, amount: int, ttl: int) -> int:
        payer = self.payer(account)
        try:
            r = self.lg.reserve(account, amount, request_id="h", ttl_s=ttl)
        except errors.InsufficientBalance as e:
            if e.code == "insufficient_balance":
                assert self.balance[payer] < amount
            return -1
        assert self.balance[payer] >= amount
        self.balance[payer] -= amount
        self.held[r.id] = (payer, amount)
        return r.id

    @rule(r=consumes(reservations), cost=st.integers(0, 100_000))
    def settle(self, r: int, cost: int) -> None:
        if r < 0:
            return
        before = dict(self.balance)
        try:
            s = self.lg.settle(r, cost)
        except ReservationGone:
            assert r in self.gone
            assert self.balance == before  # nothing charged twice
            return
        payer, held = self.held.pop(r)
        self.gone.add(r)
        extra = min(max(cost - held, 0), self.balance[payer])
        assert s.charged_msats == min(cost, held) + extra
        assert s.overdraft_msats == cost - s.charged_msats
        self.balance[payer] += held - min(cost, held) - extra
        assert s.balance_msats == self.balance[payer]

    @rule(r=reservations)
    def settle_again_or_release(self, r: int) -> None:
        if r < 0:
            return
        try:
            s = self.lg.release(r)
        except ReservationGone:
            assert r in self.gone
            return
        payer, held = self.held.pop(r)
        self.gone.add(r)
        self.balance[payer] += held
        assert s.released_msats == held

    @rule(account=accounts, amount=amounts, kind=st.sampled_from(ledger.REFUND_KINDS))
    def refund(self, account: int, amount: int, kind: str) -> None:
        acct = self.lg.get_account_by_id(account)
        try:
            self.lg.refund(account, amount, kind=kind)
        except ChildKeyNotAllowed:
            assert acct.is_child
            return
        except (errors.InvalidRequest, errors.InsufficientBalance, ValueError):
            return
        self.balance[account] -= amount

    @rule(account=accounts, amount=st.integers(1, 50_000))
    def reverse_refund(self, account: int, amount: int) -> None:
        acct = self.lg.get_account_by_id(account)
        try:
            self.lg.reverse_refund(account, amount)
        except (ChildKeyNotAllowed, ValueError):
            assert acct.is_child or amount > acct.refunded_msats
            return
        self.balance[account] += amount

    @rule(dt_s=st.integers(0, 120))
    def sweep(self, dt_s: int) -> None:
        self.now += dt_s
        live = dict(self.held)
        self.lg.sweep_expired()
        for rid, (payer, held) in live.items():
            if self.lg.get_reservation(rid) is None:
                self.held.pop(rid)
                self.gone.add(rid)
                self.balance[payer] += held

    @precondition(lambda self: len(self.held) > 0)
    @rule()
    def restart_single_process(self) -> None:
        self.lg = Ledger(self.db, clock=lambda: self.now)  # a fresh random boot id
        self.lg.startup_sweep(single_process=True)
        for rid, (payer, held) in self.held.items():
            self.gone.add(rid)
            self.balance[payer] += held
        self.held.clear()

    @invariant()
    def books_balance(self) -> None:
        self.lg.check_invariant()
        for account_id, expected in self.balance.items():
            acct = self.lg.get_account_by_id(account_id)
            assert acct is not None and acct.balance_msats == expected >= 0


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --------------------------------------------------------------------------------------------
# Races: 100 processes' worth of connections on one file
# --------------------------------------------------------------------------------------------


def test_100_parallel_reservations_exactly_10_succeed(tmp_path: Path) -> None:
    path = tmp_path / "race.sqlite3"
    with Database(path) as setup_db:
        acct = Ledger(setup_db).create_account(
            key_hash=new_hash(), kind="api", deposit_msats=10 * 777
        )
    barrier = threading.Barrier(100)
    results: list[object] = [None] * 100

    def worker(i: int) -> None:
        d = Database(path)
        try:
            lg = Ledger(d, boot_id=f"w{i}")
            barrier.wait()
            try:
                results[i] = lg.reserve(acct.id, 777, request_id=f"r{i}", ttl_s=60)
            except errors.InsufficientBalance as e:
                results[i] = e
        except BaseException as e:
            results[i] = e
        finally:
            d.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if isinstance(r, ledger.Reservation)]
    refused = [r for r in results if isinstance(r, errors.InsufficientBalance)]
    assert len(ok) == 10 and len(refused) == 90, [r for r in results if r not in ok + refused]
    with Database(path) as d:
        lg = Ledger(d)
        a = lg.get_account_by_id(acct.id)
        assert (a.balance_msats, a.reserved_msats, a.total_requests) == (0, 7_770, 10)
        lg.check_invariant()


def test_topup_racing_refund_never_loses_money(tmp_path: Path) -> None:
    path = tmp_path / "race2.sqlite3"
    with Database(path) as d:
        acct = Ledger(d).create_account(key_hash=new_hash(), kind="api", deposit_msats=1_000)
    barrier = threading.Barrier(20)
    refunded: list[int] = []
    failures: list[BaseException] = []

    def topup(i: int) -> None:
        with Database(path) as d:
            barrier.wait()
            Ledger(d).credit(acct.id, 100, ref=f"t{i}")

    def drain() -> None:
        with Database(path) as d:
            lg = Ledger(d)
            barrier.wait()
            for _ in range(20):
                bal = lg.get_account_by_id(acct.id).balance_msats
                if bal == 0:
                    continue
                try:
                    lg.refund(acct.id, bal)
                    refunded.append(bal)
                except errors.InsufficientBalance:
                    pass  # cannot happen (balance only grows meanwhile) but would be harmless

    def guarded(fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=guarded, args=(topup, i)) for i in range(19)]
    threads.append(threading.Thread(target=guarded, args=(drain,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    with Database(path) as d:
        a = Ledger(d).get_account_by_id(acct.id)
        assert a.deposited_msats == 1_000 + 19 * 100
        assert a.balance_msats + sum(refunded) == a.deposited_msats
        Ledger(d).check_invariant()


# --------------------------------------------------------------------------------------------
# What it costs
# --------------------------------------------------------------------------------------------


def test_measure_reserve_settle_and_durable_credit(lg: Ledger, capsys) -> None:
    a = funded(lg, 10**12)
    for _ in range(20):  # warm up
        lg.settle(lg.reserve(a.id, 1000, request_id="w", ttl_s=60).id, 500)
    pairs = []
    for i in range(500):
        t = time.perf_counter()
        r = lg.reserve(a.id, 1000, request_id=f"b{i}", ttl_s=60)
        lg.settle(r.id, 500)
        pairs.append(time.perf_counter() - t)
    credits = []
    for i in range(50):
        t = time.perf_counter()
        lg.credit(a.id, 1, ref=f"c{i}")
        credits.append(time.perf_counter() - t)
    pairs.sort()
    credits.sort()
    pair_us = pairs[len(pairs) // 2] * 1e6
    credit_us = credits[len(credits) // 2] * 1e6
    with capsys.disabled():
        print(
            f"\n[ledger] reserve+settle pair (NORMAL): median {pair_us:.0f} µs,"
            f" p99 {pairs[int(len(pairs) * 0.99)] * 1e6:.0f} µs;"
            f" durable credit (FULL): median {credit_us:.0f} µs"
        )
    lg.check_invariant()
    assert pair_us < 20_000
