"""Deterministic secrets and blinding factors from a seed (NUT-13).

The wallet derives each output's secret and blinding factor r from its seed, the keyset id and
a per-keyset counter, so that a lost wallet can be restored from the mnemonic (NUT-09).

- Seed: BIP-39 `PBKDF2-HMAC-SHA512(password=NFKD(mnemonic), salt="mnemonic"+NFKD(passphrase),
  2048 rounds)` -> 64 bytes. (The word list checksum is not checked here: that needs the
  BIP-39 word list; the seed is the same either way.)
- Keyset version `00` (legacy, BIP-32): secret = private key at
  m/129372'/0'/{keyset_id_int}'/{counter}'/0 as 64 hex chars; r = the private key at
  .../{counter}'/1, where keyset_id_int = int(keyset_id_hex) mod (2^31 - 1).
- Keyset version `01` (HMAC-SHA256): message = b"Cashu_KDF_HMAC_SHA256" || keyset id bytes ||
  counter as uint64 big-endian; secret = HMAC-SHA256(seed, message || 0x00) as hex;
  r = HMAC-SHA256(seed, message || 0x01) mod N (r == 0 rejected).

Both variants return the secret as a hex *string* — the proof's `secret` is that string and
`hash_to_curve` is applied to its UTF-8 bytes, not to the raw 32 bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import unicodedata

from .secp256k1 import N, mul_g

__all__ = [
    "BIP32_HARDENED",
    "bip32_derive",
    "bip32_master",
    "derive_secret",
    "keyset_id_int",
    "mnemonic_to_seed",
]

BIP32_HARDENED = 0x80000000
_PURPOSE = 129372  # UTF-8 for the peanut emoji, as NUT-13 says
_KDF_TAG = b"Cashu_KDF_HMAC_SHA256"


def mnemonic_to_seed(mnemonic: str, passphrase: str = "") -> bytes:
    """BIP-39 seed (64 bytes) from a mnemonic sentence and optional passphrase."""
    words = unicodedata.normalize("NFKD", " ".join(mnemonic.split()))
    salt = unicodedata.normalize("NFKD", "mnemonic" + passphrase)
    return hashlib.pbkdf2_hmac("sha512", words.encode("utf-8"), salt.encode("utf-8"), 2048)


def bip32_master(seed: bytes) -> tuple[int, bytes]:
    """BIP-32 master private key and chain code from a seed."""
    digest = hmac.digest(b"Bitcoin seed", seed, "sha512")
    k = int.from_bytes(digest[:32], "big")
    if not 0 < k < N:
        raise ValueError("invalid master key (probability < 2^-127)")
    return k, digest[32:]


def _ckd_priv(k: int, chain: bytes, index: int) -> tuple[int, bytes]:
    if not 0 <= index < 2**32:
        raise ValueError("BIP-32 child index out of range")
    if index >= BIP32_HARDENED:
        data = b"\x00" + k.to_bytes(32, "big") + index.to_bytes(4, "big")
    else:
        data = mul_g(k).to_bytes() + index.to_bytes(4, "big")
    digest = hmac.digest(chain, data, "sha512")
    il = int.from_bytes(digest[:32], "big")
    child = (il + k) % N
    if il >= N or child == 0:
        raise ValueError("invalid BIP-32 child key (probability < 2^-127)")
    return child, digest[32:]


def _derive_node(seed: bytes, path: str) -> tuple[int, bytes]:
    parts = path.split("/")
    if parts[0] != "m":
        raise ValueError("BIP-32 path must start with 'm'")
    k, chain = bip32_master(seed)
    for part in parts[1:]:
        hardened = part.endswith(("'", "h", "H"))
        digits = part[:-1] if hardened else part
        if not digits.isascii() or not digits.isdigit():
            raise ValueError(f"bad BIP-32 path element {part!r}")
        index = int(digits)
        if index >= BIP32_HARDENED:
            raise ValueError(f"BIP-32 path element out of range: {part!r}")
        k, chain = _ckd_priv(k, chain, index + BIP32_HARDENED if hardened else index)
    return k, chain


def bip32_derive(seed: bytes, path: str) -> int:
    """Private key at a path like "m/129372'/0'/1/2'" (' or h marks hardened steps)."""
    return _derive_node(seed, path)[0]


def keyset_id_int(keyset_id: str) -> int:
    """NUT-13 legacy integer form of a keyset id (first 8 bytes for version-01 ids)."""
    raw = bytes.fromhex(keyset_id)
    if keyset_id.startswith("01"):
        raw = raw[:8]
    return int.from_bytes(raw, "big") % (2**31 - 1)


def derive_secret(seed: bytes, keyset_id: str, counter: int) -> tuple[str, int]:
    """(secret as a 64-char hex string, blinding factor r) for one output, per NUT-13."""
    if not isinstance(counter, int) or isinstance(counter, bool) or counter < 0:
        raise ValueError("counter must be a non-negative integer")
    version = keyset_id[:2]
    if version == "00":
        if counter >= BIP32_HARDENED:
            raise ValueError("counter must be below 2^31 for version-00 keysets")
        k, chain = _derive_node(seed, f"m/{_PURPOSE}'/0'/{keyset_id_int(keyset_id)}'/{counter}'")
        secret = _ckd_priv(k, chain, 0)[0]
        r = _ckd_priv(k, chain, 1)[0]
        return secret.to_bytes(32, "big").hex(), r
    if version == "01":
        if counter >= 2**64:
            raise ValueError("counter must be below 2^64")
        message = _KDF_TAG + bytes.fromhex(keyset_id) + counter.to_bytes(8, "big")
        secret_bytes = hmac.digest(seed, message + b"\x00", "sha256")
        r = int.from_bytes(hmac.digest(seed, message + b"\x01", "sha256"), "big") % N
        if r == 0:
            raise ValueError("derived blinding factor is zero (probability 2^-256)")
        return secret_bytes.hex(), r
    raise ValueError(f"unsupported keyset id version {version!r}")
