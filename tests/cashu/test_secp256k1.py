"""secp256k1: encodings, group laws, fixed-base and GLV/wNAF multiplication against a naive
reference, and the vectors' points."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routstr.cashu import secp256k1 as S
from routstr.cashu.secp256k1 import (
    INFINITY,
    G,
    InvalidPoint,
    N,
    P,
    Point,
    lift_x,
    mul_g,
    multi_mul,
    point_from_bytes,
    point_from_hex,
)
from tests.cashu import vectors as V

scalars = st.integers(min_value=0, max_value=N - 1)
nonzero = st.integers(min_value=1, max_value=N - 1)
any_int = st.integers(min_value=-(2**300), max_value=2**300)


# ----------------------------------------------------------------- a naive reference (affine)


def _ref_add(a: tuple[int, int] | None, b: tuple[int, int] | None) -> tuple[int, int] | None:
    if a is None:
        return b
    if b is None:
        return a
    if a[0] == b[0] and (a[1] + b[1]) % P == 0:
        return None
    if a == b:
        lam = 3 * a[0] * a[0] * pow(2 * a[1], -1, P) % P
    else:
        lam = (b[1] - a[1]) * pow(b[0] - a[0], -1, P) % P
    x = (lam * lam - a[0] - b[0]) % P
    return x, (lam * (a[0] - x) - a[1]) % P


def _ref_mul(k: int, pt: Point) -> Point:
    assert pt.x is not None and pt.y is not None
    acc: tuple[int, int] | None = None
    cur: tuple[int, int] | None = (pt.x, pt.y)
    k %= N
    while k:
        if k & 1:
            acc = _ref_add(acc, cur)
        cur = _ref_add(cur, cur)
        k >>= 1
    return INFINITY if acc is None else Point(*acc)


# ----------------------------------------------------------------- constants and encodings


def test_generator_is_on_curve_and_has_order_n() -> None:
    assert (G.y * G.y - G.x**3 - 7) % P == 0  # type: ignore[operator]
    assert mul_g(N).is_infinity
    assert (G * N).is_infinity
    assert mul_g(N - 1) == -G
    assert mul_g(1) == G


def test_known_multiples_of_g() -> None:
    # 2G and 3G appear in the vectors: NUT-12's A for a = 2, and G itself (k = 1).
    a = V.kv_groups(V.under("12", "Deterministic nonce derivation")[0].text)[0]
    assert mul_g(V.h(a["a"])).to_hex() == a["A"]
    blind_sig = V.kv_groups(V.under("12", "DLEQ verification on `BlindSignature`")[0].text)[0]
    assert G.to_hex() == blind_sig["A"]
    assert G + G == mul_g(2) == G * 2 == 2 * G
    assert G + G + G == mul_g(3)


def test_every_vector_key_decodes_and_reencodes() -> None:
    """The valid NUT-01/02 keysets: 130+ real compressed keys."""
    for name in ("01", "02"):
        for block in V.blocks(name):
            keys = block.json()
            for hexkey in keys.values():
                if len(hexkey) != 66:
                    continue  # the invalid NUT-01 examples
                pt = point_from_hex(hexkey)
                assert pt.to_hex() == hexkey
                assert point_from_bytes(pt.to_bytes(compressed=False)) == pt


def test_uncompressed_vector_key_decodes() -> None:
    """NUT-01's second invalid keyset holds a valid key in uncompressed form."""
    keys = V.blocks("01")[1].json()
    pt = point_from_hex(keys["2"])
    assert pt.to_hex() == V.blocks("01")[2].json()["2"]


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"\x02",
        b"\x00",
        b"\x02" + b"\x00" * 31,  # 32 bytes after prefix missing one
        b"\x04" + b"\x00" * 32,  # compressed length with uncompressed prefix
        b"\x05" + b"\x01" * 32,
        b"\x02" + P.to_bytes(32, "big"),  # x = P
        b"\x02" + (2**256 - 1).to_bytes(32, "big"),
        b"\x04" + (1).to_bytes(32, "big") + (1).to_bytes(32, "big"),  # not on the curve
        b"\x06" + b"\x00" * 64,  # hybrid encodings are refused
    ],
)
def test_invalid_encodings_raise_invalid_point(bad: bytes) -> None:
    with pytest.raises(InvalidPoint):
        point_from_bytes(bad)


