"""Proofs and tokens (NUT-00 V3 `cashuA` / V4 `cashuB`) and payment requests (NUT-18 `creqA`).

Wire formats
------------
- `cashuA` + base64url(JSON) — V3:
  ``{"token": [{"mint": url, "proofs": [Proof, ...]}, ...], "unit"?: str, "memo"?: str}``.
  Several entries for the same mint are merged; several different mints are refused (one
  token = one mint here, like V4). A missing unit means "sat".
- `cashuB` + base64url(CBOR) — V4: ``{"t": [{"i": keyset id bytes, "p": [{"a": amount,
  "s": secret, "c": C bytes, "d"?: {"e", "s", "r"} bytes, "w"?: witness}]}], "d"?: memo,
  "m": mint, "u": unit}``. Keyset ids may be the 8-byte short form of a version-01 id: the
  parsed `Proof.id` is then that short hex id, and `Token.resolve_keyset_ids` maps it to the
  full id among the mint's keysets (refusing unknown or ambiguous ones, as NUT-00 requires).
- `craw` + `B` + CBOR — the binary V4 form (`Token.to_raw` / `parse_raw_token`).
- `creqA` + base64url(CBOR) — NUT-18 payment request (`PaymentRequest.encode` / `decode`).

Decoders take surrounding whitespace, a `cashu:` URI prefix (tokens), padded or unpadded
base64, and either base64 alphabet (the official NUT-18 vectors use `+` and `/`). Encoders
write base64url: unpadded for tokens (as Nutshell and the NUT examples do), padded for
payment requests (as the NUT-18 vectors do).

Strictness: everything that becomes a `Proof` has a positive integer amount below 2^63 (the
wallet keeps proofs, and the node their sums, in sqlite's signed 64-bit INTEGER; a token's total
is bounded the same way, so no sum of one token overflows it), a
hex keyset id of 8 or 33 bytes, a non-empty UTF-8-encodable secret, a C that is a valid
compressed secp256k1 point, and DLEQ values of exactly 32 bytes. Any malformed input raises
`TokenError` (a `ValueError`) and nothing else. Unknown fields are ignored (forward
compatibility, as NUT-00 asks for V4).

DLEQ proofs: `Proof.to_dict()` — the form sent to mints — leaves the DLEQ out by default,
because its `r` would let the mint link the proof to its blinded message (NUT-12);
`to_dict(include_dleq=True)` keeps it (storage). Tokens carry the DLEQ, but only complete
ones (e, s and r): a DLEQ without `r` is useless to a receiver and rejected by some decoders
(Nutshell's), so token serialization drops it.
"""

from __future__ import annotations

import binascii
import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from . import cbor, strictjson
from .bech32 import bech32_encode
from .keysets import KeysetError, resolve_short_id
from .secp256k1 import InvalidPoint, point_from_hex

__all__ = [
    "DLEQProof",
    "NUT10Option",
    "PaymentRequest",
    "Proof",
    "Token",
    "TokenError",
    "Transport",
    "parse_raw_token",
    "parse_token",
]

MAX_TOKEN_CHARS: Final = 1_000_000
#: Most proofs one token may carry, counted while decoding — before any proof is built (each
#: costs a curve-point check), any write-ahead row or any mint call. Nutshell's default
#: ``mint_max_request_length``: a token with more could not be swapped in one request anyway.
MAX_PROOFS_PER_TOKEN: Final = 1000
MAX_AMOUNT: Final = (1 << 63) - 1  # a proof's amount and a token's total
TOKEN_V3_PREFIX: Final = "cashuA"  # noqa: S105 (a prefix, not a password)
TOKEN_V4_PREFIX: Final = "cashuB"  # noqa: S105
RAW_V4_PREFIX: Final = b"crawB"
PAYMENT_REQUEST_PREFIX: Final = "creqA"
URI_SCHEME: Final = "cashu:"
_KEYSET_ID_HEX_LENS: Final = (16, 66)  # 8 bytes (version 00, or a short id) / 33 bytes
_ABSENT: Final = (None, cbor.UNDEFINED)


class TokenError(ValueError):
    """A malformed token, proof or payment request."""


