"""routstr.client: the upstream HTTP/1.1 client against real sockets.

Servers used: the scripted upstream (a real h11 server in a thread), a TLS variant of it with a
throw-away self-signed certificate, a SOCKS5 server, and small raw-socket servers written inline
(in the test's own event loop) for the misbehaviours an h11 server will not produce.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream

from routstr.client import (
    HttpClient,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
)
from routstr.errors import UpstreamError, render
from routstr.sse import SSEDecoder
from tests.support.socks5 import ConnectRequest, Socks5Server
from tests.support.upstream import Behaviour, ScriptedUpstream

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as up:
        yield up
        assert up.errors == []


CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM_CHAT = json.dumps(
    {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
).encode()
JSON = [("content-type", "application/json")]


async def wait_closed(up: ScriptedUpstream, n: int, within: float = 3.0) -> bool:
    return await anyio.to_thread.run_sync(up.wait_closed, n, within)


# ---------------------------------------------------------------------------------------------
# raw servers for misbehaviour


class RawConn:
    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.buffered = BufferedByteReceiveStream(stream)

    async def read_request(self) -> bytes | None:
        """One request (head + Content-Length body), or None at EOF."""
        try:
            head = await self.buffered.receive_until(b"\r\n\r\n", 1 << 20)
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.buffered.receive_exactly(length) if length else b""
        return head + b"\r\n\r\n" + body

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)


Handler = Callable[[RawConn, int], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[int, list[int]]]:
    """Serve `handler(conn, index)` per connection; yields (port, [connection count])."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(SocketAttribute.local_port)
    count = [0]

    async def on_connection(stream: ByteStream) -> None:
        count[0] += 1
        index = count[0]
        async with stream:
            try:
                await handler(RawConn(stream), index)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, on_connection)
        try:
            yield port, count
        finally:
            tg.cancel_scope.cancel()


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


# ---------------------------------------------------------------------------------------------
# pooling


async def test_keep_alive_reuses_one_connection(upstream: ScriptedUpstream) -> None:
    async with HttpClient() as client:
        for _ in range(5):
            status, _headers, body = await client.fetch(
                "POST", f"{upstream.url}/chat/completions", JSON, CHAT
            )
            assert status == 200 and json.loads(body)["usage"]["total_tokens"] == 17
        status, _headers, body = await client.fetch("GET", f"{upstream.url}/models")
        assert status == 200
    assert upstream.connection_count() == 1
    assert len(upstream.requests) == 6


async def test_pool_is_bounded_and_waits_for_a_free_slot(upstream: ScriptedUpstream) -> None:
    upstream.enqueue(*[Behaviour(delay_s=0.2) for _ in range(6)])
    results: list[int] = []
    async with HttpClient(max_connections_per_origin=2) as client:

        async def one() -> None:
            status, _h, _b = await client.fetch("GET", f"{upstream.url}/models")
            results.append(status)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(one)
        elapsed = time.monotonic() - started
    assert results == [200] * 6
    assert upstream.connection_count() == 2
    assert elapsed >= 0.55  # three waves of two


async def test_connection_close_from_server_is_not_pooled() -> None:
    async def handler(conn: RawConn, index: int) -> None:
        while await conn.read_request() is not None:
            await conn.send(ok(b"bye", b"connection: close\r\n"))
            return

    async with raw_server(handler) as (port, count), HttpClient() as client:
        for _ in range(3):
            assert (await client.fetch("GET", f"http://127.0.0.1:{port}/"))[2] == b"bye"
        assert count[0] == 3


# ---------------------------------------------------------------------------------------------
# request and response bodies


async def test_content_length_request_and_header_hygiene(upstream: ScriptedUpstream) -> None:
    headers = [
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer sk-upstream"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "dropped because Connection names it"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "x"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic eA=="),
        ("Host", "evil.example"),
        ("Content-Length", "1"),
        ("X-Custom", "kept"),
    ]
    async with HttpClient() as client:
        response = await client.request("POST", f"{upstream.url}/chat/completions", headers, CHAT)
        try:
            assert response.status == 200 and response.reason == "OK"
            assert response.header("Content-Type") == "application/json"
            assert response.header("x-missing") is None
            assert all(name == name.lower() for name, _ in response.headers)
            doc = json.loads(await response.read())
        finally:
            await response.aclose()
        await response.aclose()  # idempotent
    assert doc["choices"][0]["message"]["content"] == "Hello from upstream!"
    seen = upstream.requests[0]
    assert seen.body == CHAT and seen.json()["model"] == "m"
    assert seen.headers["host"] == f"127.0.0.1:{upstream.port}"
    assert seen.headers["content-length"] == str(len(CHAT))
    assert seen.headers["authorization"] == "Bearer sk-upstream"
    assert seen.headers["x-custom"] == "kept"
    for dropped in ("connection", "x-hop", "keep-alive", "te", "trailer", "transfer-encoding"):
        assert dropped not in seen.headers
    assert "upgrade" not in seen.headers and "proxy-authorization" not in seen.headers


