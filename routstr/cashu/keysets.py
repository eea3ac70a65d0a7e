"""Keysets, keyset ids and fees (NUT-01, NUT-02), and short keyset ids (NUT-00 V4 tokens).

Keyset ids
----------
- version `00` (16 hex chars, what Nutshell 0.19 issues): "00" + the first 14 hex chars of
  SHA256(concatenation of the 33-byte compressed public keys sorted by amount).
- version `01` (66 hex chars): "01" + SHA256 of the text
  "amount:pubkey_hex,amount:pubkey_hex,...|unit:<unit>" followed by "|input_fee_ppk:<n>" when
  the fee is non-zero and "|final_expiry:<t>" when an expiry is set. The id commits to the
  unit, fee and expiry, so verifying one needs them too.
- short ids: V4 tokens may carry only the first 8 bytes of a keyset id; `resolve_short_id`
  maps one back to the full id among a mint's keysets, refusing unknown or ambiguous ones.

Fees (NUT-02): each input costs its keyset's `input_fee_ppk` parts per thousand of a unit; a
transaction pays ceil(sum / 1000) = (sum + 999) // 1000, and must satisfy
sum(inputs) - fee == sum(outputs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from .secp256k1 import InvalidPoint, point_from_hex

Keys = Mapping[int, str] | Mapping[str, str]
"""A keyset's keys: amount (int, or the decimal string JSON gives) -> compressed point hex."""

__all__ = [
    "KeysetError",
    "derive_keyset_id",
    "derive_keyset_id_v2",
    "fee_for",
    "keyset_id_version",
    "parse_keys",
    "resolve_short_id",
    "split_amount",
    "verify_keyset_id",
]

SHORT_ID_HEX_LEN = 16
V1_ID_HEX_LEN = 16
V2_ID_HEX_LEN = 66
MAX_AMOUNT = (1 << 64) - 1


class KeysetError(ValueError):
    """Malformed keys, an unknown or ambiguous keyset id, or a keyset id we cannot check."""


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


def _is_lower_hex(s: object) -> bool:
    return isinstance(s, str) and len(s) % 2 == 0 and all(c in "0123456789abcdef" for c in s)


def keyset_id_version(keyset_id: str) -> str:
    """'00' or '01' for a well-formed full keyset id; raises KeysetError otherwise."""
    if _is_lower_hex(keyset_id):
        if len(keyset_id) == V1_ID_HEX_LEN and keyset_id.startswith("00"):
            return "00"
        if len(keyset_id) == V2_ID_HEX_LEN and keyset_id.startswith("01"):
            return "01"
    raise KeysetError(f"not a version 00 or 01 keyset id: {keyset_id!r}")


def parse_keys(keys: Mapping[Any, Any]) -> dict[int, str]:
    """Validate a NUT-01 `keys` object: amount (int or decimal string) -> compressed point hex.

    Amounts must be positive and below 2^64 (the NUT-01 vectors go up to 2^63); every key must
    be a 33-byte compressed point on secp256k1 (the invalid NUT-01 vectors: a key one byte
    short, a key in uncompressed form). Returns {amount: lowercase hex}, sorted by amount.
    """
    if not isinstance(keys, Mapping) or not keys:
        raise KeysetError("keys must be a non-empty mapping")
    out: dict[int, str] = {}
    for raw_amount, raw_key in keys.items():
        if isinstance(raw_amount, int) and not isinstance(raw_amount, bool):
            amount = raw_amount
        elif (
            isinstance(raw_amount, str)
            and raw_amount.isascii()
            and raw_amount.isdigit()
            and len(raw_amount) <= 20
            and (raw_amount == "0" or not raw_amount.startswith("0"))
        ):
            amount = int(raw_amount)
        else:
            raise KeysetError(f"invalid amount {raw_amount!r}")
        if not 0 < amount <= MAX_AMOUNT:
            raise KeysetError(f"amount out of range: {amount}")
        if amount in out:
            raise KeysetError(f"duplicate amount {amount}")
        if not isinstance(raw_key, str) or len(raw_key) != 66:
            raise KeysetError(f"key for amount {amount} is not a 33-byte compressed point")
        try:
            point_from_hex(raw_key)
        except InvalidPoint as exc:
            raise KeysetError(f"key for amount {amount} is not a valid point") from exc
        out[amount] = raw_key.lower()
    return dict(sorted(out.items()))


