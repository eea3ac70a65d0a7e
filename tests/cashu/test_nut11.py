"""NUT-11 P2PK from the receiving side: the spec's vectors, and every malformed-lock refusal.

Vectors: cashubtc/nuts tests/11-test.md (tests/cashu/vectors/nut11.json).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from routstr.cashu import nut11
from routstr.cashu.bip340 import schnorr_verify

VECTORS = json.loads((Path(__file__).parent / "vectors" / "nut11.json").read_text())
SECKEY = nut11.seckey_from_seed(b"\x01" * 64)
NODE = nut11.pubkey_hex(SECKEY)
OTHER = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"  # the generator
THIRD = "02142715675faf8da1ecc4d51e0b9e539fa0d52fdd96ed60dbe99adb15d6b05ad9"


def secret(data: str = NODE, tags: list[list[str]] | None = None, kind: str = "P2PK") -> str:
    return json.dumps([kind, {"nonce": "ab" * 16, "data": data,
                              "tags": tags if tags is not None else []}])


def verifies(proof: dict[str, Any], pubkey: str) -> bool:
    msg = hashlib.sha256(proof["secret"].encode()).digest()
    return any(schnorr_verify(bytes.fromhex(pubkey[2:]), msg, bytes.fromhex(sig))
               for sig in json.loads(proof["witness"])["signatures"])


def test_the_spec_signatures_are_on_sha256_of_the_secret_string() -> None:
    valid, invalid = VECTORS["sig_inputs_valid"], VECTORS["sig_inputs_invalid"]
    data = nut11.parse_p2pk(valid["secret"])
    assert data is not None and data.sigflag == "SIG_INPUTS"
    assert verifies(valid, data.data)
    assert not verifies(invalid, data.data)  # a signature on another secret


def test_the_spec_multisig_and_refund_vectors_parse_as_the_spec_says() -> None:
    lock = nut11.parse_p2pk(VECTORS["multisig_locktime_past"]["secret"])
    assert lock is not None and lock.n_sigs == 2 and lock.locktime == 21
    assert len(lock.pubkeys) == 2 and len(lock.refund) == 2
    assert verifies(VECTORS["multisig_refund_sig"], lock.refund[0]) or verifies(
        VECTORS["multisig_refund_sig"], lock.refund[1])
    future = nut11.parse_p2pk(VECTORS["refund_future_invalid"]["secret"])
    assert future is not None and future.locktime == 99999999999


def test_our_witness_is_a_valid_signature_by_our_key() -> None:
    s = secret()
    proof = {"secret": s, "witness": nut11.witness(SECKEY, s)}
    assert verifies(proof, NODE) and not verifies(proof, OTHER)


def test_a_key_is_derived_from_the_seed_and_stable() -> None:
    assert nut11.pubkey_hex(nut11.seckey_from_seed(b"\x01" * 64)) == NODE
    assert nut11.pubkey_hex(nut11.seckey_from_seed(b"\x02" * 64)) != NODE
    assert NODE[:2] in ("02", "03") and len(NODE) == 66


def test_what_this_node_redeems() -> None:
    assert nut11.check_redeemable(["a" * 64], NODE) is False  # a plain secret: unlocked
    assert nut11.check_redeemable([secret()], NODE) is True
    assert nut11.check_redeemable([secret(OTHER, [["pubkeys", NODE]])], NODE) is True
    assert nut11.check_redeemable([secret(NODE, [["sigflag", "SIG_INPUTS"]])], NODE) is True
    # 03-prefixed spelling of our x-coordinate: keys compare by x (NUT-11 canonicalisation)
    flipped = ("03" if NODE[:2] == "02" else "02") + NODE[2:]
    assert nut11.check_redeemable([secret(flipped)], NODE) is True  # one x, two spellings
    # a lock expired without refund keys is anyone's: no signature needed
    assert nut11.check_redeemable([secret(OTHER, [["locktime", "21"]])], NODE) is False


@pytest.mark.parametrize(("tags", "data", "why"), [
    ([["sigflag", "SIG_INPUTS"], ["sigflag", "SIG_INPUTS"]], NODE, "appears twice"),
    ([["n_sigs", "0"]], NODE, "positive integer"),
    ([["n_sigs", "2"]], NODE, "positive integer"),  # 2 of 1 key
    ([["n_sigs", "x"]], NODE, "positive integer"),
    ([["n_sigs_refund", "3"], ["refund", OTHER]], NODE, "positive integer"),
    ([["sigflag", "SIG_SOME"]], NODE, "unknown sigflag"),
    ([["pubkeys", NODE]], NODE, "appears twice"),
    ([["pubkeys", "02" + "00" * 32]], NODE, "not a point"),
    ([["pubkeys", "04" + "11" * 32]], NODE, "compressed"),
    ([["refund", OTHER, OTHER], ["locktime", "99999999999"]], NODE, "appears twice"),
    ([], OTHER, "another key"),
    ([["pubkeys", OTHER], ["n_sigs", "2"]], NODE, "needs 2 signatures"),
    ([["locktime", "21"], ["refund", OTHER]], NODE, "expired"),
])
def test_locks_refused_before_any_mint_call(tags: list[list[str]], data: str, why: str) -> None:
    with pytest.raises(nut11.LockError, match=why):
        nut11.check_redeemable([secret(data, tags)], NODE)


@pytest.mark.parametrize("text", [
    '["P2PK"]', '["P2PK", {"data": 1, "nonce": "n"}]', '["P2PK", {"nonce": "n"}]',
    '["P2PK", {"nonce": "n", "data": "d", "tags": [[1]]}]', '[1, {}]', '["P2PK", {} ', "[" * 5000,
])
def test_malformed_nut10_secrets_are_refused(text: str) -> None:
    with pytest.raises(nut11.LockError):
        nut11.check_redeemable([text], NODE)


def test_other_nut10_kinds_are_refused() -> None:
    with pytest.raises(nut11.LockError, match="HTLC"):
        nut11.check_redeemable([secret(kind="HTLC")], NODE)


def test_one_bad_proof_refuses_the_token() -> None:
    with pytest.raises(nut11.LockError):
        nut11.check_redeemable([secret(), secret(OTHER)], NODE)


def _sig_all_parts(swap: dict[str, Any]) -> tuple[list[tuple[str, str]], list[tuple[int, str]]]:
    return ([(p["secret"], p["C"]) for p in swap["inputs"]],
            [(o["amount"], o["B_"]) for o in swap["outputs"]])


def test_sig_all_message_is_the_spec_vector_and_its_signature_verifies() -> None:
    swap = VECTORS["sig_all_swap"]
    msg = nut11.sig_all_message(*_sig_all_parts(swap))
    assert msg == VECTORS["sig_all_msg"]
    digest = hashlib.sha256(msg.encode()).digest()
    assert digest.hex() == VECTORS["sig_all_msg_sha256"]
    lock = nut11.parse_p2pk(swap["inputs"][0]["secret"])
    assert lock is not None and lock.sigflag == nut11.SIG_ALL
    (sig,) = json.loads(swap["inputs"][0]["witness"])["signatures"]
    assert schnorr_verify(bytes.fromhex(lock.data[2:]), digest, bytes.fromhex(sig))
    legacy = nut11.legacy_sig_all_message(*_sig_all_parts(swap))
    assert not schnorr_verify(bytes.fromhex(lock.data[2:]),
                              hashlib.sha256(legacy.encode()).digest(), bytes.fromhex(sig))


def test_sig_all_multisig_vector_signatures_cover_the_whole_swap() -> None:
    swap = VECTORS["sig_all_multisig_valid"]
    digest = hashlib.sha256(nut11.sig_all_message(*_sig_all_parts(swap)).encode()).digest()
    lock = nut11.parse_p2pk(swap["inputs"][0]["secret"])
    assert lock is not None and lock.n_sigs == 2
    sigs = json.loads(swap["inputs"][0]["witness"])["signatures"]
    signers = {k for k in (lock.data, *lock.pubkeys) for sig in sigs
               if schnorr_verify(bytes.fromhex(k[2:]), digest, bytes.fromhex(sig))}
    assert len(signers) == 2


def test_sig_all_inputs_with_different_locks_are_refused() -> None:
    secrets = [p["secret"] for p in VECTORS["sig_all_mixed_tags_invalid"]["inputs"]]
    with pytest.raises(nut11.LockError, match="same lock"):
        nut11.check_redeemable(secrets, NODE)
    mine = secret(NODE, [["sigflag", "SIG_ALL"]])
    with pytest.raises(nut11.LockError, match="same lock"):
        nut11.check_redeemable([mine, "a" * 64], NODE)  # with an unlocked proof
    with pytest.raises(nut11.LockError, match="same lock"):
        nut11.check_redeemable([mine, secret(NODE)], NODE)  # with a SIG_INPUTS one
    other_nonce = mine.replace("ab" * 16, "cd" * 16)
    assert nut11.check_redeemable([mine, other_nonce], NODE) is True  # nonces differ: fine
    assert nut11.is_sig_all([mine, other_nonce])
    assert not nut11.is_sig_all([secret(NODE)])
    with pytest.raises(nut11.LockError, match="another key"):
        nut11.check_redeemable([secret(OTHER, [["sigflag", "SIG_ALL"]])], NODE)
