"""The platform features wired together: rate limits, idempotency, lists, batch, webhooks,
OpenAPI docs and metrics (one object, `Platform`, held by the node).

Request path, outermost first (the server checks ``X-Routstr-Version`` before any of these)::

    rate limit (429 before anything is reserved; X-RateLimit-* on every keyed answer)
      → idempotency (replay a stored answer, or run once and store it)
        → lists (?fields=, limit/offset/has_more/total on every ``{"data": [...]}`` answer)
          → router → handler

The proxy reports each settlement to `settled` (tokens for the tokens/hour limit, msats for
the metrics, a note for the webhook triggers) and each upstream failure to `upstream_error`.
The server reports each answered request to `Metrics.observe_request`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio

from .admin import LoginLimiter, check_admin_token_limited, resolve_admin_hash
from .batch import Batch, BatchLimits
from .client import HttpClient
from .config import Config
from .db import Database, DatabaseError
from .errors import AuthenticationFailed, InvalidRequest
from .idempotency import IdempotencyStore
from .ledger import Account
from .messages import Request, Response, bounded_int
from .metrics import Extra, Metrics
from .openapi import ApiDocs
from .ratelimit import Limits, RateLimiter
from .router import Route
from .webhooks import Webhooks, WebhookSettings
from .wire import loads

log = logging.getLogger("routstr.features")

App = Callable[[Request], Awaitable[Response]]
MAX_LIST_LIMIT = 1000
SWEEP_INTERVAL_S = 600.0


# ---- lists: field filtering and pagination ----------------------------------------------------
def shape_list(request: Request, doc: dict[str, Any]) -> dict[str, Any]:
    """Apply ``?fields=`` and, unless the handler paginated already, ``limit``/``offset``."""
    data = doc["data"]
    if "total" not in doc:
        limit = bounded_int(request.query("limit"), "limit", 0, 1, MAX_LIST_LIMIT) or None
        offset = bounded_int(request.query("offset"), "offset", 0, 0, 1 << 62)
        total = len(data)
        page = data[offset:offset + limit] if limit is not None else data[offset:]
        doc = {**doc, "data": page, "has_more": offset + len(page) < total, "total": total,
               "limit": limit if limit is not None else max(total - offset, 0),
               "offset": offset}
    fields_param = request.query("fields")
    if fields_param:
        keep = {f.strip() for f in fields_param.split(",") if f.strip()}
        items = [item for item in doc["data"] if isinstance(item, dict)]
        known = {k for item in items for k in item}
        unknown = sorted(keep - known)
        if items and unknown:  # a typo would answer a page of empty objects
            raise InvalidRequest(f"unknown field(s) in 'fields': {', '.join(unknown)[:200]}",
                                 code="invalid_parameter",
                                 details={"unknown": unknown[:20], "known": sorted(known)})
        doc["data"] = [{k: v for k, v in item.items() if k in keep} if isinstance(item, dict)
                       else item for item in doc["data"]]
    return doc


def list_middleware(app: App) -> App:
    async def listed(request: Request) -> Response:
        response = await app(request)
        if (request.method not in ("GET", "HEAD") or response.status != 200
                or response.stream is not None or b'"data"' not in response.body
                or not (response.header("content-type") or "").startswith("application/json")):
            return response
        try:
            doc = loads(response.body)
        except ValueError:  # wire.JsonError
            return response
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            return response
        response.body = json.dumps(shape_list(request, doc), separators=(",", ":")).encode()
        return response

    return listed


def admin_bearer(db: Database, config: Config,
                 limiter: LoginLimiter) -> Callable[[Request], None]:
    """A check for ``Authorization: Bearer <admin token>`` (the /metrics scrape); failures
    count against the admin API's `limiter`, the right token always passes."""

    def authorize(request: Request) -> None:
        scheme, _, token = (request.header("authorization") or "").strip().partition(" ")
        expected = resolve_admin_hash(db, config)
        if scheme.lower() != "bearer" or not token.strip() or not expected:
            raise AuthenticationFailed("Use 'Authorization: Bearer <admin token>'",
                                       code="admin_auth_required")
        check_admin_token_limited(limiter, request, token.strip(), expected)

    return authorize


