"""Webhooks: a key registers URLs for its events; deliveries come from a durable outbox.

API (``Authorization: Bearer <key>``; the key must exist — a Cashu token once redeemed)
    ``POST /v1/webhooks`` ``{"url", "events": ["balance.low", "key.expired"], "secret"?,
    "balance_threshold_msats"?}`` → 201 with the webhook, including its `secret` (generated
    ``whsec_…`` when none is given; shown only here). ``GET /v1/webhooks`` lists the key's
    webhooks (secrets masked); ``DELETE /v1/webhooks/{id}`` removes one and its pending events.

Events
    * ``balance.low``: a settlement left the balance that pays for the key (its parent's for a
      child key) below the webhook's threshold (``balance_threshold_msats``, else the node's
      ``--webhook-low-balance-msats``). Fires once per dip: it re-arms when a later check sees
      the balance at or above the threshold again. A key already below the threshold when the
      webhook is created is not reported until it has been above it.
    * ``key.expired``: the key's ``validity_date`` has passed (checked every
      ``--webhook-scan-interval`` seconds); fires once.
    The settlement path only notes the account (no I/O); the background task evaluates and
    writes events, and also re-checks every webhook periodically, so nothing depends on the
    note surviving a crash.

Delivery
    Each event is a row in ``webhook_outbox`` written before any attempt — it survives
    restarts. ``POST url`` with the JSON body ``{"id", "type", "created", "data"}`` and headers
    ``X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the raw body with the secret>``,
    ``X-Webhook-Event``, ``X-Webhook-Id`` (the event id: deliveries are at-least-once, so
    receivers should deduplicate on it) and ``X-Webhook-Attempt``. A 2xx answer is success;
    anything else (another status, refused, timed out, a redirect) is retried after
    ``--webhook-retry-base`` seconds, doubling, at most one hour apart, until
    ``--webhook-max-attempts``, then marked failed. Finished rows are swept after a day.

SSRF guard
    The node's outbound URL guard (`routstr.netguard`): the URL must be http(s) without
    credentials or fragment, its host a name or a canonical address (``127.1``, ``2130706433``,
    ``0x7f000001``… refused outright). Its host is resolved at registration (so the owner hears
    at once) and by the client on every delivery (once: the URL rules are checked before); a
    private, loopback, link-local, multicast, reserved or unspecified address is
    refused unless ``--webhooks-allow-private`` is set (tests; a LAN receiver). Each delivery's
    connection goes to the address the client itself resolved and checked (no DNS rebinding
    between check and connect). Redirects are not followed. With ``--upstream-proxy`` (Tor)
    deliveries go through the proxy, which resolves names itself: then names are not resolved
    locally (no DNS leak) and only the URL is checked (address literals, ``localhost``, the
    numeric tricks) — the proxy's exit, not this host, opens the connection.
    Secrets are stored as given (the HMAC needs them); they are shown only at creation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio

from . import __version__, netguard
from .client import AddressRefused, HttpClient
from .db import Connection, Database, DatabaseError
from .errors import ApiError, InvalidRequest, NotFound, UpstreamError
from .ledger import Account
from .messages import Request, Response, json_response

log = logging.getLogger("routstr.webhooks")

EVENTS = ("balance.low", "key.expired")
MAX_WEBHOOKS_PER_KEY = 10
MAX_URL_CHARS = 2048
MIN_SECRET_CHARS = 16
MAX_SECRET_CHARS = 256
MAX_RETRY_DELAY_S = 3600.0
DELIVERY_TIMEOUT_S = 15.0
DELIVERY_CONCURRENCY = 4
DELIVERY_BATCH = 32
FINISHED_RETENTION_S = 86400
MAX_RESPONSE_BYTES = 64 * 1024

AccountOf = Callable[[Request], Any]  # async (request) -> Account (payments.account_for)


@dataclass(frozen=True)
class WebhookSettings:
    allow_private: bool = False
    low_balance_msats: int = 100_000
    scan_interval_s: float = 60.0
    retry_base_s: float = 10.0
    max_attempts: int = 12
    resolve: bool = True  # False when deliveries go through a proxy that resolves names


def signature(secret: str, body: bytes) -> str:
    """The ``X-Webhook-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def check_target(url: str, *, allow_private: bool, resolve: bool = True) -> None:
    """Refuse URLs a webhook must not reach (400 ``webhook_url_forbidden`` and friends): the
    outbound URL guard's rules (`routstr.netguard`), checked here at registration (and before
    each delivery) so the owner hears at once; the client checks the address it connects to
    again on every delivery (a DNS answer that changed in between is caught there).

    `resolve=False` (deliveries through a proxy that resolves names): check the URL only —
    literal addresses and ``localhost`` names.
    """
    if len(url) > MAX_URL_CHARS:
        raise InvalidRequest(f"'url' is longer than {MAX_URL_CHARS} characters",
                             code="invalid_webhook_url")
    guard = netguard.Guard(allow_private=allow_private)
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise netguard.Refused("'url' must be an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise netguard.Refused("'url' must not carry credentials")
        host, port = guard.check_url(url)
    except (ValueError, netguard.Refused) as exc:  # urlsplit's ValueError: a malformed port
        code = ("webhook_url_forbidden" if isinstance(exc, netguard.Forbidden)
                else "invalid_webhook_url")
        raise InvalidRequest(f"Webhook URL refused: {exc}", code=code) from None
    if allow_private or not resolve or netguard.parse_host(host) is not None:
        return
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise InvalidRequest(f"'url' host {parts.hostname!r} does not resolve",
                             code="webhook_url_unresolvable") from None
    for info in infos:
        address = str(info[4][0])
        try:
            guard.check_ip(address)
        except netguard.Refused:
            raise InvalidRequest(
                "Webhook URLs may not target private, loopback or link-local addresses",
                code="webhook_url_forbidden",
                details={"host": parts.hostname, "address": address}) from None


def _events(value: object) -> list[str]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(e, str) and e in EVENTS for e in value)):
        raise InvalidRequest(f"'events' must be a non-empty list drawn from {list(EVENTS)}",
                             code="invalid_webhook_events", details={"supported": list(EVENTS)})
    return sorted(set(value))


