"""`--demo`: a first start that serves. The built-in echo upstream is a real upstream on a
loopback port; the node reserves, forwards, meters and settles as for any other, so these tests
drive it with the OpenAI SDK and a Cashu token from the real test mint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from routstr import demo
from routstr.cashu.tokens import parse_token
from tests.support.minter import Minter
from tests.support.node import ROOT, NodeProcess

ADMIN = "demo-admin-token-" + "x" * 24
PRICE = demo.PRICE


def cost(prompt_tokens: int, completion_tokens: int) -> int:
    """What the demo model costs, from its price (whole msats per token here)."""
    assert PRICE.input_msats_per_1k % 1000 == 0 and PRICE.output_msats_per_1k % 1000 == 0
    return (prompt_tokens * (PRICE.input_msats_per_1k // 1000)
            + completion_tokens * (PRICE.output_msats_per_1k // 1000))


@pytest.fixture
def node(node_factory: Any, mint_url: str) -> NodeProcess:
    return node_factory("--admin-token", ADMIN, "--cashu-mints", mint_url,  # type: ignore[no-any-return]
                        env={"DEMO": "true"})


def new_key(node: NodeProcess, msats: int) -> str:
    status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": msats},
                            {"Authorization": f"Bearer {ADMIN}"})
    assert status == 201, doc
    return str(doc["api_key"])


def balance(node: NodeProcess, key: str) -> int:
    status, doc = node.json("GET", "/v1/balance", headers={"Authorization": f"Bearer {key}"})
    assert status == 200, doc
    assert doc["reserved"] == 0
    return int(doc["balance"])


def test_the_demo_model_is_listed_and_labelled(node: NodeProcess) -> None:
    status, doc = node.json("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in doc["data"]] == ["demo-echo"]
    [m] = doc["data"]
    assert m["owned_by"] == "routstr-demo" and "not an LLM" in m["name"]
    assert "--demo" in m["description"]
    status, health = node.json("GET", "/health")
    assert status == 200 and health["status"] == "degraded"
    assert health["checks"]["upstream"] == "ok"  # its own upstream answers /models
    assert any("demo mode" in r for r in health["reasons"]), health
    assert "WARNING routstr: demo mode (--demo)" in node.log_text()
    status, _, page = node.request("GET", "/admin", None, {
        "Authorization": f"Bearer {ADMIN}", "Accept": "text/html"})
    assert status == 200
    assert b'<p class="banner warn" role="status" data-setup>demo mode (--demo)' in page


def test_chat_is_echoed_and_billed_its_usage(node: NodeProcess) -> None:
    key = new_key(node, 100_000)
    client = openai.OpenAI(base_url=node.base_url, api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="demo-echo", messages=[{"role": "user", "content": "hello there node"}])
    answer = raw.parse()
    assert answer.choices[0].message.content == "Echo: hello there node"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (4, 4)
    assert raw.headers["x-routstr-cost-msats"] == str(cost(4, 4))
    assert balance(node, key) == 100_000 - cost(4, 4)
    log = node.log_text()  # the demo upstream's own access line, labelled
    assert "INFO routstr.demo:" in log and "POST /v1/chat/completions 200" in log


def test_a_stream_arrives_word_by_word_and_is_billed(node: NodeProcess) -> None:
    key = new_key(node, 100_000)
    client = openai.OpenAI(base_url=node.base_url, api_key=key, max_retries=0)
    words = "one two three four five six"
    chunks = list(client.chat.completions.create(
        model="demo-echo", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": "be brief"},
                  {"role": "user", "content": words}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: " + words
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 7
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3 + 7, 7)
    assert balance(node, key) == 100_000 - cost(10, 7)


def test_max_tokens_cuts_the_echo_and_the_charge(node: NodeProcess) -> None:
    key = new_key(node, 100_000)
    client = openai.OpenAI(base_url=node.base_url, api_key=key, max_retries=0)
    answer = client.chat.completions.create(
        model="demo-echo", max_tokens=2, messages=[{"role": "user", "content": "a b c d e"}])
    assert answer.choices[0].message.content == "Echo: a"
    assert balance(node, key) == 100_000 - cost(6, 2)


def test_a_cashu_payment_gets_its_change(node: NodeProcess, minter: Minter,
                                         mint_url: str) -> None:
    token = minter.token(mint_url, 10)
    status, headers, _ = node.request(
        "POST", "/v1/chat/completions",
        {"model": "demo-echo", "messages": [{"role": "user", "content": "pay me"}]},
        {"X-Cashu": token})
    assert status == 200
    change = parse_token(headers["x-cashu"])
    # 10 sats paid; the cost (3 prompt + 3 echo tokens) rounds up to a whole sat at the mint
    assert sum(p.amount for p in change.proofs) == 10 - -(-cost(3, 3) // 1000)
    assert minter.state(mint_url, token) == ["SPENT"] * len(parse_token(token).proofs)


def test_demo_with_a_real_upstream_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPSTREAM_")}
    result = subprocess.run(
        [sys.executable, "-m", "routstr", "--upstream-base-url", "http://127.0.0.1:9/v1",
         "--port", "0"], cwd=tmp_path, env={**env, "DEMO": "true", "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "routstr: --demo serves its own upstream and price: leave out --upstream-base-url and"
        " --pricing (or leave out --demo)"]
    assert not (tmp_path / "routstr.sqlite3").exists()
