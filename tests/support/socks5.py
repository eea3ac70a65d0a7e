"""A small SOCKS5 server for tests (RFC 1928 CONNECT only; RFC 1929 user/password optional).

It runs in a background thread with its own event loop, like `ScriptedUpstream`, and records the
address every CONNECT asked for *as the client sent it*: a host name arriving here (rather than an
IP address) proves the client left DNS to the proxy, which is what makes ``.onion`` work over Tor::

    with ScriptedUpstream() as up, Socks5Server({"abc.onion": ("127.0.0.1", up.port)}) as socks:
        client = HttpClient(proxy=socks.url)
        ... GET http://abc.onion/v1/models ...
        assert socks.requested_hosts == ["abc.onion"]

Only mapped names, or IP literals on the loopback range, are ever connected to; anything else
gets reply 4 (host unreachable), so a test can never reach out of the machine by accident.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import anyio
from anyio.abc import ByteStream

from tests.support.upstream import BackgroundServer

_IO_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)


@dataclass(frozen=True)
class ConnectRequest:
    atyp: str  # "domain", "ipv4" or "ipv6"
    host: str
    port: int


class _Short(Exception):
    pass


async def _read_exactly(stream: ByteStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            buf += await stream.receive(n - len(buf))
        except _IO_ERRORS as exc:
            raise _Short() from exc
    return buf


class Socks5Server(BackgroundServer):
    """SOCKS5 CONNECT proxy on 127.0.0.1:port; `mapping` sends names to local (host, port)s."""

    def __init__(
        self,
        mapping: dict[str, tuple[str, int]] | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        super().__init__()
        self.mapping = {k.lower(): v for k, v in (mapping or {}).items()}
        self.username = username
        self.password = password
        self.requests: list[ConnectRequest] = []
        self.auth_attempts: list[tuple[str, str]] = []

    def __enter__(self) -> Socks5Server:
        self.start()
        return self

    @property
    def url(self) -> str:
        if self.username is not None:
            return f"socks5h://{self.username}:{self.password or ''}@127.0.0.1:{self.port}"
        return f"socks5h://127.0.0.1:{self.port}"

    @property
    def requested_hosts(self) -> list[str]:
        return [r.host for r in self.requests]

    def _resolve(self, host: str, port: int) -> tuple[str, int] | None:
        mapped = self.mapping.get(host.lower())
        if mapped is not None:
            return mapped
        try:
            if ipaddress.ip_address(host).is_loopback:
                return host, port
        except ValueError:
            pass
        return None

    async def handle(self, client: ByteStream) -> None:
        try:
            await self._negotiate_and_relay(client)
        except _Short:
            pass

    async def _negotiate_and_relay(self, client: ByteStream) -> None:
        ver, nmethods = await _read_exactly(client, 2)
        methods = await _read_exactly(client, nmethods)
        if ver != 5:
            return
        wanted = 0x02 if self.username is not None else 0x00
        if wanted not in methods:
            await client.send(b"\x05\xff")
            return
        await client.send(bytes([5, wanted]))
        if wanted == 0x02:
            _v, ulen = await _read_exactly(client, 2)
            user = (await _read_exactly(client, ulen)).decode()
            (plen,) = await _read_exactly(client, 1)
            password = (await _read_exactly(client, plen)).decode()
            self.auth_attempts.append((user, password))
            if (user, password) != (self.username, self.password or ""):
                await client.send(b"\x01\x01")
                return
            await client.send(b"\x01\x00")

        ver, cmd, _rsv, atyp = await _read_exactly(client, 4)
        if atyp == 1:
            host = str(ipaddress.IPv4Address(await _read_exactly(client, 4)))
            kind = "ipv4"
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(await _read_exactly(client, 16)))
            kind = "ipv6"
        elif atyp == 3:
            (length,) = await _read_exactly(client, 1)
            host = (await _read_exactly(client, length)).decode("idna")
            kind = "domain"
        else:
            await client.send(b"\x05\x08\x00\x01" + bytes(6))
            return
        port = int.from_bytes(await _read_exactly(client, 2), "big")
        self.requests.append(ConnectRequest(kind, host, port))
        if cmd != 1:
            await client.send(b"\x05\x07\x00\x01" + bytes(6))  # command not supported
            return
        target = self._resolve(host, port)
        if target is None:
            await client.send(b"\x05\x04\x00\x01" + bytes(6))  # host unreachable
            return
        try:
            upstream = await anyio.connect_tcp(*target)
        except OSError:
            await client.send(b"\x05\x05\x00\x01" + bytes(6))  # connection refused
            return
        async with upstream:
            await client.send(b"\x05\x00\x00\x01" + bytes([127, 0, 0, 1]) + b"\x00\x00")
            await self._relay(client, upstream)

    async def _relay(self, a: ByteStream, b: ByteStream) -> None:
        async with anyio.create_task_group() as tg:

            async def pump(src: ByteStream, dst: ByteStream) -> None:
                try:
                    while True:
                        data = await src.receive(65536)
                        await dst.send(data)
                except _IO_ERRORS:
                    pass
                tg.cancel_scope.cancel()  # either side gone: tear the tunnel down

            tg.start_soon(pump, a, b)
            tg.start_soon(pump, b, a)


__all__ = ["ConnectRequest", "Socks5Server"]
