"""Protocol edges of routstr.server over raw sockets on 127.0.0.1.

The server runs in-process (its own event loop in a thread, via an anyio blocking portal)
with a small test app, so each edge can be provoked byte by byte.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.from_thread
import pytest

from routstr.errors import InvalidRequest
from routstr.messages import Request, Response, json_response
from routstr.router import Route, Router
from routstr.server import Server, ServerOptions

BIG = {"items": ["x" * 40] * 100}


class FloodStream:
    """Yields 64 KiB chunks as fast as the connection takes them."""

    def __init__(self, pieces: int) -> None:
        self.pieces = pieces
        self.closed = threading.Event()
        self.sent = 0

    async def _gen(self) -> AsyncIterator[bytes]:
        for _ in range(self.pieces):
            self.sent += 1
            yield b"x" * 65536

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._gen()

    async def aclose(self) -> None:
        self.closed.set()


class SlowStream:
    def __init__(self, pieces: int, delay: float) -> None:
        self.pieces, self.delay = pieces, delay
        self.closed = threading.Event()
        self.sent = 0

    async def _gen(self) -> AsyncIterator[bytes]:
        for i in range(self.pieces):
            self.sent += 1
            yield f"data: {i}\n\n".encode()
            await anyio.sleep(self.delay)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._gen()

    async def aclose(self) -> None:
        self.closed.set()


class App:
    def __init__(self) -> None:
        self.streams: list[SlowStream] = []
        self.floods: list[FloodStream] = []
        self.router = Router([
            Route("POST", "/echo", self.echo),
            Route("GET", "/big", self.big),
            Route("GET", "/boom", self.boom),
            Route("GET", "/bad", self.bad),
            Route("GET", "/slow", self.slow),
            Route("GET", "/stream", self.stream),
            Route("GET", "/flood", self.flood),
            Route("GET", "/items/{item_id}", self.item),
        ])

    async def __call__(self, request: Request) -> Response:
        handler, params = self.router.resolve(request.method, request.path)
        return await handler(request, params)

    async def echo(self, request: Request, params: dict[str, str]) -> Response:
        return json_response({"len": len(request.body), "body": request.body.decode("latin-1"),
                              "id": request.request_id})

    async def big(self, request: Request, params: dict[str, str]) -> Response:
        return json_response(BIG)

    async def boom(self, request: Request, params: dict[str, str]) -> Response:
        raise RuntimeError("secret internals")

    async def bad(self, request: Request, params: dict[str, str]) -> Response:
        raise InvalidRequest("nope", code="bad_thing", details={"x": 1})

    async def slow(self, request: Request, params: dict[str, str]) -> Response:
        await anyio.sleep(float(request.query("s") or "1"))
        return json_response({"slept": True})

    async def stream(self, request: Request, params: dict[str, str]) -> Response:
        s = SlowStream(int(request.query("n") or "5"), float(request.query("d") or "0.05"))
        self.streams.append(s)
        return Response(200, [("content-type", "text/event-stream")], stream=s)

    async def flood(self, request: Request, params: dict[str, str]) -> Response:
        s = FloodStream(int(request.query("n") or "4000"))
        self.floods.append(s)
        return Response(200, [("content-type", "application/octet-stream")], stream=s)

    async def item(self, request: Request, params: dict[str, str]) -> Response:
        return json_response(params)


class Running:
    def __init__(self, server: Server, portal: Any, app: App) -> None:
        self.server, self.portal, self.app = server, portal, app
        self.port = server.port

    def connect(self, timeout: float = 5.0) -> Sock:
        return Sock(socket.create_connection(("127.0.0.1", self.port), timeout=timeout))


class Sock:
    """A blocking client socket with a read buffer (pipelined responses share reads)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        if self.buf:
            data, self.buf = self.buf, b""
            return data
        return self.sock.recv(n)

    def settimeout(self, t: float) -> None:
        self.sock.settimeout(t)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Sock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def srv() -> Iterator[Running]:
    app = App()
    opts = ServerOptions(max_body_bytes=1000, header_timeout=0.5, keepalive_timeout=1.0,
                         body_timeout=1.0, write_timeout=1.0,
                         cors_origins=("https://good.example",))
    server = Server(app, opts)
    with anyio.from_thread.start_blocking_portal() as portal:
        future, _ = portal.start_task(server.serve, "127.0.0.1", 0)
        yield Running(server, portal, app)
        portal.call(server.shutdown, 1.0)
        future.result(timeout=5)


def read_response(sock: Sock) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (Content-Length or chunked) from a blocking socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before headers: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if status in (100, 204, 304):
        sock.buf = rest + sock.buf
        return status, headers, b""
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        sock.buf = rest[n:] + sock.buf
        return status, headers, rest[:n]
    body = b""
    while True:
        while b"\r\n" not in rest:
            rest += sock.recv(65536)
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        while len(rest) < size + 2:
            rest += sock.recv(65536)
        body += rest[:size]
        rest = rest[size + 2:]
        if size == 0:
            sock.buf = rest + sock.buf
            return status, headers, body


