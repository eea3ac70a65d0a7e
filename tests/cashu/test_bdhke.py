"""NUT-00 BDHKE and NUT-12 DLEQ: every vector in 00-tests.md (crypto part) and 12-tests.md."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routstr.cashu.bdhke import (
    blind,
    hash_e,
    hash_to_curve,
    make_dleq,
    sign_blinded,
    unblind,
    verify_dleq,
    verify_proof_dleq,
)
from routstr.cashu.secp256k1 import G, N, mul_g, point_from_hex
from tests.cashu import vectors as V

# ----------------------------------------------------------------- NUT-00 vectors

HASH_TO_CURVE = V.kv_groups(V.under("00", "Hash-to-curve function")[0].text)
BLINDED = V.kv_groups(V.under("00", "Blinded messages")[0].text)
SIGNED = V.kv_groups(V.under("00", "Blinded signatures")[0].text)


def test_vector_counts() -> None:
    assert (len(HASH_TO_CURVE), len(BLINDED), len(SIGNED)) == (3, 2, 2)


@pytest.mark.parametrize("vec", HASH_TO_CURVE)
def test_hash_to_curve_vectors(vec: dict[str, str]) -> None:
    assert hash_to_curve(bytes.fromhex(vec["Message"])).to_hex() == vec["Point"]


@pytest.mark.parametrize("vec", BLINDED)
def test_blinded_message_vectors(vec: dict[str, str]) -> None:
    B_, r = blind(bytes.fromhex(vec["x"]), V.h(vec["r"]))
    assert r == V.h(vec["r"])
    assert B_.to_hex() == vec["B_"]


@pytest.mark.parametrize("vec", SIGNED)
def test_blind_signature_vectors(vec: dict[str, str]) -> None:
    C_ = sign_blinded(V.h(vec["mint private key"]), point_from_hex(vec["B_"]))
    assert C_.to_hex() == vec["C_"]


# ----------------------------------------------------------------- NUT-12 vectors


def test_hash_e_vector() -> None:
    inputs, output = (V.kv_groups(b.text)[0] for b in V.under("12", "`hash_e` function"))
    pts = [point_from_hex(inputs[k]) for k in ("R1", "R2", "K", "C_")]
    assert hash_e(*pts).hex() == output["hash(R1, R2, K, C_)"]


def test_deterministic_nonce_vector() -> None:
    inputs, output = (
        V.kv_groups(b.text)[0] for b in V.under("12", "Deterministic nonce derivation")
    )
    a = V.h(inputs["a"])
    A, B_, C_ = (point_from_hex(inputs[k]) for k in ("A", "B_", "C_"))
    assert mul_g(a) == A
    assert sign_blinded(a, B_) == C_
    e, s = make_dleq(a, B_, C_)
    assert (e, s) == (V.h(output["e"]), V.h(output["s"]))
    assert verify_dleq(B_, C_, e, s, A)


def test_blind_signature_dleq_vector() -> None:
    keys_block, sig_block = V.under("12", "DLEQ verification on `BlindSignature`")
    keys = V.kv_groups(keys_block.text)[0]
    sig = sig_block.json()
    A, B_ = point_from_hex(keys["A"]), point_from_hex(keys["B_"])
    C_ = point_from_hex(sig["C_"])
    e, s = V.h(sig["dleq"]["e"]), V.h(sig["dleq"]["s"])
    assert verify_dleq(B_, C_, e, s, A)
    assert not verify_dleq(B_, C_, e, (s + 1) % N, A)
    assert not verify_dleq(B_, C_, e + 1, s, A)
    assert not verify_dleq(B_, C_, e, s, mul_g(2))
    assert not verify_dleq(B_, mul_g(5), e, s, A)


def test_proof_dleq_vector() -> None:
    keys_block, proof_block = V.under("12", "DLEQ verification on `Proof`")
    A = point_from_hex(V.kv_groups(keys_block.text)[0]["A"])
    proof = proof_block.json()
    secret = proof["secret"].encode("utf-8")
    C = point_from_hex(proof["C"])
    e, s, r = (V.h(proof["dleq"][k]) for k in ("e", "s", "r"))
    assert verify_proof_dleq(secret, C, e, s, r, A)
    assert not verify_proof_dleq(secret + b"x", C, e, s, r, A)
    assert not verify_proof_dleq(secret, C, e, s, r + 1, A)
    assert not verify_proof_dleq(secret, C, e, s, 0, A)
    assert not verify_proof_dleq(secret, -C, e, s, r, A)


def test_dleq_rejects_out_of_range_values() -> None:
    k = 1234567
    B_, _ = blind(b"secret")
    C_ = sign_blinded(k, B_)
    e, s = make_dleq(k, B_, C_)
    K = mul_g(k)
    assert verify_dleq(B_, C_, e, s, K)
    assert not verify_dleq(B_, C_, e, s + N, K)
    assert not verify_dleq(B_, C_, -e, s, K)
    assert not verify_dleq(B_, C_, e + 2**256, s, K)


# ----------------------------------------------------------------- the protocol end to end


@given(st.binary(max_size=64), st.integers(1, N - 1), st.integers(1, N - 1))
@settings(max_examples=25, deadline=None)
def test_blind_sign_unblind_verify(secret: bytes, k: int, r: int) -> None:
    K = mul_g(k)
    B_, r_out = blind(secret, r)
    assert r_out == r
    C_ = sign_blinded(k, B_)
    C = unblind(C_, r, K)
    assert C == hash_to_curve(secret) * k  # the mint's check on redemption
    e, s = make_dleq(k, B_, C_)
    assert verify_dleq(B_, C_, e, s, K)
    assert verify_proof_dleq(secret, C, e, s, r, K)


def test_make_dleq_with_explicit_nonce() -> None:
    k, nonce = 42, 7
    B_, _ = blind(b"x", 3)
    C_ = sign_blinded(k, B_)
    e, s = make_dleq(k, B_, C_, nonce)
    assert verify_dleq(B_, C_, e, s, mul_g(k))
    assert (e, s) != make_dleq(k, B_, C_)


def test_random_blinding_factor_is_in_range_and_fresh() -> None:
    rs = {blind(b"same secret")[1] for _ in range(8)}
    assert len(rs) == 8 and all(1 <= r < N for r in rs)


@pytest.mark.parametrize("bad", [0, N, -1, True])
def test_bad_scalars_rejected(bad: int) -> None:
    with pytest.raises(ValueError):
        blind(b"x", bad)
    with pytest.raises(ValueError):
        unblind(G, bad, G)
    with pytest.raises(ValueError):
        sign_blinded(bad, G)


def test_secret_string_vs_bytes() -> None:
    """A proof's secret is text; Y is hash_to_curve of its UTF-8 bytes (NUT-00)."""
    secret = "ab" * 32
    assert hash_to_curve(secret.encode()) != hash_to_curve(bytes.fromhex(secret))
