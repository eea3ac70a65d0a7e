"""The outbound URL guard: one rule for every address that someone other than the operator
supplies — webhook URLs, Lightning addresses and LNURL callbacks (``Refund-LNURL``, payouts),
node endpoints announced on Nostr and probed for ``/v1/providers``.

Without it the node is a proxy into its own network: a client names ``http://127.0.0.1:8000``
(or ``http://169.254.169.254``, the cloud metadata service) and the node fetches it, sometimes
showing the answer. Two layers, both here, both applied by `routstr.client.HttpClient`:

1. **The URL** (`Guard.check_url`, no I/O): ``http``/``https`` only; no user info (``@``),
   no fragment (``#``), no backslash, no percent-encoding or zone id in the host; the host is a
   DNS name (ASCII letters, digits, ``-``, ``_``, ``.``), a bracketed IPv6 literal or a
   *canonical* dotted-quad IPv4 literal. Every other numeric form — ``127.1``, ``2130706433``,
   ``0x7f000001``, ``0177.0.0.1``, ``127.000.0.1``, a trailing dot — is refused outright,
   whatever the policy: resolvers disagree about them, and that is the trick. Unless
   `allow_private`, a literal address must be public (`forbidden_ip`) and ``localhost`` names
   are refused by name.
2. **The connection** (`Guard.check_ip`): the client resolves the name itself, refuses when any
   resolved address is not public, connects to the checked address (not the name again), and
   checks the socket's peer address once more — so a DNS answer that changes between check and
   connect (rebinding) connects to nothing it was not allowed to. Redirects are never followed
   (the client has no redirect logic; a 3xx is just an answer).

Not public (`forbidden_ip`): loopback, private (RFC 1918, ULA), link-local (169.254/16 —
metadata — and fe80::/10), site-local (fec0::/10), CGNAT (100.64/10), multicast, reserved,
unspecified, and anything else Python does not call global; IPv4 embedded in IPv6 (mapped
``::ffff:a.b.c.d``, 6to4, Teredo, NAT64 ``64:ff9b::/96``) is judged by its IPv4 address.

Through a SOCKS5 proxy (``--upstream-proxy``, Tor, ``socks5h``) the *proxy* resolves names and
opens the connection: then layer 1 still applies in full (literals and ``localhost`` refused,
numeric tricks refused), but a name that resolves to a private address is not caught here — no
local DNS is done, so there is no DNS leak; what the proxy can reach is the proxy's business
(Tor's exits refuse private addresses; a LAN proxy would not). ``.onion`` names are fine.

The operator's ``--webhooks-allow-private``, ``--providers-allow-private`` and
``--lnurl-allow-private`` switch off the address checks (not the syntax checks) for their
kind of URL: tests and LAN setups talk to 127.0.0.1 that way.
"""

from __future__ import annotations

import contextvars
import ipaddress
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

MAX_URL_CHARS = 2048
_NAME = re.compile(r"^[a-z0-9_](?:[a-z0-9_\-.]*[a-z0-9_\-])?\.?$")
_DOTTED_QUAD = re.compile(r"^(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}$")
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refused(ValueError):
    """The URL or address may not be fetched; the message is safe to show the supplier."""


class Forbidden(Refused):
    """A well-formed URL whose address (or ``localhost`` name) is not public."""


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def forbidden_ip(ip: IPAddress) -> bool:
    """True unless `ip` is a public unicast address (see the module docstring)."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            return forbidden_ip(inner)
        if ip.is_site_local:  # fec0::/10, deprecated but still routed on some networks
            return True
    return bool(not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local
                or ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def parse_host(host: str) -> IPAddress | None:
    """The address a URL host names, None for a DNS name; non-canonical numbers refused.

    `host` is as `urlsplit` gives it (lowercased, IPv6 brackets removed)."""
    if not host or not host.isascii():
        raise Refused("host must be an ASCII name or address")
    if ":" in host:  # only an IPv6 literal can hold a colon here
        if "%" in host:
            raise Refused("IPv6 zone ids are not allowed")
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise Refused("malformed IPv6 address") from None
    last = host.rsplit(".", 1)[-1]
    if _NUMERIC_LABEL.match(last) or _NUMERIC_LABEL.match(host.rstrip(".").rsplit(".", 1)[-1]):
        # WHATWG URL: a host whose last label is a number is an IPv4 address. Only the
        # canonical dotted quad is accepted; inet_aton's other spellings are refused.
        if not _DOTTED_QUAD.match(host) or any(int(p) > 255 for p in host.split(".")):
            raise Refused("numeric host must be a canonical dotted-quad IPv4 address")
        return ipaddress.IPv4Address(host)
    if not _NAME.match(host) or ".." in host:
        raise Refused("host is not a valid DNS name")
    return None


def _split(url: str) -> tuple[SplitResult, str, int]:
    if len(url) > MAX_URL_CHARS:
        raise Refused(f"URL longer than {MAX_URL_CHARS} characters")
    if any(c in url for c in "#\\") or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise Refused("URL must not contain a fragment, backslashes, spaces or controls")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Refused("malformed URL") from None
    if parts.scheme not in ("http", "https"):
        raise Refused("URL must be http:// or https://")
    if "@" in parts.netloc:
        raise Refused("URL must not carry user info")
    host = parts.hostname or ""
    if "%" in parts.netloc:
        raise Refused("host must not be percent-encoded")
    return parts, host, port if port is not None else (443 if parts.scheme == "https" else 80)


def _is_localhost(host: str) -> bool:
    name = host.rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


@dataclass(frozen=True, slots=True)
class Guard:
    """What a foreign URL may reach: `allow_private` (an operator switch) lifts the address
    checks, never the syntax checks."""

    allow_private: bool = False

    def check_url(self, url: str, *, allow_query: bool = True) -> tuple[str, int]:
        """Layer 1 (no I/O): raise `Refused`, else return (host, port)."""
        parts, host, port = _split(url)
        if not allow_query and (parts.query or "?" in url):
            raise Refused("URL must not carry a query")
        address = parse_host(host)
        if not self.allow_private:
            if address is not None:
                self.check_ip(address)
            elif _is_localhost(host):
                raise Forbidden("URL may not target localhost")
        return host, port

    def check_ip(self, address: str | IPAddress) -> None:
        """Layer 2: the address the socket connects to."""
        if self.allow_private:
            return
        ip = address if not isinstance(address, str) else ipaddress.ip_address(
            address.split("%", 1)[0])
        if forbidden_ip(ip):
            raise Forbidden("URL may not target private, loopback or link-local addresses")


def check_syntax(url: str, *, allow_query: bool = True) -> tuple[str, int]:
    """Layer 1's syntax rules only (for a caller that does not know the operator's policy
    yet; the address is checked when the client connects). Returns (host, port)."""
    return Guard(allow_private=True).check_url(url, allow_query=allow_query)


# A request made while `foreign()` is active uses the HTTP client's foreign-URL guard: for
# callers that reach the client through an interface that takes no guard (the wallet's
# `Transport`, used by the LNURL lookups).
_FOREIGN: contextvars.ContextVar[bool] = contextvars.ContextVar("routstr_foreign_url",
                                                                 default=False)


@contextmanager
def foreign() -> Iterator[None]:
    """Mark the requests made inside as going to someone else's URL."""
    token = _FOREIGN.set(True)
    try:
        yield
    finally:
        _FOREIGN.reset(token)


def is_foreign() -> bool:
    return _FOREIGN.get()