# --------------------------------------------------------------------------- field checks

_HEX_LOWER = frozenset("0123456789abcdef")


def _lower_hex(value: object, name: str, hex_lens: tuple[int, ...]) -> str:
    if not isinstance(value, str) or len(value) not in hex_lens:
        raise TokenError(f"{name} must be a hex string of {' or '.join(map(str, hex_lens))} chars")
    if not _HEX_LOWER.issuperset(value):
        raise TokenError(f"{name} must be lowercase hex")
    return value


def _text(value: object, name: str, *, empty_ok: bool = True) -> str:
    if not isinstance(value, str):
        raise TokenError(f"{name} must be a string")
    if not empty_ok and not value:
        raise TokenError(f"{name} must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise TokenError(f"{name} is not valid Unicode text") from None
    return value


def _opt_text(value: object, name: str) -> str | None:
    return None if value is None else _text(value, name)


def _amount(value: object, name: str = "amount") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_AMOUNT:
        raise TokenError(f"{name} must be an integer in [1, 2^63 - 1]")
    return value


@functools.lru_cache(maxsize=4096)
def _is_point_hex(value: str) -> bool:
    try:
        point_from_hex(value)
    except InvalidPoint:
        return False
    return True


def _mint_url(value: object, name: str = "mint") -> str:
    url = _text(value, name, empty_ok=False).rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest:
        raise TokenError(f"{name} must be an http(s) URL")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise TokenError(f"{name} must not contain whitespace or control characters")
    return url


def _hex_norm(value: object) -> object:
    """Lowercase a hex-looking string from JSON (mints and wallets differ in case)."""
    return value.lower() if isinstance(value, str) and value.isascii() else value


# --------------------------------------------------------------------------- proofs


@dataclass(frozen=True, slots=True)
class DLEQProof:
    """NUT-12 DLEQ proof as hex strings: e, s (32 bytes each) and the wallet's r (32 bytes)."""

    e: str
    s: str
    r: str | None = None

    def __post_init__(self) -> None:
        _lower_hex(self.e, "dleq.e", (64,))
        _lower_hex(self.s, "dleq.s", (64,))
        if self.r is not None:
            _lower_hex(self.r, "dleq.r", (64,))

    def to_dict(self) -> dict[str, str]:
        d = {"e": self.e, "s": self.s}
        if self.r is not None:
            d["r"] = self.r
        return d

    @classmethod
    def from_dict(cls, d: object) -> DLEQProof:
        if not isinstance(d, dict):
            raise TokenError("dleq must be an object")
        r = d.get("r")
        return cls(
            e=_hex_str(_hex_norm(d.get("e")), "dleq.e"),
            s=_hex_str(_hex_norm(d.get("s")), "dleq.s"),
            r=None if r is None else _hex_str(_hex_norm(r), "dleq.r"),
        )


def _hex_str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TokenError(f"{name} must be a hex string")
    return value


@dataclass(frozen=True, slots=True)
class Proof:
    """An ecash proof (NUT-00): amount, keyset id (hex), secret (text), C (compressed hex)."""

    amount: int
    id: str
    secret: str
    C: str
    dleq: DLEQProof | None = None
    witness: str | None = None

    def __post_init__(self) -> None:
        _amount(self.amount)
        _lower_hex(self.id, "keyset id", _KEYSET_ID_HEX_LENS)
        _text(self.secret, "secret", empty_ok=False)
        _lower_hex(self.C, "C", (66,))
        if not _is_point_hex(self.C):
            raise TokenError("C is not a valid compressed secp256k1 point")
        if self.dleq is not None and not isinstance(self.dleq, DLEQProof):
            raise TokenError("dleq must be a DLEQProof")
        if self.witness is not None:
            _text(self.witness, "witness")

    def to_dict(self, include_dleq: bool = False) -> dict[str, Any]:
        """NUT-00 JSON form. By default (the form for mints) without the DLEQ and its r;
        `include_dleq=True` adds the DLEQ as held (for storage, and NUT-12 user to user)."""
        d: dict[str, Any] = {
            "amount": self.amount,
            "id": self.id,
            "secret": self.secret,
            "C": self.C,
        }
        if include_dleq and self.dleq is not None:
            d["dleq"] = self.dleq.to_dict()
        if self.witness is not None:
            d["witness"] = self.witness
        return d

    def _token_dict(self) -> dict[str, Any]:
        """V3 token form: a DLEQ only when complete (e, s and r)."""
        complete = self.dleq is not None and self.dleq.r is not None
        return self.to_dict(include_dleq=complete)

    @classmethod
    def from_dict(cls, d: object) -> Proof:
        """Strict NUT-00 JSON proof (optional `dleq`, `witness`); raises TokenError."""
        if not isinstance(d, dict):
            raise TokenError("proof must be an object")
        for key in ("amount", "id", "secret", "C"):
            if key not in d:
                raise TokenError(f"proof is missing {key!r}")
        dleq = d.get("dleq")
        return cls(
            amount=_amount(d["amount"]),
            id=_hex_str(_hex_norm(d["id"]), "keyset id"),
            secret=_text(d["secret"], "secret"),
            C=_hex_str(_hex_norm(d["C"]), "C"),
            dleq=None if dleq is None else DLEQProof.from_dict(dleq),
            witness=_opt_text(d.get("witness"), "witness"),
        )


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True, slots=True)
class Token:
    """Proofs from one mint in one unit, with an optional memo."""

    mint: str
    unit: str
    proofs: tuple[Proof, ...]
    memo: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mint", _mint_url(self.mint))
        _text(self.unit, "unit", empty_ok=False)
        if self.memo is not None:
            _text(self.memo, "memo")
        proofs = self.proofs
        if not isinstance(proofs, tuple):
            if not isinstance(proofs, list):
                raise TokenError("proofs must be a tuple of Proof")
            proofs = tuple(proofs)
            object.__setattr__(self, "proofs", proofs)
        if not proofs:
            raise TokenError("a token must contain at least one proof")
        seen: set[str] = set()
        for p in proofs:
            if not isinstance(p, Proof):
                raise TokenError("proofs must be Proof objects")
            if p.secret in seen:
                raise TokenError("a token must not contain the same secret twice")
            seen.add(p.secret)
        if sum(p.amount for p in proofs) > MAX_AMOUNT:
            raise TokenError("the token's total must be below 2^63")

    @property
    def amount(self) -> int:
        return sum(p.amount for p in self.proofs)

    @property
    def keyset_ids(self) -> tuple[str, ...]:
        """Distinct keyset ids in order of first appearance."""
        return tuple(dict.fromkeys(p.id for p in self.proofs))

    def resolve_keyset_ids(self, full_ids: Iterable[str]) -> Token:
        """Replace short (8-byte) keyset ids by the mint's full ids; TokenError if unknown or
        ambiguous (NUT-00 V4)."""
        ids = list(full_ids)
        mapping: dict[str, str] = {}
        try:
            for kid in self.keyset_ids:
                mapping[kid] = resolve_short_id(kid, ids)
        except KeysetError as exc:
            raise TokenError(str(exc)) from None
        if all(k == v for k, v in mapping.items()):
            return self
        proofs = tuple(
            Proof(p.amount, mapping[p.id], p.secret, p.C, p.dleq, p.witness) for p in self.proofs
        )
        return Token(self.mint, self.unit, proofs, self.memo)

    # -- V3 -----------------------------------------------------------------------------

    def _v3_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "token": [{"mint": self.mint, "proofs": [p._token_dict() for p in self.proofs]}],
            "unit": self.unit,
        }
        if self.memo is not None:
            d["memo"] = self.memo
        return d

    # -- V4 -----------------------------------------------------------------------------

    def _v4_dict(self) -> dict[str, Any]:
        groups: dict[str, list[dict[str, Any]]] = {}
        for p in self.proofs:
            entry: dict[str, Any] = {
                "a": p.amount,
                "s": p.secret,
                "c": bytes.fromhex(p.C),
            }
            if p.dleq is not None and p.dleq.r is not None:
                entry["d"] = {
                    "e": bytes.fromhex(p.dleq.e),
                    "s": bytes.fromhex(p.dleq.s),
                    "r": bytes.fromhex(p.dleq.r),
                }
            if p.witness is not None:
                entry["w"] = p.witness
            groups.setdefault(p.id, []).append(entry)
        d: dict[str, Any] = {"t": [{"i": bytes.fromhex(i), "p": ps} for i, ps in groups.items()]}
        if self.memo is not None:
            d["d"] = self.memo
        d["m"] = self.mint
        d["u"] = self.unit
        return d

    def serialize(self, version: int = 4) -> str:
        """`cashuB...` (V4, default) or `cashuA...` (V3), unpadded base64url.

        V4 groups proofs by keyset id (first appearance order), so proofs of one keyset that
        were not adjacent come back adjacent after a round trip.
        """
        if version == 4:
            return TOKEN_V4_PREFIX + _b64encode(cbor.dumps(self._v4_dict()), pad=False)
        if version == 3:
            raw = json.dumps(self._v3_dict(), separators=(",", ":")).encode("ascii")
            return TOKEN_V3_PREFIX + _b64encode(raw, pad=False)
        raise TokenError(f"unsupported token version {version!r}")

    def to_raw(self) -> bytes:
        """Binary V4 token: b"craw" + b"B" + CBOR (NUT-00, e.g. for NFC)."""
        return RAW_V4_PREFIX + cbor.dumps(self._v4_dict())


