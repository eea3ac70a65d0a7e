"""routstr.websocket: the RFC 6455 client — sans-I/O frames fed at every split, the handshake,
and the anyio adapter against scripted servers on 127.0.0.1 (ping, close, garbage, hangs)."""

from __future__ import annotations

import os

import anyio
import pytest
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream
from hypothesis import given
from hypothesis import strategies as st

from routstr import websocket as ws
from routstr.websocket import (
    BinaryMessage,
    ClientProtocol,
    CloseFrame,
    ConnectionClosed,
    HandshakeError,
    MessageTooBig,
    Ping,
    Pong,
    ProtocolError,
    TextMessage,
    WebSocket,
)
from tests.support.wsserver import (
    frame,
    read_client_frame,
    scripted,
    server_handshake,
    tcp_opener,
    unmask,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def events_of(data: bytes, step: int | None = None, **kw: int) -> list[object]:
    proto = ClientProtocol(**kw)
    out: list[object] = []
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        proto.receive_data(chunk)
        while (event := proto.next_event()) is not None:
            out.append(event)
    return out


# ------------------------------------------------------------------------------- pure


def test_accept_value_rfc6455_example() -> None:
    assert ws.accept_value("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_rfc6455_frame_examples() -> None:
    # 5.7: unmasked "Hello", fragmented "Hel"+"lo", masked "Hello" with mask 37 fa 21 3d
    assert events_of(bytes.fromhex("810548656c6c6f")) == [TextMessage("Hello")]
    assert events_of(bytes.fromhex("010348656c80026c6f")) == [TextMessage("Hello")]
    assert ws.encode_frame(ws.OP_TEXT, b"Hello", mask=bytes.fromhex("37fa213d")) == (
        bytes.fromhex("818537fa213d7f9f4d5158"))
    assert events_of(bytes.fromhex("890548656c6c6f")) == [Ping(b"Hello")]
    assert events_of(bytes.fromhex("8a0548656c6c6f")) == [Pong(b"Hello")]


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 70000])
def test_encode_lengths_and_masking(n: int) -> None:
    payload = os.urandom(n)
    opcode, fin, body = unmask(ws.encode_frame(ws.OP_BINARY, payload))
    assert (opcode, fin, body) == (ws.OP_BINARY, True, payload)
    assert events_of(frame(ws.OP_BINARY, payload), step=4096, max_message_bytes=1 << 20) == [
        BinaryMessage(payload)]


def test_every_split_gives_the_same_events() -> None:
    stream = (
        frame(ws.OP_TEXT, "héllo".encode()) + frame(ws.OP_TEXT, b"ab", fin=False)
        + frame(ws.OP_PING, b"p") + frame(ws.OP_CONTINUATION, b"cd", fin=False)
        + frame(ws.OP_CONTINUATION, "é".encode()) + frame(ws.OP_BINARY, bytes(300))
        + frame(ws.OP_CLOSE, (1000).to_bytes(2, "big") + b"bye")
    )
    want = [TextMessage("héllo"), Ping(b"p"), TextMessage("abcdé"), BinaryMessage(bytes(300)),
            CloseFrame(1000, "bye")]
    assert events_of(stream) == want
    for step in (1, 2, 3, 7):
        assert events_of(stream, step=step) == want
    # nothing after the close frame is looked at
    assert events_of(stream + b"\xff\xff\xff") == want


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5), st.integers(1, 50))
def test_fragmented_binary_reassembles(parts: list[bytes], step: int) -> None:
    data = b"".join(
        frame(ws.OP_BINARY if i == 0 else ws.OP_CONTINUATION, p, fin=i == len(parts) - 1)
        for i, p in enumerate(parts))
    assert events_of(data, step=step) == [BinaryMessage(b"".join(parts))]


@pytest.mark.parametrize("data,error,code", [
    (frame(ws.OP_TEXT, b"x", masked=True), ProtocolError, 1002),
    (frame(ws.OP_TEXT, b"x", rsv=0x40), ProtocolError, 1002),
    (frame(0x3, b"x"), ProtocolError, 1002),
    (frame(0xB, b"x"), ProtocolError, 1002),
    (frame(ws.OP_PING, b"x", fin=False), ProtocolError, 1002),
    (frame(ws.OP_PING, bytes(126)), ProtocolError, 1002),
    (frame(ws.OP_CONTINUATION, b"x"), ProtocolError, 1002),
    (frame(ws.OP_TEXT, b"a", fin=False) + frame(ws.OP_TEXT, b"b"), ProtocolError, 1002),
    (frame(ws.OP_TEXT, b"\xff\xfe"), ws.InvalidData, 1007),
    (frame(ws.OP_TEXT, "é".encode()[:1]), ws.InvalidData, 1007),
    (frame(ws.OP_CLOSE, b"\x03"), ProtocolError, 1002),
    (frame(ws.OP_CLOSE, (1005).to_bytes(2, "big")), ProtocolError, 1002),
    (frame(ws.OP_CLOSE, (999).to_bytes(2, "big")), ProtocolError, 1002),
    (frame(ws.OP_CLOSE, (1000).to_bytes(2, "big") + b"\xff"), ws.InvalidData, 1007),
    (b"\x82\x7f" + (1 << 63).to_bytes(8, "big"), ProtocolError, 1002),
])
def test_protocol_violations(data: bytes, error: type[ProtocolError], code: int) -> None:
    with pytest.raises(error) as exc:
        events_of(data)
    assert exc.value.close_code == code


