"""Scripted WebSocket servers for tests: server-side frames, the server's half of the
handshake, reading a client's masked frames, and an in-process listener running a script."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from anyio.abc import ByteStream, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from routstr import websocket as ws


def frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0,
          length: int | None = None, masked: bool = False) -> bytes:
    """A frame as a server would send it (unmasked unless `masked`)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | rsv | opcode
    mbit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 1 << 16:
        head = bytes((b0, mbit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, mbit | 127)) + n.to_bytes(8, "big")
    if masked:
        return head + b"\x00\x00\x00\x00" + payload
    return head + payload


def unmask(client_frame: bytes) -> tuple[int, bool, bytes]:
    """(opcode, fin, payload) of one client frame, checking that it is masked."""
    b0, b1 = client_frame[0], client_frame[1]
    assert b1 & 0x80, "client frames must be masked"
    n, pos = b1 & 0x7F, 2
    if n == 126:
        n, pos = int.from_bytes(client_frame[2:4], "big"), 4
    elif n == 127:
        n, pos = int.from_bytes(client_frame[2:10], "big"), 10
    mask = client_frame[pos:pos + 4]
    body = client_frame[pos + 4:pos + 4 + n]
    assert len(body) == n
    return b0 & 0x0F, bool(b0 & 0x80), bytes(b ^ mask[i % 4] for i, b in enumerate(body))


Script = Callable[[ByteStream, BufferedByteReceiveStream], Awaitable[None]]


async def server_handshake(stream: ByteStream, reader: BufferedByteReceiveStream,
                           extra: bytes = b"") -> None:
    head = await reader.receive_until(b"\r\n\r\n", 16384)
    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + ws.GUID.encode()).digest())
    await stream.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                      + extra)


async def read_client_frame(reader: BufferedByteReceiveStream) -> tuple[int, bool, bytes]:
    head = await reader.receive_exactly(2)
    n = head[1] & 0x7F
    ext = b""
    if n == 126:
        ext = await reader.receive_exactly(2)
    elif n == 127:
        ext = await reader.receive_exactly(8)
    length = int.from_bytes(ext, "big") if ext else n
    rest = await reader.receive_exactly(4 + length)
    return unmask(head + ext + rest)


@asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[str]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def handle(stream: SocketStream) -> None:
        async with stream:
            try:
                await script(stream, BufferedByteReceiveStream(stream))
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                    anyio.ClosedResourceError, OSError):
                pass

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield f"ws://127.0.0.1:{port}/relay"
        tg.cancel_scope.cancel()


async def tcp_opener(secure: bool, host: str, port: int) -> ByteStream:
    assert not secure
    return await anyio.connect_tcp(host, port)