async def test_chunked_upload(upstream: ScriptedUpstream) -> None:
    pieces = [CHAT[:10], b"", CHAT[10:40], CHAT[40:]]

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            await anyio.sleep(0.01)
            yield piece

    async with HttpClient() as client:
        response = await client.request("POST", f"{upstream.url}/chat/completions", JSON, body())
        async with response:
            assert response.status == 200
            assert json.loads(await response.read())["object"] == "chat.completion"
        # a large streamed body, chunks above the coalescing threshold
        big = [bytes([i]) * 100_000 for i in range(5)]

        async def big_body() -> AsyncIterator[bytes]:
            for chunk in big:
                yield chunk

        upstream.enqueue(Behaviour(json={"ok": True}))
        status, _h, _b = await client.fetch("POST", f"{upstream.url}/x", JSON, b"")
        assert status == 200
        upstream.enqueue(Behaviour(json={"ok": True}))
        async with await client.request("PUT", f"{upstream.url}/upload", (), big_body()) as r:
            assert json.loads(await r.read()) == {"ok": True}
    assert upstream.requests[0].headers["transfer-encoding"] == "chunked"
    assert "content-length" not in upstream.requests[0].headers
    assert upstream.requests[0].body == CHAT
    assert upstream.requests[1].headers["content-length"] == "0"
    assert upstream.requests[2].body == b"".join(big)
    assert upstream.connection_count() == 1


async def test_large_bytes_body_and_response(upstream: ScriptedUpstream) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: sent head first, then the body uncopied
    upstream.enqueue(Behaviour(body=payload, headers=[("content-type", "application/x-bin")]))
    async with HttpClient() as client:
        status, headers, body = await client.fetch("POST", f"{upstream.url}/blob", (), payload)
    assert status == 200 and body == payload
    assert dict(headers)["content-length"] == str(len(payload))
    assert upstream.requests[0].body == payload


async def test_write_timeout_does_not_count_a_slow_body_iterator(upstream: ScriptedUpstream) -> None:
    """`write_timeout` bounds each write, not the caller's iterator between chunks."""

    async def body() -> AsyncIterator[bytes]:
        yield CHAT[:10]
        await anyio.sleep(0.5)
        yield CHAT[10:]

    async with HttpClient(write_timeout=0.2) as client:
        status, _h, raw = await client.fetch("POST", f"{upstream.url}/chat/completions", JSON,
                                             body())  # type: ignore[arg-type]
    assert status == 200 and json.loads(raw)["object"] == "chat.completion"
    assert upstream.requests[0].body == CHAT


async def test_chunked_download_streams_events_as_they_arrive(upstream: ScriptedUpstream) -> None:
    upstream.enqueue(Behaviour(event_delay_s=0.1))
    arrivals: list[float] = []
    decoder = SSEDecoder()
    events = []
    async with HttpClient() as client:
        started = time.monotonic()
        response = await client.request(
            "POST", f"{upstream.url}/chat/completions", JSON, STREAM_CHAT
        )
        async with response:
            assert response.header("content-type") == "text/event-stream"
            assert response.header("transfer-encoding") == "chunked"
            async for chunk in response:
                arrivals.append(time.monotonic() - started)
                events.extend(decoder.feed(chunk))
        events.extend(decoder.close())
        # the connection went back to the pool after the chunked body ended
        assert (await client.fetch("GET", f"{upstream.url}/models"))[0] == 200
    assert upstream.connection_count() == 1
    assert events[-1].is_done
    usage_chunks = [e.json() for e in events if isinstance(e.json(), dict)]
    assert usage_chunks[-1]["usage"] == {  # type: ignore[index]
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "total_tokens": 17,
    }
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""  # type: ignore[index]
        for c in usage_chunks
        if c["choices"]  # type: ignore[index]
    )
    assert text == "Hello from upstream!"
    assert len(arrivals) >= 8 and arrivals[0] < arrivals[-1] - 0.5  # not buffered


