"""The key's own view: `/v1/balance/*` (and routstr-core's `/v1/wallet/*` aliases), transactions.

All amounts are integer **msats**. `balance` is the spendable balance (reservations of requests
in flight are in `reserved`, not in `balance`), as routstr-core and its clients read it.
"""

from __future__ import annotations

from typing import Any

from .cashupay import CashuPayments, require_token_param
from .errors import Forbidden, InvalidRequest, NotFound
from .keys import (
    ApiKeyCredential,
    CashuCredential,
    generate_api_key,
    hash_key,
    key_hint,
    parse_bearer,
)
from .ledger import MAX_MSATS, Account, Ledger
from .messages import Request, Response, bounded_int, json_response
from .money import MSAT_PER_SAT, sub_sat_note
from .payments import Payments, client_lock
from .walletstore import invoice_get
from .wire import MAX_UNIX_S, wire_int

MAX_PAGE = 500


class BalanceHandlers:
    def __init__(self, ledger: Ledger, payments: Payments) -> None:
        self.ledger = ledger
        self.payments = payments

    def _presented_key(self, request: Request) -> str | None:
        cred = parse_bearer(request.authorization())
        if isinstance(cred, ApiKeyCredential):
            return cred.api_key
        if isinstance(cred, CashuCredential):
            return cred.api_key
        return None

    def account_doc(self, account: Account, api_key: str | None) -> dict[str, Any]:
        paying = account
        if account.parent_id is not None:
            parent = self.ledger.get_account_by_id(account.parent_id)
            if parent is not None:
                paying = parent
        doc: dict[str, Any] = {
            "api_key": api_key or f"sk-…{account.hint}",
            "balance": paying.balance_msats,
            "reserved": self.ledger.reserved_by(account),
            "total_spent": account.usage_msats,
            "total_requests": account.total_requests,
            "balance_limit": account.balance_limit_msats,
            "balance_limit_reset": account.balance_limit_reset,
            "validity_date": account.validity_date,
            "is_child": account.is_child,
            "unit": "msat",
        }
        if account.is_child:
            doc["parent_key_preview"] = f"sk-…{paying.hint}"
        else:
            # a refund pays whole sats: what it would pay now, and what would stay, and why
            whole, sub_sat = divmod(paying.balance_msats, MSAT_PER_SAT)
            doc["refundable_msats"] = whole * MSAT_PER_SAT
            doc["sub_sat_msats"] = sub_sat
            if sub_sat:
                doc["sub_sat_note"] = sub_sat_note(sub_sat)
            kids = self.ledger.children(account.id)
            if kids:
                doc["child_keys"] = [{
                    "api_key": f"sk-…{k.hint}", "total_requests": k.total_requests,
                    "total_spent": k.usage_msats, "balance_limit": k.balance_limit_msats,
                    "balance_limit_reset": k.balance_limit_reset,
                    "validity_date": k.validity_date,
                } for k in kids]
        return doc

    async def info(self, request: Request, params: dict[str, str]) -> Response:
        account = await self.payments.account_for(request)
        return json_response(self.account_doc(account, self._presented_key(request)))

    async def transactions(self, request: Request, params: dict[str, str]) -> Response:
        account = await self.payments.account_for(request, create=False)
        limit = bounded_int(request.query("limit"), "limit", 50, 1, MAX_PAGE)
        offset = bounded_int(request.query("offset"), "offset", 0, 0, 1 << 62)
        rows, total = self.ledger.transactions(account.id, limit=limit, offset=offset)
        data = [{
            "id": r.id, "created_at": r.time, "type": r.kind, "amount_msats": r.amount_msats,
            "request_id": r.request_id, "memo": r.memo,
        } for r in rows]
        return json_response({"data": data, "has_more": offset + len(rows) < total,
                              "total": total, "limit": limit, "offset": offset})


def _opt_int(doc: dict[str, Any], request: Request, name: str, high: int) -> int | None:
    """A JSON field or query parameter as an int in [0, high]; absent → None; else 400."""
    value: Any = doc.get(name, request.query(name))
    if value is None or value == "":
        return None
    return wire_int(value, name, high=high)


def _opt_reset(doc: dict[str, Any], request: Request) -> str | None:
    value = doc.get("balance_limit_reset", request.query("balance_limit_reset"))
    if value in (None, ""):
        return None
    if value not in ("daily", "weekly", "monthly"):
        raise InvalidRequest("balance_limit_reset must be daily, weekly or monthly",
                             code="invalid_parameter")
    return str(value)


