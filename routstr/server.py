"""The HTTP/1.1 server: an anyio TCP listener and one h11 loop per connection.

Connection lifecycle:
1. Wait for the first byte of a request (an idle keep-alive connection is closed silently
   after `keepalive_timeout`); then the whole header block must arrive within `header_timeout`
   (else 408 and close — a slowloris client only ever holds its own task).
   The two timers every request would pay for — the keep-alive wait and each write
   (`write_timeout`) — are not cancel scopes of their own: the connection notes a deadline
   and one reaper task closes connections past theirs (within `_reap_interval`).
2. Header block over `MAX_HEADER_BYTES` (all of it, however it was split into reads) → 431;
   malformed bytes → 400; both close the connection. RFC 9112 strictness beyond h11's own
   parser (which tolerates them): a bare LF or CR, obs-fold, whitespace before a colon, and
   Content-Length together with Transfer-Encoding are all 400 — the raw head is checked before
   h11 sees it, pipelined heads included (each request gets a fresh h11 state machine).
3. Body by Content-Length or chunked, bounded by `max_body_bytes` (413, answered, then close).
   Every error answered this way (413, 400, 408, 431) ends in a lingering close (`_linger`):
   the client that is still writing its body gets to read the answer instead of a reset.
   `Expect: 100-continue` gets its interim 100 only when the body will be read.
4. The app turns the `Request` into a `Response`; any `ApiError` is rendered by `errors.render`.
   This module holds the node's one broad `except Exception`: before anything was sent it
   becomes a 500 in the spec's shape; after the response started the connection is closed.
5. Responses carry `X-Routstr-Request-ID`, `X-Routstr-Version`, CORS headers; bodies over 1 KB
   of a compressible type are gzipped when the client accepts it (never `text/event-stream`).
   Streams are written chunk by chunk (one send per chunk, no buffering) and always closed
   with a shielded `aclose()` — that is where a streamed request settles its money.
6. Keep-alive and pipelining follow h11's state machine; SIGTERM stops accepting, closes idle
   connections, lets in-flight requests finish within the grace period, then cancels the rest.
"""

from __future__ import annotations

import gzip
import http
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.abc
import h11

from . import __version__
from .errors import (
    ApiError,
    HeadersTooLarge,
    InternalError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    render,
)
from .messages import Request, Response

log = logging.getLogger("routstr.server")

App = Callable[[Request], Awaitable[Response]]

MAX_HEADER_BYTES = 64 * 1024  # request line + header fields + the blank line, in total
CHUNKED_END_BYTES = 8  # bytes kept of what h11 was fed before its latest piece
MAX_LEADING_CRLF = 8  # empty lines ignored before a request line (bytes, 4 lines)
READ_SIZE = 64 * 1024
GZIP_MIN_BYTES = 1024
# Lingering close after an error answered before the request was read to its end (RFC 9112
# §9.6): the client may still be writing its body (urllib and requests write it all before
# they read), and closing with unread bytes makes the kernel send a reset that destroys the
# answer in the client's receive buffer. So: send FIN, then read and discard — at most
# LINGER_MAX_BYTES, for at most LINGER_TIMEOUT_S — until the client closes.
LINGER_MAX_BYTES = 16 * 1024 * 1024
LINGER_TIMEOUT_S = 5.0
MIN_BODY_RATE = 1024  # bytes/s a request body must average once `body_timeout` has passed
STREAM_CLOSE_TIMEOUT = 30.0
API_VERSION = "v1"
SUPPORTED_VERSIONS = ("v1",)  # accepted in the X-Routstr-Version request header ("1" too)
_COMPRESSIBLE = re.compile(r"^(application/(json|javascript|xml)|text/(?!event-stream))")
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~\-]{1,64}")  # an RFC 9110 token
MAX_REQUESTED_HEADERS_CHARS = 2048
# The headers our clients send: ours, OpenAI's and Anthropic's (their SDKs run in browsers).
CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, X-Cashu, X-Max-Cost, X-Request-ID, X-Routstr-Version, "
    "Idempotency-Key, Refund-LNURL, Key-Expiry-Time, X-Cashu-Lock, X-Api-Key, "
    "Anthropic-Version, Anthropic-Beta, Anthropic-Dangerous-Direct-Browser-Access, "
    "OpenAI-Organization, OpenAI-Project")
