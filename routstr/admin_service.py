"""What the operator can do, behind both the admin API and the dashboard (`admin` serves both).

Each method validates its input (raising the spec's errors), runs the ledger or an
`admin_store` query in its own short transaction, and returns JSON-able documents. Amounts are
integer msats, except the wallet's (the wallet's unit, sat).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

from . import __version__, admin_store
from .admin_page import sats
from .config import Config
from .db import Database
from .errors import InvalidRequest, NotFound, ServiceUnavailable
from .keys import generate_api_key, hash_key, key_hint
from .ledger import LIMIT_RESETS, Account, Ledger, LedgerInvariantError, TxRow
from .pricebook import PRICE_FIELDS, PriceBook
from .status import setup_problems
from .wire import wire_int

log = logging.getLogger("routstr.admin")

MAX_GRANT_MSATS: Final = 10**15
MAX_PAGE: Final = 200
BOOKS_CHECK_CACHE_S: Final = 300.0  # the invariant check scans everything


def create_key(ledger: Ledger, balance_msats: int, *, ref: str = "admin") -> tuple[str, int]:
    """A new prepaid `sk-` key holding `balance_msats` granted by the operator."""
    api_key, account = new_key(ledger, balance_msats)
    return api_key, account.balance_msats


def new_key(ledger: Ledger, balance_msats: int, *, balance_limit_msats: int | None = None,
            balance_limit_reset: str | None = None,
            validity_date: int | None = None) -> tuple[str, Account]:
    """A new `sk-` key (shown once: only its hash is stored), funded by an operator grant."""
    api_key = generate_api_key()
    account = ledger.create_account(key_hash=hash_key(api_key), kind="api",
                                    deposit_msats=balance_msats, source_kind="grant", ref=None,
                                    hint=key_hint(api_key),
                                    balance_limit_msats=balance_limit_msats,
                                    balance_limit_reset=balance_limit_reset,
                                    validity_date=validity_date)
    return api_key, account


def _msats_value(value: Any, name: str, *, nullable: bool = False, positive: bool = False) -> Any:
    if value is None and nullable:
        return None
    if type(value) is not int or not (1 if positive else 0) <= value <= MAX_GRANT_MSATS:
        raise InvalidRequest(f"'{name}' must be a {'positive' if positive else 'non-negative'}"
                             " integer (msats)" + (" or null" if nullable else ""),
                             code="invalid_amount")
    return value


def _reset_value(value: Any) -> str | None:
    if value is None or value in LIMIT_RESETS:
        return value  # type: ignore[no-any-return]
    raise InvalidRequest(f"'balance_limit_reset' must be one of {', '.join(LIMIT_RESETS)}"
                         " or null", code="invalid_parameter")


def _validity_value(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value < 1 << 40:
        raise InvalidRequest("'validity_date' must be unix seconds or null",
                             code="invalid_parameter")
    return value


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------


def key_doc(a: Account) -> dict[str, Any]:
    return {
        "id": a.id,
        "key": f"sk-…{a.hint}",
        "hint": a.hint,
        "kind": a.kind,
        "parent_id": a.parent_id,
        "balance_msats": a.balance_msats,
        "reserved_msats": a.reserved_msats,
        "spent_msats": a.spent_msats,
        "usage_msats": a.usage_msats,
        "deposited_msats": a.deposited_msats,
        "granted_msats": a.granted_msats,
        "refunded_msats": a.refunded_msats,
        "total_requests": a.total_requests,
        "created_at": a.created_at,
        "last_used_at": a.last_used_at,
        "disabled": a.disabled,
        "balance_limit_msats": a.balance_limit_msats,
        "balance_limit_reset": a.balance_limit_reset,
        "limit_spent_msats": a.limit_spent_msats,
        "validity_date": a.validity_date,
    }


def tx_doc(row: TxRow, hint: str) -> dict[str, Any]:
    return {
        "id": row.id,
        "time": row.time,
        "kind": row.kind,
        "key_id": row.key_id,
        "child_id": row.child_id,
        "key": f"sk-…{hint}" if hint else "",
        "amount_msats": row.amount_msats,
        "request_id": row.request_id,
        "ref": row.ref,
        "memo": row.memo,
    }


def page_doc(data: list[Any], total: int, limit: int, offset: int) -> dict[str, Any]:
    return {"data": data, "total": total, "limit": limit, "offset": offset,
            "has_more": offset + len(data) < total}


def withdrawable_note(o: Mapping[str, Any], split: Mapping[str, int] | None,
                      taken_sats: int) -> str:
    """One line under the earnings: how much of them the operator can withdraw now, and why
    that is less (the earnings count every charge; only ecash the users are not owed can go)."""
    earned = o["earnings_msats"]
    head = f"Earnings {sats(earned)} sat"
    if split is None:
        return head + "; none can be withdrawn here: this node has no Cashu wallet (no mint)."
    free, total, held = split["withdrawable"], split["total"], split["held_for_users"]
    head += f", of which {free:,} sat are withdrawable"
    wallet = (f"the wallet holds {total:,} sat of ecash; users' balances and requests in"
              f" flight claim {held:,} sat of it (rounded up to whole sats)")
    if free * 1000 >= earned:
        return f"{head}: {wallet}."
    why = []
    if o["granted_msats"]:
        why.append(f"earnings from admin-granted balance are not backed by ecash"
                   f" ({sats(o['granted_msats'])} sat granted in all)")
    if taken_sats:
        why.append(f"{taken_sats:,} sat were taken out before (withdrawals and payouts)")
    return f"{head}: " + "; ".join([*why, wallet]) + "."


# --------------------------------------------------------------------------------------------
# The wallet, as the admin sees it
# --------------------------------------------------------------------------------------------


class AdminWallet(Protocol):
    """What the dashboard needs from the node's Cashu wallet (see `app.NodeWallet`)."""

    def summary(self) -> dict[str, Any]:
        """{"unit", "mints": [{"mint", "balance", "proofs"}], "pending": [{...}], ...}"""
        ...

    def withdrawable(self) -> dict[str, int]:
        """{"total", "held_for_users", "withdrawable"} in sats: what `withdraw` and `pay_out`
        check a request against (the same function)."""
        ...

    async def withdraw(self, amount_sats: int, mint: str | None) -> dict[str, Any]:
        """Take `amount_sats` of the node's own money out as a Cashu token: {"token", ...}."""
        ...

    async def pay_out(self, address: str, amount_sats: int) -> dict[str, Any]:
        """Pay `amount_sats` of the node's own money to a Lightning address now."""
        ...