# --------------------------------------------------------------------------- base64

_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/")
_TO_STD = str.maketrans("-_", "+/")


def _b64encode(data: bytes, *, pad: bool) -> str:
    text = (
        binascii.b2a_base64(data, newline=False)
        .decode("ascii")
        .translate(str.maketrans("+/", "-_"))
    )
    return text if pad else text.rstrip("=")


def _b64decode(text: str) -> bytes:
    """base64url or standard base64, padded or not; strict about everything else."""
    body = text.rstrip("=")
    if len(text) - len(body) > 2:
        raise TokenError("bad base64 padding")
    if not body or not _B64_CHARS.issuperset(body) or len(body) % 4 == 1:
        raise TokenError("not base64")
    padded = body.translate(_TO_STD) + "=" * (-len(body) % 4)
    try:
        return binascii.a2b_base64(padded, strict_mode=True)
    except binascii.Error:  # pragma: no cover (the checks above rule it out)
        raise TokenError("not base64") from None


# --------------------------------------------------------------------------- parsing


def _parse_json(data: bytes) -> object:
    """The V3 payload through the bounded reader (`strictjson`: depth, number size, no NaN,
    no duplicate keys)."""
    try:
        return strictjson.loads(data)
    except strictjson.JsonError:
        raise TokenError("token payload is not valid JSON") from None


