"""OpenAI-compatible paid endpoints: authenticate → worst case → reserve → forward → relay → settle.

Money flow of one request (all amounts integer msats):

1. The body is parsed only as far as billing needs (model, token limits, `stream`, `n`).
2. `pricing.ceiling` is the most an honest upstream can report for the request (prompt ≤ the
   body's bytes, output ≤ n × the largest token limit); `X-Max-Cost` (sats) lowers it.
   `pricing.reservation_msats` holds the ceiling's output part in full and the prompt at an
   estimate; X-Max-Cost below that refuses the request with 402 before anything is forwarded.
3. The payer (an `sk-` key, a Cashu token used as key, or an `X-Cashu` token) is resolved by
   `payments.Payments`; the ledger reserves atomically (402 with the amount needed when short).
4. The request goes upstream byte-faithfully, except: `Authorization` becomes the node's
   upstream key, hop-by-hop and Routstr headers are dropped, and a streamed chat/completions
   request gets `stream_options.include_usage` so the upstream reports its own token counts.
5. The reservation is settled exactly once, in `Billing.finish`, always reached through a
   shielded `finally`: upstream usage → its price, each count clamped to the ceiling (more is
   a lie: logged, counted in /metrics); no usage → an estimate from what was relayed, never
   more than reserved; upstream failure → released, nothing charged. The hold is renewed by
   the process while the request runs (ledger.sweep_expired), however long it takes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
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
from .payments import Change, Payer, Payments
from .pricefeed import RateFeed
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
    "x-cashu-lock",
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

    def overreported(self) -> None:
        """An upstream reported more usage than the request's ceiling allows."""

    def unbilled(self, msats: int) -> None:
        """Part of a cost could not be charged (the payer's money ran out): the operator's loss."""


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
    """The output-token limits, when given, are ints up to MAX_USAGE_TOKENS (else 400); the
    choice counts (`n`, `best_of`) are checked where the ceiling is made (pricing._choices)."""
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if body.get(name) is not None:
            wire.wire_int(body[name], name, high=wire.MAX_USAGE_TOKENS)


def usage_counts(usage: object) -> tuple[int, int, int, int] | None:
    """(prompt, completion, cached, cache-written) tokens from an OpenAI-, Responses- or
    Anthropic-style `usage` object; `prompt` counts every input token, of which `cached` were
    read from the provider's cache and `written` written to it (each billed at its own rate).

    OpenAI counts cached tokens inside `prompt_tokens` (`prompt_tokens_details.cached_tokens`;
    OpenRouter adds `cache_write_tokens` there; DeepSeek reports `prompt_cache_hit_tokens`),
    the Responses API inside `input_tokens` (`input_tokens_details.cached_tokens`). Anthropic
    reports cache reads and writes beside `input_tokens`, not inside it: they are added.
    Reasoning tokens are inside `completion_tokens`: counted once, as output."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    if prompt is None:
        return None
    completion = _count(usage.get("completion_tokens", usage.get("output_tokens", 0))) or 0
    if "prompt_tokens" not in usage and ("cache_read_input_tokens" in usage
                                         or "cache_creation_input_tokens" in usage):
        cached = _count(usage.get("cache_read_input_tokens")) or 0
        written = _count(usage.get("cache_creation_input_tokens")) or 0
        return prompt + cached + written, completion, cached, written
    details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
    details = details if isinstance(details, dict) else {}
    cached = _count(details.get("cached_tokens", usage.get("prompt_cache_hit_tokens"))) or 0
    written = _count(details.get("cache_write_tokens",
                                 details.get("cache_creation_tokens"))) or 0
    return prompt, completion, cached, written


def usage_tokens(usage: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens of `usage` (see `usage_counts`)."""
    counts = usage_counts(usage)
    return None if counts is None else counts[:2]


