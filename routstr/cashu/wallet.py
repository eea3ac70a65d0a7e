"""The node's Cashu wallet: receive, send, melt, mint — write-ahead through a store.

Every call to a mint that can move money follows the same three steps:

1. **Intent** — one store transaction (`WalletStore.begin`) records what is about to happen:
   the input proofs (foreign ones being received are *locked*, ours are *reserved*), the
   outputs as NUT-13 derivations ``(keyset, amount, counter)`` — the store allocates and
   persists the per-keyset counters in that same transaction, so a derivation is never reused
   — and the caller's *purpose* (an opaque JSON-able mapping the store applies, e.g. "credit
   account 7"). Purposes of operations that give value away (send, melt) are applied here,
   so the money is gone from the account before the ecash exists; purposes of operations that
   bring value in (receive, mint) are applied in step 3.
2. **Mint call** — swap (NUT-03), mint (NUT-04) or melt (NUT-05/08).
3. **Result** — one store transaction (`WalletStore.finish`) marks the inputs spent, stores the
   new proofs, the issued token under its reference, and applies the incoming purpose with the
   amount actually received; or `WalletStore.abort` rolls the intent back (inputs released, a
   begin-time purpose reversed) when the mint *definitely* did nothing.

A crash anywhere leaves either nothing, or a pending intent. `recover()` settles each pending
intent with the mint: NUT-09 restore re-derives the outputs from the seed and asks for the
signatures the mint already issued (found: the operation happened, finish it); NUT-07 check
state on the inputs tells "not executed" (UNSPENT: roll back or retry), "in flight" (PENDING:
wait), or "spent elsewhere". So a token is credited exactly once, and no proof is lost.
Only an intent nobody runs is reconciled: not one whose mint call is in flight in this process
(`_inflight`) nor in another live process holding its lease (`WalletStore.claim`, e.g. another
`--workers` worker); and a restore that finds only some of a swap's or mint's outputs finishes
nothing (the mint is still at it) — a credit is never a part of the value.

Outcome of a mint call that could not be read (timeout, reset, 5xx — `MintUnreachable` with
``definite=False``) is *unknown*: the intent stays pending and is settled by `recover()`. A
refused connection is known not to have reached the mint, so the intent is rolled back at once.
A request may sit unprocessed in a hung mint's socket buffer; an operation that *receives*
value and was rolled back for "not executed" therefore stays watched (`recheck_until`), and a
later `recover()` that finds its outputs signed finishes it after all — late, never lost.

Amounts are in the wallet's unit (sat). Fees (NUT-02) are exact: ``ceil(Σ input_fee_ppk/1000)``.

Operations (all async; `purpose` is the caller's opaque JSON-able mapping, see `WalletStore`):

- ``receive(token, purpose) -> Received(amount, fee, proofs_count)``: swap (NUT-03); only
  then is the token paid. ``amount = value − fee``. `ProofsAlreadySpent` if it was spent
  (by anyone, including this wallet earlier); `OperationPending` while another task of this
  wallet redeems the same proofs; `MintUnreachable` when the mint is down (nothing credited;
  if the request may have arrived, the intent stays pending for `recover()`).
- ``send(amount, mint, purpose, ref=) -> Token``: exact proofs if we hold them (no mint call,
  no fee), else a swap into ``amount`` + change; the token is stored under `ref`
  (`issued_token(ref)`), also when `recover()` is what completes it.
- ``melt(bolt11, mint, purpose) -> Melted``: NUT-05 with NUT-08 blank outputs sized so the
  whole overpayment (fee reserve + selection surplus) comes back as change.
- ``pay_lightning_address(address, amount_msat, purpose)``: LUD-16/06 (`lnurl`), then melt.
- ``mint_quote(amount, mint)`` / ``mint_paid(quote_id, purpose)``: NUT-04; minted once, the
  purpose applied once; None while unpaid.
- ``recover() -> RecoveryReport``: settle pending intents (run at start and periodically).
- ``balance(mint)``, ``balances()``: Σ of unspent proofs.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from routstr.cashu import bdhke, keysets, lnurl, nut11, nut13
from routstr.cashu.mint import (
    BlindedMessage,
    BlindSignature,
    KeysetInactive,
    LightningPaymentFailed,
    MeltQuote,
    MintClient,
    MintError,
    MintQuote,
    MintUnreachable,
    OutputsAlreadySigned,
    ProofsAlreadySpent,
    ProofsPending,
    Transport,
)
from routstr.cashu.secp256k1 import point_from_hex
from routstr.cashu.tokens import DLEQProof, Proof, Token, parse_token

log = logging.getLogger(__name__)

Purpose = Mapping[str, Any]
T = TypeVar("T")

#: An intent younger than this whose inputs look untouched may still be in flight at the mint.
DEFAULT_INFLIGHT_GRACE_S = 10.0
#: How long a receive rolled back as "not executed" stays watched for a late execution.
DEFAULT_RECHECK_WINDOW_S = 24 * 3600.0
#: Proof selection retries when a concurrent operation reserved the same proofs first.
SELECT_RETRIES = 5
#: How long an operation's owner holds it: while the lease runs and the owner process lives,
#: no other process (another `--workers` worker) reconciles it — its mint call may be in flight.
#: Longer than any mint call (the HTTP client's read timeout defaults to 300 s).
OP_LEASE_S = 300.0
#: A failed (rolled back) operation is kept this long for the operator, then swept (a refused
#: forged token must not leave its row forever); one still watched is kept until its recheck
#: ends, one a proof refers to for good.
FAILED_OP_RETENTION_S = 24 * 3600.0


# --------------------------------------------------------------------------- errors


class WalletError(Exception):
    """A wallet operation cannot be done (nothing was changed)."""


class InsufficientFunds(WalletError):
    pass


class TokenTooSmall(WalletError):
    """The token's value does not exceed the mint's input fee for redeeming it."""


class UnitMismatch(WalletError):
    pass


class OperationPending(WalletError):
    """The mint's answer is unknown; the intent stays pending until `recover()` settles it."""

    def __init__(self, message: str, op_id: int) -> None:
        super().__init__(message)
        self.op_id = op_id


