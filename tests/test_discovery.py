"""Announcing and discovering nodes on Nostr, against a REAL relay (nostr-relay from PyPI, on
loopback) and scripted bad relays:

- the node (a real subprocess) announces within 5 s; an independent client reads the event back
  from the relay, which verified its id and BIP-340 signature before storing it; a forged copy
  is refused by that relay;
- a second node lists the first at /v1/providers/ (and probes its /v1/info);
- a relay killed and restarted (with an empty database) gets the announcement again;
- hanging, resetting, garbage-sending, oversize and forging relays are counted, never fatal,
  and never stall the event loop; an onion relay is reached through SOCKS5.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream

from routstr import nostr
from routstr import websocket as ws
from routstr.client import HttpClient
from routstr.discovery import Directory, NostrOptions, NostrService, load_identity
from routstr.nostr import AnnouncementFacts, SecretKey
from tests.support.node import NodeProcess
from tests.support.relay import RelayProcess, free_port, own_relay, relay  # noqa: F401
from tests.support.socks5 import Socks5Server
from tests.support.wsserver import frame, read_client_frame, scripted, server_handshake

ANNOUNCED_WITHIN_S = 5.0
ADMIN_TOKEN = "adm-nostr-test-token-0123456789abcdef"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _key(n: int) -> SecretKey:
    return SecretKey(n.to_bytes(32, "big"))


def _facts(url: str, d: str = "node") -> AnnouncementFacts:
    return AnnouncementFacts(d=d, endpoint_urls=(url,), mints=("http://127.0.0.1:9",),
                             version="0.1.0", name="Test", about="A test node")


# ------------------------------------------------------------------------------------ directory


def test_directory_keeps_the_newest_verified_announcement() -> None:
    d = Directory()
    k1, k2 = _key(11), _key(12)
    old = nostr.build_announcement(k1, _facts("https://a.example"), 1000).to_dict()
    new = nostr.build_announcement(k1, _facts("https://a2.example"), 2000).to_dict()
    assert d.consider(old) == "accepted"
    assert d.consider(old) == "duplicate"
    assert d.consider(new) == "accepted"
    assert d.consider(nostr.build_announcement(k1, _facts("https://x"), 1500).to_dict()) == (
        "stale")
    forged = dict(new, created_at=3000)  # claims a verified id: nothing new
    assert d.consider(forged) == "duplicate"
    forged["id"] = nostr.event_id(forged["pubkey"], 3000, 38421, forged["tags"],
                                  forged["content"])
    assert d.consider(forged) == "invalid_signature"
    # a corrupted copy arriving first must not shadow the genuine event with the same id
    genuine = nostr.build_announcement(k1, _facts("https://a3.example"), 4000).to_dict()
    assert d.consider(dict(genuine, content="{}")) == "invalid_signature"
    assert d.consider(dict(genuine, content="{}")) == "invalid_signature"
    assert d.consider(genuine) == "accepted"
    assert d.consider({"kind": 38421}) == "malformed"
    assert d.consider(nostr.sign_event(k2, 1, [], "note", 5).to_dict()) == "ignored"
    assert d.consider(nostr.sign_event(k2, 38421, [["d", "x"]], "{}", 5).to_dict()) == (
        "incomplete")
    local = nostr.build_announcement(k2, _facts("http://localhost:8000"), 5).to_dict()
    assert d.consider(local) == "ignored"  # routstr-core skips its default URL too
    listing = d.listing(None, False)
    assert [p["endpoint_url"] for p in listing] == ["https://a3.example"]
    assert listing[0]["pubkey"] == k1.pubkey_hex and listing[0]["created_at"] == 4000


def test_directory_listing_dedupes_endpoints_filters_and_caps() -> None:
    d = Directory()
    for i in range(60):
        ev = nostr.build_announcement(_key(100 + i), _facts(f"https://n{i % 50}.example"), 1000 + i)
        assert d.consider(ev.to_dict()) == "accepted"
    listing = d.listing(None, False)
    assert len(listing) == 42
    assert len({p["endpoint_url"] for p in listing}) == 42
    assert listing[0]["created_at"] == 1059  # newest first
    one = d.listing(_key(105).pubkey_hex, True)
    assert len(one) == 1 and one[0]["health"]["endpoint"] == "pending"
    small = Directory(max_entries=3)
    for i in range(5):
        small.consider(nostr.build_announcement(_key(200 + i), _facts(f"https://s{i}"), i + 1)
                       .to_dict())
    assert sorted(p["created_at"] for p in small.listing(None, False)) == [3, 4, 5]


def test_identity_is_generated_once_and_kept(tmp_path: Path) -> None:
    from routstr.db import Database

    db = Database(tmp_path / "id.sqlite3")
    try:
        first = load_identity(db, "")
        assert load_identity(db, "").pubkey_hex == first.pubkey_hex
        given = load_identity(db, "67dea2ed018072d675f5415ecfaed7d2597555e202d85b3d65ea4e58d2d92ffa")
        assert given.pubkey_hex != first.pubkey_hex
        assert load_identity(db, "").pubkey_hex == first.pubkey_hex
    finally:
        db.close()


def test_config_validates_nostr_settings_without_echoing_secrets() -> None:
    from routstr.config import ConfigError, load_config

    good = "nsec1vl029mgpspedva04g90vltkh6fvh240zqtv9k0t9af8935ke9laqsnlfe5"
    config = load_config(["--nsec", good, "--relays", "wss://a.example/, ws://b.onion:81"], {})
    assert config.relays == ("wss://a.example", "ws://b.onion:81")
    assert dict(config.public_items())["nsec"] == "********"
    bad = good[:-1] + ("q" if good[-1] != "q" else "p")
    for value in (bad, "nsec1short", "00" * 32, "secret words"):
        with pytest.raises(ConfigError) as err:
            load_config(["--nsec", value], {})
        assert value not in str(err.value) and "--nsec" in str(err.value)
    for relays in ("https://relay.example", "wss://", "relay.example"):
        with pytest.raises(ConfigError):
            load_config(["--relays", relays], {})


def test_the_relay_accepts_our_event_ids(relay: RelayProcess) -> None:  # noqa: F811
    """An independent NIP-01/BIP-340 implementation (the relay's) agrees with our ids and
    signatures, escapes included."""
    key = _key(81)
    now = int(time.time())
    for i, content in enumerate(['line\nquote" back\\ tab\t é 🎉 \u2028 </script> /',
                                 "\b\f\r", ""]):
        event = nostr.sign_event(key, 1, [["t", "é\n"], ["x"]], content, now + i)
        answer = relay.publish(event.to_dict())
        assert answer == ["OK", event.id, True, ""], (content, answer)


# ------------------------------------------------------------------------------------ in-process


@asynccontextmanager
async def running(service: NostrService) -> AsyncIterator[NostrService]:
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        try:
            yield service
        finally:
            tg.cancel_scope.cancel()


def _service(relays: list[str], http: HttpClient, key: SecretKey, url: str,
             **opts: Any) -> NostrService:
    base: dict[str, Any] = dict(ping_interval=0.5, pong_timeout=0.5, ok_timeout=1.0,
                                handshake_timeout=0.5, facts_poll=0.2)
    base.update(opts)
    return NostrService(key, NostrOptions(tuple(relays), **base), lambda: _facts(url), http)


async def _relay_has(rp: RelayProcess, pubkey: str, within: float) -> list[dict[str, Any]]:
    return await anyio.to_thread.run_sync(
        lambda: rp.wait_for({"kinds": [38421], "authors": [pubkey]}, within))


async def _json_frames(reader: BufferedByteReceiveStream, stream: ByteStream,
                       want: str) -> list[Any]:
    """Read client frames (answering pings) until a text message whose verb is `want`."""
    while True:
        opcode, _fin, payload = await read_client_frame(reader)
        if opcode == ws.OP_PING:
            await stream.send(frame(ws.OP_PONG, payload))
        elif opcode == ws.OP_CLOSE:
            raise anyio.EndOfStream
        elif opcode == ws.OP_TEXT:
            msg = json.loads(payload)
            if msg[0] == want:
                return list(msg)


@pytest.mark.anyio
async def test_bad_relays_are_counted_and_never_stop_the_good_one(
        relay: RelayProcess) -> None:  # noqa: F811
    signer = _key(77)

    async def hang(stream: ByteStream, reader: BufferedByteReceiveStream) -> None:
        await anyio.sleep(60)  # accepts, never answers the handshake

    async def reset(stream: ByteStream, reader: BufferedByteReceiveStream) -> None:
        await reader.receive_until(b"\r\n\r\n", 16384)  # then the connection closes

    async def garbage(stream: ByteStream, reader: BufferedByteReceiveStream) -> None:
        await server_handshake(stream, reader)
        await stream.send(b"\x8f\x05hello")  # reserved opcode: a protocol error

    async def silent(stream: ByteStream, reader: BufferedByteReceiveStream) -> None:
        await server_handshake(stream, reader)
        await anyio.sleep(60)  # never answers anything, not even a ping

    async def hostile(stream: ByteStream, reader: BufferedByteReceiveStream) -> None:
        await server_handshake(stream, reader)
        event = await _json_frames(reader, stream, "EVENT")
        await stream.send(frame(ws.OP_TEXT, json.dumps(
            ["OK", event[1]["id"], False, "blocked: \x1b[31mnot here"]).encode()))
        req = await _json_frames(reader, stream, "REQ")
        sub = req[1]
        good = nostr.build_announcement(signer, _facts("https://good.example"), 1000).to_dict()
        out = [b"not json", b'["WHAT"]', b'["NOTICE","hello\\nfake log line"]']
        for i in range(200):  # a flood of forged events, each a new id
            forged = dict(good, created_at=2000 + i)
            forged["id"] = nostr.event_id(forged["pubkey"], forged["created_at"], 38421,
                                          forged["tags"], forged["content"])
            out.append(json.dumps(["EVENT", sub, forged]).encode())
        out.append(json.dumps(["EVENT", sub, good]).encode())
        out.append(json.dumps(["EOSE", sub]).encode())
        await stream.send(b"".join(frame(ws.OP_TEXT, m) for m in out)
                          + frame(ws.OP_BINARY, b"\x00\x01"))
        await stream.send(b"\x81\x7f" + (1 << 40).to_bytes(8, "big"))  # 1 TB declared
        await anyio.sleep(60)

    key = _key(78)
    max_gap = 0.0

    async def heartbeat() -> None:
        nonlocal max_gap
        while True:
            t = anyio.current_time()
            await anyio.sleep(0.01)
            max_gap = max(max_gap, anyio.current_time() - t - 0.01)

    async with HttpClient(connect_timeout=2.0) as http, \
            scripted(hang) as u_hang, scripted(reset) as u_reset, \
            scripted(garbage) as u_garbage, scripted(silent) as u_silent, \
            scripted(hostile) as u_hostile:
        urls = {"hang": u_hang, "reset": u_reset, "garbage": u_garbage, "silent": u_silent,
                "hostile": u_hostile}
        service = _service([*urls.values(), relay.url], http, key, "https://me.example",
                           providers_refresh=30.0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            started = anyio.current_time()
            async with running(service):
                stored = await _relay_has(relay, key.pubkey_hex, ANNOUNCED_WITHIN_S)
                took = anyio.current_time() - started
                await anyio.sleep(2.5)  # let every bad relay misbehave (and be retried)
            tg.cancel_scope.cancel()
    assert stored and stored[0]["id"] == service.current.id and took < ANNOUNCED_WITHIN_S  # type: ignore[union-attr]
    c = service.counters
    assert c.get("routstr_nostr_published_total", relay=relay.url, result="accepted") >= 1
    assert c.get("routstr_nostr_connects_total", relay=urls["hang"], result="failed") >= 1
    assert c.get("routstr_nostr_connects_total", relay=urls["reset"], result="failed") >= 2
    assert c.get("routstr_nostr_disconnects_total", relay=urls["garbage"],
                 reason="protocol_error") >= 2
    assert c.get("routstr_nostr_disconnects_total", relay=urls["silent"], reason="hung") >= 1
    h = urls["hostile"]
    assert c.get("routstr_nostr_published_total", relay=h, result="rejected") >= 1
    assert c.get("routstr_nostr_malformed_total", relay=h, what="message") >= 3
    assert c.get("routstr_nostr_notices_total", relay=h) >= 1
    invalid = c.get("routstr_nostr_events_total", relay=h, outcome="invalid_signature")
    assert invalid >= 200 and invalid % 200 == 0  # every forged copy checked, once per visit
    assert c.get("routstr_nostr_events_total", relay=h, outcome="accepted") == 1
    assert c.get("routstr_nostr_disconnects_total", relay=h, reason="protocol_error") >= 1
    assert [p["endpoint_url"] for p in service.directory.listing(signer.pubkey_hex, False)] == [
        "https://good.example"]
    assert max_gap < 0.25, f"event loop stalled for {max_gap:.3f} s"
    extra = service.metrics_extra()
    assert "routstr_nostr_malformed_total" in extra and "routstr_nostr_providers" in extra


@pytest.mark.anyio
async def test_onion_relay_through_socks5(relay: RelayProcess) -> None:  # noqa: F811
    key = _key(79)
    with Socks5Server({"relayrelayrelay.onion": ("127.0.0.1", relay.port)}) as socks:
        async with HttpClient(proxy=socks.url, connect_timeout=5.0) as http:
            service = _service(["ws://relayrelayrelay.onion"], http, key, "http://me.onion")
            async with running(service):
                stored = await _relay_has(relay, key.pubkey_hex, ANNOUNCED_WITHIN_S)
    assert stored and stored[0]["tags"][1] == ["u", "http://me.onion"]
    assert "relayrelayrelay.onion" in socks.requested_hosts  # the name went to the proxy


@pytest.mark.anyio
async def test_changed_facts_are_announced_again(relay: RelayProcess) -> None:  # noqa: F811
    key = _key(80)
    urls = ["https://first.example"]
    async with HttpClient() as http:
        service = NostrService(key, NostrOptions((relay.url,), facts_poll=0.1),
                               lambda: _facts(urls[0]), http)
        async with running(service):
            first = await _relay_has(relay, key.pubkey_hex, ANNOUNCED_WITHIN_S)
            urls[0] = "https://second.example"
            second = await anyio.to_thread.run_sync(lambda: relay.wait_for(
                {"kinds": [38421], "authors": [key.pubkey_hex]}, ANNOUNCED_WITHIN_S,
                lambda e: ["u", "https://second.example"] in e["tags"]))
    assert first and second and second[0]["created_at"] > first[0]["created_at"]
    # an addressable event: the relay keeps only the newest per (pubkey, kind, d)
    assert len(relay.query({"kinds": [38421], "authors": [key.pubkey_hex]})) == 1


# ------------------------------------------------------------------------------------ end to end


def _node_args(relay_url: str, port: int, *extra: str) -> list[str]:
    return ["--port", str(port), "--relays", relay_url, "--http-url", f"http://127.0.0.1:{port}",
            "--cashu-mints", "http://127.0.0.1:9", "--name", f"node-{port}",
            "--admin-token", ADMIN_TOKEN, *extra]


@pytest.fixture
def announced_node(node_factory: Any, relay: RelayProcess  # noqa: F811
                   ) -> Iterator[tuple[NodeProcess, dict[str, Any], float]]:
    port = free_port()
    node = node_factory(*_node_args(relay.url, port))
    status, info = node.json("GET", "/v1/info")
    assert status == 200
    pubkey = nostr.decode_npub(info["npub"]).hex()
    stored = relay.wait_for({"kinds": [38421], "authors": [pubkey]}, timeout=10)
    took = time.monotonic() - node.started_at
    assert stored, node.log_text()
    yield node, stored[0], took


def test_node_announces_within_5s_and_the_relay_stored_it(
        announced_node: tuple[NodeProcess, dict[str, Any], float],
        relay: RelayProcess) -> None:  # noqa: F811
    node, event, took = announced_node
    assert took < ANNOUNCED_WITHIN_S, f"announced after {took:.1f} s"
    _, info = node.json("GET", "/v1/info")
    print("\nannouncement as the relay stored it:\n" + json.dumps(event, indent=1))
    assert event["kind"] == 38421
    assert event["pubkey"] == nostr.decode_npub(info["npub"]).hex()
    assert event["tags"] == [["d", event["pubkey"][:12]], ["u", f"http://127.0.0.1:{node.port}"],
                             ["mint", "http://127.0.0.1:9"], ["version", info["version"]]]
    assert json.loads(event["content"]) == {"name": f"node-{node.port}",
                                            "about": "A Routstr Node",
                                            "cashu_p2pk_pubkey": info["cashu_p2pk_pubkey"]}
    assert len(info["cashu_p2pk_pubkey"]) == 66  # the key to lock payments to (NUT-11)
    assert nostr.verify_event(nostr.parse_event(event))
    assert "nsec1" not in node.log_text()
    status, _, body = node.request("GET", "/metrics",
                                   headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200
    assert (f'routstr_nostr_published_total{{relay="{relay.url}",result="accepted"}} 1'
            in body.decode()), body.decode()

    # The relay checks signatures before storing: a forged copy is refused.
    forged = dict(event, content=json.dumps({"name": "evil", "about": "x"}))
    forged["id"] = nostr.event_id(forged["pubkey"], forged["created_at"], forged["kind"],
                                  forged["tags"], forged["content"])
    answer = relay.publish(forged)
    assert answer[0] == "OK" and answer[2] is False, answer  # ["OK", "", false, "invalid: Bad
    assert "signature" in answer[3].lower(), answer  # signature"] from nostr-relay 1.14
    assert [e["id"] for e in relay.query({"kinds": [38421], "authors": [event["pubkey"]]})] == [
        event["id"]]

    # a restart keeps the generated identity
    node.stop()
    again = NodeProcess(node.workdir, node.args).start()
    try:
        assert again.json("GET", "/v1/info")[1]["npub"] == info["npub"]
    finally:
        again.stop()


def test_second_node_lists_the_first_at_v1_providers(
        announced_node: tuple[NodeProcess, dict[str, Any], float], node_factory: Any,
        relay: RelayProcess, tmp_path: Path) -> None:  # noqa: F811
    first, event, _ = announced_node
    assert first.request("GET", "/v1/providers/")[0] == 404  # discovery off by default
    port = free_port()
    (tmp_path / "b").mkdir()
    second = node_factory(*_node_args(relay.url, port, "--providers-refresh", "2",
                                      "--providers-allow-private"),
                          workdir=tmp_path / "b")
    deadline = time.monotonic() + 10
    while True:
        status, doc = second.json("GET", "/v1/providers/?include_json=true")
        assert status == 200
        entries = {e["provider"]["endpoint_url"]: e for e in doc["providers"]}
        entry = entries.get(first.url)
        if entry and entry["health"]["endpoint"] == "info" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert entry is not None, doc
    provider = entry["provider"]
    assert set(provider) == {"id", "pubkey", "created_at", "kind", "endpoint_url",
                             "endpoint_urls", "name", "description", "mint_urls", "version",
                             "content"}
    assert provider["pubkey"] == event["pubkey"] and provider["id"] == event["pubkey"][:12]
    assert provider["name"] == f"node-{first.port}"
    assert provider["mint_urls"] == ["http://127.0.0.1:9"]
    assert entry["health"]["status_code"] == 200
    assert entry["health"]["json"]["npub"] == first.json("GET", "/v1/info")[1]["npub"]
    plain = second.json("GET", "/v1/providers")[1]["providers"]
    assert any(p["endpoint_url"] == first.url for p in plain)
    only = second.json("GET", f"/v1/providers/?pubkey={event['pubkey']}")[1]["providers"]
    assert [p["pubkey"] for p in only] == [event["pubkey"]]


def test_a_restarted_relay_gets_the_announcement_again(
        node_factory: Any, own_relay: RelayProcess) -> None:  # noqa: F811
    port = free_port()
    node = node_factory(*_node_args(own_relay.url, port))
    pubkey = nostr.decode_npub(node.json("GET", "/v1/info")[1]["npub"]).hex()
    flt = {"kinds": [38421], "authors": [pubkey]}
    assert own_relay.wait_for(flt, timeout=10), node.log_text()
    own_relay.restart(fresh=True)  # killed; back on the same port with an empty database
    again = own_relay.wait_for(flt, timeout=15)
    assert again, node.log_text()
    assert "disconnected" in node.log_text()
    own_relay.stop()  # gone for good: the node keeps serving and still stops promptly
    started = time.monotonic()
    assert node.request("GET", "/v1/info", timeout=2)[0] == 200
    assert time.monotonic() - started < 1
    started = time.monotonic()
    assert node.stop() == 0
    assert time.monotonic() - started < 5, node.log_text()
