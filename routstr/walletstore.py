"""The node's sqlite store for the Cashu wallet, and the wallet's HTTP transport.

`SqliteWalletStore` implements `routstr.cashu.wallet.WalletStore` on the tables of the
``_MIGRATION_2_WALLET`` migration in `db.py`. Each method is one ``BEGIN IMMEDIATE``
transaction committed with ``synchronous=FULL`` (`durable=True`): a write-ahead intent the wallet
relies on before calling a mint must survive a power cut, not only a process crash.

Purposes — what an operation means for the ledger — are money intents (`routstr.intents`:
`CreateAccount`, `Credit`, `Debit`, or none for the node's own money), stored as JSON with the
operation and applied by `ledger.apply_intent` inside the *same* transaction as the proof
changes that justify them (the money rule: every change of a user balance goes through the
ledger, atomically with its cause). A receive that split part of its value back into a token
(`Wallet.receive(keep=…)`) credits the whole value and pays the issued part out as ``change``
in the same transaction; a debit rolled back is reversed once (``wallet-reversal:<op id>``).

A purpose applied on *finish* (a credit) is checked before the mint is called: `begin` applies
it with the expected amount inside a savepoint and rolls it back, so whatever the ledger would
refuse (the key deleted or disabled, the account exists, a limit beyond sqlite's integers, a
malformed purpose) refuses the operation with `PurposeRefused` — the token is never swapped and
stays the client's. What can still change between begin and finish (the key deleted or
disabled meanwhile) falls back to the purpose's ``"fallback"`` (a purpose of its own, e.g. open
the token's own key, which the client can spend or refund with the token as Bearer): the value
is never parked on nothing. A mint (a paid Lightning invoice: there is no token to hand back)
whose purpose is refused at begin is recorded with its fallback instead. Only when the fallback
fails too is the error kept in `result["purpose_error"]` (logged as an error) with the proofs
stored — failing the finish would leave received ecash in limbo forever. A purpose applied on
*begin* that fails refuses the operation (nothing is recorded, the mint is never called).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from routstr import intents, ledger
from routstr.cashu.mint import Transport
from routstr.cashu.tokens import Proof
from routstr.cashu.wallet import (
    FAILED_OP_RETENTION_S,
    OP_LEASE_S,
    InputsBusy,
    Intent,
    Operation,
    Outcome,
    OutputSpec,
    ProofsUnavailable,
    PurposeRefused,
    QuoteBusy,
    QuoteRecord,
    WalletError,
)
from routstr.client import HttpClient, UpstreamConnectError, UpstreamTimeout
from routstr.db import Database
from routstr.errors import ApiError, UpstreamError

log = logging.getLogger(__name__)

_SELECT_OPS = (
    "SELECT id, kind, mint, unit, state, own_inputs, inputs, outputs, purpose, purpose_at,"
    " amount, fee, ref, quote, data, token, result, error, recheck_until, created_at, updated_at"
    " FROM wallet_ops WHERE "
)


PurposeEvent = intents.WalletEvent


#: What a failing finish-time purpose may raise (ledger refusals, malformed purposes).
PURPOSE_ERRORS = (ApiError, ValueError, KeyError, TypeError, OverflowError,
                  sqlite3.IntegrityError)

PurposeFn = Callable[[sqlite3.Connection, Mapping[str, Any], PurposeEvent], None]


def apply_purpose(conn: sqlite3.Connection, purpose: Mapping[str, Any] | None,
                  ev: PurposeEvent) -> None:
    """A stored purpose is an intent (`routstr.intents`), applied by the ledger."""
    ledger.apply_intent(conn, intents.from_json(purpose), ev)


def fallback_of(purpose: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stored form of a purpose's fallback intent (None: it names none, or is malformed —
    then the purpose itself was refused and there is nothing to fall back to)."""
    try:
        intent = intents.from_json(purpose)
    except ValueError:
        return None
    if isinstance(intent, intents.Credit | intents.CreateAccount):
        return intents.to_json(intent.fallback)
    return None


# --------------------------------------------------------------------------- (de)serialization


def _proof_json(p: Proof) -> dict[str, Any]:
    return p.to_dict(include_dleq=True)