class InputsBusy(WalletError):
    """Store: another live operation already holds (some of) these inputs."""

    def __init__(self, op_id: int) -> None:
        super().__init__(f"inputs are held by operation {op_id}")
        self.op_id = op_id


class ProofsUnavailable(WalletError):
    """Store: a proof chosen as input is no longer unspent (a concurrent operation took it)."""


class PurposeRefused(WalletError):
    """Store: the purpose an operation would apply on finish cannot be applied (checked before
    the mint is called, so nothing was recorded and nothing swapped). `cause`: the refusal."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


class LockRefused(WalletError):
    """A token locked (NUT-10/11) in a way this wallet cannot or must not redeem."""


class QuoteBusy(WalletError):
    """Store: an operation for this mint quote already exists (pending or done)."""

    def __init__(self, op_id: int) -> None:
        super().__init__(f"quote is handled by operation {op_id}")
        self.op_id = op_id


# --------------------------------------------------------------------------- store interface


@dataclass(frozen=True)
class OutputSpec:
    """One NUT-13 derivation: the secret and blinding factor are re-derivable from the seed.

    role: ``keep`` (ours), ``send`` (goes into the issued token), ``blank`` (NUT-08 change)."""

    keyset_id: str
    amount: int
    counter: int
    role: str = "keep"


@dataclass(frozen=True)
class Intent:
    """What `WalletStore.begin` records before a mint call (counters not yet allocated)."""

    kind: str  # receive | send | melt | mint
    mint: str
    unit: str
    inputs: tuple[Proof, ...]
    own_inputs: bool  # True: our stored proofs, reserved; False: foreign proofs, locked
    outputs: tuple[tuple[str, int, str], ...]  # (keyset_id, amount, role); store adds counters
    purpose: Purpose | None
    purpose_at: str  # "begin" (send, melt) | "finish" (receive, mint)
    amount: int  # nominal value: sent / melted / expected from receive or mint
    fee: int  # NUT-02 input fee of `inputs`
    ref: str | None = None  # caller's reference (an issued token is found by it)
    quote: str | None = None  # NUT-04/05 quote id
    data: Mapping[str, Any] = field(default_factory=dict)  # e.g. bolt11, fee_reserve


@dataclass(frozen=True)
class Operation:
    id: int
    kind: str
    mint: str
    unit: str
    state: str  # pending | done | failed
    inputs: tuple[Proof, ...]
    own_inputs: bool
    outputs: tuple[OutputSpec, ...]
    purpose: Purpose | None
    purpose_at: str
    amount: int
    fee: int
    ref: str | None
    quote: str | None
    data: Mapping[str, Any]
    created_at: float
    updated_at: float
    token: str | None = None
    result: Mapping[str, Any] = field(default_factory=dict)
    recheck_until: float | None = None
    owner: str = ""  # the process that runs (or last took over) its mint call
    lease_until: float = 0.0  # until then only `owner` may act on it, while it lives


@dataclass(frozen=True)
class Outcome:
    """What `WalletStore.finish` records after the mint executed an operation."""

    proofs: tuple[Proof, ...]  # new proofs we keep
    amount: int  # value moved: received / sent / paid
    fee: int  # input fee + lightning fee actually paid
    issued: tuple[Proof, ...] = ()  # proofs handed out as `token`
    token: str | None = None
    result: Mapping[str, Any] = field(default_factory=dict)
    inputs_spent: bool = True


@dataclass(frozen=True)
class QuoteRecord:
    mint: str
    unit: str
    quote: str
    amount: int
    request: str
    expiry: int | None


class WalletStore(Protocol):
    """Persistence the wallet relies on. Every method is one atomic, durable transaction."""

    def begin(self, intent: Intent) -> Operation:
        """Allocate counters for the outputs (bumping the per-keyset counters), reserve our
        inputs (`ProofsUnavailable` unless all unspent) or lock foreign ones (`InputsBusy`
        if a live operation holds one), apply a ``begin`` purpose, check that a ``finish``
        purpose will apply (`PurposeRefused`), record as pending."""
        ...

    def finish(self, op_id: int, outcome: Outcome) -> Operation:
        """Inputs spent, new proofs stored, token stored, a ``finish`` purpose applied with
        `outcome.amount`; state done. A no-op on a done operation. Also accepted on a failed
        receive/mint still watched (`recheck_until`), which it revives."""
        ...

    def abort(
        self, op_id: int, reason: str, *, inputs_spent: bool = False,
        recheck_until: float | None = None,
    ) -> Operation:
        """Roll back: reserved inputs back to unspent (or spent if `inputs_spent`), locks
        released, a ``begin`` purpose reversed; state failed. A no-op unless pending."""
        ...

    def claim(self, op_id: int) -> Operation | None:
        """Take over pending operation `op_id` (to reconcile it or call the mint for it): the
        operation, its lease now this process's, when this process owns it, or its owner is
        gone, or its lease ran out; None when it is no longer pending or another live process
        holds it (its mint call may be in flight: a NUT-09 restore could see part of it)."""
        ...

    def get(self, op_id: int) -> Operation | None: ...

    def pending(self) -> list[Operation]: ...

    def watched(self, now: float) -> list[Operation]:
        """Failed operations with ``recheck_until > now``."""
        ...

    def sweep_failed(self) -> int:
        """Delete failed operations older than `FAILED_OP_RETENTION_S` that are no longer
        watched and no proof refers to; how many."""
        ...

    def by_quote(self, quote: str) -> Operation | None:
        """The live or done operation for a mint quote, if any."""
        ...

    def by_ref(self, ref: str) -> Operation | None:
        """The latest operation recorded under `ref` that did not fail, else the latest one.

        A rolled-back operation issued nothing: it must not hide one under the same `ref` that
        did (an X-Cashu retry that failed as spent after the mint executed the first redemption
        late, which was then revived with its split-off token)."""
        ...

    def unspent(self, mint: str, unit: str) -> list[Proof]: ...

    def mark_spent(self, mint: str, secrets: Sequence[str]) -> None:
        """Unspent proofs found spent at the mint (NUT-07) leave the balance."""
        ...

    def balances(self, unit: str) -> dict[str, int]: ...

    def save_quote(self, quote: QuoteRecord) -> None: ...

    def quote(self, quote_id: str) -> QuoteRecord | None: ...


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Received:
    amount: int  # value of the fresh proofs we now hold
    fee: int  # mint input fee paid for the swap
    proofs_count: int
    op_id: int = 0
    token: str | None = None  # the part issued back (`receive(keep=…)`), if any


@dataclass(frozen=True)
class Melted:
    amount: int  # invoice amount paid
    fee: int  # input fee + lightning fee actually paid (fee reserve minus change)
    preimage: str | None
    change: int
    op_id: int = 0


@dataclass(frozen=True)
class RecoveryReport:
    finished: tuple[int, ...] = ()
    rolled_back: tuple[int, ...] = ()
    still_pending: tuple[int, ...] = ()
    revived: tuple[int, ...] = ()


# --------------------------------------------------------------------------- helpers


def normalize_mint_url(url: str) -> str:
    return url.strip().rstrip("/")


def proof_y(secret: str) -> str:
    """NUT-00/07: ``Y = hash_to_curve(secret)`` as compressed hex."""
    return bdhke.hash_to_curve(secret.encode()).to_hex()


def _sum(proofs: Sequence[Proof]) -> int:
    return sum(p.amount for p in proofs)


@dataclass(frozen=True)
class _Derived:
    spec: OutputSpec
    secret: str
    r: int
    message: BlindedMessage


class Wallet:
    """Cashu wallet over several mints, one unit, NUT-13 deterministic secrets from `seed`."""

    def __init__(
        self,
        store: WalletStore,
        transport: Transport,
        seed: bytes,
        unit: str = "sat",
        *,
        inflight_grace_s: float = DEFAULT_INFLIGHT_GRACE_S,
        recheck_window_s: float = DEFAULT_RECHECK_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.unit = unit
        self._transport = transport
        self._seed = seed
        self._clients: dict[str, MintClient] = {}
        self._inflight: set[int] = set()  # operations whose mint call runs in this process
        self.inflight_grace_s = inflight_grace_s
        self.recheck_window_s = recheck_window_s
        self._clock = clock

    @functools.cached_property
    def _p2pk_seckey(self) -> bytes:
        return nut11.seckey_from_seed(self._seed)

    @functools.cached_property
    def p2pk_pubkey(self) -> str:
        """The node's NUT-11 key (compressed hex): tokens locked to it are redeemed here."""
        return nut11.pubkey_hex(self._p2pk_seckey)

    def check_lock(self, proofs: Sequence[Proof]) -> bool:
        """Can this wallet redeem `proofs` (True: some need its signature)? `LockRefused`
        before any mint call otherwise (see routstr.cashu.nut11)."""
        try:
            return nut11.check_redeemable([p.secret for p in proofs], self.p2pk_pubkey,
                                          self._clock())
        except nut11.LockError as exc:
            raise LockRefused(str(exc)) from None

    def _receive_swap(
        self, client: MintClient, locked: bool, legacy: bool
    ) -> Callable[[Operation, list[BlindedMessage]], Awaitable[list[BlindSignature]]]:
        """A receive's swap call: its inputs witnessed where they are locked to this wallet."""
        def call(op: Operation, msgs: list[BlindedMessage]) -> Awaitable[list[BlindSignature]]:
            return client.swap(self._witnessed(op.inputs, msgs, legacy) if locked else op.inputs,
                               msgs)
        return call

    def _witnessed(self, proofs: Sequence[Proof], outputs: Sequence[BlindedMessage],
                   legacy: bool = False) -> list[Proof]:
        """The inputs with NUT-11 witnesses where their lock names this wallet's key: one per
        input (SIG_INPUTS), or one on the first input covering the whole swap (SIG_ALL; `legacy`:
        the message of mints before NUT-11's current text)."""
        if nut11.is_sig_all([p.secret for p in proofs]):
            pairs = [(p.secret, p.C) for p in proofs]
            outs = [(o.amount, o.B_) for o in outputs]
            message = (nut11.legacy_sig_all_message if legacy else nut11.sig_all_message)(
                pairs, outs)
            first = replace(proofs[0], witness=nut11.witness(self._p2pk_seckey, message))
            return [first, *(replace(p, witness=None) for p in proofs[1:])]
        out = []
        for p in proofs:
            lock = nut11.parse_p2pk(p.secret)
            if lock is not None and self.p2pk_pubkey[2:] in {
                    k[2:] for k in (lock.data, *lock.pubkeys)}:
                p = replace(p, witness=nut11.witness(self._p2pk_seckey, p.secret))
            out.append(p)
        return out

    def client(self, mint: str) -> MintClient:
        url = normalize_mint_url(mint)
        c = self._clients.get(url)
        if c is None:
            c = self._clients[url] = MintClient(url, self._transport)
        return c

    # -- queries

    def balance(self, mint: str) -> int:
        return self.store.balances(self.unit).get(normalize_mint_url(mint), 0)

    def balances(self) -> dict[str, int]:
        return self.store.balances(self.unit)

    def issued_token(self, ref: str) -> Operation | None:
        """The operation that issued (or is issuing) a token under `ref`; `.token` once done."""
        return self.store.by_ref(ref)

    # -- derivation

    def _derive(self, spec: OutputSpec, lock: str | None = None) -> _Derived:
        """One output from the seed (NUT-13). `lock`: an issued ("send") output is a P2PK
        secret locked to that key (NUT-11), its nonce the NUT-13 secret — still re-derivable,
        so a restore (NUT-09) finds it like any other."""
        secret, r = nut13.derive_secret(self._seed, spec.keyset_id, spec.counter)
        if lock is not None and spec.role == "send":
            secret = nut11.locked_secret(secret, lock)
        B_, r = bdhke.blind(secret.encode(), r)
        return _Derived(spec, secret, r, BlindedMessage(spec.amount, spec.keyset_id, B_.to_hex()))

    def _derive_all(self, op: Operation) -> list[_Derived]:
        lock = op.data.get("lock")
        return [self._derive(s, lock if isinstance(lock, str) else None) for s in op.outputs]

    async def _unblind(
        self, client: MintClient, d: _Derived, sig: BlindSignature
    ) -> Proof:
        ks = await client.keys(sig.id)
        K = point_from_hex(ks.keys[sig.amount])
        C = bdhke.unblind(point_from_hex(sig.C_), d.r, K)
        dleq = None
        if sig.dleq is not None:
            dleq = DLEQProof(e=sig.dleq[0], s=sig.dleq[1], r=f"{d.r:064x}")
        return Proof(amount=sig.amount, id=sig.id, secret=d.secret, C=C.to_hex(), dleq=dleq)

    # -- the write-ahead core

    async def _run(
        self, op: Operation, call: Callable[[Operation, list[BlindedMessage]], Awaitable[T]]
    ) -> tuple[list[_Derived], T]:
        """Run one mint call for a recorded intent; errors pass through with op pending."""
        derived = self._derive_all(op)
        self._inflight.add(op.id)
        try:
            return derived, await call(op, [d.message for d in derived])
        finally:
            self._inflight.discard(op.id)

    def _take_over(self, op: Operation) -> Operation | None:
        """`op` to reconcile from here, or None while its mint call may be running: in this
        process (`_inflight`) or in another live one holding its lease (`WalletStore.claim`).
        Reconciling a live swap would finish it from a restore that saw part of it."""
        if op.state != "pending" or op.id in self._inflight:
            return None
        return self.store.claim(op.id)

    def _abort_definite(self, op: Operation, exc: MintError) -> None:
        """The mint refused: nothing happened there. Roll the intent back."""
        self.store.abort(op.id, f"{type(exc).__name__}: {exc.detail}")

    async def _after_unknown(self, op: Operation, exc: MintUnreachable) -> None:
        """The outcome is unknown. A refused connection never reached the mint: roll back.
        Otherwise try to settle now; if that cannot be done the intent stays pending."""
        if not exc.maybe_delivered:
            self.store.abort(op.id, f"mint unreachable: {exc.detail}")
            return
        try:
            await self._reconcile(op, retry=False)
        except MintError as again:
            log.info("operation %d stays pending: %s", op.id, again)

    # -- receive (NUT-03 swap of foreign proofs)

    async def receive(self, token: Token | str, purpose: Purpose | None = None, *,
                      keep: int | None = None, ref: str | None = None,
                      lock: str | None = None) -> Received:
        """Redeem `token` at its mint (swap for fresh proofs); `purpose` is applied by the store
        with the received amount in the same transaction as the new proofs.

        `keep` (sats): the same swap keeps only that much and issues the rest as a fresh token
        (`Received.token`, stored under `ref` like a send's): the received amount is the whole
        value, and the store's purpose event says how much of it was issued (`issued_sat`), so
        the purpose pays it out in the transaction that stores the proofs."""
        tok = parse_token(token) if isinstance(token, str) else token
        if tok.unit and tok.unit != self.unit:
            raise UnitMismatch(f"token unit {tok.unit!r}, wallet unit {self.unit!r}")
        if not tok.proofs:
            raise WalletError("token has no proofs")
        if len({p.secret for p in tok.proofs}) != len(tok.proofs):
            raise WalletError("token repeats a proof")
        locked = self.check_lock(tok.proofs)
        legacy, refused = False, None  # SIG_ALL: the current message first, then the legacy one
        mint = normalize_mint_url(tok.mint)
        client = self.client(mint)
        for attempt in range(3):
            inputs = []
            for p in tok.proofs:
                info = await client.keyset_info(p.id)
                if info.unit != self.unit:
                    raise UnitMismatch(f"keyset {info.id} is for {info.unit!r}")
                inputs.append(p if p.id == info.id else replace(p, id=info.id))
            fee = await client.fee_for(inputs)
            value = _sum(inputs) - fee
            if value <= 0:
                raise TokenTooSmall(f"token worth {_sum(inputs)} does not cover the fee {fee}")
            ks = await client.active_keyset(self.unit)
            kept = value if keep is None else min(max(keep, 0), value)
            outputs = [(ks.id, a, "keep") for a in keysets.split_amount(kept)]
            outputs += [(ks.id, a, "send") for a in keysets.split_amount(value - kept)]
            intent = Intent(
                kind="receive", mint=mint, unit=self.unit, inputs=tuple(inputs),
                own_inputs=False, outputs=tuple(sorted(outputs, key=lambda o: o[1])),
                purpose=purpose, purpose_at="finish", amount=value, fee=fee, ref=ref,
                data={"lock": lock} if lock is not None and kept < value else {},
            )
            op = await self._begin_foreign(intent)
            try:
                derived, sigs = await self._run(op, self._receive_swap(client, locked, legacy))
            except KeysetInactive as exc:
                self._abort_definite(op, exc)
                await client.keysets(refresh=True)
                if attempt == 0:
                    continue
                raise
            except ProofsAlreadySpent as exc:
                self._abort_definite(op, exc)
                await self._recheck_watched(inputs)
                raise
            except MintUnreachable as exc:
                await self._after_unknown(op, exc)
                raise
            except MintError as exc:
                if exc.definite:
                    self._abort_definite(op, exc)
                    if locked and not legacy and nut11.is_sig_all([p.secret for p in inputs]):
                        legacy, refused = True, exc  # a mint of the older SIG_ALL message?
                        continue
                if refused is not None and exc.definite:
                    raise refused from exc
                raise
            proofs = [await self._unblind(client, d, s) for d, s in zip(derived, sigs, strict=True)]
            done = self._finish_receive(op, derived, proofs)
            return Received(done.amount, fee, len(proofs), op.id, done.token)
        raise AssertionError("unreachable")  # pragma: no cover

    def _finish_receive(
        self, op: Operation, derived: Sequence[_Derived], proofs: Sequence[Proof]
    ) -> Operation:
        """Store a receive's proofs: ours (`keep`) and, when it split, the issued token."""
        pairs = list(zip(derived, proofs, strict=True))
        keep = tuple(p for d, p in pairs if d.spec.role != "send")
        issued = tuple(p for d, p in pairs if d.spec.role == "send")
        token = Token(mint=op.mint, unit=op.unit, proofs=issued).serialize(4) if issued else None
        return self.store.finish(op.id, Outcome(proofs=keep, amount=_sum(proofs), fee=op.fee,
                                                issued=issued, token=token))

    async def _begin_foreign(self, intent: Intent) -> Operation:
        """Begin an intent on foreign inputs; a stale holder from a crashed run is settled first."""
        try:
            return self.store.begin(intent)
        except InputsBusy as busy:
            holder_id = busy.op_id
        holder = self.store.get(holder_id)
        claimed = self._take_over(holder) if holder is not None else None
        if claimed is not None:  # a holder nobody runs any more (a crashed run): settle it
            await self._reconcile(claimed, retry=False)
            holder = self.store.get(holder_id)
        if holder is not None and holder.state == "done":
            raise ProofsAlreadySpent("token already redeemed by this wallet")
        if holder is not None and holder.state == "pending":
            raise OperationPending("token is being redeemed", holder_id)
        return self.store.begin(intent)

    # -- send (NUT-03 swap of our proofs into exact amounts + change)

    async def send(
        self, amount: int, mint: str, purpose: Purpose | None = None, *,
        ref: str | None = None, memo: str | None = None, lock: str | None = None,
    ) -> Token:
        """A fresh token worth exactly `amount` from our proofs at `mint`. `purpose` (e.g.
        debit the account the change or refund belongs to) is applied with the intent; the token
        is stored under `ref` before this returns, so it can be fetched again by reference."""
        if amount <= 0:
            raise ValueError("amount must be positive")
        mint = normalize_mint_url(mint)
        client = self.client(mint)
        for _ in range(SELECT_RETRIES):
            have = self.store.unspent(mint, self.unit)
            # a locked token needs fresh outputs: never hand out proofs as they are
            exact = _exact_subset(have, amount) if lock is None else None
            data: dict[str, Any] = {"memo": memo} if memo else {}
            if lock is not None:
                data["lock"] = lock
            if exact is not None:
                intent = Intent(
                    kind="send", mint=mint, unit=self.unit, inputs=tuple(exact), own_inputs=True,
                    outputs=(), purpose=purpose, purpose_at="begin", amount=amount, fee=0,
                    ref=ref, data=data,
                )
            else:
                chosen, fee = await _select(client, have, amount)
                ks = await client.active_keyset(self.unit)
                change = _sum(chosen) - fee - amount
                outputs = [(ks.id, a, "send") for a in keysets.split_amount(amount)]
                outputs += [(ks.id, a, "keep") for a in keysets.split_amount(change)]
                intent = Intent(
                    kind="send", mint=mint, unit=self.unit, inputs=tuple(chosen), own_inputs=True,
                    outputs=tuple(sorted(outputs, key=lambda o: o[1])), purpose=purpose,
                    purpose_at="begin", amount=amount, fee=fee, ref=ref,
                    data=data,
                )
            try:
                op = self.store.begin(intent)
            except ProofsUnavailable:
                continue
            done = await self._execute_send(op)
            assert done.token is not None
            return parse_token(done.token)
        raise InsufficientFunds("proofs kept being taken by concurrent operations")

    async def _execute_send(self, op: Operation, *, settle: bool = True) -> Operation:
        """The swap of a recorded send intent. `settle=False` (from recovery): on an error the
        intent is left as it is, never reconciled again from here."""
        client = self.client(op.mint)
        if not op.outputs:  # exact proofs: no mint call
            return self._finish_send(op, [], [])
        try:
            derived, sigs = await self._run(op, lambda o, msgs: client.swap(o.inputs, msgs))
        except MintUnreachable as exc:
            if settle:
                await self._after_unknown(op, exc)
            raise
        except (ProofsAlreadySpent, ProofsPending, OutputsAlreadySigned):
            if settle:  # only restore / check state can tell whether we did it ourselves
                await self._reconcile(op, retry=False)
                cur = self.store.get(op.id)
                if cur is not None and cur.state == "done":
                    return cur
            raise
        except MintError as exc:
            if exc.definite:
                self._abort_definite(op, exc)
            raise
        proofs = [await self._unblind(client, d, s) for d, s in zip(derived, sigs, strict=True)]
        return self._finish_send(op, derived, proofs)

    def _finish_send(
        self, op: Operation, derived: Sequence[_Derived], proofs: Sequence[Proof]
    ) -> Operation:
        if not op.outputs:
            issued = list(op.inputs)
            keep: list[Proof] = []
        else:
            issued = [p for d, p in zip(derived, proofs, strict=True) if d.spec.role == "send"]
            keep = [p for d, p in zip(derived, proofs, strict=True) if d.spec.role == "keep"]
        memo = op.data.get("memo")
        token = Token(mint=op.mint, unit=op.unit, proofs=tuple(issued), memo=memo).serialize(4)
        return self.store.finish(
            op.id,
            Outcome(proofs=tuple(keep), amount=_sum(issued), fee=op.fee, issued=tuple(issued),
                    token=token),
        )

    # -- melt (NUT-05 + NUT-08 blank outputs for the fee reserve's change)

    async def melt_quote(self, bolt11: str, mint: str) -> MeltQuote:
        return await self.client(mint).melt_quote(bolt11, self.unit)

    async def melt(
        self, bolt11: str, mint: str, purpose: Purpose | None = None, *,
        ref: str | None = None, quote: MeltQuote | None = None,
    ) -> Melted:
        """Pay `bolt11` from our proofs at `mint`; the unused fee reserve comes back as change."""
        mint = normalize_mint_url(mint)
        client = self.client(mint)
        q = quote or await client.melt_quote(bolt11, self.unit)
        need = q.amount + q.fee_reserve
        for _ in range(SELECT_RETRIES):
            have = self.store.unspent(mint, self.unit)
            chosen, fee = await _select(client, have, need)
            overpay = _sum(chosen) - fee - q.amount  # the most the mint can hand back
            n_blank = overpay.bit_length() if overpay > 0 else 0
            ks = await client.active_keyset(self.unit)
            intent = Intent(
                kind="melt", mint=mint, unit=self.unit, inputs=tuple(chosen), own_inputs=True,
                outputs=tuple((ks.id, 1, "blank") for _ in range(n_blank)), purpose=purpose,
                purpose_at="begin", amount=q.amount, fee=fee, ref=ref, quote=q.quote,
                data={"request": bolt11, "fee_reserve": q.fee_reserve},
            )
            try:
                op = self.store.begin(intent)
            except ProofsUnavailable:
                continue
            try:
                derived, res = await self._run(
                    op, lambda o, msgs: client.melt(q.quote, o.inputs, msgs)
                )
            except MintUnreachable as exc:
                await self._after_unknown(op, exc)
                raise
            except MintError as exc:
                await self._settle_failed_melt(op, exc)
                raise
            if res.state == "UNPAID":  # the payment failed without an error code
                failed = LightningPaymentFailed("melt answered UNPAID")
                await self._settle_failed_melt(op, failed)
                raise failed
            if res.state != "PAID":
                raise OperationPending(f"melt {res.state}", op.id)
            return await self._finish_melt(op, derived, res)
        raise InsufficientFunds("proofs kept being taken by concurrent operations")

    async def _settle_failed_melt(self, op: Operation, exc: MintError) -> None:
        """A refused melt normally leaves the inputs unspent; confirm before releasing them."""
        try:
            states = await self.client(op.mint).check_state([proof_y(p.secret) for p in op.inputs])
        except MintError:
            return  # stays pending; recover() decides
        if all(s.state == "UNSPENT" for s in states):
            self.store.abort(op.id, f"{type(exc).__name__}: {exc.detail}")

    async def _finish_melt(
        self, op: Operation, derived: Sequence[_Derived], res: MeltQuote
    ) -> Melted:
        client = self.client(op.mint)
        change = [
            await self._unblind(client, d, s) for d, s in zip(derived, res.change, strict=False)
        ]
        change_amount = _sum(change)
        fee = _sum(op.inputs) - op.amount - change_amount
        done = self.store.finish(
            op.id,
            Outcome(proofs=tuple(change), amount=op.amount, fee=fee,
                    result={"preimage": res.payment_preimage, "change": change_amount}),
        )
        return Melted(done.amount, done.fee, res.payment_preimage, change_amount, op.id)

    async def pay_lightning_address(
        self, address: str, amount_msat: int, purpose: Purpose | None = None, *,
        mint: str | None = None, ref: str | None = None,
    ) -> Melted:
        """LUD-16/LUD-06: resolve `address` to an invoice for `amount_msat` and melt it."""
        mint = mint or self._richest_mint()
        bolt11 = await lnurl.fetch_invoice(self._transport, address, amount_msat)
        return await self.melt(bolt11, mint, purpose, ref=ref)

    def _richest_mint(self) -> str:
        bal = self.balances()
        if not bal:
            raise InsufficientFunds("the wallet holds no proofs")
        return max(bal.items(), key=lambda kv: kv[1])[0]

    # -- mint (NUT-04)

    async def mint_quote(self, amount: int, mint: str) -> MintQuote:
        mint = normalize_mint_url(mint)
        q = await self.client(mint).mint_quote(amount, self.unit)
        self.store.save_quote(QuoteRecord(mint, self.unit, q.quote, amount, q.request, q.expiry))
        return q

    async def mint_paid(self, quote_id: str, purpose: Purpose | None = None) -> Received | None:
        """Once the quote's invoice is paid, mint its proofs exactly once (None while unpaid).

        A quote already minted returns its first result; the purpose is applied only then."""
        rec = self.store.quote(quote_id)
        if rec is None:
            raise WalletError(f"unknown mint quote {quote_id}")
        existing = self.store.by_quote(quote_id)
        if existing is not None:
            return await self._mint_existing(existing)
        client = self.client(rec.mint)
        state = await client.mint_quote_state(quote_id)
        if state.state in ("UNPAID", "PENDING"):
            return None
        ks = await client.active_keyset(rec.unit)
        intent = Intent(
            kind="mint", mint=rec.mint, unit=rec.unit, inputs=(), own_inputs=True,
            outputs=tuple((ks.id, a, "keep") for a in keysets.split_amount(rec.amount)),
            purpose=purpose, purpose_at="finish", amount=rec.amount, fee=0, quote=quote_id,
        )
        try:
            op = self.store.begin(intent)
        except QuoteBusy as busy:
            existing = self.store.get(busy.op_id)
            assert existing is not None
            return await self._mint_existing(existing)
        return await self._execute_mint(op)

    async def _mint_existing(self, op: Operation) -> Received | None:
        claimed = self._take_over(op)
        if claimed is not None:
            await self._reconcile(claimed, retry=True)
            op = self.store.get(op.id) or op
        if op.state == "done":
            return Received(op.amount, 0, len(op.outputs), op.id)
        if op.state == "pending":
            raise OperationPending("minting in progress", op.id)
        return None

    async def _execute_mint(self, op: Operation, *, settle: bool = True) -> Received:
        client = self.client(op.mint)
        assert op.quote is not None
        try:
            derived, sigs = await self._run(op, lambda o, msgs: client.mint(o.quote or "", msgs))
        except MintUnreachable as exc:
            if settle:
                await self._after_unknown(op, exc)
            raise
        except MintError as exc:
            if not settle:
                raise
            # 20002 issued / 11003 signed: restore tells whether it was on our outputs
            await self._reconcile(op, retry=False)
            cur = self.store.get(op.id)
            if cur is not None and cur.state == "done":
                return Received(cur.amount, 0, len(cur.outputs), cur.id)
            if exc.definite and cur is not None and cur.state == "pending":
                self._abort_definite(op, exc)
            raise
        proofs = [await self._unblind(client, d, s) for d, s in zip(derived, sigs, strict=True)]
        done = self.store.finish(op.id, Outcome(proofs=tuple(proofs), amount=_sum(proofs), fee=0))
        return Received(done.amount, 0, len(proofs), op.id)

    # -- recovery

    async def recover(self) -> RecoveryReport:
        """Settle every pending intent with its mint, and look again at watched rollbacks."""
        finished: list[int] = []
        rolled: list[int] = []
        pending: list[int] = []
        revived: list[int] = []
        for listed in self.store.pending():
            op = self._take_over(listed)
            if op is None:  # in flight here or in another live process
                pending.append(listed.id)
                continue
            try:
                await self._reconcile(op, retry=True)
            except MintError as exc:
                log.warning("operation %d not settled: %s", op.id, exc)
            cur = self.store.get(op.id)
            state = cur.state if cur is not None else "failed"
            {"done": finished, "failed": rolled}.get(state, pending).append(op.id)
        for op in self.store.watched(self._clock()):
            try:
                if await self._revive(op):
                    revived.append(op.id)
            except MintError as exc:
                log.info("watched operation %d not checked: %s", op.id, exc)
        swept = self.store.sweep_failed()
        if swept:
            log.info("swept %d failed wallet operations past their retention", swept)
        return RecoveryReport(tuple(finished), tuple(rolled), tuple(pending), tuple(revived))

    async def _restore(self, op: Operation) -> list[tuple[_Derived, BlindSignature]]:
        derived = self._derive_all(op)
        if not derived:
            return []
        client = self.client(op.mint)
        pairs = await client.restore([d.message for d in derived])
        by_b = {d.message.B_: d for d in derived}
        return [(by_b[o.B_], s) for o, s in pairs]

    async def _input_states(self, op: Operation) -> set[str]:
        states = await self.client(op.mint).check_state([proof_y(p.secret) for p in op.inputs])
        return {s.state for s in states}

    def _young(self, op: Operation) -> bool:
        return self._clock() - op.updated_at < self.inflight_grace_s

    async def _reconcile(self, op: Operation, *, retry: bool) -> None:
        """Decide a pending intent from what the mint knows (NUT-09 restore, NUT-07 state).

        `retry`: an unexecuted send or mint of ours is executed again with the same outputs
        (safe: the mint signs a derivation at most once, restore finds it either way)."""
        if op.kind == "melt":
            await self._reconcile_melt(op)
            return
        if op.kind == "send" and not op.outputs:
            self._finish_send(op, [], [])
            return
        client = self.client(op.mint)
        found = await self._restore(op)
        if found:
            await self._finish_from_restore(op, found)
            return
        if op.kind == "mint":
            assert op.quote is not None
            q = await client.mint_quote_state(op.quote)
            if q.state == "PAID" and retry:  # not minted yet: the same outputs again
                await self._execute_mint(op, settle=False)
            elif q.state == "ISSUED":  # issued, but not on our outputs
                self.store.abort(op.id, "quote issued on other outputs")
            return
        states = await self._input_states(op)
        if "PENDING" in states:
            return
        if "SPENT" in states:
            found = await self._restore(op)  # it may have been executed meanwhile
            if found:
                await self._finish_from_restore(op, found)
            else:
                self.store.abort(op.id, "inputs spent elsewhere", inputs_spent=True)
            return
        # all inputs unspent, no output signed: the swap did not happen (yet)
        if op.kind == "send":  # our proofs: finish the job with the same derivations
            if retry:
                await self._execute_send(op, settle=False)
            return
        if self._young(op):
            return
        self.store.abort(
            op.id, "not executed by the mint",
            recheck_until=self._clock() + self.recheck_window_s,
        )

    async def _finish_from_restore(
        self, op: Operation, found: Sequence[tuple[_Derived, BlindSignature]]
    ) -> bool:
        """Finish `op` from restored signatures — only when the mint signed *all* its outputs.

        A swap (NUT-03) or mint (NUT-04) signs all outputs or none; seeing only some means the
        mint is still executing it (or its records are torn): finishing now would store and
        credit a part of the value and lose the rest for good. It stays pending (False) and a
        later reconciliation decides. (A melt's NUT-08 change is partial by design: not here.)"""
        client = self.client(op.mint)
        if len(found) != len(op.outputs):
            log.warning("operation %d: %d of %d outputs restored; left pending",
                        op.id, len(found), len(op.outputs))
            return False
        pairs = [(d, await self._unblind(client, d, s)) for d, s in found]
        if op.kind == "send":
            self._finish_send(op, [d for d, _ in pairs], [p for _, p in pairs])
            return True
        if op.kind == "receive":
            self._finish_receive(op, [d for d, _ in pairs], [p for _, p in pairs])
            return True
        proofs = tuple(p for _, p in pairs)
        self.store.finish(op.id, Outcome(proofs=proofs, amount=_sum(proofs), fee=op.fee))
        return True

    async def _reconcile_melt(self, op: Operation) -> None:
        client = self.client(op.mint)
        assert op.quote is not None
        q = await client.melt_quote_state(op.quote)
        if q.state == "PAID":
            found = await self._restore(op)  # change, if the mint returned any
            derived = [d for d, _ in found]
            await self._finish_melt(op, derived, replace(q, change=tuple(s for _, s in found)))
            return
        if q.state == "PENDING":
            return
        states = await self._input_states(op)
        if states == {"UNSPENT"} and not self._young(op):
            self.store.abort(op.id, "melt not executed")

    async def _revive(self, op: Operation) -> bool:
        """A rolled-back receive the mint executed after all: finish it now."""
        if op.kind not in ("receive", "mint") or not op.outputs:
            return False
        found = await self._restore(op)
        if not found:
            return False
        log.warning("operation %d was executed by the mint after its rollback", op.id)
        return await self._finish_from_restore(op, found)

    async def _recheck_watched(self, inputs: Sequence[Proof]) -> None:
        secrets = {p.secret for p in inputs}
        for op in self.store.watched(self._clock()):
            if secrets & {p.secret for p in op.inputs}:
                try:
                    await self._revive(op)
                except MintError as exc:
                    log.info("watched operation %d not checked: %s", op.id, exc)


