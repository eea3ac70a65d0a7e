"""ledger.py: every money movement, the invariant under random operations, and races."""

from __future__ import annotations

import datetime as dt
import re
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
DAY = 86_400


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
    # another worker sweeps while this one is paused (its renewals stopped)
    other = Ledger(lg.db)
    assert other.sweep_expired(now=NOW + 29) == 0
    assert other.sweep_expired(now=NOW + 30) == 1
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


def test_a_reservation_id_is_never_handed_out_again(lg: Ledger) -> None:
    """A expires and is swept; B (another key) reserves next. A's late settle must find A gone
    — not consume B's reservation, which would charge B for A's request."""
    a, b = funded(lg, 1_000), funded(lg, 1_000)
    late = lg.reserve(a.id, 600, request_id="late", ttl_s=30, now=NOW)
    assert Ledger(lg.db).sweep_expired(now=NOW + 30) == 1  # another worker's; the table is empty
    other = lg.reserve(b.id, 500, request_id="other", ttl_s=300, now=NOW + 31)
    assert other.id != late.id
    with pytest.raises(ReservationGone):
        lg.settle(late.id, 400, now=NOW + 32)
    with pytest.raises(ReservationGone):
        lg.release(late.id, now=NOW + 32)
    assert lg.get_reservation(other.id) is not None
    assert lg.get_account_by_id(b.id).reserved_msats == 500
    lg.settle(other.id, 100, now=NOW + 33)
    assert lg.get_account_by_id(b.id).balance_msats == 900
    assert lg.get_account_by_id(a.id).balance_msats == 1_000
    # the id is its reserve row's in the log
    rows = [t for t in lg.transactions(b.id)[0] if t.kind == "reserve"]
    assert [t.id for t in rows] == [other.id]
    lg.check_invariant()


def test_a_live_request_keeps_its_hold_past_the_ttl(lg: Ledger) -> None:
    """Issue 13 §3: a request that outlives the ttl keeps its hold (its process renews it at
    every sweep); only a hold whose request is gone (a crashed process) expires."""
    a = funded(lg, 1_000)
    slow = lg.reserve(a.id, 600, request_id="slow", ttl_s=30, now=NOW)
    for t in range(NOW + 20, NOW + 1000, 20):  # this process sweeps, as app.sweep_forever does
        assert lg.sweep_expired(now=t) == 0
    assert Ledger(lg.db).sweep_expired(now=NOW + 1000) == 0  # another worker: still renewed
    assert lg.get_account_by_id(a.id).reserved_msats == 600
    assert lg.settle(slow.id, 500, now=NOW + 1001).charged_msats == 500
    assert lg.live_reservations == 0
    # a process that dies: its holds are renewed no more and expire for the others
    dead = Ledger(lg.db)
    gone = dead.reserve(a.id, 300, request_id="crashed", ttl_s=30, now=NOW + 1002)
    assert lg.sweep_expired(now=NOW + 1031) == 0
    assert lg.sweep_expired(now=NOW + 1032) == 1
    assert lg.get_reservation(gone.id) is None
    assert lg.get_account_by_id(a.id).balance_msats == 500
    lg.check_invariant()


def test_renew_live_extends_expiry_never_shortens(lg: Ledger) -> None:
    a = funded(lg, 1_000)
    r = lg.reserve(a.id, 10, request_id="stream", ttl_s=30, now=NOW)
    lg.db.transaction(lambda c: ledger.renew_live(c, {r.id: 120}, now=NOW + 20))
    assert lg.get_reservation(r.id).expires_at == NOW + 140
    lg.db.transaction(lambda c: ledger.renew_live(c, {r.id: 1}, now=NOW + 21))
    assert lg.get_reservation(r.id).expires_at == NOW + 140  # never shortens
    lg.settle(r.id, 5)
    lg.db.transaction(lambda c: ledger.renew_live(c, {r.id: 10}, now=NOW + 22))  # gone: no-op
    assert lg.get_reservation(r.id) is None

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
# reserve's one-UPDATE path (plain key, no balance limit) against its checked path, and settle's
# one-UPDATE charge: every boundary between them
# --------------------------------------------------------------------------------------------


