"""An RFC 6455 WebSocket client, for talking to Nostr relays.

Two layers, like the rest of the node:

* `ClientProtocol` — sans-I/O: bytes in, events out (`TextMessage`, `BinaryMessage`, `Ping`,
  `Pong`, `CloseFrame`); messages in, masked frames out. It enforces what a client must:
  server frames unmasked, no RSV bits (we negotiate no extension), no reserved opcodes, control
  frames unfragmented and at most 125 bytes, continuation frames only inside a fragmented
  message, text valid UTF-8 (1007), close codes from the allowed ranges, and a message size
  limit checked against each frame's *declared* length before its payload is buffered (1009).
* `WebSocket` — the anyio adapter over a byte stream the caller opens (the node's upstream
  client opens TCP, SOCKS5 and TLS: `HttpClient.open_stream`). It performs the opening
  handshake (checking ``Sec-WebSocket-Accept``), answers pings, and runs the closing handshake
  with a bounded wait. Every write is shielded and bounded, so a cancelled task never leaves half
  a frame on the wire; every I/O failure surfaces as a `WebSocketError`.

The handshake without h11: h11 is the node's HTTP/1.1 engine, confined to `server` and `client`.
The WebSocket opening handshake needs none of what h11 is for (body framing, chunking,
keep-alive): the request is a fixed GET with five headers, the answer must be a ``101`` head with
no body, after which the bytes are WebSocket frames. So this module writes the request and parses
that one head itself — strictly (status line, header syntax, `MAX_HANDSHAKE_BYTES`) — and keeps
the whole client, sans-I/O core and all, in one place that does not depend on the HTTP stack.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
from anyio.abc import ByteStream

__all__ = [
    "BinaryMessage",
    "ClientProtocol",
    "CloseFrame",
    "ConnectionClosed",
    "HandshakeError",
    "MessageTooBig",
    "Ping",
    "Pong",
    "ProtocolError",
    "TextMessage",
    "WebSocket",
    "WebSocketError",
    "WsUrl",
    "accept_value",
    "check_handshake_response",
    "encode_frame",
    "handshake_request",
    "parse_ws_url",
]

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HANDSHAKE_BYTES = 16 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
MAX_CONTROL_PAYLOAD_BYTES = 125
READ_CHUNK_BYTES = 64 * 1024
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_WRITE_TIMEOUT_S = 10.0
DEFAULT_CLOSE_TIMEOUT_S = 1.0

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005  # never sent: "the close frame had no code"
CLOSE_ABNORMAL = 1006  # never sent: "the connection ended without a close frame"
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009


# --------------------------------------------------------------------------------------------
# Errors


class WebSocketError(Exception):
    """Any failure of a WebSocket connection (handshake, protocol, I/O, close)."""


class HandshakeError(WebSocketError):
    """The server did not accept the upgrade (status, headers, accept value, timeout)."""


class ProtocolError(WebSocketError):
    """The server broke RFC 6455; the connection is failed with `close_code`."""

    close_code = CLOSE_PROTOCOL_ERROR


class InvalidData(ProtocolError):
    close_code = CLOSE_INVALID_DATA


class MessageTooBig(ProtocolError):
    close_code = CLOSE_TOO_BIG


class ConnectionClosed(WebSocketError):
    """The connection is over: closing handshake (`code` from the peer) or lost (1006)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


# --------------------------------------------------------------------------------------------
# URLs and the opening handshake


@dataclass(frozen=True, slots=True)
class WsUrl:
    secure: bool
    host: str
    port: int
    target: str  # path and query: the request-target of the GET
    host_header: str


