"""The ledger: the only module that changes money. Amounts are integer millisatoshis (msats).

Accounts (table `keys`) are API keys (``api``), Cashu tokens used as a Bearer key (``token``),
single X-Cashu payments (``xcashu``) and child keys (``child``). Each holds

    balance   spendable money, NOT including reservations
    reserved  money held for requests in flight (= Σ of its live reservations)
    spent     money charged for requests and child-key fees
    refunded  money that left as refund tokens, X-Cashu change or Lightning payouts
    deposited money paid in (Cashu tokens, Lightning)
    granted   money an operator gave (admin grants), kept apart from deposits

Invariants — checked by `check_invariant` (tests run it after every step), and the first two
also enforced by CHECK constraints in the schema, so a buggy write aborts instead of committing:

 I1. per account, to the msat:  deposited + granted = balance + reserved + spent + refunded;
 I2. every money column is ≥ 0: a balance never goes negative, whatever the cost reported;
 I3. per account, reserved = Σ amount of the reservations held on it;
 I4. child keys hold no money (all money columns 0); their requests reserve and charge the
     parent, so I1–I3 hold for children trivially and for parents by construction;
 I5. the transaction log `txlog` is append-only (triggers abort UPDATE/DELETE) and reconciles
     with the accounts: per account, Σ deposit rows = deposited, Σ grant rows = granted,
     Σ settle + charge + child_key_fee rows = spent, Σ refund + payout + change rows
     − Σ reversal rows = refunded;
 I6. a reservation is consumed at most once: settle, release, expiry and orphan release each
     delete the row in the same transaction that moves its money; a second attempt finds
     nothing and raises `ReservationGone` — never a second charge or a second release. A
     reservation's id is the id of its ``reserve`` row in the log, so it is never reused (sqlite
     hands a plain table's deleted top id out again: a late settle of an expired reservation
     would consume a stranger's);
 I7. a deposit reference (`ref` of a ``deposit`` row: token, invoice) is credited at most once,
     and a refund reversal reference applied at most once (unique index; `DuplicateDeposit`).

How money moves (each op is one `txlog` row of the named kind, key_id = the paying account):

    create   +0 (account created; a 'deposit' / 'grant' row follows if it starts funded)
    deposit / grant        balance += a            deposited / granted += a
    reserve                balance -= a            reserved += a
    settle   held h, cost c:
               c <= h      reserved -= h, balance += h - c, spent += c
               c >  h      reserved -= h, extra = min(c - h, balance), balance -= extra,
                           spent += h + extra; c - h - extra is the *overdraft*: not charged,
                           recorded in the row's memo (the reservation holds the output in
                           full but the prompt at an estimate, so a longer prompt costs more;
                           the cost itself never exceeds the request's ceiling — proxy.Billing)
    release / expire / orphan   reserved -= h, balance += h
    charge   (no reservation; late settle after expiry)  like settle with h = 0
    refund / payout / change    balance -= a, refunded += a  (refused while requests are live)
    reversal               balance += a, refunded -= a  (the refund's token or payment never
                           left: the mint refused, the Lightning payment failed)
    child_key_fee          balance -= a, spent += a (on the parent)

Reservations carry an expiry (`ttl_s`) and the boot id of the process that made them. A hold
lives as long as its request: each process renews its requests in flight (`Ledger._live`) at
every sweep, so expiry only takes holds whose request is gone. Nothing survives a crash held:
`sweep_expired` releases what is past its expiry (run at start and periodically), and
`release_orphans` releases at start every reservation made by another boot — only valid when
this process is the only one using the database (single-process mode); with ``--workers N``
the supervisor releases a dead worker's holds, and expiry bounds what is left.

The per-request pair runs on every paid request, so it is kept to a few statements: `reserve`
holds a plain key's money (not a child, no balance limit) with one UPDATE whose WHERE clause is
the policy checks, and reads the key only when that UPDATE matches no row (a child key, a balance
limit, or to raise the precise refusal); `settle` reads the reservation and the payer's balance
and limit window, deletes the reservation and moves the money in one UPDATE of the payer.

Every operation is a plain ``def op(conn, ...)`` that expects to run inside a transaction opened
by `db.Database.transaction` (so another module, e.g. the wallet's proof store, can credit inside
its own transaction); `Ledger` wraps each op in its own transaction and picks the durability:
money entering or leaving the node commits with a full fsync, per-request operations do not
(see `db` for what a power cut can lose).
"""

from __future__ import annotations

import datetime as dt
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final, Literal, TypeVar

from . import errors, intents
from .db import Database
from .money import format_sats, sat_to_msat

T = TypeVar("T")
MAX_MSATS: Final = 21_000_000 * 100_000_000 * 1000  # every bitcoin there will ever be
ACCOUNT_KINDS: Final = ("api", "token", "xcashu", "child")
CREDIT_KINDS: Final = intents.CREDIT_KINDS  # one list each: what an intent may name
REFUND_KINDS: Final = intents.DEBIT_KINDS
REVERSAL_KIND: Final = "reversal"
CHARGE_KINDS: Final = ("settle", "charge", "child_key_fee")
LIMIT_RESETS: Final = ("daily", "weekly", "monthly")

AccountKind = Literal["api", "token", "xcashu", "child"]
CreditKind = Literal["deposit", "grant"]
RefundKind = Literal["refund", "payout", "change"]
LimitReset = Literal["daily", "weekly", "monthly"]


# --------------------------------------------------------------------------------------------
# Typed errors
# --------------------------------------------------------------------------------------------


class AccountExists(errors.Conflict):
    default_code = "account_exists"


class AccountNotFound(errors.NotFound):
    default_code = "key_not_found"


class ReservationGone(errors.Conflict):
    """The reservation was already settled, released, expired or orphan-released."""

    default_code = "reservation_gone"

    def __init__(self, reservation_id: int) -> None:
        super().__init__(
            f"reservation {reservation_id} no longer exists",
            details={"reservation_id": reservation_id},
        )
        self.reservation_id = reservation_id


class ChildKeyNotAllowed(errors.InvalidRequest):
    default_code = "child_key_not_allowed"


class DuplicateDeposit(errors.Conflict):
    """This deposit reference was credited (or this reversal applied) already."""

    default_code = "duplicate_deposit"


class LedgerInvariantError(RuntimeError):
    """The books do not balance. Never expected; raised by `check_invariant`."""


# --------------------------------------------------------------------------------------------
# Value types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    key_hash: str
    hint: str
    kind: str
    parent_id: int | None
    balance_msats: int
    reserved_msats: int
    spent_msats: int
    deposited_msats: int
    granted_msats: int
    refunded_msats: int
    usage_msats: int  # cost of requests made with this key (a child's are charged to its parent)
    total_requests: int
    tx_count: int
    created_at: int
    last_used_at: int | None
    disabled: bool
    balance_limit_msats: int | None
    balance_limit_reset: str | None
    limit_window_start: int | None
    limit_spent_msats: int
    validity_date: int | None
    refund_address: str | None
    refund_expiry: int | None
    refund_mint: str | None
    refund_unit: str | None

    @property
    def is_child(self) -> bool:
        return self.parent_id is not None

    @property
    def paying_id(self) -> int:
        """The account whose balance this key spends (its parent for a child key)."""
        return self.parent_id if self.parent_id is not None else self.id


