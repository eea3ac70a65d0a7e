"""The API surface: /openapi.json kept true against the router's table, /docs and /redoc
self-contained, X-Routstr-Version, list fields and pagination, and schemathesis against the
real node (no 500s)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from routstr.app import Node, routes
from routstr.config import load_config
from routstr.openapi import OPERATIONS, canonical
from tests.support.node import NodeProcess
from tests.support.upstream import ScriptedUpstream

ADMIN = "adm-openapi-test"


@pytest.fixture(scope="module")
def node(upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("openapi"), [
        "--upstream-base-url", upstream.url, "--admin-token", ADMIN,
        "--rate-limit-requests", "0", "--webhooks-allow-private",
        "--webhook-retry-base", "3600"])
    n.start()
    yield n
    n.stop()


def new_key(node: NodeProcess, msats: int = 10_000_000) -> str:
    status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": msats},
                            {"Authorization": f"Bearer {ADMIN}"})
    assert status == 201, doc
    return str(doc["api_key"])


def router_table(node: NodeProcess, tmp_path: Path) -> set[tuple[str, str]]:
    """The route table the node builds for the same settings (in this process)."""
    config = load_config([*node.args, "--database", str(tmp_path / "table.sqlite3")], {})
    built = Node.open(config)
    try:
        return {(r.method, r.pattern) for r in routes(built)}
    finally:
        built.db.close()


def test_document_is_the_router_table(node: NodeProcess, tmp_path: Path) -> None:
    status, doc = node.json("GET", "/openapi.json")
    assert status == 200 and doc["openapi"] == "3.1.0"
    served = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    table = router_table(node, tmp_path)
    assert served == table
    undocumented = sorted(f"{m.upper()} {p}" for p, ops in doc["paths"].items()
                          for m, op in ops.items() if op.get("x-undocumented"))
    assert undocumented == [], f"describe these routes in routstr/openapi.json: {undocumented}"
    stale = sorted(k for k in OPERATIONS if not any(canonical(*t) == k for t in table))
    assert stale == [], f"OPERATIONS entries for routes that no longer exist: {stale}"
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    schemas = doc["components"]["schemas"]
    for ref in re.findall(r'"\$ref": ?"#/components/schemas/([^"]+)"', json.dumps(doc)):
        assert ref in schemas, ref
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert op["summary"] and op["responses"], path
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == set(re.findall(r"{([^}]+)}", path)), path


def test_docs_pages_are_self_contained(node: NodeProcess) -> None:
    _, doc = node.json("GET", "/openapi.json")
    for page in ("/docs", "/redoc"):
        status, headers, raw = node.request("GET", page)
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in headers["content-security-policy"]
        html = raw.decode()
        for path in doc["paths"]:
            assert path.replace("{", "&#x7b;") in html or path in html, (page, path)
        # Nothing fetched from elsewhere: no external script, style, image or font.
        assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", html), page
        assert not re.search(r"https?://|//cdn|@import|url\(", html), page
    assert "function tryIt" in node.request("GET", "/docs")[2].decode()
    assert "Schemas" in node.request("GET", "/redoc")[2].decode()


def test_version_header(node: NodeProcess) -> None:
    status, headers, _ = node.request("GET", "/v1/info", headers={"X-Routstr-Version": "v1"})
    assert status == 200 and headers["x-routstr-version"] == "v1"
    status, headers, raw = node.request("GET", "/v1/info", headers={"X-Routstr-Version": "v2"})
    err = json.loads(raw)["error"]
    assert status == 400 and err["code"] == "unsupported_version"
    assert err["details"]["supported"] == ["v1"] and headers["x-routstr-version"] == "v1"
    status, _, _ = node.request("GET", "/no/such/path")
    assert status == 404


def test_lists_filter_fields_and_paginate(node: NodeProcess) -> None:
    _, everything = node.json("GET", "/v1/models")
    total = len(everything["data"])
    assert everything["total"] == total and everything["has_more"] is False and total > 3
    _, page = node.json("GET", "/v1/models?limit=2&offset=1&fields=id,pricing")
    assert [m["id"] for m in page["data"]] == [m["id"] for m in everything["data"][1:3]]
    assert all(set(m) == {"id", "pricing"} for m in page["data"])
    assert (page["limit"], page["offset"], page["total"], page["has_more"]) == (2, 1, total, True)
    _, last = node.json("GET", f"/v1/models?offset={total - 1}&limit=5")
    assert len(last["data"]) == 1 and last["has_more"] is False
    status, err = node.json("GET", "/v1/models?limit=0")
    assert status == 400 and err["error"]["code"] == "invalid_parameter"
    key = new_key(node)
    auth = {"Authorization": f"Bearer {key}"}
    _, txs = node.json("GET", "/v1/transactions?limit=1&fields=type,amount_msats", headers=auth)
    assert txs["limit"] == 1 and txs["total"] >= 1 and txs["has_more"] == (txs["total"] > 1)
    assert set(txs["data"][0]) == {"type", "amount_msats"}
    for path, headers in (("/v1/models", {}), ("/v1/transactions", auth)):
        # a typo is refused, not answered with a page of empty objects
        status, err = node.json("GET", f"{path}?fields=id,bogus", headers=headers)
        assert status == 400 and err["error"]["code"] == "invalid_parameter", err
        assert "bogus" in err["error"]["message"]
        assert err["error"]["details"]["unknown"] == ["bogus"]
        assert "id" in err["error"]["details"]["known"]


def test_schemathesis_finds_no_server_errors(node: NodeProcess) -> None:
    key = new_key(node, 1_000_000_000)
    st = Path(sys.executable).with_name("st")
    cmd = [str(st), "run", node.url + "/openapi.json", "--checks", "not_a_server_error",
           "--phases", "examples,fuzzing", "--max-examples", "3", "--workers", "2",
           "--seed", "20240601", "--generation-database", "none", "--no-shrink",
           "--request-timeout", "10", "--no-color", "-H", f"Authorization: Bearer {key}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    summary = proc.stdout[-6000:]
    assert proc.returncode == 0, summary
    assert re.search(r"Tested: +\d+", summary) and "Server error" not in summary