def _masked(secret: str) -> str:
    return secret[:6] + "…" + secret[-4:]


def _doc(row: tuple[Any, ...], *, with_secret: bool = False) -> dict[str, Any]:
    public_id, url, events, secret, threshold, created_at = row
    return {
        "id": public_id, "object": "webhook", "url": url, "events": events.split(","),
        "secret": secret if with_secret else _masked(secret),
        "balance_threshold_msats": threshold, "created_at": created_at,
    }


class Webhooks:
    """Registration handlers, event triggers and the delivery loop."""

    def __init__(self, db: Database, account_of: AccountOf, settings: WebhookSettings,
                 http: HttpClient | None = None, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.account_of = account_of
        self.settings = settings
        self.http = http or HttpClient(connect_timeout=5.0, read_timeout=DELIVERY_TIMEOUT_S,
                                       write_timeout=DELIVERY_TIMEOUT_S)
        self._clock = clock
        self._noted: set[int] = set()
        # Accounts with a balance.low webhook: settlements of other accounts cost nothing here.
        # Refreshed by every full scan (so another process's registrations are seen too).
        self._watched: set[int] | None = None
        self._wake: anyio.Event | None = None  # created by run_forever (needs a running loop)
        self.delivered = 0
        self.failed_attempts = 0

    async def aclose(self) -> None:
        await self.http.aclose()

    # -- handlers ---------------------------------------------------------------------------
    async def _account(self, request: Request) -> Account:
        account = await self.account_of(request)
        assert isinstance(account, Account)
        return account

    async def create(self, request: Request, params: dict[str, str]) -> Response:
        account = await self._account(request)
        body = request.json_object()
        url = body.get("url")
        if not isinstance(url, str) or not url.strip():
            raise InvalidRequest("'url' is required", code="invalid_webhook_url")
        url = url.strip()
        events = _events(body.get("events"))
        secret = body.get("secret")
        if secret is None:
            secret = "whsec_" + secrets.token_hex(24)
        if (not isinstance(secret, str) or not MIN_SECRET_CHARS <= len(secret) <= MAX_SECRET_CHARS
                or not secret.isprintable()):
            raise InvalidRequest(
                f"'secret' must be {MIN_SECRET_CHARS} to {MAX_SECRET_CHARS} printable characters",
                code="invalid_webhook_secret")
        threshold = body.get("balance_threshold_msats")
        if threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool)
                                      or not 0 <= threshold <= 10**15):
            raise InvalidRequest("'balance_threshold_msats' must be a non-negative integer",
                                 code="invalid_webhook_threshold")
        await check_target(url, allow_private=self.settings.allow_private,
                               resolve=self.settings.resolve)
        public_id = "wh_" + secrets.token_hex(12)
        now = int(self._clock())
        default_threshold = self.settings.low_balance_msats

        def op(conn: Connection) -> None:
            count = conn.execute("SELECT COUNT(*) FROM webhooks WHERE account_id = ?",
                                 (account.id,)).fetchone()[0]
            if count >= MAX_WEBHOOKS_PER_KEY:
                raise InvalidRequest(f"A key may register at most {MAX_WEBHOOKS_PER_KEY} webhooks",
                                     code="webhook_limit_reached")
            balance = conn.execute(
                "SELECT p.balance_msats FROM keys k JOIN keys p"
                " ON p.id = COALESCE(k.parent_id, k.id) WHERE k.id = ?", (account.id,)
            ).fetchone()[0]
            below = balance < (threshold if threshold is not None else default_threshold)
            conn.execute(
                "INSERT INTO webhooks (public_id, account_id, url, events, secret,"
                " balance_threshold_msats, low_fired, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (public_id, account.id, url, ",".join(events), secret, threshold, int(below), now))

        self.db.transaction(op)
        if self._watched is not None and "balance.low" in events:
            self._watched.add(account.id)
        doc = _doc((public_id, url, ",".join(events), secret, threshold, now), with_secret=True)
        return json_response(doc, 201)

    async def list(self, request: Request, params: dict[str, str]) -> Response:
        account = await self._account(request)
        rows = self.db.read(lambda c: c.execute(
            "SELECT public_id, url, events, secret, balance_threshold_msats, created_at"
            " FROM webhooks WHERE account_id = ? ORDER BY id", (account.id,)).fetchall())
        return json_response({"object": "list", "data": [_doc(tuple(r)) for r in rows]})

    async def delete(self, request: Request, params: dict[str, str]) -> Response:
        account = await self._account(request)
        public_id = params.get("webhook_id", "")

        def op(conn: Connection) -> int:
            return int(conn.execute("DELETE FROM webhooks WHERE public_id = ? AND account_id = ?",
                                    (public_id, account.id)).rowcount)

        if not self.db.transaction(op):
            raise NotFound("Webhook not found", code="webhook_not_found")
        return Response(204)

    # -- triggers ---------------------------------------------------------------------------
    def note_settlement(self, account_id: int) -> None:
        """Called on the settlement path: if the account has a balance.low webhook, remember
        it and wake the loop (no I/O)."""
        if self._watched is not None and account_id not in self._watched:
            return
        self._noted.add(account_id)
        if self._wake is not None:
            self._wake.set()

    def _load_watched(self) -> None:
        rows = self.db.read(lambda c: c.execute(
            "SELECT DISTINCT account_id FROM webhooks"
            " WHERE instr(',' || events || ',', ',balance.low,') > 0").fetchall())
        self._watched = {int(r[0]) for r in rows}

    def _enqueue(self, conn: Connection, webhook_id: int, event: str, data: dict[str, Any],
                 now: float) -> None:
        event_id = "evt_" + secrets.token_hex(12)
        payload = json.dumps({"id": event_id, "type": event, "created": int(now), "data": data},
                             separators=(",", ":")).encode()
        conn.execute(
            "INSERT INTO webhook_outbox (event_id, webhook_id, event, payload, state,"
            " next_attempt_at, created_at) VALUES (?, ?, ?, ?, 'pending', ?, ?)",
            (event_id, webhook_id, event, payload, now, int(now)))

    def check_events(self, accounts: set[int] | None = None) -> int:
        """Write due events to the outbox (one transaction). `accounts` None = all webhooks.

        Returns how many events were written.
        """
        now = self._clock()
        default = self.settings.low_balance_msats
        scopes: list[int | None] = [None] if accounts is None else [*sorted(accounts)]

        def op(conn: Connection) -> int:
            written = 0
            for scope in scopes:
                written += self._check_low(conn, scope, default, now)
                written += self._check_expired(conn, scope, now)
            return written

        return self.db.transaction(op)

    def _check_low(self, conn: Connection, scope: int | None, default: int, now: float) -> int:
        written = 0
        rows = conn.execute(
            "SELECT w.id, w.low_fired, COALESCE(w.balance_threshold_msats, ?), p.balance_msats,"
            " k.hint, w.public_id FROM webhooks w JOIN keys k ON k.id = w.account_id"
            " JOIN keys p ON p.id = COALESCE(k.parent_id, k.id)"
            " WHERE (? IS NULL OR w.account_id = ?)"
            " AND instr(',' || w.events || ',', ',balance.low,') > 0",
            (default, scope, scope)).fetchall()
        for wid, fired, threshold, balance, hint, public_id in rows:
            if balance < threshold and not fired:
                self._enqueue(conn, wid, "balance.low", {
                    "webhook_id": public_id, "api_key_preview": f"sk-…{hint}",
                    "balance_msats": balance, "threshold_msats": threshold}, now)
                conn.execute("UPDATE webhooks SET low_fired = 1 WHERE id = ?", (wid,))
                written += 1
            elif balance >= threshold and fired:
                conn.execute("UPDATE webhooks SET low_fired = 0 WHERE id = ?", (wid,))
        return written

    def _check_expired(self, conn: Connection, scope: int | None, now: float) -> int:
        rows = conn.execute(
            "SELECT w.id, k.validity_date, k.hint, w.public_id FROM webhooks w"
            " JOIN keys k ON k.id = w.account_id WHERE w.expired_fired = 0"
            " AND k.validity_date IS NOT NULL AND k.validity_date <= ?"
            " AND (? IS NULL OR w.account_id = ?)"
            " AND instr(',' || w.events || ',', ',key.expired,') > 0",
            (int(now), scope, scope)).fetchall()
        for wid, validity, hint, public_id in rows:
            self._enqueue(conn, wid, "key.expired", {
                "webhook_id": public_id, "api_key_preview": f"sk-…{hint}",
                "validity_date": validity}, now)
            conn.execute("UPDATE webhooks SET expired_fired = 1 WHERE id = ?", (wid,))
        return len(rows)

    # -- delivery ---------------------------------------------------------------------------
    def _retry_delay(self, attempts: int) -> float:
        doublings = min(max(0, attempts - 1), 30)
        return min(MAX_RETRY_DELAY_S, self.settings.retry_base_s * (1 << doublings))

    async def _attempt(self, url: str, secret: str, event: str, event_id: str, payload: bytes,
                       attempt: int) -> str | None:
        """One delivery attempt: None on success, else the reason."""
        try:  # the URL's rules; the address is resolved and checked once, by the client
            await check_target(url, allow_private=self.settings.allow_private, resolve=False)
        except InvalidRequest as exc:
            return f"refused: {exc.code}"
        headers = [("content-type", "application/json"), ("user-agent", f"routstr/{__version__}"),
                   ("x-webhook-signature", signature(secret, payload)),
                   ("x-webhook-event", event), ("x-webhook-id", event_id),
                   ("x-webhook-attempt", str(attempt))]
        try:
            with anyio.fail_after(DELIVERY_TIMEOUT_S):
                status, _, _ = await self.http.fetch(
                    "POST", url, headers, payload, max_bytes=MAX_RESPONSE_BYTES,
                    guard=netguard.Guard(allow_private=self.settings.allow_private))
        except TimeoutError:
            return "timed out"
        except AddressRefused:
            return "refused: webhook_url_forbidden"
        except UpstreamError as exc:
            return f"{exc.code}: {exc}"
        return None if 200 <= status < 300 else f"status {status}"

    async def _deliver(self, row: tuple[Any, ...]) -> None:
        outbox_id, event_id, event, payload, attempts, url, secret = row
        attempt = int(attempts) + 1
        error = await self._attempt(url, secret, event, event_id, bytes(payload), attempt)
        now = self._clock()
        if error is None:
            self.delivered += 1
            state, next_at = "delivered", now
        else:
            self.failed_attempts += 1
            log.info("webhook %s delivery %d failed: %s", event_id, attempt, error)
            done = attempt >= self.settings.max_attempts
            state, next_at = ("failed" if done else "pending"), now + self._retry_delay(attempt)
        finished = int(now) if state != "pending" else None
        self.db.transaction(lambda c: c.execute(
            "UPDATE webhook_outbox SET state = ?, attempts = ?, next_attempt_at = ?,"
            " last_error = ?, finished_at = ? WHERE id = ?",
            (state, attempt, next_at, error, finished, outbox_id)))

    async def deliver_due(self) -> int:
        """Attempt every due delivery (bounded concurrency). Returns how many were attempted."""
        now = self._clock()
        rows = self.db.read(lambda c: c.execute(
            "SELECT o.id, o.event_id, o.event, o.payload, o.attempts, w.url, w.secret"
            " FROM webhook_outbox o JOIN webhooks w ON w.id = o.webhook_id"
            " WHERE o.state = 'pending' AND o.next_attempt_at <= ? ORDER BY o.next_attempt_at"
            " LIMIT ?", (now, DELIVERY_BATCH)).fetchall())
        limiter = anyio.CapacityLimiter(DELIVERY_CONCURRENCY)

        async def one(row: tuple[Any, ...]) -> None:
            async with limiter:
                await self._deliver(row)

        async with anyio.create_task_group() as tg:
            for r in rows:
                tg.start_soon(one, tuple(r))
        return len(rows)

    def _next_due_in(self) -> float:
        row = self.db.read(lambda c: c.execute(
            "SELECT MIN(next_attempt_at) FROM webhook_outbox WHERE state = 'pending'").fetchone())
        if row is None or row[0] is None:
            return self.settings.scan_interval_s
        return max(0.0, float(row[0]) - self._clock())

    def sweep(self) -> int:
        cutoff = int(self._clock()) - FINISHED_RETENTION_S
        return int(self.db.transaction(lambda c: c.execute(
            "DELETE FROM webhook_outbox WHERE state != 'pending' AND finished_at < ?",
            (cutoff,)).rowcount))

    async def run_forever(self) -> None:
        """The background task: evaluate triggers, deliver what is due, sleep until needed."""
        last_scan = -1e18
        while True:
            wake = self._wake = anyio.Event()
            try:
                now = time.monotonic()
                if now - last_scan >= self.settings.scan_interval_s:
                    last_scan = now
                    self._noted.clear()
                    self._load_watched()
                    self.check_events(None)
                elif self._noted:
                    noted, self._noted = self._noted, set()
                    self.check_events(noted)
                while await self.deliver_due() == DELIVERY_BATCH:
                    pass
                wait = min(self._next_due_in(),
                           self.settings.scan_interval_s - (time.monotonic() - last_scan))
            except (DatabaseError, ApiError) as exc:
                log.warning("webhook loop: %s", exc)
                wait = 1.0
            with anyio.move_on_after(max(0.01, wait)):
                await wake.wait()