@dataclass(frozen=True, slots=True)
class Reservation:
    id: int
    key_id: int
    child_id: int | None
    amount_msats: int
    request_id: str
    owner: str
    created_at: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class Settlement:
    reservation_id: int | None
    charged_msats: int
    released_msats: int
    overdraft_msats: int
    balance_msats: int  # the paying account's spendable balance afterwards


@dataclass(frozen=True, slots=True)
class TxRow:
    id: int
    time: int
    kind: str
    key_id: int
    child_id: int | None
    amount_msats: int
    request_id: str | None
    ref: str | None
    memo: str


# SQL built only from these constant column lists (never from input), hence the noqa.
_ACCOUNT_COLUMNS: Final = ", ".join(f.name for f in fields(Account))
_SELECT_ACCOUNT: Final = f"SELECT {_ACCOUNT_COLUMNS} FROM keys"  # noqa: S608
_SELECT_RESERVATION: Final = (
    f"SELECT {', '.join(f.name for f in fields(Reservation))} FROM reservations"  # noqa: S608
)
_SELECT_TX: Final = f"SELECT {', '.join(f.name for f in fields(TxRow))} FROM txlog"  # noqa: S608


_DISABLED: Final = [f.name for f in fields(Account)].index("disabled")


def _account(row: Sequence[Any]) -> Account:
    values = list(row)
    values[_DISABLED] = bool(values[_DISABLED])
    return Account(*values)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _amount(value: int, what: str = "amount_msats") -> int:
    if type(value) is not int:  # bool is an int too; floats never carry money
        raise TypeError(f"{what} must be an int (msats), got {type(value).__name__}")
    if not 0 <= value <= MAX_MSATS:
        raise ValueError(f"{what} out of range: {value}")
    return value


def _overflow_cut(cost_msats: int) -> int:
    """A cost above every bitcoin (a huge price × a lying upstream's usage) is charged as
    MAX_MSATS: what is charged is bounded by the balance anyway, and the overdraft is logged."""
    return min(cost_msats, MAX_MSATS) if type(cost_msats) is int else cost_msats