def test_x_not_on_curve_raises() -> None:
    x = next(x for x in range(1, 100) if lift_x(x) is None)
    with pytest.raises(InvalidPoint):
        point_from_bytes(b"\x02" + x.to_bytes(32, "big"))


@pytest.mark.parametrize("bad", ["", "0", "zz", "02 " + "00" * 32, " 02", "0x02", 5, None, b"02"])
def test_invalid_hex_raises_invalid_point(bad: object) -> None:
    with pytest.raises(InvalidPoint):
        point_from_hex(bad)  # type: ignore[arg-type]


def test_invalid_point_is_value_error() -> None:
    assert issubclass(InvalidPoint, ValueError)


def test_point_constructor_validates() -> None:
    with pytest.raises(InvalidPoint):
        Point(1, 1)
    with pytest.raises(InvalidPoint):
        Point(G.x, None)
    with pytest.raises(InvalidPoint):
        Point(G.x, (G.y or 0) + P)
    assert Point() == INFINITY and INFINITY.is_infinity and not G.is_infinity


def test_infinity_has_no_encoding() -> None:
    with pytest.raises(InvalidPoint):
        INFINITY.to_bytes()


def test_point_is_frozen_and_hashable() -> None:
    with pytest.raises(AttributeError):
        G.x = 1  # type: ignore[misc]
    assert len({G, mul_g(1), mul_g(2)}) == 2


@given(nonzero)
@settings(max_examples=50)
def test_compressed_and_uncompressed_round_trip(k: int) -> None:
    pt = mul_g(k)
    assert point_from_bytes(pt.to_bytes()) == pt
    assert point_from_bytes(pt.to_bytes(compressed=False)) == pt
    assert point_from_hex(pt.to_hex().upper()) == pt
    assert len(pt.to_bytes()) == 33 and len(pt.to_bytes(False)) == 65


def test_lift_x_even_y_and_range() -> None:
    assert lift_x(G.x or 0) in (G, -G)
    pt = lift_x(G.x or 0)
    assert pt is not None and pt.y is not None and pt.y % 2 == 0
    assert lift_x(P) is None and lift_x(-1) is None


# ----------------------------------------------------------------- group laws


@given(scalars, scalars)
@settings(max_examples=60)
def test_fixed_base_is_additive(k1: int, k2: int) -> None:
    assert mul_g(k1) + mul_g(k2) == mul_g(k1 + k2)


@given(nonzero, scalars, scalars)
@settings(max_examples=40)
def test_generic_mul_is_additive_and_composes(q: int, k1: int, k2: int) -> None:
    Q = mul_g(q)
    assert Q * k1 + Q * k2 == Q * (k1 + k2)
    assert (Q * k1) * k2 == Q * (k1 * k2 % N) == mul_g(q * k1 * k2)


@given(any_int)
@settings(max_examples=60)
def test_scalars_are_taken_mod_n(k: int) -> None:
    Q = mul_g(7)
    assert mul_g(k) == mul_g(k % N)
    assert Q * k == Q * (k % N)
    assert Q * -k == -(Q * k)


@given(nonzero, nonzero)
@settings(max_examples=40)
def test_negation_subtraction_identity(a: int, b: int) -> None:
    A, B = mul_g(a), mul_g(b)
    assert A - A == INFINITY
    assert A + INFINITY == A == INFINITY + A
    assert -(-A) == A
    assert A - B == mul_g(a - b)
    assert A + B == B + A
    assert (A + B) + G == A + (B + G)


def test_doubling_branch_of_addition() -> None:
    Q = mul_g(123456789)
    assert Q + Q == Q * 2
    assert Q + (-Q) == INFINITY
    assert INFINITY * 5 == INFINITY
    assert Q * 0 == INFINITY and Q * N == INFINITY


