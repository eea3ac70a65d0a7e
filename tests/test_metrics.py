"""GET /metrics: admin-only, valid Prometheus text (our parser; promtool too when installed),
and the numbers match what the node did."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from typing import Any

import pytest

from routstr.pricing import actual_cost, load_price_table
from tests.support.node import NodeProcess
from tests.support.upstream import Behaviour, ScriptedUpstream

ADMIN = "adm-metrics-test"
CHAT_COST = actual_cost(load_price_table(None).at(100_000).get("gpt-4o-mini"), 12, 5).total_msats
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(\{{(.*)\}})? (\S+)( -?\d+)?$")
_LABEL = re.compile(rf'({_NAME})="((?:[^"\\\n]|\\["\\n])*)"(,|$)')
Series = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse_exposition(text: str) -> tuple[dict[str, str], Series]:
    """A strict reader of the text format 0.0.4: returns ({family: type}, {name: {labels: v}})."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    series: Series = {}
    seen_samples: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"second HELP for {name}"
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in types and name not in seen_samples, f"TYPE after samples: {line}"
            types[name] = kind
            continue
        assert line and not line.startswith("#"), f"unexpected line {line!r}"
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, _, raw_labels, raw_value, _ = match.groups()
        labels: list[tuple[str, str]] = []
        rest = raw_labels or ""
        while rest:
            lm = _LABEL.match(rest)
            assert lm, f"bad labels in {line!r}"
            labels.append((lm.group(1), lm.group(2)))
            rest = rest[lm.end():]
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample before its TYPE: {line!r}"
        if types[family] == "counter":
            assert family.endswith("_total"), family
        assert re.fullmatch(r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+|Inf)|NaN", raw_value), line
        value = float(raw_value.replace("Inf", "inf"))
        key = tuple(sorted(labels))
        assert key not in series.setdefault(name, {}), f"duplicate series {line!r}"
        series[name][key] = value
        seen_samples.add(family)
    for family, kind in types.items():
        if kind != "histogram":
            continue
        buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        for labels, value in series.get(family + "_bucket", {}).items():
            le = dict(labels)["le"]
            rest_labels = tuple(kv for kv in labels if kv[0] != "le")
            buckets.setdefault(rest_labels, []).append((float(le.replace("Inf", "inf")), value))
        for rest_labels, points in buckets.items():
            points.sort()
            counts = [c for _, c in points]
            assert counts == sorted(counts), f"{family} buckets not cumulative"
            assert math.isinf(points[-1][0]), f"{family} lacks le=+Inf"
            assert series[family + "_count"][rest_labels] == counts[-1]
    return types, series


def scrape(node: NodeProcess, token: str | None = ADMIN) -> tuple[int, dict[str, str], str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, resp_headers, raw = node.request("GET", "/metrics", headers=headers)
    return status, resp_headers, raw.decode()


def value(series: Series, name: str, **labels: str) -> float:
    return series[name][tuple(sorted(labels.items()))]


def test_metrics_count_what_happened(node_factory: Any, upstream: ScriptedUpstream) -> None:
    node = node_factory("--upstream-base-url", upstream.url, "--admin-token", ADMIN)
    status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": 10_000_000},
                            {"Authorization": f"Bearer {ADMIN}"})
    key = doc["api_key"]
    auth = {"Authorization": f"Bearer {key}"}
    assert node.request("POST", "/v1/chat/completions", CHAT, auth)[0] == 200
    upstream.enqueue(Behaviour(status=500))
    assert node.request("POST", "/v1/chat/completions", CHAT, auth)[0] == 502
    assert node.request("GET", "/nothing/here/42")[0] == 404
    assert node.request("GET", "/v1/webhooks/unknown", headers=auth)[0] == 405
    status, headers, text = scrape(node)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    types, series = parse_exposition(text)
    assert types["routstr_http_request_duration_seconds"] == "histogram"
    requests = "routstr_http_requests_total"
    assert value(series, requests, route="/v1/chat/completions", method="POST",
                 status="200") == 1
    assert value(series, requests, route="/v1/chat/completions", method="POST",
                 status="502") == 1
    assert value(series, requests, route="/admin/api/keys", method="POST", status="201") == 1
    assert value(series, requests, route="unmatched", method="GET", status="404") == 1
    assert value(series, requests, route="unmatched", method="GET", status="405") == 1
    assert value(series, "routstr_http_request_duration_seconds_count",
                 route="/v1/chat/completions") == 2
    assert value(series, "routstr_upstream_errors_total", code="upstream_failed") == 1
    assert value(series, "routstr_charged_msats_total") == CHAT_COST
    assert value(series, "routstr_settled_requests_total") == 1
    assert value(series, "routstr_reservations_active") == 0
    assert value(series, "routstr_reserved_msats") == 0
    assert value(series, "routstr_rate_limited_total", limit="requests") == 0
    assert "routstr_wallet_balance" in types
    # The scrape itself is counted by the next one.
    _, series2 = parse_exposition(scrape(node)[2])
    assert value(series2, requests, route="/metrics", method="GET", status="200") == 1
    if shutil.which("promtool"):  # the Debian package `prometheus` (installed by .ci/run)
        check = subprocess.run(["promtool", "check", "metrics"], input=text,
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr


def test_metrics_need_the_admin_token(node_factory: Any) -> None:
    node = node_factory("--admin-token", ADMIN)
    status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": 1},
                            {"Authorization": f"Bearer {ADMIN}"})
    for token in (None, doc["api_key"], "adm-wrong-token"):
        status, _, _ = scrape(node, token)
        assert status == 401, token
    assert scrape(node)[0] == 200


def test_parser_rejects_malformed_text() -> None:
    good = "# HELP x_total x\n# TYPE x_total counter\nx_total{a=\"1\"} 3\n"
    parse_exposition(good)
    for bad in (good.replace("x_total{a", "x_total {a"), good.replace('"1"', "1"),
                good + 'x_total{a="1"} 4\n', "x_total 1\n", good.rstrip("\n"),
                "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
                "h_count 1\nh_sum 0\n"):
        with pytest.raises(AssertionError):
            parse_exposition(bad)
