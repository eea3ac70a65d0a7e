"""API keys and credentials: ``sk-`` keys, their hashes, ``Authorization`` / ``X-Cashu`` parsing.

A key is shown once, in the response that creates it. The database stores only
``hash_key(key)`` (SHA-256 hex of the full key string) and a 4-character hint (its last four
characters, for the admin search); logs get `short_hash(key)` — never the key or a token.

Key forms
    ``sk-`` + 32 characters of ``[0-9a-z]`` (the spec's form; ~165 bits from `secrets`), and
    ``sk-`` + 64 hex for a Cashu token used as a Bearer credential: routstr-core's canonical key
    for a token is ``"sk-" + sha256hex(token)`` (`token_api_key`), which clients learn from
    ``/v1/wallet/info`` and may use afterwards instead of the token. Both resolve through the
    same `hash_key`, so a token account is found whichever form the client sends.

Lookups are by hash through a unique index: the time a lookup takes depends on the hash, which
an attacker cannot steer towards a valid key without knowing it; no comparison of secret
strings happens in Python (`secrets_equal` is there for the few that must, e.g. admin tokens).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Final

from . import errors

API_KEY_PREFIX: Final = "sk-"
API_KEY_ALPHABET: Final = "0123456789abcdefghijklmnopqrstuvwxyz"
API_KEY_RANDOM_CHARS: Final = 32
CASHU_PREFIX: Final = "cashu"
MAX_API_KEY_CHARS: Final = 200

_API_KEY_RE: Final = re.compile(rf"sk-[A-Za-z0-9_-]{{1,{MAX_API_KEY_CHARS - 3}}}")
_WHITESPACE_RE: Final = re.compile(r"\s+")


def generate_api_key() -> str:
    return API_KEY_PREFIX + "".join(
        secrets.choice(API_KEY_ALPHABET) for _ in range(API_KEY_RANDOM_CHARS)
    )


def hash_key(api_key: str) -> str:
    """SHA-256 hex of the full key string: the only form a key is stored in."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def token_api_key(token: str) -> str:
    """routstr-core's canonical ``sk-`` key for a Cashu token used as a Bearer credential."""
    return API_KEY_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def token_deposit_ref(token: str) -> str:
    """A deposit reference for a Cashu token (the ledger credits each reference once).

    Domain-separated on purpose: ``sha256(token)`` itself is the token's API key (after
    ``sk-``), so it must never be stored in clear — not as a reference either.
    """
    return hashlib.sha256(b"routstr deposit ref\x00" + token.encode()).hexdigest()


def short_hash(api_key: str) -> str:
    """What logs may carry instead of a key or token: the first 8 hex of its hash."""
    return hash_key(api_key)[:8]


def key_hint(api_key: str) -> str:
    """The last four characters of a key, stored for the admin search."""
    return api_key[-4:]


def masked(api_key: str) -> str:
    """``sk-…abcd``: how a key is shown when it is not the response that created it."""
    return f"{API_KEY_PREFIX}…{key_hint(api_key)}"


def secrets_equal(a: str, b: str) -> bool:
    """Constant-time comparison of two secret strings."""
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True, slots=True)
class ApiKeyCredential:
    api_key: str

    @property
    def key_hash(self) -> str:
        return hash_key(self.api_key)

    def __repr__(self) -> str:
        return f"ApiKeyCredential(#{short_hash(self.api_key)})"


@dataclass(frozen=True, slots=True)
class CashuCredential:
    """A Cashu token presented as a credential; its account is that of `api_key`."""

    token: str

    @property
    def api_key(self) -> str:
        return token_api_key(self.token)

    @property
    def key_hash(self) -> str:
        return hash_key(self.api_key)

    def __repr__(self) -> str:
        return f"CashuCredential(#{short_hash(self.token)})"


Credential = ApiKeyCredential | CashuCredential


def _credential(value: str, *, code_if_invalid: str) -> Credential:
    if value.startswith(CASHU_PREFIX):
        return CashuCredential(_WHITESPACE_RE.sub("", value))
    if _API_KEY_RE.fullmatch(value):
        return ApiKeyCredential(value)
    raise errors.AuthenticationFailed(
        "Invalid API key format. Expected an 'sk-...' API key or a 'cashu...' token.",
        code=code_if_invalid,
    )


def parse_bearer(authorization: str | None) -> Credential | None:
    """``Authorization`` header → credential. None when the header is absent.

    The scheme word is case-insensitive; surrounding whitespace is ignored, and whitespace inside
    a Cashu token (a wrapped paste) is removed. Empty → 401 ``missing_api_key``; another scheme
    or a value that is neither ``sk-…`` nor ``cashu…`` → 401 ``invalid_api_key``.
    """
    if authorization is None:
        return None
    value = authorization.strip()
    if not value:
        raise errors.AuthenticationFailed("Missing API key.", code="missing_api_key")
    scheme, *tail = value.split(None, 1)
    rest = tail[0] if tail else ""
    if scheme.lower() != "bearer":
        raise errors.AuthenticationFailed(
            "Invalid authorization. Use 'Bearer <api-key>' or 'Bearer <cashu-token>'.",
            code="invalid_api_key",
        )
    if not rest:
        raise errors.AuthenticationFailed("Missing API key.", code="missing_api_key")
    return _credential(rest, code_if_invalid="invalid_api_key")


def parse_x_cashu(header: str | None) -> Credential | None:
    """``X-Cashu`` request header → credential. None when absent or blank.

    Normally a Cashu token (one payment); like routstr-core, an ``sk-`` key there is accepted
    as an API key. Anything else → 401 ``invalid_cashu_token``.
    """
    if header is None or not header.strip():
        return None
    return _credential(header.strip(), code_if_invalid="invalid_cashu_token")
