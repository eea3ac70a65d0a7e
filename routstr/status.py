"""Public status endpoints: `GET /health`, `GET /v1/info`, `GET /`.

Health probes are cached for a few seconds so a monitoring loop cannot turn the node into a
load generator against its upstream or mint. A dependency that is not configured reports
`"not_configured"` and does not make the node unhealthy; one that is configured and failing
does (503).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from . import __version__
from .messages import Request, Response, json_response

Probe = Callable[[], Awaitable[str]]
PROBE_CACHE_SECONDS = 10.0


@dataclass
class CachedProbe:
    probe: Probe | None
    _value: str = "not_configured"
    _at: float = field(default=-1e9)

    async def __call__(self) -> str:
        if self.probe is None:
            return "not_configured"
        now = time.monotonic()
        if now - self._at > PROBE_CACHE_SECONDS:
            self._value = await self.probe()
            self._at = now
        return self._value


@dataclass
class StatusHandlers:
    info_doc: Callable[[], dict[str, object]]
    database: Probe
    upstream: CachedProbe
    mint: CachedProbe

    async def health(self, request: Request, params: dict[str, str]) -> Response:
        checks = {
            "database": await self.database(),
            "upstream": await self.upstream(),
            "mint": await self.mint(),
        }
        healthy = all(v in ("ok", "not_configured") for v in checks.values())
        doc = {
            "status": "healthy" if healthy else "unhealthy",
            "version": __version__,
            "timestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "checks": checks,
        }
        return json_response(doc, 200 if healthy else 503)

    async def info(self, request: Request, params: dict[str, str]) -> Response:
        return json_response(self.info_doc())

    async def root(self, request: Request, params: dict[str, str]) -> Response:
        doc = self.info_doc()
        return json_response({
            "name": doc.get("name"),
            "description": doc.get("description"),
            "version": __version__,
            "status": "running",
            "endpoints": {"info": "/v1/info", "models": "/v1/models", "health": "/health"},
        })
