"""Paying with Cashu: a token as the key, X-Cashu per request with change, top-up, refund,
Lightning invoices — every flow through the write-ahead wallet and the ledger.

A token is "paid" only once the mint has swapped its proofs for fresh ones we alone know
(`Wallet.receive`); the ledger account it funds is created or credited by the wallet store in
the same sqlite transaction that stores those proofs (a *purpose*), so no crash can lose or
double-credit a token. Money going out (change, refunds) is debited from the account when the
wallet records its intent, and the token is stored under a reference before it is returned,
so a client that lost it can fetch it again (`POST /v1/balance/refund` with the original
token in `X-Cashu`), also after a restart.

Recovery is bounded in time where the spec does not make the token a credential: a token used
as Bearer *is* its key, for good; but re-posting a redeemed token to `/v1/balance/create`, or an
X-Cashu payment token to the change recovery, returns the key or the change already handed out
only within `recovery_window_s` of the redemption / hand-out (the lost-answer case) — not days
later to whoever saw the token. A paid Lightning `create` invoice's key is returned for the bare
bolt11 (`POST /lightning/recover`) only until it was first collected; then only with the
invoice id, which the creator alone got.

Units: the wallet holds `sat` proofs; the ledger counts msats. Change and refunds are whole
sats (rounded down, in the node's favour); the sub-sat remainder of a one-request X-Cashu
account is charged as rounding so that account ends empty.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import anyio

from . import intents
from .cashu.lnurl import LnurlError
from .cashu.mint import MintError, MintUnreachable, ProofsAlreadySpent, ProofsPending
from .cashu.tokens import NUT10Option, PaymentRequest, Token, TokenError, parse_token
from .cashu.wallet import (
    InsufficientFunds,
    LockRefused,
    OperationPending,
    PurposeRefused,
    TokenTooSmall,
    UnitMismatch,
    Wallet,
    WalletError,
    normalize_mint_url,
    proof_y,
)
from .db import Database
from .errors import (
    ApiError,
    Conflict,
    Forbidden,
    InsufficientBalance,
    InternalError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    TooEarly,
    UnprocessableEntity,
    UpstreamError,
)
from .keys import hash_key, key_hint, token_api_key, token_deposit_ref
from .ledger import MAX_MSATS, Account, Ledger
from .money import MSAT_PER_SAT, ceil_div, format_sats, sub_sat_note
from .payments import Change, Payer
from .walletstore import (
    Invoice,
    invoice_collect,
    invoice_get,
    invoice_insert,
    invoice_mark,
    invoices_pending,
    invoices_sweep,
    setting_get_or_create,
)

log = logging.getLogger("routstr.cashu")

REDEEM_WAIT_S = 15.0  # a concurrent redemption of the same token: wait this long for it
INVOICE_TTL_S = 3600
MAX_INVOICE_SATS = 1_000_000
CHANGE_TIMEOUT_S = 30.0


def xcashu_key_hash(token: str) -> str:
    """The one-request account of an X-Cashu payment (never usable as a Bearer key)."""
    return hashlib.sha256(b"routstr x-cashu\x00" + token.encode()).hexdigest()


def _mint_error(exc: MintError | WalletError, *, echo: str | None = None) -> ApiError:
    """Wallet/mint failures → the spec's errors with routstr-core's stable codes."""
    headers = [("x-cashu", echo)] if echo else []
    if isinstance(exc, ProofsAlreadySpent):
        return InvalidRequest("Cashu token already spent", code="cashu_token_already_spent")
    if isinstance(exc, ProofsPending):
        return InvalidRequest("Cashu token is pending at the mint", code="cashu_token_pending",
                              headers=headers)
    if isinstance(exc, MintUnreachable):
        return ServiceUnavailable("Mint unreachable; the token was not redeemed",
                                  code="cashu_mint_unreachable", headers=headers)
    if isinstance(exc, TokenTooSmall):
        return UnprocessableEntity("Token value does not cover the mint's fees",
                                   code="cashu_token_swap_fees_exceed_amount", headers=headers)
    if isinstance(exc, UnitMismatch):
        return InvalidRequest(f"Unsupported token unit: {exc}",
                              code="cashu_token_redemption_failed", headers=headers)
    if isinstance(exc, PurposeRefused):  # checked before the swap: the token is untouched
        if isinstance(exc.cause, ApiError):
            exc.cause.headers.extend(headers)
            return exc.cause
        return InvalidRequest(f"Token not redeemed: this request cannot be applied ({exc})",
                              code="invalid_parameter", headers=headers)
    if isinstance(exc, OperationPending):
        return TooEarly("This token is being redeemed; retry shortly",
                        code="cashu_token_pending", headers=[("retry-after", "2"), *headers])
    if isinstance(exc, MintError):
        return InvalidRequest(f"The mint refused the token: {exc.detail}",
                              code="cashu_token_redemption_failed", headers=headers)
    return InvalidRequest(f"Token could not be redeemed: {exc}",
                          code="cashu_token_redemption_failed", headers=headers)


@dataclass(frozen=True)
class CashuConfig:
    mints: tuple[str, ...]
    reservation_ttl_s: int
    recovery_window_s: int = 600  # --recovery-window

    @property
    def primary(self) -> str:
        return self.mints[0]


def remaining(msats: int) -> dict[str, Any]:
    """What a refund leaves on the key, and why (said only when something is left)."""
    return {"remaining_msats": msats, **({"remaining_reason": sub_sat_note(msats)}
                                         if msats else {})}


class CashuPayments:
    def __init__(self, config: CashuConfig, ledger: Ledger, wallet: Wallet, db: Database) -> None:
        self.config = config
        self.ledger = ledger
        self.wallet = wallet
        self.db = db
        self.mints = tuple(normalize_mint_url(m) for m in config.mints)
        self._key_secret = bytes.fromhex(
            setting_get_or_create(db, "invoice_key_secret", lambda: secrets.token_hex(32)))

    # ---- tokens ---------------------------------------------------------------------------
    def parse(self, text: str, *, echo: bool = False) -> Token:
        try:
            token = parse_token(text)
        except TokenError as exc:
            raise InvalidRequest(f"Invalid Cashu token: {exc}",
                                 code="invalid_cashu_token") from None
        if normalize_mint_url(token.mint) not in self.mints:
            raise InvalidRequest(
                "Tokens from this mint are not accepted", code="untrusted_mint",
                details={"accepted_mints": list(self.mints), "mint": token.mint},
                headers=[("x-cashu", text)] if echo else [])
        if token.unit != "sat":
            raise InvalidRequest(f"Unsupported token unit {token.unit!r}; use sat",
                                 code="cashu_token_redemption_failed",
                                 headers=[("x-cashu", text)] if echo else [])
        if token.amount * MSAT_PER_SAT > MAX_MSATS:  # refused before any mint call
            raise InvalidRequest("Invalid Cashu token: worth more than every bitcoin",
                                 code="invalid_cashu_token")
        try:  # a lock (NUT-10/11) this node cannot redeem: refused, the token untouched
            self.wallet.check_lock(token.proofs)
        except LockRefused as exc:
            raise InvalidRequest(f"Locked Cashu token not accepted: {exc}",
                                 code="cashu_token_locked",
                                 details={"cashu_p2pk_pubkey": self.wallet.p2pk_pubkey},
                                 headers=[("x-cashu", text)] if echo else []) from None
        return token

    def _recoverable(self, existing: Account, window: bool) -> Account:
        """`existing` for a re-posted token; with `window`, only within the recovery window of
        its redemption (else the token is just spent)."""
        if window and int(time.time()) - existing.created_at > self.config.recovery_window_s:
            raise InvalidRequest("Cashu token already spent", code="cashu_token_already_spent")
        return existing

    @staticmethod
    def _rescue(text: str, token: Token) -> intents.CreateAccount:
        """Where a token's value goes when the credit it was redeemed for can no longer be made
        after the swap (the key deleted or disabled meanwhile): the token's own key — the
        client spends or refunds it with the token as Bearer (see walletstore, "fallback")."""
        api_key = token_api_key(text)
        return intents.CreateAccount(
            hash_key(api_key), "token", ref="rescue:" + token_deposit_ref(text),
            hint=key_hint(api_key), refund_mint=normalize_mint_url(token.mint),
            refund_unit=token.unit)

    def _rescued(self, text: str) -> ApiError:
        """The answer when the value landed on the token's own key instead (see `_rescue`)."""
        acct = self.ledger.get_account(hash_key(token_api_key(text)))
        if acct is None:
            return InternalError("The token was redeemed but no account was opened",
                                 code="cashu_token_consumed")
        return Conflict(
            "The key changed while the token was redeemed; its value is kept on the token"
            " itself: use the token as the key (Authorization: Bearer <token>) or refund it",
            code="cashu_value_on_token", details={"balance_msats": acct.balance_msats})

    async def _redeem(self, text: str, token: Token, intent: intents.Intent,
                      key_hash: str, *, echo: bool, window: bool = False) -> Account:
        """Receive `token` into the wallet, applying `intent`; the funded account.

        A concurrent redemption of the same token (another request holds its proofs) is waited
        for: whichever request redeems it, both end up with the one account. An account the
        token opened before is returned again — with `window`, only within the recovery
        window."""
        deadline = time.monotonic() + REDEEM_WAIT_S
        while True:
            existing = self.ledger.get_account(key_hash)
            if existing is not None:
                return self._recoverable(existing, window)
            try:
                await self.wallet.receive(token, intents.to_json(intent))
            except OperationPending:
                if time.monotonic() > deadline:
                    raise _mint_error(OperationPending("pending", 0), echo=None) from None
                await anyio.sleep(0.05)
                continue
            except ProofsAlreadySpent as exc:
                existing = self.ledger.get_account(key_hash)
                if existing is not None:  # we redeemed it ourselves, concurrently
                    return self._recoverable(existing, window)
                raise _mint_error(exc) from None
            except (MintError, WalletError) as exc:
                # The wallet reconciles an ambiguous failure itself (NUT-07/09): the swap may
                # have been done and the account opened after all.
                existing = self.ledger.get_account(key_hash)
                if existing is not None:
                    return self._recoverable(existing, window)
                raise _mint_error(exc, echo=text if echo and _still_spendable(exc)
                                  else None) from None
            account = self.ledger.get_account(key_hash)
            if account is None:
                raise self._rescued(text)
            log.info("redeemed a token into account %d (%s msats)", account.id,
                     account.balance_msats)
            return account

    async def account_for_token(self, text: str) -> Account:
        """`Authorization: Bearer cashu…`: the token is the key (redeemed on first use)."""
        api_key = token_api_key(text)
        key_hash = hash_key(api_key)
        existing = self.ledger.get_account(key_hash)
        if existing is not None:
            return existing
        token = self.parse(text)
        intent = intents.CreateAccount(
            key_hash, "token", ref=token_deposit_ref(text), hint=key_hint(api_key),
            refund_mint=normalize_mint_url(token.mint), refund_unit=token.unit)
        return await self._redeem(text, token, intent, key_hash, echo=False)

    async def create_key(self, text: str, *, balance_limit_msats: int | None = None,
                         balance_limit_reset: str | None = None,
                         validity_date: int | None = None) -> tuple[str, Account]:
        """`/v1/balance/create`: a new random `sk-` key funded by the token."""
        token = self.parse(text)
        api_key = self.created_key(text)
        key_hash = hash_key(api_key)
        intent = intents.CreateAccount(
            key_hash, "api", ref=token_deposit_ref(text), hint=key_hint(api_key),
            refund_mint=normalize_mint_url(token.mint), refund_unit=token.unit,
            balance_limit_msats=balance_limit_msats,
            balance_limit_reset=balance_limit_reset if balance_limit_msats is not None else None,
            validity_date=validity_date, fallback=self._rescue(text, token))
        return api_key, await self._redeem(text, token, intent, key_hash, echo=False,
                                           window=True)

    def created_key(self, text: str) -> str:
        """The `sk-` key `/v1/balance/create` opens for a token: derived from it with a node
        secret, so a client whose answer was lost gets the same key back by retrying (holding
        the token is what entitles to the key, within the recovery window)."""
        return "sk-" + _base36(int.from_bytes(self._mac(b"create\x00" + text.encode()), "big"), 32)

    def _mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 under the node's key-derivation secret (keys are derived, never stored)."""
        return hmac.new(self._key_secret, data, hashlib.sha256).digest()

    async def topup(self, account: Account, text: str) -> tuple[Account, int]:
        """Credit the token's value (less mint fees) to the paying account."""
        token = self.parse(text)
        target = account.paying_id
        ref = token_deposit_ref(text)
        intent = intents.Credit(target, "deposit", ref=ref, fallback=self._rescue(text, token))
        try:
            received = await self.wallet.receive(token, intents.to_json(intent))
            added = received.amount * MSAT_PER_SAT
            done = self.ledger.deposit_of(ref)
            if done is None or done[0] != target:  # the key went away during the swap
                raise self._rescued(text)
        except (MintError, WalletError) as exc:
            # Credited after all (an ambiguous failure reconciled, or a retry of a top-up
            # whose answer was lost): report it rather than "spent".
            done = self.ledger.deposit_of(ref)
            if done is None or done[0] != target:
                raise _mint_error(exc) from None
            added = done[1]
        updated = self.ledger.get_account_by_id(target)
        assert updated is not None
        return updated, added

    # ---- X-Cashu per request ----------------------------------------------------------------
    def payment_request(self, required_msats: int) -> PaymentRequest:
        """NUT-18/24: the amount, the mints, and the lock to the node's key (NUT-11)."""
        amount = max(1, ceil_div(required_msats, MSAT_PER_SAT))
        lock = NUT10Option("P2PK", self.wallet.p2pk_pubkey, (("sigflag", "SIG_INPUTS"),))
        return PaymentRequest(amount=amount, unit="sat", mints=self.mints,
                              description="routstr: pay per request", nut10=lock)

    async def xcashu_payer(self, text: str, worst_msats: int, model: str,
                           request_id: str, *, keep_msats: int | None = None,
                           lock: str | None = None) -> Payer:
        """The one-request account an X-Cashu token opens. For a stream (`keep_msats`: the most
        it can cost) the redeeming swap also splits off the client's change beyond that
        (`Payer.split_token`), so that change goes in the response header before the first byte
        (where the Routstr SDK and routstr-python read it); what is kept and not charged is
        handed back at the end. `lock` (X-Cashu-Lock): all change is locked to that key."""
        token = self.parse(text, echo=True)
        value_msats = token.amount * MSAT_PER_SAT
        if value_msats < worst_msats:
            request = self.payment_request(worst_msats)
            creq = request.encode()
            raise InsufficientBalance(
                f"Token worth {format_sats(value_msats)} sats cannot cover this request: "
                f"{format_sats(worst_msats)} sats required",
                code="insufficient_balance",
                details={"required": worst_msats, "available": value_msats,
                         "amount_required_msat": worst_msats, "model": model,
                         "payment_request": creq, "payment_request_creqb": request.encode_b(),
                         "accepted_mints": list(self.mints)},
                headers=[("x-cashu", creq)])
        key_hash = xcashu_key_hash(text)
        if self.ledger.get_account(key_hash) is not None:
            raise InvalidRequest("Cashu token already spent", code="cashu_token_already_spent")
        intent = intents.CreateAccount(
            key_hash, "xcashu", ref=token_deposit_ref(text),
            refund_mint=normalize_mint_url(token.mint), refund_unit=token.unit,
            fallback=self._rescue(text, token))
        keep = None if keep_msats is None else ceil_div(max(keep_msats, worst_msats), MSAT_PER_SAT)
        account, split = await self._redeem_for_one_request(text, token, intent, key_hash,
                                                            keep, lock)
        return Payer(account.id, "xcashu", request_id, token_hash=key_hash,
                     split_token=split or "", lock=lock)

    @staticmethod
    def _split_ref(key_hash: str) -> str:
        return f"xcashu-split:{key_hash}"

    async def _redeem_for_one_request(self, text: str, token: Token, intent: intents.Intent,
                                      key_hash: str, keep: int | None = None,
                                      lock: str | None = None) -> tuple[Account, str | None]:
        """An X-Cashu token pays for exactly one request: the one whose own swap opened the
        account. Unlike a Bearer token (a key that many requests share), a concurrent request
        with the same token never joins that account — it would reserve from the first
        request's money, and whichever settled first could not hand out its change (a refund
        needs no request in flight) or would hand out the other's. It is refused with nothing
        charged: 425 while the first is redeeming, 400 once the token is spent."""
        try:
            received = await self.wallet.receive(token, intents.to_json(intent), keep=keep,
                                                 ref=self._split_ref(key_hash), lock=lock)
        except OperationPending:
            raise TooEarly("This token is paying for another request",
                           code="cashu_token_pending", headers=[("retry-after", "2")]) from None
        except (MintError, WalletError) as exc:
            if self.ledger.get_account(key_hash) is not None:
                # spent by another request, or ours reconciled after an unclear answer: in the
                # latter case its whole value is recoverable (POST /v1/balance/refund, X-Cashu)
                raise InvalidRequest(
                    "Cashu token already spent (if this request redeemed it, its value is"
                    " returned by POST /v1/balance/refund with the token in X-Cashu)",
                    code="cashu_token_already_spent") from None
            raise _mint_error(exc, echo=text if _still_spendable(exc) else None) from None
        account = self.ledger.get_account(key_hash)
        if account is None:
            raise self._rescued(text)
        return account, received.token

    def _change_ref(self, account_id: int) -> str:
        return f"xcashu-change:{account_id}"

    async def make_change(self, account_id: int,
                          lock: str | None = None) -> tuple[str | None, int]:
        """Return the whole spendable balance of a one-request account as a token (once).

        Never raises for a request that was served: a change not made now (mint down, another
        make_change of it in progress) is left to `recover_change`. The sub-sat remainder is
        charged as rounding in the same transaction as the change's debit (the send's
        write-ahead intent), never before it: a send that is refused gives the whole sats back
        to the account (the rest, which no token can carry, stays charged).
        `lock`: the change is locked to that key (X-Cashu-Lock). Returns (token or None,
        msats)."""
        ref = self._change_ref(account_id)
        op = self.wallet.issued_token(ref)
        if op is not None and op.state == "done" and op.token:
            return op.token, op.amount * MSAT_PER_SAT
        if op is not None and op.state == "pending":
            return None, 0
        account = self.ledger.get_account_by_id(account_id)
        if account is None:
            raise NotFound("Payment not found", code="payment_not_found")
        sats, remainder = divmod(account.balance_msats, MSAT_PER_SAT)
        if sats == 0:
            if remainder:
                self.ledger.charge(account_id, remainder, request_id=f"rounding:{account_id}")
            return None, 0
        mint = account.refund_mint or self.config.primary
        intent = intents.Debit(account_id, sats * MSAT_PER_SAT, "change", ref=ref,
                               rounding_msats=remainder)
        try:
            with anyio.fail_after(CHANGE_TIMEOUT_S):
                token = await self.wallet.send(sats, mint, intents.to_json(intent), ref=ref,
                                               lock=lock)
        except (MintError, WalletError, TimeoutError, ApiError) as exc:
            log.warning("change for account %d not made yet: %s", account_id,
                        type(exc).__name__)
            return None, 0
        return token.serialize(), sats * MSAT_PER_SAT

    async def _all_change(self, payer: Payer) -> tuple[str | None, int]:
        """The change of a request whose answer carries it whole (not a stream whose head
        carried the split-off part): the split-off part, if any, and the rest, as one token."""
        with anyio.CancelScope(shield=True):
            token, msats = await self.make_change(payer.account_id, payer.lock)
        split = parse_token(payer.split_token) if payer.split_token else None
        return _with_split(split, token, msats)

    async def xcashu_change_header(self, payer: Payer) -> list[tuple[str, str]]:
        token, _ = await self._all_change(payer)
        return [("x-cashu", token)] if token else []

    async def xcashu_stream_change(self, payer: Payer) -> Change | None:
        """A stream's change at its end: what the worst case left (the split-off part went in
        the response head, `Payments.stream_headers`)."""
        with anyio.CancelScope(shield=True):
            token, msats = await self.make_change(payer.account_id, payer.lock)
        return Change(token, msats) if token else None

    async def xcashu_refund_on_failure(self, payer: Payer, exc: ApiError) -> None:
        token, msats = await self._all_change(payer)
        if token:
            exc.headers.append(("x-cashu", token))
            exc.details["refund_token"] = token
            exc.details["refund_msats"] = msats

    async def recover_change(self, text: str, lock: str | None = None) -> tuple[str, int]:
        """`POST /v1/balance/refund` with `X-Cashu: <payment token>`: the change, again.

        Change already handed out is returned again only within the recovery window of its
        hand-out (the client lost the answer); change never made yet (the mint was down) is
        made whenever asked — it is still on the account, nobody else can have it."""
        key_hash = xcashu_key_hash(text.strip())
        account = self.ledger.get_account(key_hash)
        if account is None:
            raise NotFound("Refund not found", code="refund_not_found")
        if account.reserved_msats:
            raise TooEarly("Refund is pending; retry shortly.", code="refund_pending",
                           headers=[("retry-after", "2")])
        split = await self._unspent_split(key_hash)
        try:
            token, msats = await self._recover_rest(account, lock)
        except InvalidRequest:  # nothing more than the split-off part, or that too old
            if split is None:
                raise
            token, msats = None, 0
        merged, total = _with_split(split, token, msats)
        assert merged is not None  # a split or a rest
        return merged, total

    async def _unspent_split(self, key_hash: str) -> Token | None:
        """A stream's change split off at redemption (sent in its response head), within the
        recovery window of that redemption: its proofs the mint still has unspent (those the
        client already redeemed are dropped, NUT-07). None when there is nothing to return."""
        op = self.wallet.issued_token(self._split_ref(key_hash))
        if op is None or op.state != "done" or not op.token \
                or time.time() - op.updated_at > self.config.recovery_window_s:
            return None
        split = parse_token(op.token)
        try:
            states = await self.wallet.client(split.mint).check_state(
                [proof_y(p.secret) for p in split.proofs])
        except MintError as exc:
            raise _mint_error(exc) from None
        left = tuple(p for p, st in zip(split.proofs, states, strict=True)
                     if st.state == "UNSPENT")
        return Token(mint=split.mint, unit=split.unit, proofs=left) if left else None

    async def _recover_rest(self, account: Account, lock: str | None) -> tuple[str, int]:
        made = self.wallet.issued_token(self._change_ref(account.id))
        if made is not None and made.state == "done" \
                and time.time() - made.updated_at > self.config.recovery_window_s:
            raise InvalidRequest(
                "The change of this payment was handed out more than"
                f" {self.config.recovery_window_s} s ago; it is not returned again",
                code="recovery_window_expired")
        token, msats = await self.make_change(account.id, lock)
        if token is None:
            op = self.wallet.issued_token(self._change_ref(account.id))
            if op is not None and op.state == "pending":
                raise TooEarly("Refund is pending; retry shortly.", code="refund_pending",
                               headers=[("retry-after", "2")])
            raise InvalidRequest("No balance to refund", code="no_balance")
        return token, msats

    # ---- refunds ----------------------------------------------------------------------------
    async def refund(self, account: Account, lock: str | None = None, *,
                     to_token: bool = False) -> dict[str, Any]:
        """The whole spendable balance out: a token (`lock`: locked to that key, NUT-11), or a
        Lightning payment when the key carries a refund address (unless `to_token`: the
        operator's ``keys refund-to-token``). Whole sats; the sub-sat remainder stays on the
        key."""
        if account.is_child:
            raise InvalidRequest("Child keys cannot be refunded", code="child_key_not_allowed")
        if self.ledger.reserved_by(account):
            raise InvalidRequest(
                "Cannot refund key. There are ongoing requests for this api key.",
                code="requests_in_flight")
        sats, remainder = divmod(account.balance_msats, MSAT_PER_SAT)
        if sats <= 0:
            raise InvalidRequest(
                "No balance to refund" + (f": {sub_sat_note(remainder)}" if remainder else ""),
                code="no_balance", details={"balance_msats": account.balance_msats})
        ref = f"refund:{account.id}:{account.refunded_msats}"
        intent = intents.Debit(account.id, sats * MSAT_PER_SAT, "refund", ref=ref)
        purpose = intents.to_json(intent)
        try:
            if account.refund_address and not to_token:
                await self.wallet.pay_lightning_address(
                    account.refund_address, sats * MSAT_PER_SAT, purpose, ref=ref)
                return {"recipient": account.refund_address, "sats": str(sats),
                        "msats": sats * MSAT_PER_SAT, **remaining(remainder)}
            mint = account.refund_mint if account.refund_mint in self.mints \
                else self.config.primary
            token = await self.wallet.send(sats, mint, purpose, ref=ref, lock=lock)
        except InsufficientFunds:
            raise ServiceUnavailable("The node's wallet cannot make this refund right now",
                                     code="refund_unavailable") from None
        except LnurlError as exc:  # the refund address's service: nothing was paid or debited
            raise UpstreamError(f"Refund Lightning address failed: {exc}", code="lnurl_error",
                                details={"recipient": account.refund_address}) from None
        except (MintError, WalletError) as exc:
            raise _mint_error(exc) from None
        return {"token": token.serialize(), "sats": str(sats), "msats": sats * MSAT_PER_SAT,
                **remaining(remainder)}

    # ---- Lightning ---------------------------------------------------------------------------
    def invoice_api_key(self, invoice_id: str) -> str:
        """The key a paid `create` invoice opens: derived, so it is never stored in clear."""
        return "sk-" + self._mac(invoice_id.encode()).hex()

    async def create_invoice(self, amount_sats: int, purpose: str,
                             account: Account | None) -> dict[str, Any]:
        if not 1 <= amount_sats <= MAX_INVOICE_SATS:
            raise InvalidRequest(f"amount_sats must be between 1 and {MAX_INVOICE_SATS}",
                                 code="invalid_amount")
        invoice_id = secrets.token_hex(16)
        try:
            quote = await self.wallet.mint_quote(amount_sats, self.config.primary)
        except MintError as exc:
            raise _mint_error(exc) from None
        now = int(time.time())
        key_hash = hash_key(self.invoice_api_key(invoice_id)) if purpose == "create" else None
        inv = Invoice(invoice_id, quote.quote, self.config.primary, quote.request, amount_sats,
                      purpose, account.paying_id if account else None, key_hash, "pending", now,
                      now + INVOICE_TTL_S, None)
        invoice_insert(self.db, inv)
        return {"invoice_id": invoice_id, "bolt11": quote.request, "amount_sats": amount_sats,
                "expires_at": inv.expires_at, "payment_hash": quote.quote}

    async def settle_invoice(self, inv: Invoice) -> Invoice:
        """Mint the proofs of a paid invoice and credit them, exactly once."""
        if inv.state != "pending":
            return inv
        if inv.purpose == "create":
            assert inv.key_hash is not None
            intent: intents.Intent = intents.CreateAccount(
                inv.key_hash, "api", ref=f"invoice:{inv.id}",
                hint=key_hint(self.invoice_api_key(inv.id)), refund_mint=inv.mint,
                refund_unit="sat")
        else:  # a top-up; should its key be gone by then, the invoice's own key gets the value
            assert inv.account_id is not None
            intent = intents.Credit(inv.account_id, "deposit", ref=f"invoice:{inv.id}",
                                    fallback=intents.CreateAccount(
                                        hash_key(self.invoice_api_key(inv.id)), "api",
                                        ref=f"invoice-rescue:{inv.id}",
                                        hint=key_hint(self.invoice_api_key(inv.id)),
                                        refund_mint=inv.mint, refund_unit="sat"))
        now = int(time.time())
        try:
            received = await self.wallet.mint_paid(inv.quote, intents.to_json(intent))
        except (MintError, WalletError) as exc:
            log.info("invoice %s not settled yet: %s", inv.id, type(exc).__name__)
            received = None
        if received is None:
            if now > inv.expires_at:
                invoice_mark(self.db, inv.id, "expired", account_id=None, now=now)
            return invoice_get(self.db, invoice_id=inv.id) or inv
        account_id = inv.account_id
        if inv.purpose == "create" and inv.key_hash:
            acct = self.ledger.get_account(inv.key_hash)
            account_id = acct.id if acct else None
        invoice_mark(self.db, inv.id, "paid", account_id=account_id, now=now)
        return invoice_get(self.db, invoice_id=inv.id) or inv

    def _invoice_key(self, inv: Invoice) -> str | None:
        """The key a paid invoice hands out: a `create` invoice's, or a top-up's whose key was
        gone when it was minted (its value is then on the invoice's own key)."""
        if inv.state != "paid":
            return None
        api_key = self.invoice_api_key(inv.id)
        if inv.purpose == "create" or self.ledger.get_account(hash_key(api_key)) is not None:
            return api_key
        return None

    def invoice_status(self, inv: Invoice, *, with_key: bool = True) -> dict[str, Any]:
        """The status document; a paid invoice's key (`_invoice_key`) with it when `with_key`
        (the caller holds the invoice id, or this is the first collection by bolt11)."""
        api_key = self._invoice_key(inv) if with_key else None
        if api_key is not None and inv.collected_at is None:
            invoice_collect(self.db, inv.id, int(time.time()))
        return {"invoice_id": inv.id, "status": inv.state, "api_key": api_key,
                "amount_sats": inv.amount_sats, "paid_at": inv.paid_at,
                "created_at": inv.created_at, "expires_at": inv.expires_at,
                "purpose": inv.purpose}

    def invoice_recover(self, inv: Invoice, invoice_id: str | None) -> dict[str, Any]:
        """`POST /lightning/recover`: by the bare bolt11 (which a payer or anyone who saw the
        invoice knows) the key is handed out only if nobody collected it yet — routstr-core's
        recovery for a client that lost the invoice id; after that, only with the invoice id."""
        if invoice_id is not None:
            if not hmac.compare_digest(invoice_id.encode(), inv.id.encode()):
                raise Forbidden("This invoice id does not match the invoice",
                                code="invalid_recovery_secret")
            return self.invoice_status(inv)
        if self._invoice_key(inv) is None:
            return self.invoice_status(inv, with_key=False)
        if not invoice_collect(self.db, inv.id, int(time.time())):
            raise Forbidden("This invoice's key was already collected; recover it with the"
                            " invoice_id returned when the invoice was created",
                            code="recovery_secret_required")
        return self.invoice_status(inv)

    async def settle_pending_invoices(self) -> int:
        """Settle paid invoices (background job); expired unpaid ones are swept after their
        retention, so invoices anyone may ask for do not accumulate."""
        settled = 0
        now = int(time.time())
        for inv in invoices_pending(self.db, now):
            if (await self.settle_invoice(inv)).state == "paid":
                settled += 1
        invoices_sweep(self.db, now)
        return settled

    # ---- operator payouts ------------------------------------------------------------------
    def earnings_sats(self) -> int:
        """What the wallet holds beyond what the node owes its users (whole sats)."""
        held = sum(self.wallet.balances().values())
        return held - ceil_div(self.liabilities_msats(), MSAT_PER_SAT)

    async def payout_once(self, address: str, min_sats: int) -> int:
        """Melt earnings above `min_sats` to the operator's Lightning address (write-ahead in
        the wallet; the node's own money, so no user account moves). Returns sats paid."""
        earnings = self.earnings_sats()
        headroom = max(2, earnings // 50)  # Lightning fee reserve and input fees
        amount = earnings - headroom
        if amount < min_sats:
            return 0
        ref = f"payout:{int(time.time())}"
        melted = await self.wallet.pay_lightning_address(address, amount * MSAT_PER_SAT, None,
                                                         ref=ref)
        log.warning("paid out %d sats of earnings (fee %d sats), ref %s", melted.amount,
                    melted.fee, ref)
        return melted.amount

    # ---- wallet health --------------------------------------------------------------------
    def liabilities_msats(self) -> int:
        totals = self.ledger.totals()
        return int(totals.get("balance_msats", 0)) + int(totals.get("reserved_msats", 0))

    def balances(self) -> dict[str, int]:
        return self.wallet.balances()


def _with_split(split: Token | None, token: str | None, msats: int) -> tuple[str | None, int]:
    """A stream's split-off change (if any) and the rest of its change (if any), as one token
    and the msats it is worth."""
    if split is None:
        return token, msats
    if token is None:
        return split.serialize(4), split.amount * MSAT_PER_SAT
    return merge_tokens(split, parse_token(token)), msats + split.amount * MSAT_PER_SAT


def merge_tokens(a: Token, b: Token) -> str:
    """One token holding the proofs of two from the same mint and unit."""
    if normalize_mint_url(a.mint) != normalize_mint_url(b.mint) or a.unit != b.unit:
        raise ValueError("tokens from different mints or units cannot be merged")
    return Token(mint=a.mint, unit=a.unit, proofs=a.proofs + b.proofs).serialize(4)


def _still_spendable(exc: MintError | WalletError) -> bool:
    """Echo the token back only when the mint certainly did not take it."""
    if isinstance(exc, MintUnreachable):
        return not exc.maybe_delivered
    return not isinstance(exc, (ProofsAlreadySpent, ProofsPending, OperationPending))


def _base36(n: int, width: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = []
    for _ in range(width):
        n, r = divmod(n, 36)
        out.append(digits[r])
    return "".join(out)


def require_token_param(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest("A cashu_token is required.", code="missing_token")
    text = "".join(value.split())
    if len(text) < 10 or "cashu" not in text:
        raise InvalidRequest("Invalid token format", code="invalid_cashu_token")
    return text

