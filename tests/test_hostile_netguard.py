"""The outbound URL guard (issue 16, class 8) against every trick for reaching this host or
its network through someone else's URL: numeric spellings of 127.0.0.1, user info, fragment
and query tricks, names that resolve to loopback, private and metadata addresses.

A real HTTP server listens on 127.0.0.1 and counts connections: for every refused case it
must have seen none. The call sites — the client itself, webhooks, the LNURL lookups and the
Nostr provider probe — are each driven with the tricks; the operator's allow-private switch
still lets them reach 127.0.0.1 (with canonical URLs only).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from routstr import netguard
from routstr.app import lnurl_guarded
from routstr.cashu import lnurl
from routstr.client import AddressRefused, HttpClient
from routstr.discovery import NostrOptions, NostrService
from routstr.errors import InvalidRequest
from routstr.nostr import SecretKey
from routstr.walletstore import client_transport
from routstr.webhooks import check_target
from tests.test_client import RawConn, ok, raw_server

pytestmark = pytest.mark.anyio

SECRET = b'{"name": "internal service", "secret": "do not show"}'

# {port} is the counting server's; every one of these names 127.0.0.1 (or this host) somehow
LOOPBACK_TRICKS = [
    "http://127.1:{port}/",
    "http://127.0.1:{port}/",
    "http://2130706433:{port}/",
    "http://0x7f000001:{port}/",
    "http://0x7F000001:{port}/",
    "http://0177.0.0.1:{port}/",
    "http://0x7f.0.0.1:{port}/",
    "http://127.000.000.001:{port}/",
    "http://127.0.0.01:{port}/",
    "http://127.0.0.1.:{port}/",
    "http://0:{port}/",
    "http://0.0.0.0:{port}/",
    "http://127.0.0.1:{port}/",
    "http://127.9.9.9:{port}/",
    "http://localhost:{port}/",
    "http://LocalHost.:{port}/",
    "http://api.localhost:{port}/",
    "http://[::1]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://[::ffff:7f00:1]:{port}/",
    "http://[64:ff9b::7f00:1]:{port}/",
    "http://[2002:7f00:1::]:{port}/",
    "http://[::1%25lo]:{port}/",
    "http://%31%32%37.0.0.1:{port}/",
    "http://evil.example@127.0.0.1:{port}/",
    "http://evil.example:x@127.0.0.1:{port}/",
    "http://127.0.0.1:{port}#@evil.example/",
    "http://127.0.0.1:{port}?@evil.example/",
    "http://127.0.0.1:{port}\\@evil.example/",
    "http://127.0.0.1:{port}/ HTTP/1.1\r\nX:",
    "ftp://127.0.0.1:{port}/",
]
# the numeric and parser tricks are refused even when the operator allows private addresses
SYNTAX_TRICKS = [u for u in LOOPBACK_TRICKS if not any(
    ok_form in u for ok_form in ("//127.0.0.1:{port}/", "//127.9.9.9:", "//localhost:", "//0.0.0.0:",
                                 "//[::1]:", "//[::ffff:", "//[64:ff9b", "//[2002:",
                                 "LocalHost.", "api.localhost", "127.0.0.1:{port}?@"))]
# other networks: a guard must refuse them without even trying (each would hang or leak)
PRIVATE_LITERALS = [
    "https://10.0.0.5/", "https://169.254.169.254/latest/meta-data/", "http://192.168.1.1/",
    "http://172.16.0.1/", "http://100.64.0.1/", "http://224.0.0.1/",
    "http://255.255.255.255/", "http://[fe80::1]/", "http://[fc00::1]/", "http://[ff02::1]/",
    "http://[::]/", "http://[::ffff:169.254.169.254]/", "http://198.18.0.1/",
    "http://[fec0::1]/", "http://[::127.0.0.1]/", "http://[64:ff9b:1::a00:5]/",
]
PUBLIC = ["https://8.8.8.8/", "https://[2606:4700:4700::1111]/x", "https://example.com/a?b=c",
          "http://abcdefghijklmnop.onion/", "https://x_y.example.org./"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def counting_server() -> AsyncIterator[tuple[int, list[int]]]:
    """An HTTP server on 127.0.0.1 that answers anything with an internal-looking JSON."""

    async def handler(conn: RawConn, index: int) -> None:
        while await conn.read_request() is not None:
            await conn.send(ok(SECRET, b"content-type: application/json\r\n"))

    async with raw_server(handler) as (port, count):
        yield port, count


def _urls(templates: list[str], port: int) -> list[str]:
    return [t.format(port=port) for t in templates]


# ---- the guard and the client ---------------------------------------------------------------

@pytest.mark.parametrize("template", LOOPBACK_TRICKS)
async def test_client_refuses_every_loopback_trick_without_connecting(template: str) -> None:
    async with counting_server() as (port, count), HttpClient(connect_timeout=2) as client:
        with pytest.raises(AddressRefused):
            await client.fetch("GET", template.format(port=port), guard=netguard.Guard())
        assert count[0] == 0


async def test_a_name_that_resolves_to_this_host_is_refused_after_resolution() -> None:
    """The check is on the resolved address, not the name: this host's own name (which no
    rule lists) resolves to loopback or a private address and is refused at connect time."""
    name = socket.gethostname().lower()
    resolved = {str(info[4][0])
                for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    assert resolved and all(netguard.forbidden_ip(ipaddress.ip_address(a)) for a in resolved), (
        f"test premise: this host's name {name} resolves to a non-public address ({resolved})")
    netguard.Guard().check_url(f"http://{name}/")  # the URL alone looks fine
    async with counting_server() as (port, count), HttpClient(connect_timeout=2) as client:
        with pytest.raises(AddressRefused):
            await client.fetch("GET", f"http://{name}:{port}/", guard=netguard.Guard())
        assert count[0] == 0
        # the same name, unguarded (operator configuration), connects: the server is real
        assert (await client.fetch("GET", f"http://{name}:{port}/"))[2] == SECRET
        assert count[0] == 1


@pytest.mark.parametrize("url", PRIVATE_LITERALS)
async def test_private_and_metadata_addresses_are_refused_at_once(url: str) -> None:
    async with HttpClient(connect_timeout=5) as client:
        with anyio.fail_after(1):  # refused before any connection attempt
            with pytest.raises(AddressRefused):
                await client.fetch("GET", url, guard=netguard.Guard())


@pytest.mark.parametrize("url", PUBLIC)
def test_public_urls_pass_the_url_check(url: str) -> None:
    netguard.Guard().check_url(url)


@pytest.mark.parametrize("template", SYNTAX_TRICKS)
async def test_allow_private_still_refuses_the_tricks(template: str) -> None:
    async with counting_server() as (port, count), HttpClient(connect_timeout=2) as client:
        with pytest.raises(AddressRefused):
            await client.fetch("GET", template.format(port=port),
                               guard=netguard.Guard(allow_private=True))
        assert count[0] == 0


async def test_allow_private_reaches_loopback_and_unguarded_pools_are_separate() -> None:
    async with counting_server() as (port, count):
        url = f"http://127.0.0.1:{port}/"
        async with HttpClient(connect_timeout=2) as client:
            assert (await client.fetch("GET", url))[2] == SECRET  # operator config: unguarded
            assert count[0] == 1
            with pytest.raises(AddressRefused):  # the pooled connection is not reused
                await client.fetch("GET", url, guard=netguard.Guard())
            allowed = netguard.Guard(allow_private=True)
            assert (await client.fetch("GET", url, guard=allowed))[2] == SECRET
            assert count[0] == 2
            with netguard.foreign(), pytest.raises(AddressRefused):
                await client.fetch("GET", url)  # the client's foreign_guard: strict by default
            assert count[0] == 2
        async with HttpClient(foreign_guard=netguard.Guard(allow_private=True)) as client:
            with netguard.foreign():
                assert (await client.fetch("GET", url))[2] == SECRET
            assert count[0] == 3


# ---- webhooks -------------------------------------------------------------------------------

@pytest.mark.parametrize("template", LOOPBACK_TRICKS)
async def test_webhook_registration_refuses_the_tricks(template: str) -> None:
    async with counting_server() as (port, count):
        with pytest.raises(InvalidRequest):
            await check_target(template.format(port=port), allow_private=False)
        assert count[0] == 0


@pytest.mark.parametrize("template", SYNTAX_TRICKS)
async def test_webhook_registration_with_allow_private_still_refuses_the_tricks(
        template: str) -> None:
    with pytest.raises(InvalidRequest):
        await check_target(template.format(port=8080), allow_private=True)


@pytest.mark.parametrize("url", PRIVATE_LITERALS)
async def test_webhook_registration_refuses_private_literals(url: str) -> None:
    with pytest.raises(InvalidRequest):
        await check_target(url, allow_private=False)
    with pytest.raises(InvalidRequest):  # through a proxy (no local DNS) literals still count
        await check_target(url, allow_private=False, resolve=False)


# ---- LNURL (Refund-LNURL, payouts) ----------------------------------------------------------

LNURL_TRICKS = ["alice@2130706433:{port}", "alice@0x7f000001:{port}", "alice@127.1:{port}",
                "alice@0177.0.0.1:{port}", "https://127.1:{port}/lnurlp/alice",
                "https://x@127.0.0.1:{port}/", "https://127.0.0.1:{port}/#frag",
                "http://2130706433:{port}/.well-known/lnurlp/alice"]


def test_refund_lnurl_tricks_are_refused_when_the_header_is_read(
        node_factory: Any, tmp_path: Path) -> None:
    """Refund-LNURL is checked when the request carries it: 400, nothing stored."""
    from tests.reliability.support import ADMIN, new_key

    node = node_factory("--admin-token", ADMIN, "--upstream-base-url", "http://127.0.0.1:9")
    key = new_key(node, 1_000_000)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    for template in LNURL_TRICKS:
        status, doc = node.json("POST", "/v1/chat/completions", chat,
                                {"Authorization": f"Bearer {key}",
                                 "Refund-LNURL": template.format(port=8080)})
        assert status == 400 and doc["error"]["code"] == "invalid_header", (template, doc)


@asynccontextmanager
async def lnurl_server(callback: str) -> AsyncIterator[tuple[int, list[int]]]:
    """A LUD-16 service on 127.0.0.1: payRequest with `callback` ({port}: its own), invoices
    whose amount is what was asked (1 000 msat → ``lnbcrt10n1…``)."""

    async def handler(conn: RawConn, index: int) -> None:
        while (req := await conn.read_request()) is not None:
            if b"/cb" in req.split(b"\r\n", 1)[0]:
                doc: dict[str, Any] = {"pr": "lnbcrt10n1pjunk"}
            else:
                doc = {"tag": "payRequest", "callback": callback.format(port=port),
                       "minSendable": 1000, "maxSendable": 10_000, "metadata": "[]"}
            await conn.send(ok(json.dumps(doc).encode(), b"content-type: application/json\r\n"))

    async with raw_server(handler) as (port, count):
        yield port, count


async def test_lnurl_lookup_never_reaches_loopback_by_default() -> None:
    async with lnurl_server("http://127.0.0.1:{port}/cb") as (port, count), \
            HttpClient(connect_timeout=2) as http:
        for address in (f"alice@127.0.0.1:{port}", f"http://127.0.0.1:{port}/x",
                        f"alice@localhost:{port}", f"alice@{socket.gethostname()}:{port}"):
            with pytest.raises(lnurl.LnurlError):
                await lnurl.fetch_invoice(lnurl_guarded(client_transport(http)), address, 1000)
        assert count[0] == 0
        for url in ("https://10.0.0.5/.well-known/lnurlp/a", "https://169.254.169.254/"):
            with anyio.fail_after(1), pytest.raises(lnurl.LnurlError):
                await lnurl.fetch_pay_request(lnurl_guarded(client_transport(http)), url)


async def test_lnurl_with_allow_private_reaches_loopback_but_not_a_tricky_callback() -> None:
    allowed = HttpClient(connect_timeout=2, foreign_guard=netguard.Guard(allow_private=True))
    async with counting_server() as (victim, hits), allowed as http:
        transport = lnurl_guarded(client_transport(http))
        async with lnurl_server("http://127.0.0.1:{port}/cb") as (port, _count):
            assert await lnurl.fetch_invoice(transport, f"alice@127.0.0.1:{port}", 1000) \
                == "lnbcrt10n1pjunk"
        for callback in (f"http://2130706433:{victim}/cb", f"http://127.1:{victim}/cb",
                         f"http://x@127.0.0.1:{victim}/cb"):
            async with lnurl_server(callback) as (port, _count):
                with pytest.raises(lnurl.LnurlError):
                    await lnurl.fetch_invoice(transport, f"alice@127.0.0.1:{port}", 1000)
        assert hits[0] == 0


# ---- Nostr provider probe (/v1/providers) ---------------------------------------------------

def _prober(http: HttpClient, allow_private: bool) -> NostrService:
    options = NostrOptions((), providers_refresh=60, allow_private=allow_private)
    return NostrService(SecretKey((7).to_bytes(32, "big")), options, lambda: None, http)


async def test_provider_probe_refuses_the_tricks_and_shows_nothing_internal() -> None:
    async with counting_server() as (port, count), HttpClient(connect_timeout=2) as http:
        prober = _prober(http, allow_private=False)
        for url in _urls(LOOPBACK_TRICKS, port) + [f"http://{socket.gethostname()}:{port}"]:
            health = await prober.probe(url)
            assert health["endpoint"] != "info", (url, health)
            assert "secret" not in json.dumps(health), url
        assert count[0] == 0


async def test_provider_probe_with_allow_private_refuses_tricks_and_query_games() -> None:
    async with counting_server() as (port, count), HttpClient(connect_timeout=2) as http:
        prober = _prober(http, allow_private=True)
        tricks = _urls(SYNTAX_TRICKS, port) + [
            f"http://127.0.0.1:{port}?", f"http://127.0.0.1:{port}/?x=", f"http://127.0.0.1:{port}#"]
        for url in tricks:  # "?"/"#" would turn ".../v1/info" into a query or a fragment
            health = await prober.probe(url)
            assert health["endpoint"] != "info", (url, health)
        assert count[0] == 0
        health = await prober.probe(f"http://127.0.0.1:{port}")  # the operator's switch works
        assert health["endpoint"] == "info" and health["json"]["secret"] == "do not show"
        assert count[0] == 1


# ---- through a SOCKS5 proxy (Tor) -----------------------------------------------------------

async def test_through_socks_the_url_is_checked_and_names_go_to_the_proxy() -> None:
    """With a proxy the proxy resolves names: the URL rules still hold (literals, localhost,
    numeric tricks never reach the proxy), a name — an .onion — is handed over unresolved."""
    from tests.support.socks5 import ConnectRequest, Socks5Server

    async with counting_server() as (port, count):
        with Socks5Server({"hidden.onion": ("127.0.0.1", port)}) as socks:
            proxy = f"socks5h://127.0.0.1:{socks.port}"
            async with HttpClient(proxy=proxy, connect_timeout=2) as client:
                for template in ("http://127.0.0.1:{port}/", "http://localhost:{port}/",
                                 "http://2130706433:{port}/", "http://[::1]:{port}/"):
                    with pytest.raises(AddressRefused):
                        await client.fetch("GET", template.format(port=port),
                                           guard=netguard.Guard())
                assert socks.requests == [] and count[0] == 0
                status, _, body = await client.fetch("GET", "http://hidden.onion/",
                                                     guard=netguard.Guard())
                assert (status, body) == (200, SECRET)
            assert socks.requests == [ConnectRequest("domain", "hidden.onion", 80)]


async def test_redirects_are_never_followed() -> None:
    """A foreign server that answers 302 to an internal address gets its 302 back as an answer
    (an LNURL error here); the internal address sees no connection."""
    async with counting_server() as (victim, hits):
        async def handler(conn: RawConn, index: int) -> None:
            while await conn.read_request() is not None:
                await conn.send(b"HTTP/1.1 302 Found\r\ncontent-length: 0\r\nlocation: "
                                b"http://127.0.0.1:%d/\r\n\r\n" % victim)

        allowed = HttpClient(foreign_guard=netguard.Guard(allow_private=True))
        async with raw_server(handler) as (port, _count), allowed as http:
            with pytest.raises(lnurl.LnurlError):
                await lnurl.fetch_invoice(lnurl_guarded(client_transport(http)), f"alice@127.0.0.1:{port}", 1000)
            status, _, _ = await http.fetch("GET", f"http://127.0.0.1:{port}/",
                                            guard=netguard.Guard(allow_private=True))
            assert status == 302
        assert hits[0] == 0
