"""BIP-340 Schnorr signatures over secp256k1 with x-only public keys, on the pure-Python group
arithmetic of `routstr.cashu.secp256k1`: NUT-11 witnesses (`routstr.cashu.nut11`) and Nostr
events (`routstr.nostr`). Pinned by the BIP's own test vectors (`tests/bip340-test-vectors.csv`).
See routstr/nostr.py for why signing with the node's long-lived keys is acceptable here."""

from __future__ import annotations

import hashlib

from .secp256k1 import G, N, P, lift_x, mul_g, multi_mul


def _tagged_hash(tag: str, msg: bytes) -> bytes:
    t = hashlib.sha256(tag.encode()).digest()
    return hashlib.sha256(t + t + msg).digest()


_CHALLENGE_PREFIX = hashlib.sha256(b"BIP0340/challenge").digest() * 2


def _challenge(r: bytes, pk: bytes, msg: bytes) -> int:
    return int.from_bytes(hashlib.sha256(_CHALLENGE_PREFIX + r + pk + msg).digest(), "big") % N


def xonly_pubkey(seckey: bytes) -> bytes:
    """The 32-byte x-only public key of a 32-byte secret key (BIP-340 PubKey)."""
    d = int.from_bytes(seckey, "big")
    if len(seckey) != 32 or not 0 < d < N:
        raise ValueError("secret key out of range")
    pt = mul_g(d)
    assert pt.x is not None
    return pt.x.to_bytes(32, "big")


def schnorr_sign(seckey: bytes, msg: bytes, aux_rand: bytes) -> bytes:
    """BIP-340 Sign (default signing, the result verified before it is returned)."""
    if len(aux_rand) != 32:
        raise ValueError("aux_rand must be 32 bytes")
    d0 = int.from_bytes(seckey, "big")
    if len(seckey) != 32 or not 0 < d0 < N:
        raise ValueError("secret key out of range")
    pt = mul_g(d0)
    assert pt.x is not None and pt.y is not None
    d = d0 if pt.y % 2 == 0 else N - d0
    pk = pt.x.to_bytes(32, "big")
    t = (d ^ int.from_bytes(_tagged_hash("BIP0340/aux", aux_rand), "big")).to_bytes(32, "big")
    k0 = int.from_bytes(_tagged_hash("BIP0340/nonce", t + pk + msg), "big") % N
    if k0 == 0:
        raise ValueError("nonce is zero (negligible probability); retry with other aux_rand")
    r_pt = mul_g(k0)
    assert r_pt.x is not None and r_pt.y is not None
    k = k0 if r_pt.y % 2 == 0 else N - k0
    r = r_pt.x.to_bytes(32, "big")
    sig = r + ((k + _challenge(r, pk, msg) * d) % N).to_bytes(32, "big")
    if not schnorr_verify(pk, msg, sig):
        raise ValueError("BIP-340 self-check failed")  # arithmetic fault: never publish it
    return sig


def schnorr_verify(pubkey: bytes, msg: bytes, sig: bytes) -> bool:
    """BIP-340 Verify: True iff `sig` is a valid signature of `msg` by x-only `pubkey`."""
    if len(pubkey) != 32 or len(sig) != 64:
        return False
    p_pt = lift_x(int.from_bytes(pubkey, "big"))
    if p_pt is None:
        return False
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    if r >= P or s >= N:
        return False
    e = _challenge(sig[:32], pubkey, msg)
    r_pt = multi_mul(((s, G), (-e, p_pt)))
    if r_pt.x is None or r_pt.y is None or r_pt.y % 2:
        return False
    return r_pt.x == r