def test_oversize_refused_on_the_declared_length() -> None:
    proto = ClientProtocol(max_message_bytes=1000)
    proto.receive_data(b"\x82\x7f" + (10**9).to_bytes(8, "big"))  # header only: 1 GB declared
    with pytest.raises(MessageTooBig) as exc:
        proto.next_event()
    assert exc.value.close_code == 1009
    # fragments add up
    data = frame(ws.OP_TEXT, b"a" * 600, fin=False) + frame(ws.OP_CONTINUATION, b"b" * 600)
    with pytest.raises(MessageTooBig):
        events_of(data, max_message_bytes=1000)


def test_events_before_a_violation_are_delivered_first() -> None:
    proto = ClientProtocol()
    proto.receive_data(frame(ws.OP_TEXT, b"ok") + frame(0x3))
    assert proto.next_event() == TextMessage("ok")
    with pytest.raises(ProtocolError):
        proto.next_event()


def test_outgoing_fragmentation_and_close() -> None:
    proto = ClientProtocol(max_frame_bytes=4)
    data = proto.send_text("abcdefghij")
    frames = []
    while data:
        n = data[1] & 0x7F
        frames.append(unmask(data[:6 + n]))
        data = data[6 + n:]
    assert frames == [(1, False, b"abcd"), (0, False, b"efgh"), (0, True, b"ij")]
    close = proto.close(1001, "bye")
    assert unmask(close) == (8, True, (1001).to_bytes(2, "big") + b"bye")
    assert proto.close() == b""
    with pytest.raises(ConnectionClosed):
        proto.send_text("late")


# ------------------------------------------------------------------------------- handshake

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
GOOD = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: keep-alive, "
        b"Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


def test_handshake_request_and_url() -> None:
    url = ws.parse_ws_url("wss://relay.example:4443/path?x=1")
    assert (url.secure, url.host, url.port, url.target) == (True, "relay.example", 4443,
                                                            "/path?x=1")
    req = ws.handshake_request(url, KEY).decode()
    assert req.startswith("GET /path?x=1 HTTP/1.1\r\nHost: relay.example:4443\r\n")
    assert "Sec-WebSocket-Key: " + KEY in req and "Sec-WebSocket-Version: 13" in req
    assert req.endswith("\r\n\r\n")
    assert ws.parse_ws_url("ws://[::1]/").host_header == "[::1]"
    assert ws.parse_ws_url("ws://h").target == "/"
    for bad in ("http://h", "ws://", "ws://h/#frag", "ws://h/a b"):
        with pytest.raises(ValueError):
            ws.parse_ws_url(bad)


