"""Being found on Nostr: announce this node (kind 38421) and discover other nodes.

`NostrService` runs under the main task group when ``--relays`` is set:

* **Announcer** — signs the announcement (`routstr.nostr.build_announcement`) from the node's
  facts (endpoint URLs, mints, version, name, description). The facts are re-read every
  `FACTS_POLL_S`; a change, or `announce_interval` elapsing, signs a new event (``created_at``
  always increases, so relays replace the old one) and wakes every relay link.
* **One `RelayLink` per relay** — a persistent WebSocket (`routstr.websocket`) over the upstream
  client's streams (TLS; SOCKS5 when ``--upstream-proxy`` is set, so onion relays work). On
  every connect it publishes the current announcement and, when discovery is on, subscribes to
  kind 38421 (re-subscribing every ``--providers-refresh`` seconds). ``OK`` and ``NOTICE`` are
  logged and counted; an ``OK`` that does not come within `OK_TIMEOUT_S` is counted. A relay
  silent for `PING_INTERVAL_S` is pinged, and dropped when nothing arrives within
  `PONG_TIMEOUT_S` more. Failures reconnect after a per-relay exponential backoff
  (`BACKOFF_MIN_S` … `BACKOFF_MAX_S`, ±20 % jitter), reset only by a session that was useful and
  lasted `STABLE_SESSION_S`.
* **Directory** — the announcements seen: shape-checked, the newest per (pubkey, ``d``) kept,
  and only then signature-checked (at most one verification per new event id; a relay cannot
  make us verify the same event twice or verify one older than what we hold). Invalid events
  are dropped and counted. Bounded by `MAX_KNOWN_ANNOUNCEMENTS`.
* **Prober** — GETs each discovered node's ``/v1/info`` (bounded time, size and concurrency),
  right after it appears and then every refresh interval; private, loopback and link-local
  addresses are not probed unless ``--providers-allow-private`` (announcements are anyone's
  input: the node must not become a proxy into its own network). The outbound URL guard
  (`routstr.netguard`) applies: numeric tricks (``127.1``, ``2130706433``…), user info, a query
  or fragment are refused outright, and the address the probe connects to is the one checked
  after resolution (a public name resolving to a private address is refused too; through a
  SOCKS proxy only the URL is checked). The probe is a GET of ``/v1/info`` only, and its
  answer is at most `PROBE_MAX_BYTES`.

Bad relays — unreachable, hanging, resetting, sending malformed frames or JSON, oversize
messages, forged events — are logged (relay text clipped and escaped), counted in `/metrics`
(``routstr_nostr_*``), and never fatal; nothing here holds a lock or a database transaction
across an ``await``, and signature checks yield to the event loop between events, so serving
requests is never blocked.

The identity: ``--nsec``, else the key kept in ``node_settings`` (generated once on first
start). The secret is never logged; the npub is shown in ``/v1/info``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream, TaskStatus

from . import __version__, netguard
from .client import HttpClient
from .config import Config
from .db import Database
from .errors import NotFound, UpstreamError
from .messages import Request, Response, json_response
from .nostr import (
    KIND_ANNOUNCEMENT,
    UNANNOUNCED_URL,
    AnnouncementFacts,
    Bech32Error,
    Event,
    InvalidEvent,
    RelayAuth,
    RelayClosed,
    RelayEose,
    RelayEvent,
    RelayMessage,
    RelayNotice,
    RelayOk,
    RelayProtocolError,
    SecretKey,
    announced_endpoints,
    build_announcement,
    client_close,
    client_event,
    client_req,
    decode_npub,
    encode_nsec,
    new_subscription_id,
    parse_announcement,
    parse_event,
    parse_relay_message,
    random_secret,
    verify_event,
)
from .walletstore import setting_get_or_create
from .websocket import ConnectionClosed, ProtocolError, WebSocket, WebSocketError
from .wire import loads

log = logging.getLogger("routstr.nostr")

NSEC_SETTING = "nostr_nsec"

FACTS_POLL_S = 5.0
OK_TIMEOUT_S = 10.0
PING_INTERVAL_S = 30.0
PONG_TIMEOUT_S = 15.0
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 300.0
BACKOFF_JITTER = 0.2
STABLE_SESSION_S = 10.0
HANDSHAKE_TIMEOUT_S = 10.0
MAX_RELAY_MESSAGE_BYTES = 512 * 1024
SUBSCRIPTION_LIMIT = 500
MAX_KNOWN_ANNOUNCEMENTS = 1000
MAX_SEEN_IDS = 8192
MAX_PROVIDERS_LISTED = 42  # as routstr-core
PROBE_TIMEOUT_S = 10.0
PROBE_CONCURRENCY = 8
PROBE_MAX_BYTES = 64 * 1024
LOG_CLIP_CHARS = 160

Labels = tuple[tuple[str, str], ...]
MetricsExtra = dict[str, tuple[str, str, dict[Labels, float]]]


def clip(text: object) -> str:
    """Relay-provided text made safe for one log line: escaped (repr) and clipped."""
    shown = repr(text)
    return shown if len(shown) <= LOG_CLIP_CHARS else shown[: LOG_CLIP_CHARS - 3] + "..."


def announcement_facts(config: Config, key: SecretKey,
                       p2pk_pubkey: str = "") -> AnnouncementFacts | None:
    """What this node announces (None: no public endpoint, nothing to announce)."""
    urls = announced_endpoints(config.http_url, config.onion_url)
    if not urls:
        return None
    return AnnouncementFacts(
        d=key.pubkey_hex[:12],  # routstr-core's fallback provider id
        endpoint_urls=urls,
        mints=tuple(config.cashu_mints),
        version=__version__,
        name=config.name or "Routstr Proxy",
        about=config.description or "Privacy-preserving AI proxy via Nostr",
        p2pk_pubkey=p2pk_pubkey,
    )


def open_nostr(config: Config, db: Database, http: HttpClient,
               p2pk_pubkey: str = "") -> NostrService:
    """The node's identity and its Nostr service (started by `__main__` when relays are set)."""
    key = load_identity(db, config.nsec)
    options = NostrOptions(config.relays, float(config.announce_interval),
                           float(config.providers_refresh), config.providers_allow_private)
    return NostrService(key, options, lambda: announcement_facts(config, key, p2pk_pubkey), http)