def state(lg: Ledger, account_id: int) -> tuple[int, ...]:
    a = lg.get_account_by_id(account_id)
    return (
        a.balance_msats,
        a.reserved_msats,
        a.spent_msats,
        a.usage_msats,
        a.total_requests,
        a.tx_count,
        a.limit_spent_msats,
    )


def refused(lg: Ledger, account_id: int, amount: int, code: str, **kw) -> errors.ApiError:
    """reserve is refused with `code` and changes nothing (no row, no count, no log)."""
    before = state(lg, account_id), lg.totals()
    with pytest.raises(errors.ApiError) as e:
        lg.reserve(account_id, amount, request_id="refused", ttl_s=60, **kw)
    assert e.value.code == code
    assert (state(lg, account_id), lg.totals()) == before
    lg.check_invariant()
    return e.value


def test_reserve_expires_exactly_at_validity_date(lg: Ledger) -> None:
    a = funded(lg, 1_000, validity_date=NOW + 10)
    r = lg.reserve(a.id, 100, request_id="last-second", ttl_s=60, now=NOW + 9)
    assert (r.key_id, r.child_id, r.amount_msats) == (a.id, None, 100)
    e = refused(lg, a.id, 100, "key_expired", now=NOW + 10)
    assert e.status == 403 and e.details == {"validity_date": NOW + 10}
    refused(lg, a.id, 100, "key_expired", now=NOW + 11)
    lg.settle(r.id, 100, now=NOW + 11)  # an expired key's request in flight still settles
    assert state(lg, a.id)[:5] == (900, 0, 100, 100, 1)


def test_reserve_disabled_key_and_the_order_of_refusals(lg: Ledger) -> None:
    a = funded(lg, 1_000, validity_date=NOW + 10)
    lg.set_disabled(a.id, True)
    e = refused(lg, a.id, 5_000, "key_disabled")  # disabled is reported before the balance
    assert e.status == 401
    refused(lg, a.id, 5_000, "key_disabled", now=NOW + 10)  # ... and before expiry
    lg.set_disabled(a.id, False)
    refused(lg, a.id, 5_000, "insufficient_balance")
    refused(lg, a.id, 5_000, "key_expired", now=NOW + 10)
    lg.release(lg.reserve(a.id, 1_000, request_id="ok", ttl_s=60).id)
    assert state(lg, a.id)[:5] == (1_000, 0, 0, 0, 1)


def test_reserve_exactly_the_balance_then_one_msat_more(lg: Ledger) -> None:
    a = funded(lg, 1_000)
    r = lg.reserve(a.id, 1_000, request_id="all", ttl_s=60)
    assert state(lg, a.id)[:5] == (0, 1_000, 0, 0, 1)
    e = refused(lg, a.id, 1, "insufficient_balance")
    assert e.details == {"required": 1, "available": 0}
    zero = lg.reserve(a.id, 0, request_id="free", ttl_s=60)  # 0 msats fits an empty balance
    assert zero.amount_msats == 0
    rows = [
        (t.kind, t.key_id, t.child_id, t.amount_msats, t.request_id, t.memo)
        for t in lg.transactions(a.id)[0][:2]
    ]
    assert rows == [
        ("reserve", a.id, None, 0, "free", ""),
        ("reserve", a.id, None, 1_000, "all", ""),
    ]
    lg.release(r.id)
    lg.release(zero.id)
    assert state(lg, a.id)[:5] == (1_000, 0, 0, 0, 2)
    lg.check_invariant()


def test_reserve_unknown_key(lg: Ledger) -> None:
    with pytest.raises(ledger.AccountNotFound):
        lg.reserve(12_345, 1, request_id="x", ttl_s=60)
    assert lg.totals()["reservations"] == 0


