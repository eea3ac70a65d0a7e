"""NUT-13 deterministic secrets: every vector in 13-tests.md, plus BIP-39/BIP-32 anchors."""

from __future__ import annotations

import pytest

from routstr.cashu.bdhke import blind, hash_to_curve
from routstr.cashu.nut13 import (
    bip32_derive,
    derive_secret,
    keyset_id_int,
    mnemonic_to_seed,
)
from routstr.cashu.secp256k1 import N
from tests.cashu import vectors as V


def _section(title: str) -> tuple[str, str, dict[str, str], dict[str, str], dict[str, str]]:
    """(keyset id, mnemonic, secrets, rs, paths-or-empty) for one 'Version N' section."""
    blocks = V.under("13", title)
    merged: dict[str, str] = {}
    for b in blocks:
        merged.update(b.json())
    ids = [w.strip("`,") for w in blocks[0].prose.split() if w.strip("`,").startswith(("00", "01"))]
    keyset_id = ids[0] if ids else ""
    secrets = {k: v for k, v in merged.items() if k.startswith("secret_")}
    rs = {k: v for k, v in merged.items() if k.startswith("r_")}
    paths = {k: v for k, v in merged.items() if k.startswith("derivation_path_")}
    return keyset_id, merged["mnemonic"], secrets, rs, paths


V1_INT = V.under("13", "Version 1: keyset ID integer representation")[0].json()
V1 = _section("Version 1: Secret derivation")
V2 = _section("Version 2: Secret derivation")


def test_vector_counts() -> None:
    for section in (V1, V2):
        _, _, secrets, rs, _ = section
        assert len(secrets) == len(rs) == 5
    assert len(V1[4]) == 5
    assert V2[0].startswith("01") and len(V2[0]) == 66


def test_keyset_id_int_vector() -> None:
    assert keyset_id_int(V1_INT["keyset_id"]) == V1_INT["keyest_id_int"]  # sic, upstream typo
    assert V1_INT["derivation_path"].startswith(f"m/129372'/0'/{V1_INT['keyest_id_int']}'/")


def test_version_1_paths_match_the_vector() -> None:
    *_, paths = V1
    kid_int = V1_INT["keyest_id_int"]
    for i in range(5):
        assert paths[f"derivation_path_{i}"] == f"m/129372'/0'/{kid_int}'/{i}'"


@pytest.mark.parametrize("counter", range(5))
def test_version_1_secrets_and_rs(counter: int) -> None:
    keyset_id = V1_INT["keyset_id"]
    _, mnemonic, secrets, rs, paths = V1
    seed = mnemonic_to_seed(mnemonic)
    secret, r = derive_secret(seed, keyset_id, counter)
    assert secret == secrets[f"secret_{counter}"]
    assert r == V.h(rs[f"r_{counter}"])
    # the same through the generic BIP-32 path helper
    base = paths[f"derivation_path_{counter}"]
    assert bip32_derive(seed, base + "/0").to_bytes(32, "big").hex() == secret
    assert bip32_derive(seed, base + "/1") == r


@pytest.mark.parametrize("counter", range(5))
def test_version_2_secrets_and_rs(counter: int) -> None:
    keyset_id, mnemonic, secrets, rs, _ = V2
    secret, r = derive_secret(mnemonic_to_seed(mnemonic), keyset_id, counter)
    assert secret == secrets[f"secret_{counter}"]
    assert r == V.h(rs[f"r_{counter}"])


def test_derived_values_feed_blinding() -> None:
    keyset_id, mnemonic, *_ = V2
    secret, r = derive_secret(mnemonic_to_seed(mnemonic), keyset_id, 0)
    B_, r_out = blind(secret.encode(), r)
    assert r_out == r and 0 < r < N
    assert B_ != hash_to_curve(secret.encode())


def test_bip39_trezor_vector() -> None:
    # BIP-39 reference vector (english, passphrase "TREZOR"): 11 x "abandon" + "about".
    seed = mnemonic_to_seed(" ".join(["abandon"] * 11 + ["about"]), "TREZOR")
    assert seed.hex() == (
        "c55257c360c07c72029aebc1b53c05ed0362ada38ead3e3e9efa3708e53495531f09a6987599d1826"
        "4c1e1c92f2cf141630c7a3c4ab7c81b2f001698e7463b04"
    )
    # extra whitespace is normalised away
    assert (
        mnemonic_to_seed("  " + "   ".join(["abandon"] * 11 + ["about"]) + "\n", "TREZOR") == seed
    )


def test_bip32_test_vector_1() -> None:
    # BIP-32 test vector 1, chain m/0H/1/2H/2/1000000000 (mixes hardened and normal steps).
    seed = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
    assert bip32_derive(seed, "m") == int(
        "e8f32e723decf4051aefac8e2c93c9c5b214313817cdb01a1494b917c8436b35", 16
    )
    assert bip32_derive(seed, "m/0'/1/2'/2/1000000000") == int(
        "471b76e389e528d6de6d816857e012c5455051cad6660850e58372a6c3e6e7c8", 16
    )
    assert bip32_derive(seed, "m/0h/1/2H/2/1000000000") == bip32_derive(
        seed, "m/0'/1/2'/2/1000000000"
    )


@pytest.mark.parametrize("path", ["", "0/1", "m/x", "m/2147483648", "m/-1", "m//1", "m/1''"])
def test_bad_paths(path: str) -> None:
    with pytest.raises(ValueError):
        bip32_derive(b"\x00" * 32, path)


def test_bad_counters_and_versions() -> None:
    seed = b"\x01" * 64
    with pytest.raises(ValueError):
        derive_secret(seed, "009a1f293253e41e", -1)
    with pytest.raises(ValueError):
        derive_secret(seed, "009a1f293253e41e", 2**31)
    with pytest.raises(ValueError):
        derive_secret(seed, "02" + "00" * 7, 0)
    with pytest.raises(ValueError):
        derive_secret(seed, "01" + "00" * 32, 2**64)
    assert derive_secret(seed, "01" + "00" * 32, 2**40)[1] > 0