def load_identity(db: Database, configured: str) -> SecretKey:
    """``--nsec`` if given, else the key kept in the database (created once, durably)."""
    if configured.strip():
        return SecretKey.parse(configured)
    fresh = encode_nsec(random_secret())  # no curve math inside the transaction
    stored = setting_get_or_create(db, NSEC_SETTING, lambda: fresh)
    return SecretKey.parse(stored)


# --------------------------------------------------------------------------------------------
# Counters


_METRIC_HELP: dict[str, str] = {
    "routstr_nostr_connects_total": "Relay connection attempts, by relay and result.",
    "routstr_nostr_disconnects_total": "Relay sessions that ended, by relay and reason.",
    "routstr_nostr_published_total": "Announcements sent, by relay and the relay's answer.",
    "routstr_nostr_notices_total": "NOTICE messages received, by relay.",
    "routstr_nostr_malformed_total": "Malformed relay input (frames, JSON, messages), by relay.",
    "routstr_nostr_events_total": "Announcement events received, by relay and outcome.",
    "routstr_nostr_probes_total": "Probes of discovered nodes' /v1/info, by result.",
}


class Counters:
    def __init__(self) -> None:
        self.values: dict[tuple[str, Labels], int] = {}

    def inc(self, name: str, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.values[key] = self.values.get(key, 0) + 1

    def get(self, name: str, **labels: str) -> int:
        return self.values.get((name, tuple(sorted(labels.items()))), 0)

    def extra(self) -> MetricsExtra:
        """name → (type, help, {labels: value}), the shape `/metrics` renders."""
        out: MetricsExtra = {}
        for (name, labels), value in self.values.items():
            series = out.setdefault(name, ("counter", _METRIC_HELP.get(name, name), {}))[2]
            series[labels] = value
        return out


# --------------------------------------------------------------------------------------------
# Announcements we know (pure)


def _probe_refusal(url: str, guard: netguard.Guard) -> str | None:
    """Why an announced endpoint is not probed (None: it may be). The URL guard's rules
    (`routstr.netguard`), and no query or fragment: ``/v1/info`` is appended to it."""
    try:
        guard.check_url(url, allow_query=False)
    except netguard.Refused as exc:
        return str(exc)
    return None


@dataclass
class _Known:
    event: Event
    provider: dict[str, Any]
    health: dict[str, Any] | None = None
    probed_at: float = -math.inf


class Directory:
    """Verified announcements, the newest per (pubkey, d). Plain defs: no I/O."""

    def __init__(self, max_entries: int = MAX_KNOWN_ANNOUNCEMENTS) -> None:
        self.max_entries = max_entries
        self._known: dict[tuple[str, str], _Known] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._known)

    def _remember(self, event_id: str) -> None:
        self._seen[event_id] = None
        if len(self._seen) > MAX_SEEN_IDS:
            self._seen.popitem(last=False)

    def consider(self, raw: object) -> str:
        """Take one event from a relay; returns the outcome (a metrics label)."""
        try:
            event = parse_event(raw)
        except InvalidEvent:
            return "malformed"
        if event.id in self._seen:
            return "duplicate"
        if event.kind != KIND_ANNOUNCEMENT:
            return "ignored"
        provider = parse_announcement(event)
        if provider is None:
            return "incomplete"
        if UNANNOUNCED_URL in provider["endpoint_urls"]:
            return "ignored"
        key = (event.pubkey, str(provider["id"]))
        current = self._known.get(key)
        if current is not None and (
            current.event.created_at > event.created_at
            or (current.event.created_at == event.created_at and current.event.id <= event.id)
        ):
            return "stale"
        if not verify_event(event):
            return "invalid_signature"  # not remembered: the genuine event may carry this id
        self._remember(event.id)
        self._known[key] = _Known(event, provider)
        if len(self._known) > self.max_entries:
            oldest = min(self._known, key=lambda k: self._known[k].event.created_at)
            del self._known[oldest]
        return "accepted"

    def due_for_probe(self, now: float, every: float) -> list[tuple[tuple[str, str], str]]:
        return [
            (key, k.provider["endpoint_url"])
            for key, k in self._known.items()
            if now - k.probed_at >= every
        ]

    def set_health(self, key: tuple[str, str], health: dict[str, Any], now: float) -> None:
        known = self._known.get(key)
        if known is not None:
            known.health = health
            known.probed_at = now

    def listing(self, pubkey: str | None, include_json: bool) -> list[dict[str, Any]]:
        """routstr-core's `/v1/providers/` list: newest first, one per endpoint URL, 42 max."""
        out: list[dict[str, Any]] = []
        seen_urls: set[str] = set()
        for known in sorted(self._known.values(), key=lambda k: -k.event.created_at):
            provider = known.provider
            if pubkey and provider["pubkey"] != pubkey:
                continue
            if provider["endpoint_url"] in seen_urls:
                continue
            seen_urls.add(provider["endpoint_url"])
            if include_json:
                health = known.health or {"status_code": None, "endpoint": "pending",
                                          "json": None}
                out.append({"provider": provider, "health": health})
            else:
                out.append(provider)
            if len(out) >= MAX_PROVIDERS_LISTED:
                break
        return out


