"""The dashboard's forms: post → redirect → get, a one-use nonce per page, one-time messages.

Post → redirect → get
    Every dashboard form that changes something answers ``303 See Other`` with a GET of the
    dashboard (`admin.AdminHandlers.page_action`), whether it succeeded or was refused, so
    reloading the page that follows never posts again.

The form nonce (double submission)
    Each rendered page carries one nonce in every form that changes something (field
    ``nonce``): ``<issued>.<random>.<mac>``, the MAC an HMAC keyed by the admin's credential
    (the session token; the admin token of a Bearer request). Any worker process can check it,
    no other session can forge or use it, and rendering a page writes nothing. The first POST
    with it marks it used (its hash in ``admin_used_nonces``: one insert, atomic across
    ``--workers``); a second POST with it does nothing and is redirected to where the first
    one went, with a notice — a double click, back and resubmit, a stale tab. While the first
    is still running the second waits for it (up to `REPLAY_WAIT_S`), so a double-clicked
    "Create key" still shows the new key once. A cookie session's POST without a valid nonce
    (or one older than `NONCE_TTL_S`) does nothing either; Bearer requests may omit it (they
    need no CSRF token either: no browser sends that header by itself). The CSRF check runs
    first, unchanged.

The one-time message (flash)
    What a form's answer must show once — a new key's ``sk-`` value, a withdrawn Cashu token,
    the error of a refused form — is never put in the redirect's URL. It is sealed (an
    HMAC-SHA256 keystream and tag, keys derived from the admin's credential, which the
    database never holds: the ``sk-`` value is not readable from the database even for those
    minutes) and stored for `FLASH_TTL_S` under the hash of a random id; the URL carries only
    the id (``flash=``). The GET it redirects to reads and deletes it; a reload says it was
    shown once. At most `admin_store.MAX_FLASHES` wait at a time (the oldest go first).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlencode

import anyio

from . import admin_page, admin_store
from .db import Database

NONCE_FIELD: Final = "nonce"
NONCE_TTL_S: Final = 12 * 3600  # as long as a session lives
NONCE_SKEW_S: Final = 300  # a nonce "issued" this far in the future (clock step) still counts
FLASH_TTL_S: Final = 300
MAX_FLASH_BYTES: Final = 64 * 1024
MAX_FLASH_ID_CHARS: Final = 64
REPLAY_WAIT_S: Final = 10.0
REPLAY_POLL_S: Final = 0.05

_LABEL: Final = b"routstr admin form "
_NONCE_RE: Final = re.compile(r"(\d{1,12})\.([A-Za-z0-9_-]{16})\.([0-9a-f]{32})", re.ASCII)
_TAG_BYTES: Final = 32


# --------------------------------------------------------------------------------------------
# Nonces and sealing (pure)
# --------------------------------------------------------------------------------------------


def _subkey(credential: str, purpose: str) -> bytes:
    return hmac.new(credential.encode(), _LABEL + purpose.encode(), hashlib.sha256).digest()


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"\x00".join(parts), hashlib.sha256).digest()


def issue_nonce(credential: str, now: int) -> str:
    """A fresh form nonce of this credential's session."""
    body = f"{now}.{secrets.token_urlsafe(12)}"
    return f"{body}.{_mac(_subkey(credential, 'nonce'), body.encode()).hex()[:32]}"


def nonce_issued_at(credential: str, nonce: str) -> int | None:
    """When `nonce` was issued, if it is this credential's (None: forged, garbled, foreign)."""
    m = _NONCE_RE.fullmatch(nonce)
    if m is None:
        return None
    want = _mac(_subkey(credential, "nonce"), f"{m[1]}.{m[2]}".encode()).hex()[:32]
    return int(m[1]) if hmac.compare_digest(want, m[3]) else None


def flash_key(credential: str, flash_id: str) -> str:
    """The row a flash is stored under: another session's id lands on another row."""
    return _mac(_subkey(credential, "flash id"), flash_id.encode()).hex()


