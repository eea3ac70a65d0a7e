"""Async client for a Cashu mint's REST API (the NUTs, https://github.com/cashubtc/nuts).

Endpoints (all JSON; errors are HTTP 400 with ``{"detail": str, "code": int}``):

- NUT-06 ``GET /v1/info``                      mint name, pubkey, version, supported NUTs
- NUT-01 ``GET /v1/keys/{id}``                  one keyset's public keys, amount -> point
- NUT-02 ``GET /v1/keysets``                    ids, unit, active flag, ``input_fee_ppk``;
  a keyset id is derived from its keys, so every keyset we use is checked against them
  (`keysets.verify_keyset_id`) and then cached for the client's lifetime (keys never change
  for an id; the keyset list itself is refreshed on demand, e.g. after 12002 "inactive")
- NUT-02 fees: ``fee = ceil(Σ input_fee_ppk of each input / 1000) = (Σ ppk + 999) // 1000``
- NUT-03 ``POST /v1/swap {inputs, outputs}``    -> ``{signatures}``
- NUT-04 ``POST /v1/mint/quote/bolt11 {amount, unit}``, ``GET /v1/mint/quote/bolt11/{q}``,
  ``POST /v1/mint/bolt11 {quote, outputs}``     -> ``{signatures}``
- NUT-05/23 ``POST /v1/melt/quote/bolt11 {request, unit}``, ``GET /v1/melt/quote/bolt11/{q}``,
  ``POST /v1/melt/bolt11 {quote, inputs, outputs}`` -> quote with ``state`` and ``change``;
  NUT-08: the outputs are *blank* (amount ignored by the mint); the mint imprints the
  overpaid amount on the first ``len(change)`` of them, in order
- NUT-07 ``POST /v1/checkstate {Ys}``           -> ``UNSPENT | PENDING | SPENT`` per Y
- NUT-09 ``POST /v1/restore {outputs}``         -> the signatures the mint already issued
- NUT-12: every blind signature that carries a DLEQ proof ``{e, s}`` is verified against the
  blinded message we sent and the mint's key for its amount; a bad proof is a hard error
  (`DleqInvalid`), never a warning.

NUT error codes become typed exceptions (`MintError` subclasses, see `ERROR_CODES`). A mint
that cannot be reached, times out or answers 5xx raises `MintUnreachable`, and an answer that
breaks the protocol (malformed, wrong amounts, a bad DLEQ) `MintProtocolError`: after either,
the request *may* have been executed, and only a later check (NUT-07/NUT-09) can tell
(``error.definite`` is False). Every other `MintError` is a definite refusal: the mint did
nothing.

The client does no I/O of its own: it is given a `Transport` (an async callable), so this
module imports nothing from the node and can be tested against any HTTP stack.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol
from urllib.parse import quote as urlquote

from routstr.cashu import bdhke, keysets, strictjson
from routstr.cashu.secp256k1 import point_from_hex
from routstr.cashu.tokens import MAX_AMOUNT, Proof

#: The mint may be slow to answer a melt (it pays a Lightning invoice synchronously); the
#: transport owns timeouts, this is only documentation of the expectation.
UNITS_MAX_AMOUNT = 2**63


class Transport(Protocol):
    """One HTTP exchange: returns (status, body); raises ConnectionError/TimeoutError."""

    async def __call__(self, method: str, url: str, body: bytes | None) -> tuple[int, bytes]: ...


# --------------------------------------------------------------------------- errors


class MintError(Exception):
    """The mint refused a request (a NUT error code), or could not be used at all."""

    code: ClassVar[int | None] = None

    def __init__(self, detail: str, *, code: int | None = None, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        #: the NUT error code the mint sent (None: no code, e.g. unreachable)
        self.nut_code: int | None = code if code is not None else type(self).code

    #: False only for `MintUnreachable`: the request may or may not have been executed.
    definite: ClassVar[bool] = True


class MintUnreachable(MintError):
    """Connection refused/reset, timeout, or a 5xx: the outcome of the request is unknown.

    `maybe_delivered` is False only when the request provably never reached the mint (the
    connection was refused), so nothing can have been executed."""

    definite = False

    def __init__(
        self, detail: str, *, code: int | None = None, status: int | None = None,
        maybe_delivered: bool = True,
    ) -> None:
        super().__init__(detail, code=code, status=status)
        self.maybe_delivered = maybe_delivered


class MintProtocolError(MintError):
    """The mint answered something that is not a valid NUT response (or a bad DLEQ proof).

    Not `definite`: a malformed answer to a swap may still mean the swap was executed."""

    definite = False


class DleqInvalid(MintProtocolError):
    """NUT-12: a blind signature's DLEQ proof does not verify. The mint is broken or hostile."""