# --------------------------------------------------------------------------------------------
# The service: what the API and the dashboard can do
# --------------------------------------------------------------------------------------------


@dataclass
class AdminService:
    config: Config
    db: Database
    ledger: Ledger
    prices: PriceBook
    probes: Mapping[str, Callable[[], Awaitable[str]]]
    wallet: AdminWallet | None = None
    clock: Callable[[], float] = time.time
    started_at: float = field(default_factory=time.time)
    _books: tuple[float, str] = (-1e18, "")
    npub: str = ""  # the node's Nostr identity (issue 12), shown with the settings

    def now(self) -> int:
        return int(self.clock())

    # -- overview ------------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        now = self.now()
        doc = self.db.read(lambda c: admin_store.overview(c, now))
        doc["earnings_per_hour"] = self.db.read(lambda c: admin_store.earnings_per_hour(c, now))
        doc["time"] = now
        split = self.wallet.withdrawable() if self.wallet is not None else None
        taken = self.db.read(admin_store.taken_out_sats) if split is not None else 0
        doc["withdrawable_sats"] = split["withdrawable"] if split is not None else None
        doc["withdrawable_msats"] = split["withdrawable"] * 1000 if split is not None else None
        doc["withdrawable_note"] = withdrawable_note(doc, split, taken)
        return doc

    # -- keys ------------------------------------------------------------------------------

    def list_keys(self, *, search: str, kinds: tuple[str, ...], limit: int,
                  offset: int) -> dict[str, Any]:
        rows, total = self.db.read(lambda c: admin_store.list_keys(
            c, search=search, kinds=kinds, limit=limit, offset=offset))
        return page_doc([key_doc(a) for a in rows], total, limit, offset)

    def get_key(self, key_id: int) -> dict[str, Any]:
        acct = self.db.read(lambda c: admin_store.require_key(c, key_id))
        doc = key_doc(acct)
        kids, _ = self.db.read(lambda c: admin_store.list_keys(
            c, parent_id=acct.id, limit=MAX_PAGE, offset=0))
        doc["children"] = [key_doc(k) for k in kids]
        return doc

    def create_key(self, body: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(body) - {"balance_msats", "balance_limit_msats", "balance_limit_reset",
                               "validity_date"}
        if unknown:
            raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}",
                                 code="invalid_parameter")
        amount = _msats_value(body.get("balance_msats", 0), "balance_msats")
        api_key, acct = new_key(
            self.ledger, amount,
            balance_limit_msats=_msats_value(body.get("balance_limit_msats"),
                                             "balance_limit_msats", nullable=True),
            balance_limit_reset=_reset_value(body.get("balance_limit_reset")),
            validity_date=_validity_value(body.get("validity_date")))
        log.info("admin created key #%d (…%s) with %d msats", acct.id, acct.hint, amount)
        return {"api_key": api_key, "balance_msats": acct.balance_msats, "key": key_doc(acct)}

    def update_key(self, key_id: int, body: Mapping[str, Any]) -> dict[str, Any]:
        allowed = {"disabled", "balance_limit_msats", "balance_limit_reset", "validity_date"}
        unknown = set(body) - allowed
        if unknown or not body:
            raise InvalidRequest(
                f"give one or more of {', '.join(sorted(allowed))}"
                + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else ""),
                code="invalid_parameter")
        disabled = body.get("disabled")
        if "disabled" in body and not isinstance(disabled, bool):
            raise InvalidRequest("'disabled' must be true or false", code="invalid_parameter")
        limits: dict[str, Any] = {}
        if "balance_limit_msats" in body:
            limits["balance_limit_msats"] = _msats_value(
                body["balance_limit_msats"], "balance_limit_msats", nullable=True)
        if "balance_limit_reset" in body:
            limits["balance_limit_reset"] = _reset_value(body["balance_limit_reset"])
        if "validity_date" in body:
            limits["validity_date"] = _validity_value(body["validity_date"])
        now = self.now()

        def op(conn: Any) -> Account:
            acct = admin_store.require_key(conn, key_id)
            if isinstance(disabled, bool):
                acct = admin_store.set_disabled(conn, key_id, disabled, now=now)
            if limits:
                acct = admin_store.set_limits(conn, key_id, now=now, **limits)
            return acct

        acct = self.db.transaction(op)
        log.info("admin updated key #%d: %s", key_id, sorted(body))
        return key_doc(acct)

    def grant(self, key_id: int, amount_msats: Any) -> dict[str, Any]:
        amount = _msats_value(amount_msats, "amount_msats", positive=True)
        self.db.read(lambda c: admin_store.require_key(c, key_id))
        acct = self.ledger.credit(key_id, amount, kind="grant", memo="admin grant")
        log.info("admin granted %d msats to key #%d", amount, acct.id)
        return key_doc(acct)

    def delete_key(self, key_id: int) -> dict[str, Any]:
        now = self.now()
        gone = self.db.transaction(lambda c: admin_store.delete_key(c, key_id, now=now))
        log.info("admin deleted key(s) %s", gone)
        return {"deleted": gone}

    # -- transactions ----------------------------------------------------------------------

    def key_filter(self, term: str) -> tuple[int, ...] | None:
        """A key filter given as an id (``#12`` or ``12``), a full key, or its last 4."""
        term = term.strip()
        if not term:
            return None
        if term.lstrip("#").isdigit() and (term.startswith("#") or len(term) < 4):
            return (wire_int(term.lstrip("#"), "key"),)  # '#' + 30 digits, '#²': 400
        rows, _ = self.db.read(lambda c: admin_store.list_keys(
            c, search=term, limit=MAX_PAGE, offset=0))
        return tuple(a.id for a in rows)

    def transactions(self, *, key_ids: tuple[int, ...] | None, kinds: tuple[str, ...],
                     since: int | None, until: int | None, limit: int,
                     offset: int) -> dict[str, Any]:
        if key_ids == ():
            return page_doc([], 0, limit, offset)
        f = admin_store.TxFilter(key_ids=key_ids, kinds=kinds, since=since, until=until)
        rows, total = self.db.read(lambda c: admin_store.transactions(
            c, f, limit=limit, offset=offset))
        return page_doc([tx_doc(r, h) for r, h in rows], total, limit, offset)

    def tx_kinds(self) -> list[str]:
        return list(admin_store.TX_KINDS)

    # -- prices ----------------------------------------------------------------------------

    def price_list(self) -> dict[str, Any]:
        default = self.prices.default
        return {
            "data": self.prices.entries(),
            "default": self.prices.price_fields(default) if default else None,
            "fields": list(PRICE_FIELDS),
        }

    def set_price(self, model_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            price = self.prices.set_override(model_id, body)
        except ValueError as exc:
            raise InvalidRequest(str(exc), code="invalid_price") from None
        return next(e for e in self.prices.entries() if e["id"] == price.id)

    def clear_price(self, model_id: str) -> dict[str, Any]:
        if not self.prices.clear_override(model_id):
            raise NotFound(f"No price override for '{model_id}'", code="override_not_found")
        return {"model": model_id, "removed": True}

    # -- health and settings ---------------------------------------------------------------

    def books(self) -> str:
        """The ledger's invariant check (a full scan), cached for a minute."""
        at, result = self._books
        if time.monotonic() - at > BOOKS_CHECK_CACHE_S:
            try:
                self.ledger.check_invariant()
                result = "ok"
            except LedgerInvariantError as exc:
                result = f"error: {exc}"[:2000]
            self._books = (time.monotonic(), result)
        return result

    async def health(self) -> dict[str, Any]:
        checks = {name: await probe() for name, probe in self.probes.items()}
        checks["ledger"] = self.books()
        healthy = all(v in ("ok", "not_configured") for v in checks.values())
        reasons = setup_problems(self.config)  # the same as /health's and the start-up log's
        return {
            "status": "unhealthy" if not healthy else "degraded" if reasons else "healthy",
            "reasons": reasons,
            "version": __version__,
            "checks": checks,
            "schema_version": self.db.schema_version,
            "uptime_s": int(time.time() - self.started_at),
            "models": len(self.prices),
            "price_overrides": len(self.prices.overrides),
            "wallet": "configured" if self.wallet is not None else "not_configured",
        }

    def settings(self) -> dict[str, Any]:
        """The running configuration: secrets masked, and credentials inside URLs too."""
        def show(value: Any) -> Any:
            if isinstance(value, tuple):
                return [show(v) for v in value]
            if isinstance(value, str) and "://" in value and "@" in value:
                parts = urlsplit(value)
                if parts.username or parts.password:
                    host = parts.netloc.rsplit("@", 1)[1]
                    return parts._replace(netloc="********@" + host).geturl()
            return value
        return {"npub": self.npub, **{name: show(v) for name, v in self.config.public_items()}}

    # -- wallet ----------------------------------------------------------------------------

    def _wallet(self) -> AdminWallet:
        if self.wallet is None:
            raise ServiceUnavailable("This node has no Cashu wallet (no mint configured).",
                                     code="wallet_not_configured")
        return self.wallet

    def wallet_summary(self) -> dict[str, Any]:
        return self._wallet().summary()

    async def withdraw(self, body: Mapping[str, Any]) -> dict[str, Any]:
        amount = body.get("amount_sats")
        if type(amount) is not int or amount <= 0:
            raise InvalidRequest("'amount_sats' must be a positive integer",
                                 code="invalid_amount")
        mint = body.get("mint")
        if mint is not None and not isinstance(mint, str):
            raise InvalidRequest("'mint' must be a mint URL", code="invalid_parameter")
        result = await self._wallet().withdraw(amount, mint or None)
        log.info("admin withdrew %d sats as a token", amount)
        return result

    async def pay_out(self, body: Mapping[str, Any]) -> dict[str, Any]:
        amount = body.get("amount_sats")
        address = body.get("lightning_address")
        if type(amount) is not int or amount <= 0:
            raise InvalidRequest("'amount_sats' must be a positive integer",
                                 code="invalid_amount")
        if not isinstance(address, str) or not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+",
                                                            address.strip()):
            raise InvalidRequest("'lightning_address' must look like name@domain",
                                 code="invalid_lightning_address")
        result = await self._wallet().pay_out(address.strip(), amount)
        log.info("admin paid out %d sats to a lightning address", amount)
        return result