def _key_hash(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("key_hash must be 64 lowercase hex characters (sha256)")
    return value


def window_start(reset: str | None, now: int) -> int | None:
    """Start (unix, UTC) of the daily / weekly (ISO, Monday) / monthly window containing `now`."""
    if reset is None:
        return None
    day = dt.datetime.fromtimestamp(now, dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if reset == "daily":
        start = day
    elif reset == "weekly":
        start = day - dt.timedelta(days=day.weekday())
    elif reset == "monthly":
        start = day.replace(day=1)
    else:
        raise ValueError(f"balance_limit_reset must be one of {LIMIT_RESETS}")
    return int(start.timestamp())


def _limit_window(
    reset: str | None, started: int | None, spent: int, now: int
) -> tuple[int, int | None]:
    """(spent in the limit window containing `now`, that window's start) for an account whose
    window began at `started` with `spent` counted in it; once that window has ended, a new one
    starts counting from zero."""
    start = window_start(reset, now)
    if start is None:
        return spent, started
    if started is None or started < start:
        return 0, start
    return spent, started


def _limit_spent_now(acct: Account, now: int) -> tuple[int, int | None]:
    """(spent in the current limit window, that window's start)."""
    return _limit_window(
        acct.balance_limit_reset, acct.limit_window_start, acct.limit_spent_msats, now
    )


def _log(
    conn: sqlite3.Connection,
    kind: str,
    key_id: int,
    amount_msats: int,
    *,
    now: int,
    child_id: int | None = None,
    request_id: str | None = None,
    ref: str | None = None,
    memo: str = "",
) -> int:
    """Append one row to the log; its id."""
    cur = conn.execute(
        "INSERT INTO txlog (time, kind, key_id, child_id, amount_msats, request_id, ref, memo)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (now, kind, key_id, child_id, amount_msats, request_id, ref, memo),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def _log_for(conn: sqlite3.Connection, acct: Account, kind: str, amount: int, **kw: Any) -> None:
    """Log against the paying account, naming the child key when `acct` is one."""
    _log(conn, kind, acct.paying_id, amount, child_id=acct.id if acct.is_child else None, **kw)


def _require(conn: sqlite3.Connection, account_id: int) -> Account:
    acct = get_account_by_id(conn, account_id)
    if acct is None:
        raise AccountNotFound(f"Key not found (account {account_id})")
    return acct


def _check_usable(acct: Account, now: int) -> None:
    if acct.disabled:
        raise errors.AuthenticationFailed("This API key is disabled.", code="key_disabled")
    if acct.validity_date is not None and now >= acct.validity_date:
        raise errors.Forbidden(
            "This API key has expired.",
            code="key_expired",
            details={"validity_date": acct.validity_date},
        )


def _insufficient(required: int, available: int) -> errors.InsufficientBalance:
    return errors.InsufficientBalance(
        f"Insufficient balance: {format_sats(required)} sats ({required} msats) required;"
        f" {format_sats(available)} sats ({available} msats) available.",
        code="insufficient_balance",
        details={"required": required, "available": available},
    )


def _get_reservation(conn: sqlite3.Connection, reservation_id: int) -> Reservation | None:
    row = conn.execute(_SELECT_RESERVATION + " WHERE id = ?", (reservation_id,)).fetchone()
    return Reservation(*row) if row else None


# --------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------


def get_account(conn: sqlite3.Connection, key_hash: str) -> Account | None:
    row = conn.execute(
        _SELECT_ACCOUNT + " WHERE key_hash = ?",
        (key_hash,),
    ).fetchone()
    return _account(row) if row else None


def get_account_by_id(conn: sqlite3.Connection, account_id: int) -> Account | None:
    row = conn.execute(
        _SELECT_ACCOUNT + " WHERE id = ?",
        (account_id,),
    ).fetchone()
    return _account(row) if row else None


def deposit_of(conn: sqlite3.Connection, ref: str) -> tuple[int, int] | None:
    """(account id, msats) of the deposit made under `ref`, if any (each ref credits once)."""
    row = conn.execute(
        "SELECT key_id, amount_msats FROM txlog WHERE kind = 'deposit' AND ref = ?", (ref,)
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def get_reservation(conn: sqlite3.Connection, reservation_id: int) -> Reservation | None:
    return _get_reservation(conn, reservation_id)


def children(conn: sqlite3.Connection, parent_id: int) -> list[Account]:
    rows = conn.execute(
        _SELECT_ACCOUNT + " WHERE parent_id = ? ORDER BY id",
        (parent_id,),
    ).fetchall()
    return [_account(r) for r in rows]


def reserved_by(conn: sqlite3.Connection, acct: Account) -> int:
    """msats held for requests made with this key itself (a child's, or a parent's own)."""
    if acct.is_child:
        sql = "SELECT COALESCE(SUM(amount_msats), 0) FROM reservations WHERE child_id = ?"
    else:
        sql = (
            "SELECT COALESCE(SUM(amount_msats), 0) FROM reservations"
            " WHERE key_id = ? AND child_id IS NULL"
        )
    return int(conn.execute(sql, (acct.id,)).fetchone()[0])


def transactions(
    conn: sqlite3.Connection, account_id: int, *, limit: int = 50, offset: int = 0
) -> tuple[list[TxRow], int]:
    """A page of the account's log, newest first, and the account's total row count.

    Served from the (key_id, id DESC) index — or (child_id, id DESC) for a child key — and the
    per-key counter kept by a trigger, so the cost is O(offset + limit), whatever the history.
    A parent's history includes its children's activity (it is the parent's money).
    """
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must be >= 0")
    acct = _require(conn, account_id)
    column = "child_id" if acct.is_child else "key_id"
    rows = conn.execute(
        _SELECT_TX + f" WHERE {column} = ? ORDER BY id DESC LIMIT ? OFFSET ?",
        (account_id, limit, offset),
    ).fetchall()
    return [TxRow(*r) for r in rows], acct.tx_count


# --------------------------------------------------------------------------------------------
# Operations (each runs inside the caller's transaction)
# --------------------------------------------------------------------------------------------


def create_account(
    conn: sqlite3.Connection,
    *,
    key_hash: str,
    kind: AccountKind | str,
    deposit_msats: int = 0,
    source_kind: CreditKind | str = "deposit",
    ref: str | None = None,
    parent_id: int | None = None,
    balance_limit_msats: int | None = None,
    balance_limit_reset: LimitReset | str | None = None,
    validity_date: int | None = None,
    refund_address: str | None = None,
    refund_mint: str | None = None,
    refund_unit: str | None = None,
    hint: str = "",
    now: int,
) -> Account:
    """Create an account, optionally funded. Duplicate `key_hash` → `AccountExists`.

    A child (``kind='child'``) needs `parent_id` and cannot be funded; `create_child` is the
    operation that also charges the parent's fee.
    """
    _key_hash(key_hash)
    _amount(deposit_msats, "deposit_msats")
    if kind not in ACCOUNT_KINDS:
        raise ValueError(f"kind must be one of {ACCOUNT_KINDS}")
    if source_kind not in CREDIT_KINDS:
        raise ValueError(f"source_kind must be one of {CREDIT_KINDS}")
    if balance_limit_msats is not None:
        _amount(balance_limit_msats, "balance_limit_msats")
    if balance_limit_reset is not None and balance_limit_reset not in LIMIT_RESETS:
        raise ValueError(f"balance_limit_reset must be one of {LIMIT_RESETS}")
    if len(hint) > 4:
        raise ValueError("hint is at most the last 4 characters of the key")
    parent: Account | None = None
    if kind == "child":
        if parent_id is None:
            raise ValueError("a child key needs parent_id")
        if deposit_msats:
            raise ChildKeyNotAllowed("Child keys spend their parent's balance; fund the parent.")
        parent = _require(conn, parent_id)
        if parent.is_child:
            raise ChildKeyNotAllowed("Child keys cannot create child keys.")
    elif parent_id is not None:
        raise ValueError("only child keys have a parent")
    if get_account(conn, key_hash) is not None:
        raise AccountExists("An account with this key already exists.")
    cur = conn.execute(
        "INSERT INTO keys (key_hash, hint, kind, parent_id, created_at, balance_limit_msats,"
        " balance_limit_reset, limit_window_start, validity_date, refund_address, refund_mint,"
        " refund_unit) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            key_hash,
            hint,
            kind,
            parent_id,
            now,
            balance_limit_msats,
            balance_limit_reset,
            window_start(balance_limit_reset, now),
            validity_date,
            refund_address,
            refund_mint,
            refund_unit,
        ),
    )
    account_id = cur.lastrowid
    assert account_id is not None
    acct = _require(conn, account_id)
    _log_for(conn, acct, "create", 0, now=now, memo=kind)
    if deposit_msats:
        return credit(conn, account_id, deposit_msats, kind=source_kind, ref=ref, now=now)
    return acct


def credit(
    conn: sqlite3.Connection,
    account_id: int,
    amount_msats: int,
    *,
    kind: CreditKind | str = "deposit",
    ref: str | None = None,
    now: int,
    memo: str = "",
) -> Account:
    """Add money (a top-up or an admin grant). Crediting a child key credits its parent.

    Returns the account that received the money. A `ref` already credited as a deposit →
    `DuplicateDeposit`. A `ref` is stored in clear: never key material — in particular not
    ``sha256(token)``, which is a Cashu token's API key (use `keys.token_deposit_ref`).
    """
    _amount(amount_msats)
    if amount_msats == 0:
        raise ValueError("nothing to credit")
    if kind not in CREDIT_KINDS:
        raise ValueError(f"credit kind must be one of {CREDIT_KINDS}")
    acct = _require(conn, account_id)
    if kind == "deposit" and ref is not None:
        seen = conn.execute(
            "SELECT 1 FROM txlog WHERE kind = 'deposit' AND ref = ?", (ref,)
        ).fetchone()
        if seen:
            raise DuplicateDeposit("This payment was already credited.")
    deposit, grant = (amount_msats, 0) if kind == "deposit" else (0, amount_msats)
    conn.execute(
        "UPDATE keys SET balance_msats = balance_msats + ?, deposited_msats = deposited_msats + ?,"
        " granted_msats = granted_msats + ? WHERE id = ?",
        (amount_msats, deposit, grant, acct.paying_id),
    )
    _log_for(conn, acct, kind, amount_msats, now=now, ref=ref, memo=memo)
    return _require(conn, acct.paying_id)


def reserve(
    conn: sqlite3.Connection,
    account_id: int,
    amount_msats: int,
    *,
    request_id: str,
    ttl_s: int,
    now: int,
    owner: str = "",
) -> Reservation:
    """Atomically check the key's policy and hold `amount_msats` of the paying balance.

    Checks, in order: key (and parent) disabled → 401 ``key_disabled``; past `validity_date` →
    403 ``key_expired``; the requesting key's `balance_limit` (spent in the current window +
    reserved by this key + amount > limit) → 402 ``balance_limit_exceeded``; spendable balance
    short → 402 ``insufficient_balance`` with details {required, available}.

    The common case — a key that is not a child and has no balance limit — is one conditional
    UPDATE whose WHERE clause is exactly those checks; when it changes no row (a check fails,
    no such key, a child key, a balance limit), `_hold_checked` reads the key, raises the precise
    error or holds the money. An amount above MAX_MSATS — no balance can ever hold it — is 402
    like any other shortfall (it never reaches sqlite's 64-bit INTEGER).
    """
    if type(amount_msats) is int and amount_msats > MAX_MSATS:
        raise _insufficient(amount_msats, _require(conn, account_id).balance_msats)
    _amount(amount_msats)
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    # `_hold_checked`'s checks for a plain key, in SQL (usable while now < validity_date).
    held = conn.execute(
        "UPDATE keys SET balance_msats = balance_msats - ?, reserved_msats = reserved_msats + ?,"
        " total_requests = total_requests + 1, last_used_at = ?"
        " WHERE id = ? AND parent_id IS NULL AND balance_limit_msats IS NULL AND disabled = 0"
        " AND (validity_date IS NULL OR validity_date > ?) AND balance_msats >= ?",
        (amount_msats, amount_msats, now, account_id, now, amount_msats),
    )
    if held.rowcount == 1:
        payer_id, child_id = account_id, None
    else:
        payer_id, child_id = _hold_checked(conn, account_id, amount_msats, now=now)
    # the log row's id is the reservation's: unique for ever (the log never loses a row)
    rid = _log(conn, "reserve", payer_id, amount_msats, child_id=child_id,
               request_id=request_id, now=now)
    conn.execute(
        "INSERT INTO reservations (id, key_id, child_id, amount_msats, request_id, owner,"
        " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (rid, payer_id, child_id, amount_msats, request_id, owner, now, now + ttl_s),
    )
    return Reservation(rid, payer_id, child_id, amount_msats, request_id, owner, now, now + ttl_s)


def _hold_checked(
    conn: sqlite3.Connection, account_id: int, amount_msats: int, *, now: int
) -> tuple[int, int | None]:
    """`reserve`'s checks one by one (see there), then the hold: (paying id, child id or None)."""
    key = _require(conn, account_id)
    payer = _require(conn, key.parent_id) if key.parent_id is not None else key
    _check_usable(key, now)
    if payer is not key:
        _check_usable(payer, now)
    if key.balance_limit_msats is not None:
        spent, _ = _limit_spent_now(key, now)
        held = reserved_by(conn, key)
        if spent + held + amount_msats > key.balance_limit_msats:
            raise errors.InsufficientBalance(
                f"Balance limit exceeded: {key.balance_limit_msats} msats limit;"
                f" {spent} msats spent and {held} msats reserved in this period,"
                f" {amount_msats} msats required.",
                code="balance_limit_exceeded",
                details={
                    "balance_limit": key.balance_limit_msats,
                    "spent": spent,
                    "reserved": held,
                    "required": amount_msats,
                },
            )
    if payer.balance_msats < amount_msats:
        raise _insufficient(amount_msats, payer.balance_msats)
    conn.execute(
        "UPDATE keys SET balance_msats = balance_msats - ?, reserved_msats = reserved_msats + ?,"
        " total_requests = total_requests + 1, last_used_at = ? WHERE id = ?",
        (amount_msats, amount_msats, now, payer.id),
    )
    child_id = key.id if key.is_child else None
    if child_id is not None:
        conn.execute(
            "UPDATE keys SET total_requests = total_requests + 1, last_used_at = ? WHERE id = ?",
            (now, child_id),
        )
    return payer.id, child_id


def _charge(
    conn: sqlite3.Connection,
    payer_id: int,
    requester_id: int,
    held: int,
    cost: int,
    *,
    now: int,
) -> tuple[int, int, int, int]:
    """Consume `held` reserved msats of `payer_id` for a request costing `cost` made with key
    `requester_id`: (charged, released, overdraft, the payer's balance afterwards).

    The excess over `held` is taken from the spendable balance, down to zero and no further.
    The requester's usage and limit-window spending grow by the charge — in the payer's own
    UPDATE when the requester is the payer, else in a second UPDATE on the child key.
    """
    row = conn.execute(
        "SELECT balance_msats, balance_limit_reset, limit_window_start, limit_spent_msats"
        " FROM keys WHERE id = ?",
        (payer_id,),
    ).fetchone()
    if row is None:
        raise AccountNotFound(f"Key not found (account {payer_id})")
    balance, reset, started, limit_spent = row
    if cost <= held:
        charged, released, extra = cost, held - cost, 0
    else:
        extra = min(cost - held, balance)
        charged, released = held + extra, 0
    if requester_id == payer_id:
        spent, start = _limit_window(reset, started, limit_spent, now)
        conn.execute(
            "UPDATE keys SET reserved_msats = reserved_msats - ?,"
            " balance_msats = balance_msats + ? - ?, spent_msats = spent_msats + ?,"
            " usage_msats = usage_msats + ?, limit_spent_msats = ?, limit_window_start = ?"
            " WHERE id = ?",
            (held, released, extra, charged, charged, spent + charged, start, payer_id),
        )
    else:
        conn.execute(
            "UPDATE keys SET reserved_msats = reserved_msats - ?,"
            " balance_msats = balance_msats + ? - ?, spent_msats = spent_msats + ? WHERE id = ?",
            (held, released, extra, charged, payer_id),
        )
        requester = _require(conn, requester_id)
        spent, start = _limit_spent_now(requester, now)
        conn.execute(
            "UPDATE keys SET usage_msats = usage_msats + ?, limit_spent_msats = ?,"
            " limit_window_start = ? WHERE id = ?",
            (charged, spent + charged, start, requester_id),
        )
    return charged, released, cost - charged, balance + released - extra


def settle(
    conn: sqlite3.Connection, reservation_id: int, cost_msats: int, *, now: int
) -> Settlement:
    """Charge the request's actual cost and release the rest of its reservation.

    A cost above the reservation is charged from the spendable balance down to zero; what cannot
    be charged is returned as `overdraft_msats` and written in the log row's memo. A reservation
    that no longer exists → `ReservationGone` (nothing charged). A cost above MAX_MSATS counts
    as MAX_MSATS (`_overflow_cut`).
    """
    cost_msats = _amount(_overflow_cut(cost_msats), "cost_msats")
    row = conn.execute(
        "SELECT key_id, child_id, amount_msats, request_id FROM reservations WHERE id = ?",
        (reservation_id,),
    ).fetchone()
    if row is None:
        raise ReservationGone(reservation_id)
    payer_id, child_id, held, request_id = row
    conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))
    requester_id = payer_id if child_id is None else child_id
    charged, released, overdraft, balance = _charge(
        conn, payer_id, requester_id, held, cost_msats, now=now
    )
    memo = f"cost={cost_msats} held={held} released={released}"
    if overdraft:
        memo += f" overdraft={overdraft}"
    _log(
        conn,
        "settle",
        payer_id,
        charged,
        child_id=child_id,
        request_id=request_id,
        now=now,
        memo=memo,
    )
    return Settlement(reservation_id, charged, released, overdraft, balance)


def charge(
    conn: sqlite3.Connection,
    account_id: int,
    cost_msats: int,
    *,
    request_id: str,
    now: int,
) -> Settlement:
    """Charge a cost with no reservation (e.g. after `settle` raised `ReservationGone` because a
    request outlived its reservation): from the spendable balance, down to zero, never below.
    """
    cost_msats = _amount(_overflow_cut(cost_msats), "cost_msats")
    key = _require(conn, account_id)
    charged, _, overdraft, balance = _charge(conn, key.paying_id, key.id, 0, cost_msats, now=now)
    memo = f"cost={cost_msats} held=0" + (f" overdraft={overdraft}" if overdraft else "")
    _log_for(conn, key, "charge", charged, request_id=request_id, now=now, memo=memo)
    return Settlement(None, charged, 0, overdraft, balance)


def _release_row(conn: sqlite3.Connection, r: Reservation, kind: str, now: int, memo: str) -> None:
    conn.execute("DELETE FROM reservations WHERE id = ?", (r.id,))
    conn.execute(
        "UPDATE keys SET reserved_msats = reserved_msats - ?, balance_msats = balance_msats + ?"
        " WHERE id = ?",
        (r.amount_msats, r.amount_msats, r.key_id),
    )
    _log(
        conn,
        kind,
        r.key_id,
        r.amount_msats,
        child_id=r.child_id,
        request_id=r.request_id,
        now=now,
        memo=memo,
    )


def release(conn: sqlite3.Connection, reservation_id: int, *, now: int) -> Settlement:
    """Return a reservation to the balance, charging nothing. Gone already → `ReservationGone`."""
    r = _get_reservation(conn, reservation_id)
    if r is None:
        raise ReservationGone(reservation_id)
    _release_row(conn, r, "release", now, "")
    balance = conn.execute("SELECT balance_msats FROM keys WHERE id = ?", (r.key_id,)).fetchone()
    return Settlement(r.id, 0, r.amount_msats, 0, int(balance[0]))


def _release_where(
    conn: sqlite3.Connection, where: str, params: tuple[Any, ...], kind: str, now: int, memo: str
) -> int:
    rows = conn.execute(
        _SELECT_RESERVATION + f" WHERE {where} ORDER BY id",
        params,
    ).fetchall()
    for row in rows:
        _release_row(conn, Reservation(*row), kind, now, memo)
    return len(rows)


def renew_live(conn: sqlite3.Connection, live: dict[int, int], *, now: int) -> None:
    """Push the expiry of the reservations of requests still in flight (`live`: id → ttl_s) to
    ``now + ttl_s``: a hold lives as long as its request, however long that takes."""
    conn.executemany(
        "UPDATE reservations SET expires_at = MAX(expires_at, ?) WHERE id = ?",
        [(now + ttl, rid) for rid, ttl in live.items()],
    )


def sweep_expired(conn: sqlite3.Connection, now: int, live: dict[int, int] | None = None) -> int:
    """Release every reservation whose expiry has passed (log kind 'expire'); the count.

    `live` (this process's requests in flight) are renewed first, in the same transaction, so
    expiry only ever takes the holds of requests that are gone (a crash, a dead worker) — and
    the same holds for another process's sweep as long as each renews more often than its ttl.
    """
    if live:
        renew_live(conn, live, now=now)
    return _release_where(conn, "expires_at <= ?", (now,), "expire", now, "expired")


def release_orphans(conn: sqlite3.Connection, *, owner: str, now: int) -> int:
    """Release every reservation made by a boot other than `owner` (log kind 'orphan').

    Call at start only when this process is the database's sole user (single-process mode):
    then any other boot's reservation belongs to a process that is gone.
    """
    return _release_where(conn, "owner != ?", (owner,), "orphan", now, "left by a previous run")


def release_owner(conn: sqlite3.Connection, *, owner: str, now: int) -> int:
    """Release every reservation held by boot `owner` — a `--workers` process that died (its
    supervisor knows it is gone, so its requests can never settle)."""
    return _release_where(conn, "owner = ?", (owner,), "orphan", now, "its worker died")


def refund(
    conn: sqlite3.Connection,
    account_id: int,
    amount_msats: int,
    *,
    kind: RefundKind | str = "refund",
    ref: str | None = None,
    now: int,
    memo: str = "",
) -> Account:
    """Take money out of an account (refund token, X-Cashu change, Lightning payout).

    Refused for child keys, while the account has requests in flight (expired reservations are
    swept first), when the balance is zero ("No balance to refund") and for more than the
    spendable balance. The caller hands the money out only after this commits.
    """
    _amount(amount_msats)
    if kind not in REFUND_KINDS:
        raise ValueError(f"refund kind must be one of {REFUND_KINDS}")
    acct = _require(conn, account_id)
    if acct.is_child:
        raise ChildKeyNotAllowed("Child keys cannot be refunded; refund the parent key.")
    _release_where(conn, "key_id = ? AND expires_at <= ?", (acct.id, now), "expire", now, "expired")
    live = conn.execute(
        "SELECT 1 FROM reservations WHERE key_id = ? LIMIT 1", (acct.id,)
    ).fetchone()
    if live:
        raise errors.InvalidRequest(
            "Cannot refund key. There are ongoing requests for this api key.",
            code="ongoing_requests",
        )
    acct = _require(conn, account_id)
    if acct.balance_msats == 0:
        raise errors.InvalidRequest("No balance to refund", code="no_balance_to_refund")
    if amount_msats == 0:
        raise ValueError("nothing to refund")
    if amount_msats > acct.balance_msats:
        raise _insufficient(amount_msats, acct.balance_msats)
    conn.execute(
        "UPDATE keys SET balance_msats = balance_msats - ?,"
        " refunded_msats = refunded_msats + ? WHERE id = ?",
        (amount_msats, amount_msats, acct.id),
    )
    _log(conn, kind, acct.id, amount_msats, ref=ref, now=now, memo=memo)
    return _require(conn, acct.id)


def reverse_refund(
    conn: sqlite3.Connection,
    account_id: int,
    amount_msats: int,
    *,
    ref: str | None = None,
    now: int,
    memo: str = "",
) -> Account:
    """Undo (part of) a refund whose money never left — the mint refused the send, the Lightning
    payment failed: balance += amount, refunded -= amount. At most the refunded total; a `ref`
    is applied once (`DuplicateDeposit` on a repeat), so a retried reversal cannot mint money.
    """
    _amount(amount_msats)
    if amount_msats == 0:
        raise ValueError("nothing to reverse")
    acct = _require(conn, account_id)
    if acct.is_child:
        raise ChildKeyNotAllowed("Child keys are never refunded.")
    if amount_msats > acct.refunded_msats:
        raise ValueError(
            f"cannot reverse {amount_msats} msats: only {acct.refunded_msats} were refunded"
        )
    if ref is not None:
        seen = conn.execute(
            "SELECT 1 FROM txlog WHERE kind = 'reversal' AND ref = ?", (ref,)
        ).fetchone()
        if seen:
            raise DuplicateDeposit("This refund was already reversed.")
    conn.execute(
        "UPDATE keys SET balance_msats = balance_msats + ?,"
        " refunded_msats = refunded_msats - ? WHERE id = ?",
        (amount_msats, amount_msats, acct.id),
    )
    _log(conn, REVERSAL_KIND, acct.id, amount_msats, ref=ref, now=now, memo=memo)
    return _require(conn, acct.id)


def create_child(
    conn: sqlite3.Connection,
    parent_id: int,
    key_hash: str,
    *,
    balance_limit_msats: int | None = None,
    balance_limit_reset: LimitReset | str | None = None,
    validity_date: int | None = None,
    cost_msats: int = 0,
    hint: str = "",
    now: int,
) -> Account:
    """Create a child key that spends `parent_id`'s balance; charge the parent `cost_msats`."""
    _amount(cost_msats, "cost_msats")
    parent = _require(conn, parent_id)
    if parent.is_child:
        raise ChildKeyNotAllowed("Child keys cannot create child keys.")
    _check_usable(parent, now)
    if parent.balance_msats < cost_msats:
        raise _insufficient(cost_msats, parent.balance_msats)
    child = create_account(
        conn,
        key_hash=key_hash,
        kind="child",
        parent_id=parent.id,
        balance_limit_msats=balance_limit_msats,
        balance_limit_reset=balance_limit_reset,
        validity_date=validity_date,
        hint=hint,
        now=now,
    )
    if cost_msats:
        conn.execute(
            "UPDATE keys SET balance_msats = balance_msats - ?, spent_msats = spent_msats + ?"
            " WHERE id = ?",
            (cost_msats, cost_msats, parent.id),
        )
        _log(conn, "child_key_fee", parent.id, cost_msats, child_id=child.id, now=now)
    return child


def reset_child(conn: sqlite3.Connection, parent_id: int, child_id: int, *, now: int) -> Account:
    """Zero a child's spending towards its balance limit (routstr-core's child-key/reset)."""
    child = get_account_by_id(conn, child_id)
    if child is None or not child.is_child:
        raise errors.NotFound("Child key not found.", code="key_not_found")
    if child.parent_id != parent_id:
        raise errors.Forbidden("You are not the parent of this key.", code="not_parent")
    conn.execute(
        "UPDATE keys SET limit_spent_msats = 0, limit_window_start = ? WHERE id = ?",
        (now if child.balance_limit_reset else None, child.id),
    )
    _log_for(conn, child, "child_reset", 0, now=now)
    return _require(conn, child.id)


def set_disabled(
    conn: sqlite3.Connection, account_id: int, disabled: bool, *, now: int, memo: str = ""
) -> Account:
    acct = _require(conn, account_id)
    conn.execute("UPDATE keys SET disabled = ? WHERE id = ?", (int(disabled), acct.id))
    _log_for(conn, acct, "disable" if disabled else "enable", 0, now=now, memo=memo)
    return _require(conn, acct.id)


def set_refund_address(
    conn: sqlite3.Connection,
    account_id: int,
    *,
    refund_address: str | None,
    refund_expiry: int | None = None,
    now: int,
) -> Account:
    """Store the Lightning address refunds of this key go to (request header Refund-LNURL) and
    the Key-Expiry-Time sent with it. Moves no money; logged as 'policy'."""
    acct = _require(conn, account_id)
    if (acct.refund_address, acct.refund_expiry) == (refund_address, refund_expiry):
        return acct
    conn.execute(
        "UPDATE keys SET refund_address = ?, refund_expiry = ? WHERE id = ?",
        (refund_address, refund_expiry, acct.id),
    )
    _log_for(conn, acct, "policy", 0, now=now, memo="refund address set")
    return _require(conn, acct.id)


# --------------------------------------------------------------------------------------------
# Totals and invariant
# --------------------------------------------------------------------------------------------

_MONEY = ("deposited", "granted", "balance", "reserved", "spent", "refunded")


def totals(conn: sqlite3.Connection) -> dict[str, int]:
    """Sums over all accounts, live reservations, and what the node owes its users."""
    sums = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(deposited_msats), 0), COALESCE(SUM(granted_msats), 0),"
        " COALESCE(SUM(balance_msats), 0), COALESCE(SUM(reserved_msats), 0),"
        " COALESCE(SUM(spent_msats), 0), COALESCE(SUM(refunded_msats), 0) FROM keys"
    ).fetchone()
    live = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(amount_msats), 0) FROM reservations"
    ).fetchone()
    out = {"accounts": int(sums[0])}
    out.update({f"{m}_msats": int(v) for m, v in zip(_MONEY, sums[1:], strict=True)})
    out["reservations"] = int(live[0])
    out["reservations_msats"] = int(live[1])
    out["liability_msats"] = out["balance_msats"] + out["reserved_msats"]
    return out


