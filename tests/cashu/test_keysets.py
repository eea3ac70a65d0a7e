"""NUT-01 keys, NUT-02 keyset ids (every vector in 01-tests.md and 02-tests.md), fees, amount
splitting and short keyset ids."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from routstr.cashu.keysets import (
    KeysetError,
    derive_keyset_id,
    derive_keyset_id_v2,
    fee_for,
    keyset_id_version,
    parse_keys,
    resolve_short_id,
    split_amount,
    verify_keyset_id,
)
from routstr.cashu.secp256k1 import mul_g
from routstr.cashu.tokens import Proof
from tests.cashu import vectors as V

NUT01 = V.blocks("01")
INVALID_KEYSETS = [b.json() for b in NUT01[:2]]
VALID_KEYSETS = [b.json() for b in NUT01[2:]]


def _v2_vectors() -> list[tuple[dict[str, str], dict[str, str]]]:
    out = []
    for block in V.blocks("02"):
        if "Version 2" in block.headings:
            out.append((V.prose_fields(block.prose), block.json()))
    return out


def _v1_vectors() -> list[tuple[str, dict[str, str]]]:
    return [(V.prose_fields(b.prose)["Keyset id"], b.json()) for b in V.under("02", "Version 1")]


def test_vector_counts() -> None:
    assert (len(INVALID_KEYSETS), len(VALID_KEYSETS)) == (2, 2)
    assert (len(_v1_vectors()), len(_v2_vectors())) == (2, 3)


@pytest.mark.parametrize("keys", INVALID_KEYSETS)
def test_nut01_invalid_keysets_rejected(keys: dict[str, str]) -> None:
    with pytest.raises(KeysetError):
        parse_keys(keys)
    with pytest.raises(KeysetError):
        derive_keyset_id(keys)


@pytest.mark.parametrize("keys", VALID_KEYSETS)
def test_nut01_valid_keysets_accepted(keys: dict[str, str]) -> None:
    parsed = parse_keys(keys)
    assert list(parsed) == sorted(int(a) for a in keys)
    assert max(parsed) == max(int(a) for a in keys)  # 2^63 fits
    assert all(parsed[int(a)] == k for a, k in keys.items())


@pytest.mark.parametrize(("keyset_id", "keys"), _v1_vectors())
def test_nut02_version_00_ids(keyset_id: str, keys: dict[str, str]) -> None:
    assert derive_keyset_id(keys) == keyset_id
    assert verify_keyset_id(keyset_id, keys)
    assert keyset_id_version(keyset_id) == "00"
    # order of the mapping does not matter; amounts as ints work too
    reordered = {int(a): k for a, k in reversed(list(keys.items()))}
    assert derive_keyset_id(reordered) == keyset_id
    # a changed key changes the id
    tampered = dict(reordered)
    tampered[1] = mul_g(12345).to_hex()
    assert not verify_keyset_id(keyset_id, tampered)


@pytest.mark.parametrize(("meta", "keys"), _v2_vectors())
def test_nut02_version_01_ids(meta: dict[str, str], keys: dict[str, str]) -> None:
    keyset_id = meta["Keyset id"]
    fee = int(meta["Input fee ppk"])
    expiry = int(meta["Final expiry"]) if "Final expiry" in meta else None
    derived = derive_keyset_id_v2(keys, meta["Unit"], fee, expiry)
    assert derived == keyset_id
    assert keyset_id_version(keyset_id) == "01"
    assert verify_keyset_id(
        keyset_id, keys, unit=meta["Unit"], input_fee_ppk=fee, final_expiry=expiry
    )
    # the id commits to unit, fee and expiry
    assert not verify_keyset_id(keyset_id, keys, unit="usd", input_fee_ppk=fee, final_expiry=expiry)
    assert not verify_keyset_id(
        keyset_id, keys, unit=meta["Unit"], input_fee_ppk=fee + 1, final_expiry=expiry
    )
    with pytest.raises(KeysetError):
        verify_keyset_id(keyset_id, keys)


def test_v2_fee_zero_and_none_are_the_same() -> None:
    _, keys = _v2_vectors()[2]
    assert derive_keyset_id_v2(keys, "sat", 0) == derive_keyset_id_v2(keys, "sat", None)


@pytest.mark.parametrize(
    "bad_id",
    ["", "00", "zz456a94ab4e1c46", "00456A94AB4E1C46", "02456a94ab4e1c46", 5, "01" + "0" * 62],
)
def test_malformed_or_unknown_ids_do_not_verify(bad_id: object) -> None:
    _, keys = _v1_vectors()[0]
    assert not verify_keyset_id(bad_id, keys)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "keys",
    [
        {},
        {"0": mul_g(1).to_hex()},
        {"-1": mul_g(1).to_hex()},
        {"01": mul_g(1).to_hex()},
        {"1.0": mul_g(1).to_hex()},
        {"x": mul_g(1).to_hex()},
        {True: mul_g(1).to_hex()},
        {str(2**64): mul_g(1).to_hex()},
        {"1": mul_g(1).to_hex(), 1: mul_g(2).to_hex()},
        {"1": "02" + "00" * 32},
        {"1": None},
        {"1": mul_g(1).to_hex() + "00"},
    ],
)
def test_parse_keys_rejects(keys: dict[object, object]) -> None:
    with pytest.raises(KeysetError):
        parse_keys(keys)


# ----------------------------------------------------------------- fees


def _proof(keyset_id: str, n: int) -> Proof:
    return Proof(amount=1, id=keyset_id, secret=f"s{n}", C=mul_g(n + 1).to_hex())


def test_fee_examples_from_nut02() -> None:
    fees = {"00aa00aa00aa00aa": 100, "00bb00bb00bb00bb": 0, "00cc00cc00cc00cc": 1000}
    assert fee_for([], fees) == 0
    assert fee_for(["00aa00aa00aa00aa"] * 3, fees) == 1  # ceil(0.3)
    assert fee_for(["00aa00aa00aa00aa"] * 10, fees) == 1
    assert fee_for(["00aa00aa00aa00aa"] * 11, fees) == 2
    assert fee_for(["00bb00bb00bb00bb"] * 50, fees) == 0
    assert fee_for(["00cc00cc00cc00cc", "00aa00aa00aa00aa"], fees) == 2
    proofs = [_proof("00aa00aa00aa00aa", i) for i in range(15)]
    assert fee_for(proofs, fees) == 2  # the Nutshell default: 15 inputs at 100 ppk


@given(
    st.lists(st.sampled_from(["00aa00aa00aa00aa", "00bb00bb00bb00bb"]), max_size=60),
    st.integers(0, 5000),
    st.integers(0, 5000),
)
def test_fee_is_ceiling_of_sum(ids: list[str], ppk_a: int, ppk_b: int) -> None:
    fees = {"00aa00aa00aa00aa": ppk_a, "00bb00bb00bb00bb": ppk_b}
    total = sum(fees[i] for i in ids)
    assert fee_for(ids, fees) == math.ceil(total / 1000) == -(-total // 1000)


def test_fee_unknown_keyset_or_bad_fee_raises() -> None:
    with pytest.raises(KeysetError):
        fee_for(["00dd00dd00dd00dd"], {})
    with pytest.raises(KeysetError):
        fee_for(["00dd00dd00dd00dd"], {"00dd00dd00dd00dd": -1})
    assert fee_for(["00dd00dd00dd00dd"], {"00dd00dd00dd00dd": None}) == 0  # type: ignore[dict-item]


# ----------------------------------------------------------------- amounts


def test_split_amount_examples() -> None:
    assert split_amount(0) == []
    assert split_amount(1) == [1]
    assert split_amount(13) == [1, 4, 8]
    assert split_amount(64) == [64]
    assert split_amount(2**63) == [2**63]


@given(st.integers(0, 2**70))
def test_split_amount_properties(n: int) -> None:
    parts = split_amount(n)
    assert sum(parts) == n
    assert parts == sorted(set(parts))
    assert all(p & (p - 1) == 0 for p in parts)
    assert len(parts) == bin(n).count("1")


@pytest.mark.parametrize("bad", [-1, 1.0, True, "3"])
def test_split_amount_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        split_amount(bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------- short ids


def test_resolve_short_id() -> None:
    v2_ids = [meta["Keyset id"] for meta, _ in _v2_vectors()]
    v1_ids = [kid for kid, _ in _v1_vectors()]
    all_ids = v1_ids + v2_ids
    for full in all_ids:
        assert resolve_short_id(full, all_ids) == full
        assert resolve_short_id(full[:16], all_ids) == full
        assert resolve_short_id(full[:16].upper(), all_ids) == full
    with pytest.raises(KeysetError, match="unknown"):
        resolve_short_id("01ffffffffffffff", all_ids)
    with pytest.raises(KeysetError, match="unknown"):
        resolve_short_id(v2_ids[0][:14], all_ids)
    colliding = [v2_ids[0], v2_ids[0][:16] + "f" * 50]
    with pytest.raises(KeysetError, match="ambiguous"):
        resolve_short_id(v2_ids[0][:16], colliding)
    with pytest.raises(KeysetError):
        resolve_short_id(None, all_ids)  # type: ignore[arg-type]