@pytest.mark.parametrize(
    "k",
    [1, 2, 3, 15, 16, 17, 127, 128, 129, 255, 256, 257, 2**128, 2**255, N - 1, N - 2, N // 2],
)
def test_edge_scalars_match_reference(k: int) -> None:
    Q = mul_g(0xDEADBEEF)
    assert mul_g(k) == _ref_mul(k, G)
    assert Q * k == _ref_mul(k, Q)


def test_random_scalars_match_reference() -> None:
    rnd = random.Random(20260701)
    for _ in range(25):
        k = rnd.randrange(N)
        Q = _ref_mul(rnd.randrange(1, N), G)
        assert mul_g(k) == _ref_mul(k, G)
        assert Q * k == _ref_mul(k, Q)


def test_glv_endomorphism_and_split() -> None:
    assert G * S._LAMBDA == Point(S._BETA * (G.x or 0) % P, G.y)
    rnd = random.Random(1)
    for k in [0, 1, N - 1, *[rnd.randrange(N) for _ in range(200)]]:
        k1, k2 = S._glv_split(k)
        assert (k1 + k2 * S._LAMBDA - k) % N == 0
        assert abs(k1) < 2**129 and abs(k2) < 2**129


@given(st.integers(min_value=0, max_value=2**300))
def test_wnaf_recoding(k: int) -> None:
    digits = S._wnaf(k)
    assert sum(d << i for i, d in enumerate(digits)) == k
    nonzero_at = [i for i, d in enumerate(digits) if d]
    for i in nonzero_at:
        assert digits[i] % 2 == 1 and abs(digits[i]) < 16
        assert all(d == 0 for d in digits[i + 1 : i + 5])


@given(nonzero, nonzero, scalars, scalars, scalars)
@settings(max_examples=30)
def test_multi_mul_equals_sum(q: int, r: int, a: int, b: int, c: int) -> None:
    Q, R = mul_g(q), mul_g(r)
    assert multi_mul([(a, Q), (b, R), (c, G)]) == Q * a + R * b + mul_g(c)
    assert multi_mul([(a, Q), (-a, Q)]) == INFINITY
    assert multi_mul([]) == INFINITY
    assert multi_mul([(a, INFINITY), (b, G)]) == mul_g(b)


def test_accumulator_collisions_take_doubling_and_infinity_paths() -> None:
    # a*Q + a*Q and a*Q + (-a)*Q force H == 0 inside the shared chain.
    Q = mul_g(99)
    for a in (1, 2, 3, 5, 2**130 + 1):
        assert multi_mul([(a, Q), (a, Q)]) == Q * (2 * a)
        assert multi_mul([(a, Q), (N - a, Q)]) == INFINITY


def test_mul_rejects_non_integers() -> None:
    with pytest.raises(TypeError):
        G * 1.5  # type: ignore[operator]
    with pytest.raises(TypeError):
        G * True
    with pytest.raises(TypeError):
        G + 1  # type: ignore[operator]


def test_timing_report(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints ms per multiplication; asserts only a generous bound against regressions."""
    from routstr.cashu.bdhke import hash_to_curve

    mul_g(1)  # build the table outside the measurement
    rnd = random.Random(5)
    ks = [rnd.randrange(1, N) for _ in range(200)]
    Q = mul_g(0xC0FFEE)

    def per_op(fn: object, n: int) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for k in ks[:n]:
                fn(k)  # type: ignore[operator]
            best = min(best, (time.perf_counter() - t0) / n * 1e3)
        return best

    generic = per_op(lambda k: Q * k, 200)
    fixed = per_op(mul_g, 200)
    h2c = per_op(lambda k: hash_to_curve(k.to_bytes(32, "big")), 200)
    with capsys.disabled():
        print(
            f"\n[secp256k1] generic k*P {generic:.3f} ms, k*G {fixed:.3f} ms, "
            f"hash_to_curve {h2c:.3f} ms"
        )
    assert generic < 20 and fixed < 20 and h2c < 20