async def test_read_until_close_body_and_100_continue() -> None:
    async def handler(conn: RawConn, index: int) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, ")
        await anyio.sleep(0.05)
        await conn.send(b"part two")

    async with raw_server(handler) as (port, _count), HttpClient() as client:
        status, headers, body = await client.fetch("GET", f"http://127.0.0.1:{port}/")
    assert status == 200 and body == b"part one, part two"
    assert ("content-type", "text/plain") in headers


async def test_no_body_responses_and_reuse() -> None:
    async def handler(conn: RawConn, index: int) -> None:
        while (req := await conn.read_request()) is not None:
            if req.startswith(b"HEAD"):
                await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n")
            else:
                await conn.send(b"HTTP/1.1 204 No Content\r\n\r\n")

    async with raw_server(handler) as (port, count), HttpClient() as client:
        assert await client.fetch("HEAD", f"http://127.0.0.1:{port}/") == (
            200,
            [("content-length", "1234")],
            b"",
        )
        assert (await client.fetch("DELETE", f"http://127.0.0.1:{port}/x"))[:1] == (204,)
        assert count[0] == 1


async def test_aclose_after_the_last_byte_keeps_the_connection(upstream: ScriptedUpstream) -> None:
    async with HttpClient() as client:
        response = await client.request("GET", f"{upstream.url}/models")
        assert b'"object": "list"' in await response.__anext__()  # the whole Content-Length body
        await response.aclose()  # h11 already knows the message ended: pooled, not closed
        response = await client.request("GET", f"{upstream.url}/models")
        await response.aclose()  # body unread: closed
        assert (await client.fetch("GET", f"{upstream.url}/models"))[0] == 200
    assert upstream.connection_count() == 2


async def test_fetch_max_bytes(upstream: ScriptedUpstream) -> None:
    upstream.enqueue(Behaviour(body=b"x" * 5000), Behaviour(event_delay_s=0.01))
    upstream.enqueue(Behaviour(body=b"y" * 5000))
    async with HttpClient() as client:
        with pytest.raises(UpstreamResponseTooLarge):  # refused by Content-Length up front
            await client.fetch("GET", f"{upstream.url}/big", max_bytes=4096)
        response = await client.request(
            "POST", f"{upstream.url}/chat/completions", JSON, STREAM_CHAT
        )
        with pytest.raises(UpstreamProtocolError):  # chunked: refused while reading
            await response.read(max_bytes=100)
        await response.aclose()
        assert (await client.fetch("GET", f"{upstream.url}/big"))[2] == b"y" * 5000


# ---------------------------------------------------------------------------------------------
# timeouts


async def test_read_timeout_before_headers(upstream: ScriptedUpstream) -> None:
    upstream.enqueue(Behaviour(delay_s=5))
    async with HttpClient(read_timeout=0.2) as client:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout) as info:
            await client.fetch("GET", f"{upstream.url}/models")
        assert time.monotonic() - started < 2
    assert isinstance(info.value, UpstreamError) and info.value.status == 502
    assert await wait_closed(upstream, 1)  # the stuck connection was dropped


async def test_read_timeout_is_per_read_inactivity(upstream: ScriptedUpstream) -> None:
    # 10 events 0.15 s apart: 1.5 s in total, far above the 0.5 s read timeout, but never idle
    upstream.enqueue(Behaviour(event_delay_s=0.15, stream_chunks=list("abcdefghij")))
    upstream.enqueue(Behaviour(event_delay_s=3))
    async with HttpClient(read_timeout=0.5) as client:
        response = await client.request(
            "POST", f"{upstream.url}/chat/completions", JSON, STREAM_CHAT
        )
        async with response:
            body = await response.read()
        assert body.endswith(b"data: [DONE]\n\n")
        response = await client.request(
            "POST", f"{upstream.url}/chat/completions", JSON, STREAM_CHAT
        )
        async with response:
            first = await response.__anext__()
            assert b"chat.completion.chunk" in first
            with pytest.raises(UpstreamTimeout):
                await response.__anext__()
            assert [c async for c in response] == []  # finished: nothing more, no error


