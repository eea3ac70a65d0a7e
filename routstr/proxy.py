"""OpenAI-compatible paid endpoints: authenticate → worst case → reserve → forward → relay → settle.

Money flow of one request (all amounts integer msats):

1. The body is parsed only as far as billing needs (model, `max_tokens`, `stream`, `n`).
2. `pricing.worst_case_msats` bounds what the request can cost; `X-Max-Cost` (sats) refuses it
   with 402 before anything is forwarded when the bound exceeds the client's cap.
3. The payer (an `sk-` key, a Cashu token used as key, or an `X-Cashu` token) is resolved by
   `payments.Payments`; the ledger reserves the worst case atomically (402 when short).
4. The request goes upstream byte-faithfully, except: `Authorization` becomes the node's
   upstream key, hop-by-hop and Routstr headers are dropped, and a streamed chat/completions
   request gets `stream_options.include_usage` so the upstream reports its own token counts.
5. The reservation is settled exactly once, in `Billing.finish`, always reached through a
   shielded `finally`: upstream usage → exact cost; no usage → an estimate from what was
   relayed, never more than reserved; upstream failure → released, nothing charged.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from . import pricing, wire
from .client import HttpClient, UpstreamResponse
from .errors import (
    ApiError,
    InsufficientBalance,
    InvalidRequest,
    ServiceUnavailable,
    UpstreamError,
    UpstreamStatusError,
)
from .ledger import MAX_MSATS, Ledger, ReservationGone, Settlement
from .messages import Request, Response
from .money import format_sats
from .payments import Payer, Payments
from .sse import SSEDecoder, SSEError, SSEEvent, encode_event

log = logging.getLogger("routstr.proxy")

MAX_UPSTREAM_BODY_BYTES = 64 * 1024 * 1024
CHARS_PER_TOKEN_ESTIMATE = 4
SETTLE_TIMEOUT_S = 30.0

# Request headers never forwarded upstream: hop-by-hop (RFC 9110 §7.6.1), framing, the
# client's credentials and Routstr's own payment headers.
_DROP_REQUEST_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "authorization", "x-cashu",
    "x-max-cost", "refund-lnurl", "key-expiry-time", "idempotency-key", "x-routstr-version",
    "cookie", "accept-encoding", "api-key", "x-api-key", "expect",
})
# Upstream response headers passed on to the client.
_PASS_RESPONSE_HEADERS = frozenset({
    "content-type", "cache-control", "openai-processing-ms", "openai-version", "x-request-id",
    "openai-model", "openai-organization",
})


@dataclass(frozen=True)
class Endpoint:
    """One proxied path and how it is billed."""

    path: str  # upstream path, appended to --upstream-base-url
    billing: str  # "tokens" | "prompt" | "per_request" | "free"
    streams: bool = False  # may answer with SSE
    json_body: bool = True
    # "chat" (data chunks, [DONE]) | "responses" (typed events) | "anthropic" (Messages API)
    usage_style: str = "chat"


CHAT = Endpoint("/chat/completions", "tokens", streams=True)
COMPLETIONS = Endpoint("/completions", "tokens", streams=True)
EMBEDDINGS = Endpoint("/embeddings", "prompt")
IMAGES = Endpoint("/images/generations", "per_request")
AUDIO = Endpoint("/audio/transcriptions", "per_request", json_body=False)
RESPONSES = Endpoint("/responses", "tokens", streams=True, usage_style="responses")
MODERATIONS = Endpoint("/moderations", "free")
# Anthropic's Messages API, passed through to an upstream that serves it (routstr-core clients
# call it); billed from its usage like the others. Counting tokens costs nothing.
MESSAGES = Endpoint("/messages", "tokens", streams=True, usage_style="anthropic")
COUNT_TOKENS = Endpoint("/messages/count_tokens", "free")


class ProxyObserver(Protocol):
    """Told about settlements and upstream failures (rate limits, metrics, webhooks)."""

    def settled(self, request: Request, tokens: int, charged_msats: int,
                account_id: int) -> None: ...

    def upstream_error(self, code: str) -> None: ...


@dataclass(frozen=True)
class ProxyConfig:
    upstream_base_url: str
    upstream_api_key: str
    chat_completions_api_version: str
    reservation_ttl_s: int


# ---- usage and cost ------------------------------------------------------------------------
def _count(value: object) -> int | None:
    return wire.usage_count(value)  # beyond MAX_USAGE_TOKENS: a lying upstream, clamped


def _bound_billing_fields(body: dict[str, Any]) -> None:
    """The JSON fields that size a request's cost, when given, are ints in range (else 400):
    output-token limits up to MAX_USAGE_TOKENS, choices (`n`, `best_of`) 1..MAX_N."""
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if body.get(name) is not None:
            wire.wire_int(body[name], name, high=wire.MAX_USAGE_TOKENS)
    for name in ("n", "best_of"):
        if body.get(name) is not None:
            wire.wire_int(body[name], name, low=1, high=pricing.MAX_N)


def usage_tokens(usage: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI-, Responses- or Anthropic-style `usage` object.

    Anthropic reports cache reads and writes beside `input_tokens`, not inside it: they count
    as prompt tokens too."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    if prompt is None:
        return None
    if "prompt_tokens" not in usage:
        for name in ("cache_read_input_tokens", "cache_creation_input_tokens"):
            prompt += _count(usage.get(name)) or 0
    completion = _count(usage.get("completion_tokens", usage.get("output_tokens", 0))) or 0
    return prompt, completion


def cost_object(cost: pricing.Cost) -> dict[str, int]:
    return {
        "base_msats": cost.base_msats,
        "input_msats": cost.input_msats,
        "output_msats": cost.output_msats,
        "total_msats": cost.total_msats,
    }


def _multipart_field(body: bytes, content_type: str, name: str) -> str | None:
    """The value of a small text field in a multipart/form-data body (the `model`)."""
    boundary = None
    for part in content_type.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        return None
    marker = f'name="{name}"'.encode()
    for section in body.split(b"--" + boundary.encode()):
        head, sep, content = section.partition(b"\r\n\r\n")
        if sep and marker in head and b"filename=" not in head:
            return content.rstrip(b"\r\n").decode("utf-8", "replace").strip()
    return None


@dataclass
class Billing:
    """One request's reservation, settled exactly once."""

    ledger: Ledger
    payer: Payer
    reservation_id: int
    reserved_msats: int
    cap_msats: int | None
    price: pricing.ModelPrice | None
    endpoint: Endpoint
    request_bytes: int
    request_id: str
    settlement: Settlement | None = None
    cost: pricing.Cost | None = None
    finished: bool = False
    estimated: bool = False
    tokens: int = 0  # usage tokens (reported or estimated), for the tokens/hour limit
    request: Request | None = None
    observer: ProxyObserver | None = None

    def cost_for_usage(self, usage: object) -> pricing.Cost:
        """The exact cost from upstream usage (or an estimate, flagged, when there is none)."""
        zero = pricing.Cost(0, 0, 0, 0)
        counted = usage_tokens(usage)
        self.tokens = sum(counted) if counted else 0
        if self.endpoint.billing == "free" or self.price is None:
            return zero
        if self.endpoint.billing == "per_request":
            return pricing.actual_cost(self.price, 0, 0)
        tokens = usage_tokens(usage)
        if tokens is None:
            return zero
        prompt, completion = tokens
        if self.endpoint.billing == "prompt":
            completion = 0
        return pricing.actual_cost(self.price, prompt, completion)

    def estimate(self, relayed_chars: int) -> pricing.Cost:
        """No usage from upstream: estimate from sizes, never above the reservation."""
        self.estimated = True
        if self.price is None or self.endpoint.billing == "free":
            return pricing.Cost(0, 0, 0, 0)
        if self.endpoint.billing == "per_request":
            return pricing.actual_cost(self.price, 0, 0)
        prompt = math.ceil(self.request_bytes / CHARS_PER_TOKEN_ESTIMATE)
        completion = math.ceil(relayed_chars / CHARS_PER_TOKEN_ESTIMATE)
        if self.endpoint.billing == "prompt":
            completion = 0
        self.tokens = prompt + completion
        cost = pricing.actual_cost(self.price, prompt, completion)
        if cost.total_msats > self.reserved_msats:
            cost = pricing.Cost(0, 0, self.reserved_msats, self.reserved_msats)
        return cost

    def finish(self, cost: pricing.Cost | None) -> Settlement | None:
        """Settle (cost given) or release (None). Idempotent; plain def, no await."""
        if self.finished:
            return self.settlement
        self.finished = True
        if cost is None:
            try:
                self.ledger.release(self.reservation_id)
            except ReservationGone:
                pass  # already released by the expiry sweep: nothing was held any more
            return None
        total = cost.total_msats
        if self.cap_msats is not None and total > self.cap_msats:
            total = self.cap_msats
        self.cost = cost if total == cost.total_msats else pricing.Cost(
            cost.base_msats, cost.input_msats, max(0, total - cost.base_msats - cost.input_msats),
            total)
        try:
            self.settlement = self.ledger.settle(self.reservation_id, total)
        except ReservationGone:  # outlived its reservation: charge what the balance allows
            self.settlement = self.ledger.charge(self.payer.account_id, total,
                                                 request_id=self.request_id)
        if self.estimated:
            log.info("request %s charged by estimate: %d msats", self.request_id, total)
        if self.settlement.overdraft_msats:
            log.warning("request %s cost %d msats above what could be charged",
                        self.request_id, self.settlement.overdraft_msats)
        if self.observer is not None and self.request is not None:
            self.observer.settled(self.request, self.tokens, self.settlement.charged_msats,
                                  self.payer.account_id)
        return self.settlement

    def cost_headers(self) -> list[tuple[str, str]]:
        if self.settlement is None or self.cost is None:
            return []
        charged = self.settlement.charged_msats
        balance = self.settlement.balance_msats
        return [
            ("x-routstr-cost", format_sats(charged)),
            ("x-routstr-cost-msats", str(charged)),
            ("x-routstr-input-cost-msats", str(self.cost.input_msats)),
            ("x-routstr-output-cost-msats", str(self.cost.output_msats)),
            ("x-routstr-balance", format_sats(balance)),
            ("x-routstr-balance-msats", str(balance)),
        ]

    def usage_fields(self) -> dict[str, Any]:
        assert self.settlement is not None and self.cost is not None
        obj = cost_object(self.cost)
        obj["total_msats"] = self.settlement.charged_msats
        return {
            "cost": obj,
            "cost_sats": self.settlement.charged_msats // 1000,
            "remaining_balance_msats": self.settlement.balance_msats,
        }