# --------------------------------------------------------------------------------------------
# The service


@dataclass(frozen=True)
class NostrOptions:
    relays: tuple[str, ...]
    announce_interval: float = 3600.0
    providers_refresh: float = 0.0  # 0: discovery off
    allow_private: bool = False
    ping_interval: float = PING_INTERVAL_S
    pong_timeout: float = PONG_TIMEOUT_S
    ok_timeout: float = OK_TIMEOUT_S
    facts_poll: float = FACTS_POLL_S
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S


FactsSource = Callable[[], AnnouncementFacts | None]


@dataclass
class NostrService:
    key: SecretKey
    options: NostrOptions
    facts: FactsSource
    http: HttpClient
    directory: Directory = field(default_factory=Directory)
    counters: Counters = field(default_factory=Counters)
    current: Event | None = None
    generation: int = 0
    _facts: AnnouncementFacts | None = None
    _signed_at: float = -math.inf
    _wake: anyio.Event | None = None
    _probe_wake: anyio.Event | None = None

    @property
    def discovery_enabled(self) -> bool:
        return self.options.providers_refresh > 0

    # -- the announcement ---------------------------------------------------------------------

    def refresh_announcement(self, force: bool = False) -> bool:
        """Re-sign when the facts changed (or `force`); True when a new event was made."""
        facts = self.facts()
        if facts == self._facts and not force:
            return False
        if facts is None:
            if self._facts is not None or self.generation == 0:
                log.warning("nothing to announce: set --http-url or --onion-url")
            self._facts, self.current = None, None
            return False
        created_at = int(time.time())
        if self.current is not None and created_at <= self.current.created_at:
            created_at = self.current.created_at + 1
        self.current = build_announcement(self.key, facts, created_at)
        self._facts = facts
        self._signed_at = anyio.current_time()
        self.generation += 1
        self._broadcast()
        log.info("announcement %s signed (d=%s, %d endpoint(s))", self.current.id[:16], facts.d,
                 len(facts.endpoint_urls))
        return True

    def _broadcast(self) -> None:
        old, self._wake = self._wake, anyio.Event()
        if old is not None:
            old.set()

    async def wait_change(self, generation: int) -> None:
        while self.generation == generation:
            if self._wake is None:
                self._wake = anyio.Event()
            await self._wake.wait()

    async def _announce_forever(self) -> None:
        while True:
            await anyio.sleep(self.options.facts_poll)
            due = anyio.current_time() - self._signed_at >= self.options.announce_interval
            self.refresh_announcement(force=due and self._facts is not None)

    # -- streams ------------------------------------------------------------------------------

    async def open_stream(self, secure: bool, host: str, port: int) -> ByteStream:
        return await self.http.open_stream(host, port, tls=secure)

    # -- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Publish and discover until cancelled (the main task group's shutdown)."""
        self._wake = anyio.Event()
        self._probe_wake = anyio.Event()
        self.refresh_announcement()
        async with anyio.create_task_group() as tg:
            for url in self.options.relays:
                tg.start_soon(RelayLink(url, self).run, name=f"relay {url}")
            tg.start_soon(self._announce_forever)
            if self.discovery_enabled:
                tg.start_soon(self._probe_forever)
            task_status.started()

    # -- discovery ----------------------------------------------------------------------------

    def offer(self, raw: object, relay: str) -> str:
        outcome = self.directory.consider(raw)
        self.counters.inc("routstr_nostr_events_total", relay=relay, outcome=outcome)
        if outcome == "accepted" and self._probe_wake is not None:
            self._probe_wake.set()
        return outcome

    async def _probe_forever(self) -> None:
        limiter = anyio.CapacityLimiter(PROBE_CONCURRENCY)
        every = self.options.providers_refresh
        while True:
            wake = self._probe_wake = anyio.Event()
            due = self.directory.due_for_probe(anyio.current_time(), every)
            if due:
                async with anyio.create_task_group() as tg:
                    for key, url in due:
                        tg.start_soon(self._probe_one, limiter, key, url)
            with anyio.move_on_after(every):
                await wake.wait()

    async def _probe_one(
        self, limiter: anyio.CapacityLimiter, key: tuple[str, str], url: str
    ) -> None:
        async with limiter:
            health = await self.probe(url)
        self.counters.inc("routstr_nostr_probes_total", result=str(health["endpoint"]))
        self.directory.set_health(key, health, anyio.current_time())

    async def probe(self, endpoint_url: str) -> dict[str, Any]:
        guard = netguard.Guard(allow_private=self.options.allow_private)
        refusal = _probe_refusal(endpoint_url, guard)
        if refusal is not None:
            return {"status_code": None, "endpoint": "skipped",
                    "json": {"error": f"not probed: {refusal}"}}
        info_url = endpoint_url.rstrip("/") + "/v1/info"
        try:
            with anyio.fail_after(PROBE_TIMEOUT_S):
                status, _headers, body = await self.http.fetch(
                    "GET", info_url, headers=[("accept", "application/json")],
                    max_bytes=PROBE_MAX_BYTES, guard=guard)
        except TimeoutError:
            return _probe_error(500, "Failed to fetch provider: timed out")
        except UpstreamError as exc:
            return _probe_error(500, f"Failed to fetch provider: {exc.message}")
        if status != 200:
            return _probe_error(status, f"/v1/info answered {status}")
        try:
            doc = loads(body)
        except ValueError:  # wire.JsonError: too deep, NaN, ... never shown to our clients
            return _probe_error(status, "/v1/info is not JSON")
        return {"status_code": status, "endpoint": "info", "json": doc}

    # -- HTTP ---------------------------------------------------------------------------------

    async def providers(self, request: Request, params: dict[str, str]) -> Response:
        """``GET /v1/providers/`` (routstr-core's shape)."""
        if not self.discovery_enabled:
            raise NotFound("Provider discovery is disabled", code="providers_disabled")
        include_json = (request.query("include_json") or "").lower() in ("1", "true", "yes", "on")
        pubkey = (request.query("pubkey") or "").strip().lower() or None
        if pubkey and pubkey.startswith("npub1"):
            try:
                pubkey = decode_npub(pubkey).hex()
            except Bech32Error:
                pubkey = "-"
        return json_response({"providers": self.directory.listing(pubkey, include_json)})

    def metrics_extra(self) -> MetricsExtra:
        extra = self.counters.extra()
        extra["routstr_nostr_providers"] = (
            "gauge", "Verified node announcements known.", {(): float(len(self.directory))})
        return extra