def derive_keyset_id(keys: Keys) -> str:
    """Version-00 keyset id (NUT-02 "V1 keysets")."""
    parsed = parse_keys(keys)
    concat = b"".join(bytes.fromhex(k) for k in parsed.values())
    return "00" + hashlib.sha256(concat).hexdigest()[:14]


def derive_keyset_id_v2(
    keys: Keys,
    unit: str,
    input_fee_ppk: int | None = None,
    final_expiry: int | None = None,
) -> str:
    """Version-01 keyset id (NUT-02 "Keyset ID V2"), committing to unit, fee and expiry."""
    parsed = parse_keys(keys)
    if not isinstance(unit, str) or not unit:
        raise KeysetError("unit must be a non-empty string")
    preimage = ",".join(f"{amount}:{key}" for amount, key in parsed.items())
    preimage += f"|unit:{unit.lower()}"
    if input_fee_ppk:
        preimage += f"|input_fee_ppk:{int(input_fee_ppk)}"
    if final_expiry:
        preimage += f"|final_expiry:{int(final_expiry)}"
    return "01" + hashlib.sha256(preimage.encode("utf-8")).hexdigest()


def verify_keyset_id(
    keyset_id: str,
    keys: Keys,
    *,
    unit: str | None = None,
    input_fee_ppk: int | None = None,
    final_expiry: int | None = None,
) -> bool:
    """True when `keyset_id` is the id these keys (and, for version 01, metadata) derive.

    Version-00 ids depend on the keys only. Version-01 ids also commit to the unit, fee and
    final expiry: pass them as the mint's `/v1/keysets` entry states them; calling without
    `unit` for a version-01 id raises KeysetError (it cannot be checked). Malformed keys,
    or an id of an unknown version, give False.
    """
    try:
        version = keyset_id_version(keyset_id)
    except KeysetError:
        return False
    if version == "01" and unit is None:
        raise KeysetError("a version-01 keyset id commits to its unit: pass unit=")
    try:
        if version == "00":
            derived = derive_keyset_id(keys)
        else:
            assert unit is not None
            derived = derive_keyset_id_v2(keys, unit, input_fee_ppk, final_expiry)
    except KeysetError:
        return False
    return derived == keyset_id


def fee_for(
    proofs_or_keyset_ids: Iterable[_HasId | str],
    input_fee_ppk_by_keyset: Mapping[str, int],
) -> int:
    """NUT-02 input fee: ceil(sum of each input's keyset input_fee_ppk / 1000).

    Items are proofs (anything with an `.id`) or keyset id strings, one per input. An input
    whose keyset is missing from the mapping raises KeysetError (never silently free).
    """
    total = 0
    for item in proofs_or_keyset_ids:
        kid = item if isinstance(item, str) else item.id
        try:
            ppk = input_fee_ppk_by_keyset[kid]
        except KeyError:
            raise KeysetError(f"no input_fee_ppk known for keyset {kid}") from None
        if ppk is None:
            ppk = 0
        if not isinstance(ppk, int) or isinstance(ppk, bool) or ppk < 0:
            raise KeysetError(f"invalid input_fee_ppk for keyset {kid}: {ppk!r}")
        total += ppk
    return (total + 999) // 1000


def split_amount(n: int) -> list[int]:
    """Binary decomposition of n into powers of two, ascending: 13 -> [1, 4, 8]."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError("amount must be a non-negative integer")
    return [1 << i for i in range(n.bit_length()) if n >> i & 1]


def resolve_short_id(short: str, full_ids: Iterable[str]) -> str:
    """Map a keyset id as found in a token (full, or the 8-byte short form) to a full id.

    A full id in `full_ids` resolves to itself; a short id must prefix exactly one of them
    (NUT-00: an ambiguous short id MUST fail). Raises KeysetError when unknown or ambiguous.
    """
    if not isinstance(short, str):
        raise KeysetError("keyset id must be a string")
    short = short.lower()
    ids = {i.lower() for i in full_ids}
    if short in ids:
        return short
    if len(short) == SHORT_ID_HEX_LEN and _is_lower_hex(short):
        matches = sorted(i for i in ids if i.startswith(short))
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise KeysetError(f"short keyset id {short} is ambiguous: {matches}")
    raise KeysetError(f"unknown keyset id {short}")
