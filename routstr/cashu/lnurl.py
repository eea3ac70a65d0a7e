"""Lightning-address and LNURL-pay resolution (LUD-16, LUD-06) for payouts.

LUD-16: ``name@host`` → ``GET https://host/.well-known/lnurlp/name`` (plain ``http`` only for
``.onion`` hosts and, for tests, loopback hosts). LUD-06: the answer is a *payRequest*
``{callback, minSendable, maxSendable (msat), metadata, tag: "payRequest"}``; then
``GET callback?amount=<msat>`` → ``{"pr": bolt11}`` (or ``{"status": "ERROR", "reason"}``).
A bech32 ``lnurl1…`` string or a plain URL is accepted in place of an address.

The invoice is checked before anyone pays it: its amount — read from the bolt11 human-readable
part (BOLT-11: ``ln`` + currency + amount + multiplier m/u/n/p) — must equal the amount asked
for. The invoice signature and the description hash are not checked: the mint that pays the
invoice decodes it fully, and the amount is what protects the payer.
"""

from __future__ import annotations

import ipaddress
import re
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from routstr.cashu import strictjson
from routstr.cashu.mint import Transport

MAX_RESPONSE_BYTES = 64 * 1024
MAX_MSAT = (1 << 63) - 1  # an amount field beyond sqlite's signed 64-bit INTEGER is malformed
_ADDRESS = re.compile(r"^([a-z0-9\-_.+]+)@([a-z0-9\-.]+(?::\d{1,5})?)$")
_HRP = re.compile(r"^ln([a-z]+?)(\d*)([munp]?)$")
_MSAT_PER_BTC = 100_000_000_000
_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


# True while a lookup's request is in the transport: every URL here (the address's endpoint,
# its callback) is the address owner's, not the operator's, so the transport's owner applies
# its policy for foreign URLs (the node: `routstr.netguard`, ``--lnurl-allow-private``).
_LOOKUP: ContextVar[bool] = ContextVar("lnurl_lookup", default=False)


def in_lookup() -> bool:
    """Whether the current transport call is an LNURL lookup (a URL someone else supplied)."""
    return _LOOKUP.get()


class LnurlError(Exception):
    """The address cannot be resolved, or its service answered something unusable."""


@dataclass(frozen=True)
class PayRequest:
    callback: str
    min_sendable_msat: int
    max_sendable_msat: int
    metadata: str


def bolt11_amount_msat(invoice: str) -> int | None:
    """The amount in msat from a bolt11 invoice's human-readable part (None: no amount)."""
    text = invoice.strip().lower()
    if text.startswith("lightning:"):
        text = text[len("lightning:"):]
    sep = text.rfind("1")
    if sep < 0:
        raise LnurlError("not a bolt11 invoice")
    m = _HRP.match(text[:sep])
    if m is None:
        raise LnurlError("not a bolt11 invoice")
    digits, mult = m.group(2), m.group(3)
    if not digits:
        if mult:
            raise LnurlError("bolt11 amount has a multiplier but no digits")
        return None
    n = int(digits)
    if mult == "":
        return n * _MSAT_PER_BTC
    if mult == "m":
        return n * 100_000_000
    if mult == "u":
        return n * 100_000
    if mult == "n":
        return n * 100
    if n % 10:  # pico-bitcoin: only whole msats are valid
        raise LnurlError("bolt11 amount is not a whole number of msat")
    return n // 10


def _bech32_decode(text: str) -> str:
    """LUD-01: a bech32 ``lnurl1…`` string → the URL it encodes (checksum verified)."""
    s = text.strip().lower()
    if s.startswith("lightning:"):
        s = s[len("lightning:"):]
    sep = s.rfind("1")
    hrp, data = s[:sep], s[sep + 1:]
    if hrp != "lnurl" or len(data) < 6 or any(c not in _BECH32 for c in data):
        raise LnurlError("not a bech32 LNURL")
    values = [_BECH32.index(c) for c in data]
    if _bech32_polymod([ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp] + values) != 1:
        raise LnurlError("bad LNURL checksum")
    acc = bits = 0
    out = bytearray()
    for v in values[:-6]:
        acc = (acc << 5) | v
        bits += 5
        while bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise LnurlError("LNURL does not encode a URL") from None