def test_plain_key_with_a_balance_limit_is_still_limited(lg: Ledger) -> None:
    a = funded(lg, 10_000, balance_limit_msats=1_000)  # an api key, not a child
    e = refused(lg, a.id, 1_001, "balance_limit_exceeded")
    assert e.details == {"balance_limit": 1_000, "spent": 0, "reserved": 0, "required": 1_001}
    r = lg.reserve(a.id, 600, request_id="a", ttl_s=60)
    e = refused(lg, a.id, 401, "balance_limit_exceeded")  # what is held counts
    assert e.details["reserved"] == 600
    lg.settle(r.id, 600)
    assert state(lg, a.id) == (9_400, 0, 600, 600, 1, 4, 600)
    r = lg.reserve(a.id, 400, request_id="b", ttl_s=60)  # 600 spent + 400 = the limit
    lg.settle(r.id, 1_000)  # a cost above the hold is charged all the same
    refused(lg, a.id, 1, "balance_limit_exceeded")
    assert state(lg, a.id) == (8_400, 0, 1_600, 1_600, 2, 6, 1_600)
    lg.check_invariant()


def test_child_key_reserve_and_settle(lg: Ledger) -> None:
    parent = funded(lg, 10_000)
    child = lg.create_child(parent.id, new_hash())
    free = lg.reserve(child.id, 0, request_id="free", ttl_s=60)  # held on the parent, even 0
    assert (free.key_id, free.child_id) == (parent.id, child.id)
    lg.release(free.id)
    r = lg.reserve(child.id, 3_000, request_id="c", ttl_s=60)
    assert (r.key_id, r.child_id) == (parent.id, child.id)
    assert state(lg, parent.id)[:5] == (7_000, 3_000, 0, 0, 2)
    assert state(lg, child.id)[:5] == (0, 0, 0, 0, 2)
    s = lg.settle(r.id, 3_500)  # 500 above the hold: from the parent's balance
    assert (s.charged_msats, s.released_msats, s.overdraft_msats, s.balance_msats) == (
        3_500,
        0,
        0,
        6_500,
    )
    assert state(lg, parent.id)[:5] == (6_500, 0, 3_500, 0, 2)
    assert state(lg, child.id) == (0, 0, 0, 3_500, 2, 5, 3_500)
    row = lg.transactions(child.id)[0][0]
    assert (row.kind, row.key_id, row.child_id, row.amount_msats, row.memo) == (
        "settle",
        parent.id,
        child.id,
        3_500,
        "cost=3500 held=3000 released=0",
    )
    lg.set_disabled(parent.id, True)  # the child path checks the parent too
    refused(lg, child.id, 1, "key_disabled")
    lg.check_invariant()


def test_settle_cost_equal_to_the_hold_and_zero(lg: Ledger) -> None:
    a = funded(lg, 10_000)
    s = lg.settle(lg.reserve(a.id, 4_000, request_id="eq", ttl_s=60).id, 4_000)
    assert (s.charged_msats, s.released_msats, s.overdraft_msats, s.balance_msats) == (
        4_000,
        0,
        0,
        6_000,
    )
    s = lg.settle(lg.reserve(a.id, 1_000, request_id="free", ttl_s=60).id, 0)
    assert (s.charged_msats, s.released_msats, s.balance_msats) == (0, 1_000, 6_000)
    rows = [(t.kind, t.amount_msats, t.request_id, t.memo) for t in lg.transactions(a.id)[0][:4]]
    assert rows == [
        ("settle", 0, "free", "cost=0 held=1000 released=1000"),
        ("reserve", 1_000, "free", ""),
        ("settle", 4_000, "eq", "cost=4000 held=4000 released=0"),
        ("reserve", 4_000, "eq", ""),
    ]
    acct = lg.get_account_by_id(a.id)
    assert state(lg, a.id) == (6_000, 0, 4_000, 4_000, 2, 6, 4_000)
    assert (acct.limit_window_start, acct.last_used_at) == (None, NOW)
    lg.check_invariant()


def test_settle_overdraft_drains_to_zero_and_records_it(lg: Ledger) -> None:
    a = funded(lg, 1_500)
    r = lg.reserve(a.id, 1_000, request_id="big", ttl_s=60)
    s = lg.settle(r.id, 2_000)  # 1000 above the hold; only 500 left to take
    assert (s.charged_msats, s.released_msats, s.overdraft_msats, s.balance_msats) == (
        1_500,
        0,
        500,
        0,
    )
    row = lg.transactions(a.id)[0][0]
    assert (row.kind, row.amount_msats, row.memo) == (
        "settle",
        1_500,
        "cost=2000 held=1000 released=0 overdraft=500",
    )
    assert state(lg, a.id) == (0, 0, 1_500, 1_500, 1, 4, 1_500)
    lg.check_invariant()


