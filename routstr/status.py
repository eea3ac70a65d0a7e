"""Public status endpoints: `GET /health`, `GET /v1/info`, `GET /`.

Health probes are cached for a few seconds so a monitoring loop cannot turn the node into a
load generator against its upstream or mint, and each is bounded by `PROBE_TIMEOUT_S`. A
dependency that is not configured reports `"not_configured"` and does not make the node
unhealthy, but a missing upstream or mint makes it degraded (`setup_problems`, also warned at
start); one that is configured and failing makes it unhealthy (503). The checks:

* database: a write (one row of `health_probe`) commits — a full disk, a read-only file or a
  lock held too long fail it;
* upstream: ``GET <upstream>/models`` answers below 500;
* mint: every configured mint answers ``GET /v1/info`` with 200 (failing mints are named).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import anyio

from . import __version__
from .client import HttpClient
from .config import Config
from .db import Database, DatabaseError
from .errors import UpstreamError
from .messages import Request, Response, json_response
from .pricefeed import RateFeed

Probe = Callable[[], Awaitable[str]]
PROBE_CACHE_SECONDS = 10.0
PROBE_TIMEOUT_S = 5.0


def database_writable(db: Database) -> str:
    """"ok" when a write commits (plain def: one short transaction)."""
    try:
        db.transaction(lambda c: c.execute(
            "INSERT INTO health_probe (id, at) VALUES (1, ?)"
            " ON CONFLICT (id) DO UPDATE SET at = excluded.at", (time.time(),)))
    except (DatabaseError, RuntimeError) as exc:
        return f"error: {type(exc).__name__}: {exc}"
    return "ok"


def mint_probe(http: HttpClient, mints: Sequence[str]) -> Probe:
    """A probe asking every mint for ``/v1/info`` at once."""

    async def one(mint: str, failures: list[str]) -> None:
        host = urlsplit(mint).netloc or mint
        try:
            with anyio.fail_after(PROBE_TIMEOUT_S):
                status, _, _ = await http.fetch("GET", mint.rstrip("/") + "/v1/info",
                                                max_bytes=1 << 20)
        except TimeoutError:
            failures.append(f"{host} timed out")
            return
        except UpstreamError as exc:
            failures.append(f"{host} {exc.code}")
            return
        if status != 200:
            failures.append(f"{host} status {status}")

    async def probe() -> str:
        failures: list[str] = []
        async with anyio.create_task_group() as tg:
            for mint in mints:
                tg.start_soon(one, mint, failures)
        return "ok" if not failures else "error: " + "; ".join(sorted(failures))

    return probe


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
            value = "error: timed out"
            with anyio.move_on_after(PROBE_TIMEOUT_S):
                value = await self.probe()
            self._value = value
            self._at = now
        return self._value


def setup_problems(config: Config) -> list[str]:
    """What in the configuration keeps the node from serving or from being found: warned at
    start, and `/health` is degraded with these as its reasons until the operator fixes them."""
    problems = []
    if config.demo:
        problems.append("demo mode (--demo): the upstream is the built-in echo model, not an"
                        " LLM; start with --upstream-base-url for real models")
    elif not config.upstream_base_url:
        problems.append("no upstream (--upstream-base-url): every chat is answered 503;"
                        " `python -m routstr --demo` serves a built-in echo model")
    if not config.cashu_mints:
        problems.append("no trusted mint (--cashu-mints): Cashu payments are refused; only"
                        " keys the operator creates can pay")
    if config.relays and not (config.http_url or config.onion_url):
        problems.append("relays are set but no public URL (--http-url or --onion-url):"
                        " nothing will be announced")
    return problems


def setup_warnings(config: Config) -> list[str]:
    """`setup_problems`, and what may be intended but is worth a line in the start-up log."""
    warnings = setup_problems(config)
    if config.upstream_base_url and not config.upstream_api_key and not config.demo:
        warnings.append("the upstream has no API key (--upstream-api-key): fine for a local"
                        " model server; an account upstream will refuse every request")
    return warnings


@dataclass
class StatusHandlers:
    info_doc: Callable[[], dict[str, object]]
    database: Probe
    rates: RateFeed
    upstream: CachedProbe
    mint: CachedProbe
    problems: Sequence[str] = ()

    async def health(self, request: Request, params: dict[str, str]) -> Response:
        """healthy (200); degraded (200: served, but something needs the operator — a stale or
        missing BTC/USD rate, `setup_problems` — with the reasons); unhealthy (503: a check
        failed)."""
        checks = {
            "database": await self.database(),
            "upstream": await self.upstream(),
            "mint": await self.mint(),
        }
        healthy = all(v in ("ok", "not_configured") for v in checks.values())
        problem = self.rates.problem()
        checks["btc_usd"] = "ok" if problem is None else "degraded"
        reasons = [*([problem] if problem else []), *self.problems]
        doc: dict[str, object] = {
            "status": "unhealthy" if not healthy else "degraded" if reasons else "healthy",
            "version": __version__,
            "timestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "checks": checks,
            "btc_usd": self.rates.status(),
        }
        if reasons:
            doc["reasons"] = reasons
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