def _violations(conn: sqlite3.Connection, sql: str, what: str) -> list[str]:
    return [f"{what}: {tuple(row)}" for row in conn.execute(sql).fetchall()[:20]]


def check_invariant(conn: sqlite3.Connection) -> dict[str, int]:
    """Verify I1–I5 over every account and in total; raise `LedgerInvariantError` listing the
    violations. Returns `totals(conn)`. A full scan: for tests and the admin page, not per request.
    """
    problems: list[str] = []
    problems += _violations(
        conn,
        "SELECT id FROM keys WHERE MIN(balance_msats, reserved_msats, spent_msats,"
        " deposited_msats, granted_msats, refunded_msats, usage_msats, limit_spent_msats) < 0",
        "negative column",
    )
    problems += _violations(
        conn,
        "SELECT id, deposited_msats + granted_msats,"
        " balance_msats + reserved_msats + spent_msats + refunded_msats FROM keys"
        " WHERE deposited_msats + granted_msats"
        " != balance_msats + reserved_msats + spent_msats + refunded_msats",
        "conservation (id, in, out)",
    )
    problems += _violations(
        conn,
        "SELECT k.id, k.reserved_msats, COALESCE(SUM(r.amount_msats), 0) FROM keys k"
        " LEFT JOIN reservations r ON r.key_id = k.id GROUP BY k.id"
        " HAVING k.reserved_msats != COALESCE(SUM(r.amount_msats), 0)",
        "reserved != live reservations (id, column, sum)",
    )
    problems += _violations(
        conn,
        "SELECT c.id FROM keys c LEFT JOIN keys p ON p.id = c.parent_id WHERE c.kind = 'child'"
        " AND (p.id IS NULL OR p.kind = 'child' OR c.balance_msats + c.reserved_msats"
        " + c.spent_msats + c.deposited_msats + c.granted_msats + c.refunded_msats != 0)",
        "child key holding money or without a proper parent",
    )
    problems += _violations(
        conn,
        "SELECT r.id FROM reservations r JOIN keys k ON k.id = r.key_id WHERE k.kind = 'child'"
        " OR (r.child_id IS NOT NULL AND r.child_id NOT IN"
        " (SELECT id FROM keys WHERE parent_id = r.key_id))",
        "reservation held on a child / for a foreign child",
    )

    problems += _violations(
        conn,
        "SELECT k.id, k.deposited_msats, k.granted_msats, k.spent_msats, k.refunded_msats,"
        " COALESCE(t.dep, 0), COALESCE(t.gra, 0), COALESCE(t.spe, 0), COALESCE(t.ref, 0)"
        " FROM keys k LEFT JOIN (SELECT key_id,"
        " SUM(CASE WHEN kind = 'deposit' THEN amount_msats ELSE 0 END) AS dep,"
        " SUM(CASE WHEN kind = 'grant' THEN amount_msats ELSE 0 END) AS gra,"
        # CHARGE_KINDS, then REFUND_KINDS less REVERSAL_KIND
        " SUM(CASE WHEN kind IN ('settle', 'charge', 'child_key_fee') THEN amount_msats"
        " ELSE 0 END) AS spe,"
        " SUM(CASE WHEN kind IN ('refund', 'payout', 'change') THEN amount_msats"
        " WHEN kind = 'reversal' THEN -amount_msats ELSE 0 END) AS ref"
        " FROM txlog GROUP BY key_id) t ON t.key_id = k.id"
        " WHERE k.deposited_msats != COALESCE(t.dep, 0) OR k.granted_msats != COALESCE(t.gra, 0)"
        " OR k.spent_msats != COALESCE(t.spe, 0) OR k.refunded_msats != COALESCE(t.ref, 0)",
        "txlog does not reconcile (id, columns…, log sums…)",
    )
    t = totals(conn)
    if t["deposited_msats"] + t["granted_msats"] != (
        t["balance_msats"] + t["reserved_msats"] + t["spent_msats"] + t["refunded_msats"]
    ):
        problems.append(f"total conservation: {t}")
    if t["reserved_msats"] != t["reservations_msats"]:
        problems.append(f"total reserved != live reservations: {t}")
    if problems:
        raise LedgerInvariantError("; ".join(problems))
    return t