EXPOSED_HEADERS = (
    "X-Routstr-Request-ID, X-Routstr-Version, X-Routstr-Cost, X-Routstr-Cost-Msats, "
    "X-Routstr-Input-Cost-Msats, X-Routstr-Output-Cost-Msats, X-Routstr-Balance, "
    "X-Routstr-Balance-Msats, X-Cashu, X-RateLimit-Limit, X-RateLimit-Remaining, "
    "X-RateLimit-Reset, Retry-After"
)


@dataclass(frozen=True)
class ServerOptions:
    max_body_bytes: int = 10 * 1024 * 1024
    header_timeout: float = 10.0
    keepalive_timeout: float = 30.0
    body_timeout: float = 60.0
    write_timeout: float = 120.0
    cors_origins: tuple[str, ...] = ("*",)
    version: str = __version__
    # Told about every answered request: (method, path, status, seconds) — the metrics.
    observer: Callable[[str, str, int, float], None] | None = None
    access_log: str = "routstr.access"  # the logger of the one line per request


class _ClientGone(Exception):
    """The peer closed or broke the connection; nothing more can be sent."""


class _Conn:
    """One client connection: its h11 state machine and byte stream.

    Each request gets a fresh h11 state machine: the bytes of the next request head wait in
    `pending` (with `eof` when the client has finished sending) until `_check_head` has seen
    them, so a pipelined head sitting behind a body is checked like the first one.
    """

    def __init__(self, stream: anyio.abc.ByteStream, peer: str) -> None:
        self.stream = stream
        self.peer = peer
        self.h11 = _new_h11()
        self.pending = bytearray()
        self.eof = False
        self.linger = False  # an error was answered: half-close and drain before closing
        # the last bytes given to h11 (a few before the latest piece, and that piece), to see
        # how a chunked body really ended
        self.fed_before = b""
        self.fed_last = b""
        self.busy = False
        self.scope: anyio.CancelScope | None = None
        # time.monotonic() past which the reaper cancels `scope` (closing the connection)
        self.deadline = math.inf

    async def send(self, *events: h11.Event, limit_s: float) -> None:
        """Send events in one write (head, body and end of a small response go together);
        a write still blocked after `limit_s` closes the connection (the reaper)."""
        data = b"".join(self.h11.send(event) or b"" for event in events)
        if data:
            self.deadline = time.monotonic() + limit_s
            try:
                await self.stream.send(data)
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise _ClientGone() from exc
            finally:
                self.deadline = math.inf

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                data = await self.stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                    OSError):
                data = b""
            self.feed(data)

    def feed(self, data: bytes) -> None:
        self.fed_before = (self.fed_before + self.fed_last[-CHUNKED_END_BYTES:])[
            -CHUNKED_END_BYTES:]
        self.fed_last = data
        self.h11.receive_data(data)

    def check_chunked_end(self) -> None:
        """h11 takes a bare LF for the blank line that ends a chunked body (``0\r\n\n``):
        a front end that does not would read what follows as part of this request while we
        run it as the next one. The bytes h11 consumed must end with CRLF CRLF."""
        remaining = len(self.h11.trailing_data[0])
        consumed = self.fed_before + self.fed_last[:len(self.fed_last) - remaining]
        if not consumed.endswith(b"\r\n\r\n"):
            raise _bad_http("chunked body not ended by CRLF CRLF")


def _new_h11() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)


def _bad_http(message: str) -> h11.RemoteProtocolError:
    return h11.RemoteProtocolError(message, error_status_hint=400)


def _head_end(buf: bytearray, scanned: int = 0) -> int | None:
    """Where the header block in `buf` ends (after its CRLF CRLF), or None if not yet.

    Raises 431 past `MAX_HEADER_BYTES` and 400 at a bare LF, which h11 would take for a line
    end (RFC 9112 §2.2: a front end that disagrees about line ends is a smuggling vector).
    Leading empty lines are dropped (§2.2: a server SHOULD ignore at least one).
    `scanned`: how much of `buf` an earlier call already searched (a head that trickles in
    is scanned once, not once per read)."""
    if scanned < MAX_LEADING_CRLF + 4:  # the start may still be moving: scan it all
        scanned = 0
        skip = 0
        while len(buf) >= skip + 2 and buf[skip:skip + 2] == b"\r\n" and skip < MAX_LEADING_CRLF:
            skip += 2
        if skip:
            del buf[:skip]
    end = buf.find(b"\r\n\r\n", max(0, scanned - 3), MAX_HEADER_BYTES)
    scan = len(buf) if end < 0 else end + 4
    lf = buf.find(b"\n", scanned, scan)
    while lf >= 0:
        if lf == 0 or buf[lf - 1] != 0x0D:
            raise _bad_http("bare LF in the request head")
        lf = buf.find(b"\n", lf + 1, scan)
    if end < 0:
        if len(buf) >= MAX_HEADER_BYTES:
            raise h11.RemoteProtocolError("header block too large", error_status_hint=431)
        return None
    return end + 4