def _keystream_xor(credential: str, flash_id: str, data: bytes) -> bytes:
    key = _subkey(credential, "flash enc")
    blocks = b"".join(_mac(key, flash_id.encode(), i.to_bytes(8, "big"))
                      for i in range((len(data) + 31) // 32))
    n = len(data)
    return (int.from_bytes(data, "big") ^ int.from_bytes(blocks[:n], "big")).to_bytes(n, "big")


def seal(credential: str, flash_id: str, doc: Mapping[str, Any]) -> bytes:
    """`doc` as JSON, encrypted and authenticated under keys of `credential` and `flash_id`."""
    plain = json.dumps(doc, separators=(",", ":")).encode()
    if len(plain) > MAX_FLASH_BYTES:
        raise ValueError("flash message too large")
    body = _keystream_xor(credential, flash_id, plain)
    return _mac(_subkey(credential, "flash mac"), flash_id.encode(), body) + body


def unseal(credential: str, flash_id: str, sealed: bytes) -> dict[str, Any] | None:
    """The sealed document, or None when the tag does not match (another key, tampering)."""
    tag, body = sealed[:_TAG_BYTES], sealed[_TAG_BYTES:]
    want = _mac(_subkey(credential, "flash mac"), flash_id.encode(), body)
    if len(sealed) < _TAG_BYTES or not hmac.compare_digest(tag, want):
        return None
    try:
        doc = json.loads(_keystream_xor(credential, flash_id, body))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def page_location(back: Mapping[str, str], done: str = "", *, flash: str = "") -> str:
    """The dashboard's address after a form: its view (`back`), the notice, the flash id."""
    query = {k: v for k, v in back.items() if v and k in admin_page.QUERY_FIELDS
             and k != "done"}
    if done:
        query["done"] = done
    if flash:
        query["flash"] = flash
    return "/admin/?" + urlencode(query) + "#" + admin_page.ANCHORS.get(done, "top")


def again(location: str) -> str:
    """`location` (from `page_location`) marked as the answer to a repeated form."""
    base, _, anchor = location.partition("#")
    return base + ("" if base.endswith("?") else "&") + "again=1#" + (anchor or "top")


# --------------------------------------------------------------------------------------------
# Stored state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A form POST's nonce check: `redirect` set = do nothing, answer with it instead."""
    redirect: str = ""
    nonce_hash: str = ""


@dataclass(frozen=True)
class Flash:
    error: str = ""
    secret: dict[str, str] = field(default_factory=dict)
    gone: bool = False  # the page asked for a message that was already shown (or expired)


class Forms:
    """Form nonces and flash messages over the node's database (shared by all workers)."""

    def __init__(self, db: Database, clock: Callable[[], int]) -> None:
        self.db = db
        self.clock = clock

    def nonce(self, credential: str) -> str:
        return issue_nonce(credential, self.clock())

    async def claim(self, credential: str, nonce: str, back: Mapping[str, str], *,
                    required: bool) -> Claim:
        """Use up `nonce`; a missing (when `required`), foreign, expired or used one refuses."""
        if not nonce and not required:
            return Claim()
        now = self.clock()
        issued = nonce_issued_at(credential, nonce[:100])
        if issued is None or not now - NONCE_TTL_S < issued <= now + NONCE_SKEW_S:
            return Claim(redirect=page_location(back, "form_expired"))
        digest = hashlib.sha256(nonce.encode()).hexdigest()
        expires = issued + NONCE_TTL_S
        if self.db.transaction(lambda c: admin_store.use_nonce(c, digest, expires_at=expires,
                                                               now=now)):
            return Claim(nonce_hash=digest)
        deadline = time.monotonic() + REPLAY_WAIT_S
        while True:  # the first use may still be running: answer where it went
            first = self.db.read(lambda c: admin_store.nonce_location(c, digest))
            if first is not None:
                return Claim(redirect=again(first))
            if time.monotonic() >= deadline:
                return Claim(redirect=page_location(back, "already_submitted"))
            await anyio.sleep(REPLAY_POLL_S)

    def finish(self, credential: str, claim: Claim, back: Mapping[str, str], done: str, *,
               error: str = "", secret: Mapping[str, str] | None = None) -> str:
        """Where a form's answer redirects to; the one-time message stored under a new flash
        id; remembered for the nonce, so a repeat of the form lands on the same page."""
        now = self.clock()
        doc = {k: v for k, v in (("error", error), ("secret", dict(secret or {}))) if v}
        flash_id = secrets.token_urlsafe(16) if doc else ""
        location = page_location(back, done, flash=flash_id)
        sealed = seal(credential, flash_id, doc) if doc else b""

        def op(conn: Any) -> None:
            if doc:
                admin_store.put_flash(conn, flash_key(credential, flash_id), sealed, now=now,
                                      ttl_s=FLASH_TTL_S)
            if claim.nonce_hash:
                admin_store.set_nonce_location(conn, claim.nonce_hash, location)

        if doc or claim.nonce_hash:
            self.db.transaction(op)
        return location

    def take(self, credential: str, flash_id: str) -> Flash:
        """The flash message `flash_id` of this credential, once."""
        if not flash_id:
            return Flash()
        if len(flash_id) > MAX_FLASH_ID_CHARS:
            return Flash(gone=True)
        now = self.clock()
        sealed = self.db.transaction(
            lambda c: admin_store.take_flash(c, flash_key(credential, flash_id), now=now))
        doc = unseal(credential, flash_id, sealed) if sealed is not None else None
        if doc is None:
            return Flash(gone=True)
        raw = doc.get("secret")
        secret = ({str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {})
        return Flash(error=str(doc.get("error") or ""), secret=secret)