def closed(sock: Sock, timeout: float = 3.0) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


ECHO = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"


def test_split_at_every_byte(srv: Running) -> None:
    for cut in range(1, len(ECHO)):
        with srv.connect() as s:
            s.sendall(ECHO[:cut])
            time.sleep(0.002)
            s.sendall(ECHO[cut:])
            status, _, body = read_response(s)
            assert status == 200, cut
            assert json.loads(body)["body"] == "hello"


def test_pipelined_and_keepalive(srv: Running) -> None:
    with srv.connect() as s:
        s.sendall(ECHO + ECHO.replace(b"hello", b"world") + b"GET /items/42 HTTP/1.1\r\nHost: x\r\n\r\n")
        bodies = []
        for _ in range(3):
            status, _, body = read_response(s)
            assert status == 200
            bodies.append(json.loads(body))
        assert [b.get("body") for b in bodies[:2]] == ["hello", "world"]
        assert bodies[2] == {"item_id": "42"}
        # the same connection is reused afterwards
        s.sendall(ECHO)
        assert read_response(s)[0] == 200


def test_chunked_upload(srv: Running) -> None:
    with srv.connect() as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        status, _, body = read_response(s)
        assert status == 200 and json.loads(body)["body"] == "abcdefg"


def test_expect_100_continue(srv: Running) -> None:
    with srv.connect() as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        status, _, _ = read_response(s)
        assert status == 100
        s.sendall(b"abc")
        status, _, body = read_response(s)
        assert status == 200 and json.loads(body)["body"] == "abc"


def test_oversize_body_declared_gets_413_without_upload(srv: Running) -> None:
    with srv.connect() as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        status, headers, body = read_response(s)
        assert status == 413
        err = json.loads(body)["error"]
        assert err["type"] == "invalid_request" and err["code"] == "payload_too_large"
        assert closed(s)


def test_oversize_chunked_body_gets_413(srv: Running) -> None:
    with srv.connect() as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            s.sendall(b"190\r\n" + b"a" * 400 + b"\r\n")
        status, _, _ = read_response(s)
        assert status == 413
        assert closed(s)


def test_oversize_headers_431(srv: Running) -> None:
    with srv.connect() as s:
        s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(100):
                s.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = read_response(s)
        assert status == 431
        assert json.loads(body)["error"]["code"] == "headers_too_large"


@pytest.mark.parametrize("garbage", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                                     b"GET / HTTP/9.9\r\n\r\n", b"NOT A REQUEST\r\n\r\n",
                                     b"POST /echo HTTP/1.1\r\nContent-Length: x\r\n\r\n"])
def test_garbage_gets_400_and_close(srv: Running, garbage: bytes) -> None:
    with srv.connect() as s:
        s.sendall(garbage)
        status, _, body = read_response(s)
        assert status == 400
        assert json.loads(body)["error"]["type"] == "invalid_request"
        assert closed(s)


def test_slowloris_gets_408_and_others_are_served(srv: Running) -> None:
    slow = srv.connect()
    slow.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    t0 = time.monotonic()
    with srv.connect() as other:  # meanwhile another client is served at once
        other.sendall(ECHO)
        assert read_response(other)[0] == 200
    assert time.monotonic() - t0 < 0.4
    status, _, body = read_response(slow)
    assert status == 408
    assert json.loads(body)["error"]["code"] == "header_timeout"
    assert closed(slow)
    slow.close()


def test_trickled_body_gets_408(srv: Running) -> None:
    """A body sent a byte at a time (each read well within the per-read timer) is cut once it
    falls below the minimum average rate."""
    with srv.connect() as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        t0 = time.monotonic()
        status = 0
        for _ in range(40):  # bounded: 40 × 0.1 s
            try:
                s.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
            s.settimeout(0.01)
            try:
                data = s.sock.recv(65536, socket.MSG_PEEK)
            except (TimeoutError, BlockingIOError):
                continue
            if data:
                break
        s.settimeout(3)
        status, _, body = read_response(s)
        assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout"
        assert time.monotonic() - t0 < 3.5


def test_idle_keepalive_closed(srv: Running) -> None:
    with srv.connect() as s:
        s.sendall(ECHO)
        assert read_response(s)[0] == 200
        t0 = time.monotonic()
        assert closed(s, timeout=3)
        assert 0.8 < time.monotonic() - t0 < 2.5


def test_client_that_stops_reading_is_dropped_after_write_timeout(srv: Running) -> None:
    """A write blocked for `write_timeout` closes the connection and the response stream."""
    with srv.connect() as s:
        s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
        t0 = time.monotonic()
        deadline = t0 + 10
        while not srv.app.floods and time.monotonic() < deadline:
            time.sleep(0.01)
        flood = srv.app.floods[-1]
        assert flood.closed.wait(8), "the blocked stream must be closed"
        assert 1.0 <= time.monotonic() - t0 < 8
        assert flood.sent < flood.pieces  # it was cut off, not drained