def parse_ws_url(url: str) -> WsUrl:
    """A ``ws://`` or ``wss://`` URL (no fragment, RFC 6455 3); raises ValueError."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in ("ws", "wss") or not host:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    if parts.fragment or "#" in url:
        raise ValueError("a WebSocket URL has no fragment")
    secure = scheme == "wss"
    default = 443 if secure else 80
    port = parts.port or default
    host_header = f"[{host}]" if ":" in host else host
    if port != default:
        host_header += f":{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if any(ord(c) <= 32 or ord(c) >= 127 for c in target + host_header):
        raise ValueError("WebSocket URL must be ASCII without spaces")
    return WsUrl(secure, host, port, target, host_header)


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_value(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer to ``Sec-WebSocket-Key: key``."""
    digest = hashlib.sha1((key + GUID).encode("ascii"), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


def handshake_request(
    url: WsUrl, key: str, headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    lines = [
        f"GET {url.target} HTTP/1.1",
        f"Host: {url.host_header}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or any(c in value for c in "\r\n\0"):
            raise ValueError("invalid handshake header")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")


def check_handshake_response(head: bytes, key: str) -> dict[str, str]:
    """Validate the server's answer (the head up to and including the blank line).

    Returns its headers (lower-case names, repeated ones joined by ``", "``); raises
    `HandshakeError` unless it is a ``101`` upgrade to ``websocket`` with the right accept
    value and no extension or subprotocol we did not offer.
    """
    if not head.endswith(b"\r\n\r\n"):
        raise HandshakeError("handshake response head is incomplete")
    lines = head[:-4].split(b"\r\n")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise HandshakeError("malformed handshake status line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        match = _HEADER.fullmatch(line)
        if match is None:
            raise HandshakeError("malformed header in handshake response")
        name = match.group(1).decode("ascii").lower()
        value = match.group(2).decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    code = int(status.group(1))
    if code != 101:
        raise HandshakeError(f"server answered {code} instead of 101 Switching Protocols")
    if headers.get("upgrade", "").strip().lower() != "websocket":
        raise HandshakeError("server did not upgrade to websocket")
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if "upgrade" not in connection:
        raise HandshakeError("server response lacks Connection: Upgrade")
    if headers.get("sec-websocket-accept", "").strip() != accept_value(key):
        raise HandshakeError("wrong Sec-WebSocket-Accept")
    if headers.get("sec-websocket-extensions", "").strip():
        raise HandshakeError("server chose an extension we did not offer")
    if headers.get("sec-websocket-protocol", "").strip():
        raise HandshakeError("server chose a subprotocol we did not offer")
    return headers


# --------------------------------------------------------------------------------------------
# Frames


def _mask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def encode_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None
) -> bytes:
    """One client frame: masked (RFC 6455 5.3) with `mask` or 4 fresh random bytes."""
    if mask is None:
        mask = os.urandom(4)
    if len(mask) != 4:
        raise ValueError("a masking key is 4 bytes")
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((b0, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + _mask(payload, mask)


@dataclass(frozen=True, slots=True)
class TextMessage:
    text: str


@dataclass(frozen=True, slots=True)
class BinaryMessage:
    data: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseFrame:
    code: int  # CLOSE_NO_STATUS when the frame carried no code
    reason: str


WsEvent = TextMessage | BinaryMessage | Ping | Pong | CloseFrame


def _valid_close_code(code: int) -> bool:
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or (
        3000 <= code <= 4999
    )


class ClientProtocol:
    """Sans-I/O client side of RFC 6455 (after the handshake). See the module docstring.

    `receive_data` queues events for `next_event`; a protocol violation stops parsing and is
    raised by `next_event` once the events before it are drained. `send_*` return the bytes to
    write. `max_frame_bytes` splits outgoing messages into continuation frames.
    """

    def __init__(
        self,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_frame_bytes: int | None = None,
    ) -> None:
        if max_message_bytes < MAX_CONTROL_PAYLOAD_BYTES:
            raise ValueError("max_message_bytes too small")
        self.max_message_bytes = max_message_bytes
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._events: deque[WsEvent] = deque()
        self._failure: ProtocolError | None = None
        self._frag_opcode: int | None = None
        self._frag_parts: list[bytes] = []
        self._frag_len = 0
        self.close_sent = False
        self.close_received = False

    # -- incoming -----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self._failure is not None or self.close_received:
            return  # nothing after a close frame or a failure is looked at
        self._buf += data
        try:
            self._parse()
        except ProtocolError as exc:
            self._failure = exc
            self._buf.clear()

    def next_event(self) -> WsEvent | None:
        if self._events:
            return self._events.popleft()
        if self._failure is not None:
            raise self._failure
        return None

    def _parse(self) -> None:
        buf = self._buf
        while len(buf) >= 2 and not self.close_received:
            b0, b1 = buf[0], buf[1]
            fin, opcode = bool(b0 & 0x80), b0 & 0x0F
            if b0 & 0x70:
                raise ProtocolError("reserved bits set (no extension was negotiated)")
            if b1 & 0x80:
                raise ProtocolError("server frames must not be masked")
            length, pos = b1 & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, pos = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, pos = int.from_bytes(buf[2:10], "big"), 10
                if length >> 63:
                    raise ProtocolError("frame length has its most significant bit set")
            if opcode >= 0x8:
                if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                    raise ProtocolError(f"reserved control opcode {opcode:#x}")
                if not fin:
                    raise ProtocolError("fragmented control frame")
                if length > MAX_CONTROL_PAYLOAD_BYTES:
                    raise ProtocolError("control frame longer than 125 bytes")
            elif opcode not in (OP_CONTINUATION, OP_TEXT, OP_BINARY):
                raise ProtocolError(f"reserved data opcode {opcode:#x}")
            elif self._frag_len + length > self.max_message_bytes:
                raise MessageTooBig(
                    f"message larger than {self.max_message_bytes} bytes"
                )
            if len(buf) < pos + length:
                return
            payload = bytes(buf[pos : pos + length])
            del buf[: pos + length]
            self._frame(fin, opcode, payload)

    def _frame(self, fin: bool, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self._events.append(Ping(payload))
        elif opcode == OP_PONG:
            self._events.append(Pong(payload))
        elif opcode == OP_CLOSE:
            self._events.append(self._close_frame(payload))
            self.close_received = True
        elif opcode == OP_CONTINUATION:
            if self._frag_opcode is None:
                raise ProtocolError("continuation frame outside a fragmented message")
            self._frag_parts.append(payload)
            self._frag_len += len(payload)
            if fin:
                opcode, payload = self._frag_opcode, b"".join(self._frag_parts)
                self._frag_opcode, self._frag_parts, self._frag_len = None, [], 0
                self._message(opcode, payload)
        else:
            if self._frag_opcode is not None:
                raise ProtocolError("new message inside a fragmented message")
            if fin:
                self._message(opcode, payload)
            else:
                self._frag_opcode, self._frag_parts, self._frag_len = opcode, [payload], len(
                    payload
                )

    def _message(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_TEXT:
            try:
                self._events.append(TextMessage(payload.decode("utf-8")))
            except UnicodeDecodeError:
                raise InvalidData("text message is not valid UTF-8") from None
        else:
            self._events.append(BinaryMessage(payload))

    @staticmethod
    def _close_frame(payload: bytes) -> CloseFrame:
        if not payload:
            return CloseFrame(CLOSE_NO_STATUS, "")
        if len(payload) == 1:
            raise ProtocolError("close frame with a 1-byte payload")
        code = int.from_bytes(payload[:2], "big")
        if not _valid_close_code(code):
            raise ProtocolError(f"invalid close code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidData("close reason is not valid UTF-8") from None
        return CloseFrame(code, reason)

    # -- outgoing -----------------------------------------------------------------------------

    def _data(self, opcode: int, payload: bytes) -> bytes:
        if self.close_sent:
            raise ConnectionClosed(CLOSE_ABNORMAL, "close already sent")
        step = self.max_frame_bytes
        if not step or len(payload) <= step:
            return encode_frame(opcode, payload)
        chunks = [payload[i : i + step] for i in range(0, len(payload), step)]
        frames = [
            encode_frame(opcode if i == 0 else OP_CONTINUATION, c, fin=i == len(chunks) - 1)
            for i, c in enumerate(chunks)
        ]
        return b"".join(frames)

    def send_text(self, text: str) -> bytes:
        return self._data(OP_TEXT, text.encode("utf-8"))

    def send_binary(self, data: bytes) -> bytes:
        return self._data(OP_BINARY, data)

    def ping(self, payload: bytes = b"") -> bytes:
        if len(payload) > MAX_CONTROL_PAYLOAD_BYTES:
            raise ValueError("ping payload longer than 125 bytes")
        return encode_frame(OP_PING, payload)

    def pong(self, payload: bytes) -> bytes:
        return encode_frame(OP_PONG, payload)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> bytes:
        """The close frame (once; b"" if already sent). 1005/1006 are sent as no code."""
        if self.close_sent:
            return b""
        self.close_sent = True
        if code in (CLOSE_NO_STATUS, CLOSE_ABNORMAL):
            return encode_frame(OP_CLOSE, b"")
        body = code.to_bytes(2, "big") + reason.encode("utf-8")[:MAX_CONTROL_PAYLOAD_BYTES - 2]
        return encode_frame(OP_CLOSE, body)


# --------------------------------------------------------------------------------------------
# The anyio adapter

#: (secure, host, port) -> an open byte stream (TCP, maybe SOCKS5, TLS when secure).
StreamOpener = Callable[[bool, str, int], Awaitable[ByteStream]]

_IO_ERRORS = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


async def _read_head(stream: ByteStream) -> tuple[bytes, bytes]:
    """Bytes up to the blank line ending the handshake response, and what followed it."""
    buf = b""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return buf[: end + 4], buf[end + 4 :]
        if len(buf) > MAX_HANDSHAKE_BYTES:
            raise HandshakeError("handshake response head too large")
        try:
            chunk = await stream.receive(READ_CHUNK_BYTES)
        except anyio.EndOfStream:
            raise HandshakeError("connection closed during the handshake") from None
        buf += chunk


class WebSocket:
    """An open client WebSocket. Use `connect`; always `aclose()` (idempotent, never raises)."""

    def __init__(
        self,
        stream: ByteStream,
        protocol: ClientProtocol,
        *,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT_S,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT_S,
    ) -> None:
        self._stream = stream
        self._proto = protocol
        self._write_timeout = write_timeout
        self._close_timeout = close_timeout
        self._send_lock = anyio.Lock()
        self._closed: ConnectionClosed | None = None  # set once closing or over
        self._stream_closed = False
        self.failure: ProtocolError | None = None  # set when the server broke RFC 6455
        self.last_received = anyio.current_time()

    @classmethod
    async def connect(
        cls,
        url: str,
        opener: StreamOpener,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_frame_bytes: int | None = None,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT_S,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT_S,
        headers: Sequence[tuple[str, str]] = (),
    ) -> WebSocket:
        """Open the stream with `opener` (its own errors pass through) and upgrade it."""
        try:
            target = parse_ws_url(url)
        except ValueError as exc:
            raise HandshakeError(str(exc)) from None
        key = new_key()
        request = handshake_request(target, key, headers)
        stream = await opener(target.secure, target.host, target.port)
        try:
            with anyio.fail_after(handshake_timeout):
                await stream.send(request)
                head, rest = await _read_head(stream)
            check_handshake_response(head, key)
        except TimeoutError:
            await anyio.aclose_forcefully(stream)
            raise HandshakeError(f"no handshake answer within {handshake_timeout:g} s") from None
        except _IO_ERRORS as exc:
            await anyio.aclose_forcefully(stream)
            raise HandshakeError(f"connection failed during the handshake: {exc!r}") from None
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
        proto = ClientProtocol(max_message_bytes, max_frame_bytes)
        proto.receive_data(rest)
        return cls(stream, proto, write_timeout=write_timeout, close_timeout=close_timeout)

    @property
    def closed(self) -> bool:
        """True once the connection is closing or over (sends then raise `ConnectionClosed`)."""
        return self._closed is not None

    async def _send(self, data: bytes, *, closing: bool = False) -> None:
        """Write all of `data` or drop the connection: shielded, bounded by write_timeout.
        Once closing, only the close frame itself (`closing=True`) still goes out."""
        if not data:
            return
        if (self._closed is not None and not closing) or self._stream_closed:
            raise self._closed or ConnectionClosed(CLOSE_ABNORMAL)
        async with self._send_lock:
            with anyio.CancelScope(shield=True):
                try:
                    with anyio.fail_after(self._write_timeout):
                        await self._stream.send(data)
                    return
                except TimeoutError:
                    why = "write timed out"
                except _IO_ERRORS as exc:
                    why = f"write failed: {exc!r}"
                await self._drop(ConnectionClosed(CLOSE_ABNORMAL, why))
        raise self._closed or ConnectionClosed(CLOSE_ABNORMAL, why)

    async def _drop(self, reason: ConnectionClosed) -> None:
        """End the stream now (no more I/O); `reason` unless one is already recorded."""
        if self._closed is None:
            self._closed = reason
        self._stream_closed = True
        await anyio.aclose_forcefully(self._stream)

    async def _read_event(self) -> WsEvent:
        """The next protocol event, reading the stream as needed. Raises `ProtocolError`, or
        `ConnectionClosed` (1006) when the stream ends or breaks."""
        while True:
            event = self._proto.next_event()
            if event is not None:
                return event
            if self._stream_closed:
                raise self._closed or ConnectionClosed(CLOSE_ABNORMAL)
            try:
                data = await self._stream.receive(READ_CHUNK_BYTES)
            except anyio.EndOfStream:
                await self._drop(ConnectionClosed(CLOSE_ABNORMAL, "closed without a close frame"))
                raise self._closed or ConnectionClosed(CLOSE_ABNORMAL) from None
            except _IO_ERRORS as exc:
                await self._drop(ConnectionClosed(CLOSE_ABNORMAL, f"read failed: {exc!r}"))
                raise self._closed or ConnectionClosed(CLOSE_ABNORMAL) from None
            self.last_received = anyio.current_time()
            self._proto.receive_data(data)

    async def send_text(self, text: str) -> None:
        if self._closed is not None:
            raise self._closed
        await self._send(self._proto.send_text(text))

    async def send_binary(self, data: bytes) -> None:
        if self._closed is not None:
            raise self._closed
        await self._send(self._proto.send_binary(data))

    async def ping(self, payload: bytes = b"") -> None:
        await self._send(self._proto.ping(payload))

    async def receive(self) -> str | bytes:
        """The next message; answers pings on the way. Raises `ConnectionClosed` at the end
        (after completing the closing handshake) and `ProtocolError` when the server breaks
        RFC 6455 (the connection is then failed with the matching close code; `failure`
        keeps the error)."""
        while True:
            if self._closed is not None:
                raise self._closed
            try:
                event = await self._read_event()
            except ProtocolError as exc:
                await self._fail(exc)
                raise
            if isinstance(event, TextMessage):
                return event.text
            if isinstance(event, BinaryMessage):
                return event.data
            if isinstance(event, Ping):
                await self._send(self._proto.pong(event.payload))
            elif isinstance(event, CloseFrame):
                await self._closing_handshake(event)
            # Pong: nothing to do beyond last_received

    async def _closing_handshake(self, frame: CloseFrame) -> None:
        """The server closed: echo its code (unless we sent a close already), end the stream."""
        if self._closed is None:
            self._closed = ConnectionClosed(frame.code, frame.reason)
        echo = self._proto.close(frame.code if frame.code != CLOSE_NO_STATUS else CLOSE_NORMAL)
        try:
            await self._send(echo, closing=True)
        except ConnectionClosed:
            pass
        await self._drop(self._closed)

    async def _fail(self, exc: ProtocolError) -> None:
        """Fail the connection: close frame with the error's code (best effort), then drop."""
        self.failure = exc
        if self._closed is None:
            self._closed = ConnectionClosed(exc.close_code, str(exc))
        try:
            await self._send(self._proto.close(exc.close_code, str(exc)[:100]), closing=True)
        except ConnectionClosed:
            pass
        await self._drop(self._closed)

    async def aclose(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Closing handshake from our side: send a close frame and wait (at most
        close_timeout) for the server's; then close the stream. Idempotent, never raises,
        safe in a cancelled scope. Not to be called while another task is in `receive()`."""
        if self._stream_closed:
            return
        with anyio.CancelScope(shield=True):
            if self._closed is None:
                self._closed = ConnectionClosed(code, reason)
            try:
                await self._send(self._proto.close(code, reason), closing=True)
                with anyio.move_on_after(self._close_timeout):
                    while not self._proto.close_received:
                        await self._read_event()
            except (ConnectionClosed, ProtocolError, anyio.BusyResourceError):
                pass
            await self._drop(self._closed)
