"""The key's own view: `/v1/balance/*` (and routstr-core's `/v1/wallet/*` aliases), transactions.

All amounts are integer **msats**. `balance` is the spendable balance (reservations of requests
in flight are in `reserved`, not in `balance`), as routstr-core and its clients read it.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidRequest
from .keys import ApiKeyCredential, CashuCredential, parse_bearer
from .ledger import Account, Ledger
from .messages import Request, Response, json_response
from .payments import Payments

MAX_PAGE = 500


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an integer", code="invalid_parameter") from None
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low} and {high}",
                             code="invalid_parameter")
    return value


class BalanceHandlers:
    def __init__(self, ledger: Ledger, payments: Payments) -> None:
        self.ledger = ledger
        self.payments = payments

    def _presented_key(self, request: Request) -> str | None:
        cred = parse_bearer(request.header("authorization"))
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
        limit = _int_param(request, "limit", 50, 1, MAX_PAGE)
        offset = _int_param(request, "offset", 0, 0, 1 << 62)
        rows, total = self.ledger.transactions(account.id, limit=limit, offset=offset)
        data = [{
            "id": r.id, "created_at": r.time, "type": r.kind, "amount_msats": r.amount_msats,
            "request_id": r.request_id, "memo": r.memo,
        } for r in rows]
        return json_response({"data": data, "has_more": offset + len(rows) < total,
                              "total": total, "limit": limit, "offset": offset})
