"""`GET /openapi.json` (OpenAPI 3.1), `GET /docs` and `GET /redoc`: the API described from the
router's own table.

The document is built from the live route list: every (method, pattern) the router serves
appears, each described by an entry of `OPERATIONS` (summary, tag, auth, request and response
schemas, parameters). Aliases — routstr-core's un-prefixed paths (``/chat/completions``),
``/v1/wallet/*`` for ``/v1/balance/*``, ``/lightning/*`` for ``/v1/balance/lightning/*`` — share
the entry of their canonical path and say so. A route without an entry is still listed (with
``x-undocumented: true``), and `tests/test_openapi.py` fails until it is described, so the
document cannot drift from the router.

`/docs` and `/redoc` are rendered here, server-side, from that same document: self-contained
HTML with inline CSS (and, on `/docs`, a few lines of inline JS for "try it"), no CDN and no
external fetch, so they work offline and over Tor. `/docs` is the interactive explorer;
`/redoc` the reading view with every schema expanded.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import __version__
from .messages import Request, Response, json_response
from .router import Route

# ---- schemas --------------------------------------------------------------------------------
_INT = {"type": "integer"}
_MSATS = {"type": "integer", "minimum": 0, "description": "millisatoshis"}
_STR = {"type": "string"}
_OBJ: dict[str, Any] = {"type": "object"}
_TOKENS = {"type": "integer", "minimum": 0, "maximum": 1_000_000}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(props: dict[str, Any], required: Iterable[str] = (), extra: bool = True,
            description: str = "") -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        doc["required"] = list(required)
    if not extra:
        doc["additionalProperties"] = False
    if description:
        doc["description"] = description
    return doc


def _list_of(item: dict[str, Any]) -> dict[str, Any]:
    return _object({
        "object": {"type": "string", "const": "list"}, "data": {"type": "array", "items": item},
        "has_more": {"type": "boolean"}, "total": {"type": "integer", "minimum": 0},
        "limit": {"type": "integer", "minimum": 0}, "offset": {"type": "integer", "minimum": 0},
    }, ["data", "has_more", "total", "limit", "offset"])


_MESSAGE = _object({"role": {"type": "string", "enum": ["system", "user", "assistant", "tool",
                                                        "developer"]},
                    "content": {"type": ["string", "null"]}}, ["role", "content"])
_STREAM = {"type": "boolean", "description": "answer with server-sent events"}

SCHEMAS: dict[str, Any] = {
    "Error": _object({
        "error": _object({"type": _STR, "message": _STR, "code": _STR, "details": _OBJ},
                         ["type", "message", "code", "details"]),
        "request_id": _STR,
    }, ["error"], description="Every error has this shape; `code` is stable."),
    "ChatCompletionRequest": _object({
        "model": _STR, "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
        "max_tokens": _TOKENS, "max_completion_tokens": _TOKENS,
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "n": {"type": "integer", "minimum": 1, "maximum": 8}, "stream": _STREAM,
        "stream_options": _object({"include_usage": {"type": "boolean"}}),
        "tools": {"type": "array", "items": _OBJ},
    }, ["model", "messages"]),
    "CompletionRequest": _object({"model": _STR, "prompt": _STR, "max_tokens": _TOKENS,
                                  "stream": _STREAM}, ["model", "prompt"]),
    "EmbeddingRequest": _object({
        "model": _STR,
        "input": {"oneOf": [_STR, {"type": "array", "items": _STR}]},
        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
    }, ["model", "input"]),
    "ImageGenerationRequest": _object({
        "model": _STR, "prompt": _STR, "n": {"type": "integer", "minimum": 1, "maximum": 10},
        "size": _STR}, ["model", "prompt"]),
    "TranscriptionRequest": _object({
        "file": {"type": "string", "contentMediaType": "application/octet-stream"},
        "model": _STR, "response_format": {"type": "string", "enum": ["json", "text"]},
    }, ["file", "model"]),
    "ResponsesRequest": _object({"model": _STR, "input": {"oneOf": [_STR, {
        "type": "array", "items": _OBJ}]}, "max_output_tokens": _TOKENS, "stream": _STREAM},
        ["model", "input"]),
    "ModerationRequest": _object({"model": _STR, "input": {"oneOf": [_STR, {
        "type": "array", "items": _STR}]}}, ["input"]),
    "MessagesRequest": _object({"model": _STR, "max_tokens": _TOKENS, "messages": {
        "type": "array", "items": _OBJ}, "system": {"oneOf": [_STR, {"type": "array",
                                                                     "items": _OBJ}]},
        "stream": _STREAM}, ["model", "max_tokens", "messages"],
        description="Anthropic's Messages API, passed to the upstream as sent; the key may "
                    "also come in `x-api-key`."),
    "CountTokensRequest": _object({"model": _STR, "messages": {"type": "array", "items": _OBJ}},
                                  ["model", "messages"]),
    "UpstreamObject": _object({}, description=(
        "The upstream's OpenAI-shaped answer, passed through; `usage` gains `cost` "
        "(msats), `cost_sats` and `remaining_balance_msats`.")),
    "Model": _object({"id": _STR, "name": _STR, "pricing": _OBJ}, ["id"]),
    "ModelList": _list_of(_ref("Model")),
    "Balance": _object({
        "api_key": _STR, "balance": _MSATS, "reserved": _MSATS, "total_spent": _MSATS,
        "total_requests": _INT, "balance_limit": {"type": ["integer", "null"]},
        "balance_limit_reset": {"type": ["string", "null"]},
        "validity_date": {"type": ["integer", "null"]}, "is_child": {"type": "boolean"},
        "unit": {"type": "string", "const": "msat"},
        "refundable_msats": _MSATS, "sub_sat_msats": _MSATS, "sub_sat_note": _STR,
    }, ["api_key", "balance", "reserved"]),
    "Transaction": _object({"id": _INT, "created_at": _INT, "type": _STR,
                            "amount_msats": _MSATS, "request_id": {"type": ["string", "null"]},
                            "memo": _STR}, ["id", "created_at", "type", "amount_msats"]),
    "TransactionList": _list_of(_ref("Transaction")),
    "CreateKeyRequest": _object({"initial_balance_token": _STR, "balance_limit": _MSATS,
                                 "balance_limit_reset": {"type": "string",
                                                         "enum": ["daily", "weekly", "monthly"]},
                                 "validity_date": {"type": "integer", "minimum": 0}}),
    "CreatedKey": _object({"api_key": _STR, "balance": _MSATS}, ["api_key", "balance"]),
    "TopupRequest": _object({"cashu_token": _STR}, ["cashu_token"]),
    "Topup": _object({"msats": _MSATS, "amount_added": _MSATS, "balance": _MSATS}),
    "Refund": _object({"token": _STR, "recipient": _STR, "msats": _MSATS, "sats": _STR,
                       "remaining_msats": _MSATS, "remaining_reason": _STR}),
    "ChildKeyRequest": _object({"count": {"type": "integer", "minimum": 1, "maximum": 50},
                                "balance_limit": _MSATS,
                                "balance_limit_reset": {"type": "string",
                                                        "enum": ["daily", "weekly", "monthly"]},
                                "validity_date": {"type": "integer", "minimum": 0}}),
    "ChildKeys": _object({"api_keys": {"type": "array", "items": _STR}, "count": _INT,
                          "cost_msats": _MSATS, "parent_balance": _MSATS}),
    "ChildKeyResetRequest": _object({"child_key": _STR}, ["child_key"]),
    "InvoiceRequest": _object({"amount_sats": {"type": "integer", "minimum": 1},
                               "purpose": {"type": "string", "enum": ["create", "topup"]},
                               "api_key": _STR}, ["amount_sats"]),
    "RecoverInvoiceRequest": _object({"bolt11": _STR, "invoice_id": _STR}, ["bolt11"]),
    "Invoice": _object({"invoice_id": _STR, "bolt11": _STR, "amount_sats": _INT,
                        "status": _STR}),
    "AdminCreateKeyRequest": _object({
        "balance_msats": {"type": "integer", "minimum": 0, "maximum": 10**15},
        "balance_limit_msats": {"type": ["integer", "null"], "minimum": 0},
        "balance_limit_reset": {"type": ["string", "null"],
                                "enum": ["daily", "weekly", "monthly", None]},
        "validity_date": {"type": ["integer", "null"], "minimum": 0}}),
    "AdminObject": _object({}, description="An admin API document (see routstr/admin.py)."),
    "AdminPage": _object({"data": {"type": "array", "items": _OBJ}, "total": _INT,
                          "limit": _INT, "offset": _INT}, ["data"]),
    "AdminUpdateKeyRequest": _object({
        "disabled": {"type": "boolean"}, "balance_limit_msats": {"type": ["integer", "null"],
                                                                  "minimum": 0},
        "balance_limit_reset": {"type": ["string", "null"],
                                "enum": ["daily", "weekly", "monthly", None]},
        "validity_date": {"type": ["integer", "null"], "minimum": 0}}),
    "AdminGrantRequest": _object({"amount_msats": {"type": "integer", "minimum": 1}},
                                 ["amount_msats"]),
    "AdminWithdrawRequest": _object({"amount_sats": {"type": "integer", "minimum": 1},
                                     "mint": _STR}, ["amount_sats"]),
    "AdminPayoutRequest": _object({"amount_sats": {"type": "integer", "minimum": 1},
                                   "lightning_address": _STR},
                                  ["amount_sats", "lightning_address"]),
    "AdminLoginRequest": _object({"token": _STR}, ["token"]),
    "AdminCreatedKey": _object({"api_key": _STR, "balance_msats": _MSATS},
                               ["api_key", "balance_msats"]),
    "Health": _object({
        "status": {"type": "string", "enum": ["healthy", "degraded", "unhealthy"]},
        "version": _STR, "timestamp": _STR,
        "checks": _object({"database": _STR, "upstream": _STR, "mint": _STR},
                          ["database", "upstream", "mint"]),
        "reasons": {"type": "array", "items": _STR},
    }, ["status", "version", "timestamp", "checks"]),
    "Info": _object({"name": _STR, "description": _STR, "version": _STR, "npub": _STR,
                     "mints": {"type": "array", "items": _STR}, "http_url": _STR,
                     "onion_url": _STR, "models": {"type": "array", "items": _STR},
                     "cashu_p2pk_pubkey": {
                         "type": ["string", "null"],
                         "description": "NUT-11: lock a token to this key (P2PK, SIG_INPUTS or"
                                        " SIG_ALL) and only this node can redeem it; null"
                                        " without mints"},
                     "btc_usd": _object({
                         "usd_per_btc": {"type": ["string", "null"],
                                         "description": "USD per BTC that USD-priced models"
                                                        " are billed at (a decimal); null:"
                                                        " none known yet"},
                         "age_s": {"type": ["integer", "null"]},
                         "sources": {"type": "array", "items": _STR},
                         "pinned": {"type": "boolean"}})}),
    "Root": _object({"name": _STR, "version": _STR, "status": _STR, "endpoints": _OBJ}),
    "Providers": _object({"providers": {"type": "array", "items": _object({
        "id": _STR, "pubkey": _STR, "created_at": _INT, "kind": _INT, "endpoint_url": _STR,
        "endpoint_urls": {"type": "array", "items": _STR}, "name": _STR,
        "description": {"type": ["string", "null"]},
        "mint_urls": {"type": "array", "items": _STR}, "version": {"type": ["string", "null"]},
        "content": _STR,
    }, description="with include_json=true: {provider: <this>, health: {status_code, "
       "endpoint, json}}")}}, ["providers"]),
    "BatchRequest": _object({"requests": {"type": "array", "minItems": 1, "maxItems": 50,
                                          "items": _ref("BatchItem")}}, ["requests"]),
    "BatchItem": _object({"method": {"type": "string", "enum": ["GET", "POST", "DELETE"]},
                          "endpoint": {"type": "string", "pattern": "^/[A-Za-z0-9/_.?=&,-]*$",
                                       "examples": ["/chat/completions"]},
                          "body": _OBJ}, ["endpoint"]),
    "BatchResponse": _object({
        "object": {"type": "string", "const": "batch"},
        "data": {"type": "array", "items": _object({
            "index": _INT, "status": _INT, "headers": _OBJ, "body": {}},
            ["index", "status", "headers", "body"])},
        "total_cost_msats": _MSATS}, ["object", "data", "total_cost_msats"]),
    "WebhookRequest": _object({
        "url": {"type": "string", "format": "uri", "maxLength": 2048},
        "events": {"type": "array", "minItems": 1,
                   "items": {"type": "string", "enum": ["balance.low", "key.expired"]}},
        "secret": {"type": "string", "minLength": 16, "maxLength": 256},
        "balance_threshold_msats": _MSATS}, ["url", "events"]),
    "Webhook": _object({"id": _STR, "object": {"type": "string", "const": "webhook"},
                        "url": _STR, "events": {"type": "array", "items": _STR},
                        "secret": _STR, "balance_threshold_msats": {"type": ["integer", "null"]},
                        "created_at": _INT}, ["id", "url", "events", "secret"]),
    "WebhookList": _list_of(_ref("Webhook")),
    "WebhookEvent": _object({"id": _STR, "type": {"type": "string",
                                                  "enum": ["balance.low", "key.expired"]},
                             "created": _INT, "data": _OBJ}, ["id", "type", "created", "data"],
                            description="Body POSTed to a webhook URL, signed with "
                                        "`X-Webhook-Signature: sha256=<HMAC-SHA256 hex>`."),
}

# ---- operations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    summary: str
    tag: str
    auth: str = "key"  # "key" (sk- key or Cashu token) | "pay" (key or X-Cashu) | "admin" | "none"
    body: str | None = None  # schema name of a JSON body ("multipart:Name" for form data)
    response: str | None = "UpstreamObject"  # schema name of the success body
    status: int = 200
    description: str = ""
    query: tuple[tuple[str, str, str], ...] = ()  # (name, JSON type, description)
    listing: bool = False  # ?fields / limit / offset; answer carries has_more and total
    streams: bool = False
    content_type: str = "application/json"


_PROXY_DOC = ("Forwarded to the upstream after the worst-case cost is reserved; settled from the "
              "upstream's reported usage. Cost headers: `X-Routstr-Cost*`, `X-Routstr-Balance*`.")
_LIST_Q = (("limit", "integer", "page size"), ("offset", "integer", "items to skip"),
           ("fields", "string", "comma-separated fields to keep in each item"))

OPERATIONS: dict[tuple[str, str], Op] = {
    ("GET", "/health"): Op("Health: database writable, upstream and mints reachable", "Status",
                           "none", response="Health",
                           description="503 when a configured dependency fails; 200 "
                                       "`degraded` with `reasons` when it serves but something "
                                       "needs the operator (no upstream, no mint, a stale "
                                       "BTC/USD rate, relays without a public URL)."),
    ("GET", "/v1/info"): Op("Node information", "Status", "none", response="Info"),
    ("GET", "/"): Op("Node summary and links", "Status", "none", response="Root"),
    ("GET", "/v1/providers"): Op(
        "Routstr nodes discovered on Nostr (kind 38421)", "Status", "none",
        response="Providers",
        description="404 unless --providers-refresh > 0. Newest announcement per node, one per "
                    "endpoint, at most 42.",
        query=(("include_json", "boolean", "add each node's /v1/info probe result"),
               ("pubkey", "string", "only this node (hex or npub)"))),
    ("GET", "/v1/models"): Op("Models and their prices", "Models", "none", response="ModelList",
                              listing=True),
    ("GET", "/v1/transactions"): Op("The key's transaction history", "Balance",
                                    response="TransactionList", listing=True),
    ("GET", "/v1/balance"): Op("The key's balance", "Balance", response="Balance"),
    ("GET", "/v1/balance/info"): Op("The key's balance", "Balance", response="Balance"),
    ("GET", "/v1/balance/create"): Op(
        "Create a key from a Cashu token (query parameters)", "Balance", "none",
        response="CreatedKey",
        query=(("initial_balance_token", "string", "the Cashu token to redeem"),
               ("balance_limit", "integer", "msats per period"),
               ("balance_limit_reset", "string", "daily, weekly or monthly"),
               ("validity_date", "integer", "unix time the key expires"))),
    ("POST", "/v1/balance/create"): Op("Create a key from a Cashu token", "Balance", "none",
                                       body="CreateKeyRequest", response="CreatedKey"),
    ("POST", "/v1/balance/topup"): Op("Top up the key with a Cashu token", "Balance",
                                      body="TopupRequest", response="Topup"),
    ("POST", "/v1/balance/refund"): Op("Refund the key's balance as a Cashu token", "Balance",
                                       "pay", response="Refund"),
    ("POST", "/v1/balance/child-key"): Op("Create child keys spending this key's balance",
                                          "Balance", body="ChildKeyRequest",
                                          response="ChildKeys"),
    ("POST", "/v1/balance/child-key/reset"): Op("Reset a child key's spending", "Balance",
                                                body="ChildKeyResetRequest", response=None),
    ("POST", "/v1/balance/lightning/invoice"): Op("Lightning invoice to create or top up a key",
                                                  "Lightning", "none", body="InvoiceRequest",
                                                  response="Invoice"),
    ("GET", "/v1/balance/lightning/invoice/{invoice_id}"): Op("Invoice status", "Lightning",
                                                              "none", response="Invoice"),
    ("GET", "/v1/balance/lightning/invoice/{invoice_id}/status"): Op(
        "Invoice status", "Lightning", "none", response="Invoice"),
    ("POST", "/v1/balance/lightning/recover"): Op("Find an invoice by its bolt11", "Lightning",
                                                  "none", body="RecoverInvoiceRequest",
                                                  response="Invoice"),
    ("POST", "/admin/api/keys"): Op("Create a prepaid key", "Admin", "admin",
                                    body="AdminCreateKeyRequest", response="AdminCreatedKey",
                                    status=201),
    ("GET", "/admin/api/keys"): Op("Search keys", "Admin", "admin", response="AdminPage",
                                   query=(("search", "string", "hint or key id"),
                                          ("kind", "string", "api, token, xcashu or child"),
                                          ("limit", "integer", "page size"),
                                          ("offset", "integer", "items to skip"))),
    ("GET", "/admin/api/keys/{id}"): Op("One key", "Admin", "admin", response="AdminObject"),
    ("PATCH", "/admin/api/keys/{id}"): Op("Change a key's policy (disabled, limits, expiry)",
                                          "Admin", "admin", body="AdminUpdateKeyRequest",
                                          response="AdminObject"),
    ("DELETE", "/admin/api/keys/{id}"): Op("Delete a key", "Admin", "admin",
                                           response="AdminObject"),
    ("POST", "/admin/api/keys/{id}/grant"): Op("Grant msats to a key", "Admin", "admin",
                                               body="AdminGrantRequest", response="AdminObject"),
    ("GET", "/admin/api/overview"): Op("Totals, earnings and health", "Admin", "admin",
                                       response="AdminObject"),
    ("GET", "/admin/api/transactions"): Op(
        "Transactions of all keys", "Admin", "admin", response="AdminPage",
        query=(("key", "string", "key search"), ("key_id", "integer", "one key"),
               ("kind", "string", "transaction kinds, comma-separated"),
               ("since", "string", "unix time or ISO date"),
               ("until", "string", "unix time or ISO date"),
               ("limit", "integer", "page size"), ("offset", "integer", "items to skip"))),
    ("GET", "/admin/api/prices"): Op("Prices and overrides", "Admin", "admin",
                                     response="AdminObject"),
    ("PUT", "/admin/api/prices/{model}"): Op("Override a model's prices", "Admin", "admin",
                                             body="AdminObject", response="AdminObject"),
    ("DELETE", "/admin/api/prices/{model}"): Op("Remove a price override", "Admin", "admin",
                                                response="AdminObject"),
    ("GET", "/admin/api/health"): Op("Health detail", "Admin", "admin", response="AdminObject"),
    ("GET", "/admin/api/settings"): Op("Settings (secrets masked)", "Admin", "admin",
                                       response="AdminObject"),
    ("GET", "/admin/api/wallet"): Op("The node's ecash per mint", "Admin", "admin",
                                     response="AdminObject"),
    ("POST", "/admin/api/wallet/withdraw"): Op("Withdraw ecash as a Cashu token", "Admin",
                                               "admin", body="AdminWithdrawRequest",
                                               response="AdminObject"),
    ("POST", "/admin/api/wallet/payout"): Op("Pay earnings to a Lightning address", "Admin",
                                             "admin", body="AdminPayoutRequest",
                                             response="AdminObject"),
    ("POST", "/admin/withdraw"): Op("Withdraw ecash (routstr-core's form: amount, mint_url,"
                                    " unit)", "Admin", "admin", body="AdminObject",
                                    response="AdminObject"),
    ("GET", "/admin"): Op("Admin dashboard (HTML; session or admin token)", "Admin", "admin",
                          response=None, content_type="text/html"),
    ("POST", "/admin/login"): Op("Log in to the dashboard (form field or JSON `token`)",
                                 "Admin", "none", body="AdminLoginRequest", response=None,
                                 content_type="text/html"),
    ("POST", "/admin/logout"): Op("Log out of the dashboard", "Admin", "admin", response=None,
                                  content_type="text/html"),
    ("POST", "/admin/keys"): Op("Dashboard form: create a key", "Admin", "admin",
                                body="form:AdminObject", response=None,
                                content_type="text/html", status=303),
    ("POST", "/admin/keys/{id}"): Op("Dashboard form: act on a key", "Admin", "admin",
                                     body="form:AdminObject", response=None,
                                     content_type="text/html", status=303),
    ("POST", "/admin/prices"): Op("Dashboard form: set or reset a price", "Admin", "admin",
                                  body="form:AdminObject", response=None,
                                  content_type="text/html", status=303),
    ("POST", "/admin/wallet/withdraw"): Op("Dashboard form: withdraw ecash", "Admin", "admin",
                                           body="form:AdminObject", response=None,
                                           content_type="text/html", status=303),
    ("POST", "/admin/wallet/payout"): Op("Dashboard form: pay out earnings", "Admin", "admin",
                                         body="form:AdminObject", response=None,
                                         content_type="text/html", status=303),
    ("POST", "/v1/chat/completions"): Op("Chat completion (OpenAI-compatible)", "Inference",
                                         "pay", body="ChatCompletionRequest", streams=True,
                                         description=_PROXY_DOC),
    ("POST", "/v1/completions"): Op("Text completion (OpenAI-compatible)", "Inference", "pay",
                                    body="CompletionRequest", streams=True,
                                    description=_PROXY_DOC),
    ("POST", "/v1/embeddings"): Op("Embeddings (OpenAI-compatible)", "Inference", "pay",
                                   body="EmbeddingRequest", description=_PROXY_DOC),
    ("POST", "/v1/images/generations"): Op("Image generation (OpenAI-compatible)", "Inference",
                                           "pay", body="ImageGenerationRequest",
                                           description=_PROXY_DOC),
    ("POST", "/v1/audio/transcriptions"): Op("Audio transcription (OpenAI-compatible)",
                                             "Inference", "pay",
                                             body="multipart:TranscriptionRequest",
                                             description=_PROXY_DOC),
    ("POST", "/v1/responses"): Op("Responses API (OpenAI-compatible)", "Inference", "pay",
                                  body="ResponsesRequest", streams=True, description=_PROXY_DOC),
    ("POST", "/v1/moderations"): Op("Moderation (OpenAI-compatible, free)", "Inference", "pay",
                                    body="ModerationRequest", description=_PROXY_DOC),
    ("POST", "/v1/messages"): Op("Messages (Anthropic-compatible)", "Inference", "pay",
                                 body="MessagesRequest", streams=True, description=_PROXY_DOC),
    ("POST", "/v1/messages/count_tokens"): Op("Count tokens (Anthropic-compatible, free)",
                                              "Inference", "pay", body="CountTokensRequest",
                                              description=_PROXY_DOC),
    ("POST", "/v1/batch"): Op("Several calls in one request", "Platform", body="BatchRequest",
                              response="BatchResponse",
                              description="Each item is dispatched through the same handlers "
                                          "and billed like the single call; results in order."),
    ("POST", "/v1/webhooks"): Op("Register a webhook", "Platform", body="WebhookRequest",
                                 response="Webhook", status=201,
                                 description="Events are POSTed with `X-Webhook-Signature: "
                                             "sha256=<HMAC-SHA256 of the raw body>`; body: "
                                             "`WebhookEvent`."),
    ("GET", "/v1/webhooks"): Op("The key's webhooks", "Platform", response="WebhookList",
                                listing=True),
    ("DELETE", "/v1/webhooks/{webhook_id}"): Op("Delete a webhook", "Platform", response=None,
                                                status=204),
    ("GET", "/openapi.json"): Op("This document (OpenAPI 3.1)", "Platform", "none",
                                 response=None),
    ("GET", "/docs"): Op("Interactive API documentation (HTML)", "Platform", "none",
                         response=None, content_type="text/html"),
    ("GET", "/redoc"): Op("API reference (HTML)", "Platform", "none", response=None,
                          content_type="text/html"),
    ("GET", "/metrics"): Op("Prometheus metrics (admin token)", "Platform", "admin",
                            response=None, content_type="text/plain"),
}

# Alias prefixes: (alias, canonical). The un-prefixed forms are routstr-core's.
ALIASES = (("/v1/wallet", "/v1/balance"), ("/lightning", "/v1/balance/lightning"))


def canonical(method: str, pattern: str) -> tuple[str, str] | None:
    """The `OPERATIONS` key describing (method, pattern), or None when there is none."""
    if (method, pattern) in OPERATIONS:
        return method, pattern
    for alias, target in ALIASES:
        if pattern == alias or pattern.startswith(alias + "/"):
            key = (method, target + pattern[len(alias):])
            if key in OPERATIONS:
                return key
    if not pattern.startswith("/v1/") and (method, "/v1" + pattern) in OPERATIONS:
        return method, "/v1" + pattern
    return None


# ---- the document ---------------------------------------------------------------------------
_VERSION_PARAM = {"name": "X-Routstr-Version", "in": "header", "required": False,
                  "description": "API version; an unsupported one answers 400.",
                  "schema": {"type": "string", "enum": ["v1"]}}
_IDEMPOTENCY_PARAM = {"name": "Idempotency-Key", "in": "header", "required": False,
                      "description": "Repeat a POST safely: the first answer is replayed for "
                                     "24 h and the request is charged once.",
                      "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                                 "pattern": "^[!-~]+$"}}
_MAX_COST_PARAM = {"name": "X-Max-Cost", "in": "header", "required": False,
                   "description": "Refuse (402) when the worst-case cost exceeds this many sats.",
                   "schema": {"type": "string", "pattern": "^[0-9]{1,9}(\\.[0-9]{1,3})?$"}}
_RATE_HEADERS = {
    "X-RateLimit-Limit": {"description": "requests per minute allowed for the key",
                          "schema": {"type": "integer"}},
    "X-RateLimit-Remaining": {"description": "requests left now", "schema": {"type": "integer"}},
    "X-RateLimit-Reset": {"description": "epoch second at which the allowance is full again",
                          "schema": {"type": "integer"}},
}
_SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "key": [{"apiKey": []}],
    "pay": [{"apiKey": []}, {"cashuToken": []}],
    "admin": [{"adminToken": []}],
    "none": [],
}


def _operation_id(method: str, pattern: str) -> str:
    words = [p.strip("{}") for p in pattern.replace("-", "_").replace(".", "_").split("/") if p]
    return method.lower() + "_" + ("_".join(words) or "root")


def _path_params(pattern: str) -> list[dict[str, Any]]:
    return [{"name": seg[1:-1], "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$"}}
            for seg in pattern.split("/") if seg.startswith("{")]


def _operation(method: str, pattern: str, op: Op | None, alias_of: str | None) -> dict[str, Any]:
    if op is None:
        return {"summary": f"{method} {pattern}", "tags": ["Undocumented"],
                "operationId": _operation_id(method, pattern), "x-undocumented": True,
                "parameters": _path_params(pattern),
                "responses": {"default": {"description": "see the source",
                                          "content": {"application/json": {
                                              "schema": _ref("Error")}}}}}
    params = _path_params(pattern)
    params += [{"name": name, "in": "query", "required": False, "description": text,
                "schema": {"type": kind, **({"minimum": 0} if kind == "integer" else {})}}
               for name, kind, text in (op.query + (_LIST_Q if op.listing else ()))]
    params.append(_VERSION_PARAM)
    if method == "POST":
        params.append(_IDEMPOTENCY_PARAM)
    if op.auth == "pay":
        params.append(_MAX_COST_PARAM)
    description = op.description
    if alias_of:
        description = (f"Alias of `{method} {alias_of}`. " + description).strip()
    doc: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                           "operationId": _operation_id(method, pattern),
                           "security": _SECURITY[op.auth], "parameters": params}
    if description:
        doc["description"] = description
    if op.body is not None:
        if op.body.startswith("multipart:"):
            content = {"multipart/form-data": {"schema": _ref(op.body.split(":", 1)[1])}}
        elif op.body.startswith("form:"):
            content = {"application/x-www-form-urlencoded": {
                "schema": _ref(op.body.split(":", 1)[1])}}
        else:
            content = {"application/json": {"schema": _ref(op.body)}}
        doc["requestBody"] = {"required": True, "content": content}
    ok: dict[str, Any] = {"description": "success"}
    if op.status == 303:
        ok = {"description": "See Other: the dashboard page, showing the outcome",
              "headers": {"Location": {"schema": {"type": "string"}}}}
    elif op.status != 204:
        if op.response is not None:
            media: dict[str, Any] = {"application/json": {"schema": _ref(op.response)}}
            if op.streams:
                media["text/event-stream"] = {"schema": {"type": "string"}}
            ok["content"] = media
        else:
            ok["content"] = {op.content_type: {"schema": {} if op.content_type.endswith(
                "json") else {"type": "string"}}}
    if op.auth in ("key", "pay"):
        ok["headers"] = _RATE_HEADERS
    error = {"content": {"application/json": {"schema": _ref("Error")}}}
    responses: dict[str, Any] = {str(op.status): ok,
                                 "4XX": {"description": "client error", **error},
                                 "5XX": {"description": "server or upstream error", **error}}
    doc["responses"] = responses
    return doc


def build_document(routes: Iterable[Route], *, title: str = "Routstr node") -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        key = canonical(route.method, route.pattern)
        op = OPERATIONS.get(key) if key else None
        alias_of = key[1] if key and key[1] != route.pattern else None
        paths.setdefault(route.pattern, {})[route.method.lower()] = _operation(
            route.method, route.pattern, op, alias_of)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": __version__,
                 "description": "An OpenAI-compatible gateway paid with Cashu ecash. Amounts are "
                                "integer msats unless named `*_sats`."},
        "servers": [{"url": "/"}],
        "tags": [{"name": t} for t in ("Inference", "Models", "Balance", "Lightning",
                                       "Platform", "Status", "Admin", "Undocumented")],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "`sk-…` key, or a Cashu token used as the key"},
                "cashuToken": {"type": "apiKey", "in": "header", "name": "X-Cashu",
                               "description": "pay this one request with a Cashu token"},
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "the node's admin token"},
            },
        },
    }


# ---- HTML -----------------------------------------------------------------------------------
_CSS = """
body{margin:0;font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:2px 0 0;color:#c8cede;font-size:13px}
.wrap{display:flex;align-items:flex-start}
nav{position:sticky;top:0;width:270px;max-height:100vh;overflow:auto;padding:12px;
border-right:1px solid #e3e6ee;box-sizing:border-box;font-size:13px}
nav h3{margin:14px 0 4px;font-size:12px;text-transform:uppercase;color:#6b7385}
nav a{display:block;color:#1d2330;text-decoration:none;padding:2px 4px;border-radius:4px;
white-space:nowrap;overflow:hidden;text-overflow:ellipsis}nav a:hover{background:#eef1f7}
main{flex:1;padding:8px 28px 40px;min-width:0}
section.op{border:1px solid #e3e6ee;border-radius:8px;margin:16px 0;padding:12px 16px}
.m{display:inline-block;min-width:58px;text-align:center;border-radius:4px;color:#fff;
font:bold 12px monospace;padding:2px 6px;margin-right:8px}
.GET{background:#2f7bd8}.POST{background:#2f9e5c}.DELETE{background:#d0473a}
.PUT,.PATCH{background:#c98a12}code,pre{font-family:ui-monospace,Menlo,Consolas,monospace}
.path{font:15px ui-monospace,Menlo,monospace;font-weight:600}
pre{background:#f6f8fb;border:1px solid #e3e6ee;border-radius:6px;padding:8px;overflow:auto;
font-size:12px;max-height:360px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border-bottom:1px solid #eef0f4;padding:3px 10px 3px 0;text-align:left;vertical-align:top}
.muted{color:#6b7385;font-size:13px}.badge{background:#eef1f7;border-radius:4px;padding:0 6px;
font-size:12px}details summary{cursor:pointer;color:#2f5fb3}
textarea,input{font:12px ui-monospace,Menlo,monospace;width:100%;box-sizing:border-box}
button{margin-top:6px;padding:4px 12px}
"""

_TRY_JS = """
function tryIt(id, method, path){
  var f=document.getElementById(id), out=f.querySelector('pre.out');
  var p=path.replace(/\\{([^}]+)\\}/g,function(_,n){var i=f.querySelector('[name="p_'+n+'"]');
    return encodeURIComponent(i?i.value:'');});
  var q=f.querySelector('[name=query]').value; if(q){p+=(q[0]=='?'?'':'?')+q;}
  var h={'X-Routstr-Version':'v1'}, k=document.getElementById('key').value;
  if(k){h['Authorization']='Bearer '+k;}
  var b=f.querySelector('[name=body]'), o={method:method,headers:h};
  if(b&&b.value.trim()){o.body=b.value;h['Content-Type']='application/json';}
  out.textContent='…';
  fetch(p,o).then(function(r){return r.text().then(function(t){
    try{t=JSON.stringify(JSON.parse(t),null,2);}catch(e){}
    out.textContent=r.status+' '+r.statusText+'\\n\\n'+t;});})
   .catch(function(e){out.textContent=String(e);});
  return false;
}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _resolve(doc: dict[str, Any], schema: Any) -> Any:
    if isinstance(schema, dict) and "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return doc["components"]["schemas"].get(name, {})
    return schema


def _example(doc: dict[str, Any], schema: Any, depth: int = 0) -> Any:
    """A small example value for a schema (for the "try it" body)."""
    schema = _resolve(doc, schema)
    if not isinstance(schema, dict) or depth > 4:
        return None
    if "examples" in schema:
        return schema["examples"][0]
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    if "oneOf" in schema:
        return _example(doc, schema["oneOf"][0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = kind[0]
    if kind == "object":
        props = schema.get("properties", {})
        keep = schema.get("required") or list(props)[:2]
        return {k: _example(doc, props[k], depth + 1) for k in keep if k in props}
    if kind == "array":
        return [_example(doc, schema.get("items", {}), depth + 1)]
    return {"string": "string", "integer": schema.get("minimum", 0), "number": 0,
            "boolean": False}.get(str(kind))


def _schema_html(doc: dict[str, Any], schema: Any) -> str:
    return f"<pre>{_e(json.dumps(_resolve(doc, schema), indent=2))}</pre>"


def render_html(doc: dict[str, Any], *, interactive: bool) -> str:
    """`/docs` (interactive) or `/redoc` (reading view with every schema), from `doc`."""
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            by_tag.setdefault(op["tags"][0], []).append((method.upper(), path, op))
    order = [t["name"] for t in doc.get("tags", [])]
    tags = sorted(by_tag, key=lambda t: order.index(t) if t in order else len(order))
    nav: list[str] = []
    body: list[str] = []
    for tag in tags:
        nav.append(f"<h3>{_e(tag)}</h3>")
        body.append(f'<h2 id="tag-{_e(tag)}">{_e(tag)}</h2>')
        # Canonical paths first, aliases (routstr-core's spellings) after them.
        entries = sorted(by_tag[tag], key=lambda e: (
            str(e[2].get("description", "")).startswith("Alias of"), e[1], e[0]))
        for method, path, op in entries:
            anchor = op["operationId"]
            nav.append(f'<a href="#{_e(anchor)}"><span class="m {method}">{method}</span>'
                       f"{_e(path)}</a>")
            body.append(_op_html(doc, method, path, op, anchor, interactive))
    if not interactive:
        nav.append('<h3>Schemas</h3>')
        body.append('<h2 id="schemas">Schemas</h2>')
        for name, schema in doc["components"]["schemas"].items():
            nav.append(f'<a href="#schema-{_e(name)}">{_e(name)}</a>')
            body.append(f'<section class="op" id="schema-{_e(name)}"><h3>{_e(name)}</h3>'
                        f"{_schema_html(doc, schema)}</section>")
    info = doc["info"]
    title = f"{info['title']} API {info['version']}"
    key_box = ('<p><label class="muted">API key for "try it" (sent as Bearer; stays in this '
               'page): <input id="key" autocomplete="off" placeholder="sk-…"></label></p>'
               if interactive else "")
    script = f"<script>{_TRY_JS}</script>" if interactive else ""
    other = ('<a style="color:#c8cede" href="/redoc">reference view</a>' if interactive
             else '<a style="color:#c8cede" href="/docs">interactive view</a>')
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p>{_e(info.get('description', ''))} · "
        f'<a style="color:#c8cede" href="/openapi.json">openapi.json</a> · {other}</p></header>'
        f'<div class="wrap"><nav>{"".join(nav)}</nav><main>{key_box}{"".join(body)}</main></div>'
        f"{script}</body></html>"
    )


def _op_html(doc: dict[str, Any], method: str, path: str, op: dict[str, Any], anchor: str,
             interactive: bool) -> str:
    parts = [f'<section class="op" id="{_e(anchor)}"><div><span class="m {method}">{method}'
             f'</span><span class="path">{_e(path)}</span></div>'
             f"<p><b>{_e(op['summary'])}</b></p>"]
    if op.get("description"):
        parts.append(f'<p class="muted">{_e(op["description"])}</p>')
    auth = [next(iter(s)) for s in op.get("security", [])]
    parts.append(f'<p class="muted">Auth: {_e(", ".join(auth) or "none")}</p>')
    params = op.get("parameters", [])
    if params:
        rows = "".join(
            f"<tr><td><code>{_e(p['name'])}</code></td><td>{_e(p['in'])}</td>"
            f"<td>{'required' if p.get('required') else ''}</td>"
            f"<td>{_e(p.get('description', ''))}</td></tr>" for p in params)
        parts.append(f"<table><tr><th>Parameter</th><th>In</th><th></th><th></th></tr>{rows}"
                     "</table>")
    request_schema = None
    if "requestBody" in op:
        media, spec = next(iter(op["requestBody"]["content"].items()))
        request_schema = spec["schema"]
        parts.append(f"<details{'' if interactive else ' open'}><summary>Request body "
                     f"<span class=\"badge\">{_e(media)}</span></summary>"
                     f"{_schema_html(doc, request_schema)}</details>")
    statuses = "".join(
        f"<tr><td><code>{_e(status)}</code></td><td>{_e(resp['description'])}</td>"
        f"<td>{_e(', '.join(resp.get('content', {})))}</td></tr>"
        for status, resp in op["responses"].items())
    parts.append(f"<table><tr><th>Status</th><th>Meaning</th><th>Type</th></tr>{statuses}"
                 "</table>")
    if not interactive:
        for status, resp in op["responses"].items():
            for spec in resp.get("content", {}).values():
                if spec.get("schema") and status.startswith("2"):
                    parts.append(f"<details><summary>Response {status}</summary>"
                                 f"{_schema_html(doc, spec['schema'])}</details>")
    if interactive:
        form_id = "try-" + anchor
        fields = "".join(
            f'<label class="muted">{_e(p["name"])} <input name="p_{_e(p["name"])}"></label>'
            for p in op.get("parameters", []) if p["in"] == "path")
        body_box = ""
        if request_schema is not None and "json" in next(iter(op["requestBody"]["content"])):
            example = json.dumps(_example(doc, request_schema), indent=2)
            body_box = f'<textarea name="body" rows="6">{_e(example)}</textarea>'
        parts.append(
            f'<details><summary>Try it</summary><form id="{_e(form_id)}" '
            f"onsubmit=\"return tryIt('{_e(form_id)}','{method}','{_e(path)}')\">{fields}"
            f'<label class="muted">query <input name="query" placeholder="limit=10"></label>'
            f'{body_box}<button type="submit">Send</button><pre class="out"></pre></form>'
            "</details>")
    parts.append("</section>")
    return "".join(parts)


# ---- handlers -------------------------------------------------------------------------------
_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; form-action 'none'; base-uri 'none'")


class ApiDocs:
    """Serves the document and the two pages; built once, on first request."""

    def __init__(self, routes: Callable[[], Iterable[Route]], title: str) -> None:
        self._routes = routes
        self._title = title
        self._doc: dict[str, Any] | None = None
        self._pages: dict[bool, bytes] = {}

    def document(self) -> dict[str, Any]:
        if self._doc is None:
            self._doc = build_document(self._routes(), title=self._title)
        return self._doc

    async def openapi(self, request: Request, params: dict[str, str]) -> Response:
        return json_response(self.document())

    def _page(self, interactive: bool) -> Response:
        page = self._pages.get(interactive)
        if page is None:
            page = self._pages[interactive] = render_html(
                self.document(), interactive=interactive).encode()
        return Response(200, [("content-type", "text/html; charset=utf-8"),
                              ("content-security-policy", _CSP),
                              ("x-content-type-options", "nosniff")], page)

    async def docs(self, request: Request, params: dict[str, str]) -> Response:
        return self._page(True)

    async def redoc(self, request: Request, params: dict[str, str]) -> Response:
        return self._page(False)
