"""Hostile HTTP/1.1 peers (issue 16): request smuggling and sloppy framing at the server
(RFC 9112 §2.2, §5.2, §6.3), early error answers that must reach a client that writes its
whole body first, and an upstream that leaves bytes behind on a pooled connection.

The server runs in-process with a recording app (every request it ran is listed), so a test
can show that a smuggled request never ran; clients are raw sockets or Python's urllib.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.from_thread
import pytest

from routstr.client import HttpClient
from routstr.messages import Request, Response, json_response
from routstr.server import (
    LINGER_MAX_BYTES,
    LINGER_TIMEOUT_S,
    MAX_HEADER_BYTES,
    Server,
    ServerOptions,
)
from tests.test_client import RawConn, ok, raw_server
from tests.test_server import Sock, closed, read_response

MAX_BODY = 1000


class RecordingApp:
    """Answers every request with its method, path and body; remembers what it ran."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, request: Request) -> Response:
        self.seen.append((request.method, request.path))
        return json_response({"path": request.path, "len": len(request.body),
                              "body": request.body.decode("latin-1")})


class Running:
    def __init__(self, server: Server, app: RecordingApp) -> None:
        self.server, self.app, self.port = server, app, server.port

    def connect(self, timeout: float = 5.0) -> Sock:
        return Sock(socket.create_connection(("127.0.0.1", self.port), timeout=timeout))


@pytest.fixture
def srv() -> Iterator[Running]:
    app = RecordingApp()
    opts = ServerOptions(max_body_bytes=MAX_BODY, header_timeout=1.0, keepalive_timeout=2.0,
                         body_timeout=1.0, write_timeout=2.0)
    server = Server(app, opts)
    with anyio.from_thread.start_blocking_portal() as portal:
        future, _ = portal.start_task(server.serve, "127.0.0.1", 0)
        yield Running(server, app)
        portal.call(server.shutdown, 1.0)
        future.result(timeout=5)


def _bad_request(s: Sock) -> dict[str, Any]:
    status, _, body = read_response(s)
    assert status == 400, body
    doc: dict[str, Any] = json.loads(body)
    assert doc["error"]["type"] == "invalid_request" and doc["error"]["code"] == "bad_http"
    assert closed(s)
    return doc


# ---- class 12: HTTP/1.1 strictness -----------------------------------------------------------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("head", [
    # CL.TE: a front end that frames by Content-Length forwards all of it as one request
    b"POST /front HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n",
    # TE.CL, header order and case swapped
    b"POST /front HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n",
    # TE listed twice
    b"POST /front HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked, chunked"
    b"\r\n\r\n",
])
def test_content_length_with_transfer_encoding_is_400_and_smuggled_request_never_runs(
        srv: Running, head: bytes) -> None:
    with srv.connect() as s:
        s.sendall(head + b"0\r\n\r\n" + SMUGGLED)
        _bad_request(s)
    assert srv.app.seen == []  # neither the front request nor the smuggled one ran


@pytest.mark.parametrize("raw", [
    b"GET /lf HTTP/1.1\nHost: x\n\n",                       # bare LF everywhere
    b"GET /lf HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n",          # one bare LF inside the block
    b"GET /lf HTTP/1.1\r\nHost: x\r\n\n",                    # the blank line is a bare LF
    b"GET /lf HTTP/1.1\r\nHost: x\rX-A: 1\r\n\r\n",          # a bare CR
    b"GET /fold HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",   # obs-fold (SP)
    b"GET /fold HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\n\r\n",  # obs-fold (HTAB)
    b"GET /ws HTTP/1.1\r\nHost: x\r\nX-A : 1\r\n\r\n",       # whitespace before the colon
    b"GET /hh HTTP/1.1\r\nHost: x\r\nHost: internal\r\n\r\n",  # two Host fields
    b"POST /te HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # TE in 1.0
])
def test_bare_lf_obs_fold_and_other_sloppy_heads_are_400(srv: Running, raw: bytes) -> None:
    with srv.connect() as s:
        s.sendall(raw)
        _bad_request(s)
    assert srv.app.seen == []


def test_pipelined_request_with_bare_lf_after_a_good_one_is_refused(srv: Running) -> None:
    """The second head of a pipeline is checked like the first (it sat in the buffer while
    the first was served)."""
    with srv.connect() as s:
        s.sendall(b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                  b"GET /two HTTP/1.1\nHost: x\n\n")
        status, _, body = read_response(s)
        assert status == 200 and json.loads(body)["body"] == "abc"
        _bad_request(s)
    assert srv.app.seen == [("POST", "/one")]


def _head_of(size: int) -> bytes:
    start = b"GET /big HTTP/1.1\r\nHost: x\r\n"
    filler = b""
    n = 0
    while len(start) + len(filler) + 2 < size:
        room = size - len(start) - len(filler) - 2
        line = b"X-F%d: " % n
        value = b"a" * max(0, min(1000, room - len(line) - 2))
        filler += line + value + b"\r\n"
        n += 1
    head = start + filler + b"\r\n"
    assert len(head) >= size
    return head


