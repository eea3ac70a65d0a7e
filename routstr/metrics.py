"""`GET /metrics` in the Prometheus text exposition format (version 0.0.4).

Protected by the admin token (``Authorization: Bearer <admin token>``; Prometheus'
``authorization: {credentials: …}`` scrape setting). Series:

* ``routstr_http_requests_total{route,method,status}`` — every answered request, counted by
  the server at its access-log point; `route` is the router's pattern (``/v1/webhooks/{id}``),
  ``unmatched`` for paths no route knows, so the label set stays bounded.
* ``routstr_http_request_duration_seconds{route}`` — histogram, first byte read to last byte
  written (for a stream: its whole duration).
* ``routstr_upstream_errors_total{code}`` — upstream failures (5xx, 4xx passed on,
  connect/timeout/protocol errors, broken streams).
* ``routstr_charged_msats_total``, ``routstr_settled_requests_total`` — money charged by
  settlements in this process.
* ``routstr_rate_limited_total{limit}``, ``routstr_idempotent_replays_total``,
  ``routstr_webhook_deliveries_total{result}`` — from the platform features.
* ``routstr_reservations_active``, ``routstr_reserved_msats`` — live reservations, read
  from the database at scrape time (all processes).
* ``routstr_wallet_balance{mint,unit}`` — unspent proofs of the node's wallet per mint, in
  the mint's unit, read from the database at scrape time.

Counters live in this process's memory and restart from zero, as Prometheus expects.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from .db import Connection, Database
from .errors import MethodNotAllowed, NotFound
from .messages import Request, Response
from .router import Route, Router

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                     120.0, 300.0)
UNMATCHED = "unmatched"
ROUTE_CACHE_SIZE = 1024  # (method, path) pairs whose route is remembered
Labels = tuple[tuple[str, str], ...]
Extra = dict[str, tuple[str, str, dict[Labels, float]]]  # name → (type, help, {labels: value})


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{escape_label(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Tag:
    """A stand-in handler that only remembers its route pattern (for route labels)."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    async def __call__(self, request: Request, params: dict[str, str]) -> Response:
        raise NotImplementedError


@dataclass
class _Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_S))
    count: int = 0
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if value <= bound:
                self.buckets[i] += 1


