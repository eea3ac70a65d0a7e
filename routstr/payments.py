"""Who pays for a request: an `sk-` key, a Cashu token used as key, or an `X-Cashu` token.

`Payments.payer_for` turns the request's credentials into a ledger account to reserve from:

* `Authorization: Bearer sk-…` — a prepaid key (looked up by its hash).
* `Authorization: Bearer cashuA…/cashuB…` — the token *is* the key: its first use redeems it
  at the mint (swap) and opens an account whose key is `sk-` + sha256(token); later uses spend
  that balance without redeeming again.
* `X-Cashu: cashu…` (wins over Authorization) — pay per request: the token's face value is
  checked locally first (402 with a NUT-18 payment request when it cannot cover the worst
  case, token untouched), then redeemed into a one-request account; after settlement the
  remaining balance is returned as change (`X-Cashu` response header; for a stream the
  redeeming swap splits the token, so the change beyond the worst case is in the stream's
  response header and the rest in its final event — see `proxy.Relay`), recorded before it is
  sent so it can be recovered. The token
  pays for that one request only: a concurrent request with the same token is refused with
  nothing charged (425 while it is being redeemed, 400 once spent), never joins its account.

The Cashu parts are delegated to `CashuPayments` (routstr.cashupay) when mints are configured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from . import netguard
from .cashu import nut11
from .cashu.lnurl import LnurlError, resolve_url
from .errors import ApiError, AuthenticationFailed, InsufficientBalance, InvalidRequest
from .keys import ApiKeyCredential, CashuCredential, hash_key, parse_bearer, token_api_key
from .ledger import Account, Ledger, Settlement
from .messages import Request
from .money import format_sats
from .wire import MAX_UNIX_S, wire_int


@dataclass(frozen=True)
class Payer:
    account_id: int
    kind: str  # "key" | "token" | "xcashu"
    request_id: str = ""
    token_hash: str = ""  # X-Cashu: sha256 of the payment token (never the token itself)
    split_token: str = ""  # X-Cashu stream: change split off at redemption, for the head
    lock: str | None = None  # X-Cashu-Lock: change handed back is locked to this key (NUT-11)


@dataclass(frozen=True)
class Change:
    """X-Cashu change handed back in a stream: a token and the msats it is worth."""

    token: str
    msats: int


class CashuPort(Protocol):
    """What the Cashu side offers the proxy (implemented in routstr.cashupay)."""

    async def account_for_token(self, token: str) -> Account: ...

    async def xcashu_payer(self, token: str, worst_msats: int, model: str,
                           request_id: str, *, keep_msats: int | None = None,
                           lock: str | None = None) -> Payer: ...

    async def xcashu_change_header(self, payer: Payer) -> list[tuple[str, str]]: ...

    async def xcashu_stream_change(self, payer: Payer) -> Change | None: ...

    async def xcashu_refund_on_failure(self, payer: Payer, exc: ApiError) -> None: ...


class Payments:
    def __init__(self, ledger: Ledger, cashu: CashuPort | None) -> None:
        self.ledger = ledger
        self.cashu = cashu

    def _cashu(self) -> CashuPort:
        if self.cashu is None:
            raise InvalidRequest("This node accepts no Cashu mints", code="untrusted_mint",
                                 details={"accepted_mints": []})
        return self.cashu

    async def account_for(self, request: Request, *, create: bool = True) -> Account:
        """The account behind `Authorization` (redeeming a Cashu token on first use)."""
        credential = parse_bearer(request.authorization())
        if credential is None:
            raise AuthenticationFailed("Missing API key: use 'Authorization: Bearer sk-…'",
                                       code="missing_api_key")
        if isinstance(credential, ApiKeyCredential):
            account = self.ledger.get_account(hash_key(credential.api_key))
            if account is None:
                raise AuthenticationFailed("Invalid API key", code="invalid_api_key")
            return account
        assert isinstance(credential, CashuCredential)
        if not create:
            from .keys import token_api_key
            account = self.ledger.get_account(hash_key(token_api_key(credential.token)))
            if account is None:
                raise AuthenticationFailed(
                    "Key not found. Deposit first via /v1/wallet/create or use the token as key",
                    code="key_not_found")
            return account
        return await self._cashu().account_for_token(credential.token)

    async def payer_for(self, request: Request, worst_msats: int, model: str, *,
                        keep_msats: int | None = None) -> Payer:
        """`keep_msats`: the answer is a stream, whose head leaves before the cost is known (an
        X-Cashu payment then keeps this much, the most the request can cost — its ceiling, not
        its reservation: a prompt beyond its estimate is charged from what the payment has
        left — and hands the rest back in that head)."""
        xcashu = request.header("x-cashu")
        if xcashu and xcashu.strip():
            return await self._cashu().xcashu_payer(xcashu.strip(), worst_msats, model,
                                                    request.request_id, keep_msats=keep_msats,
                                                    lock=client_lock(request))
        account = await self.account_for(request)
        self._store_refund_policy(request, account)
        kind = "token" if account.kind == "token" else "key"
        return Payer(account.id, kind, request.request_id)

    def _store_refund_policy(self, request: Request, account: Account) -> None:
        """`Refund-LNURL` / `Key-Expiry-Time` request headers (routstr-core): refunds of this
        key go to that Lightning address. Stored on the key, never forwarded upstream."""
        address = request.header("refund-lnurl")
        expiry_raw = request.header("key-expiry-time")
        if expiry_raw is not None and not address:
            raise InvalidRequest("Key-Expiry-Time requires Refund-LNURL", code="invalid_header")
        if not address:
            return
        address = address.strip()
        try:  # the URL guard's syntax rules now; the address is checked when it is fetched
            netguard.check_syntax(resolve_url(address))
        except (LnurlError, netguard.Refused) as exc:
            raise InvalidRequest(f"Refund-LNURL must be a Lightning address or an LNURL: {exc}",
                                 code="invalid_header") from None
        expiry = None
        if expiry_raw is not None:
            expiry = wire_int(expiry_raw, "Key-Expiry-Time", high=MAX_UNIX_S)
        if account.is_child:
            raise InvalidRequest("Child keys cannot set a refund address",
                                 code="child_key_not_allowed")
        self.ledger.set_refund_address(account.id, refund_address=address,
                                       refund_expiry=expiry)

    @staticmethod
    def stream_headers(payer: Payer) -> list[tuple[str, str]]:
        """Headers of a stream's head: X-Cashu change split off at redemption (the rest of the
        change rides in the stream's final event, `after_stream`)."""
        return [("x-cashu", payer.split_token)] if payer.split_token else []

    async def after_success(self, payer: Payer,
                            settlement: Settlement | None) -> Sequence[tuple[str, str]]:
        if payer.kind == "xcashu" and self.cashu is not None:
            return await self.cashu.xcashu_change_header(payer)
        return []

    async def after_stream(self, payer: Payer, settlement: Settlement | None) -> Change | None:
        if payer.kind == "xcashu" and self.cashu is not None:
            return await self.cashu.xcashu_stream_change(payer)
        return None

    async def after_failure(self, payer: Payer, exc: ApiError) -> None:
        if payer.kind == "xcashu" and self.cashu is not None:
            await self.cashu.xcashu_refund_on_failure(payer, exc)

    @staticmethod
    def explain(request: Request, payer: Payer, exc: ApiError) -> ApiError:
        """A Cashu token used as the key that is too small for the request was still redeemed
        (unlike X-Cashu, which is handed back untouched): say so in the 402, with the key it is
        now and what it holds, so the client knows the token is spent but not lost."""
        credential = parse_bearer(request.authorization())
        if (payer.kind != "token" or not isinstance(exc, InsufficientBalance)
                or not isinstance(credential, CashuCredential)):
            return exc
        key = token_api_key(credential.token)
        held = int(exc.details.get("available", 0))
        return InsufficientBalance(
            f"{exc.message} Your Cashu token was redeemed and is now a key holding"
            f" {format_sats(held)} sats ({held} msats): keep using the same token (or {key})"
            " as the Bearer key, top it up with POST /v1/balance/topup, or take the balance"
            " back with POST /v1/balance/refund.",
            code=exc.code, headers=exc.headers,
            details={**exc.details, "token_redeemed": True, "api_key": key,
                     "balance_msats": held})


def client_lock(request: Request) -> str | None:
    """`X-Cashu-Lock: <compressed public key>`: Cashu the node hands back for this request
    (X-Cashu change, a refund) is locked to that key (NUT-11 P2PK), so a copy of it in a header
    or a log is worthless to anyone without the client's key. Not a key: 400."""
    raw = request.header("x-cashu-lock")
    if raw is None or not raw.strip():
        return None
    try:
        return nut11.client_key(raw)
    except nut11.LockError as exc:
        raise InvalidRequest(f"X-Cashu-Lock must be a compressed secp256k1 public key: {exc}",
                             code="invalid_header") from None
