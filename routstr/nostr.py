"""Nostr for a Routstr node, without I/O: keys, events, signatures, the node announcement.

* NIP-19: bech32 (BIP-173, not bech32m) `npub1…` / `nsec1…` for 32-byte keys.
* BIP-340: Schnorr signatures over secp256k1 with x-only public keys, on the pure-Python
  group arithmetic of `routstr.cashu.secp256k1`. Pinned by the BIP's own test vectors
  (`tests/bip340-test-vectors.csv`).
* NIP-01: the event id is the SHA-256 of the compact JSON array
  ``[0, pubkey, created_at, kind, tags, content]`` (UTF-8, no whitespace, only the JSON escapes
  a JavaScript ``JSON.stringify`` makes — which is what Python's ``json.dumps`` with
  ``ensure_ascii=False`` produces); ``sig`` is the BIP-340 signature of the id.
  Other control characters come out as ``\\u00XX`` in lower-case hex, as ``JSON.stringify``
  writes them (nostr-relay 1.14 writes upper-case hex and so disagrees on such ids; the
  announcement never contains raw control characters: its content is ASCII-escaped JSON).
  Relay messages: client ``EVENT``/``REQ``/``CLOSE``; relay ``EVENT``/``OK``/``EOSE``/
  ``CLOSED``/``NOTICE``/``AUTH`` — parsed strictly, anything else is a `RelayProtocolError`.
* NIP-91 / RIP-02: the provider announcement, kind 38421, exactly as routstr-core publishes it:
  tags ``["d", id]``, one ``["u", url]`` per endpoint, one ``["mint", url]`` per accepted mint,
  ``["version", v]``, in that order; content the compact JSON ``{"name": …, "about": …}``.
  `parse_announcement` turns one into the `/v1/providers/` entry routstr-core serves.

Threat model of the signing key
-------------------------------
`routstr.cashu.secp256k1` is not constant-time and says it must not hold a long-lived key that
signs attacker-chosen input at attacker-measurable times. The node's Nostr key is long-lived, so
here is why signing with it is acceptable:

- The secret scalar ``d`` goes through a point multiplication exactly once, at start, to derive
  the public key (``d*G``) — no attacker chooses anything then and it is not repeated.
- Each signature multiplies only the *nonce* ``k`` by ``G``; ``k`` is fresh per signature (BIP-340
  nonce from the key, the message and 32 bytes of `os.urandom` aux data), so no series of
  observations of one ``k`` exists. ``d`` enters a signature only through ``s = k + e*d mod n``:
  one big-integer multiply and reduction whose timing depends on operand length, not bit pattern.
- What the node signs is its own announcement (its URLs, mints, name), at times it chooses
  (start, a change, a period) — nobody outside chooses the message or triggers a signature.

A local attacker who can read process memory or the database holds the key anyway; secrets are
not wiped from memory (CPython cannot). Verification handles public data only.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .cashu.bech32 import Bech32Error, bech32_decode, bech32_encode
from .cashu.bip340 import schnorr_sign, schnorr_verify, xonly_pubkey
from .cashu.secp256k1 import N
from .wire import loads

__all__ = [
    "KIND_ANNOUNCEMENT",
    "AnnouncementFacts",
    "Bech32Error",
    "Event",
    "InvalidEvent",
    "RelayAuth",
    "RelayClosed",
    "RelayEose",
    "RelayEvent",
    "RelayMessage",
    "RelayNotice",
    "RelayOk",
    "RelayProtocolError",
    "SecretKey",
    "announced_endpoints",
    "bech32_decode",
    "bech32_encode",
    "build_announcement",
    "client_close",
    "client_event",
    "client_req",
    "decode_npub",
    "decode_nsec",
    "encode_npub",
    "encode_nsec",
    "event_id",
    "parse_announcement",
    "parse_event",
    "parse_relay_message",
    "random_secret",
    "schnorr_sign",
    "schnorr_verify",
    "secret_from_text",
    "serialize_event",
    "sign_event",
    "new_subscription_id",
    "verify_event",
    "xonly_pubkey",
]

KIND_ANNOUNCEMENT = 38421
#: Bounds on what we accept from a relay in one event (a relay message is bounded by the
#: WebSocket message limit too).
MAX_TAGS = 2000
MAX_TAG_ITEMS = 64
MAX_SUBSCRIPTION_ID_CHARS = 64
#: routstr-core never announces this default development URL, and discovery skips it.
UNANNOUNCED_URL = "http://localhost:8000"

_HEX = frozenset("0123456789abcdef")


# --------------------------------------------------------------------------------------------
# bech32 (BIP-173) and NIP-19


def _decode_key(text: str, hrp: str) -> bytes:
    got, data = bech32_decode(text.strip())
    if got != hrp:
        raise Bech32Error(f"expected an {hrp}, got {got!r}")
    if len(data) != 32:
        raise Bech32Error(f"an {hrp} holds 32 bytes, not {len(data)}")
    return data


def encode_npub(pubkey: bytes) -> str:
    if len(pubkey) != 32:
        raise Bech32Error("a public key is 32 bytes")
    return bech32_encode("npub", pubkey)


def decode_npub(text: str) -> bytes:
    return _decode_key(text, "npub")


def encode_nsec(seckey: bytes) -> str:
    if len(seckey) != 32:
        raise Bech32Error("a secret key is 32 bytes")
    return bech32_encode("nsec", seckey)


def decode_nsec(text: str) -> bytes:
    return _decode_key(text, "nsec")


# --------------------------------------------------------------------------------------------
# BIP-340 Schnorr signatures


def random_secret() -> bytes:
    """32 random bytes in [1, n-1] (a secret key; no curve math)."""
    while True:
        candidate = secrets.token_bytes(32)
        if 0 < int.from_bytes(candidate, "big") < N:
            return candidate


def secret_from_text(text: str) -> bytes:
    """The 32 secret bytes of an `nsec1…` or 64 hex digits, range-checked (no curve math);
    raises ValueError without echoing the input."""
    text = text.strip()
    if text.lower().startswith("nsec1"):
        secret = decode_nsec(text)
    elif len(text) == 64 and _HEX.issuperset(text.lower()):
        secret = bytes.fromhex(text)
    else:
        raise ValueError("expected an nsec1… bech32 key or 64 hex digits")
    if not 0 < int.from_bytes(secret, "big") < N:
        raise ValueError("secret key out of range")
    return secret


class SecretKey:
    """The node's Nostr identity. Its repr and str show the npub only, never the secret."""

    __slots__ = ("_secret", "public_key")

    def __init__(self, secret: bytes) -> None:
        self.public_key = xonly_pubkey(secret)  # validates the range
        self._secret = bytes(secret)

    @classmethod
    def generate(cls) -> SecretKey:
        return cls(random_secret())

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        """An `nsec1…` (NIP-19) or 64 hex digits; raises ValueError (never echoing the input)."""
        return cls(secret_from_text(text))

    @property
    def pubkey_hex(self) -> str:
        return self.public_key.hex()

    @property
    def npub(self) -> str:
        return encode_npub(self.public_key)

    def nsec(self) -> str:
        """The secret, bech32-encoded: for storage only; never log it."""
        return encode_nsec(self._secret)

    def sign(self, msg: bytes) -> bytes:
        return schnorr_sign(self._secret, msg, os.urandom(32))

    def __repr__(self) -> str:
        return f"SecretKey({self.npub})"

    __str__ = __repr__