def test_handshake_response_checks() -> None:
    assert ws.check_handshake_response(GOOD, KEY)["upgrade"] == "WebSocket"
    bad = [
        GOOD.replace(b"101 Switching Protocols", b"200 OK"),
        GOOD.replace(b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", b"AAAA"),
        GOOD.replace(b"Upgrade: WebSocket", b"Upgrade: h2c"),
        GOOD.replace(b"keep-alive, Upgrade", b"keep-alive"),
        GOOD.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"),
        GOOD.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Protocol: chat\r\n\r\n"),
        GOOD.replace(b"\r\n\r\n", b"\r\nbad header\r\n\r\n"),
        GOOD.replace(b"HTTP/1.1", b"HTTP/1.0"),
        GOOD[:-2],
    ]
    for head in bad:
        with pytest.raises(HandshakeError):
            ws.check_handshake_response(head, KEY)


# ------------------------------------------------------------------------------- adapter

async def test_echo_ping_and_clean_close() -> None:
    seen: list[tuple[int, bool, bytes]] = []

    async def script(stream: ByteStream, reader: BufferedByteReceiveStream) -> None:
        await server_handshake(stream, reader, extra=frame(ws.OP_TEXT, b"welcome"))
        seen.append(await read_client_frame(reader))  # the client's text
        await stream.send(frame(ws.OP_PING, b"are you there") + frame(ws.OP_TEXT, b"a",
                                                                      fin=False)
                          + frame(ws.OP_CONTINUATION, b"b"))
        seen.append(await read_client_frame(reader))  # the pong
        seen.append(await read_client_frame(reader))  # the close
        await stream.send(frame(ws.OP_CLOSE, (1000).to_bytes(2, "big")))

    async with scripted(script) as url:
        conn = await WebSocket.connect(url, tcp_opener)
        assert await conn.receive() == "welcome"  # data that came with the handshake
        await conn.send_text("hi")
        assert await conn.receive() == "ab"
        with anyio.fail_after(5):
            await conn.aclose()
        await conn.aclose()  # idempotent
    assert seen == [(1, True, b"hi"), (10, True, b"are you there"),
                    (8, True, (1000).to_bytes(2, "big"))]


async def test_server_close_is_echoed_and_raised() -> None:
    echoed: list[tuple[int, bool, bytes]] = []

    async def script(stream: ByteStream, reader: BufferedByteReceiveStream) -> None:
        await server_handshake(stream, reader)
        await stream.send(frame(ws.OP_CLOSE, (4001).to_bytes(2, "big") + b"bye"))
        echoed.append(await read_client_frame(reader))

    async with scripted(script) as url:
        conn = await WebSocket.connect(url, tcp_opener)
        with pytest.raises(ConnectionClosed) as exc:
            await conn.receive()
        assert (exc.value.code, exc.value.reason) == (4001, "bye")
        await anyio.sleep(0.1)
        with pytest.raises(ConnectionClosed):
            await conn.send_text("late")
        await conn.aclose()
    assert echoed == [(8, True, (4001).to_bytes(2, "big"))]


async def test_garbage_fails_the_connection_with_1002() -> None:
    got: list[tuple[int, bool, bytes]] = []

    async def script(stream: ByteStream, reader: BufferedByteReceiveStream) -> None:
        await server_handshake(stream, reader)
        await stream.send(b"\x8f\x00garbage")
        got.append(await read_client_frame(reader))

    async with scripted(script) as url:
        conn = await WebSocket.connect(url, tcp_opener)
        with pytest.raises(ProtocolError):
            await conn.receive()
        assert conn.closed
        await anyio.sleep(0.1)
    assert got and got[0][0] == 8 and got[0][2][:2] == (1002).to_bytes(2, "big")


async def test_oversize_message_fails_with_1009_before_the_payload() -> None:
    got: list[tuple[int, bool, bytes]] = []

    async def script(stream: ByteStream, reader: BufferedByteReceiveStream) -> None:
        await server_handshake(stream, reader)
        await stream.send(b"\x81\x7f" + (1 << 40).to_bytes(8, "big"))  # never sends the 1 TB
        got.append(await read_client_frame(reader))

    async with scripted(script) as url:
        conn = await WebSocket.connect(url, tcp_opener, max_message_bytes=4096)
        with pytest.raises(MessageTooBig):
            with anyio.fail_after(5):
                await conn.receive()
        await anyio.sleep(0.1)
    assert got and got[0][2][:2] == (1009).to_bytes(2, "big")


async def test_hanging_handshake_times_out() -> None:
    async def script(stream: ByteStream, reader: BufferedByteReceiveStream) -> None:
        await anyio.sleep(30)

    async with scripted(script) as url:
        started = anyio.current_time()
        with pytest.raises(HandshakeError, match="no handshake answer"):
            await WebSocket.connect(url, tcp_opener, handshake_timeout=0.3)
        assert anyio.current_time() - started < 3


async def test_refused_upgrade_and_reset() -> None:
    async def refuse(stream: ByteStream, reader: BufferedByteReceiveStream) -> None:
        await reader.receive_until(b"\r\n\r\n", 16384)
        await stream.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    async def reset(stream: ByteStream, reader: BufferedByteReceiveStream) -> None:
        await reader.receive_until(b"\r\n\r\n", 16384)

    async def endless(stream: ByteStream, reader: BufferedByteReceiveStream) -> None:
        await reader.receive_until(b"\r\n\r\n", 16384)
        await stream.send(b"HTTP/1.1 101 OK\r\n" + b"X-Filler: y\r\n" * 3000)

    for script, match in ((refuse, "403"), (reset, "closed during the handshake"),
                          (endless, "too large")):
        async with scripted(script) as url:
            with pytest.raises(HandshakeError, match=match):
                await WebSocket.connect(url, tcp_opener, handshake_timeout=5)


async def test_close_waits_only_boundedly_for_a_silent_server() -> None:
    async def script(stream: ByteStream, reader: BufferedByteReceiveStream) -> None:
        await server_handshake(stream, reader)
        await anyio.sleep(30)

    async with scripted(script) as url:
        conn = await WebSocket.connect(url, tcp_opener, close_timeout=0.2)
        started = anyio.current_time()
        with anyio.CancelScope() as scope:
            scope.cancel()  # aclose must work even inside a cancelled scope
            await conn.aclose()
        assert anyio.current_time() - started < 2
        assert conn.closed


async def test_eof_without_close_frame_is_abnormal() -> None:
    async def script(stream: ByteStream, reader: BufferedByteReceiveStream) -> None:
        await server_handshake(stream, reader, extra=frame(ws.OP_TEXT, b"x"))

    async with scripted(script) as url:
        conn = await WebSocket.connect(url, tcp_opener)
        assert await conn.receive() == "x"
        with pytest.raises(ConnectionClosed) as exc:
            with anyio.fail_after(5):
                await conn.receive()
        assert exc.value.code == 1006
        await conn.aclose()