class KeysetIdMismatch(MintProtocolError):
    """NUT-02: the keyset id the mint announces is not the one derived from its keys."""


class ProofInvalid(MintError):
    code = 10001


class ProofsAlreadySpent(MintError):
    code = 11001


class ProofsPending(MintError):
    code = 11002


class OutputsAlreadySigned(MintError):
    code = 11003


class OutputsPending(MintError):
    code = 11004


class TransactionNotBalanced(MintError):
    code = 11005


class AmountOutOfRange(MintError):
    code = 11006


class DuplicateInputs(MintError):
    code = 11007


class DuplicateOutputs(MintError):
    code = 11008


class UnitError(MintError):
    code = 11009


class KeysetUnknown(MintError):
    code = 12001


class KeysetInactive(MintError):
    code = 12002


class QuoteNotPaid(MintError):
    code = 20001


class QuoteAlreadyIssued(MintError):
    code = 20002


class MintingDisabled(MintError):
    code = 20003


class LightningPaymentFailed(MintError):
    code = 20004


class QuotePending(MintError):
    code = 20005


class InvoiceAlreadyPaid(MintError):
    code = 20006


class QuoteExpired(MintError):
    code = 20007


ERROR_CODES: Mapping[int, type[MintError]] = {
    cls.code: cls
    for cls in (
        ProofInvalid,
        ProofsAlreadySpent,
        ProofsPending,
        OutputsAlreadySigned,
        OutputsPending,
        TransactionNotBalanced,
        AmountOutOfRange,
        DuplicateInputs,
        DuplicateOutputs,
        UnitError,
        KeysetUnknown,
        KeysetInactive,
        QuoteNotPaid,
        QuoteAlreadyIssued,
        MintingDisabled,
        LightningPaymentFailed,
        QuotePending,
        InvoiceAlreadyPaid,
        QuoteExpired,
    )
    if cls.code is not None
}


def error_from_response(status: int, body: bytes) -> MintError:
    """Map a non-200 answer to a typed error: the NUT `code` decides, never the text."""
    detail = body[:500].decode("utf-8", "replace")
    code: int | None = None
    try:
        doc = strictjson.loads(body)
    except strictjson.JsonError:
        doc = None
    if isinstance(doc, dict):
        if isinstance(doc.get("detail"), str):
            detail = doc["detail"]
        raw = doc.get("code")
        if isinstance(raw, int) and not isinstance(raw, bool):
            code = raw
    cls = ERROR_CODES.get(code) if code is not None else None
    if cls is not None:
        return cls(detail, code=code, status=status)
    if status >= 500 or status in (408, 429):
        return MintUnreachable(f"mint answered {status}: {detail}", code=code, status=status)
    return MintError(detail, code=code, status=status)


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class BlindedMessage:
    """NUT-00 output: ``B_ = Y + r·G`` hex, for `amount` in keyset `id`."""

    amount: int
    id: str
    B_: str

    def to_dict(self) -> dict[str, Any]:
        return {"amount": self.amount, "id": self.id, "B_": self.B_}


@dataclass(frozen=True)
class BlindSignature:
    """NUT-00 promise ``C_ = k·B_``; `dleq` is NUT-12's ``(e, s)`` hex when the mint sent it."""

    amount: int
    id: str
    C_: str
    dleq: tuple[str, str] | None = None


@dataclass(frozen=True)
class Keyset:
    """NUT-01/02: a keyset's public keys (amount -> compressed point hex), id verified."""

    id: str
    unit: str
    active: bool
    input_fee_ppk: int
    keys: Mapping[int, str] = field(repr=False)