def _probe_error(status: int, message: str) -> dict[str, Any]:
    return {"status_code": status, "endpoint": "error", "json": {"error": message}}


async def disabled_providers(request: Request, params: dict[str, str]) -> Response:
    """``GET /v1/providers/`` when no Nostr service runs."""
    raise NotFound("Provider discovery is disabled", code="providers_disabled")


# --------------------------------------------------------------------------------------------
# One relay


class RelayHung(WebSocketError):
    """The relay stopped answering (no frame, not even a pong, in time)."""


class RelayLink:
    """The connection to one relay, kept up with backoff for the life of the node."""

    def __init__(self, url: str, service: NostrService) -> None:
        self.url = url
        self.service = service
        self.delay = 0.0

    async def run(self) -> None:
        while True:
            if self.delay:
                await anyio.sleep(self.delay * (1 + BACKOFF_JITTER * (2 * random.random() - 1)))
            stable = await self._connect_once()
            self.delay = BACKOFF_MIN_S if stable else min(
                BACKOFF_MAX_S, max(BACKOFF_MIN_S, self.delay * 2))

    async def _connect_once(self) -> bool:
        svc = self.service
        counters = svc.counters
        try:
            ws = await WebSocket.connect(
                self.url, svc.open_stream, handshake_timeout=svc.options.handshake_timeout,
                max_message_bytes=MAX_RELAY_MESSAGE_BYTES)
        except (WebSocketError, UpstreamError) as exc:
            counters.inc("routstr_nostr_connects_total", relay=self.url, result="failed")
            log.warning("relay %s: cannot connect: %s (retry in ~%.0f s)", self.url,
                        _why(exc), min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, self.delay * 2)))
            return False
        counters.inc("routstr_nostr_connects_total", relay=self.url, result="ok")
        log.info("relay %s: connected", self.url)
        session = _Session(self.url, svc, ws)
        started = anyio.current_time()
        try:
            await session.run()
        finally:
            with anyio.CancelScope(shield=True):
                await ws.aclose()
        end = ws.failure or session.end  # the relay's protocol error wins, whoever noticed
        reason = ("protocol_error" if isinstance(end, ProtocolError) else
                  "hung" if isinstance(end, RelayHung) else
                  "closed" if isinstance(end, ConnectionClosed) else "error")
        counters.inc("routstr_nostr_disconnects_total", relay=self.url, reason=reason)
        if reason == "protocol_error":
            counters.inc("routstr_nostr_malformed_total", relay=self.url, what="frame")
        log.warning("relay %s: disconnected: %s", self.url, _why(end) if end else "ended")
        return session.useful and anyio.current_time() - started >= STABLE_SESSION_S