# ---- the streamed relay ---------------------------------------------------------------------
@dataclass
class Relay:
    """Relays an upstream SSE stream event by event and settles when it ends, however it ends.

    The usage chunk (chat) or `response.completed` event (Responses API) is held back until the
    reservation is settled, then passed on carrying the cost — or dropped when the client did
    not ask for usage. After the upstream's `[DONE]` a `routstr-cost` event follows, and the
    payer may add its own events (the X-Cashu change).
    """

    upstream: UpstreamResponse
    billing: Billing
    payments: Payments
    client_wants_usage: bool
    usage: object = None
    relayed_chars: int = 0
    ttl_s: int = 900
    _held: SSEEvent | None = None
    _closed: bool = False
    _decoder: SSEDecoder = field(default_factory=SSEDecoder)
    _gen: AsyncGenerator[bytes, None] | None = None
    _renewed_at: float = field(default_factory=time.monotonic)

    @property
    def renew_every_s(self) -> float:
        return self.ttl_s / 3

    def __aiter__(self) -> AsyncIterator[bytes]:
        gen = self._run()
        self._gen = gen
        return gen

    def _keep_reserved(self) -> None:
        """A long stream renews its reservation so the expiry sweep never takes it mid-way."""
        now = time.monotonic()
        if now - self._renewed_at > self.renew_every_s and not self.billing.finished:
            self._renewed_at = now
            try:
                self.billing.ledger.renew(self.billing.reservation_id, ttl_s=self.ttl_s)
            except ReservationGone:
                pass

    def _note_content(self, doc: Mapping[str, Any]) -> None:
        for choice in doc.get("choices") or ():
            if isinstance(choice, dict):
                delta = choice.get("delta") or {}
                text = delta.get("content") if isinstance(delta, dict) else None
                if not isinstance(text, str):
                    text = choice.get("text")
                if isinstance(text, str):
                    self.relayed_chars += len(text)
        if isinstance(doc.get("delta"), str):  # Responses API output_text.delta
            self.relayed_chars += len(doc["delta"])

    def _is_final(self, event: SSEEvent) -> bool:
        """The stream's last event: `[DONE]`, or Anthropic's `message_stop`."""
        if event.is_done:
            return True
        if self.billing.endpoint.usage_style != "anthropic" or not event.has_data:
            return False
        if event.event is not None:
            return event.event == "message_stop"
        doc = event.json()
        return isinstance(doc, dict) and doc.get("type") == "message_stop"

    def _inspect_anthropic(self, event: SSEEvent, doc: dict[str, Any]) -> bytes | None:
        """Messages API: input tokens come in `message_start`, the (cumulative) output count in
        `message_delta` — held, to carry the cost, until `message_stop`."""
        kind = doc.get("type")
        if kind == "message_start":
            message = doc.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self.usage = dict(usage)
        elif kind == "message_delta":
            usage = doc.get("usage")
            if isinstance(usage, dict):
                merged = dict(self.usage) if isinstance(self.usage, dict) else {}
                merged.update({k: v for k, v in usage.items() if v is not None})
                self.usage = merged
            previous, self._held = self._held, event
            return previous.raw if previous is not None else None
        elif kind == "content_block_delta":
            delta = doc.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("text"), str):
                self.relayed_chars += len(delta["text"])
        return event.raw

    def _error_event(self, code: str, message: str) -> bytes:
        """A final error event in the stream's own dialect."""
        if self.billing.endpoint.usage_style == "anthropic":
            return encode_event(json.dumps({"type": "error", "error": {
                "type": "api_error", "code": code, "message": message}}), "error")
        return encode_event(json.dumps({"error": {
            "type": "upstream_error", "code": code, "message": message, "details": {}}}))

    def _inspect(self, event: SSEEvent) -> bytes | None:
        """Bytes to pass on now for `event` (None = hold or drop)."""
        if not event.has_data or event.is_done:
            return event.raw
        doc = event.json()
        if not isinstance(doc, dict):
            return event.raw
        if self.billing.endpoint.usage_style == "anthropic":
            return self._inspect_anthropic(event, doc)
        if self.billing.endpoint.usage_style == "responses":
            if doc.get("type") == "response.completed" or event.event == "response.completed":
                resp = doc.get("response")
                self.usage = resp.get("usage") if isinstance(resp, dict) else None
                self._held = event
                return None
            self._note_content(doc)
            return event.raw
        self._note_content(doc)
        if isinstance(doc.get("usage"), dict) and not doc.get("choices"):
            self.usage = doc["usage"]
            self._held = event
            return None
        if isinstance(doc.get("usage"), dict):
            self.usage = doc["usage"]
        return event.raw

    def _settle(self) -> None:
        cost = (self.billing.cost_for_usage(self.usage) if self.usage is not None
                else self.billing.estimate(self.relayed_chars))
        self.billing.finish(cost)

    def _held_with_cost(self) -> bytes | None:
        held = self._held
        if held is None or self.billing.settlement is None:
            return None
        doc = held.json()
        assert isinstance(doc, dict)
        if self.billing.endpoint.usage_style == "anthropic":
            if isinstance(doc.get("usage"), dict):
                doc["usage"].update(self.billing.usage_fields())
            return encode_event(json.dumps(doc, separators=(",", ":")), held.event)
        if self.billing.endpoint.usage_style == "responses":
            resp = doc.get("response")
            if isinstance(resp, dict) and isinstance(resp.get("usage"), dict):
                resp["usage"].update(self.billing.usage_fields())
            return encode_event(json.dumps(doc, separators=(",", ":")), held.event)
        if not self.client_wants_usage:
            return None
        doc["usage"].update(self.billing.usage_fields())
        return encode_event(json.dumps(doc, separators=(",", ":")), held.event)

    async def _trailer(self) -> list[bytes]:
        out: list[bytes] = []
        settlement = self.billing.settlement
        # Chat streams end with [DONE], where SDKs stop reading: the cost event after it is
        # invisible to them. Responses API streams have no [DONE] (SDKs read to the end), and
        # carry the cost in response.completed already, so they get no extra event.
        if settlement is not None and self.billing.endpoint.usage_style == "chat":
            out.append(encode_event(json.dumps({
                "cost_msats": settlement.charged_msats,
                "balance_msats": settlement.balance_msats,
            }), "routstr-cost"))
        out.extend(await self.payments.after_stream(self.billing.payer, settlement))
        return out

    async def _run(self) -> AsyncGenerator[bytes, None]:
        done_seen = False
        try:
            async for chunk in self.upstream:
                self._keep_reserved()
                for event in self._decoder.feed(chunk):
                    if self._is_final(event):
                        done_seen = True
                        self._settle()  # a plain def: no await, cannot be cancelled
                        held = self._held_with_cost()
                        if held:
                            yield held
                        yield event.raw
                        continue
                    out = self._inspect(event)
                    if out is not None:
                        yield out
            for event in self._decoder.close():
                out = self._inspect(event)
                if out is not None and not event.is_done:
                    yield out
        except (UpstreamError, SSEError) as exc:
            log.warning("upstream stream for %s broke: %s", self.billing.request_id, exc)
            if self.billing.observer is not None:
                self.billing.observer.upstream_error("upstream_stream_failed")
            self._settle()  # a plain def: no await, cannot be cancelled
            yield self._error_event("upstream_stream_failed",
                                    "The upstream stream ended unexpectedly")
            yield b"".join(await self._trailer())
            return
        if not done_seen:
            self._settle()  # a plain def: no await, cannot be cancelled
            held = self._held_with_cost()
            if held:
                yield held
            if self.billing.endpoint.usage_style in ("chat", "anthropic"):
                yield self._error_event("upstream_stream_incomplete",
                                        "The upstream stream ended before its last event")
        for extra in await self._trailer():
            yield extra

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._gen is not None:
                await self._gen.aclose()  # finalize the generator now, not at GC time
            if not self.billing.finished:  # the client went away mid-stream
                self._settle()
                await self.payments.after_stream(self.billing.payer, self.billing.settlement)
        finally:
            await self.upstream.aclose()