@dataclass(frozen=True)
class KeysetInfo:
    id: str
    unit: str
    active: bool
    input_fee_ppk: int


@dataclass(frozen=True)
class MintQuote:
    """NUT-04/23 mint quote: pay `request` (bolt11), then mint `amount` once."""

    quote: str
    request: str
    amount: int | None
    unit: str | None
    state: str  # UNPAID | PAID | PENDING | ISSUED
    expiry: int | None


@dataclass(frozen=True)
class MeltQuote:
    """NUT-05/23 melt quote; after a melt `change` holds NUT-08 signatures on blank outputs."""

    quote: str
    amount: int
    fee_reserve: int
    unit: str | None
    state: str  # UNPAID | PENDING | PAID
    expiry: int | None
    request: str | None = None
    payment_preimage: str | None = None
    change: tuple[BlindSignature, ...] = ()


@dataclass(frozen=True)
class ProofState:
    """NUT-07: state of the proof whose ``Y = hash_to_curve(secret)`` is `Y`."""

    Y: str
    state: str  # UNSPENT | PENDING | SPENT
    witness: str | None = None


# --------------------------------------------------------------------------- parsing


def _want(cond: bool, what: str) -> None:
    if not cond:
        raise MintProtocolError(f"malformed mint response: {what}")


def _int(v: Any, what: str) -> int:
    """A non-negative int that fits sqlite's signed 64-bit INTEGER (amounts, fees, expiries)."""
    _want(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_AMOUNT, what)
    return int(v)


def _str(v: Any, what: str) -> str:
    _want(isinstance(v, str), what)
    return str(v)


def _opt_str(v: Any, what: str) -> str | None:
    return None if v is None else _str(v, what)


def _opt_int(v: Any, what: str) -> int | None:
    return None if v is None else _int(v, what)


def _hex(v: Any, what: str, length: int | None = None) -> str:
    s = _str(v, what).lower()
    try:
        raw = bytes.fromhex(s)
    except ValueError:
        raise MintProtocolError(f"malformed mint response: {what} is not hex") from None
    _want(length is None or len(raw) == length, f"{what} length")
    return s


def _sig(d: Any) -> BlindSignature:
    _want(isinstance(d, dict), "signature object")
    dleq: tuple[str, str] | None = None
    raw = d.get("dleq")
    if raw is not None:
        _want(isinstance(raw, dict), "dleq object")
        dleq = (_hex(raw.get("e"), "dleq.e", 32), _hex(raw.get("s"), "dleq.s", 32))
    return BlindSignature(
        amount=_int(d.get("amount"), "signature amount"),
        id=_hex(d.get("id"), "signature id"),
        C_=_hex(d.get("C_"), "C_", 33),
        dleq=dleq,
    )


def _sigs(v: Any, what: str) -> list[BlindSignature]:
    _want(isinstance(v, list), what)
    return [_sig(x) for x in v]


def _mint_quote(d: Any) -> MintQuote:
    _want(isinstance(d, dict), "mint quote")
    state = d.get("state")
    if state is None:  # pre-0.16 mints only had `paid`
        state = "PAID" if d.get("paid") else "UNPAID"
    return MintQuote(
        quote=_str(d.get("quote"), "quote id"),
        request=_str(d.get("request"), "request"),
        amount=_opt_int(d.get("amount"), "amount"),
        unit=_opt_str(d.get("unit"), "unit"),
        state=_str(state, "state"),
        expiry=_opt_int(d.get("expiry"), "expiry"),
    )


def _melt_quote(d: Any) -> MeltQuote:
    _want(isinstance(d, dict), "melt quote")
    state = d.get("state")
    if state is None:
        state = "PAID" if d.get("paid") else "UNPAID"
    change = d.get("change")
    return MeltQuote(
        quote=_str(d.get("quote"), "quote id"),
        amount=_int(d.get("amount"), "amount"),
        fee_reserve=_int(d.get("fee_reserve", 0), "fee_reserve"),
        unit=_opt_str(d.get("unit"), "unit"),
        state=_str(state, "state"),
        expiry=_opt_int(d.get("expiry"), "expiry"),
        request=_opt_str(d.get("request"), "request"),
        payment_preimage=_opt_str(d.get("payment_preimage"), "payment_preimage"),
        change=tuple(_sigs(change, "change")) if change is not None else (),
    )


