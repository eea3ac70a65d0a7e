"""The official OpenAI Node SDK (`openai` on npm) runs the spec's JavaScript example."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from routstr.pricing import actual_cost, load_price_table
from tests.support.js import js_tree
from tests.support.upstream import ScriptedUpstream


@pytest.fixture(scope="module")
def node_sdk() -> Path:
    return js_tree("the Node SDK test")


def test_seed_javascript_example(node_sdk: Path, node_factory: Any) -> None:
    with ScriptedUpstream() as up:
        node = node_factory("--upstream-base-url", up.url, "--admin-token", "adm")
        status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": 1_000_000},
                                {"Authorization": "Bearer adm"})
        assert status == 201
        out = subprocess.run(["node", "seed_example.mjs"], cwd=node_sdk, capture_output=True,
                             text=True, timeout=60,
                             env={"PATH": os.environ.get("PATH", ""),
                                  "ROUTSTR_API_KEY": doc["api_key"],
                                  "ROUTSTR_BASE_URL": node.base_url})
        assert out.returncode == 0, out.stderr
        lines = out.stdout.strip().splitlines()
        assert lines[0] == "Hello from upstream!"
        assert lines[1] == "Hello from upstream!"
        assert json.loads(lines[2]) == {"status": 400, "type": "invalid_request",
                                        "code": "model_not_found"}
        status, bal = node.json("GET", "/v1/balance", headers={"Authorization": f"Bearer {doc['api_key']}"})
        per = actual_cost(load_price_table(None).at(100_000).get("gpt-3.5-turbo"), 12, 5).total_msats
        assert bal["balance"] == 1_000_000 - 2 * per and bal["reserved"] == 0