def _count_proofs(n: int) -> None:
    if n > MAX_PROOFS_PER_TOKEN:
        raise TokenError(f"token has more than {MAX_PROOFS_PER_TOKEN} proofs")


def _parse_v3(data: bytes) -> Token:
    obj = _parse_json(data)
    if not isinstance(obj, dict):
        raise TokenError("V3 token must be a JSON object")
    entries = obj.get("token")
    if not isinstance(entries, list) or not entries:
        raise TokenError("V3 token must have a non-empty 'token' list")
    mint: str | None = None
    proofs: list[Proof] = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise TokenError("V3 token entries must be objects")
        entry_mint = _mint_url(entry.get("mint"))
        if mint is not None and entry_mint != mint:
            raise TokenError("tokens with proofs from several mints are not supported")
        mint = entry_mint
        entry_proofs = entry.get("proofs")
        if not isinstance(entry_proofs, list):
            raise TokenError("V3 token entry must have a 'proofs' list")
        _count_proofs(len(proofs) + len(entry_proofs))
        proofs.extend(Proof.from_dict(p) for p in entry_proofs)
    assert mint is not None
    unit = obj.get("unit")
    return Token(
        mint=mint,
        unit="sat" if unit is None else _text(unit, "unit"),
        proofs=tuple(proofs),
        memo=_opt_text(obj.get("memo"), "memo"),
    )


