"""The node's exception tree and the one function that renders any error as JSON.

Every error a client can see has the spec's shape::

    {"error": {"type": ..., "message": ..., "code": ..., "details": {...}}, "request_id": ...}

`type` is the spec's name for the HTTP status (``invalid_request``, ``authentication_failed``,
``insufficient_balance``, ...); `code` is a stable machine-readable reason — where routstr-core
already has one (``invalid_api_key``, ``cashu_token_already_spent``, ...) we use the same string so
existing clients can switch on it. Handlers raise; only `render()` turns an error into bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar


class ApiError(Exception):
    """An error with an HTTP status, the spec's `type`, and a stable `code`."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    default_code: ClassVar[str] = "internal_error"
    # The spec's own client examples test `"insufficient_balance" in str(e)` and
    # `"rate_limit" in str(e)`; current OpenAI SDKs put only `error.message` into str(e),
    # so these errors carry their type at the head of the message.
    type_in_message: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Mapping[str, Any] | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        if self.type_in_message and not message.startswith(self.type):
            message = f"{self.type}: {message}"
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details: dict[str, Any] = dict(details or {})
        self.headers: list[tuple[str, str]] = list(headers)

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "error": {
                "type": self.type,
                "message": self.message,
                "code": self.code,
                "details": self.details,
            }
        }
        if request_id:
            doc["request_id"] = request_id
        return doc


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request"
    default_code = "invalid_request"


class AuthenticationFailed(ApiError):
    status = 401
    type = "authentication_failed"
    default_code = "invalid_api_key"


class InsufficientBalance(ApiError):
    status = 402
    type = "insufficient_balance"
    default_code = "insufficient_balance"
    type_in_message = True


class Forbidden(ApiError):
    status = 403
    type = "forbidden"
    default_code = "forbidden"


class NotFound(ApiError):
    status = 404
    type = "not_found"
    default_code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = "method_not_allowed"
    default_code = "method_not_allowed"

    def __init__(self, allowed: Sequence[str]) -> None:
        allow = ", ".join(sorted(set(allowed)))
        super().__init__(
            f"Method not allowed; allowed: {allow}",
            details={"allowed": sorted(set(allowed))},
            headers=[("allow", allow)],
        )


class RequestTimeout(ApiError):
    status = 408
    type = "request_timeout"
    default_code = "request_timeout"


class Conflict(ApiError):
    status = 409
    type = "conflict"
    default_code = "conflict"


class Gone(ApiError):
    status = 410
    type = "not_found"
    default_code = "gone"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request"
    default_code = "payload_too_large"


class UnprocessableEntity(ApiError):
    status = 422
    type = "invalid_request"
    default_code = "unprocessable"


class TooEarly(ApiError):
    """Something the client asked for is still being produced (routstr-core: 425 + Retry-After)."""

    status = 425
    type = "invalid_request"
    default_code = "pending"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"
    type_in_message = True


class HeadersTooLarge(ApiError):
    status = 431
    type = "invalid_request"
    default_code = "headers_too_large"


class InternalError(ApiError):
    status = 500
    type = "internal_error"
    default_code = "internal_error"


class UpstreamError(ApiError):
    """The upstream failed (5xx, refused, timed out, broke the protocol)."""

    status = 502
    type = "upstream_error"
    default_code = "upstream_error"


class ServiceUnavailable(ApiError):
    status = 503
    type = "service_unavailable"
    default_code = "service_unavailable"


class UpstreamStatusError(ApiError):
    """The upstream answered with a 4xx: passed on with the same status, its message in details."""

    type = "upstream_error"
    default_code = "upstream_client_error"

    def __init__(self, status: int, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.status_code = status

    @property
    def http_status(self) -> int:
        return self.status_code


def status_of(err: ApiError) -> int:
    if isinstance(err, UpstreamStatusError):
        return err.status_code
    return err.status


def render(
    err: ApiError, request_id: str | None = None
) -> tuple[int, list[tuple[str, str]], bytes]:
    """The one place an error becomes a response: (status, headers, JSON body)."""
    body = json.dumps(err.body(request_id), separators=(",", ":")).encode()
    headers = [("content-type", "application/json")] + err.headers
    return status_of(err), headers, body