def _check_head(head: bytes) -> None:
    """Refuse what h11 tolerates but RFC 9112 does not let a server accept: a bare CR,
    obs-fold (§5.2), whitespace before a field's colon (§5.1), and Content-Length together
    with Transfer-Encoding (§6.3: "ought to be handled as an error"; h11 lets TE win, so a
    front end that framed by Content-Length would see a different second request), two Host
    fields (§3.2) and Transfer-Encoding in HTTP/1.0 (§6.1)."""
    lines = head[:-4].split(b"\r\n")
    framing: set[bytes] = set()
    hosts = 0
    for number, line in enumerate(lines):
        if b"\r" in line:
            raise _bad_http("bare CR in the request head")
        if number == 0:
            continue
        if line[:1] in (b" ", b"\t"):
            raise _bad_http("obsolete line folding in the request head")
        name, colon, _value = line.partition(b":")
        if not colon or name != name.strip():
            raise _bad_http("malformed header field")
        lname = name.lower()
        if lname in (b"content-length", b"transfer-encoding"):
            framing.add(lname)
        hosts += lname == b"host"
    if len(framing) == 2:
        raise _bad_http("both Content-Length and Transfer-Encoding")
    if hosts > 1:  # §3.2: more than one Host field MUST be answered 400
        raise _bad_http("more than one Host header")
    if b"transfer-encoding" in framing and lines[0].endswith(b" HTTP/1.0"):
        raise _bad_http("Transfer-Encoding in an HTTP/1.0 request")  # §6.1: faulty framing


async def _linger(stream: anyio.abc.ByteStream) -> None:
    """Half-close, then discard what the client still sends until it closes, within
    `LINGER_MAX_BYTES` and `LINGER_TIMEOUT_S` (see there)."""
    drained = 0
    with anyio.move_on_after(LINGER_TIMEOUT_S):
        try:
            await stream.send_eof()
            while drained < LINGER_MAX_BYTES:
                drained += len(await stream.receive(READ_SIZE))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError):
            pass


def _new_request_id() -> str:
    return os.urandom(16).hex()


def _request_id(headers: list[tuple[str, str]]) -> str:
    for name, value in headers:
        if name == "x-request-id" and _REQUEST_ID_OK.match(value):
            return value
    return _new_request_id()


async def listen(host: str, port: int, *,
                 reuse_port: bool = False) -> anyio.abc.Listener[anyio.abc.SocketStream]:
    return await anyio.create_tcp_listener(local_host=host, local_port=port, backlog=1024,
                                           reuse_port=reuse_port)