async def test_write_timeout() -> None:
    # a listening socket nobody accept()s: the kernel takes the connection and a receive
    # buffer's worth of data, then the client's writes block
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        async with HttpClient(write_timeout=0.3, read_timeout=0.3) as client:
            started = time.monotonic()
            with pytest.raises(UpstreamTimeout) as info:
                await client.fetch("POST", f"http://127.0.0.1:{port}/", (), b"z" * (64 << 20))
            assert time.monotonic() - started < 3
    assert info.value.detail == "write timed out"


async def test_connect_timeout_is_both_timeout_and_connect_error() -> None:
    async def silent_proxy(conn: RawConn, index: int) -> None:
        await anyio.sleep(10)  # accepts TCP, never answers the SOCKS greeting

    async with raw_server(silent_proxy) as (port, _count):
        async with HttpClient(proxy=f"socks5://127.0.0.1:{port}", connect_timeout=0.2) as client:
            started = time.monotonic()
            with pytest.raises(UpstreamConnectTimeout) as info:
                await client.fetch("GET", "http://abc.onion/")
            assert time.monotonic() - started < 2
    assert isinstance(info.value, UpstreamTimeout) and isinstance(info.value, UpstreamConnectError)
    status, _headers, body = render(info.value)
    assert status == 502 and json.loads(body)["error"]["type"] == "upstream_error"


# ---------------------------------------------------------------------------------------------
# connection failures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_refused_port_is_connect_error() -> None:
    port = _free_port()
    async with HttpClient(connect_timeout=5) as client:
        with pytest.raises(UpstreamConnectError) as info:
            await client.fetch("GET", f"http://127.0.0.1:{port}/v1/models")
    assert "127.0.0.1" not in str(info.value)  # safe to show a client
    assert f"127.0.0.1:{port}" in info.value.detail  # useful in the log
    assert info.value.code == "upstream_connect_error"


async def test_invalid_urls_are_connect_errors() -> None:
    async with HttpClient() as client:
        for url in ("ftp://x/", "http:///nohost", "http://x:notaport/", "nonsense"):
            with pytest.raises(UpstreamConnectError):
                await client.fetch("GET", url)


async def test_dns_failure_is_connect_error() -> None:
    async with HttpClient(connect_timeout=3) as client:
        with pytest.raises(UpstreamConnectError):
            await client.fetch("GET", "http://no-such-host.invalid/v1/models")


async def test_peer_closing_mid_stream_is_protocol_error(upstream: ScriptedUpstream) -> None:
    upstream.enqueue(Behaviour(fail_after_events=2))
    async with HttpClient() as client:
        response = await client.request(
            "POST", f"{upstream.url}/chat/completions", JSON, STREAM_CHAT
        )
        got = b""
        with pytest.raises(UpstreamProtocolError):
            async for chunk in response:
                got += chunk
        await response.aclose()
        assert got.count(b"data: ") == 2
        # the pool slot and the connection were released: the client still works
        assert (await client.fetch("GET", f"{upstream.url}/models"))[0] == 200


async def test_peer_closing_mid_content_length_body_is_protocol_error() -> None:
    async def handler(conn: RawConn, index: int) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")

    async with raw_server(handler) as (port, _count), HttpClient() as client:
        with pytest.raises(UpstreamProtocolError):
            await client.fetch("GET", f"http://127.0.0.1:{port}/")


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nZZ\r\n",
        b"HTTP/1.1 200 O",  # then EOF inside the head
    ],
)
async def test_malformed_responses_are_protocol_errors(reply: bytes) -> None:
    async def handler(conn: RawConn, index: int) -> None:
        await conn.read_request()
        await conn.send(reply)

    async with raw_server(handler) as (port, _count), HttpClient() as client:
        with pytest.raises(UpstreamProtocolError):
            await client.fetch("GET", f"http://127.0.0.1:{port}/")


async def test_fresh_connection_closed_without_response_is_not_retried() -> None:
    async def handler(conn: RawConn, index: int) -> None:
        await conn.read_request()  # and close

    async with raw_server(handler) as (port, count), HttpClient() as client:
        with pytest.raises(UpstreamProtocolError):
            await client.fetch("POST", f"http://127.0.0.1:{port}/", (), b"{}")
        assert count[0] == 1