# ---- the handlers ---------------------------------------------------------------------------
class Proxy:
    def __init__(self, config: ProxyConfig, ledger: Ledger, prices: pricing.PriceTable,
                 http: HttpClient, payments: Payments,
                 observer: ProxyObserver | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self.prices = prices
        self.http = http
        self.payments = payments
        self.observer = observer

    def handler(self, endpoint: Endpoint) -> Any:
        async def handle(request: Request, params: dict[str, str]) -> Response:
            return await self.forward(request, endpoint)
        return handle

    async def models(self, request: Request, params: dict[str, str]) -> Response:
        fields_param = request.query("fields")
        fields = [f.strip() for f in fields_param.split(",") if f.strip()] if fields_param else None
        doc = pricing.models_document(self.prices, fields=fields)
        body = json.dumps(doc, separators=(",", ":")).encode()
        return Response(200, [("content-type", "application/json")], body)

    def _parse(self, request: Request, endpoint: Endpoint) -> tuple[dict[str, Any], str | None]:
        if endpoint.json_body:
            body = request.json_object()
            model = body.get("model")
            if isinstance(model, dict):  # Responses API allows {"model": {...}} in some SDKs
                model = model.get("id")
        else:
            ctype = request.header("content-type") or ""
            if "multipart/form-data" not in ctype:
                raise InvalidRequest("Expected a multipart/form-data body", code="invalid_body")
            model = _multipart_field(request.body, ctype, "model")
            body = {"model": model}
        if model is not None and not isinstance(model, str):
            raise InvalidRequest("'model' must be a string", code="invalid_model")
        if endpoint.billing != "free" and not model:
            raise InvalidRequest("'model' is required", code="model_required")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 0
                                       or isinstance(max_tokens, bool)):
            raise InvalidRequest("max_tokens must be a non-negative integer",
                                 code="invalid_max_tokens")
        _bound_billing_fields(body)
        return body, model

    def _worst_case(self, endpoint: Endpoint, price: pricing.ModelPrice | None,
                    body: dict[str, Any], size: int) -> int:
        if price is None or endpoint.billing == "free":
            return 0
        if endpoint.billing == "per_request":
            n = body.get("n", 1)
            count = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
            return pricing.actual_cost(price, 0, 0).total_msats * count
        if endpoint.billing == "prompt":
            return pricing.worst_case_msats(price, {**body, "max_tokens": 0}, size)
        if endpoint is RESPONSES and "max_output_tokens" in body:
            body = {**body, "max_tokens": body["max_output_tokens"]}
        return pricing.worst_case_msats(price, body, size)

    @staticmethod
    def _max_cost_msats(request: Request) -> int | None:
        raw = request.header("x-max-cost")
        if raw is None:
            return None
        # decimal sats, exact (no float), cut to the msat; more than every bitcoin → 400
        return wire.sats_msats(raw, "X-Max-Cost", high_msats=MAX_MSATS, code="invalid_max_cost")

    def _upstream_request(self, request: Request, endpoint: Endpoint, body: dict[str, Any],
                          stream: bool) -> tuple[str, list[tuple[str, str]], bytes]:
        base = self.config.upstream_base_url.rstrip("/")
        url = base + endpoint.path
        query = request.query_string
        if endpoint is CHAT and self.config.chat_completions_api_version:
            extra = f"api-version={self.config.chat_completions_api_version}"
            query = f"{query}&{extra}" if query else extra
        if query:
            url = f"{url}?{query}"
        headers = [(k, v) for k, v in request.headers if k not in _DROP_REQUEST_HEADERS]
        if self.config.upstream_api_key:
            headers.append(("authorization", f"Bearer {self.config.upstream_api_key}"))
            if self.config.chat_completions_api_version:
                headers.append(("api-key", self.config.upstream_api_key))
            if endpoint in (MESSAGES, COUNT_TOKENS):  # where Anthropic's API expects it
                headers.append(("x-api-key", self.config.upstream_api_key))
        payload = request.body
        if stream and endpoint in (CHAT, COMPLETIONS):
            opts = body.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage") is True):
                new_opts = dict(opts) if isinstance(opts, dict) else {}
                new_opts["include_usage"] = True
                payload = json.dumps({**body, "stream_options": new_opts}).encode()
        return url, headers, payload

    async def forward(self, request: Request, endpoint: Endpoint) -> Response:
        body, model = self._parse(request, endpoint)
        price = self.prices.get(model) if model and endpoint.billing != "free" else None
        worst = self._worst_case(endpoint, price, body, len(request.body))
        cap = self._max_cost_msats(request)
        if cap is not None and worst > cap:
            raise InsufficientBalance(
                f"Worst-case cost {format_sats(worst)} sats exceeds X-Max-Cost",
                code="max_cost_exceeded", details={"required": worst, "max_cost": cap})
        if not self.config.upstream_base_url:
            raise ServiceUnavailable("No upstream is configured on this node",
                                     code="upstream_not_configured")
        payer = await self.payments.payer_for(request, worst, model or "")
        try:
            reservation = self.ledger.reserve(payer.account_id, worst,
                                              request_id=request.request_id,
                                              ttl_s=self.config.reservation_ttl_s)
        except ApiError as exc:
            await self.payments.after_failure(payer, exc)
            raise
        billing = Billing(self.ledger, payer, reservation.id, worst, cap, price, endpoint,
                          len(request.body), request.request_id, request=request,
                          observer=self.observer)
        stream = bool(body.get("stream")) and endpoint.streams
        url, headers, payload = self._upstream_request(request, endpoint, body, stream)
        opts = body.get("stream_options")
        wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        upstream: UpstreamResponse | None = None
        handed_off = False
        try:
            upstream = await self.http.request(request.method, url, headers, payload)
            if upstream.status >= 400:
                raise await self._upstream_failure(upstream)
            ctype = upstream.header("content-type") or ""
            if "text/event-stream" in ctype:
                relay = Relay(upstream, billing, self.payments, wants_usage,
                              ttl_s=self.config.reservation_ttl_s)
                handed_off = True
                out_headers = [("content-type", ctype), ("cache-control", "no-cache"),
                               ("x-accel-buffering", "no")]
                return Response(upstream.status, out_headers, stream=relay)
            raw = await upstream.read(MAX_UPSTREAM_BODY_BYTES)
            return await self._complete(request, billing, upstream, raw)
        except ApiError as exc:
            if self.observer is not None and isinstance(exc, (UpstreamError,
                                                               UpstreamStatusError)):
                self.observer.upstream_error(exc.code)
            with anyio.CancelScope(shield=True):
                billing.finish(None)
                await self.payments.after_failure(payer, exc)
            raise
        finally:
            if upstream is not None and not handed_off and not upstream.finished:
                with anyio.CancelScope(shield=True):
                    await upstream.aclose()
            if not billing.finished and not handed_off:
                billing.finish(None)

    async def _upstream_failure(self, upstream: UpstreamResponse) -> ApiError:
        try:
            raw = await upstream.read(1024 * 1024)
        except UpstreamError:
            raw = b""
        message = raw[:500].decode("utf-8", "replace")
        details: dict[str, Any] = {"upstream_status": upstream.status}
        try:
            doc = wire.loads(raw)
            err = doc.get("error") if isinstance(doc, dict) else None
            if isinstance(err, dict):
                message = str(err.get("message") or message)
                details["upstream_error"] = err
            elif isinstance(err, str):
                message = err
        except (ValueError, UnicodeDecodeError):
            pass
        if upstream.status >= 500:
            return UpstreamError(f"Upstream returned {upstream.status}: {message}",
                                 code="upstream_failed", details=details)
        headers = []
        retry = upstream.header("retry-after")
        if retry:
            headers.append(("retry-after", retry))
        err_obj = UpstreamStatusError(upstream.status, message or "Upstream rejected the request",
                                      details)
        err_obj.headers.extend(headers)
        return err_obj

    async def _complete(self, request: Request, billing: Billing, upstream: UpstreamResponse,
                        raw: bytes) -> Response:
        ctype = upstream.header("content-type") or "application/octet-stream"
        doc: Any = None
        if "json" in ctype:
            try:
                doc = wire.loads(raw)
            except (ValueError, UnicodeDecodeError):
                doc = None
        usage = doc.get("usage") if isinstance(doc, dict) else None
        if billing.endpoint.billing in ("per_request", "free") or usage_tokens(usage):
            cost = billing.cost_for_usage(usage)
        else:
            cost = billing.estimate(len(raw))
        billing.finish(cost)
        if isinstance(doc, dict) and isinstance(usage, dict) and billing.settlement is not None:
            usage.update(billing.usage_fields())
            raw = json.dumps(doc, separators=(",", ":")).encode()
        headers = [(k, v) for k, v in upstream.headers if k in _PASS_RESPONSE_HEADERS]
        headers.extend(billing.cost_headers())
        headers.extend(await self.payments.after_success(billing.payer, billing.settlement))
        return Response(upstream.status, headers, raw)

