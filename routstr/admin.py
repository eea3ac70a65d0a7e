"""Admin API (`/admin/api/*`): Bearer `--admin-token`, compared in constant time."""

from __future__ import annotations

import hashlib

from .errors import AuthenticationFailed, InvalidRequest
from .keys import generate_api_key, hash_key, key_hint, secrets_equal
from .ledger import Ledger
from .messages import Request, Response, json_response

MAX_GRANT_MSATS = 10**15


def create_key(ledger: Ledger, balance_msats: int, *, ref: str = "admin") -> tuple[str, int]:
    """A new prepaid `sk-` key holding `balance_msats` granted by the operator."""
    api_key = generate_api_key()
    account = ledger.create_account(key_hash=hash_key(api_key), kind="api",
                                    deposit_msats=balance_msats, source_kind="grant", ref=None,
                                    hint=key_hint(api_key))
    return api_key, account.balance_msats


class AdminHandlers:
    def __init__(self, ledger: Ledger, admin_token_hash: str) -> None:
        self.ledger = ledger
        self.admin_token_hash = admin_token_hash

    def authorize(self, request: Request) -> None:
        header = request.header("authorization") or ""
        scheme, _, token = header.strip().partition(" ")
        presented = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not token or not self.admin_token_hash:
            raise AuthenticationFailed("Admin token required", code="admin_auth_required")
        if not secrets_equal(presented, self.admin_token_hash):
            raise AuthenticationFailed("Invalid admin token", code="invalid_admin_token")

    async def create_key(self, request: Request, params: dict[str, str]) -> Response:
        self.authorize(request)
        body = request.json_object()
        amount = body.get("balance_msats", 0)
        if not isinstance(amount, int) or isinstance(amount, bool) or not (
                0 <= amount <= MAX_GRANT_MSATS):
            raise InvalidRequest("'balance_msats' must be a non-negative integer",
                                 code="invalid_amount")
        api_key, balance = create_key(self.ledger, amount)
        return json_response({"api_key": api_key, "balance_msats": balance}, 201)