def _cbor_map(data: bytes, what: str) -> dict[Any, Any]:
    try:
        obj = cbor.loads(data)
    except cbor.CBORError as exc:
        raise TokenError(f"{what} is not valid CBOR: {exc}") from None
    if not isinstance(obj, dict):
        raise TokenError(f"{what} must be a CBOR map")
    return obj


def _get(d: Mapping[Any, Any], key: str) -> object:
    """A map value, with null and undefined both meaning absent."""
    value = d.get(key)
    return None if value in _ABSENT else value


def _bytes(value: object, name: str, sizes: tuple[int, ...]) -> bytes:
    if not isinstance(value, bytes) or len(value) not in sizes:
        raise TokenError(f"{name} must be a byte string of {' or '.join(map(str, sizes))} bytes")
    return value


def _v4_proof(p: object, keyset_id: str) -> Proof:
    if not isinstance(p, dict):
        raise TokenError("V4 proof must be a map")
    dleq = None
    d = _get(p, "d")
    if d is not None:
        if not isinstance(d, dict):
            raise TokenError("V4 proof 'd' must be a map")
        r = _get(d, "r")
        dleq = DLEQProof(
            e=_bytes(d.get("e"), "dleq.e", (32,)).hex(),
            s=_bytes(d.get("s"), "dleq.s", (32,)).hex(),
            r=None if r is None else _bytes(r, "dleq.r", (32,)).hex(),
        )
    w = _get(p, "w")
    return Proof(
        amount=_amount(p.get("a")),
        id=keyset_id,
        secret=_text(p.get("s"), "secret"),
        C=_bytes(p.get("c"), "C", (33,)).hex(),
        dleq=dleq,
        witness=None if w is None else _text(w, "witness"),
    )


def _parse_v4_obj(obj: Mapping[Any, Any]) -> Token:
    groups = obj.get("t")
    if not isinstance(groups, list) or not groups:
        raise TokenError("V4 token must have a non-empty 't' list")
    proofs: list[Proof] = []
    for group in groups:
        if not isinstance(group, dict):
            raise TokenError("V4 token groups must be maps")
        keyset_id = _bytes(group.get("i"), "keyset id", (8, 33)).hex()
        group_proofs = group.get("p")
        if not isinstance(group_proofs, list):
            raise TokenError("V4 token group must have a 'p' list")
        _count_proofs(len(proofs) + len(group_proofs))
        proofs.extend(_v4_proof(p, keyset_id) for p in group_proofs)
    memo = _get(obj, "d")
    return Token(
        mint=_mint_url(obj.get("m")),
        unit=_text(obj.get("u"), "unit"),
        proofs=tuple(proofs),
        memo=None if memo is None else _text(memo, "memo"),
    )


def parse_token(text: str) -> Token:
    """Parse a `cashuA...` (V3) or `cashuB...` (V4) token; raises only TokenError."""
    if not isinstance(text, str):
        raise TokenError("token must be a string")
    s = text.strip()
    if len(s) > MAX_TOKEN_CHARS:
        raise TokenError("token too long")
    if s[: len(URI_SCHEME)].lower() == URI_SCHEME:
        s = s[len(URI_SCHEME) :]
    if s.startswith(TOKEN_V4_PREFIX):
        return _parse_v4_obj(_cbor_map(_b64decode(s[len(TOKEN_V4_PREFIX) :]), "V4 token"))
    if s.startswith(TOKEN_V3_PREFIX):
        return _parse_v3(_b64decode(s[len(TOKEN_V3_PREFIX) :]))
    raise TokenError("not a Cashu token (expected a cashuA or cashuB prefix)")


