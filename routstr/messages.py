"""HTTP messages as plain values, free of any I/O.

`Request` is what a handler sees: method, path, query, lower-cased headers, the whole body
(bounded by `--max-body-bytes` before it gets here). `Response` is what a handler returns: a
status, headers, and either `body` bytes or a `stream` — an object with `__aiter__` and an
idempotent `aclose()`. The server always calls `aclose()` (shielded) once it is done with a
stream, whether the client read all of it or went away; that is where streamed requests settle.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs

from .errors import InvalidRequest
from .wire import request_json, wire_int


class BodyStream(Protocol):
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    request_id: str = ""
    client: str = ""
    path: str = field(init=False)
    query_string: str = field(init=False)

    def __post_init__(self) -> None:
        path, _, query = self.target.partition("?")
        object.__setattr__(self, "path", path or "/")
        object.__setattr__(self, "query_string", query)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def authorization(self) -> str | None:
        """`Authorization`, else an `x-api-key` (where the Anthropic SDKs send the key) as a
        Bearer value."""
        value = self.header("authorization")
        if value is None:
            key = self.header("x-api-key")
            if key is not None and key.strip():
                return "Bearer " + key.strip()
        return value

    def query(self, name: str) -> str | None:
        values = parse_qs(self.query_string, keep_blank_values=True).get(name)
        return values[0] if values else None

    def json(self) -> Any:
        """The body as JSON (an empty body is `{}`), read by the one bounded reader
        (`wire.loads`: depth, number size, no NaN, no duplicate keys); else 400 invalid_json."""
        if not self.body.strip():
            return {}
        return request_json(self.body)

    def json_object(self) -> dict[str, Any]:
        doc = self.json()
        if not isinstance(doc, dict):
            raise InvalidRequest("Request body must be a JSON object", code="invalid_json")
        return doc


@dataclass
class Response:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: BodyStream | None = None
    # `body` sent chunked, with no Content-Length: for rewritten upstream answers, so a relay
    # that copies our headers onto a body it rewrites (routstr-core) cannot truncate it
    chunked: bool = False

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def bounded_int(raw: str | None, name: str, default: int, low: int, high: int) -> int:
    """A query or form value as an integer in [low, high]; absent or empty → `default`."""
    if raw is None or raw.strip() == "":
        return default
    return wire_int(raw, name, low=low, high=high)


def json_response(
    doc: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()
) -> Response:
    body = json.dumps(doc, separators=(",", ":")).encode()
    return Response(status, [("content-type", "application/json"), *headers], body)


class BytesStream:
    """A stream over a list of byte chunks (used for replays and tests of the server)."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self._chunks = list(chunks)
        self.closed = False

    async def _gen(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._gen()

    async def aclose(self) -> None:
        self.closed = True