def input_fee(fee_ppk_per_input: Iterable[int]) -> int:
    """NUT-02: ``ceil(Σ input_fee_ppk / 1000)`` over the inputs of one transaction."""
    return (sum(fee_ppk_per_input) + 999) // 1000


def proof_to_input(p: Proof) -> dict[str, Any]:
    """A proof as a swap/melt input: amount, id, secret, C (+ witness); never the DLEQ's r."""
    d: dict[str, Any] = {"amount": p.amount, "id": p.id, "secret": p.secret, "C": p.C}
    if p.witness is not None:
        d["witness"] = p.witness
    return d


# --------------------------------------------------------------------------- client


class MintClient:
    """One mint: typed NUT calls over a `Transport`; keysets verified and cached."""

    def __init__(self, url: str, transport: Transport) -> None:
        self.url = url.rstrip("/")
        self._transport = transport
        self._keys: dict[str, Keyset] = {}
        self._keyset_infos: dict[str, KeysetInfo] | None = None

    # -- plumbing

    async def _call(self, method: str, path: str, payload: Mapping[str, Any] | None = None) -> Any:
        body = None if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        try:
            status, raw = await self._transport(method, self.url + path, body)
        except (ConnectionError, TimeoutError, OSError) as exc:
            raise MintUnreachable(
                f"{method} {path}: {type(exc).__name__}: {exc}",
                maybe_delivered=not isinstance(exc, ConnectionRefusedError),
            ) from exc
        if status != 200:
            raise error_from_response(status, raw)
        try:
            return strictjson.loads(raw)
        except strictjson.JsonError:
            raise MintProtocolError(f"{method} {path}: response is not JSON") from None

    # -- NUT-06

    async def info(self) -> dict[str, Any]:
        doc = await self._call("GET", "/v1/info")
        _want(isinstance(doc, dict), "info object")
        return dict(doc)

    # -- NUT-01 / NUT-02

    async def keysets(self, *, refresh: bool = False) -> list[KeysetInfo]:
        if self._keyset_infos is None or refresh:
            doc = await self._call("GET", "/v1/keysets")
            _want(isinstance(doc, dict) and isinstance(doc.get("keysets"), list), "keysets")
            infos: dict[str, KeysetInfo] = {}
            for k in doc["keysets"]:
                _want(isinstance(k, dict), "keyset object")
                info = KeysetInfo(
                    id=_hex(k.get("id"), "keyset id"),
                    unit=_str(k.get("unit"), "keyset unit"),
                    active=bool(k.get("active")),
                    input_fee_ppk=_int(k.get("input_fee_ppk", 0), "input_fee_ppk"),
                )
                infos[info.id] = info
            self._keyset_infos = infos
        return list(self._keyset_infos.values())

    async def keyset_info(self, keyset_id: str) -> KeysetInfo:
        """The listing entry for `keyset_id` (a short V2 id resolves by prefix)."""
        for refresh in (False, True):
            infos = {k.id: k for k in await self.keysets(refresh=refresh)}
            try:
                return infos[keysets.resolve_short_id(keyset_id, infos)]
            except keysets.KeysetError:
                continue
        raise KeysetUnknown(f"keyset {keyset_id} is not listed by {self.url}")

    async def keys(self, keyset_id: str) -> Keyset:
        """A keyset with its public keys, its id checked against them (cached)."""
        info = await self.keyset_info(keyset_id)
        cached = self._keys.get(info.id)
        if cached is not None:
            if cached.active != info.active or cached.input_fee_ppk != info.input_fee_ppk:
                cached = Keyset(info.id, info.unit, info.active, info.input_fee_ppk, cached.keys)
                self._keys[info.id] = cached
            return cached
        doc = await self._call("GET", f"/v1/keys/{urlquote(info.id, safe='')}")
        _want(isinstance(doc, dict) and isinstance(doc.get("keysets"), list), "keys")
        for k in doc["keysets"]:
            _want(isinstance(k, dict), "keyset object")
            if k.get("id") != info.id:
                continue
            raw = k.get("keys")
            _want(isinstance(raw, dict) and bool(raw), "keys map")
            keys: dict[int, str] = {}
            for amount, point in raw.items():
                _want(isinstance(amount, str) and amount.isdigit(), "key amount")
                keys[int(amount)] = _hex(point, "public key", 33)
            if not _keyset_id_ok(info, keys, k):
                raise KeysetIdMismatch(f"keyset id {info.id} does not match its keys")
            ks = Keyset(info.id, info.unit, info.active, info.input_fee_ppk, keys)
            self._keys[info.id] = ks
            return ks
        raise MintProtocolError(f"/v1/keys/{info.id} did not return that keyset")

    async def active_keyset(self, unit: str = "sat") -> Keyset:
        """The active keyset for `unit` (the cheapest one if there are several)."""
        for refresh in (False, True):
            active = [k for k in await self.keysets(refresh=refresh) if k.active and k.unit == unit]
            if active:
                best = min(active, key=lambda k: (k.input_fee_ppk, k.id))
                return await self.keys(best.id)
        raise KeysetUnknown(f"{self.url} has no active keyset for unit {unit!r}")

    async def fee_for(self, proofs: Iterable[Proof]) -> int:
        """NUT-02 input fee for spending `proofs` together in one swap or melt."""
        ppks = [(await self.keyset_info(p.id)).input_fee_ppk for p in proofs]
        return input_fee(ppks)

    # -- NUT-03

    async def swap(
        self, inputs: Sequence[Proof], outputs: Sequence[BlindedMessage]
    ) -> list[BlindSignature]:
        doc = await self._call(
            "POST",
            "/v1/swap",
            {
                "inputs": [proof_to_input(p) for p in inputs],
                "outputs": [o.to_dict() for o in outputs],
            },
        )
        _want(isinstance(doc, dict), "swap response")
        sigs = _sigs(doc.get("signatures", doc.get("promises")), "signatures")
        await self._check_signatures(outputs, sigs, exact_amounts=True)
        return sigs

    # -- NUT-04

    async def mint_quote(self, amount: int, unit: str = "sat") -> MintQuote:
        return _mint_quote(
            await self._call("POST", "/v1/mint/quote/bolt11", {"amount": amount, "unit": unit})
        )

    async def mint_quote_state(self, quote: str) -> MintQuote:
        path = f"/v1/mint/quote/bolt11/{urlquote(quote, safe='')}"
        return _mint_quote(await self._call("GET", path))

    async def mint(self, quote: str, outputs: Sequence[BlindedMessage]) -> list[BlindSignature]:
        doc = await self._call(
            "POST", "/v1/mint/bolt11", {"quote": quote, "outputs": [o.to_dict() for o in outputs]}
        )
        _want(isinstance(doc, dict), "mint response")
        sigs = _sigs(doc.get("signatures", doc.get("promises")), "signatures")
        await self._check_signatures(outputs, sigs, exact_amounts=True)
        return sigs

    # -- NUT-05 / NUT-08

    async def melt_quote(self, request: str, unit: str = "sat") -> MeltQuote:
        return _melt_quote(
            await self._call("POST", "/v1/melt/quote/bolt11", {"request": request, "unit": unit})
        )

    async def melt_quote_state(self, quote: str) -> MeltQuote:
        path = f"/v1/melt/quote/bolt11/{urlquote(quote, safe='')}"
        return _melt_quote(await self._call("GET", path))

    async def melt(
        self, quote: str, inputs: Sequence[Proof], blank_outputs: Sequence[BlindedMessage] = ()
    ) -> MeltQuote:
        payload: dict[str, Any] = {"quote": quote, "inputs": [proof_to_input(p) for p in inputs]}
        if blank_outputs:
            payload["outputs"] = [o.to_dict() for o in blank_outputs]
        result = _melt_quote(await self._call("POST", "/v1/melt/bolt11", payload))
        if result.change:
            _want(len(result.change) <= len(blank_outputs), "more change than blank outputs")
            await self._check_signatures(blank_outputs[: len(result.change)], result.change,
                                         exact_amounts=False)
        return result

    # -- NUT-07

    async def check_state(self, Ys: Sequence[str]) -> list[ProofState]:
        if not Ys:
            return []
        doc = await self._call("POST", "/v1/checkstate", {"Ys": list(Ys)})
        _want(isinstance(doc, dict) and isinstance(doc.get("states"), list), "checkstate response")
        states: list[ProofState] = []
        for d in doc["states"]:
            _want(isinstance(d, dict), "state object")
            st = ProofState(
                Y=_hex(d.get("Y"), "Y", 33),
                state=_str(d.get("state"), "state"),
                witness=_opt_str(d.get("witness"), "witness"),
            )
            _want(st.state in ("UNSPENT", "PENDING", "SPENT"), "state value")
            states.append(st)
        _want([s.Y for s in states] == [y.lower() for y in Ys], "states not in request order")
        return states

    # -- NUT-09

    async def restore(
        self, outputs: Sequence[BlindedMessage]
    ) -> list[tuple[BlindedMessage, BlindSignature]]:
        """The (output, signature) pairs the mint had already signed, DLEQ-checked."""
        if not outputs:
            return []
        doc = await self._call("POST", "/v1/restore", {"outputs": [o.to_dict() for o in outputs]})
        _want(isinstance(doc, dict) and isinstance(doc.get("outputs"), list), "restore response")
        sigs = _sigs(doc.get("signatures", doc.get("promises")), "signatures")
        _want(len(sigs) == len(doc["outputs"]), "restore outputs/signatures length")
        by_b = {o.B_.lower(): o for o in outputs}
        sent: list[BlindedMessage] = []
        for o in doc["outputs"]:
            _want(isinstance(o, dict), "restore output")
            mine = by_b.get(_hex(o.get("B_"), "B_", 33))
            _want(mine is not None, "restore returned an output we did not ask for")
            assert mine is not None
            sent.append(mine)
        await self._check_signatures(sent, sigs, exact_amounts=False)
        return list(zip(sent, sigs, strict=True))

    # -- checks

    async def _check_signatures(
        self,
        outputs: Sequence[BlindedMessage],
        sigs: Sequence[BlindSignature],
        *,
        exact_amounts: bool,
    ) -> None:
        """One signature per output, same keyset (and amount unless the outputs were blank),
        a key for the amount, and a DLEQ proof that verifies whenever one is sent."""
        _want(len(sigs) == len(outputs), "one signature per output")
        for out, sig in zip(outputs, sigs, strict=True):
            _want(sig.id == out.id, "signature keyset differs from output keyset")
            if exact_amounts:
                _want(sig.amount == out.amount, "signature amount differs from output amount")
            ks = await self.keys(sig.id)
            K = ks.keys.get(sig.amount)
            _want(K is not None, f"keyset {sig.id} has no key for amount {sig.amount}")
            assert K is not None
            if sig.dleq is not None and not _dleq_ok(out.B_, sig.C_, sig.dleq, K):
                raise DleqInvalid(f"DLEQ proof of a {sig.amount} signature does not verify")


# --------------------------------------------------------------------------- crypto glue


def _keyset_id_ok(info: KeysetInfo, keys: Mapping[int, str], doc: Mapping[str, Any]) -> bool:
    expiry = doc.get("final_expiry")
    try:
        return keysets.verify_keyset_id(
            info.id, keys, unit=info.unit, input_fee_ppk=info.input_fee_ppk,
            final_expiry=expiry if isinstance(expiry, int) else None,
        )
    except keysets.KeysetError:
        return False


def _dleq_ok(B_: str, C_: str, dleq: tuple[str, str], K: str) -> bool:
    try:
        return bdhke.verify_dleq(
            point_from_hex(B_), point_from_hex(C_), int(dleq[0], 16), int(dleq[1], 16),
            point_from_hex(K),
        )
    except ValueError:  # InvalidPoint included: a point off the curve never verifies
        return False
