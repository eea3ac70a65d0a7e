"""NUT-10 well-known secrets and NUT-11 P2PK locks, from the receiving side.

A proof whose secret is a NUT-10 secret ``["P2PK", {"nonce", "data", "tags"}]`` can only be
swapped with Schnorr signatures (BIP-340 on sha256 of the secret string) by the keys it names.
This module decides, before any mint call, whether this node can redeem a token's proofs with
its one key (`check_redeemable`), and makes the witnesses (`witness`).

Refused (`LockError`, a clear 400; the token stays its owner's):
- a NUT-10 secret that is malformed (not a JSON array of a kind and an object with string
  `nonce` and `data` and a list of string tags), of a kind other than P2PK (HTLC…);
- a P2PK secret the spec calls malformed: a known tag twice, `n_sigs` / `n_sigs_refund` not
  a positive integer or above the keys of its pathway, an unknown `sigflag`, a key that is not a
  compressed secp256k1 point, a key twice in one pathway (compared by x-coordinate);
- locked to keys without this node's, or needing more signatures than this node's one;
- a lock whose `locktime` has passed and that names refund keys (its sender can take it back
  while we redeem it);
- `SIG_ALL` proofs mixed with proofs of other locks (NUT-11: every input of a `SIG_ALL` swap
  has the same kind, `data` and tags).

`SIG_ALL` (the signature covers the whole swap): one signature, in the first input's witness, on
sha256 of every input's `secret` and `C` and every output's `amount` and `B_`
(`sig_all_message`); mints before NUT-11's current text (Nutshell up to 0.20.2) signed only the
secrets and the `B_` (`legacy_sig_all_message`), which the wallet tries once when a mint refuses
the current form.

A lock whose `locktime` has passed without refund keys is spendable by anyone (NUT-11): it is
taken as an unlocked proof.
"""

from __future__ import annotations

import hashlib
import json
import secrets as _secrets
import time
from dataclasses import dataclass
from typing import Any, Final

from .bip340 import schnorr_sign
from .secp256k1 import InvalidPoint, N, mul_g, point_from_hex

SIG_INPUTS: Final = "SIG_INPUTS"
SIG_ALL: Final = "SIG_ALL"
_ONCE: Final = ("sigflag", "n_sigs", "locktime", "refund", "n_sigs_refund", "pubkeys")
MAX_KEYS: Final = 16  # keys per pathway this node reads (a lock naming more is refused)


class LockError(ValueError):
    """A locked proof this node cannot (or must not) redeem; the message says why."""


@dataclass(frozen=True)
class P2PKLock:
    data: str  # the main key (compressed hex, lower case)
    sigflag: str
    pubkeys: tuple[str, ...]
    n_sigs: int
    locktime: int | None
    refund: tuple[str, ...]
    n_sigs_refund: int


def _key(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) != 66 or value[:2] not in ("02", "03"):
        raise LockError(f"P2PK {what} is not a compressed public key")
    try:
        point_from_hex(value.lower())
    except (InvalidPoint, ValueError):
        raise LockError(f"P2PK {what} is not a point on secp256k1") from None
    return value.lower()


def _count(raw: str, name: str, keys: int) -> int:
    if not raw.isascii() or not raw.isdigit() or len(raw) > 3 or int(raw) < 1 or int(raw) > keys:
        raise LockError(f"P2PK secret is malformed: {name} {raw[:20]!r} is not a positive"
                        f" integer up to its {keys} key(s)")
    return int(raw)


def _unique(keys: tuple[str, ...], pathway: str) -> None:
    if len({k[2:] for k in keys}) != len(keys):
        raise LockError(f"P2PK secret is malformed: a key appears twice in its {pathway} keys")


def well_known(secret: str) -> tuple[str, dict[str, Any]] | None:
    """(kind, object) of a NUT-10 secret; None for a plain secret (not a JSON array)."""
    if not secret.startswith("["):
        return None
    try:
        doc = json.loads(secret)
    except (ValueError, RecursionError):
        raise LockError("NUT-10 secret is not valid JSON") from None
    if not (isinstance(doc, list) and len(doc) == 2 and isinstance(doc[0], str)
            and isinstance(doc[1], dict)):
        raise LockError("NUT-10 secret must be [kind, {nonce, data, tags}]")
    body = doc[1]
    if not isinstance(body.get("nonce"), str) or not isinstance(body.get("data"), str):
        raise LockError("NUT-10 secret needs a string nonce and data")
    tags = body.get("tags", [])
    if not isinstance(tags, list) or not all(
            isinstance(t, list) and t and all(isinstance(v, str) for v in t) for t in tags):
        raise LockError("NUT-10 secret tags must be lists of strings")
    return doc[0], body