class Server:
    def __init__(self, app: App, options: ServerOptions) -> None:
        self.app = app
        self.options = options
        self.port = 0
        self._conns: set[_Conn] = set()
        self._accept_scope: anyio.CancelScope | None = None
        self._access_log = logging.getLogger(options.access_log)
        self._stopping = False
        self._drained: anyio.Event | None = None
        self._reap_interval = max(0.05, min(1.0, options.keepalive_timeout / 4,
                                            options.write_timeout / 4))

    # ---- lifecycle -------------------------------------------------------------------
    async def serve(
        self,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until `shutdown`. `reuse_port` (SO_REUSEPORT, Linux/BSD) lets
        several worker processes listen on one port; the kernel spreads connections over them."""
        listener = await listen(host, port, reuse_port=reuse_port)
        await self.serve_on(listener, task_status=task_status)

    async def serve_on(
        self,
        listener: anyio.abc.Listener[anyio.abc.SocketStream],
        *,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """`serve` on a listener already open (closed when serving ends)."""
        sockname = listener.extra(anyio.abc.SocketAttribute.local_address)
        self.port = int(sockname[1])
        async with anyio.create_task_group() as tg:
            self._accept_scope = anyio.CancelScope()
            task_status.started(self.port)
            with self._accept_scope:
                tg.start_soon(self._reap_forever)
                async with listener:
                    await listener.serve(self._handle_connection, task_group=tg)

    async def _reap_forever(self) -> None:
        """Close connections past their deadline (an idle keep-alive, a blocked write);
        ends once the server is stopping and every connection is gone."""
        while not self._stopping or self._conns:
            await anyio.sleep(self._reap_interval)
            now = time.monotonic()
            for conn in list(self._conns):
                if conn.deadline <= now and conn.scope is not None:
                    conn.scope.cancel()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; close idle connections; give busy ones `grace` seconds."""
        self._stopping = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        for conn in list(self._conns):
            if not conn.busy and conn.scope is not None:
                conn.scope.cancel()
        self._drained = anyio.Event()
        if not any(c.busy for c in self._conns):
            self._drained.set()
        with anyio.move_on_after(grace):
            await self._drained.wait()
        for conn in list(self._conns):
            if conn.scope is not None:
                conn.scope.cancel()

    # ---- one connection --------------------------------------------------------------
    async def _handle_connection(self, stream: anyio.abc.SocketStream) -> None:
        try:
            peer_addr = stream.extra(anyio.abc.SocketAttribute.remote_address)
            peer = f"{peer_addr[0]}:{peer_addr[1]}" if isinstance(peer_addr, tuple) else "?"
        except (OSError, anyio.TypedAttributeLookupError):
            peer = "?"
        conn = _Conn(stream, peer)
        conn.scope = anyio.CancelScope()
        self._conns.add(conn)
        try:
            with conn.scope:
                await self._connection_loop(conn)
        except _ClientGone:
            pass
        finally:
            self._conns.discard(conn)
            if conn.linger and not conn.eof and not self._stopping:
                await _linger(stream)
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _connection_loop(self, conn: _Conn) -> None:
        while not self._stopping:
            # Idle: wait for the first byte of the next request.
            if not conn.pending and not conn.eof:
                got = await self._wait_first_byte(conn)
                if not got:
                    return
            conn.busy = True
            try:
                keep_going = await self._one_request(conn)
            finally:
                conn.busy = False
                if self._drained is not None and not any(c.busy for c in self._conns):
                    self._drained.set()
            if not keep_going:
                return
            if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                return  # MUST_CLOSE (HTTP/1.0, Connection: close) or an unfinished exchange
            data, conn.eof = conn.h11.trailing_data  # the next request's bytes, unchecked
            conn.pending = bytearray(data)
            conn.h11 = _new_h11()

    async def _wait_first_byte(self, conn: _Conn) -> bool:
        """Wait for the next request; an idle connection is closed by the reaper."""
        conn.deadline = time.monotonic() + self.options.keepalive_timeout
        try:
            data = await conn.stream.receive(READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError):
            return False
        finally:
            conn.deadline = math.inf
        conn.pending += data
        return True

    async def _read_head(self, conn: _Conn) -> h11.Request | None:
        """The next request head: checked raw (`_head_end`, `_check_head`), then parsed by a
        fresh h11 state machine that also gets whatever followed it."""
        end = _head_end(conn.pending)  # usually complete already: no timer needed
        if end is None:
            with anyio.move_on_after(self.options.header_timeout) as scope:
                end = await self._receive_head(conn)
            if scope.cancelled_caught:
                raise RequestTimeout("Request headers not received in time",
                                     code="header_timeout")
        if end is None:
            return None  # closed before a complete head: nothing to answer
        _check_head(bytes(conn.pending[:end]))
        conn.feed(bytes(conn.pending))
        conn.pending.clear()
        if conn.eof:
            conn.h11.receive_data(b"")
        event = conn.h11.next_event()
        if isinstance(event, h11.Request):
            return event
        return None

    async def _receive_head(self, conn: _Conn) -> int | None:
        while not conn.eof:
            try:
                data = await conn.stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                    OSError):
                data = b""
            if not data:
                conn.eof = True
                break
            scanned = len(conn.pending)
            conn.pending += data
            end = _head_end(conn.pending, scanned)
            if end is not None:
                return end
        return None

    async def _read_body(self, conn: _Conn, head: h11.Request) -> bytes:
        limit = self.options.max_body_bytes
        chunked = False
        for name, value in head.headers:
            chunked = chunked or name == b"transfer-encoding"
            if name == b"content-length" and int(value) > limit:
                raise PayloadTooLarge(
                    f"Request body exceeds {limit} bytes", details={"max_body_bytes": limit}
                )
        if conn.h11.they_are_waiting_for_100_continue:
            await conn.send(h11.InformationalResponse(status_code=100, headers=[]),
                            limit_s=self.options.write_timeout)
        chunks: list[bytes] = []
        size = 0
        started = time.monotonic()
        while True:
            event = conn.h11.next_event()
            if event is h11.NEED_DATA:
                with anyio.move_on_after(self.options.body_timeout) as scope:
                    event = await conn.next_event()
                if scope.cancelled_caught:
                    raise RequestTimeout("Request body not received in time",
                                         code="body_timeout")
                # A body trickled a byte at a time never trips the per-read timer: past the
                # first `body_timeout` seconds it must keep a minimum average rate.
                elapsed = time.monotonic() - started
                if elapsed > self.options.body_timeout and size < MIN_BODY_RATE * elapsed:
                    raise RequestTimeout("Request body arriving too slowly", code="body_timeout")
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise PayloadTooLarge(
                        f"Request body exceeds {limit} bytes", details={"max_body_bytes": limit}
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                if chunked:
                    conn.check_chunked_end()
                return b"".join(chunks)
            else:
                raise _ClientGone()

    async def _one_request(self, conn: _Conn) -> bool:
        """Serve one request on `conn`. Returns False when the connection must close."""
        started = time.perf_counter()
        request_id = ""  # the client's X-Request-ID or a new one, once the head is read
        method, path = "-", "-"
        status = 0
        try:
            head = await self._read_head(conn)
            if head is None:
                return False
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers]
            request_id = _request_id(headers)
            if head.http_version not in (b"1.0", b"1.1"):
                raise h11.RemoteProtocolError("unsupported HTTP version", error_status_hint=400)
            method = head.method.decode("ascii", "replace")
            target = head.target.decode("latin-1")
            path = target.partition("?")[0]
            body = await self._read_body(conn, head)
            request = Request(method, target, tuple(headers), body, request_id, conn.peer)
            status = await self._respond(conn, request)
            return True
        except h11.RemoteProtocolError as exc:
            hint = exc.error_status_hint
            err: ApiError = (
                HeadersTooLarge("Request header block too large")
                if hint == 431
                else InvalidRequest(f"Malformed HTTP request: {exc}", code="bad_http")
            )
            request_id = request_id or _new_request_id()
            status = await self._send_error(conn, err, request_id)
            return False
        except (RequestTimeout, PayloadTooLarge) as exc:
            request_id = request_id or _new_request_id()
            status = await self._send_error(conn, exc, request_id)
            return False
        except _ClientGone:
            raise
        except Exception:  # the one error barrier: 500 if nothing was sent, else close
            request_id = request_id or _new_request_id()
            log.exception("unhandled error in request %s", request_id)
            err = InternalError("Internal server error; quote the request id to the operator")
            status = await self._send_error(conn, err, request_id) or 500
            return False
        finally:
            if status:
                elapsed = time.perf_counter() - started
                self._access_log.info(
                    "%s %s %s %s %d %.1fms", request_id, conn.peer, method, path, status,
                    elapsed * 1000,
                )
                if self.options.observer is not None:
                    self.options.observer(method, path, status, elapsed)

    async def _send_error(self, conn: _Conn, err: ApiError, request_id: str) -> int:
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return 0
        status, headers, body = render(err, request_id)
        headers = [*headers, ("connection", "close")]
        response = Response(status, headers, body)
        self._common_headers(response, request_id, None)
        try:
            await self._send_plain(conn, response, head_only=False)
        except (_ClientGone, h11.LocalProtocolError):
            return 0
        conn.linger = True  # the request may not have been read to its end
        return status

    # ---- responses -------------------------------------------------------------------
    async def _respond(self, conn: _Conn, request: Request) -> int:
        origin = request.header("origin")
        if request.method == "OPTIONS" and request.header("access-control-request-method"):
            response = Response(204, self._preflight_headers(
                origin, request.header("access-control-request-headers") or ""))
        else:
            try:
                _check_version(request)
                response = await self.app(request)
            except ApiError as exc:
                status, headers, body = render(exc, request.request_id)
                response = Response(status, headers, body)
        self._common_headers(response, request.request_id, origin)
        if self._stopping:
            response.headers.append(("connection", "close"))
        head_only = request.method == "HEAD"
        if response.stream is None:
            self._maybe_gzip(request, response)
            await self._send_plain(conn, response, head_only)
        else:
            await self._send_stream(conn, response, head_only)
        return response.status

    def _common_headers(self, response: Response, request_id: str, origin: str | None) -> None:
        response.headers.append(("x-routstr-request-id", request_id))
        response.headers.append(("x-routstr-version", API_VERSION))
        allowed = self._allowed_origin(origin)
        if allowed:
            response.headers.append(("access-control-allow-origin", allowed))
            response.headers.append(("access-control-expose-headers", EXPOSED_HEADERS))
            if allowed != "*":
                response.headers.append(("vary", "Origin"))

    def _allowed_origin(self, origin: str | None) -> str | None:
        if origin is None:
            return None
        if "*" in self.options.cors_origins:
            return "*"
        return origin if origin in self.options.cors_origins else None

    def _preflight_headers(self, origin: str | None, requested: str) -> list[tuple[str, str]]:
        """For an allowed origin: our request headers, and whatever other header names the
        browser asks for (an SDK's own, e.g. x-stainless-*), so a browser client is never
        refused for a header we would ignore anyway."""
        allowed = self._allowed_origin(origin)
        if not allowed:
            return []
        extra = [h for h in (x.strip() for x in requested[:MAX_REQUESTED_HEADERS_CHARS]
                             .split(",")) if _HEADER_NAME.fullmatch(h)]
        return [
            ("access-control-allow-methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS"),
            ("access-control-allow-headers", ", ".join([CORS_ALLOW_HEADERS, *extra])),
            ("access-control-max-age", "86400"),
            ("vary", "Access-Control-Request-Headers"),
        ]

    def _maybe_gzip(self, request: Request, response: Response) -> None:
        if len(response.body) <= GZIP_MIN_BYTES or response.header("content-encoding"):
            return
        accept = request.header("accept-encoding") or ""
        if not any(p.strip().split(";")[0] == "gzip" and not p.strip().endswith("q=0")
                   for p in accept.split(",")):
            return
        ctype = response.header("content-type") or ""
        if not _COMPRESSIBLE.match(ctype):
            return
        response.body = gzip.compress(response.body, compresslevel=5, mtime=0)
        response.headers.append(("content-encoding", "gzip"))
        response.headers.append(("vary", "Accept-Encoding"))

    @staticmethod
    def _encode_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers
                if k.lower() not in ("content-length", "transfer-encoding")]

    async def _send_plain(self, conn: _Conn, response: Response, head_only: bool) -> None:
        headers = self._encode_headers(response.headers)
        if response.status not in (204, 304) and not 100 <= response.status < 200 \
                and not (response.chunked and response.body):  # h11 frames it chunked
            headers.append((b"content-length", str(len(response.body)).encode()))
        events: list[h11.Event] = [h11.Response(status_code=response.status, headers=headers,
                                                reason=_reason(response.status))]
        if response.body and not head_only and response.status not in (204, 304):
            events.append(h11.Data(data=response.body))
        events.append(h11.EndOfMessage())
        await conn.send(*events, limit_s=self.options.write_timeout)

    async def _send_stream(self, conn: _Conn, response: Response, head_only: bool) -> None:
        stream = response.stream
        assert stream is not None
        timeout = self.options.write_timeout
        try:
            headers = self._encode_headers(response.headers)
            await conn.send(h11.Response(status_code=response.status, headers=headers,
                                         reason=_reason(response.status)), limit_s=timeout)
            if not head_only:
                async for chunk in stream:
                    if chunk:
                        await conn.send(h11.Data(data=chunk), limit_s=timeout)
            await conn.send(h11.EndOfMessage(), limit_s=timeout)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(STREAM_CLOSE_TIMEOUT):
                await stream.aclose()


def _check_version(request: Request) -> None:
    """A request naming an API version this node does not serve gets 400 with the list."""
    wanted = request.header("x-routstr-version")
    if wanted is None:
        return
    value = wanted.strip().lower()
    if value not in SUPPORTED_VERSIONS and f"v{value}" not in SUPPORTED_VERSIONS:
        raise InvalidRequest(
            f"Unsupported API version {wanted.strip()!r}; supported: "
            + ", ".join(SUPPORTED_VERSIONS),
            code="unsupported_version",
            details={"requested": wanted.strip(), "supported": list(SUPPORTED_VERSIONS)})


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def retry_after_seconds(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