@pytest.mark.parametrize("size", [MAX_HEADER_BYTES + 100, 100 * 1024, 127 * 1024])
def test_header_block_over_the_documented_limit_is_431(srv: Running, size: int) -> None:
    with srv.connect() as s:
        try:
            s.sendall(_head_of(size))  # at once: two 64 KiB reads must not double the limit
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = read_response(s)
        assert status == 431 and json.loads(body)["error"]["code"] == "headers_too_large"
    assert srv.app.seen == []


def test_header_block_just_under_the_limit_is_served(srv: Running) -> None:
    head = _head_of(MAX_HEADER_BYTES - 1200)
    assert len(head) <= MAX_HEADER_BYTES
    with srv.connect() as s:
        s.sendall(head)
        status, _, _ = read_response(s)
        assert status == 200
    assert srv.app.seen == [("GET", "/big")]


@pytest.mark.parametrize("body", [
    b"5\r\nhelloXX0\r\n\r\n",      # chunk data longer than its size line (h11: LocalProtocolError)
    b"zz\r\nhello\r\n0\r\n\r\n",   # chunk size not hex
])
def test_malformed_chunked_body_is_400_not_500(srv: Running, body: bytes) -> None:
    with srv.connect() as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        _bad_request(s)
    assert srv.app.seen == []


def test_well_formed_requests_still_pipeline(srv: Running) -> None:
    """The checks see each head once: keep-alive, pipelining and chunked uploads still work."""
    with srv.connect() as s:
        s.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n0\r\n\r\n"
                  b"\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        assert json.loads(read_response(s)[2])["body"] == "abc"
        assert json.loads(read_response(s)[2])["body"] == "hi"
        for cut in (5, 20, 40):  # a head split across reads
            req = b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nz"
            s.sendall(req[:cut])
            time.sleep(0.01)
            s.sendall(req[cut:])
            assert read_response(s)[0] == 200
    assert [p for _, p in srv.app.seen] == ["/a", "/b", "/c", "/c", "/c"]


# ---- class 14: an early error answer reaches a client that writes its whole body first ------

OVER_LIMIT_BYTES = 8 * 1024 * 1024  # beyond what loopback socket buffers absorb (4 MiB wmem)


def _urllib_post(port: int, body: bytes, headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/echo", data=body, method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)  # noqa: S310 - loopback test server
    return info.value


def test_urllib_posting_an_over_limit_body_receives_the_413(srv: Running) -> None:
    """urllib sends the whole body before it reads: without a lingering close the server's
    close with unread bytes resets the connection and the 413 is lost."""
    err = _urllib_post(srv.port, b"x" * OVER_LIMIT_BYTES)
    assert err.code == 413
    doc = json.loads(err.read())
    assert doc["error"]["type"] == "invalid_request"
    assert doc["error"]["code"] == "payload_too_large"
    assert doc["error"]["details"] == {"max_body_bytes": MAX_BODY}
    assert doc["request_id"] == err.headers["x-routstr-request-id"]
    assert srv.app.seen == []


def test_chunked_over_limit_body_written_in_full_receives_the_413(srv: Running) -> None:
    """The same for a body that only turns out too large while it is read (chunked)."""
    with srv.connect(timeout=10) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (64 * 1024, b"a" * 64 * 1024)
        for _ in range(OVER_LIMIT_BYTES // len(piece)):
            s.sendall(piece)
        s.sendall(b"0\r\n\r\n")
        status, _, body = read_response(s)
        assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
        assert closed(s)


def test_malformed_head_followed_by_a_large_body_still_gets_its_400(srv: Running) -> None:
    """Any error answered before the body was read is lingered on, not only 413."""
    with srv.connect(timeout=10) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n%s" % (OVER_LIMIT_BYTES,
                                                                b"y" * OVER_LIMIT_BYTES))
        _bad_request(s)


def test_lingering_is_bounded_in_bytes(srv: Running) -> None:
    """A client that never stops sending is cut off once LINGER_MAX_BYTES were discarded —
    long before LINGER_TIMEOUT_S on loopback."""
    with srv.connect(timeout=2) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        sent = 0
        t0 = time.monotonic()
        with pytest.raises(OSError):  # reset (or a broken pipe) once the server gives up
            while time.monotonic() - t0 < LINGER_TIMEOUT_S + 5:
                s.sock.sendall(b"z" * 65536)
                sent += 65536
        assert time.monotonic() - t0 < LINGER_TIMEOUT_S
        assert sent >= LINGER_MAX_BYTES