# --------------------------------------------------------------------------------------------
# Ledger: each operation in its own transaction
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Wallet intents (routstr.intents): applied here, in the wallet store's transaction
# --------------------------------------------------------------------------------------------


def is_deleted(conn: sqlite3.Connection, account_id: int) -> bool:
    """Deleted by the operator: its hash replaced, it can never authenticate again."""
    return conn.execute(
        "SELECT 1 FROM admin_deleted_keys WHERE key_id = ?", (account_id,)
    ).fetchone() is not None


def _require_creditable(conn: sqlite3.Connection, account_id: int) -> None:
    """A wallet credit lands only on a key its owner can use: not deleted, not disabled (nor
    its parent)."""
    acct = get_account_by_id(conn, account_id)
    if acct is None or is_deleted(conn, acct.paying_id):
        raise AccountNotFound(f"Key not found (account {account_id})")
    paying = get_account_by_id(conn, acct.paying_id) or acct
    if acct.disabled or paying.disabled:
        raise errors.AuthenticationFailed("This API key is disabled.", code="key_disabled")


def apply_intent(conn: sqlite3.Connection, intent: intents.Intent | None,
                 ev: intents.WalletEvent) -> None:
    """What a wallet operation does to a balance (see `routstr.intents`). A credit applies on
    finish and is never rolled back; a debit applies on begin and is reversed (once, by its
    unique ``wallet-reversal:<op>`` ref) when the operation is rolled back."""
    if intent is None:
        return  # the node's own money
    ref = intent.ref or ev.ref or f"wallet-op:{ev.op_id}"
    memo = intent.memo if intent.memo is not None else f"wallet {ev.op_kind} #{ev.op_id}"
    if isinstance(intent, intents.Debit):
        _apply_debit(conn, intent, ev, ref, memo)
        return
    if ev.action == "reverse":
        return  # credits are applied on finish; a finished operation is never rolled back
    amount = sat_to_msat(ev.amount_sat) if intent.amount_msats is None else intent.amount_msats
    if isinstance(intent, intents.Credit):
        _require_creditable(conn, intent.account_id)
        if amount:
            credit(conn, intent.account_id, amount, kind=intent.kind, ref=ref, now=ev.now,
                   memo=memo)
        account_id = intent.account_id
    else:
        account_id = create_account(
            conn, key_hash=intent.key_hash, kind=intent.kind, deposit_msats=amount, ref=ref,
            now=ev.now, hint=intent.hint, refund_address=intent.refund_address,
            refund_mint=intent.refund_mint, refund_unit=intent.refund_unit,
            balance_limit_msats=intent.balance_limit_msats,
            balance_limit_reset=intent.balance_limit_reset,
            validity_date=intent.validity_date).id
    if ev.issued_sat:  # a receive that split part of its value back out as change
        refund(conn, account_id, sat_to_msat(ev.issued_sat), kind="change",
               ref=f"wallet-issued:{ev.op_id}", now=ev.now,
               memo=f"change issued by wallet {ev.op_kind} #{ev.op_id}")


