"""The admin API's queries: key lists, the filtered transaction log, the overview, sessions,
deleted keys, key limits and price overrides (tables of migration 4 in `db`), and the
dashboard forms' used nonces and one-time messages (migration 7).

Every function is a plain ``def op(conn, ...)`` run by `db.Database.read` or `.transaction`,
like the ledger's operations. Nothing here moves money: balances change only through
`ledger.Ledger`; what this module writes is policy (limits, the deleted mark, a key's hash
replaced when it is deleted), sessions and price overrides — each policy change logged as a
zero-amount `txlog` row, so a key's history shows what the operator did to it.

Deleting a key
    The ledger's rows are never removed (the log references them and the books must still
    add up), so "delete" means: the key must hold no money (balance and reserved 0 — the
    operator cannot make a user's money vanish; a funded key can only be disabled), its
    `key_hash` is replaced by the hash of a random value so the key can never authenticate
    again, it is disabled, marked in ``admin_deleted_keys`` (hidden from lists) and a
    ``delete`` row is logged. Deleting a parent deletes its child keys (they hold no money).

Queries take ``conn`` as `db.Connection`, so this module needs no ``sqlite3`` import (only the
storage modules have one).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final

from . import errors
from .db import Connection as Conn
from .keys import hash_key
from .ledger import (
    CHARGE_KINDS,
    LIMIT_RESETS,
    Account,
    AccountNotFound,
    TxRow,
    window_start,
)

ADMIN_TOKEN_SETTING: Final = "admin_token_hash"  # noqa: S105 - a name
MAX_SESSIONS: Final = 50
MAX_FLASHES: Final = 64  # one-time messages waiting to be shown (a few minutes each)
HOUR_S: Final = 3600
DAY_S: Final = 86_400

_ACCOUNT_FIELDS: Final = tuple(f.name for f in fields(Account))
_SELECT_ACCOUNT: Final = f"SELECT {', '.join(_ACCOUNT_FIELDS)} FROM keys"  # noqa: S608
_TX_COLUMNS: Final = "id, time, kind, key_id, child_id, amount_msats, request_id, ref, memo"
_CHARGE_KINDS_SQL: Final = ", ".join(f"'{k}'" for k in CHARGE_KINDS)


class KeyHasMoney(errors.Conflict):
    default_code = "key_holds_money"


# --------------------------------------------------------------------------------------------
# Admin token and sessions
# --------------------------------------------------------------------------------------------


def stored_admin_hash(conn: Conn) -> str | None:
    row = conn.execute(
        "SELECT value FROM node_settings WHERE name = ?", (ADMIN_TOKEN_SETTING,)
    ).fetchone()
    return str(row[0]) if row else None


def store_admin_hash(conn: Conn, token_hash: str, now: int) -> None:
    conn.execute(
        "INSERT INTO node_settings (name, value, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value,"
        " updated_at = excluded.updated_at",
        (ADMIN_TOKEN_SETTING, token_hash, now),
    )


def create_session(conn: Conn, token_hash: str, epoch: str, *, now: int, ttl_s: int) -> None:
    """Store a session (its token's hash); drop expired ones and the oldest beyond the cap."""
    conn.execute("DELETE FROM admin_sessions WHERE expires_at <= ?", (now,))
    conn.execute(
        "INSERT INTO admin_sessions (token_hash, epoch, created_at, expires_at)"
        " VALUES (?, ?, ?, ?)",
        (token_hash, epoch, now, now + ttl_s),
    )
    conn.execute(
        "DELETE FROM admin_sessions WHERE token_hash NOT IN (SELECT token_hash FROM"
        " admin_sessions ORDER BY created_at DESC, rowid DESC LIMIT ?)",
        (MAX_SESSIONS,),
    )


def session_valid(conn: Conn, token_hash: str, epoch: str, now: int) -> bool:
    row = conn.execute(
        "SELECT 1 FROM admin_sessions WHERE token_hash = ? AND epoch = ? AND expires_at > ?",
        (token_hash, epoch, now),
    ).fetchone()
    return row is not None


def delete_session(conn: Conn, token_hash: str) -> None:
    conn.execute("DELETE FROM admin_sessions WHERE token_hash = ?", (token_hash,))


# --------------------------------------------------------------------------------------------
# Dashboard forms: used nonces and one-time flash messages (migration 7, `admin_forms`)
# --------------------------------------------------------------------------------------------


def use_nonce(conn: Conn, nonce_hash: str, *, expires_at: int, now: int) -> bool:
    """Mark a form nonce used: True the first time, False when it was used before."""
    conn.execute("DELETE FROM admin_used_nonces WHERE expires_at <= ?", (now,))
    cur = conn.execute(
        "INSERT INTO admin_used_nonces (nonce_hash, expires_at) VALUES (?, ?)"
        " ON CONFLICT (nonce_hash) DO NOTHING", (nonce_hash, expires_at))
    return cur.rowcount == 1


def set_nonce_location(conn: Conn, nonce_hash: str, location: str) -> None:
    conn.execute("UPDATE admin_used_nonces SET location = ? WHERE nonce_hash = ?",
                 (location, nonce_hash))


def nonce_location(conn: Conn, nonce_hash: str) -> str | None:
    """Where the first use of a nonce redirected to (None while it still runs)."""
    row = conn.execute("SELECT location FROM admin_used_nonces WHERE nonce_hash = ?",
                       (nonce_hash,)).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def put_flash(conn: Conn, id_hash: str, sealed: bytes, *, now: int, ttl_s: int) -> None:
    """Keep one sealed flash message; drop expired ones and the oldest beyond the cap."""
    conn.execute("DELETE FROM admin_flash WHERE expires_at <= ?", (now,))
    conn.execute("INSERT INTO admin_flash (id_hash, sealed, created_at, expires_at)"
                 " VALUES (?, ?, ?, ?)", (id_hash, sealed, now, now + ttl_s))
    conn.execute("DELETE FROM admin_flash WHERE id_hash NOT IN (SELECT id_hash FROM"
                 " admin_flash ORDER BY created_at DESC, rowid DESC LIMIT ?)", (MAX_FLASHES,))


def take_flash(conn: Conn, id_hash: str, *, now: int) -> bytes | None:
    """A flash message, once: it is deleted as it is read (None if gone or expired)."""
    row = conn.execute("SELECT sealed, expires_at FROM admin_flash WHERE id_hash = ?",
                       (id_hash,)).fetchone()
    conn.execute("DELETE FROM admin_flash WHERE id_hash = ? OR expires_at <= ?", (id_hash, now))
    return bytes(row[0]) if row is not None and int(row[1]) > now else None


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def is_deleted(conn: Conn, key_id: int) -> bool:
    return conn.execute(
        "SELECT 1 FROM admin_deleted_keys WHERE key_id = ?", (key_id,)
    ).fetchone() is not None


def _log(conn: Conn, kind: str, acct: Account, now: int, memo: str) -> None:
    conn.execute(
        "INSERT INTO txlog (time, kind, key_id, child_id, amount_msats, memo)"
        " VALUES (?, ?, ?, ?, 0, ?)",
        (now, kind, acct.paying_id, acct.id if acct.is_child else None, memo),
    )


def _account(row: Sequence[Any]) -> Account:
    values: list[Any] = [bool(v) if name == "disabled" else v
                         for name, v in zip(_ACCOUNT_FIELDS, row, strict=True)]
    return Account(*values)


def get_key(conn: Conn, key_id: int) -> Account | None:
    row = conn.execute(_SELECT_ACCOUNT + " WHERE id = ?", (key_id,)).fetchone()
    return _account(row) if row else None


def require_key(conn: Conn, key_id: int) -> Account:
    acct = get_key(conn, key_id)
    if acct is None or is_deleted(conn, key_id):
        raise AccountNotFound(f"Key {key_id} not found")
    return acct


def keys_by_hash_prefix(conn: Conn, prefix: str, *, limit: int = 2) -> list[Account]:
    """Keys (not deleted) whose `key_hash` starts with the hex `prefix` (the command line's
    ``keys show 3fa9c0…``); at most `limit`, so the caller can tell an ambiguous prefix."""
    rows = conn.execute(
        f"{_SELECT_ACCOUNT} WHERE substr(key_hash, 1, length(?)) = ?"  # noqa: S608
        " AND id NOT IN (SELECT key_id FROM admin_deleted_keys) ORDER BY id LIMIT ?",
        (prefix, prefix.lower(), limit)).fetchall()
    return [_account(r) for r in rows]


def list_keys(
    conn: Conn,
    *,
    search: str = "",
    kinds: Sequence[str] = (),
    parent_id: int | None = None,
    limit: int,
    offset: int,
) -> tuple[list[Account], int]:
    """A page of keys, newest first, and how many match.

    `search`: a full key finds exactly that key (by hash); otherwise its last four characters
    (or fewer) match the end of a key (``sk-…abcd`` pasted from a list works too).
    """
    where = ["id NOT IN (SELECT key_id FROM admin_deleted_keys)"]
    params: list[Any] = []
    term = search.strip()
    if term:
        if term.startswith(("sk-", "cashu")) and len(term) > 12:
            where.append("key_hash = ?")
            params.append(hash_key(term))
        else:
            tail = term[-4:]
            where.append("substr(hint, -length(?)) = ?")
            params += [tail, tail]
    if kinds:
        where.append(f"kind IN ({', '.join('?' for _ in kinds)})")
        params += list(kinds)
    if parent_id is not None:
        where.append("parent_id = ?")
        params.append(parent_id)
    clause = " AND ".join(where)
    total = int(conn.execute(f"SELECT COUNT(*) FROM keys WHERE {clause}",  # noqa: S608
                             params).fetchone()[0])
    rows = conn.execute(
        f"{_SELECT_ACCOUNT} WHERE {clause} ORDER BY id DESC LIMIT ? OFFSET ?",  # noqa: S608
        [*params, limit, offset],
    ).fetchall()
    return [_account(r) for r in rows], total


def children_count(conn: Conn, parent_id: int) -> int:
    return int(conn.execute(
        "SELECT COUNT(*) FROM keys WHERE parent_id = ?"
        " AND id NOT IN (SELECT key_id FROM admin_deleted_keys)", (parent_id,)
    ).fetchone()[0])


def set_disabled(conn: Conn, key_id: int, disabled: bool, *, now: int) -> Account:
    acct = require_key(conn, key_id)
    if acct.disabled != disabled:
        conn.execute("UPDATE keys SET disabled = ? WHERE id = ?", (int(disabled), key_id))
        _log(conn, "disable" if disabled else "enable", acct, now, "by admin")
    return require_key(conn, key_id)


_UNSET: Final = object()


def set_limits(
    conn: Conn,
    key_id: int,
    *,
    balance_limit_msats: Any = _UNSET,
    balance_limit_reset: Any = _UNSET,
    validity_date: Any = _UNSET,
    now: int,
) -> Account:
    """Change a key's spending limit, its reset period and its expiry (None clears one).

    A new reset period starts a fresh window; the spending already counted in the current
    window is kept when only the limit changes.
    """
    acct = require_key(conn, key_id)
    limit = acct.balance_limit_msats if balance_limit_msats is _UNSET else balance_limit_msats
    reset = acct.balance_limit_reset if balance_limit_reset is _UNSET else balance_limit_reset
    valid = acct.validity_date if validity_date is _UNSET else validity_date
    if reset is not None and reset not in LIMIT_RESETS:
        raise errors.InvalidRequest(
            f"'balance_limit_reset' must be one of {', '.join(LIMIT_RESETS)} or null",
            code="invalid_parameter")
    start, spent = acct.limit_window_start, acct.limit_spent_msats
    if reset != acct.balance_limit_reset:
        start, spent = window_start(reset, now), 0
    conn.execute(
        "UPDATE keys SET balance_limit_msats = ?, balance_limit_reset = ?, validity_date = ?,"
        " limit_window_start = ?, limit_spent_msats = ? WHERE id = ?",
        (limit, reset, valid, start, spent, key_id),
    )
    memo = f"limit={limit} reset={reset} validity={valid}"
    _log(conn, "policy", acct, now, memo)
    return require_key(conn, key_id)


def delete_key(conn: Conn, key_id: int, *, now: int) -> list[int]:
    """Delete a key that holds no money (see the module doc); the ids deleted (it + children)."""
    acct = require_key(conn, key_id)
    if acct.balance_msats or acct.reserved_msats:
        raise KeyHasMoney(
            "This key still holds money; disable it instead, or let its owner spend or"
            " withdraw it first.",
            details={"balance_msats": acct.balance_msats, "reserved_msats": acct.reserved_msats},
        )
    kids = [int(r[0]) for r in conn.execute(
        "SELECT id FROM keys WHERE parent_id = ?"
        " AND id NOT IN (SELECT key_id FROM admin_deleted_keys)", (key_id,)).fetchall()]
    gone: list[int] = []
    for victim in [*kids, key_id]:
        target = require_key(conn, victim)
        conn.execute(
            "UPDATE keys SET key_hash = ?, disabled = 1 WHERE id = ?",
            (hash_key("deleted:" + secrets.token_hex(32)), victim),
        )
        conn.execute(
            "INSERT INTO admin_deleted_keys (key_id, deleted_at) VALUES (?, ?)", (victim, now)
        )
        _log(conn, "delete", target, now, "deleted by admin")
        gone.append(victim)
    return gone


# --------------------------------------------------------------------------------------------
# Transactions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TxFilter:
    key_ids: tuple[int, ...] | None = None  # None: any key
    kinds: tuple[str, ...] = ()
    since: int | None = None
    until: int | None = None


def transactions(
    conn: Conn, f: TxFilter, *, limit: int, offset: int
) -> tuple[list[tuple[TxRow, str]], int]:
    """A page of the whole log, newest first, with each row's key hint, and the match count.

    A key id matches the rows of that account and the rows made by it as a child key.
    """
    where: list[str] = []
    params: list[Any] = []
    if f.key_ids is not None:
        marks = ", ".join("?" for _ in f.key_ids) or "NULL"
        where.append(f"(t.key_id IN ({marks}) OR t.child_id IN ({marks}))")
        params += [*f.key_ids, *f.key_ids]
    if f.kinds:
        where.append(f"t.kind IN ({', '.join('?' for _ in f.kinds)})")
        params += list(f.kinds)
    if f.since is not None:
        where.append("t.time >= ?")
        params.append(f.since)
    if f.until is not None:
        where.append("t.time < ?")
        params.append(f.until)
    clause = ("WHERE " + " AND ".join(where)) if where else ""
    if where:
        total = int(conn.execute(f"SELECT COUNT(*) FROM txlog t {clause}",  # noqa: S608
                                 params).fetchone()[0])
    else:  # append-only, never deleted, no AUTOINCREMENT: ids are exactly 1..N
        total = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM txlog").fetchone()[0])
    cols = ", ".join("t." + c.strip() for c in _TX_COLUMNS.split(","))
    rows = conn.execute(
        f"SELECT {cols}, COALESCE(c.hint, k.hint, '') FROM txlog t"  # noqa: S608
        " JOIN keys k ON k.id = t.key_id LEFT JOIN keys c ON c.id = t.child_id"
        f" {clause} ORDER BY t.id DESC LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    return [(TxRow(*r[:9]), str(r[9])) for r in rows], total


# The kinds of log rows the ledger and this module write (the dashboard's filter choices).
TX_KINDS: Final = ("create", "deposit", "grant", "reserve", "settle", "charge", "release",
                   "expire", "orphan", "refund", "payout", "change", "reversal", "child_key_fee",
                   "child_reset", "disable", "enable", "policy", "delete")


# --------------------------------------------------------------------------------------------
# Overview
# --------------------------------------------------------------------------------------------


def overview(conn: Conn, now: int) -> dict[str, Any]:
    """Earnings (what requests were charged), requests, keys, reservations and what the node
    holds for its users — in total and over the last 24 hours."""
    day_ago = now - DAY_S
    sums = conn.execute(
        "SELECT COALESCE(SUM(spent_msats), 0), COALESCE(SUM(CASE WHEN kind != 'child'"
        " THEN total_requests ELSE 0 END), 0), COALESCE(SUM(balance_msats), 0),"
        " COALESCE(SUM(reserved_msats), 0), COALESCE(SUM(deposited_msats), 0),"
        " COALESCE(SUM(granted_msats), 0), COALESCE(SUM(refunded_msats), 0) FROM keys"
    ).fetchone()
    earned_24h = conn.execute(
        "SELECT COALESCE(SUM(amount_msats), 0) FROM txlog"  # noqa: S608 - constant kinds
        f" WHERE time >= ? AND kind IN ({_CHARGE_KINDS_SQL})", (day_ago,)
    ).fetchone()[0]
    requests_24h = conn.execute(
        "SELECT COUNT(*) FROM txlog WHERE time >= ? AND kind = 'reserve'", (day_ago,)
    ).fetchone()[0]
    keys = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(last_used_at >= ?), 0),"
        " COALESCE(SUM(balance_msats > 0), 0), COALESCE(SUM(disabled), 0) FROM keys"
        " WHERE kind IN ('api', 'token', 'child')"
        " AND id NOT IN (SELECT key_id FROM admin_deleted_keys)", (day_ago,)
    ).fetchone()
    live = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(amount_msats), 0) FROM reservations"
    ).fetchone()
    return {
        "earnings_msats": int(sums[0]),
        "earnings_24h_msats": int(earned_24h),
        "requests": int(sums[1]),
        "requests_24h": int(requests_24h),
        "keys": int(keys[0]),
        "active_keys": int(keys[1]),
        "funded_keys": int(keys[2]),
        "disabled_keys": int(keys[3]),
        "reserved_msats": int(sums[3]),
        "reservations": int(live[0]),
        "user_balances_msats": int(sums[2]),
        "liability_msats": int(sums[2]) + int(sums[3]),
        "deposited_msats": int(sums[4]),
        "granted_msats": int(sums[5]),
        "refunded_msats": int(sums[6]),
    }