def _why(exc: BaseException) -> str:
    detail = getattr(exc, "detail", None)
    return f"{type(exc).__name__}: {clip(detail if detail else str(exc))}"


class _Session:
    """One connected WebSocket: a writer task (announcement, subscription, pings, deadlines)
    and the reader (this task). Either ends the session by recording `end`."""

    def __init__(self, relay: str, service: NostrService, ws: WebSocket) -> None:
        self.relay = relay
        self.svc = service
        self.ws = ws
        self.end: WebSocketError | None = None
        self.useful = False
        self.sent_generation = 0
        self.awaiting_ok: dict[str, float] = {}
        self.subscription: str | None = None
        self.resubscribe_at = -math.inf
        self.last_ping = -math.inf
        self.malformed_logged = False
        self.invalid_logged = False

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._writer, tg.cancel_scope)
            await self._reader()
            tg.cancel_scope.cancel()

    # -- writing ------------------------------------------------------------------------------

    async def _writer(self, scope: anyio.CancelScope) -> None:
        svc, ws, opts = self.svc, self.ws, self.svc.options
        try:
            while True:
                now = anyio.current_time()
                generation, event = svc.generation, svc.current
                if generation != self.sent_generation:
                    self.sent_generation = generation
                    if event is not None:
                        await ws.send_text(client_event(event))
                        self.awaiting_ok = {event.id: now + opts.ok_timeout}
                if svc.discovery_enabled and now >= self.resubscribe_at:
                    if self.subscription is not None:
                        await ws.send_text(client_close(self.subscription))
                    self.subscription = new_subscription_id()
                    await ws.send_text(client_req(
                        self.subscription, {"kinds": [KIND_ANNOUNCEMENT],
                                            "limit": SUBSCRIPTION_LIMIT}))
                    self.resubscribe_at = now + opts.providers_refresh
                for event_id, deadline in list(self.awaiting_ok.items()):
                    if now >= deadline:
                        del self.awaiting_ok[event_id]
                        svc.counters.inc("routstr_nostr_published_total", relay=self.relay,
                                         result="no_answer")
                        log.warning("relay %s: no OK for announcement %s within %.0f s",
                                    self.relay, event_id[:16], opts.ok_timeout)
                quiet_since = ws.last_received
                dead_at = quiet_since + opts.ping_interval + opts.pong_timeout
                if now >= dead_at:
                    raise RelayHung(f"nothing received for {now - quiet_since:.0f} s")
                ping_at = quiet_since + opts.ping_interval
                if now >= ping_at and self.last_ping < ping_at:
                    await ws.ping(b"routstr")
                    self.last_ping = now
                wake_at = min(
                    dead_at,
                    ping_at if self.last_ping < ping_at else dead_at,
                    *self.awaiting_ok.values(),
                    self.resubscribe_at if svc.discovery_enabled else math.inf,
                )
                with anyio.move_on_after(max(0.01, wake_at - now)):
                    await svc.wait_change(self.sent_generation)
        except WebSocketError as exc:
            if self.end is None:
                self.end = exc
            scope.cancel()

    # -- reading ------------------------------------------------------------------------------

    async def _reader(self) -> None:
        while True:
            try:
                data = await self.ws.receive()
            except WebSocketError as exc:
                if self.end is None:
                    self.end = exc
                return
            if isinstance(data, bytes):
                self._malformed("binary message", data[:64])
                continue
            try:
                message = parse_relay_message(data)
            except RelayProtocolError as exc:
                self._malformed(str(exc), data)
                continue
            self.useful = True
            self._handle(message)
            if isinstance(message, RelayEvent):
                await anyio.lowlevel.checkpoint()  # a signature check costs ~1 ms: yield

    def _malformed(self, what: str, sample: object) -> None:
        self.svc.counters.inc("routstr_nostr_malformed_total", relay=self.relay, what="message")
        level = logging.DEBUG if self.malformed_logged else logging.WARNING
        self.malformed_logged = True
        log.log(level, "relay %s: malformed message (%s): %s", self.relay, what, clip(sample))

    def _handle(self, message: RelayMessage) -> None:
        svc, relay = self.svc, self.relay
        if isinstance(message, RelayEvent):
            if message.subscription != self.subscription:
                return
            outcome = svc.offer(message.event, relay)
            if outcome in ("invalid_signature", "malformed"):
                level = logging.DEBUG if self.invalid_logged else logging.WARNING
                self.invalid_logged = True  # one warning per session: a flood floods no log
                log.log(level, "relay %s: dropped an event (%s)", relay, outcome)
        elif isinstance(message, RelayOk):
            if self.awaiting_ok.pop(message.event_id, None) is None:
                if message.accepted or len(self.awaiting_ok) != 1:
                    return
                # a refusal without our id (nostr-relay sends ""): it is about the one
                # event we are waiting on
                self.awaiting_ok.clear()
            result = "accepted" if message.accepted else "rejected"
            svc.counters.inc("routstr_nostr_published_total", relay=relay, result=result)
            if message.accepted:
                log.info("relay %s: announcement %s accepted %s", relay, message.event_id[:16],
                         clip(message.message) if message.message else "")
            else:
                log.warning("relay %s: announcement %s rejected: %s", relay,
                            message.event_id[:16], clip(message.message))
        elif isinstance(message, RelayNotice):
            svc.counters.inc("routstr_nostr_notices_total", relay=relay)
            log.warning("relay %s: NOTICE %s", relay, clip(message.message))
        elif isinstance(message, RelayEose):
            log.debug("relay %s: end of stored events", relay)
        elif isinstance(message, RelayClosed):
            if message.subscription == self.subscription:
                log.warning("relay %s: subscription closed: %s", relay, clip(message.message))
                self.subscription = None
                self.resubscribe_at = anyio.current_time() + max(
                    svc.options.providers_refresh, BACKOFF_MAX_S)
        elif isinstance(message, RelayAuth):
            log.debug("relay %s: AUTH challenge ignored", relay)
