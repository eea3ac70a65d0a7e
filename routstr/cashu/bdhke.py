"""Blind Diffie-Hellman key exchange (NUT-00) and DLEQ proofs (NUT-12).

Alice (this wallet) blinds a secret x into B_ = Y + r*G with Y = hash_to_curve(x); the mint
returns C_ = k*B_; Alice unblinds C = C_ - r*K where K = k*G is the mint's public key for the
amount. The proof (x, C) is ecash: the mint checks k*hash_to_curve(x) == C when it is spent.

NUT-12 lets the wallet check, without the mint's private key, that C_ was made with the same
k as the published K: the mint returns (e, s) with
    R1 = s*G - e*K,  R2 = s*B_ - e*C_,  e == SHA256(hex(R1) || hex(R2) || hex(K) || hex(C_))
where hex() is the lowercase hex of the 65-byte uncompressed SEC1 encoding, concatenated as
text and UTF-8 encoded before hashing (the NUT's `hash_e`). A receiver (Carol) given (x, C,
e, s, r) rebuilds B_ = Y + r*G and C_ = C + r*K and runs the same check.

`sign_blinded` and `make_dleq` are the mint's side, here only so the vectors and tests can
exercise both ends; see the threat model in `secp256k1` for why they must not back a mint.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets as _secrets

from .secp256k1 import G, InvalidPoint, N, Point, lift_x, mul_g, multi_mul

__all__ = [
    "DOMAIN_SEPARATOR",
    "blind",
    "hash_e",
    "hash_to_curve",
    "make_dleq",
    "sign_blinded",
    "unblind",
    "verify_dleq",
    "verify_proof_dleq",
]

DOMAIN_SEPARATOR = b"Secp256k1_HashToCurve_Cashu_"
_DLEQ_NONCE_TAG = b"Cashu_DLEQ_R_v1"


def hash_to_curve(message: bytes) -> Point:
    """NUT-00: Y = 02 || SHA256(SHA256(DOMAIN_SEPARATOR || message) || counter_le32), first
    counter from 0 whose candidate x is on the curve (about two tries on average)."""
    msg_hash = hashlib.sha256(DOMAIN_SEPARATOR + bytes(message)).digest()
    for counter in range(2**32):
        x = int.from_bytes(hashlib.sha256(msg_hash + counter.to_bytes(4, "little")).digest(), "big")
        pt = lift_x(x)  # even y == the 0x02 prefix; None for x >= P or x not on the curve
        if pt is not None:
            return pt
    raise ValueError("no point found for message")  # pragma: no cover (probability 2^-2^32)


def _check_scalar(r: int, name: str) -> int:
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r < N:
        raise ValueError(f"{name} must be an integer in [1, N-1]")
    return r


def blind(secret: bytes, r: int | None = None) -> tuple[Point, int]:
    """B_ = hash_to_curve(secret) + r*G; r drawn from `secrets` in [1, N-1] when not given."""
    if r is None:
        r = _secrets.randbelow(N - 1) + 1
    _check_scalar(r, "blinding factor r")
    return hash_to_curve(secret) + mul_g(r), r


def unblind(C_: Point, r: int, K: Point) -> Point:
    """C = C_ - r*K."""
    _check_scalar(r, "blinding factor r")
    return C_ + K * (N - r)


def sign_blinded(k: int, B_: Point) -> Point:
    """The mint's blind signature C_ = k*B_ (tests and vectors only)."""
    _check_scalar(k, "private key k")
    return B_ * k


def hash_e(*points: Point) -> bytes:
    """NUT-12 challenge hash over the uncompressed hex encodings of `points`."""
    text = "".join(p.to_hex(compressed=False) for p in points)
    return hashlib.sha256(text.encode("utf-8")).digest()


def _dleq_nonce(k: int, K: Point, B_: Point, C_: Point) -> int:
    """NUT-12 deterministic nonce HMAC-SHA256(k, tag || K || B_ || C_ || ctr), rejection-sampled."""
    key = k.to_bytes(32, "big")
    data = (
        _DLEQ_NONCE_TAG
        + K.to_bytes(compressed=False)
        + B_.to_bytes(compressed=False)
        + C_.to_bytes(compressed=False)
    )
    for ctr in range(256):
        r = int.from_bytes(hmac.digest(key, data + bytes([ctr]), "sha256"), "big")
        if 0 < r < N:
            return r
    raise ValueError("no DLEQ nonce found")  # pragma: no cover


def make_dleq(k: int, B_: Point, C_: Point, nonce: int | None = None) -> tuple[int, int]:
    """The mint's DLEQ proof (e, s) that C_ = k*B_ and K = k*G share k (tests and vectors only).

    Without `nonce`, the nonce is derived deterministically as NUT-12 specifies.
    """
    _check_scalar(k, "private key k")
    K = mul_g(k)
    r = _dleq_nonce(k, K, B_, C_) if nonce is None else _check_scalar(nonce, "nonce")
    R1 = mul_g(r)
    R2 = B_ * r
    e = int.from_bytes(hash_e(R1, R2, K, C_), "big")
    s = (r + e * k) % N
    return e, s


def verify_dleq(B_: Point, C_: Point, e: int, s: int, K: Point) -> bool:
    """NUT-12 (Alice): R1 = s*G - e*K, R2 = s*B_ - e*C_, and e == hash_e(R1, R2, K, C_)."""
    if not (0 <= e < 2**256 and 0 <= s < N):
        return False
    if B_.is_infinity or C_.is_infinity or K.is_infinity:
        return False
    R1 = multi_mul(((s, G), (-e, K)))
    R2 = multi_mul(((s, B_), (-e, C_)))
    if R1.is_infinity or R2.is_infinity:
        return False
    return hmac.compare_digest(hash_e(R1, R2, K, C_), e.to_bytes(32, "big"))


def verify_proof_dleq(secret: bytes, C: Point, e: int, s: int, r: int, K: Point) -> bool:
    """NUT-12 (Carol): rebuild B_ = Y + r*G and C_ = C + r*K from Alice's r, then verify."""
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r < N:
        return False
    try:
        B_ = hash_to_curve(secret) + mul_g(r)
        C_ = C + K * r
    except InvalidPoint:  # pragma: no cover (inputs are Points; kept for safety)
        return False
    return verify_dleq(B_, C_, e, s, K)
