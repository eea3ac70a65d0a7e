"""`POST /v1/batch`: several API calls in one request, answered in order.

Body ``{"requests": [{"method": "POST", "endpoint": "/chat/completions", "body": {…}}, …]}``.
Each sub-request is dispatched in-process through the node's own router (the same handlers,
so each is authenticated, reserved, forwarded, settled and billed exactly like the single
call) with the caller's ``Authorization`` (and ``X-Max-Cost``, which then caps each item).
`endpoint` is a path below ``/v1`` (``/models``, ``/chat/completions``, ``/balance``, with
an optional query string); a leading ``/v1`` is accepted too. Nested batches are refused.

Answer (200 once the batch itself is valid)::

    {"object": "batch", "data": [{"index": 0, "status": 200, "headers": {…cost headers…},
      "body": {…}}, …], "total_cost_msats": N}

An item that fails carries its own status and the usual error body; the others are not
affected. `total_cost_msats` is the sum the items were charged.

Limits: at most ``--batch-max-requests`` items and ``--batch-max-bytes`` of body; items run
``--batch-concurrency`` at a time. Every item counts as one request against the key's
requests/minute limit (and is refused with its own 429 when over); the batch as a whole
holds one concurrency slot. ``stream: true`` is refused per item (a batch answers with JSON),
and so is paying with ``X-Cashu`` (one token pays for one request; use a key).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio

from .errors import ApiError, InvalidRequest, PayloadTooLarge, render
from .messages import Request, Response, json_response
from .ratelimit import RateLimiter
from .router import Route, Router
from .wire import loads

App = Callable[[Request], Awaitable[Response]]

METHODS = ("GET", "POST", "DELETE")
MAX_ITEM_RESPONSE_BYTES = 16 * 1024 * 1024
_FORWARDED = ("authorization", "x-max-cost", "accept")
_COST_HEADERS = ("x-routstr-cost", "x-routstr-cost-msats", "x-routstr-input-cost-msats",
                 "x-routstr-output-cost-msats", "x-routstr-balance", "x-routstr-balance-msats")


@dataclass(frozen=True)
class BatchLimits:
    max_requests: int = 50
    max_bytes: int = 1024 * 1024
    concurrency: int = 4


@dataclass(frozen=True)
class _Item:
    index: int
    method: str
    target: str
    body: bytes
    error: ApiError | None = None


def _parse_item(index: int, raw: object) -> _Item:
    def bad(message: str, code: str = "invalid_batch_item") -> _Item:
        return _Item(index, "", "", b"", InvalidRequest(message, code=code))

    if not isinstance(raw, dict):
        return bad("Each batch item must be an object with 'method' and 'endpoint'")
    method = raw.get("method", "POST" if "body" in raw else "GET")
    endpoint = raw.get("endpoint")
    if not isinstance(method, str) or method.upper() not in METHODS:
        return bad(f"'method' must be one of {list(METHODS)}")
    if not isinstance(endpoint, str) or not endpoint.startswith("/") or endpoint.startswith("//"):
        return bad("'endpoint' must be a path such as '/chat/completions'")
    path = endpoint.partition("?")[0]
    if "\\" in endpoint or any(part in (".", "..") for part in path.split("/")):
        return bad("'endpoint' must be a plain path")
    target = endpoint if endpoint == "/v1" or endpoint.startswith("/v1/") else "/v1" + endpoint
    if target.partition("?")[0].rstrip("/") == "/v1/batch":
        return bad("Batches cannot be nested", code="nested_batch")
    body = raw.get("body")
    if isinstance(body, dict) and body.get("stream") is True:
        return bad("Streaming is not available inside a batch; send it as its own request",
                   code="stream_not_supported_in_batch")
    data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    return _Item(index, method.upper(), target, data)


class Batch:
    def __init__(self, table: Callable[[], Iterable[Route]], limiter: RateLimiter,
                 limits: BatchLimits, wrap: Callable[[App], App] = lambda app: app) -> None:
        self._table = table
        self._wrap = wrap
        self._app: App | None = None
        self.limiter = limiter
        self.limits = limits

    def _dispatch(self) -> App:
        if self._app is None:
            router = Router(self._table())

            async def app(request: Request) -> Response:
                handler, params = router.resolve(request.method, request.path)
                return await handler(request, params)

            self._app = self._wrap(app)
        return self._app

    async def handle(self, request: Request, params: dict[str, str]) -> Response:
        if len(request.body) > self.limits.max_bytes:
            raise PayloadTooLarge(f"A batch body may be at most {self.limits.max_bytes} bytes",
                                  code="batch_too_large",
                                  details={"max_bytes": self.limits.max_bytes})
        if (request.header("x-cashu") or "").strip():
            raise InvalidRequest("A batch is paid by an API key ('Authorization'); an X-Cashu"
                                 " token pays for one request", code="batch_requires_api_key")
        doc = request.json_object()
        raw_items = doc.get("requests")
        if not isinstance(raw_items, list) or not raw_items:
            raise InvalidRequest("'requests' must be a non-empty list", code="invalid_batch")
        if len(raw_items) > self.limits.max_requests:
            raise InvalidRequest(f"A batch may hold at most {self.limits.max_requests} requests",
                                 code="batch_too_many_requests",
                                 details={"max_requests": self.limits.max_requests})
        items = [_parse_item(i, raw) for i, raw in enumerate(raw_items)]
        results: list[dict[str, Any]] = [{} for _ in items]
        gate = anyio.CapacityLimiter(self.limits.concurrency)

        async def run(item: _Item) -> None:
            async with gate:
                results[item.index] = await self._run_item(request, item)

        async with anyio.create_task_group() as tg:
            for item in items:
                tg.start_soon(run, item)
        total = sum(int(r["headers"].get("x-routstr-cost-msats", 0)) for r in results)
        return json_response({"object": "batch", "data": results, "total_cost_msats": total})

    async def _run_item(self, parent: Request, item: _Item) -> dict[str, Any]:
        request_id = f"{parent.request_id}-{item.index}"
        try:
            if item.error is not None:
                raise item.error
            identity = self.limiter.identity(parent)
            if identity is not None and self.limiter.enabled:
                self.limiter.admit(identity, hold_slot=False)
            headers = [(k, v) for k, v in parent.headers if k in _FORWARDED]
            if item.body:
                headers.append(("content-type", "application/json"))
            sub = Request(item.method, item.target, tuple(headers), item.body, request_id,
                          parent.client)
            response = await self._dispatch()(sub)
            status, out_headers, body = response.status, response.headers, response.body
            if response.stream is not None:
                body = await _drain(response)
        except ApiError as exc:
            status, out_headers, body = render(exc, request_id)
        kept = {k.lower(): v for k, v in out_headers if k.lower() in _COST_HEADERS}
        return {"index": item.index, "status": status, "headers": kept, "body": _body(body)}


async def _drain(response: Response) -> bytes:
    stream = response.stream
    assert stream is not None
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in stream:
            size += len(chunk)
            if size > MAX_ITEM_RESPONSE_BYTES:
                break
            chunks.append(chunk)
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
    return b"".join(chunks)


def _body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return loads(raw)  # a sub-request's answer may be an upstream's: the bounded reader
    except ValueError:  # wire.JsonError
        return raw.decode("utf-8", "replace")
