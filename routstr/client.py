"""The node's upstream HTTP/1.1 client: h11 for the protocol, anyio for the sockets.

What it does
* ``http`` and ``https`` (stdlib `ssl`, the system CA store, SNI, verification on; ALPN
  ``http/1.1``), optionally through a SOCKS5 proxy that resolves names itself (Tor: ``.onion``).
* A keep-alive pool per origin ``(scheme, host, port)``: at most `max_connections_per_origin`
  sockets, in use or idle; a request waits for a free slot when all are busy. An idle connection is
  handed out again only if h11 finished the previous exchange cleanly, it is younger than
  `keepalive_expiry`, and its socket is not readable (a zero-timeout poll: an idle HTTP/1.1
  connection that is readable has hit EOF or holds bytes nobody asked for). A connection whose
  exchange left bytes behind in h11's buffer (an upstream that sent more than its
  Content-Length, a body after a HEAD answer, data after the last chunk) or an EOF is closed
  when the response finishes, never pooled: the next request, another user's, would otherwise
  be answered with those bytes. (Bytes that arrive after that check and after the readable
  poll, while the next request is already on its way, cannot be told from its answer: an
  HTTP/1.1 limit; the poll narrows it to that instant.)
  A peer may still close it just as we reuse it: if that happens before any byte of the response
  arrived, and the request body was `bytes` (so it can be sent again), the request is retried once
  on a fresh connection.
* Request bodies: `bytes` (Content-Length) or an async iterable of `bytes` (chunked). Response
  bodies: Content-Length, chunked or until-close; `UpstreamResponse` yields chunks as they arrive.
* Timeouts: `connect_timeout` (TCP + SOCKS + TLS handshake), `read_timeout` (each read, i.e.
  inactivity), `write_timeout` (each write); optionally `pool_timeout` (waiting for a slot).
  Sending a request and reading its response head run under one cancel scope whose deadline
  is moved before each write and read (one timer per request instead of one per socket call).

Someone else's URLs (a webhook, an LNURL callback, an announced node): `request(guard=...)`, or
any request inside `netguard.foreign()` (the client's `foreign_guard`), checks the URL, resolves
the name itself, refuses unless every address is allowed and connects to the checked address —
see `routstr.netguard` (also for what a SOCKS proxy leaves unchecked). Such requests have pools
of their own. No redirect is ever followed.

Errors: nothing foreign escapes. OSError, anyio stream errors, ssl errors, h11 protocol errors and
timeouts become `UpstreamConnectError`, `UpstreamTimeout` (`UpstreamConnectTimeout` is both) or
`UpstreamProtocolError`, all `routstr.errors.UpstreamError` (502). Their message is safe to show a
client (no host names); `detail` carries the technical reason for the log. Exceptions raised by the
caller's own request-body iterator, and cancellation, pass through unchanged.

Lifecycle of a response: the caller iterates or `read()`s it and then calls `aclose()` (idempotent;
`fetch()` does all of this). When the body has been read to its end the connection goes back to the
pool at once; `aclose()` before that closes the socket (never drains), so an abandoned stream stops
the upstream promptly. Closing never waits on the network, so it is safe in a cancelled scope.
"""

from __future__ import annotations

import ipaddress
import math
import select
import socket
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import h11
from anyio.abc import ByteStream, SocketAttribute, SocketStream
from anyio.streams.tls import TLSStream

from routstr import netguard
from routstr.errors import UpstreamError

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024
MAX_RESPONSE_HEAD_BYTES = 64 * 1024  # status line + headers of one response
COALESCE_WRITE_BYTES = 64 * 1024  # below this, head and body go out in one write

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_HAS_POLL = hasattr(select, "poll")
_BYTES_LIKE = (bytes, bytearray, memoryview)


# ---------------------------------------------------------------------------------------------
# Errors


class UpstreamConnectError(UpstreamError):
    """Could not reach the upstream: refused, DNS, TLS handshake/verification, SOCKS failure."""

    default_code = "upstream_connect_error"

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


class AddressRefused(UpstreamConnectError):
    """The outbound URL guard (`routstr.netguard`) refused the URL or the address it resolves
    to; nothing was sent (no connection was opened)."""

    default_code = "address_refused"