# ---------------------------------------------------------------------------------------------
# stale pooled connections


async def test_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    """An idempotent request that meets the keep-alive race is retried on a fresh connection;
    a POST is not (the server may have acted on it: a mint swap must never run blind twice)."""
    seen: list[tuple[int, bytes]] = []

    async def handler(conn: RawConn, index: int) -> None:
        while (req := await conn.read_request()) is not None:
            seen.append((index, req.split(b"\r\n", 1)[0]))
            if index in (1, 2) and len([s for s in seen if s[0] == index]) > 1:
                return  # keep-alive race: the request arrived, the server closes unanswered
            await conn.send(ok(b"answer from connection %d" % index))

    async with raw_server(handler) as (port, count), HttpClient() as client:
        url = f"http://127.0.0.1:{port}"
        assert (await client.fetch("GET", f"{url}/a"))[2] == b"answer from connection 1"
        assert (await client.fetch("GET", f"{url}/b"))[2] == b"answer from connection 2"
        with pytest.raises(UpstreamProtocolError):
            await client.fetch("POST", f"{url}/c", (), b"{}")
        assert (await client.fetch("GET", f"{url}/d"))[2] == b"answer from connection 3"
    assert count[0] == 3
    assert seen == [(1, b"GET /a HTTP/1.1"), (1, b"GET /b HTTP/1.1"), (2, b"GET /b HTTP/1.1"),
                    (2, b"POST /c HTTP/1.1"), (3, b"GET /d HTTP/1.1")]  # fmt: skip


async def test_stale_pooled_connection_with_streamed_body_is_not_retried() -> None:
    async def handler(conn: RawConn, index: int) -> None:
        if index == 1:
            await conn.read_request()
            await conn.send(ok())
            await conn.buffered.receive_until(b"\r\n\r\n", 65536)
            return  # closes as the second request (chunked) comes in

    async def body() -> AsyncIterator[bytes]:
        await anyio.sleep(0.1)  # let the close arrive while we are still sending
        yield b"{}"

    async with raw_server(handler) as (port, count), HttpClient() as client:
        assert (await client.fetch("GET", f"http://127.0.0.1:{port}/"))[2] == b"ok"
        with pytest.raises(UpstreamProtocolError):
            response = await client.request("POST", f"http://127.0.0.1:{port}/", (), body())
            await response.aclose()
        assert count[0] == 1


async def test_retry_happens_only_once() -> None:
    async def handler(conn: RawConn, index: int) -> None:
        await conn.read_request()
        if index == 1:
            await conn.send(ok())
            await conn.read_request()
        # every other connection: read the request and close unanswered

    async with raw_server(handler) as (port, count), HttpClient() as client:
        assert (await client.fetch("GET", f"http://127.0.0.1:{port}/"))[2] == b"ok"
        with pytest.raises(UpstreamProtocolError):
            await client.fetch("GET", f"http://127.0.0.1:{port}/")
        assert count[0] == 2


async def test_idle_connection_closed_by_peer_is_detected_before_reuse() -> None:
    requests_per_connection: dict[int, int] = {}

    async def handler(conn: RawConn, index: int) -> None:
        await conn.read_request()
        requests_per_connection[index] = requests_per_connection.get(index, 0) + 1
        await conn.send(ok())  # then close, without saying "connection: close"

    async with raw_server(handler) as (port, count), HttpClient() as client:
        for _ in range(3):
            assert (await client.fetch("POST", f"http://127.0.0.1:{port}/", (), b"{}"))[2] == b"ok"
            await anyio.sleep(0.05)
    assert count[0] == 3
    assert requests_per_connection == {1: 1, 2: 1, 3: 1}  # nothing was sent into a dead socket


async def test_keepalive_expiry_drops_old_idle_connections(upstream: ScriptedUpstream) -> None:
    async with HttpClient(keepalive_expiry=0.1) as client:
        await client.fetch("GET", f"{upstream.url}/models")
        await anyio.sleep(0.2)
        await client.fetch("GET", f"{upstream.url}/models")
    assert upstream.connection_count() == 2


# ---------------------------------------------------------------------------------------------
# closing and cancellation


