"""The node's Cashu wallet as the operator sees it: balances, pending intents, taking earnings out.

The wallet holds two kinds of money: what users paid in and have not spent (the ledger's
liability: balances + reservations, rounded up to whole sats) and the node's earnings. The
operator may take out only the second: `withdrawable = wallet total − liability`. A withdrawal
(a Cashu token) or a payout (Lightning, fees included) larger than that is refused, so taking
earnings out never leaves users' balances unbacked. Both run through the wallet's write-ahead
path with no ledger purpose (the node's own money): a crash mid-way leaves a pending intent
that the wallet's `recover()` settles, and the token is kept under its reference.
"""

from __future__ import annotations

import secrets
from typing import Any, Final

from . import admin_store
from .cashu import lnurl
from .cashu.mint import LightningPaymentFailed, MintError, MintUnreachable, Transport
from .cashu.wallet import InsufficientFunds, OperationPending, Wallet, WalletError
from .db import Database
from .errors import ApiError, InvalidRequest, ServiceUnavailable, TooEarly, UpstreamError
from .money import msat_to_sat_ceil

WITHDRAW_MEMO: Final = "routstr node earnings"


def _wallet_error(exc: Exception) -> ApiError:
    if isinstance(exc, InsufficientFunds):
        return InvalidRequest(f"The wallet cannot cover this: {exc}", code="insufficient_funds")
    if isinstance(exc, OperationPending):
        return TooEarly("The mint has not answered yet; the operation stays pending and is"
                        " settled by the wallet's recovery.", code="operation_pending",
                        details={"operation": exc.op_id})
    if isinstance(exc, MintUnreachable):
        return ServiceUnavailable(f"Mint unreachable: {exc.detail}", code="mint_unreachable")
    if isinstance(exc, LightningPaymentFailed):
        return UpstreamError(f"Lightning payment failed: {exc.detail}",
                             code="lightning_payment_failed")
    if isinstance(exc, MintError):
        return UpstreamError(f"The mint refused: {exc.detail}", code="mint_error")
    if isinstance(exc, lnurl.LnurlError):
        return InvalidRequest(f"Lightning address: {exc}", code="lnurl_error")
    return InvalidRequest(f"Wallet: {exc}", code="wallet_error")


class NodeWallet:
    """`admin.AdminWallet` over the node's `cashu.wallet.Wallet` and its sqlite store."""

    def __init__(self, wallet: Wallet, db: Database, transport: Transport,
                 mints: tuple[str, ...]) -> None:
        self.wallet = wallet
        self.db = db
        self.transport = transport
        self.mints = mints

    def withdrawable(self) -> dict[str, int]:
        """What the operator may take out now, in sats: ``{"total", "held_for_users",
        "withdrawable"}``. The one figure a withdrawal or payout is checked against, and the
        one the dashboard and ``/admin/api/overview`` show."""
        unit = self.wallet.unit

        def read(conn: Any) -> tuple[int, int]:
            by_mint = admin_store.wallet_by_mint(conn, unit)
            return sum(b for b, _ in by_mint.values()), admin_store.liability_msats(conn)

        total, liability_msats = self.db.read(read)
        held = msat_to_sat_ceil(liability_msats)
        return {"total": total, "held_for_users": held, "withdrawable": max(0, total - held)}

    def summary(self) -> dict[str, Any]:
        unit = self.wallet.unit
        by_mint = self.db.read(lambda c: admin_store.wallet_by_mint(c, unit))
        mints: list[dict[str, Any]] = [{"mint": m, "balance": by_mint.get(m, (0, 0))[0],
                  "proofs": by_mint.get(m, (0, 0))[1]} for m in self.mints]
        mints += [{"mint": m, "balance": b, "proofs": n}
                  for m, (b, n) in sorted(by_mint.items()) if m not in self.mints]
        pending = [{"id": op.id, "kind": op.kind, "mint": op.mint, "amount": op.amount,
                    "created_at": int(op.created_at)} for op in self.wallet.store.pending()]
        return {
            "unit": unit,
            **self.withdrawable(),  # total, held_for_users, withdrawable
            "proofs": sum(int(m["proofs"]) for m in mints),
            "mints": mints,
            "pending": pending,
        }

    def _check_withdrawable(self, amount_sats: int) -> None:
        available = self.withdrawable()["withdrawable"]
        if amount_sats > available:
            raise InvalidRequest(
                f"Only {available} sats are the node's own: the rest of the wallet backs users'"
                " balances.", code="exceeds_earnings",
                details={"withdrawable": available, "requested": amount_sats})

    def _pick_mint(self, mint: str | None, need: int) -> str:
        balances = self.wallet.balances()
        if mint:
            mint = mint.strip().rstrip("/")
            if mint not in balances and mint not in self.mints:
                raise InvalidRequest("Unknown mint", code="unknown_mint")
            return mint
        rich = [m for m, b in sorted(balances.items(), key=lambda kv: -kv[1]) if b >= need]
        if not rich:
            raise InvalidRequest(f"No single mint holds {need} sats", code="insufficient_funds")
        return rich[0]

    async def withdraw(self, amount_sats: int, mint: str | None) -> dict[str, Any]:
        self._check_withdrawable(amount_sats)
        chosen = self._pick_mint(mint, amount_sats)
        ref = "admin-withdraw:" + secrets.token_hex(8)
        try:
            token = await self.wallet.send(amount_sats, chosen, None, ref=ref, memo=WITHDRAW_MEMO)
        except (MintError, WalletError, ValueError) as exc:
            raise _wallet_error(exc) from None
        return {"token": token.serialize(4), "amount_sats": amount_sats, "mint": chosen,
                "ref": ref}

    async def pay_out(self, address: str, amount_sats: int) -> dict[str, Any]:
        self._check_withdrawable(amount_sats)
        try:
            bolt11 = await lnurl.fetch_invoice(self.transport, address, amount_sats * 1000)
            chosen = self._pick_mint(None, amount_sats)
            quote = await self.wallet.melt_quote(bolt11, chosen)
            self._check_withdrawable(quote.amount + quote.fee_reserve)
            melted = await self.wallet.melt(bolt11, chosen, None, quote=quote,
                                            ref="admin-payout:" + secrets.token_hex(8))
        except (MintError, WalletError, lnurl.LnurlError, ValueError) as exc:
            raise _wallet_error(exc) from None
        return {"amount_sats": melted.amount, "fee_sats": melted.fee, "mint": chosen,
                "preimage": melted.preimage, "change_sats": melted.change}
