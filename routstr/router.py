"""(method, path) → handler.

Paths are literal segments or `{name}` placeholders; a trailing slash is ignored, so
`/v1/models` and `/v1/models/` are the same route (routstr-core clients use both). A path that
matches with another method answers 405 with `Allow`; no match at all answers 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from .errors import MethodNotAllowed, NotFound
from .messages import Request, Response

Handler = Callable[[Request, dict[str, str]], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    handler: Handler

    @property
    def segments(self) -> tuple[str, ...]:
        return _split(self.pattern)


def _split(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def _match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> dict[str, str] | None:
    if len(pattern) != len(parts):
        return None
    params: dict[str, str] = {}
    for want, got in zip(pattern, parts, strict=True):
        if want.startswith("{") and want.endswith("}"):
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params


class Router:
    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = list(routes)
        # Literal routes are looked up in a dict (the hot path); patterns are scanned.
        self._literal: dict[tuple[str, ...], dict[str, Handler]] = {}
        self._patterns: list[tuple[tuple[str, ...], Route]] = []
        for route in self.routes:
            segs = route.segments
            if any(s.startswith("{") for s in segs):
                self._patterns.append((segs, route))
            else:
                self._literal.setdefault(segs, {})[route.method] = route.handler

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        parts = _split(path)
        allowed: list[str] = []
        by_method = self._literal.get(parts)
        if by_method is not None:
            handler = by_method.get(method) or (by_method.get("GET") if method == "HEAD" else None)
            if handler is not None:
                return handler, {}
            allowed.extend(by_method)
        for segs, route in self._patterns:
            params = _match(segs, parts)
            if params is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route.handler, params
            allowed.append(route.method)
        if allowed:
            raise MethodNotAllowed([*allowed, "OPTIONS"])
        raise NotFound(f"Path '{path}' not found", code="not_found")