class CashuBalanceHandlers:
    """Create / top up / refund with Cashu, Lightning invoices, child keys."""

    def __init__(self, ledger: Ledger, payments: Payments, cashu: CashuPayments | None,
                 child_key_cost_msats: int) -> None:
        self.ledger = ledger
        self.payments = payments
        self.cashu = cashu
        self.child_key_cost_msats = child_key_cost_msats

    def _need_cashu(self) -> CashuPayments:
        if self.cashu is None:
            raise InvalidRequest("This node accepts no Cashu mints", code="untrusted_mint",
                                 details={"accepted_mints": []})
        return self.cashu

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        return request.json_object() if request.body.strip() else {}

    async def create(self, request: Request, params: dict[str, str]) -> Response:
        cashu = self._need_cashu()
        doc = self._body(request)
        text = require_token_param(doc.get("initial_balance_token",
                                           request.query("initial_balance_token")))
        limit = _opt_int(doc, request, "balance_limit", MAX_MSATS)
        api_key, account = await cashu.create_key(
            text, balance_limit_msats=limit, balance_limit_reset=_opt_reset(doc, request),
            validity_date=_opt_int(doc, request, "validity_date", MAX_UNIX_S))
        return json_response({"api_key": api_key, "balance": account.balance_msats})

    async def topup(self, request: Request, params: dict[str, str]) -> Response:
        cashu = self._need_cashu()
        doc = self._body(request)
        text = require_token_param(doc.get("cashu_token", request.query("cashu_token")))
        account = await self.payments.account_for(request)
        updated, added = await cashu.topup(account, text)
        return json_response({"msats": added, "amount_added": added,
                              "balance": updated.balance_msats})

    async def refund(self, request: Request, params: dict[str, str]) -> Response:
        cashu = self._need_cashu()
        xcashu = request.header("x-cashu")
        if xcashu and xcashu.strip():
            token, msats = await cashu.recover_change(xcashu, client_lock(request))
            return json_response({"token": token, "msats": msats, "sats": str(msats // 1000)},
                                 headers=[("x-cashu", token)])
        account = await self.payments.account_for(request, create=False)
        return json_response(await cashu.refund(account, client_lock(request)))

    async def child_keys(self, request: Request, params: dict[str, str]) -> Response:
        parent = await self.payments.account_for(request)
        if parent.is_child:
            raise InvalidRequest("Child keys cannot create child keys",
                                 code="child_key_not_allowed")
        doc = self._body(request)
        count = doc.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 50:
            raise InvalidRequest("count must be between 1 and 50", code="invalid_parameter")
        keys = [generate_api_key() for _ in range(count)]
        self.ledger.create_children(
            parent.id, [hash_key(k) for k in keys],
            balance_limit_msats=_opt_int(doc, request, "balance_limit", MAX_MSATS),
            balance_limit_reset=_opt_reset(doc, request),
            validity_date=_opt_int(doc, request, "validity_date", MAX_UNIX_S),
            cost_msats_each=self.child_key_cost_msats, hints=[key_hint(k) for k in keys])
        after = self.ledger.get_account_by_id(parent.id)
        assert after is not None
        cost = self.child_key_cost_msats * count
        return json_response({"api_keys": keys, "count": count, "cost_msats": cost,
                              "cost_sats": cost // 1000, "parent_balance": after.balance_msats,
                              "parent_balance_sats": after.balance_msats // 1000})

    async def child_key_reset(self, request: Request, params: dict[str, str]) -> Response:
        parent = await self.payments.account_for(request)
        doc = self._body(request)
        child_key = doc.get("child_key")
        if not isinstance(child_key, str):
            raise InvalidRequest("child_key is required", code="invalid_parameter")
        child = self.ledger.get_account(hash_key(child_key))
        if child is None or child.parent_id is None:
            raise NotFound("Child key not found", code="key_not_found")
        if child.parent_id != parent.id:
            raise Forbidden("Not the parent of this key", code="not_parent")
        self.ledger.reset_child(parent.id, child.id)
        return json_response({"success": True, "message": "Child key usage reset"})

    # ---- Lightning ----------------------------------------------------------------------------
    async def invoice(self, request: Request, params: dict[str, str]) -> Response:
        cashu = self._need_cashu()
        doc = self._body(request)
        amount = doc.get("amount_sats")
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise InvalidRequest("amount_sats must be an integer", code="invalid_amount")
        purpose = doc.get("purpose", "create")
        if purpose not in ("create", "topup"):
            raise InvalidRequest("purpose must be create or topup", code="invalid_parameter")
        account = None
        if purpose == "topup":
            if request.header("authorization") is None and isinstance(doc.get("api_key"), str):
                request = Request(request.method, request.target,
                                  (*request.headers, ("authorization", f"Bearer {doc['api_key']}")),
                                  request.body, request.request_id, request.client)
            account = await self.payments.account_for(request)
        return json_response(await cashu.create_invoice(amount, purpose, account))

    async def invoice_status(self, request: Request, params: dict[str, str]) -> Response:
        cashu = self._need_cashu()
        inv = invoice_get(cashu.db, invoice_id=params["invoice_id"])
        if inv is None:
            raise NotFound("Invoice not found", code="invoice_not_found")
        inv = await cashu.settle_invoice(inv)
        return json_response(cashu.invoice_status(inv))

    async def invoice_recover(self, request: Request, params: dict[str, str]) -> Response:
        cashu = self._need_cashu()
        doc = self._body(request)
        bolt11, invoice_id = doc.get("bolt11"), doc.get("invoice_id")
        if not isinstance(bolt11, str):
            raise InvalidRequest("bolt11 is required", code="invalid_parameter")
        if invoice_id is not None and not isinstance(invoice_id, str):
            raise InvalidRequest("invoice_id must be a string", code="invalid_parameter")
        inv = invoice_get(cashu.db, bolt11=bolt11.strip())
        if inv is None:
            raise NotFound("Invoice not found", code="invoice_not_found")
        inv = await cashu.settle_invoice(inv)
        return json_response(cashu.invoice_recover(inv, invoice_id))