@pytest.mark.parametrize("child", [False, True])
def test_settle_rolls_the_limit_window_over(lg: Ledger, child: bool) -> None:
    parent = funded(lg, 100_000, now=NOW)
    policy = {"balance_limit_msats": 50_000, "balance_limit_reset": "daily", "now": NOW}
    if child:
        key = lg.create_child(parent.id, new_hash(), **policy)
    else:
        key = lg.create_account(key_hash=new_hash(), kind="api", deposit_msats=100_000, **policy)
    today = ledger.window_start("daily", NOW)
    assert lg.get_account_by_id(key.id).limit_window_start == today
    held_over = lg.reserve(key.id, 1_000, request_id="overnight", ttl_s=DAY, now=NOW)
    lg.settle(lg.reserve(key.id, 5_000, request_id="a", ttl_s=60, now=NOW).id, 3_000, now=NOW)
    a = lg.get_account_by_id(key.id)
    assert (a.limit_spent_msats, a.limit_window_start, a.usage_msats) == (3_000, today, 3_000)
    tomorrow = NOW + DAY
    lg.settle(held_over.id, 700, now=tomorrow)  # the first charge of a new day starts it over
    a = lg.get_account_by_id(key.id)
    assert (a.limit_spent_msats, a.limit_window_start, a.usage_msats) == (700, today + DAY, 3_700)
    lg.settle(lg.reserve(key.id, 100, request_id="b", ttl_s=60, now=tomorrow).id, 100, now=tomorrow)
    late = NOW  # a settle stamped in the old window does not move the window back
    lg.settle(lg.reserve(key.id, 50, request_id="c", ttl_s=60, now=tomorrow).id, 50, now=late)
    a = lg.get_account_by_id(key.id)
    assert (a.limit_spent_msats, a.limit_window_start, a.usage_msats) == (850, today + DAY, 3_850)
    if child:
        p = lg.get_account_by_id(parent.id)
        assert (p.usage_msats, p.limit_spent_msats, p.limit_window_start) == (0, 0, None)
    lg.check_invariant()


def test_charge_without_reservation_updates_limits_like_settle(lg: Ledger) -> None:
    a = funded(lg, 1_000, balance_limit_msats=5_000, balance_limit_reset="weekly", now=NOW)
    s = lg.charge(a.id, 400, request_id="late", now=NOW + 7 * DAY)
    assert (s.reservation_id, s.charged_msats, s.overdraft_msats, s.balance_msats) == (
        None,
        400,
        0,
        600,
    )
    acct = lg.get_account_by_id(a.id)
    week = ledger.window_start("weekly", NOW + 7 * DAY)
    assert (acct.limit_spent_msats, acct.limit_window_start, acct.usage_msats) == (400, week, 400)
    s = lg.charge(a.id, 1_000, request_id="late2", now=NOW + 7 * DAY)
    assert (s.charged_msats, s.overdraft_msats, s.balance_msats) == (600, 400, 0)
    assert lg.transactions(a.id)[0][0].memo == "cost=1000 held=0 overdraft=400"
    lg.check_invariant()


def test_release_returns_the_hold_and_reports_the_balance(lg: Ledger) -> None:
    parent = funded(lg, 5_000)
    child = lg.create_child(parent.id, new_hash())
    r1 = lg.reserve(parent.id, 1_000, request_id="p", ttl_s=60)
    r2 = lg.reserve(child.id, 2_500, request_id="c", ttl_s=60)
    s = lg.release(r2.id)
    assert (s.reservation_id, s.charged_msats, s.released_msats, s.balance_msats) == (
        r2.id,
        0,
        2_500,
        4_000,
    )
    row = lg.transactions(parent.id)[0][0]
    assert (row.kind, row.key_id, row.child_id, row.amount_msats, row.request_id) == (
        "release",
        parent.id,
        child.id,
        2_500,
        "c",
    )
    assert lg.release(r1.id).balance_msats == 5_000
    assert state(lg, parent.id)[:4] == (5_000, 0, 0, 0)
    with pytest.raises(ReservationGone):
        lg.release(r1.id)
    lg.check_invariant()