def parse_raw_token(data: bytes) -> Token:
    """Parse a binary V4 token (b"crawB" + CBOR); raises only TokenError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TokenError("raw token must be bytes")
    raw = bytes(data)
    if not raw.startswith(RAW_V4_PREFIX):
        raise TokenError("not a binary V4 token (expected the crawB prefix)")
    return _parse_v4_obj(_cbor_map(raw[len(RAW_V4_PREFIX) :], "raw V4 token"))


# --------------------------------------------------------------------------- NUT-18

Tags = tuple[tuple[str, ...], ...]


def _tags(value: object, name: str) -> Tags:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise TokenError(f"{name} must be an array of tags")
    out: list[tuple[str, ...]] = []
    for tag in value:
        if not isinstance(tag, list | tuple) or not tag:
            raise TokenError(f"each of {name} must be a non-empty array of strings")
        out.append(tuple(_text(v, name) for v in tag))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Transport:
    """NUT-18 transport: type ("nostr", "post", ...), target, optional tags."""

    type: str
    target: str
    tags: Tags = ()

    def __post_init__(self) -> None:
        _text(self.type, "transport type", empty_ok=False)
        _text(self.target, "transport target")
        object.__setattr__(self, "tags", _tags(self.tags, "transport tags"))

    def _cbor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"t": self.type, "a": self.target}
        if self.tags:
            d["g"] = [list(t) for t in self.tags]
        return d


@dataclass(frozen=True, slots=True)
class NUT10Option:
    """NUT-18 `nut10`: the locking condition the payee requires (NUT-10 kind, data, tags)."""

    kind: str
    data: str
    tags: Tags = ()

    def __post_init__(self) -> None:
        _text(self.kind, "nut10 kind", empty_ok=False)
        _text(self.data, "nut10 data")
        object.__setattr__(self, "tags", _tags(self.tags, "nut10 tags"))

    def _tlv(self) -> bytes:
        """NUT-26 sub-TLV: kind (0 = P2PK, 1 = HTLC), data, tag tuples."""
        kinds = {"P2PK": 0, "HTLC": 1}
        if self.kind not in kinds:
            raise TokenError(f"nut10 kind {self.kind!r} has no creqB code")
        out = bytearray(b"\x01\x00\x01" + bytes([kinds[self.kind]]))
        data = self.data.encode()
        out += b"\x02" + len(data).to_bytes(2, "big") + data
        for tag in self.tags:
            parts = [t.encode() for t in tag]
            if any(len(p) > 255 for p in parts):
                raise TokenError("a creqB tag value is longer than 255 bytes")
            body = b"".join(bytes([len(p)]) + p for p in parts)
            out += b"\x03" + len(body).to_bytes(2, "big") + body
        return bytes(out)

    def _cbor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"k": self.kind, "d": self.data}
        if self.tags:
            d["t"] = [list(t) for t in self.tags]
        return d


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    """NUT-18 payment request (`creqA...`). All fields optional; `unit` required with `amount`."""

    amount: int | None = None
    unit: str | None = None
    mints: tuple[str, ...] = ()
    id: str | None = None
    description: str | None = None
    single_use: bool | None = None
    transports: tuple[Transport, ...] = ()
    nut10: NUT10Option | None = None

    def __post_init__(self) -> None:
        if self.amount is not None:
            _amount(self.amount)
            if self.unit is None:
                raise TokenError("a payment request with an amount must state its unit")
        if self.unit is not None:
            _text(self.unit, "unit", empty_ok=False)
        if not isinstance(self.mints, tuple | list):
            raise TokenError("mints must be a tuple of strings")
        object.__setattr__(
            self, "mints", tuple(_text(m, "mint", empty_ok=False) for m in self.mints)
        )
        if self.id is not None:
            _text(self.id, "id")
        if self.description is not None:
            _text(self.description, "description")
        if self.single_use is not None and not isinstance(self.single_use, bool):
            raise TokenError("single_use must be a bool")
        if not isinstance(self.transports, tuple | list) or not all(
            isinstance(t, Transport) for t in self.transports
        ):
            raise TokenError("transports must be a tuple of Transport")
        object.__setattr__(self, "transports", tuple(self.transports))
        if self.nut10 is not None and not isinstance(self.nut10, NUT10Option):
            raise TokenError("nut10 must be a NUT10Option")

    def encode(self) -> str:
        """`creqA` + base64url(CBOR), padded, keys in the order of the NUT-18 vectors."""
        d: dict[str, Any] = {}
        if self.transports:
            d["t"] = [t._cbor() for t in self.transports]
        if self.id is not None:
            d["i"] = self.id
        if self.amount is not None:
            d["a"] = self.amount
        if self.unit is not None:
            d["u"] = self.unit
        if self.mints:
            d["m"] = list(self.mints)
        if self.description is not None:
            d["d"] = self.description
        if self.single_use is not None:
            d["s"] = self.single_use
        if self.nut10 is not None:
            d["nut10"] = self.nut10._cbor()
        return PAYMENT_REQUEST_PREFIX + _b64encode(cbor.dumps(d), pad=True)

    def encode_b(self) -> str:
        """NUT-26 `CREQB1…`: bech32m of the TLV form, upper case (QR alphanumeric mode).
        Transports are not encoded (an in-band NUT-24 request has none)."""
        if self.transports:
            raise TokenError("creqB transports are not supported here")
        out = bytearray()

        def tlv(tag: int, value: bytes) -> None:
            if len(value) > 0xFFFF:
                raise TokenError("a creqB field is longer than 65535 bytes")
            out.extend(bytes([tag]) + len(value).to_bytes(2, "big") + value)

        if self.id is not None:
            tlv(0x01, self.id.encode())
        if self.amount is not None:
            tlv(0x02, self.amount.to_bytes(8, "big"))
        if self.unit is not None:
            tlv(0x03, b"\x00" if self.unit == "sat" else self.unit.encode())
        if self.single_use is not None:
            tlv(0x04, b"\x01" if self.single_use else b"\x00")
        for mint in self.mints:
            tlv(0x05, mint.encode())
        if self.description is not None:
            tlv(0x06, self.description.encode())
        if self.nut10 is not None:
            tlv(0x08, self.nut10._tlv())
        return bech32_encode("creqb", bytes(out), m=True).upper()

    @classmethod
    def decode(cls, text: str) -> PaymentRequest:
        """Parse `creqA...`; raises only TokenError."""
        if not isinstance(text, str):
            raise TokenError("payment request must be a string")
        s = text.strip()
        if len(s) > MAX_TOKEN_CHARS:
            raise TokenError("payment request too long")
        if not s.startswith(PAYMENT_REQUEST_PREFIX):
            raise TokenError("not a payment request (expected the creqA prefix)")
        obj = _cbor_map(_b64decode(s[len(PAYMENT_REQUEST_PREFIX) :]), "payment request")

        amount = _get(obj, "a")
        unit = _get(obj, "u")
        mints = _get(obj, "m")
        if mints is not None and not isinstance(mints, list):
            raise TokenError("payment request 'm' must be an array of strings")
        single_use = _get(obj, "s")
        if single_use is not None and not isinstance(single_use, bool):
            raise TokenError("payment request 's' must be a bool")
        transports: list[Transport] = []
        raw_transports = _get(obj, "t")
        if raw_transports is not None:
            if not isinstance(raw_transports, list):
                raise TokenError("payment request 't' must be an array")
            for t in raw_transports:
                if not isinstance(t, dict):
                    raise TokenError("transport must be a map")
                transports.append(
                    Transport(
                        type=_text(t.get("t"), "transport type"),
                        target=_text(t.get("a"), "transport target"),
                        tags=_tags(_get(t, "g"), "transport tags"),
                    )
                )
        nut10 = None
        raw_nut10 = _get(obj, "nut10")
        if raw_nut10 is not None:
            if not isinstance(raw_nut10, dict):
                raise TokenError("payment request 'nut10' must be a map")
            nut10 = NUT10Option(
                kind=_text(raw_nut10.get("k"), "nut10 kind"),
                data=_text(raw_nut10.get("d"), "nut10 data"),
                tags=_tags(_get(raw_nut10, "t"), "nut10 tags"),
            )
        return cls(
            amount=None if amount is None else _amount(amount),
            unit=None if unit is None else _text(unit, "unit"),
            mints=tuple(_text(m, "mint") for m in (mints or [])),
            id=_opt_text(_get(obj, "i"), "id"),
            description=_opt_text(_get(obj, "d"), "description"),
            single_use=single_use,
            transports=tuple(transports),
            nut10=nut10,
        )