# ---- the bundle -----------------------------------------------------------------------------
class Platform:
    def __init__(self, config: Config, db: Database, boot_id: str,
                 account_of: Callable[[Request], Awaitable[Account]],
                 known_owner: Callable[[Request], Awaitable[bool]]) -> None:
        self.config = config
        self.limiter = RateLimiter(Limits(config.rate_limit_requests, config.rate_limit_tokens,
                                          config.rate_limit_concurrent),
                                   queue_wait_s=config.rate_limit_queue_wait)
        self.idempotency = IdempotencyStore(db, ttl_s=config.idempotency_ttl, boot_id=boot_id,
                                            known=known_owner)
        self.metrics = Metrics(db)
        self.extra_metrics: list[Callable[[], Extra]] = []  # other services' series (Nostr)
        self.overreports = 0  # upstream usage reports above the request's ceiling
        self.unbilled_msats = 0  # costs the payer's money could not cover: the operator's loss
        self.webhooks = Webhooks(
            db, account_of,
            WebhookSettings(config.webhooks_allow_private, config.webhook_low_balance_msats,
                            config.webhook_scan_interval, config.webhook_retry_base,
                            config.webhook_max_attempts, resolve=not config.upstream_proxy),
            HttpClient(connect_timeout=5.0, read_timeout=15.0, write_timeout=15.0,
                       proxy=config.upstream_proxy or None))

    # -- routes and middleware ----------------------------------------------------------------
    def routes(self, table: Callable[[], list[Route]],
               authorize_admin: Callable[[Request], None]) -> list[Route]:
        """The platform's routes; `table` returns the node's whole route list (read lazily)."""
        docs = ApiDocs(table, self.config.name)
        batch = Batch(table, self.limiter,
                      BatchLimits(self.config.batch_max_requests, self.config.batch_max_bytes,
                                  self.config.batch_concurrency), wrap=list_middleware)

        async def metrics(request: Request, params: dict[str, str]) -> Response:
            authorize_admin(request)
            return self.metrics.response(self._extra_metrics())

        return [
            Route("POST", "/v1/batch", batch.handle),
            Route("POST", "/v1/webhooks", self.webhooks.create),
            Route("GET", "/v1/webhooks", self.webhooks.list),
            Route("DELETE", "/v1/webhooks/{webhook_id}", self.webhooks.delete),
            Route("GET", "/openapi.json", docs.openapi),
            Route("GET", "/docs", docs.docs),
            Route("GET", "/redoc", docs.redoc),
            Route("GET", "/metrics", metrics),
        ]

    def wrap(self, app: App, routes: Iterable[Route]) -> App:
        self.metrics.set_routes(routes)
        return self.limiter.wrap(self.idempotency.wrap(list_middleware(app)))

    def _extra_metrics(self) -> Extra:
        extra: Extra = {
            "routstr_rate_limited_total": (
                "counter", "Requests refused by a per-key rate limit, by limit.",
                {(("limit", k),): float(v) for k, v in self.limiter.rejected.items()}),
            "routstr_idempotent_replays_total": (
                "counter", "Answers replayed for a repeated Idempotency-Key.",
                {(): float(self.idempotency.replays)}),
            "routstr_webhook_deliveries_total": (
                "counter", "Webhook delivery attempts, by result.",
                {(("result", "delivered"),): float(self.webhooks.delivered),
                 (("result", "failed"),): float(self.webhooks.failed_attempts)}),
            "routstr_upstream_overreports_total": (
                "counter", "Upstream usage reports above the request's ceiling (charged the"
                " ceiling at most).", {(): float(self.overreports)}),
            "routstr_unbilled_msats_total": (
                "counter", "Msats of priced usage the payer's money could not cover (the"
                " operator's loss).", {(): float(self.unbilled_msats)}),
        }
        for source in self.extra_metrics:
            extra.update(source())
        return extra

    # -- proxy observer -----------------------------------------------------------------------
    def settled(self, request: Request, tokens: int, charged_msats: int, account_id: int) -> None:
        """A request was settled (plain def, no I/O: runs on the settlement path)."""
        self.limiter.record_tokens(request, tokens)
        self.metrics.observe_settlement(charged_msats)
        self.webhooks.note_settlement(account_id)

    def upstream_error(self, code: str) -> None:
        self.metrics.observe_upstream_error(code)

    def overreported(self) -> None:
        self.overreports += 1

    def unbilled(self, msats: int) -> None:
        self.unbilled_msats += msats

    # -- background ---------------------------------------------------------------------------
    async def run_forever(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.webhooks.run_forever)
            while True:
                try:
                    swept = self.idempotency.sweep() + self.webhooks.sweep()
                    if swept:
                        log.info("swept %d expired idempotency keys and webhook events", swept)
                except DatabaseError as exc:
                    log.warning("platform sweep: %s", exc)
                await anyio.sleep(min(SWEEP_INTERVAL_S, self.config.idempotency_ttl))

    async def aclose(self) -> None:
        await self.webhooks.aclose()