# --------------------------------------------------------------------------------------------
# NIP-01 events


class InvalidEvent(ValueError):
    """A relay handed us something that is not a well-formed NIP-01 event."""


Tags = tuple[tuple[str, ...], ...]


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    pubkey: str
    created_at: int
    kind: int
    tags: Tags
    content: str
    sig: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pubkey": self.pubkey,
            "created_at": self.created_at,
            "kind": self.kind,
            "tags": [list(t) for t in self.tags],
            "content": self.content,
            "sig": self.sig,
        }

    def tag_values(self, name: str) -> list[str]:
        return [t[1] for t in self.tags if len(t) >= 2 and t[0] == name]

    def first_tag(self, name: str) -> str | None:
        for t in self.tags:
            if len(t) >= 2 and t[0] == name:
                return t[1]
        return None


def serialize_event(
    pubkey: str, created_at: int, kind: int, tags: Sequence[Sequence[str]], content: str
) -> bytes:
    """The NIP-01 id preimage; raises UnicodeEncodeError for strings with lone surrogates."""
    doc = [0, pubkey, created_at, kind, [list(t) for t in tags], content]
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def event_id(
    pubkey: str, created_at: int, kind: int, tags: Sequence[Sequence[str]], content: str
) -> str:
    return hashlib.sha256(serialize_event(pubkey, created_at, kind, tags, content)).hexdigest()