class UpstreamTimeout(UpstreamError):
    """The upstream did not connect, accept data or send data within the configured time."""

    default_code = "upstream_timeout"

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


class UpstreamConnectTimeout(UpstreamTimeout, UpstreamConnectError):
    """Connecting (TCP, SOCKS or TLS handshake) took longer than `connect_timeout`."""

    default_code = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    """The upstream broke HTTP: malformed response, or closed the connection mid-message."""

    default_code = "upstream_protocol_error"

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


class UpstreamResponseTooLarge(UpstreamProtocolError):
    """`read()`/`fetch()` got more than `max_bytes` of body."""

    default_code = "upstream_response_too_large"


class _ConnectionLost(Exception):
    """Internal: the connection died before any byte of the response arrived (retryable)."""


class _SocksError(Exception):
    """Internal: the SOCKS5 negotiation failed; becomes UpstreamConnectError."""


_IO_ERRORS = (
    OSError,
    ssl.SSLError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if not text and exc.__cause__ is not None:
        text = str(exc.__cause__)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# URLs and headers


@dataclass(frozen=True, slots=True)
class _Target:
    scheme: str
    host: str
    port: int
    host_header: bytes
    target: bytes

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


@lru_cache(maxsize=512)
def _parse_url(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise UpstreamConnectError("Invalid upstream URL", detail=f"{url!r}: {exc}") from None
    if scheme not in ("http", "https") or not host:
        raise UpstreamConnectError("Invalid upstream URL", detail=f"unsupported URL {url!r}")
    default_port = 443 if scheme == "https" else 80
    if port is None:
        port = default_port
    host_header = f"[{host}]" if ":" in host else host
    if port != default_port:
        host_header = f"{host_header}:{port}"
    target = parts.path or "/"
    if parts.query:
        target = f"{target}?{parts.query}"
    try:
        return _Target(scheme, host, port, host_header.encode("idna"), target.encode("ascii"))
    except UnicodeError:
        raise UpstreamConnectError(
            "Invalid upstream URL", detail=f"non-ASCII URL {url!r}"
        ) from None


def _request_headers(
    host_header: bytes, headers: Sequence[tuple[str, str]]
) -> list[tuple[bytes, bytes]]:
    """Caller's headers minus hop-by-hop, Host and Content-Length; our Host first."""
    out: list[tuple[bytes, bytes]] = [(b"host", host_header)]
    named: set[str] | None = None
    for name, value in headers:
        lname = name.lower()
        if lname == "connection":  # hop-by-hop headers it names go too (RFC 9110 7.6.1)
            named = (named or set()) | {t.strip().lower() for t in value.split(",")}
    for name, value in headers:
        lname = name.lower()
        if lname in _HOP_BY_HOP or lname.startswith("proxy-") or (named and lname in named):
            continue
        out.append((lname.encode("ascii"), value.encode("latin-1")))
    return out


def _check_url(guard: netguard.Guard, url: str) -> None:
    try:
        guard.check_url(url)
    except netguard.Refused as exc:
        raise AddressRefused(f"Address not allowed: {exc}", detail=f"{url!r}: {exc}") from None


async def _connect_guarded(host: str, port: int, guard: netguard.Guard) -> SocketStream:
    """Resolve `host` here, refuse if any address is not allowed, then connect to the checked
    addresses themselves (never the name again: no second DNS answer to rebind) and check the
    socket's peer once more."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        guard.check_ip(address)
    error: OSError = OSError(f"{host} resolves to no address")
    for address in addresses:
        try:
            tcp = await anyio.connect_tcp(address, port)
        except OSError as exc:
            error = exc
            continue
        try:
            guard.check_ip(str(tcp.extra(SocketAttribute.remote_address)[0]))
        except BaseException:
            await anyio.aclose_forcefully(tcp)
            raise
        return tcp
    raise error


def _h11_request(method: str, target: _Target, headers: Sequence[tuple[str, str]],
                 body: bytes | AsyncIterable[bytes]) -> h11.Request:
    """The request head: the caller's headers cleaned (`_request_headers`) plus the framing."""
    try:
        out_headers = _request_headers(target.host_header, headers)
        if isinstance(body, _BYTES_LIKE):
            if body or method not in _BODYLESS_METHODS:
                out_headers.append((b"content-length", b"%d" % len(body)))
        else:
            out_headers.append((b"transfer-encoding", b"chunked"))
        return h11.Request(method=method, target=target.target, headers=out_headers)
    except (UnicodeError, h11.LocalProtocolError) as exc:
        raise UpstreamProtocolError(
            "Invalid request for upstream", detail=_describe(exc)
        ) from None


# ---------------------------------------------------------------------------------------------
# SOCKS5 (RFC 1928, username/password RFC 1929)

_SOCKS_REPLIES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


@dataclass(frozen=True, slots=True)
class _Proxy:
    host: str
    port: int
    username: bytes | None
    password: bytes | None


def _parse_proxy(proxy: str) -> _Proxy:
    parts = urlsplit(proxy)
    if parts.scheme.lower() not in ("socks5", "socks5h") or not parts.hostname:
        raise ValueError(f"unsupported proxy {proxy!r}: expected socks5://host:port")
    username = password = None
    if parts.username is not None:
        username = unquote(parts.username).encode()
        password = unquote(parts.password or "").encode()
        if not 0 < len(username) < 256 or len(password) > 255:
            raise ValueError("SOCKS5 user name and password must be 1-255 bytes")
    return _Proxy(parts.hostname, parts.port or 1080, username, password)


async def _recv_exactly(stream: ByteStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            buf += await stream.receive(n - len(buf))
        except anyio.EndOfStream:
            raise _SocksError("proxy closed the connection during the SOCKS5 handshake") from None
    return buf


async def _socks5_handshake(stream: ByteStream, proxy: _Proxy, host: str, port: int) -> None:
    """Ask the proxy to CONNECT to host:port; a host name is sent as a name (remote DNS)."""
    methods = b"\x00\x02" if proxy.username is not None else b"\x00"
    await stream.send(b"\x05" + bytes([len(methods)]) + methods)
    ver, method = await _recv_exactly(stream, 2)
    if ver != 5:
        raise _SocksError("proxy is not a SOCKS5 server")
    if method == 0x02 and proxy.username is not None and proxy.password is not None:
        u, p = proxy.username, proxy.password
        await stream.send(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
        _ver, status = await _recv_exactly(stream, 2)
        if status != 0:
            raise _SocksError("SOCKS5 proxy rejected the user name or password")
    elif method != 0x00:
        raise _SocksError("SOCKS5 proxy accepts none of our authentication methods")

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        if not 0 < len(name) < 256:
            raise _SocksError("host name too long for SOCKS5") from None
        address = b"\x03" + bytes([len(name)]) + name
    else:
        address = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    await stream.send(b"\x05\x01\x00" + address + port.to_bytes(2, "big"))
    ver, rep, _rsv, atyp = await _recv_exactly(stream, 4)
    if ver != 5:
        raise _SocksError("malformed SOCKS5 reply")
    if rep != 0:
        raise _SocksError(f"SOCKS5 proxy: {_SOCKS_REPLIES.get(rep, f'error {rep}')}")
    if atyp == 1:
        await _recv_exactly(stream, 4 + 2)
    elif atyp == 4:
        await _recv_exactly(stream, 16 + 2)
    elif atyp == 3:
        (length,) = await _recv_exactly(stream, 1)
        await _recv_exactly(stream, length + 2)
    else:
        raise _SocksError("malformed SOCKS5 reply")


# ---------------------------------------------------------------------------------------------
# Connections and the pool


class _Connection:
    __slots__ = ("stream", "h11", "sock", "idle_since")

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD_BYTES)
        self.idle_since = 0.0
        sock: socket.socket | None
        try:
            sock = stream.extra(SocketAttribute.raw_socket)
        except anyio.TypedAttributeLookupError:
            sock = None
        self.sock = sock

    def looks_dead(self) -> bool:
        """An idle HTTP/1.1 connection must be silent: readable (EOF, bytes, error) = unusable."""
        sock = self.sock
        if sock is None:
            return False
        try:
            fd = sock.fileno()
            if fd < 0:
                return True
            if _HAS_POLL:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                return bool(poller.poll(0))
            readable, _w, _x = select.select([fd], [], [], 0)
            return bool(readable)
        except (OSError, ValueError):
            return True

    async def close(self) -> None:
        await anyio.aclose_forcefully(self.stream)


def _has_leftovers(h: h11.Connection) -> bool:
    """Bytes (or an EOF) past the end of the response that was just read: more than its
    Content-Length, a body after a HEAD answer, data after the last chunk. HTTP/1.1 has no
    place for them; kept, h11 would parse them as the answer to the next request on this
    connection — another user's. Such a connection is closed, never pooled."""
    data, closed = h.trailing_data
    return bool(data) or closed


class _Pool:
    __slots__ = ("idle", "slots")

    def __init__(self, limit: int) -> None:
        self.idle: list[_Connection] = []  # most recently used last
        self.slots = anyio.Semaphore(limit)


class HttpClient:
    """Upstream HTTP/1.1 client; one per event loop. See the module docstring."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        write_timeout: float = 60.0,
        proxy: str | None = None,
        max_connections_per_origin: int = 64,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_expiry: float = 30.0,
        pool_timeout: float | None = None,
        foreign_guard: netguard.Guard | None = None,
    ) -> None:
        if max_connections_per_origin < 1:
            raise ValueError("max_connections_per_origin must be >= 1")
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._proxy = _parse_proxy(proxy) if proxy else None
        self._max_per_origin = max_connections_per_origin
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        self._pool_timeout = pool_timeout
        # what requests made inside `netguard.foreign()` may reach (strict unless told)
        self._foreign_guard = foreign_guard or netguard.Guard()
        # per origin and guard: a guarded request never reuses a connection opened unguarded
        self._pools: dict[tuple[str, str, int, netguard.Guard | None], _Pool] = {}
        self._closed = False

    # -- public API ---------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | AsyncIterable[bytes] = b"",
        *,
        guard: netguard.Guard | None = None,
    ) -> UpstreamResponse:
        """Send a request and return once the response head has arrived.

        `guard`: the URL is someone else's — check it and the address connected to
        (`routstr.netguard`); a refusal raises `AddressRefused` before any connection. Requests
        made inside `netguard.foreign()` get the client's `foreign_guard` when none is given.
        The caller must read and/or `aclose()` the returned response.
        """
        if self._closed:
            raise UpstreamConnectError("Upstream client is closed")
        if guard is None and netguard.is_foreign():
            guard = self._foreign_guard
        if guard is not None:
            _check_url(guard, url)
        target = _parse_url(url)
        method = method.upper()
        h11_request = _h11_request(method, target, headers, body)
        pool_key = (*target.origin, guard)
        pool = self._pools.get(pool_key)
        if pool is None:
            pool = self._pools[pool_key] = _Pool(self._max_per_origin)
        await self._acquire_slot(pool)
        try:
            retried = False
            while True:
                conn = None if retried else await self._take_idle(pool)
                reused = conn is not None
                if conn is None:
                    try:
                        conn = await self._connect(target, guard)
                    except UpstreamConnectError as exc:
                        if not retried:
                            raise
                        # The first attempt may have reached the server: say so, never
                        # "refused, not delivered" (a wallet would roll back a done swap).
                        raise UpstreamProtocolError(
                            "Upstream closed the connection without a response",
                            detail=f"{target.host}:{target.port}: retry failed: {exc.detail}",
                        ) from None
                sent = False
                try:
                    with anyio.CancelScope() as scope:
                        await self._send_request(conn, h11_request, body, scope)
                        sent = True
                        head = await self._receive_head(conn, scope)
                    if scope.cancelled_caught:
                        raise UpstreamTimeout(
                            "Upstream service request timed out",
                            detail=(f"no data from upstream for {self._read_timeout:g} s"
                                    if sent else "write timed out"))
                except _ConnectionLost as exc:
                    await conn.close()
                    # A stale pooled connection is retried once on a fresh one — but after the
                    # whole request went out only when repeating it is harmless (the server may
                    # have acted on it: a POST /v1/swap must never be sent twice blindly).
                    safe = not sent or method in _IDEMPOTENT_METHODS
                    if reused and not retried and safe and isinstance(body, _BYTES_LIKE):
                        retried = True
                        continue
                    raise UpstreamProtocolError(
                        "Upstream closed the connection without a response",
                        detail=f"{target.host}:{target.port}: {exc}",
                    ) from None
                except BaseException:
                    await conn.close()
                    raise
                return UpstreamResponse(self, pool, conn, head)
        except BaseException:
            pool.slots.release()
            raise

    async def fetch(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        max_bytes: int = DEFAULT_MAX_BODY_BYTES,
        *,
        guard: netguard.Guard | None = None,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """`request()`, read the whole body (at most `max_bytes`) and close.

        Returns (status, headers, body).
        """
        response = await self.request(method, url, headers, body, guard=guard)
        try:
            data = await response.read(max_bytes)
        finally:
            await response.aclose()
        return response.status, response.headers, data

    async def aclose(self) -> None:
        """Close idle connections; responses still open close theirs when they finish."""
        self._closed = True
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            idle, pool.idle = pool.idle, []
            for conn in idle:
                await conn.close()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- pool ---------------------------------------------------------------------------------

    async def _acquire_slot(self, pool: _Pool) -> None:
        try:
            pool.slots.acquire_nowait()  # the common case costs no scheduling round trip
            return
        except anyio.WouldBlock:
            pass
        if self._pool_timeout is None:
            await pool.slots.acquire()
            return
        try:
            with anyio.fail_after(self._pool_timeout):
                await pool.slots.acquire()
        except TimeoutError:
            raise UpstreamTimeout(
                "Upstream service request timed out",
                detail="no free upstream connection within pool_timeout",
            ) from None

    async def _take_idle(self, pool: _Pool) -> _Connection | None:
        idle = pool.idle
        if not idle:
            return None
        oldest_allowed = time.monotonic() - self._keepalive_expiry
        while idle:
            conn = idle.pop()
            if conn.idle_since >= oldest_allowed and not conn.looks_dead():
                return conn
            await conn.close()
        return None

    async def _release(self, pool: _Pool, conn: _Connection, reusable: bool) -> None:
        """The response is finished with `conn`: pool it or close it, then free the slot."""
        try:
            h = conn.h11
            if (
                reusable
                and not self._closed
                and h.our_state is h11.DONE
                and h.their_state is h11.DONE
                and not _has_leftovers(h)
            ):
                h.start_next_cycle()
                now = time.monotonic()
                conn.idle_since = now
                idle = pool.idle
                # the oldest idle connections sit at the front; drop expired ones as we go
                while idle and idle[0].idle_since < now - self._keepalive_expiry:
                    await idle.pop(0).close()
                idle.append(conn)
            else:
                await conn.close()
        finally:
            pool.slots.release()

    # -- connecting ---------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            ctx = ssl.create_default_context()
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl_context = ctx
        return self._ssl_context

    async def open_stream(self, host: str, port: int, *, tls: bool) -> ByteStream:
        """A raw byte stream to host:port, for a protocol that upgrades from HTTP/1.1 (the
        Nostr relay WebSocket client): TCP — through the SOCKS5 proxy when one is configured,
        the name resolved by the proxy — then TLS when `tls` (system CAs, SNI, ALPN
        ``http/1.1``), all within `connect_timeout`. Failures raise `UpstreamConnectError` /
        `UpstreamConnectTimeout`. Not pooled: the caller owns the stream and closes it."""
        if self._closed:
            raise UpstreamConnectError("Upstream client is closed")
        target = _Target("https" if tls else "http", host, port, b"", b"/")
        return await self._connect_stream(target)

    async def _connect(self, target: _Target, guard: netguard.Guard | None) -> _Connection:
        return _Connection(await self._connect_stream(target, guard))

    async def _connect_stream(self, target: _Target,
                              guard: netguard.Guard | None = None) -> ByteStream:
        where = f"{target.host}:{target.port}"
        if self._proxy is not None:
            where += f" via SOCKS5 {self._proxy.host}:{self._proxy.port}"
        try:
            with anyio.fail_after(self._connect_timeout):
                stream = await self._open_stream(target, guard)
        except netguard.Refused as exc:
            raise AddressRefused(f"Address not allowed: {exc}", detail=f"{where}: {exc}") from None
        except TimeoutError:
            raise UpstreamConnectTimeout(
                "Upstream service connection timed out", detail=f"connect to {where} timed out"
            ) from None
        except _SocksError as exc:
            raise UpstreamConnectError(
                "Unable to connect to upstream service", detail=f"{where}: {exc}"
            ) from None
        except ssl.SSLError as exc:
            raise UpstreamConnectError(
                "Unable to connect to upstream service: TLS handshake failed",
                detail=f"{where}: {_describe(exc)}",
            ) from exc
        except _IO_ERRORS as exc:
            raise UpstreamConnectError(
                "Unable to connect to upstream service", detail=f"{where}: {_describe(exc)}"
            ) from exc
        return stream

    async def _open_stream(self, target: _Target, guard: netguard.Guard | None) -> ByteStream:
        proxy = self._proxy
        if proxy is not None:  # the proxy resolves the name: only the URL was checked
            tcp = await anyio.connect_tcp(proxy.host, proxy.port)
        elif guard is None:
            tcp = await anyio.connect_tcp(target.host, target.port)
        else:
            tcp = await _connect_guarded(target.host, target.port, guard)
        stream: ByteStream = tcp
        try:
            sock = tcp.extra(SocketAttribute.raw_socket)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if proxy is not None:
                await _socks5_handshake(tcp, proxy, target.host, target.port)
            if target.scheme == "https":
                stream = await TLSStream.wrap(
                    tcp,
                    hostname=target.host,
                    ssl_context=self._tls_context(),
                    standard_compatible=False,
                )
        except BaseException:
            await anyio.aclose_forcefully(tcp)
            raise
        return stream

    # -- one exchange -------------------------------------------------------------------------

    async def _write(self, conn: _Connection, data: bytes | bytearray | memoryview,
                     scope: anyio.CancelScope) -> None:
        """One write, `scope` (the exchange's) expiring `write_timeout` from now; no deadline
        after it (a streamed body's own iterator may take its time between chunks)."""
        scope.deadline = anyio.current_time() + self._write_timeout
        try:
            await conn.stream.send(data)  # type: ignore[arg-type]
        except _IO_ERRORS as exc:
            # nothing of the response can have been received while we were still sending
            raise _ConnectionLost(f"send failed: {_describe(exc)}") from exc
        scope.deadline = math.inf

    async def _send_request(
        self, conn: _Connection, request: h11.Request, body: bytes | AsyncIterable[bytes],
        scope: anyio.CancelScope,
    ) -> None:
        h = conn.h11
        try:
            head = h.send(request)
        except h11.LocalProtocolError as exc:
            raise UpstreamProtocolError(
                "Invalid request for upstream", detail=_describe(exc)
            ) from None
        if isinstance(body, _BYTES_LIKE):
            if body:  # Content-Length framing: h11 passes the body through untouched
                h.send_with_data_passthrough(h11.Data(data=body))
            h.send(h11.EndOfMessage())  # b"" with Content-Length framing
            if not body:
                await self._write(conn, head, scope)
            elif len(body) <= COALESCE_WRITE_BYTES:
                await self._write(conn, head + bytes(body), scope)
            else:
                await self._write(conn, head, scope)
                await self._write(conn, body, scope)
            return
        await self._write(conn, head, scope)
        async for chunk in body:
            if not chunk:
                continue
            parts = h.send_with_data_passthrough(h11.Data(data=chunk)) or []
            if len(chunk) <= COALESCE_WRITE_BYTES:
                await self._write(conn, b"".join(parts), scope)
            else:
                for part in parts:
                    await self._write(conn, part, scope)
        await self._write(conn, h.send(h11.EndOfMessage()), scope)

    async def _receive_head(self, conn: _Connection, scope: anyio.CancelScope) -> h11.Response:
        h = conn.h11
        received = 0
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamProtocolError(
                    "Upstream sent a malformed response", detail=_describe(exc)
                ) from None
            if event is h11.NEED_DATA:
                scope.deadline = anyio.current_time() + self._read_timeout
                try:
                    data = await self._receive_untimed(conn)
                except UpstreamProtocolError as exc:
                    if received == 0:  # reset before any byte of the response
                        raise _ConnectionLost(exc.detail) from exc
                    raise
                if not data and received == 0:
                    raise _ConnectionLost("connection closed before the response")
                received += len(data)
                h.receive_data(data)
                continue
            if type(event) is h11.Response:
                # h11 bounds only what one read leaves incomplete: bound the head (1xx heads
                # included) itself — what was received less what is still unparsed (body)
                # (trailing_data copies the buffer: only looked at when the total is over)
                if (received > MAX_RESPONSE_HEAD_BYTES
                        and received - len(h.trailing_data[0]) > MAX_RESPONSE_HEAD_BYTES):
                    raise UpstreamProtocolError(
                        "Upstream sent a malformed response",
                        detail=f"response head over {MAX_RESPONSE_HEAD_BYTES} bytes")
                return event
            if type(event) is h11.InformationalResponse:
                continue
            raise UpstreamProtocolError(
                "Upstream closed the connection without a response",
                detail=f"unexpected {type(event).__name__} before the response",
            )

    async def _receive(self, conn: _Connection) -> bytes:
        """One read (b"" at EOF) under the read timeout; failures become Upstream errors."""
        with anyio.move_on_after(self._read_timeout):
            return await self._receive_untimed(conn)
        raise UpstreamTimeout(
            "Upstream service request timed out",
            detail=f"no data from upstream for {self._read_timeout:g} s",
        )

    @staticmethod
    async def _receive_untimed(conn: _Connection) -> bytes:
        """One read (b"" at EOF), for a caller whose scope bounds it."""
        try:
            return await conn.stream.receive(READ_CHUNK_BYTES)
        except anyio.EndOfStream:
            return b""
        except _IO_ERRORS as exc:
            raise UpstreamProtocolError(
                "Upstream connection broken", detail=_describe(exc)
            ) from exc


class UpstreamResponse:
    """A response whose head has arrived; the body streams. Always `aclose()` it."""

    __slots__ = ("status", "reason", "headers", "_client", "_pool", "_conn")

    def __init__(
        self, client: HttpClient, pool: _Pool, conn: _Connection, head: h11.Response
    ) -> None:
        self.status: int = head.status_code
        self.reason: str = head.reason.decode("latin-1")
        self.headers: list[tuple[str, str]] = [
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in head.headers
        ]
        self._client = client
        self._pool = pool
        self._conn: _Connection | None = conn

    @property
    def finished(self) -> bool:
        """Read to its end or closed: the connection is back in the pool or gone."""
        return self._conn is None

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {self.reason!r}>"

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        h = conn.h11
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                await self._finish(reusable=False)
                raise UpstreamProtocolError(
                    "Upstream response broken", detail=_describe(exc)
                ) from None
            if event is h11.NEED_DATA:
                try:
                    data = await self._client._receive(conn)
                except UpstreamError:
                    await self._finish(reusable=False)
                    raise
                h.receive_data(data)
                continue
            kind = type(event)
            if kind is h11.Data:
                data = event.data  # type: ignore[union-attr]
                if data:
                    return data if type(data) is bytes else bytes(data)
                continue
            if kind is h11.EndOfMessage:
                await self._finish(reusable=True)
                raise StopAsyncIteration
            await self._finish(reusable=False)
            raise UpstreamProtocolError(
                "Upstream response broken", detail=f"unexpected {kind.__name__} in body"
            )

    async def read(self, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> bytes:
        """The rest of the body; more than `max_bytes` raises `UpstreamResponseTooLarge`."""
        declared = self.header("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await self.aclose()
            raise UpstreamResponseTooLarge(
                "Upstream response too large", detail=f"Content-Length {declared} > {max_bytes}"
            )
        chunks: list[bytes] = []
        total = 0
        async for chunk in self:
            total += len(chunk)
            if total > max_bytes:
                await self.aclose()
                raise UpstreamResponseTooLarge(
                    "Upstream response too large", detail=f"body > {max_bytes} bytes"
                )
            chunks.append(chunk)
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    async def aclose(self) -> None:
        """Idempotent. Closes the connection unless the body was read to its end."""
        conn = self._conn
        if conn is None:
            return
        reusable = False
        try:  # the caller may have taken the last byte without seeing the end: look, don't read
            while True:
                event = conn.h11.next_event()
                if type(event) is h11.Data and not event.data:
                    continue
                reusable = type(event) is h11.EndOfMessage
                break
        except h11.RemoteProtocolError:
            pass
        await self._finish(reusable)

    async def _finish(self, reusable: bool) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        await self._client._release(self._pool, conn, reusable)

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()