class Metrics:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._router: Router | None = None
        self._route_cache: dict[tuple[str, str], str] = {}
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.upstream_errors: dict[str, int] = {}
        self.charged_msats = 0
        self.settled_requests = 0

    def set_routes(self, routes: Iterable[Route]) -> None:
        self._router = Router([Route(r.method, r.pattern, _Tag(r.pattern)) for r in routes])
        self._route_cache.clear()

    def route_of(self, method: str, path: str) -> str:
        """The route pattern serving (method, path); remembered for the first paths seen."""
        key = (method, path)
        route = self._route_cache.get(key)
        if route is None:
            route = self._resolve(method, path)
            if len(self._route_cache) < ROUTE_CACHE_SIZE:
                self._route_cache[key] = route
        return route

    def _resolve(self, method: str, path: str) -> str:
        if self._router is None:
            return UNMATCHED
        try:
            handler, _ = self._router.resolve(method, path)
        except (NotFound, MethodNotAllowed):
            return UNMATCHED
        return handler.pattern if isinstance(handler, _Tag) else UNMATCHED

    # -- observations (plain defs, called on hot paths) -----------------------------------
    def observe_request(self, method: str, path: str, status: int, seconds: float) -> None:
        route = self.route_of(method, path)
        if method not in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            method = "other"
        key = (route, method, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = _Histogram()
        hist.observe(seconds)

    def observe_upstream_error(self, code: str) -> None:
        self.upstream_errors[code] = self.upstream_errors.get(code, 0) + 1

    def observe_settlement(self, charged_msats: int) -> None:
        self.charged_msats += charged_msats
        self.settled_requests += 1

    # -- exposition -----------------------------------------------------------------------
    def _db_gauges(self) -> list[str]:
        def read(conn: Connection) -> tuple[tuple[int, int], list[tuple[str, str, int]]]:
            live = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(amount_msats), 0) FROM reservations").fetchone()
            wallet = conn.execute(
                "SELECT mint, unit, COALESCE(SUM(amount), 0) FROM wallet_proofs"
                " WHERE state = 'unspent' GROUP BY mint, unit ORDER BY mint, unit").fetchall()
            return (int(live[0]), int(live[1])), [(str(m), str(u), int(a)) for m, u, a in wallet]

        (count, msats), wallet = self.db.read(read)
        out = [
            "# HELP routstr_reservations_active Reservations held for requests in flight.",
            "# TYPE routstr_reservations_active gauge",
            f"routstr_reservations_active {count}",
            "# HELP routstr_reserved_msats Money held by live reservations, msats.",
            "# TYPE routstr_reserved_msats gauge",
            f"routstr_reserved_msats {msats}",
            "# HELP routstr_wallet_balance Unspent ecash of the node's wallet per mint, in the"
            " mint's unit.",
            "# TYPE routstr_wallet_balance gauge",
        ]
        out += [f"routstr_wallet_balance{_labels([('mint', m), ('unit', u)])} {a}"
                for m, u, a in wallet]
        return out

    def render(self, extra: Extra | None = None) -> str:
        """The exposition text. `extra`: name → (type, help, {labels: value})."""
        lines: list[str] = [
            "# HELP routstr_http_requests_total HTTP requests answered, by route and status.",
            "# TYPE routstr_http_requests_total counter",
        ]
        for (route, method, status), n in sorted(self.requests.items()):
            labels = _labels([("route", route), ("method", method), ("status", status)])
            lines.append(f"routstr_http_requests_total{labels} {n}")
        lines += [
            "# HELP routstr_http_request_duration_seconds Time to answer a request (streams:"
            " until the last byte).",
            "# TYPE routstr_http_request_duration_seconds histogram",
        ]
        for route, hist in sorted(self.latency.items()):
            for bound, n in zip(LATENCY_BUCKETS_S, hist.buckets, strict=True):
                labels = _labels([("route", route), ("le", _number(bound))])
                lines.append(f"routstr_http_request_duration_seconds_bucket{labels} {n}")
            labels = _labels([("route", route), ("le", "+Inf")])
            lines.append(f"routstr_http_request_duration_seconds_bucket{labels} {hist.count}")
            lines.append(f"routstr_http_request_duration_seconds_sum{_labels([('route', route)])}"
                         f" {_number(hist.total)}")
            lines.append(f"routstr_http_request_duration_seconds_count"
                         f"{_labels([('route', route)])} {hist.count}")
        lines += [
            "# HELP routstr_upstream_errors_total Upstream failures, by error code.",
            "# TYPE routstr_upstream_errors_total counter",
        ]
        lines += [f"routstr_upstream_errors_total{_labels([('code', c)])} {n}"
                  for c, n in sorted(self.upstream_errors.items())]
        lines += [
            "# HELP routstr_charged_msats_total Money charged by settled requests, msats.",
            "# TYPE routstr_charged_msats_total counter",
            f"routstr_charged_msats_total {self.charged_msats}",
            "# HELP routstr_settled_requests_total Requests settled (charged, maybe zero).",
            "# TYPE routstr_settled_requests_total counter",
            f"routstr_settled_requests_total {self.settled_requests}",
        ]
        for name, (kind, help_text, series) in sorted((extra or {}).items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{_labels(labels)} {_number(value)}"
                      for labels, value in sorted(series.items())]
        lines += self._db_gauges()
        return "\n".join(lines) + "\n"

    def response(self, extra: Extra | None = None) -> Response:
        return Response(200, [("content-type", CONTENT_TYPE), ("cache-control", "no-store")],
                        self.render(extra).encode())