def test_lingering_is_bounded_in_time(srv: Running) -> None:
    """A client that trickles bytes after the error and never closes is dropped after
    LINGER_TIMEOUT_S."""
    with srv.connect(timeout=1) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        status, _, _ = read_response(s)
        assert status == 413
        t0 = time.monotonic()
        with pytest.raises(OSError):
            while time.monotonic() - t0 < LINGER_TIMEOUT_S + 3:
                s.sock.sendall(b"z")
                time.sleep(0.2)
        assert LINGER_TIMEOUT_S - 0.5 < time.monotonic() - t0 < LINGER_TIMEOUT_S + 3


# ---- class 13: the upstream pool never hands one exchange's leftover bytes to the next ------

BOGUS = ok(b'{"leaked": "the previous user\'s answer"}')


async def _half_close(conn: RawConn) -> None:
    await conn.stream.send_eof()


LEFTOVERS: dict[str, tuple[str, list[bytes | None]]] = {
    # name: (first method, what the upstream sends on connection 1; None = half-close)
    "more_than_content_length": ("GET", [ok(b"first") + BOGUS]),
    "body_after_a_head_response": ("HEAD", [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
                                            + BOGUS]),
    "bytes_after_the_last_chunk": ("GET", [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
                                           b"\r\n5\r\nfirst\r\n0\r\n\r\n" + BOGUS]),
    "after_a_1xx_and_the_response": ("GET", [b"HTTP/1.1 100 Continue\r\n\r\n"
                                             + ok(b"first") + BOGUS]),
    "a_moment_after_the_response": ("GET", [ok(b"first"), b"", BOGUS]),  # b"": pause
    "half_closed_after_the_response": ("GET", [ok(b"first"), None]),
}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("case", sorted(LEFTOVERS))
async def test_pooled_connection_with_leftover_bytes_is_never_reused(case: str) -> None:
    """A scripted upstream answers the first request and leaves bytes (a second, bogus
    response) or an EOF behind on that connection. The next request — another user's — must
    go out on a fresh connection and get its own answer, never the leftover."""
    first_method, script = LEFTOVERS[case]

    async def handler(conn: RawConn, index: int) -> None:
        if index == 1:
            await conn.read_request()
            for part in script:
                if part is None:
                    await _half_close(conn)
                elif part:
                    await conn.send(part)
                else:
                    await anyio.sleep(0.05)
            while await conn.read_request() is not None:
                pass  # a request that arrives here anyway is never answered
            return
        while await conn.read_request() is not None:
            await conn.send(ok(b"true answer on connection %d" % index))

    async with raw_server(handler) as (port, count), HttpClient(read_timeout=3) as client:
        url = f"http://127.0.0.1:{port}/"
        status, _, body = await client.fetch(first_method, url)
        assert status == 200 and body == (b"" if first_method == "HEAD" else b"first")
        await anyio.sleep(0.2)  # the late bytes (and the EOF) have arrived by now
        status, _, body = await client.fetch("GET", url)
        assert (status, body) == (200, b"true answer on connection 2")
        assert count[0] == 2
        status, _, body = await client.fetch("GET", url)  # the fresh one is pooled as usual
        assert (status, body) == (200, b"true answer on connection 2")
        assert count[0] == 2


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_oversize_upstream_response_head_is_a_protocol_error() -> None:
    """The response-head bound holds however the head is split into reads (h11 alone lets
    about twice MAX_RESPONSE_HEAD_BYTES through)."""
    from routstr.client import MAX_RESPONSE_HEAD_BYTES, UpstreamProtocolError

    async def handler(conn: RawConn, index: int) -> None:
        await conn.read_request()
        fields = b"".join(b"x-f%d: %s\r\n" % (n, b"a" * 1000)
                          for n in range(MAX_RESPONSE_HEAD_BYTES * 3 // 2 // 1000))
        await conn.send(b"HTTP/1.1 200 OK\r\n" + fields + b"content-length: 0\r\n\r\n")

    async with raw_server(handler) as (port, _count), HttpClient(read_timeout=3) as client:
        with pytest.raises(UpstreamProtocolError):
            await client.fetch("GET", f"http://127.0.0.1:{port}/")


@pytest.mark.parametrize("end", [b"0\r\n\n", b"0\r\nX-T: 1\n\n"])
def test_chunked_body_ended_by_a_bare_lf_is_400_and_what_follows_never_runs(
        srv: Running, end: bytes) -> None:
    """h11 takes a bare LF as the blank line after the last chunk; a front end that does not
    would forward what follows as part of this request — and we would run it as the next."""
    with srv.connect() as s:
        s.sendall(b"POST /front HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n" + end + SMUGGLED)
        _bad_request(s)
    assert srv.app.seen == []


def test_chunked_trailers_and_a_terminator_split_byte_by_byte_are_accepted(srv: Running) -> None:
    with srv.connect() as s:
        s.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\n")
        assert json.loads(read_response(s)[2])["body"] == "abc"
        s.sendall(b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        for byte in b"0\r\n\r\n":
            time.sleep(0.005)
            s.sendall(bytes([byte]))
        assert json.loads(read_response(s)[2])["body"] == "hi"
    assert [p for _, p in srv.app.seen] == ["/a", "/b"]