def parse_p2pk(secret: str) -> P2PKLock | None:
    """The P2PK lock of a proof's secret; None for a plain secret. LockError: malformed, or a
    NUT-10 kind this node does not redeem."""
    known = well_known(secret)
    if known is None:
        return None
    kind, body = known
    if kind != "P2PK":
        raise LockError(f"tokens locked with {kind[:20]!r} conditions are not accepted")
    tags: dict[str, list[str]] = {}
    for tag in body.get("tags", []):
        if tag[0] in tags and tag[0] in _ONCE:
            raise LockError(f"P2PK secret is malformed: tag {tag[0]!r} appears twice")
        tags[tag[0]] = tag[1:]
    sigflag = (tags.get("sigflag") or [SIG_INPUTS])[0]
    if sigflag not in (SIG_INPUTS, SIG_ALL):
        raise LockError(f"P2PK secret is malformed: unknown sigflag {sigflag[:20]!r}")
    pubkeys = tuple(_key(k, "pubkeys key") for k in tags.get("pubkeys", [])[:MAX_KEYS + 1])
    refund = tuple(_key(k, "refund key") for k in tags.get("refund", [])[:MAX_KEYS + 1])
    if len(pubkeys) > MAX_KEYS or len(refund) > MAX_KEYS:
        raise LockError(f"P2PK locks with more than {MAX_KEYS} keys are not accepted")
    data = _key(body["data"], "data")
    _unique((data, *pubkeys), "locking")
    _unique(refund, "refund")
    n_sigs = _count(tags["n_sigs"][0], "n_sigs", 1 + len(pubkeys)) \
        if tags.get("n_sigs") else 1
    n_refund = _count(tags["n_sigs_refund"][0], "n_sigs_refund", max(len(refund), 1)) \
        if tags.get("n_sigs_refund") else 1
    raw_time = (tags.get("locktime") or [""])[0]
    locktime = int(raw_time) if raw_time.isascii() and raw_time.isdigit() \
        and len(raw_time) <= 12 else None  # not a valid unix time: a permanent lock
    return P2PKLock(data, sigflag, pubkeys, n_sigs, locktime, refund, n_refund)


def check_redeemable(secrets: list[str], node_pubkey: str, now: float | None = None) -> bool:
    """Can this node redeem proofs with these secrets by signing with its one key? True when
    any of them needs the node's signature, False when none is locked; LockError otherwise."""
    now = time.time() if now is None else now
    x = node_pubkey[2:]
    signed = False
    _check_sig_all_group(secrets)
    for secret in secrets:
        lock = parse_p2pk(secret)
        if lock is None:
            continue
        expired = lock.locktime is not None and now >= lock.locktime
        if expired and lock.refund:
            raise LockError("the token's lock has expired and names refund keys: its sender"
                            " can take it back; send a token with a live lock")
        if expired:
            continue  # spendable by anyone: no signature needed
        if x not in {k[2:] for k in (lock.data, *lock.pubkeys)}:
            raise LockError("the token is locked to another key than this node's"
                            f" (cashu_p2pk_pubkey {node_pubkey})")
        if lock.n_sigs > 1:
            raise LockError(f"the token needs {lock.n_sigs} signatures; this node gives one")
        signed = True
    return signed


def _condition(secret: str) -> tuple[str, str, str] | None:
    """(kind, data, tags as JSON) of a NUT-10 secret: what SIG_ALL inputs must share."""
    known = well_known(secret)
    if known is None:
        return None
    kind, body = known
    return kind, body["data"], json.dumps(body.get("tags", []))


def _check_sig_all_group(secrets: list[str]) -> None:
    """LockError unless, when any input is SIG_ALL, all have the same kind, data and tags."""
    locks = [parse_p2pk(s) for s in secrets]
    if not any(lock is not None and lock.sigflag == SIG_ALL for lock in locks):
        return
    if len({_condition(s) for s in secrets}) != 1:
        raise LockError("a SIG_ALL token's proofs must all carry the same lock (kind, data and"
                        " tags); send them as separate tokens")


def is_sig_all(secrets: list[str]) -> bool:
    """Do these (checked) inputs form a SIG_ALL swap?"""
    lock = parse_p2pk(secrets[0]) if secrets else None
    return lock is not None and lock.sigflag == SIG_ALL


def sig_all_message(inputs: list[tuple[str, str]], outputs: list[tuple[int, str]]) -> str:
    """NUT-11's SIG_ALL message of a swap: secret‖C of each input, then amount‖B_ of each
    output, in the order they are sent. `inputs`: (secret, C hex); `outputs`: (amount, B_)."""
    return "".join(s + c for s, c in inputs) + "".join(str(a) + b for a, b in outputs)


def legacy_sig_all_message(inputs: list[tuple[str, str]], outputs: list[tuple[int, str]]) -> str:
    """The SIG_ALL message of mints before NUT-11's current text: the secrets, then the B_."""
    return "".join(s for s, _ in inputs) + "".join(b for _, b in outputs)


def seckey_from_seed(seed: bytes) -> bytes:
    """The node's P2PK key, derived from the wallet seed (so a restore keeps it)."""
    digest = hashlib.sha256(b"routstr/nut11/p2pk\x00" + seed).digest()
    d = int.from_bytes(digest, "big") % (N - 1) + 1  # in [1, n-1]
    return d.to_bytes(32, "big")


def pubkey_hex(seckey: bytes) -> str:
    """The compressed public key (NUT-11 `data`) of `seckey`."""
    pt = mul_g(int.from_bytes(seckey, "big"))
    assert pt.x is not None and pt.y is not None
    return ("02" if pt.y % 2 == 0 else "03") + pt.x.to_bytes(32, "big").hex()


def witness(seckey: bytes, message: str) -> str:
    """A NUT-11 P2PKWitness: one BIP-340 signature on sha256(message) (the proof's secret for
    SIG_INPUTS, the swap's `sig_all_message` for SIG_ALL)."""
    sig = schnorr_sign(seckey, hashlib.sha256(message.encode()).digest(),
                       _secrets.token_bytes(32))
    return json.dumps({"signatures": [sig.hex()]}, separators=(",", ":"))




def locked_secret(nonce: str, pubkey: str) -> str:
    """A NUT-10 P2PK secret locking a proof to `pubkey` (SIG_INPUTS), serialized the way
    wallets do (compact JSON). `nonce`: unique per output (the NUT-13 secret, so the output can
    be derived again)."""
    return json.dumps(["P2PK", {"nonce": nonce, "data": pubkey,
                                "tags": [["sigflag", SIG_INPUTS]]}], separators=(",", ":"))


def client_key(value: str) -> str:
    """A client's `X-Cashu-Lock`: a compressed secp256k1 public key (LockError otherwise)."""
    return _key(value.strip(), "X-Cashu-Lock")