def statement_shapes(db: Database, op) -> list[str]:
    """The statements `op()` runs, as 'UPDATE keys', 'SELECT FROM reservations', ... (a trigger's
    statements repeat the INSERT that fired it; repeats are dropped)."""
    seen: list[str] = []
    db.conn.set_trace_callback(seen.append)
    try:
        op()
    finally:
        db.conn.set_trace_callback(None)
    shapes: list[str] = []
    for sql in seen:
        m = re.match(r"(BEGIN|COMMIT|UPDATE \w+|INSERT INTO \w+|DELETE FROM \w+|SELECT)", sql)
        assert m, sql
        shape = m.group(1)
        if shape == "SELECT":
            shape += " FROM " + re.search(r" FROM (\w+)", sql).group(1)
        if not shapes or shapes[-1] != shape:
            shapes.append(shape)
    return shapes


def test_the_common_pair_takes_the_short_paths(lg: Ledger, db: Database) -> None:
    """A guard for the hot path: a plain key's reserve is one conditional UPDATE and two INSERTs
    (a stricter WHERE clause would still be correct, only slower: the results cannot tell)."""
    a = funded(lg, 10_000)
    held: list[ledger.Reservation] = []
    assert statement_shapes(
        db, lambda: held.append(lg.reserve(a.id, 10_000, request_id="r", ttl_s=60))
    ) == ["BEGIN", "UPDATE keys", "INSERT INTO txlog", "INSERT INTO reservations", "COMMIT"]
    assert statement_shapes(db, lambda: lg.settle(held[0].id, 9_000)) == [
        "BEGIN",
        "SELECT FROM reservations",
        "DELETE FROM reservations",
        "SELECT FROM keys",
        "UPDATE keys",
        "INSERT INTO txlog",
        "COMMIT",
    ]
    lg.check_invariant()


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