def _bech32_polymod(values: list[int]) -> int:
    gen = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= gen[i] if (top >> i) & 1 else 0
    return chk


def _plain_http_ok(host: str) -> bool:
    if host.endswith(".onion") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(url: str, what: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and _plain_http_ok(host):
        return url
    raise LnurlError(f"{what} must be an https URL")


def resolve_url(address: str) -> str:
    """The LNURL-pay endpoint for a lightning address, bech32 LNURL or URL."""
    a = address.strip()
    low = a.lower()
    if low.startswith(("lnurl1", "lightning:lnurl1")):
        return _check_url(_bech32_decode(a), "LNURL")
    if low.startswith(("https://", "http://")):
        return _check_url(a, "LNURL")
    m = _ADDRESS.match(low)
    if m is None:
        raise LnurlError(f"not a lightning address: {address!r}")
    name, host = m.group(1), m.group(2)
    hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    scheme = "http" if _plain_http_ok(hostname) else "https"
    return f"{scheme}://{host}/.well-known/lnurlp/{quote(name, safe='')}"


async def _get_json(transport: Transport, url: str) -> dict[str, Any]:
    try:
        token = _LOOKUP.set(True)  # someone else's URL: see `in_lookup`
        try:
            status, body = await transport("GET", url, None)
        finally:
            _LOOKUP.reset(token)
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise LnurlError(f"LNURL service unreachable: {type(exc).__name__}") from exc
    if len(body) > MAX_RESPONSE_BYTES:
        raise LnurlError("LNURL response too large")
    try:
        doc = strictjson.loads(body)
    except strictjson.JsonError:
        raise LnurlError(f"LNURL service answered {status} without JSON") from None
    if not isinstance(doc, dict):
        raise LnurlError("LNURL response is not an object")
    if str(doc.get("status", "")).upper() == "ERROR":
        raise LnurlError(f"LNURL service error: {str(doc.get('reason', ''))[:200]}")
    if status != 200:
        raise LnurlError(f"LNURL service answered {status}")
    return doc


def _msat(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_MSAT:
        raise LnurlError(f"payRequest {what} must be a non-negative integer")
    return v


async def fetch_pay_request(transport: Transport, address: str) -> PayRequest:
    doc = await _get_json(transport, resolve_url(address))
    if doc.get("tag") != "payRequest":
        raise LnurlError("not an LNURL-pay endpoint (tag != payRequest)")
    callback = doc.get("callback")
    if not isinstance(callback, str):
        raise LnurlError("payRequest has no callback")
    metadata = doc.get("metadata", "")
    req = PayRequest(
        callback=_check_url(callback, "callback"),
        min_sendable_msat=_msat(doc.get("minSendable"), "minSendable"),
        max_sendable_msat=_msat(doc.get("maxSendable"), "maxSendable"),
        metadata=metadata if isinstance(metadata, str) else "",
    )
    if req.min_sendable_msat > req.max_sendable_msat:
        raise LnurlError("payRequest minSendable > maxSendable")
    return req


async def fetch_invoice(transport: Transport, address: str, amount_msat: int) -> str:
    """A bolt11 invoice for exactly `amount_msat` from `address`'s LNURL-pay service."""
    if amount_msat <= 0:
        raise ValueError("amount_msat must be positive")
    req = await fetch_pay_request(transport, address)
    if not req.min_sendable_msat <= amount_msat <= req.max_sendable_msat:
        raise LnurlError(
            f"{amount_msat} msat is outside [{req.min_sendable_msat}, {req.max_sendable_msat}]"
        )
    sep = "&" if urlsplit(req.callback).query else "?"
    doc = await _get_json(transport, f"{req.callback}{sep}amount={amount_msat}")
    pr = doc.get("pr")
    if not isinstance(pr, str) or not pr:
        raise LnurlError("LNURL callback returned no invoice")
    got = bolt11_amount_msat(pr)
    if got != amount_msat:
        raise LnurlError(f"invoice is for {got} msat, asked for {amount_msat}")
    return pr
