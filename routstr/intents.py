"""Money intents: what a wallet operation means for the ledger, as frozen types.

Every wallet operation that moves a user's money carries one intent. It is written ahead — as
JSON in ``wallet_ops.purpose``, in the transaction that records the operation, before any mint
call — and applied by `ledger.apply_intent`, inside the same transaction as the proof changes
that justify it: a receive or mint applies its `Credit` / `CreateAccount` when the proofs are
stored (on *finish*), a send or melt its `Debit` when the operation is recorded (on *begin*)
and reverses it if the operation is rolled back. No other module decides what an operation
does to a balance; they only build intents.

`CreateAccount` and `Credit` may name a `fallback` (a `CreateAccount`): where the value goes if,
between the dry run before the mint call and the finish, the intent can no longer apply (its
key deleted or disabled meanwhile) — value is never parked on nothing (`walletstore`).

The JSON form is the one stored rows have always had (``{"action": "credit", ...}``), so
operations written ahead by an earlier version are applied the same after an upgrade;
`from_json` refuses anything else (an unknown action or key, a wrong type) with `ValueError`.
An operation without an intent (JSON ``null`` or ``{"action": "none"}``) is the node's own
money: fees, operator withdrawals and payouts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

CREDIT_KINDS: Final = ("deposit", "grant")
ACCOUNT_KINDS: Final = ("token", "xcashu", "api")
DEBIT_KINDS: Final = ("refund", "payout", "change")


@dataclass(frozen=True)
class CreateAccount:
    """Open the account `key_hash` funded with what the operation received."""

    key_hash: str
    kind: str = "token"  # token (a Cashu token as Bearer) | xcashu (one request) | api (sk-)
    ref: str | None = None  # the deposit's reference: credited once, ever
    memo: str | None = None
    amount_msats: int | None = None  # None: the operation's amount
    hint: str = ""
    refund_address: str | None = None
    refund_mint: str | None = None
    refund_unit: str | None = None
    balance_limit_msats: int | None = None
    balance_limit_reset: str | None = None
    validity_date: int | None = None
    fallback: CreateAccount | None = None


@dataclass(frozen=True)
class Credit:
    """Credit what the operation received to an existing, usable account."""

    account_id: int
    kind: str = "deposit"  # deposit | grant
    ref: str | None = None
    memo: str | None = None
    amount_msats: int | None = None  # None: the operation's amount
    fallback: CreateAccount | None = None


@dataclass(frozen=True)
class Debit:
    """Take `amount_msats` out of an account as the operation's token or payment leaves (and
    charge `rounding_msats`, a sub-sat rest the token cannot carry, with it)."""

    account_id: int
    amount_msats: int
    kind: str = "refund"  # refund | payout | change
    ref: str | None = None
    memo: str | None = None
    rounding_msats: int = 0


Intent = CreateAccount | Credit | Debit


@dataclass(frozen=True)
class WalletEvent:
    """What an intent is applied for: `apply` (on begin or finish) or `reverse` (rollback)."""

    action: str  # apply | reverse
    op_id: int
    op_kind: str  # receive | mint | send | melt
    amount_sat: int
    fee_sat: int
    ref: str | None
    now: int
    issued_sat: int = 0  # of `amount_sat`, what a receive issued back as a token (`keep=`)

_ACTIONS: Final[dict[str, type[Intent]]] = {
    "create_account": CreateAccount, "credit": Credit, "debit": Debit}
_NAMES: Final = {cls: name for name, cls in _ACTIONS.items()}
_KINDS: Final = {CreateAccount: ACCOUNT_KINDS, Credit: CREDIT_KINDS, Debit: DEBIT_KINDS}


def to_json(intent: Intent | None) -> dict[str, Any] | None:
    """The stored form: the action and every field that is set."""
    if intent is None:
        return None
    doc: dict[str, Any] = {"action": _NAMES[type(intent)]}
    for f in dataclasses.fields(intent):
        value = getattr(intent, f.name)
        if value is not None:
            doc[f.name] = to_json(value) if f.name == "fallback" else value
    return doc


def from_json(doc: Mapping[str, Any] | None) -> Intent | None:
    """The intent a stored purpose means; `ValueError` for anything malformed."""
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise ValueError(f"an intent is a JSON object, not {type(doc).__name__}")
    action = doc.get("action", "none")
    if action == "none" and len(doc) <= 1:
        return None
    cls = _ACTIONS.get(action) if isinstance(action, str) else None
    if cls is None:
        raise ValueError(f"unknown intent action {action!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(doc) - set(fields) - {"action"})
    if unknown:
        raise ValueError(f"{action}: unknown field(s) {', '.join(unknown)}")
    values = {name: _field(action, name, value) for name, value in doc.items()
              if name != "action"}
    try:
        intent = cls(**values)
    except TypeError as exc:  # a required field missing
        raise ValueError(f"{action}: {exc}") from None
    if intent.kind not in _KINDS[cls]:
        raise ValueError(f"{action}: kind must be one of {', '.join(_KINDS[cls])}")
    return intent


_INT_FIELDS: Final = ("account_id", "amount_msats", "rounding_msats", "balance_limit_msats",
                      "validity_date")


def _field(action: str, name: str, value: Any) -> Any:
    if name == "fallback":
        fallback = from_json(value)
        if fallback is not None and not isinstance(fallback, CreateAccount):
            raise ValueError(f"{action}: a fallback opens an account (create_account)")
        return fallback
    if value is None:
        return None
    if name in _INT_FIELDS:
        if type(value) is not int or value < 0:
            raise ValueError(f"{action}: {name} must be a non-negative integer")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{action}: {name} must be a string")
    return value