def _dumps(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


def _op(row: Sequence[Any]) -> Operation:
    (op_id, kind, mint, unit, state, own, inputs, outputs, purpose, purpose_at, amount, fee, ref,
     quote, data, token, result, error, recheck, created, updated) = row
    res = json.loads(result)
    if error:
        res = {**res, "error": error}
    extra = json.loads(data)
    lease = extra.pop(_LEASE, None) or {}
    return Operation(
        id=op_id, kind=kind, mint=mint, unit=unit, state=state,
        inputs=tuple(Proof.from_dict(d) for d in json.loads(inputs)),
        own_inputs=bool(own),
        outputs=tuple(OutputSpec(k, a, c, r) for k, a, c, r in json.loads(outputs)),
        purpose=None if purpose is None else json.loads(purpose),
        purpose_at=purpose_at, amount=amount, fee=fee, ref=ref, quote=quote,
        data=extra, created_at=created, updated_at=updated, token=token,
        result=res, recheck_until=recheck, owner=str(lease.get("owner", "")),
        lease_until=float(lease.get("until", 0.0)),
    )


# --------------------------------------------------------------------------- operation owners

#: Failed operations deleted per `sweep_failed` call.
SWEEP_BATCH = 500

#: Where an operation's lease is kept in its row (the `data` JSON, next to the intent's data).
_LEASE = "_lease"


def _proc_start(pid: str) -> str | None:
    """The start time (clock ticks since boot) of a live process `pid`; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "?"


def process_owner() -> str:
    """This process as an operation owner: ``pid namespace|pid|start time``, so that another
    process on the host (sqlite's WAL needs them all on one host) can tell whether it still
    runs — a pid reused later has another start time."""
    pid = str(os.getpid())
    return f"{_pid_namespace()}|{pid}|{_proc_start(pid) or os.urandom(4).hex()}"


def owner_alive(owner: str) -> bool | None:
    """Whether the process `owner` (see `process_owner`) runs; None when this process cannot
    tell (another pid namespace, no /proc, an owner recorded before owners were)."""
    parts = owner.split("|")
    if len(parts) != 3 or parts[0] == "?" or parts[0] != _pid_namespace():
        return None
    return _proc_start(parts[1]) == parts[2]


def _proof_from_row(row: Sequence[Any]) -> Proof:
    keyset_id, amount, secret, c, dleq = row
    d: dict[str, Any] = {"id": keyset_id, "amount": amount, "secret": secret, "C": c}
    if dleq:
        d["dleq"] = json.loads(dleq)
    return Proof.from_dict(d)


def _hold_inputs(conn: sqlite3.Connection, intent: Intent, op_id: int) -> None:
    """Reserve our input proofs (`ProofsUnavailable` unless all unspent) or lock foreign ones
    (`InputsBusy` if another operation holds one) for operation `op_id`."""
    for p in intent.inputs:
        if intent.own_inputs:
            n = conn.execute(
                "UPDATE wallet_proofs SET state = 'reserved', op_id = ? WHERE secret = ?"
                " AND mint = ? AND state = 'unspent'", (op_id, p.secret, intent.mint),
            ).rowcount
            if n != 1:
                raise ProofsUnavailable(f"proof {p.secret[:8]}… is not unspent")
            continue
        row = conn.execute(
            "SELECT op_id FROM wallet_input_locks WHERE secret = ?", (p.secret,)
        ).fetchone()
        if row:
            raise InputsBusy(row[0])
        conn.execute("INSERT INTO wallet_input_locks (secret, op_id) VALUES (?, ?)",
                     (p.secret, op_id))


# --------------------------------------------------------------------------- the store


class SqliteWalletStore:
    """`WalletStore` on the node database; purposes applied through `routstr.ledger`."""

    def __init__(
        self,
        db: Database,
        *,
        purpose_fn: PurposeFn = apply_purpose,
        clock: Callable[[], float] = time.time,
        owner: str | None = None,
        lease_s: float = OP_LEASE_S,
    ) -> None:
        self.db = db
        self._purpose_fn = purpose_fn
        self._clock = clock
        self.owner = owner or process_owner()
        self._lease_s = lease_s

    # -- helpers (inside a transaction)

    def _get(self, conn: sqlite3.Connection, op_id: int) -> Operation | None:
        row = conn.execute(_SELECT_OPS + "id = ?", (op_id,)).fetchone()
        return None if row is None else _op(row)

    def _require(self, conn: sqlite3.Connection, op_id: int) -> Operation:
        op = self._get(conn, op_id)
        if op is None:
            raise WalletError(f"no wallet operation {op_id}")
        return op

    def _data(self, data: Mapping[str, Any], now: float) -> str:
        """An operation's `data` with this process's lease on it, until now + lease."""
        return _dumps({**data, _LEASE: {"owner": self.owner, "until": now + self._lease_s}})

    def _event(self, op: Operation, action: str, amount: int, fee: int) -> PurposeEvent:
        issued = sum(o.amount for o in op.outputs if o.role == "send") \
            if op.kind == "receive" else 0
        return PurposeEvent(action, op.id, op.kind, amount, fee, op.ref, int(self._clock()),
                            issued)

    def _insert_proofs(
        self, conn: sqlite3.Connection, op: Operation, proofs: Sequence[Proof], state: str
    ) -> None:
        """Store new proofs in `state`; an `issued` proof may be one of op's reserved inputs
        (a send made of exact proofs), which then just changes state."""
        now = self._clock()
        for p in proofs:
            if state == "issued" and conn.execute(
                "UPDATE wallet_proofs SET state = 'issued' WHERE secret = ? AND op_id = ?"
                " AND state = 'reserved'", (p.secret, op.id),
            ).rowcount:
                continue
            dleq = _dumps(p.dleq.to_dict()) if p.dleq is not None else None
            conn.execute(
                "INSERT INTO wallet_proofs (secret, mint, unit, keyset_id, amount, c, dleq, state,"
                " op_id, origin_op, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (p.secret, op.mint, op.unit, p.id, p.amount, p.C, dleq, state,
                 op.id if state != "unspent" else None, op.id, now),
            )

    # -- WalletStore

    def begin(self, intent: Intent) -> Operation:
        def fn(conn: sqlite3.Connection) -> Operation:
            now = self._clock()
            outputs: list[list[Any]] = []
            counters: dict[str, int] = {}
            for keyset_id, amount, role in intent.outputs:
                if keyset_id not in counters:
                    row = conn.execute(
                        "SELECT next FROM wallet_counters WHERE keyset_id = ?", (keyset_id,)
                    ).fetchone()
                    counters[keyset_id] = row[0] if row else 0
                outputs.append([keyset_id, amount, counters[keyset_id], role])
                counters[keyset_id] += 1
            for keyset_id, nxt in counters.items():
                conn.execute(
                    "INSERT INTO wallet_counters (keyset_id, next) VALUES (?, ?)"
                    " ON CONFLICT (keyset_id) DO UPDATE SET next = excluded.next",
                    (keyset_id, nxt),
                )
            if intent.kind == "mint" and intent.quote is not None:
                row = conn.execute(
                    "SELECT id FROM wallet_ops WHERE quote = ? AND kind = 'mint'"
                    " AND state != 'failed'", (intent.quote,),
                ).fetchone()
                if row:
                    raise QuoteBusy(row[0])
            cur = conn.execute(
                "INSERT INTO wallet_ops (kind, mint, unit, state, own_inputs, inputs, outputs,"
                " purpose, purpose_at, amount, fee, ref, quote, data, created_at, updated_at)"
                " VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    intent.kind, intent.mint, intent.unit, int(intent.own_inputs),
                    _dumps([_proof_json(p) for p in intent.inputs]), _dumps(outputs),
                    None if intent.purpose is None else _dumps(dict(intent.purpose)),
                    intent.purpose_at, intent.amount, intent.fee, intent.ref, intent.quote,
                    self._data(intent.data, now), now, now,
                ),
            )
            op_id = cur.lastrowid
            assert op_id is not None
            _hold_inputs(conn, intent, op_id)
            op = self._require(conn, op_id)
            if intent.purpose is not None and intent.purpose_at == "begin":
                self._purpose_fn(conn, intent.purpose, self._event(op, "apply", op.amount, op.fee))
            if op.purpose is not None and op.purpose_at == "finish":
                op = self._check_finish_purpose(conn, op)
            return op

        return self.db.transaction(fn, durable=True)

    def _try_purpose(self, conn: sqlite3.Connection, purpose: Mapping[str, Any],
                     ev: PurposeEvent, *, keep: bool) -> Exception | None:
        """Apply `purpose` in a savepoint: kept if `keep` and it applied; the refusal, if any."""
        conn.execute("SAVEPOINT wallet_purpose")
        err: Exception | None = None
        try:
            self._purpose_fn(conn, purpose, ev)
        except PURPOSE_ERRORS as exc:
            err = exc
        if err is not None or not keep:
            conn.execute("ROLLBACK TO wallet_purpose")
        conn.execute("RELEASE wallet_purpose")
        return err

    def _check_finish_purpose(self, conn: sqlite3.Connection, op: Operation) -> Operation:
        """Before the mint call: the finish-time purpose must apply (a dry run with the expected
        amount, rolled back), else `PurposeRefused` rolls the whole intent back. A mint (a paid
        invoice) takes its fallback purpose instead, if that applies."""
        assert op.purpose is not None
        ev = self._event(op, "apply", op.amount, op.fee)
        err = self._try_purpose(conn, op.purpose, ev, keep=False)
        if err is None:
            return op
        fallback = fallback_of(op.purpose)
        if op.kind == "mint" and fallback is not None \
                and self._try_purpose(conn, fallback, ev, keep=False) is None:
            log.warning("wallet operation %d: %s; its fallback purpose will apply", op.id, err)
            conn.execute("UPDATE wallet_ops SET purpose = ? WHERE id = ?",
                         (_dumps(fallback), op.id))
            return self._require(conn, op.id)
        raise PurposeRefused(err)

    def finish(self, op_id: int, outcome: Outcome) -> Operation:
        def fn(conn: sqlite3.Connection) -> Operation:
            op = self._require(conn, op_id)
            if op.state == "done":
                return op
            if op.state == "failed":
                if op.recheck_until is None or op.kind not in ("receive", "mint"):
                    raise WalletError(f"operation {op_id} was rolled back; it cannot finish")
                for p in op.inputs:  # revived: the inputs are ours to hold again
                    conn.execute(
                        "INSERT INTO wallet_input_locks (secret, op_id) VALUES (?, ?)"
                        " ON CONFLICT (secret) DO UPDATE SET op_id = excluded.op_id",
                        (p.secret, op.id),
                    )
            self._insert_proofs(conn, op, outcome.issued, "issued")
            if op.own_inputs:
                conn.execute(
                    "UPDATE wallet_proofs SET state = 'spent'"
                    " WHERE op_id = ? AND state = 'reserved'", (op.id,),
                )
            self._insert_proofs(conn, op, outcome.proofs, "unspent")
            result = dict(outcome.result)
            if op.purpose is not None and op.purpose_at == "finish":
                result.update(self._apply_finish_purpose(conn, op, outcome))
            conn.execute(
                "UPDATE wallet_ops SET state = 'done', amount = ?, fee = ?, token = ?, result = ?,"
                " recheck_until = NULL, updated_at = ? WHERE id = ?",
                (outcome.amount, outcome.fee, outcome.token, _dumps(result), self._clock(), op.id),
            )
            return self._require(conn, op.id)

        return self.db.transaction(fn, durable=True)

    def _apply_finish_purpose(self, conn: sqlite3.Connection, op: Operation,
                              outcome: Outcome) -> dict[str, str]:
        """The credit of received value: the purpose, else its fallback (see the module
        docstring); what to add to the operation's result."""
        assert op.purpose is not None
        ev = self._event(op, "apply", outcome.amount, outcome.fee)
        err = self._try_purpose(conn, op.purpose, ev, keep=True)
        if err is None:
            return {}
        fallback = fallback_of(op.purpose)
        if fallback is not None and self._try_purpose(conn, fallback, ev,
                                                               keep=True) is None:
            log.warning("wallet operation %d: purpose not applied (%s); fallback applied",
                        op.id, type(err).__name__)
            return {"purpose_fallback": f"{type(err).__name__}: {err}"}
        log.error("wallet operation %d: purpose not applied: %s", op.id, err)
        return {"purpose_error": f"{type(err).__name__}: {err}"}

    def abort(
        self, op_id: int, reason: str, *, inputs_spent: bool = False,
        recheck_until: float | None = None,
    ) -> Operation:
        def fn(conn: sqlite3.Connection) -> Operation:
            op = self._require(conn, op_id)
            if op.state != "pending":
                return op
            if op.own_inputs:
                if inputs_spent:
                    conn.execute(
                        "UPDATE wallet_proofs SET state = 'spent' WHERE op_id = ?"
                        " AND state = 'reserved'", (op.id,),
                    )
                else:
                    conn.execute(
                        "UPDATE wallet_proofs SET state = 'unspent', op_id = NULL WHERE op_id = ?"
                        " AND state = 'reserved'", (op.id,),
                    )
            else:
                conn.execute("DELETE FROM wallet_input_locks WHERE op_id = ?", (op.id,))
            if op.purpose is not None and op.purpose_at == "begin":
                self._purpose_fn(conn, op.purpose, self._event(op, "reverse", op.amount, op.fee))
            conn.execute(
                "UPDATE wallet_ops SET state = 'failed', error = ?, recheck_until = ?,"
                " updated_at = ? WHERE id = ?",
                (reason[:500], recheck_until, self._clock(), op.id),
            )
            return self._require(conn, op.id)

        return self.db.transaction(fn, durable=True)

    def claim(self, op_id: int) -> Operation | None:
        """See `WalletStore.claim`. The check and the new lease are one write transaction, so
        two processes never both take over an operation."""
        def fn(conn: sqlite3.Connection) -> Operation | None:
            op = self._get(conn, op_id)
            if op is None or op.state != "pending":
                return None
            now = self._clock()
            if op.owner != self.owner and op.lease_until > now \
                    and owner_alive(op.owner) is not False:
                return None
            conn.execute("UPDATE wallet_ops SET data = ? WHERE id = ?",
                         (self._data(op.data, now), op.id))
            return self._require(conn, op.id)

        return self.db.transaction(fn)

    def get(self, op_id: int) -> Operation | None:
        return self.db.read(lambda conn: self._get(conn, op_id))

    def _ops(self, where: str, args: Sequence[Any] = ()) -> list[Operation]:
        sql = _SELECT_OPS + where  # `where` is always a literal of this module
        return self.db.read(lambda conn: [_op(r) for r in conn.execute(sql, tuple(args))])

    def pending(self) -> list[Operation]:
        return self._ops("state = 'pending' ORDER BY id")

    def watched(self, now: float) -> list[Operation]:
        return self._ops("state = 'failed' AND recheck_until > ? ORDER BY id", (now,))

    def sweep_failed(self) -> int:
        """See `WalletStore.sweep_failed`; at most `SWEEP_BATCH` rows a call (one short
        transaction; the periodic recovery calls it again)."""
        now = self._clock()
        return int(self.db.transaction(lambda conn: conn.execute(
            "DELETE FROM wallet_ops WHERE id IN (SELECT o.id FROM wallet_ops o"
            " WHERE o.state = 'failed' AND o.updated_at < ?"
            " AND (o.recheck_until IS NULL OR o.recheck_until < ?)"
            " AND NOT EXISTS (SELECT 1 FROM wallet_proofs p WHERE p.op_id = o.id)"
            " AND NOT EXISTS (SELECT 1 FROM wallet_proofs p WHERE p.origin_op = o.id)"
            " AND NOT EXISTS (SELECT 1 FROM wallet_input_locks l WHERE l.op_id = o.id)"
            " LIMIT ?)",
            (now - FAILED_OP_RETENTION_S, now, SWEEP_BATCH),
        ).rowcount))

    def by_quote(self, quote: str) -> Operation | None:
        ops = self._ops(
            "quote = ? AND kind = 'mint' AND state != 'failed' ORDER BY id DESC LIMIT 1", (quote,)
        )
        return ops[0] if ops else None

    def by_ref(self, ref: str) -> Operation | None:
        ops = self._ops("ref = ? ORDER BY state = 'failed', id DESC LIMIT 1", (ref,))
        return ops[0] if ops else None

    def unspent(self, mint: str, unit: str) -> list[Proof]:
        return self.db.read(lambda conn: [
            _proof_from_row(r) for r in conn.execute(
                "SELECT keyset_id, amount, secret, c, dleq FROM wallet_proofs"
                " WHERE mint = ? AND unit = ? AND state = 'unspent' ORDER BY amount, secret",
                (mint, unit),
            )
        ])

    def mark_spent(self, mint: str, secrets: Sequence[str]) -> None:
        def fn(conn: sqlite3.Connection) -> None:
            for s in secrets:
                conn.execute(
                    "UPDATE wallet_proofs SET state = 'spent' WHERE secret = ? AND mint = ?"
                    " AND state = 'unspent'", (s, mint),
                )

        self.db.transaction(fn, durable=True)

    def balances(self, unit: str) -> dict[str, int]:
        return self.db.read(lambda conn: {
            mint: total for mint, total in conn.execute(
                "SELECT mint, SUM(amount) FROM wallet_proofs WHERE unit = ? AND state = 'unspent'"
                " GROUP BY mint ORDER BY mint", (unit,),
            )
        })

    def save_quote(self, quote: QuoteRecord) -> None:
        def fn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO wallet_quotes (quote, mint, unit, amount, request, expiry, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (quote) DO NOTHING",
                (quote.quote, quote.mint, quote.unit, quote.amount, quote.request, quote.expiry,
                 self._clock()),
            )

        self.db.transaction(fn, durable=True)

    def quote(self, quote_id: str) -> QuoteRecord | None:
        row = self.db.read(lambda conn: conn.execute(
            "SELECT mint, unit, quote, amount, request, expiry FROM wallet_quotes WHERE quote = ?",
            (quote_id,),
        ).fetchone())
        return None if row is None else QuoteRecord(*row)

    # -- reporting (not part of the wallet's interface)

    def totals(self, unit: str = "sat") -> dict[str, int]:
        """Σ amount of our proofs by state, plus the counts of pending/failed operations."""
        def fn(conn: sqlite3.Connection) -> dict[str, int]:
            out = {s: 0 for s in ("unspent", "reserved", "spent", "issued")}
            for state, total in conn.execute(
                "SELECT state, SUM(amount) FROM wallet_proofs WHERE unit = ? GROUP BY state",
                (unit,),
            ):
                out[state] = int(total)
            for state, n in conn.execute("SELECT state, COUNT(*) FROM wallet_ops GROUP BY state"):
                out[f"ops_{state}"] = int(n)
            return out

        return self.db.read(fn)

    def operations(self, limit: int = 100) -> list[Operation]:
        return self._ops("1 ORDER BY id DESC LIMIT ?", (limit,))


# --------------------------------------------------------------------------- transport


def client_transport(http: HttpClient) -> Transport:
    """The wallet's `Transport` over the node's HTTP client.

    Errors keep what the wallet needs to know: a failure while *connecting* (refused, DNS,
    TLS, connect timeout) means the request never left — ``ConnectionRefusedError``; a read or
    write timeout — ``TimeoutError``; a broken exchange — ``ConnectionResetError``. The last
    two may have reached the mint.
    """

    async def call(method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        headers = [("accept", "application/json")]
        if body is not None:
            headers.append(("content-type", "application/json"))
        try:
            status, _headers, data = await http.fetch(method, url, headers, body or b"")
        except UpstreamConnectError as exc:  # includes UpstreamConnectTimeout: nothing sent
            raise ConnectionRefusedError(exc.detail) from exc
        except UpstreamTimeout as exc:
            raise TimeoutError(exc.detail) from exc
        except UpstreamError as exc:
            raise ConnectionResetError(getattr(exc, "detail", str(exc))) from exc
        return status, data

    return call


# --------------------------------------------------------------------------- node secrets


def setting_get_or_create(db: Database, name: str, make: Callable[[], str]) -> str:
    """A node-wide secret or setting (e.g. the wallet seed), created once, durably."""

    def op(conn: sqlite3.Connection) -> str:
        row = conn.execute("SELECT value FROM node_settings WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return str(row[0])
        value = make()
        conn.execute(
            "INSERT INTO node_settings (name, value, updated_at) VALUES (?, ?, ?)",
            (name, value, int(time.time())),
        )
        return value

    return db.transaction(op, durable=True)


# --------------------------------------------------------------------------- lightning invoices


@dataclass(frozen=True)
class Invoice:
    id: str
    quote: str
    mint: str
    bolt11: str
    amount_sats: int
    purpose: str  # create | topup
    account_id: int | None
    key_hash: str | None
    state: str  # pending | paid | expired
    created_at: int
    expires_at: int
    paid_at: int | None
    collected_at: int | None = None  # a 'create' key first handed out (see invoice_collect)


_INVOICE_COLUMNS = (
    "id, quote, mint, bolt11, amount_sats, purpose, account_id, key_hash, state, created_at,"
    " expires_at, paid_at"
)
_INVOICE_SELECT = _INVOICE_COLUMNS + ", collected_at"


def invoice_insert(db: Database, inv: Invoice) -> None:
    db.transaction(
        lambda c: c.execute(
            f"INSERT INTO lightning_invoices ({_INVOICE_COLUMNS})"  # noqa: S608 - constant
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (inv.id, inv.quote, inv.mint, inv.bolt11, inv.amount_sats, inv.purpose,
             inv.account_id, inv.key_hash, inv.state, inv.created_at, inv.expires_at,
             inv.paid_at),
        ),
        durable=True,
    )


def invoice_get(db: Database, *, invoice_id: str | None = None,
                bolt11: str | None = None) -> Invoice | None:
    where, arg = ("id = ?", invoice_id) if invoice_id is not None else ("bolt11 = ?", bolt11)
    row = db.read(lambda c: c.execute(
        f"SELECT {_INVOICE_SELECT} FROM lightning_invoices WHERE {where}",  # noqa: S608
        (arg,)).fetchone())
    return None if row is None else Invoice(*row)


def invoices_pending(db: Database, now: int) -> list[Invoice]:
    rows = db.read(lambda c: c.execute(
        f"SELECT {_INVOICE_SELECT} FROM lightning_invoices"  # noqa: S608 - constant
        " WHERE state = 'pending' ORDER BY created_at LIMIT 200").fetchall())
    return [Invoice(*r) for r in rows]


def invoice_mark(db: Database, invoice_id: str, state: str, *, account_id: int | None,
                 now: int) -> None:
    db.transaction(
        lambda c: c.execute(
            "UPDATE lightning_invoices SET state = ?, account_id = COALESCE(?, account_id),"
            " paid_at = CASE WHEN ? = 'paid' THEN ? ELSE paid_at END"
            " WHERE id = ? AND state = 'pending'",
            (state, account_id, state, now, invoice_id),
        ),
        durable=True,
    )


def invoice_collect(db: Database, invoice_id: str, now: int) -> bool:
    """Record that a paid invoice's key was handed out; True only for the first time (one
    conditional UPDATE: of two concurrent first collections, one wins)."""
    return bool(db.transaction(
        lambda c: c.execute(
            "UPDATE lightning_invoices SET collected_at = ? WHERE id = ? AND state = 'paid'"
            " AND collected_at IS NULL", (now, invoice_id),
        ).rowcount,
        durable=True,
    ))


#: An expired, never paid invoice (anyone may ask for one) is deleted this long after expiry.
EXPIRED_INVOICE_RETENTION_S = 24 * 3600


def invoices_sweep(db: Database, now: int) -> int:
    """Delete expired unpaid invoices past their retention, with their mint quotes (no mint
    operation refers to an unpaid quote); how many invoices."""
    def fn(c: sqlite3.Connection) -> int:
        cutoff = now - EXPIRED_INVOICE_RETENTION_S
        c.execute(
            "DELETE FROM wallet_quotes WHERE quote IN (SELECT quote FROM lightning_invoices"
            " WHERE state = 'expired' AND expires_at < ?)"
            " AND NOT EXISTS (SELECT 1 FROM wallet_ops o WHERE o.quote = wallet_quotes.quote)",
            (cutoff,))
        return int(c.execute(
            "DELETE FROM lightning_invoices WHERE state = 'expired' AND expires_at < ?",
            (cutoff,)).rowcount)

    return int(db.transaction(fn))