def earnings_per_hour(conn: Conn, now: int, hours: int = 24) -> list[dict[str, int]]:
    """msats charged in each of the last `hours` whole hours (UTC), oldest first, zeros kept."""
    last = now - now % HOUR_S
    first = last - (hours - 1) * HOUR_S
    rows = conn.execute(
        "SELECT time - time % 3600, SUM(amount_msats) FROM txlog"  # noqa: S608 - constants
        f" WHERE time >= ? AND kind IN ({_CHARGE_KINDS_SQL}) GROUP BY 1", (first,)
    ).fetchall()
    by_hour = {int(h): int(s) for h, s in rows}
    return [{"hour": h, "msats": by_hour.get(h, 0)} for h in range(first, last + 1, HOUR_S)]


def liability_msats(conn: Conn) -> int:
    """What the node owes its users: every balance plus every reservation."""
    return int(conn.execute(
        "SELECT COALESCE(SUM(balance_msats + reserved_msats), 0) FROM keys").fetchone()[0])


def taken_out_sats(conn: Conn) -> int:
    """What the operator withdrew (Cashu tokens) or paid out (Lightning), fees not counted."""
    return int(conn.execute(
        "SELECT COALESCE(SUM(amount), 0) FROM wallet_ops WHERE state = 'done' AND kind IN"
        " ('send', 'melt') AND (ref LIKE 'admin-withdraw:%' OR ref LIKE 'admin-payout:%')"
    ).fetchone()[0])