class _BooksMachine(RuleBasedStateMachine):
    """A fresh database and ledger per run, on a clock the rules move (`self.now`)."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = __import__("tempfile").TemporaryDirectory()
        self.db = Database(Path(self.tmp.name) / "books.sqlite3")
        self.now = NOW
        self.lg = Ledger(self.db, boot_id="boot", clock=lambda: self.now)

    def teardown(self) -> None:
        self.db.close()
        self.tmp.cleanup()


class LedgerMachine(_BooksMachine):
    accounts = Bundle("accounts")
    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.balance: dict[int, int] = {}  # expected spendable balance of paying accounts
        self.held: dict[int, tuple[int, int]] = {}  # reservation id -> (payer, amount)
        self.gone: set[int] = set()

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


limits = st.none() | st.integers(min_value=0, max_value=60_000)
resets = st.sampled_from([None, *ledger.LIMIT_RESETS])
lifetimes = st.sampled_from([None, None, None, None, 0, 1, DAY])  # seconds from now
waits = st.sampled_from([0, 0, 0, 1, 3_600, DAY, 7 * DAY, 31 * DAY])  # before a request


class PolicyMachine(_BooksMachine):
    """Key policy under random sequences: plain and child keys with balance limits, limit
    windows, validity dates and the disabled flag, a clock that moves by seconds or days, and
    requests settled at once, released, or held and settled later. Each reserve's outcome is
    predicted from the accounts as they stand — so reserve's one-UPDATE path and its checked
    path answer to the same rules — and every key's usage and limit-window spending must
    reconcile with its settle rows in the log."""

    keys = Bundle("keys")

    def __init__(self) -> None:
        super().__init__()
        self.held: list[ledger.Reservation] = []

    def refusal(self, account: int, amount: int) -> str | None:
        key = self.lg.get_account_by_id(account)
        assert key is not None
        payer = self.lg.get_account_by_id(key.paying_id)
        assert payer is not None
        for acct in (key, payer):  # the key first, then its parent
            if acct.disabled:
                return "key_disabled"
            if acct.validity_date is not None and self.now >= acct.validity_date:
                return "key_expired"
        if key.balance_limit_msats is not None:
            start = ledger.window_start(key.balance_limit_reset, self.now)
            rolled = start is not None and (
                key.limit_window_start is None or key.limit_window_start < start
            )
            spent = 0 if rolled else key.limit_spent_msats
            if spent + self.lg.reserved_by(key) + amount > key.balance_limit_msats:
                return "balance_limit_exceeded"
        if payer.balance_msats < amount:
            return "insufficient_balance"
        return None

    @initialize(target=keys)
    def first(self) -> int:
        return funded(self.lg, 100_000).id

    @rule(target=keys, deposit=st.integers(0, 100_000), limit=limits, reset=resets, life=lifetimes)
    def create(self, deposit: int, limit: int | None, reset: str | None, life: int | None) -> int:
        return self.lg.create_account(
            key_hash=new_hash(),
            kind="api",
            deposit_msats=deposit,
            balance_limit_msats=limit,
            balance_limit_reset=reset,
            validity_date=None if life is None else self.now + life,
        ).id

    @rule(target=keys, parent=keys, limit=limits, reset=resets, life=lifetimes)
    def create_child(
        self, parent: int, limit: int | None, reset: str | None, life: int | None
    ) -> int:
        try:
            return self.lg.create_child(
                parent,
                new_hash(),
                balance_limit_msats=limit,
                balance_limit_reset=reset,
                validity_date=None if life is None else self.now + life,
            ).id
        except (ChildKeyNotAllowed, errors.AuthenticationFailed, errors.Forbidden):
            return parent

    @rule(key=keys, disabled=st.sampled_from([True, False, False]))
    def set_disabled(self, key: int, disabled: bool) -> None:
        self.lg.set_disabled(key, disabled)

    @rule(
        key=keys,
        amount=st.integers(0, 2) | st.integers(0, 60_000),
        then=st.sampled_from(["settle", "release", "hold"]),
        cost=st.integers(0, 80_000),
        wait=waits,
    )
    def request(self, key: int, amount: int, then: str, cost: int, wait: int) -> None:
        self.now += wait
        expected = self.refusal(key, amount)
        try:
            r = self.lg.reserve(key, amount, request_id="p", ttl_s=60)
        except errors.ApiError as e:
            assert e.code == expected
            return
        assert expected is None
        if then == "settle":
            self.settled(self.lg.settle(r.id, cost), r.key_id)
        elif then == "release":
            self.settled(self.lg.release(r.id), r.key_id)
        else:
            self.held.append(r)

    @precondition(lambda self: len(self.held) > 0)
    @rule(cost=st.integers(0, 80_000), wait=waits)
    def settle_held(self, cost: int, wait: int) -> None:
        self.now += wait  # possibly in a later limit window than its reserve
        r = self.held.pop(0)
        self.settled(self.lg.settle(r.id, cost), r.key_id)

    def settled(self, s: ledger.Settlement, payer: int) -> None:
        acct = self.lg.get_account_by_id(payer)
        assert acct is not None and s.balance_msats == acct.balance_msats

    @invariant()
    def books_balance(self) -> None:
        self.lg.check_invariant()

    @invariant()
    def usage_and_limits_reconcile_with_the_log(self) -> None:
        keys = self.db.conn.execute(
            "SELECT id, created_at, usage_msats, limit_spent_msats, limit_window_start,"
            " balance_limit_reset FROM keys"
        ).fetchall()
        for key_id, created, usage, limit_spent, started, reset in keys:
            rows = self.db.conn.execute(  # what was charged for this key's own requests
                "SELECT time, amount_msats FROM txlog WHERE kind IN ('settle', 'charge')"
                " AND (child_id = ? OR (key_id = ? AND child_id IS NULL)) ORDER BY id",
                (key_id, key_id),
            ).fetchall()
            assert usage == sum(a for _, a in rows)
            if reset is None:
                assert (limit_spent, started) == (usage, None)
                continue
            # the window is the one of the last charge (the clock only moves forward here)
            last = rows[-1][0] if rows else created
            assert started == ledger.window_start(reset, last)
            assert limit_spent == sum(a for t, a in rows if t >= started)


TestPolicyMachine = PolicyMachine.TestCase
TestPolicyMachine.settings = settings(
    max_examples=100,
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