def cost_object(cost: pricing.Cost) -> dict[str, int]:
    return {
        "base_msats": cost.base_msats,
        "input_msats": cost.input_msats,
        "output_msats": cost.output_msats,
        "cache_read_msats": cost.cache_read_msats,
        "cache_creation_msats": cost.cache_creation_msats,
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
    """One request's reservation, settled exactly once: the priced usage of what was served,
    each count clamped to the request's ceiling (an upstream reporting more is lying or broken:
    logged and counted), never above the ceiling's price."""

    ledger: Ledger
    payer: Payer
    reservation_id: int
    reserved_msats: int
    ceiling: pricing.Ceiling
    price: pricing.ModelPrice | None
    endpoint: Endpoint
    request_bytes: int
    request_id: str
    settlement: Settlement | None = None
    cost: pricing.Cost | None = None
    finished: bool = False
    estimated: bool = False
    tokens: int = 0  # usage tokens (reported or estimated, clamped), for the tokens/hour limit
    counts: tuple[int, int] = (0, 0)  # the (prompt, completion) tokens charged
    request: Request | None = None
    observer: ProxyObserver | None = None

    def _tokens(self, prompt: int, completion: int, cached: int = 0,
                written: int = 0) -> pricing.Cost:
        assert self.price is not None
        if self.ceiling.over(prompt, completion):
            log.warning("request %s: upstream reported %d prompt / %d completion tokens, above"
                        " the ceiling (%d / %d); charged at most the ceiling", self.request_id,
                        prompt, completion, self.ceiling.prompt_tokens,
                        self.ceiling.output_tokens)
            if self.observer is not None:
                self.observer.overreported()
        self.counts = self.ceiling.clamp(prompt, completion)
        self.tokens = sum(self.counts)
        return self.ceiling.charge(self.price, prompt, completion, cached, written)

    def cost_for_usage(self, usage: object, units: int | None = None) -> pricing.Cost:
        """The cost from upstream usage; `units`: items served (images), when known."""
        zero = pricing.Cost(0, 0, 0, 0)
        if self.endpoint.billing == "free" or self.price is None:
            counted = usage_tokens(usage)
            self.tokens = sum(self.ceiling.clamp(*counted)) if counted else 0
            return zero
        if self.endpoint.billing == "per_request":
            served = self.ceiling.units if units is None else min(units, self.ceiling.units)
            cost = pricing.actual_cost(self.price, 0, 0)
            return pricing.Cost(cost.base_msats * served, 0, 0, cost.total_msats * served)
        counts = usage_counts(usage)
        if counts is None:
            return zero
        prompt, completion, cached, written = counts
        if self.endpoint.billing == "prompt":
            completion = 0
        return self._tokens(prompt, completion, cached, written)

    def estimate(self, relayed_chars: int) -> pricing.Cost:
        """No usage from upstream: estimate from sizes, never above the reservation."""
        self.estimated = True
        if self.price is None or self.endpoint.billing == "free":
            return pricing.Cost(0, 0, 0, 0)
        if self.endpoint.billing == "per_request":
            return self.cost_for_usage(None)
        prompt = math.ceil(self.request_bytes / CHARS_PER_TOKEN_ESTIMATE)
        completion = math.ceil(relayed_chars / CHARS_PER_TOKEN_ESTIMATE)
        if self.endpoint.billing == "prompt":
            completion = 0
        prompt, completion = self.counts = self.ceiling.clamp(prompt, completion)
        self.tokens = prompt + completion
        cost = self.ceiling.charge(self.price, prompt, completion)
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
                pass  # released by another process (this one was paused past the ttl)
            return None
        self.cost = cost  # ≤ the ceiling: cost_for_usage and estimate cap it
        try:
            self.settlement = self.ledger.settle(self.reservation_id, cost.total_msats)
        except ReservationGone:  # released by another process: charge what the balance allows
            self.settlement = self.ledger.charge(self.payer.account_id, cost.total_msats,
                                                 request_id=self.request_id)
        if self.estimated:
            log.info("request %s charged by estimate: %d msats", self.request_id,
                     cost.total_msats)
        if self.settlement.overdraft_msats:
            log.warning("request %s cost %d msats above what could be charged",
                        self.request_id, self.settlement.overdraft_msats)
            if self.observer is not None:
                self.observer.unbilled(self.settlement.overdraft_msats)
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

    The stream stays a plain stream of its dialect through any relay in front of the node
    (routstr-core holds `[DONE]` back and re-emits it last, passing every other event through,
    and bills its own user from `usage` only): nothing of ours follows the last event, and the
    cost rides in the stream's final usage-bearing event — chat's usage chunk (sent when the
    client asked for usage), Responses' `response.completed`, Messages' `message_delta` — held
    until the reservation is settled. A stream the node charged without such an event from the
    upstream (no usage, or cut short) gets one made from the counts charged, before the error
    event. X-Cashu change rides in the same event (`cashu_change`), or, when there is none,
    in an `event: cashu-change` after the last event.
    """

    upstream: UpstreamResponse
    billing: Billing
    payments: Payments
    client_wants_usage: bool
    usage: object = None
    relayed_chars: int = 0
    _held: SSEEvent | None = None
    _closed: bool = False
    _decoder: SSEDecoder = field(default_factory=SSEDecoder)
    _gen: AsyncGenerator[bytes, None] | None = None
    _ident: dict[str, Any] = field(default_factory=dict)  # id/model/created of the stream

    def __aiter__(self) -> AsyncIterator[bytes]:
        gen = self._run()
        self._gen = gen
        return gen

    @property
    def _style(self) -> str:
        return self.billing.endpoint.usage_style

    def _note_ident(self, doc: Mapping[str, Any]) -> None:
        """The stream's id and model, for an event the node has to make itself."""
        if self._ident:
            return
        src = doc.get("response") if self._style == "responses" else doc.get("message") \
            if self._style == "anthropic" else doc
        if isinstance(src, dict) and isinstance(src.get("id"), str):
            self._ident = {k: src[k] for k in ("id", "model", "created")
                           if isinstance(src.get(k), (str, int)) and not isinstance(src[k], bool)}

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
        if self._style != "anthropic" or not event.has_data:
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
        if self._style == "anthropic":
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
        self._note_ident(doc)
        if self._style == "anthropic":
            return self._inspect_anthropic(event, doc)
        if self._style == "responses":
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

    async def _settle(self) -> Change | None:
        """Settle (a plain call: no await before the ledger is done), then the X-Cashu change,
        shielded: a client gone away does not stop the change being made and recorded."""
        cost = (self.billing.cost_for_usage(self.usage) if self.usage is not None
                else self.billing.estimate(self.relayed_chars))
        self.billing.finish(cost)
        with anyio.CancelScope(shield=True):
            change = await self.payments.after_stream(self.billing.payer, self.billing.settlement)
        return change

    def _made_usage(self) -> dict[str, Any]:
        """The usage of the counts the node charged, in the stream's dialect."""
        prompt, completion = self.billing.counts
        if self._style == "chat":
            return {"prompt_tokens": prompt, "completion_tokens": completion,
                    "total_tokens": prompt + completion}
        usage = {"input_tokens": prompt, "output_tokens": completion}
        if self._style == "responses":
            usage["total_tokens"] = prompt + completion
        return usage

    def _made_event(self, cut: bool) -> tuple[dict[str, Any], str | None] | None:
        """The usage-bearing event the upstream did not send, or None where none is due."""
        if self._style == "chat":
            if not (cut or self.client_wants_usage):
                return None  # OpenAI's contract: no usage chunk unless asked for
            doc: dict[str, Any] = {"id": "", "object": "chat.completion.chunk", "created": 0,
                                   "model": "", **self._ident}
            return {**doc, "choices": [], "usage": self._made_usage()}, None
        if self._style == "anthropic":
            return {"type": "message_delta", "delta": {"stop_reason": None, "stop_sequence": None},
                    "usage": self._made_usage()}, "message_delta"
        resp = {"id": "", "object": "response", **self._ident, "status": "failed",
                "error": {"code": "upstream_stream_failed",
                          "message": "The upstream stream ended before the response completed"},
                "usage": self._made_usage()}
        return {"type": "response.failed", "response": resp}, "response.failed"

    def _final_event(self, change: Change | None, *, cut: bool) -> bytes | None:
        """The stream's last usage-bearing event with the cost (and the X-Cashu change)."""
        if self.billing.settlement is None:
            return None
        held, name = self._held, None
        if held is not None and (cut or self.client_wants_usage or self._style != "chat"):
            doc = held.json()
            assert isinstance(doc, dict)
            name = held.event
        elif held is None and (made := self._made_event(cut)) is not None:
            doc, name = made
        else:
            return None
        target = doc.get("response") if self._style == "responses" else doc
        if isinstance(target, dict):
            if not isinstance(target.get("usage"), dict):
                target["usage"] = self._made_usage()
            target["usage"].update(self.billing.usage_fields())
        if change is not None:
            doc["cashu_change"] = {"token": change.token, "msats": change.msats}
        return encode_event(json.dumps(doc, separators=(",", ":")), name)

    async def _end(self, final: SSEEvent | None, error: tuple[str, str] | None) -> list[bytes]:
        """The stream's end: the usage-bearing event, then the upstream's last event or an
        error event, then the change if no event carried it. A stream is cut when its last
        event never came (Responses: `response.completed`, which then is the usage event)."""
        change = await self._settle()
        cut = self._held is None if self._style == "responses" else final is None
        usage_event = self._final_event(change, cut=cut)
        out = [usage_event] if usage_event is not None else []
        if final is not None:
            out.append(final.raw)
        elif cut and self._style != "responses":  # Responses: response.failed says it
            out.append(self._error_event(*(error or (
                "upstream_stream_incomplete", "The upstream stream ended before its last event"))))
        if change is not None and usage_event is None:
            out.append(encode_event(json.dumps({"token": change.token, "msats": change.msats}),
                                    "cashu-change"))
        return out

    async def _run(self) -> AsyncGenerator[bytes, None]:
        ended = False
        try:
            async for chunk in self.upstream:
                for event in self._decoder.feed(chunk):
                    if ended:
                        continue  # read to the end (the connection is reused), pass nothing on
                    if self._is_final(event):
                        ended = True
                        for piece in await self._end(event, None):
                            yield piece
                        continue
                    out = self._inspect(event)
                    if out is not None:
                        yield out
            for event in self._decoder.close():
                rest = None if ended else self._inspect(event)
                if rest is not None and not event.is_done:
                    yield rest
        except (UpstreamError, SSEError) as exc:
            log.warning("upstream stream for %s broke: %s", self.billing.request_id, exc)
            if self.billing.observer is not None:
                self.billing.observer.upstream_error("upstream_stream_failed")
            if not ended:
                yield b"".join(await self._end(None, (
                    "upstream_stream_failed", "The upstream stream ended unexpectedly")))
            return
        if not ended:
            for piece in await self._end(None, None):
                yield piece

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._gen is not None:
                await self._gen.aclose()  # finalize the generator now, not at GC time
            if not self.billing.finished:  # the client went away mid-stream
                await self._settle()
        finally:
            await self.upstream.aclose()


# ---- the handlers ---------------------------------------------------------------------------
class Proxy:
    def __init__(self, config: ProxyConfig, ledger: Ledger, prices: pricing.PriceTable,
                 http: HttpClient, payments: Payments,
                 observer: ProxyObserver | None = None, *, rates: RateFeed,
                 markup: Fraction = Fraction(1)) -> None:
        self.config = config
        self.ledger = ledger
        self.prices = prices
        self.http = http
        self.payments = payments
        self.observer = observer
        self.rates = rates
        self.markup = markup

    def price_of(self, model: str) -> pricing.ModelPrice:
        """The model's price in msats at the current BTC/USD snapshot: resolved once per
        request, so its reservation and its settlement use the same rate."""
        return pricing.at_rate(self.prices.get(model), self.rates.usd_per_btc(), self.markup)

    def handler(self, endpoint: Endpoint) -> Any:
        async def handle(request: Request, params: dict[str, str]) -> Response:
            return await self.forward(request, endpoint)
        return handle

    async def models(self, request: Request, params: dict[str, str]) -> Response:
        # `?fields=` is applied (and checked) by the listing middleware, as for every list
        doc = pricing.models_document(self.prices, btc_usd=self.rates.usd_per_btc(),
                                      markup=self.markup)
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

    def _ceiling(self, endpoint: Endpoint, price: pricing.ModelPrice | None,
                 body: dict[str, Any], size: int) -> tuple[pricing.Ceiling, int]:
        """(ceiling, reservation) of a request (a free one: both zero)."""
        if price is None or endpoint.billing == "free":  # usage bounded for the tokens/hour limit
            return pricing.Ceiling(size + pricing.PROMPT_OVERHEAD_TOKENS, 0, 0, 0), 0
        ceil = pricing.ceiling(price, body, size, endpoint.billing)
        return ceil, pricing.reservation_msats(price, body, ceil, endpoint.billing)

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
        price = self.price_of(model) if model and endpoint.billing != "free" else None
        ceil, worst = self._ceiling(endpoint, price, body, len(request.body))
        cap = self._max_cost_msats(request)
        if cap is not None and worst > cap:
            raise InsufficientBalance(
                f"Worst-case cost {format_sats(worst)} sats exceeds X-Max-Cost",
                code="max_cost_exceeded", details={"required": worst, "max_cost": cap})
        if cap is not None and cap < ceil.msats:
            ceil = dataclasses.replace(ceil, msats=cap)
        if worst > MAX_MSATS:  # before the payer: no X-Cashu payment request for it either
            raise InsufficientBalance(
                "The request's worst-case cost is more than can ever be paid",
                code="insufficient_balance", details={"required": worst})
        if not self.config.upstream_base_url:
            raise ServiceUnavailable("No upstream is configured on this node",
                                     code="upstream_not_configured")
        stream = bool(body.get("stream")) and endpoint.streams
        # a stream's X-Cashu split keeps the ceiling: what settlement may charge beyond `worst`
        payer = await self.payments.payer_for(request, worst, model or "",
                                              keep_msats=ceil.msats if stream else None)
        try:
            reservation = self.ledger.reserve(payer.account_id, worst,
                                              request_id=request.request_id,
                                              ttl_s=self.config.reservation_ttl_s)
        except ApiError as exc:
            await self.payments.after_failure(payer, exc)
            raise self.payments.explain(request, payer, exc) from None
        billing = Billing(self.ledger, payer, reservation.id, worst, ceil, price, endpoint,
                          len(request.body), request.request_id, request=request,
                          observer=self.observer)
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
                relay = Relay(upstream, billing, self.payments, wants_usage)
                handed_off = True
                out_headers = [("content-type", ctype), ("cache-control", "no-cache"),
                               ("x-accel-buffering", "no")]
                out_headers.extend(self.payments.stream_headers(payer))
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
            data = doc.get("data") if isinstance(doc, dict) else None
            cost = billing.cost_for_usage(usage, len(data) if isinstance(data, list) else None)
        else:
            cost = billing.estimate(len(raw))
        billing.finish(cost)
        if isinstance(doc, dict) and isinstance(usage, dict) and billing.settlement is not None:
            usage.update(billing.usage_fields())
            raw = json.dumps(doc, separators=(",", ":")).encode()
        headers = [(k, v) for k, v in upstream.headers if k in _PASS_RESPONSE_HEADERS]
        headers.extend(billing.cost_headers())
        headers.extend(await self.payments.after_success(billing.payer, billing.settlement))
        return Response(upstream.status, headers, raw, chunked=True)