# --------------------------------------------------------------------------- selection


def _exact_subset(proofs: Sequence[Proof], amount: int) -> list[Proof] | None:
    """Proofs matching `amount`'s binary split exactly (no swap, no fee), if we hold them."""
    pool = sorted(proofs, key=lambda p: p.amount)
    chosen: list[Proof] = []
    for a in keysets.split_amount(amount):
        for i, p in enumerate(pool):
            if p.amount == a:
                chosen.append(pool.pop(i))
                break
        else:
            return None
    return chosen


async def _select(
    client: MintClient, proofs: Sequence[Proof], target: int
) -> tuple[list[Proof], int]:
    """Largest-first inputs until ``Σ inputs − fee(inputs) ≥ target`` (fewest inputs, least fee)."""
    chosen: list[Proof] = []
    for p in sorted(proofs, key=lambda p: p.amount, reverse=True):
        chosen.append(p)
        fee = await client.fee_for(chosen)
        if _sum(chosen) - fee >= target:
            # drop inputs the target does not need (smallest first) while it still holds
            for q in sorted(chosen, key=lambda p: p.amount):
                trial = [x for x in chosen if x is not q]
                if trial and _sum(trial) - await client.fee_for(trial) >= target:
                    chosen = trial
            return chosen, await client.fee_for(chosen)
    raise InsufficientFunds(f"need {target}, have {_sum(proofs)} at {client.url}")