async def test_aclose_mid_stream_closes_upstream_connection_promptly(
    upstream: ScriptedUpstream,
) -> None:
    upstream.enqueue(Behaviour(event_delay_s=0.5, stream_chunks=["x"] * 40))
    async with HttpClient(max_connections_per_origin=1) as client:
        response = await client.request(
            "POST", f"{upstream.url}/chat/completions", JSON, STREAM_CHAT
        )
        first = await response.__anext__()
        assert first.startswith(b"data: ")
        started = time.monotonic()
        await response.aclose()
        assert await wait_closed(upstream, 1, within=2)
        assert time.monotonic() - started < 0.4  # long before the next event was due
        await response.aclose()
        assert [c async for c in response] == []
        # the only pool slot is free again; a new connection is made
        assert (await client.fetch("GET", f"{upstream.url}/models"))[0] == 200
    assert upstream.connection_count() == 2


async def test_cancelled_request_releases_slot_and_connection(upstream: ScriptedUpstream) -> None:
    upstream.enqueue(Behaviour(hang=True))
    async with HttpClient(max_connections_per_origin=1) as client:
        with anyio.move_on_after(0.2) as scope:
            await client.fetch("GET", f"{upstream.url}/models")
        assert scope.cancelled_caught
        assert await wait_closed(upstream, 1)
        assert (await client.fetch("GET", f"{upstream.url}/models"))[0] == 200


async def test_cancelled_while_iterating_then_aclose_in_cancelled_scope(
    upstream: ScriptedUpstream,
) -> None:
    upstream.enqueue(Behaviour(event_delay_s=1.0))
    async with HttpClient() as client:
        response = await client.request(
            "POST", f"{upstream.url}/chat/completions", JSON, STREAM_CHAT
        )
        with anyio.CancelScope() as scope:
            await response.__anext__()
            scope.cancel()
            try:
                await response.__anext__()
            finally:
                await response.aclose()  # works although the scope is cancelled
        assert await wait_closed(upstream, 1)


async def test_client_aclose_closes_idle_connections(upstream: ScriptedUpstream) -> None:
    client = HttpClient()
    response = await client.request("POST", f"{upstream.url}/chat/completions", JSON, CHAT)
    await client.fetch("GET", f"{upstream.url}/models")  # a second connection, now idle
    await client.aclose()
    assert await wait_closed(upstream, 1)
    assert json.loads(await response.read())["object"] == "chat.completion"
    await response.aclose()  # finished after the client closed: not pooled
    assert await wait_closed(upstream, 2)
    with pytest.raises(UpstreamConnectError):
        await client.fetch("GET", f"{upstream.url}/models")


async def test_pool_timeout() -> None:
    up = ScriptedUpstream()
    with up:
        up.enqueue(Behaviour(delay_s=1.0))
        async with HttpClient(max_connections_per_origin=1, pool_timeout=0.1) as client:
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.fetch, "GET", f"{up.url}/models")
                await anyio.sleep(0.05)
                with pytest.raises(UpstreamTimeout):
                    await client.fetch("GET", f"{up.url}/models")


# ---------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,DNS:abc.onion,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def _server_context(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls_files)
    return ctx


async def test_https_with_a_trusted_self_signed_certificate(tls_files: tuple[Path, Path]) -> None:
    trusting = ssl.create_default_context(cafile=str(tls_files[0]))
    with ScriptedUpstream(ssl_context=_server_context(tls_files), url_host="localhost") as up:
        assert up.url.startswith("https://localhost:")
        async with HttpClient(ssl_context=trusting) as client:
            for _ in range(3):
                status, _h, body = await client.fetch(
                    "POST", f"{up.url}/chat/completions", JSON, CHAT
                )
                assert status == 200 and b"Hello from upstream!" in body
            response = await client.request("POST", f"{up.url}/chat/completions", JSON, STREAM_CHAT)
            async with response:
                assert (await response.read()).endswith(b"data: [DONE]\n\n")
        assert up.connection_count() == 1
        assert up.requests[0].headers["host"] == f"localhost:{up.port}"
        assert up.errors == []