def test_unexpected_exception_is_500_without_internals(srv: Running) -> None:
    with srv.connect() as s:
        s.sendall(b"GET /boom HTTP/1.1\r\nHost: x\r\nX-Request-ID: my-req-1\r\n\r\n")
        status, headers, body = read_response(s)
        assert status == 500
        assert b"secret internals" not in body
        doc = json.loads(body)
        assert doc["error"]["type"] == "internal_error"
        assert doc["request_id"] == "my-req-1" == headers["x-routstr-request-id"]
    with srv.connect() as s:  # the server still serves
        s.sendall(ECHO)
        assert read_response(s)[0] == 200


def test_api_error_shape_and_404_405(srv: Running) -> None:
    with srv.connect() as s:
        s.sendall(b"GET /bad HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(s)
        assert status == 400
        assert json.loads(body)["error"] == {"type": "invalid_request", "message": "nope",
                                             "code": "bad_thing", "details": {"x": 1}}
        assert headers["x-routstr-version"] == "v1" and headers["x-routstr-request-id"]
        s.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_response(s)
        assert status == 404 and json.loads(body)["error"]["type"] == "not_found"
        s.sendall(b"DELETE /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(s)
        assert status == 405 and "POST" in headers["allow"]


def test_gzip_only_when_accepted_and_large(srv: Running) -> None:
    with srv.connect() as s:
        s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip, br\r\n\r\n")
        status, headers, body = read_response(s)
        assert headers.get("content-encoding") == "gzip"
        assert json.loads(gzip.decompress(body)) == BIG
        s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(s)
        assert "content-encoding" not in headers and json.loads(body) == BIG
        s.sendall(b"GET /items/1 HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
        status, headers, body = read_response(s)
        assert "content-encoding" not in headers  # small bodies are not compressed
        s.sendall(b"GET /stream?n=30&d=0 HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
        status, headers, body = read_response(s)
        assert "content-encoding" not in headers and body.count(b"data:") == 30


def test_cors_preflight_and_origins(srv: Running) -> None:
    with srv.connect() as s:
        s.sendall(b"OPTIONS /echo HTTP/1.1\r\nHost: x\r\nOrigin: https://good.example\r\n"
                  b"Access-Control-Request-Method: POST\r\n\r\n")
        status, headers, _ = read_response(s)
        assert status == 204
        assert headers["access-control-allow-origin"] == "https://good.example"
        assert "POST" in headers["access-control-allow-methods"]
        assert headers["access-control-max-age"] == "86400"
        allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "x-cashu", "x-api-key", "anthropic-version"} <= allowed
        # what a browser SDK asks for is allowed; what is not a header name is not echoed
        s.sendall(b"OPTIONS /echo HTTP/1.1\r\nHost: x\r\nOrigin: https://good.example\r\n"
                  b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers:"
                  b" x-api-key, x-stainless-os,anthropic-dangerous-direct-browser-access,"
                  b" bad;name, a b\r\n\r\n")
        status, headers, _ = read_response(s)
        allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
        assert {"x-api-key", "x-stainless-os", "anthropic-dangerous-direct-browser-access"} \
            <= allowed
        assert not any(";" in h or " " in h for h in allowed), allowed
        s.sendall(b"GET /items/1 HTTP/1.1\r\nHost: x\r\nOrigin: https://good.example\r\n\r\n")
        status, headers, _ = read_response(s)
        assert "X-Cashu" in headers["access-control-expose-headers"]
        s.sendall(b"GET /items/1 HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\n\r\n")
        status, headers, _ = read_response(s)
        assert "access-control-allow-origin" not in headers


def test_stream_is_flushed_per_chunk_and_closed_on_disconnect(srv: Running) -> None:
    with srv.connect() as s:
        s.sendall(b"GET /stream?n=100&d=0.05 HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(2)
        data = b""
        while b"data: 1\n" not in data:  # the first events arrive long before the end
            data += s.recv(65536)
        assert b"data: 50" not in data
    stream = srv.app.streams[-1]
    assert stream.closed.wait(3), "aclose() must run when the client goes away"
    assert stream.sent < 100


def test_graceful_shutdown_lets_inflight_finish(srv: Running) -> None:
    s = srv.connect()
    s.sendall(b"GET /slow?s=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.1)
    idle = srv.connect()
    idle.sendall(ECHO)
    assert read_response(idle)[0] == 200
    done = threading.Event()

    def stop() -> None:
        srv.portal.call(srv.server.shutdown, 3.0)
        done.set()

    threading.Thread(target=stop).start()
    status, headers, body = read_response(s)
    assert status == 200 and json.loads(body) == {"slept": True}
    assert headers.get("connection") == "close"
    assert closed(idle)  # idle keep-alive connection is closed at once
    assert done.wait(3)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
    s.close()