def _apply_debit(conn: sqlite3.Connection, intent: intents.Debit, ev: intents.WalletEvent,
                 ref: str, memo: str) -> None:
    if ev.action == "apply":
        refund(conn, intent.account_id, intent.amount_msats, kind=intent.kind, ref=ref,
               now=ev.now, memo=memo)
        if intent.rounding_msats:  # X-Cashu change: the sub-sat rest, charged with it
            charge(conn, intent.account_id, intent.rounding_msats,
                   request_id=f"rounding:{intent.account_id}", now=ev.now)
        return
    reverse_refund(conn, intent.account_id, intent.amount_msats,
                   ref=f"wallet-reversal:{ev.op_id}", now=ev.now,
                   memo=f"reversal: wallet {ev.op_kind} #{ev.op_id} did not happen")


class Ledger:
    """Runs each ledger op in its own `Database.transaction`, with the durability it needs.

    `boot_id` identifies this process's reservations (see `release_orphans`); `clock` gives
    unix seconds. Every method takes an optional `now` for tests.
    """

    def __init__(
        self,
        db: Database,
        *,
        boot_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.boot_id = boot_id or secrets.token_hex(8)
        self._clock = clock
        # reservation id → ttl_s of this process's requests in flight: renewed by every sweep
        self._live: dict[int, int] = {}

    def _now(self, now: int | None) -> int:
        return int(self._clock()) if now is None else now

    def run(self, op: Callable[..., T], *args: Any, durable: bool = False,
            now: int | None = None, **kw: Any) -> T:
        """The one transaction runner: ``op(conn, *args, now=…, **kw)`` — a ledger operation
        above — in its own transaction; `durable` for money entering or leaving the node."""
        t = self._now(now)
        return self.db.transaction(lambda c: op(c, *args, now=t, **kw), durable=durable)

    def startup_sweep(self, *, single_process: bool, now: int | None = None) -> int:
        """At start: release expired reservations and, when this process is the database's sole
        user, every reservation left by a previous run. Returns how many were released."""
        t = self._now(now)

        def op(conn: sqlite3.Connection) -> int:
            n = sweep_expired(conn, t)
            if single_process:
                n += release_orphans(conn, owner=self.boot_id, now=t)
            return n

        return self.db.transaction(op)

    # -- queries --------------------------------------------------------------------------

    # Single-statement lookups run in autocommit mode (one statement is one consistent
    # snapshot); they are on every request's path, so they skip `read`'s snapshot setup.
    def get_account(self, key_hash: str) -> Account | None:
        return get_account(self.db.conn, key_hash)

    def get_account_by_id(self, account_id: int) -> Account | None:
        return get_account_by_id(self.db.conn, account_id)

    def deposit_of(self, ref: str) -> tuple[int, int] | None:
        return deposit_of(self.db.conn, ref)

    def get_reservation(self, reservation_id: int) -> Reservation | None:
        return self.db.read(lambda c: get_reservation(c, reservation_id))

    def children(self, parent_id: int) -> list[Account]:
        return self.db.read(lambda c: children(c, parent_id))

    def reserved_by(self, acct: Account) -> int:
        return self.db.read(lambda c: reserved_by(c, acct))

    def transactions(
        self, account_id: int, *, limit: int = 50, offset: int = 0
    ) -> tuple[list[TxRow], int]:
        return self.db.read(lambda c: transactions(c, account_id, limit=limit, offset=offset))

    def totals(self) -> dict[str, int]:
        return self.db.read(totals)

    def check_invariant(self) -> dict[str, int]:
        return self.db.read(check_invariant)

    # -- money in -------------------------------------------------------------------------

    def create_account(self, **kw: Any) -> Account:
        return self.run(create_account, durable=kw.get("deposit_msats", 0) > 0, **kw)

    def credit(self, account_id: int, amount_msats: int, **kw: Any) -> Account:
        return self.run(credit, account_id, amount_msats, durable=True, **kw)

    # -- per request ----------------------------------------------------------------------

    def reserve(
        self,
        account_id: int,
        amount_msats: int,
        *,
        request_id: str,
        ttl_s: int,
        now: int | None = None,
    ) -> Reservation:
        r = self.run(reserve, account_id, amount_msats, request_id=request_id, ttl_s=ttl_s,
                     owner=self.boot_id, now=now)
        self._live[r.id] = ttl_s
        return r

    @property
    def live_reservations(self) -> int:
        """How many of this process's reservations belong to requests still in flight."""
        return len(self._live)

    def settle(self, reservation_id: int, cost_msats: int, *, now: int | None = None) -> Settlement:
        self._live.pop(reservation_id, None)
        return self.run(settle, reservation_id, cost_msats, now=now)

    def charge(self, account_id: int, cost_msats: int, **kw: Any) -> Settlement:
        return self.run(charge, account_id, cost_msats, **kw)

    def release(self, reservation_id: int, *, now: int | None = None) -> Settlement:
        self._live.pop(reservation_id, None)
        return self.run(release, reservation_id, now=now)

    def sweep_expired(self, *, now: int | None = None) -> int:
        """Renew this process's live reservations, then release the expired (see there)."""
        t = self._now(now)
        live = dict(self._live)
        return self.db.transaction(lambda c: sweep_expired(c, t, live))

    def renew_live(self, *, now: int | None = None) -> None:
        """Renew this process's live reservations (a worker that does not run the sweep)."""
        t = self._now(now)
        live = dict(self._live)
        if live:
            self.db.transaction(lambda c: renew_live(c, live, now=t))

    def release_owner(self, owner: str, *, now: int | None = None) -> int:
        return self.run(release_owner, owner=owner, now=now)

    def release_orphans(self, *, now: int | None = None) -> int:
        return self.run(release_orphans, owner=self.boot_id, now=now)

    # -- money out ------------------------------------------------------------------------

    def refund(self, account_id: int, amount_msats: int, **kw: Any) -> Account:
        return self.run(refund, account_id, amount_msats, durable=True, **kw)

    def reverse_refund(self, account_id: int, amount_msats: int, **kw: Any) -> Account:
        return self.run(reverse_refund, account_id, amount_msats, durable=True, **kw)

    # -- child keys and policy ------------------------------------------------------------

    def create_children(
        self,
        parent_id: int,
        key_hashes: Sequence[str],
        *,
        balance_limit_msats: int | None = None,
        balance_limit_reset: LimitReset | str | None = None,
        validity_date: int | None = None,
        cost_msats_each: int = 0,
        hints: Sequence[str] | None = None,
        now: int | None = None,
    ) -> list[Account]:
        """Create several child keys atomically (all or none), each charged `cost_msats_each`."""
        t = self._now(now)
        names = list(hints) if hints is not None else [""] * len(key_hashes)
        if len(names) != len(key_hashes):
            raise ValueError("one hint per key hash")

        def op(conn: sqlite3.Connection) -> list[Account]:
            total = _amount(cost_msats_each, "cost_msats_each") * len(key_hashes)
            parent = _require(conn, parent_id)
            if not parent.is_child and parent.balance_msats < total:
                raise _insufficient(total, parent.balance_msats)
            return [
                create_child(
                    conn,
                    parent_id,
                    h,
                    balance_limit_msats=balance_limit_msats,
                    balance_limit_reset=balance_limit_reset,
                    validity_date=validity_date,
                    cost_msats=cost_msats_each,
                    hint=hint,
                    now=t,
                )
                for h, hint in zip(key_hashes, names, strict=True)
            ]

        return self.db.transaction(op, durable=True)

    def create_child(self, parent_id: int, key_hash: str, *, cost_msats: int = 0,
                     hint: str = "", **kw: Any) -> Account:
        return self.create_children(parent_id, [key_hash], cost_msats_each=cost_msats,
                                    hints=[hint], **kw)[0]

    def reset_child(self, parent_id: int, child_id: int, *, now: int | None = None) -> Account:
        return self.run(reset_child, parent_id, child_id, now=now)

    def set_disabled(self, account_id: int, disabled: bool, **kw: Any) -> Account:
        return self.run(set_disabled, account_id, disabled, **kw)

    def set_refund_address(self, account_id: int, **kw: Any) -> Account:
        return self.run(set_refund_address, account_id, **kw)