async def test_https_verification_failure_is_connect_error(tls_files: tuple[Path, Path]) -> None:
    with ScriptedUpstream(ssl_context=_server_context(tls_files), url_host="localhost") as up:
        async with HttpClient() as client:  # system CA store: does not know our certificate
            with pytest.raises(UpstreamConnectError) as info:
                await client.fetch("GET", f"{up.url}/models")
        assert "TLS" in str(info.value) and "CERTIFICATE_VERIFY_FAILED" in info.value.detail
        trusting = ssl.create_default_context(cafile=str(tls_files[0]))
        with Socks5Server({"other.onion": ("127.0.0.1", up.port)}) as socks:
            async with HttpClient(ssl_context=trusting, proxy=socks.url) as client:
                with pytest.raises(UpstreamConnectError) as info:  # name not in the certificate
                    await client.fetch("GET", "https://other.onion/v1/models")
        assert "other.onion" in info.value.detail
        assert up.requests == []


async def test_plain_http_to_a_tls_port_fails_cleanly(tls_files: tuple[Path, Path]) -> None:
    with ScriptedUpstream(ssl_context=_server_context(tls_files)) as up:
        async with HttpClient(read_timeout=3) as client:
            with pytest.raises(UpstreamError):
                await client.fetch("GET", f"http://127.0.0.1:{up.port}/v1/models")


# ---------------------------------------------------------------------------------------------
# SOCKS5


async def test_socks5_with_remote_dns(upstream: ScriptedUpstream) -> None:
    with Socks5Server({"abc.onion": ("127.0.0.1", upstream.port)}) as socks:
        async with HttpClient(proxy=f"socks5://127.0.0.1:{socks.port}") as client:
            for _ in range(2):
                status, _h, body = await client.fetch(
                    "POST", "http://abc.onion/v1/chat/completions", JSON, CHAT
                )
                assert status == 200 and b"Hello from upstream!" in body
            with pytest.raises(UpstreamConnectError) as info:
                await client.fetch("GET", "http://unknown.onion/v1/models")
            assert "host unreachable" in info.value.detail
        # the name itself reached the proxy: no local DNS lookup happened
        assert socks.requests == [
            ConnectRequest("domain", "abc.onion", 80),
            ConnectRequest("domain", "unknown.onion", 80),
        ]
        assert socks.errors == []
    assert upstream.requests[0].headers["host"] == "abc.onion"
    assert upstream.connection_count() == 1  # pooled through the tunnel


async def test_socks5_with_username_and_password(upstream: ScriptedUpstream) -> None:
    mapping = {"abc.onion": ("127.0.0.1", upstream.port)}
    with Socks5Server(mapping, username="tor", password="p@ss word") as socks:
        async with HttpClient(proxy=f"socks5h://tor:p%40ss%20word@127.0.0.1:{socks.port}") as c:
            assert (await c.fetch("GET", "http://abc.onion:8080/v1/models"))[0] == 200
        async with HttpClient(proxy=f"socks5h://tor:wrong@127.0.0.1:{socks.port}") as c:
            with pytest.raises(UpstreamConnectError):
                await c.fetch("GET", "http://abc.onion/v1/models")
        async with HttpClient(proxy=f"socks5h://127.0.0.1:{socks.port}") as c:  # no credentials
            with pytest.raises(UpstreamConnectError):
                await c.fetch("GET", "http://abc.onion/v1/models")
        assert socks.auth_attempts == [("tor", "p@ss word"), ("tor", "wrong")]
        assert socks.requests == [ConnectRequest("domain", "abc.onion", 8080)]
    assert upstream.requests[0].headers["host"] == "abc.onion:8080"


async def test_socks5_tls_through_the_tunnel(tls_files: tuple[Path, Path]) -> None:
    trusting = ssl.create_default_context(cafile=str(tls_files[0]))
    with ScriptedUpstream(ssl_context=_server_context(tls_files)) as up:
        with Socks5Server({"abc.onion": ("127.0.0.1", up.port)}) as socks:
            async with HttpClient(proxy=socks.url, ssl_context=trusting) as client:
                status, _h, _b = await client.fetch("GET", "https://abc.onion/v1/models")
            assert status == 200
            assert socks.requests == [ConnectRequest("domain", "abc.onion", 443)]
        assert up.requests[0].headers["host"] == "abc.onion"


async def test_socks5_proxy_down_is_connect_error() -> None:
    async with HttpClient(proxy=f"socks5://127.0.0.1:{_free_port()}") as client:
        with pytest.raises(UpstreamConnectError):
            await client.fetch("GET", "http://abc.onion/")


def test_bad_proxy_url_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError):
        HttpClient(proxy="http://127.0.0.1:8080")