def sign_event(
    key: SecretKey,
    kind: int,
    tags: Sequence[Sequence[str]],
    content: str,
    created_at: int,
) -> Event:
    frozen_tags: Tags = tuple(tuple(t) for t in tags)
    eid = event_id(key.pubkey_hex, created_at, kind, frozen_tags, content)
    sig = key.sign(bytes.fromhex(eid))
    return Event(eid, key.pubkey_hex, created_at, kind, frozen_tags, content, sig.hex())


def _is_hex(value: object, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and _HEX.issuperset(value)


def _is_int(value: object) -> bool:
    return type(value) is int


def parse_event(obj: object) -> Event:
    """A NIP-01 event from decoded JSON, shape-checked (not yet verified: see `verify_event`)."""
    if not isinstance(obj, Mapping):
        raise InvalidEvent("event is not an object")
    eid, pubkey, sig = obj.get("id"), obj.get("pubkey"), obj.get("sig")
    created_at, kind = obj.get("created_at"), obj.get("kind")
    tags, content = obj.get("tags"), obj.get("content")
    if not _is_hex(eid, 64) or not _is_hex(pubkey, 64) or not _is_hex(sig, 128):
        raise InvalidEvent("id, pubkey or sig is not lowercase hex of the right length")
    if not _is_int(created_at) or not 0 <= created_at < 1 << 53:  # type: ignore[operator]
        raise InvalidEvent("created_at is not a timestamp")
    if not _is_int(kind) or not 0 <= kind <= 65535:  # type: ignore[operator]
        raise InvalidEvent("kind is not an integer in 0..65535")
    if not isinstance(content, str):
        raise InvalidEvent("content is not a string")
    if not isinstance(tags, list) or len(tags) > MAX_TAGS:
        raise InvalidEvent("tags is not a list (or too long)")
    frozen: list[tuple[str, ...]] = []
    for tag in tags:
        if (
            not isinstance(tag, list)
            or len(tag) > MAX_TAG_ITEMS
            or not all(isinstance(item, str) for item in tag)
        ):
            raise InvalidEvent("a tag is not a list of strings")
        frozen.append(tuple(tag))
    return Event(eid, pubkey, created_at, kind, tuple(frozen), content, sig)  # type: ignore[arg-type]


def verify_event(event: Event) -> bool:
    """The id is the hash of the content and the signature is the author's (BIP-340)."""
    try:
        expected = event_id(event.pubkey, event.created_at, event.kind, event.tags, event.content)
    except UnicodeEncodeError:
        return False
    if expected != event.id:
        return False
    return schnorr_verify(bytes.fromhex(event.pubkey), bytes.fromhex(event.id),
                          bytes.fromhex(event.sig))


# --------------------------------------------------------------------------------------------
# The node announcement (kind 38421)


def announced_endpoints(http_url: str, onion_url: str) -> tuple[str, ...]:
    """The `u` tags, as routstr-core derives them: the public HTTP URL (never the default
    ``http://localhost:8000``), then the onion URL (``http://`` added to a bare host)."""
    out: list[str] = []
    http_url = http_url.strip()
    if http_url and http_url != UNANNOUNCED_URL:
        out.append(http_url)
    onion_url = onion_url.strip()
    if onion_url:
        if onion_url.endswith(".onion") and not onion_url.startswith(("http://", "https://")):
            onion_url = "http://" + onion_url
        out.append(onion_url)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class AnnouncementFacts:
    """What the announcement says. Equal facts need no new event."""

    d: str
    endpoint_urls: tuple[str, ...]
    mints: tuple[str, ...]
    version: str
    name: str
    about: str
    p2pk_pubkey: str = ""  # NUT-11: tokens locked to it are redeemed by this node

    def tags(self) -> list[list[str]]:
        tags = [["d", self.d]]
        tags += [["u", url] for url in self.endpoint_urls]
        tags += [["mint", m] for m in self.mints if m]
        if self.version:
            tags.append(["version", self.version])
        return tags

    def content(self) -> str:
        # routstr-core: json.dumps({"name", "about"}, separators=(",", ":")), ASCII-escaped;
        # plus the key to lock payments to, when the node takes Cashu
        doc = {"name": self.name, "about": self.about}
        if self.p2pk_pubkey:
            doc["cashu_p2pk_pubkey"] = self.p2pk_pubkey
        return json.dumps(doc, separators=(",", ":"))


def build_announcement(key: SecretKey, facts: AnnouncementFacts, created_at: int) -> Event:
    return sign_event(key, KIND_ANNOUNCEMENT, facts.tags(), facts.content(), created_at)


def parse_announcement(event: Event) -> dict[str, Any] | None:
    """The `/v1/providers/` entry for a kind-38421 event (routstr-core's shape), or None if
    the event lacks a `d` tag or an endpoint URL."""
    if event.kind != KIND_ANNOUNCEMENT:
        return None
    d = event.first_tag("d")
    urls = [u for u in event.tag_values("u") if _plausible_url(u)]
    if not d or not urls:
        return None
    name: object = "Unknown Provider"
    about: object = None
    if event.content:
        try:
            meta = loads(event.content)
        except ValueError:  # wire.JsonError
            meta = None
        if isinstance(meta, dict):
            name = meta.get("name", "Unknown Provider")
            about = meta.get("about")
    return {
        "id": d,
        "pubkey": event.pubkey,
        "created_at": event.created_at,
        "kind": event.kind,
        "endpoint_url": urls[0],
        "endpoint_urls": urls,
        "name": name if isinstance(name, str) else "Unknown Provider",
        "description": about if isinstance(about, str) else None,
        "mint_urls": event.tag_values("mint"),
        "version": event.first_tag("version"),
        "content": event.content,
    }


def _plausible_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and len(url) <= 2048


# --------------------------------------------------------------------------------------------
# Relay protocol (NIP-01 messages)


class RelayProtocolError(ValueError):
    """A relay message that is not JSON, or not one of the NIP-01 relay-to-client messages."""


@dataclass(frozen=True, slots=True)
class RelayEvent:
    subscription: str
    event: object  # decoded JSON; `parse_event` and `verify_event` decide what it is


@dataclass(frozen=True, slots=True)
class RelayOk:
    event_id: str
    accepted: bool
    message: str


@dataclass(frozen=True, slots=True)
class RelayEose:
    subscription: str


@dataclass(frozen=True, slots=True)
class RelayClosed:
    subscription: str
    message: str


@dataclass(frozen=True, slots=True)
class RelayNotice:
    message: str


@dataclass(frozen=True, slots=True)
class RelayAuth:
    challenge: str


RelayMessage = RelayEvent | RelayOk | RelayEose | RelayClosed | RelayNotice | RelayAuth


def _dumps(doc: object) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def client_event(event: Event) -> str:
    return _dumps(["EVENT", event.to_dict()])


def client_req(subscription: str, *filters: Mapping[str, Any]) -> str:
    return _dumps(["REQ", subscription, *filters])


def client_close(subscription: str) -> str:
    return _dumps(["CLOSE", subscription])


def parse_relay_message(text: str) -> RelayMessage:
    try:
        msg = loads(text)
    except ValueError:  # wire.JsonError
        raise RelayProtocolError("relay message is not JSON") from None
    if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
        raise RelayProtocolError("relay message is not a JSON array led by a string")
    verb, args = msg[0], msg[1:]
    if verb == "EVENT" and len(args) == 2 and _is_sub(args[0]):
        return RelayEvent(args[0], args[1])
    if (
        verb == "OK"
        and len(args) in (2, 3)
        and isinstance(args[0], str)
        and len(args[0]) <= 64  # some relays answer a refused event with an empty id
        and isinstance(args[1], bool)
        and (len(args) == 2 or isinstance(args[2], str))
    ):
        return RelayOk(args[0], args[1], args[2] if len(args) == 3 else "")
    if verb == "EOSE" and len(args) == 1 and _is_sub(args[0]):
        return RelayEose(args[0])
    if verb == "CLOSED" and len(args) in (1, 2) and _is_sub(args[0]):
        message = args[1] if len(args) == 2 and isinstance(args[1], str) else ""
        return RelayClosed(args[0], message)
    if verb == "NOTICE" and len(args) == 1 and isinstance(args[0], str):
        return RelayNotice(args[0])
    if verb == "AUTH" and len(args) == 1 and isinstance(args[0], str):
        return RelayAuth(args[0])
    raise RelayProtocolError(f"unexpected relay message {verb[:16]!r} with {len(args)} arguments")


def _is_sub(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_SUBSCRIPTION_ID_CHARS


def new_subscription_id() -> str:
    return secrets.token_hex(8)