def wallet_by_mint(conn: Conn, unit: str) -> dict[str, tuple[int, int]]:
    """mint → (Σ amount, count) of the wallet's unspent proofs in `unit`."""
    return {str(m): (int(total), int(n)) for m, total, n in conn.execute(
        "SELECT mint, SUM(amount), COUNT(*) FROM wallet_proofs WHERE unit = ?"
        " AND state = 'unspent' GROUP BY mint", (unit,)).fetchall()}


# --------------------------------------------------------------------------------------------
# Price overrides
# --------------------------------------------------------------------------------------------


def load_overrides(conn: Conn) -> dict[str, tuple[str, dict[str, int]]]:
    """lower-cased model id → (the id as written, the overridden fields)."""
    out: dict[str, tuple[str, dict[str, int]]] = {}
    for model, model_id, doc_text in conn.execute(
            "SELECT model, model_id, fields FROM price_overrides ORDER BY model").fetchall():
        doc = json.loads(doc_text)
        out[str(model)] = (str(model_id), {str(k): int(v) for k, v in doc.items()})
    return out


def put_override(conn: Conn, model_id: str, fields: Mapping[str, int], now: int) -> None:
    conn.execute(
        "INSERT INTO price_overrides (model, model_id, fields, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (model) DO UPDATE SET model_id = excluded.model_id,"
        " fields = excluded.fields, updated_at = excluded.updated_at",
        (model_id.lower(), model_id, json.dumps(dict(fields), sort_keys=True), now),
    )


def delete_override(conn: Conn, model_id: str) -> bool:
    cur = conn.execute("DELETE FROM price_overrides WHERE model = ?", (model_id.lower(),))
    return cur.rowcount > 0
