"""Existing Routstr clients against this node: the flows of routstr-core's digest §6.

A client sizes its X-Cashu payment from `/v1/models` the way the Routstr SDK does (routstr-core's
formula, digest §3 step 1, re-implemented here from the digest in floats as a client would);
the node must accept exactly that payment. Plus the Responses API through the real OpenAI SDK,
moderations, the 425 case, key expiry and Refund-LNURL.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from routstr.cashu.tokens import parse_token
from routstr.pricing import actual_cost, load_price_table
from tests.support.lnurl import LnurlService
from tests.support.minter import Minter
from tests.support.node import NodeProcess
from tests.support.upstream import Behaviour, ScriptedUpstream

ADMIN = "compat-admin"
PRICES = load_price_table(None).at(100_000)
MSG = [{"role": "user", "content": "Tell me about ecash, briefly."}]


@pytest.fixture(scope="module")
def node(upstream: ScriptedUpstream, mint_url: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("compat"), [
        "--upstream-base-url", upstream.url, "--admin-token", ADMIN, "--cashu-mints", mint_url,
        "--lnurl-allow-private"])
    n.start()
    yield n
    n.stop()


def new_key(node: NodeProcess, msats: int = 5_000_000) -> str:
    status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": msats},
                            {"Authorization": f"Bearer {ADMIN}"})
    assert status == 201
    return str(doc["api_key"])


def client_side_reservation_msats(model: dict[str, Any], body: dict[str, Any]) -> int:
    """routstr-core's reservation as a client computes it from the advertised numbers."""
    sp = model["sats_pricing"]
    tol = 1 - 1.0 / 100
    reservation = int(sp["max_cost"] * 1000 * tol)
    chars = 0
    for m in body.get("messages", []):
        content = m.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text", "")) for p in content if p.get("type") == "text")
    est_prompt = chars // 3
    top = model.get("top_provider") or {}
    cl, mct = top.get("context_length"), top.get("max_completion_tokens")
    if cl and mct and cl > mct:
        limit = cl - mct
    elif cl:
        limit = cl
    else:
        limit = model.get("context_length") or 0
    allowance = limit * sp["prompt"] * tol
    discount = math.floor((allowance - est_prompt * sp["prompt"]) * 1000)
    if discount > 0:
        reservation -= discount
    if "max_tokens" in body:
        d2 = math.floor((sp["max_completion_cost"] * tol - body["max_tokens"] * sp["completion"]) * 1000)
        if d2 > 0:
            reservation -= d2
    return max(reservation, 1)


@pytest.mark.mint
@pytest.mark.parametrize("model_id,max_tokens", [("gpt-4o-mini", 200), ("gpt-4o", 50),
                                                 ("claude-3-5-haiku", None)])
def test_xcashu_sized_by_the_client_formula_is_accepted(node: NodeProcess, minter: Minter,
                                                        mint_url: str, model_id: str,
                                                        max_tokens: int | None) -> None:
    status, info = node.json("GET", "/v1/info")
    assert status == 200 and info["mints"] == [mint_url]
    status, models = node.json("GET", "/v1/models")
    model = next(m for m in models["data"] if m["id"] == model_id)
    body: dict[str, Any] = {"model": model_id, "messages": MSG}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    sats = math.ceil(client_side_reservation_msats(model, body) / 1000)
    token = minter.token(mint_url, sats)
    status, headers, raw = node.request("POST", "/v1/chat/completions", body, {"X-Cashu": token})
    assert status == 200, raw
    cost = int(headers["x-routstr-cost-msats"])
    assert cost == actual_cost(PRICES.get(model_id), 12, 5).total_msats
    change = parse_token(headers["x-cashu"]).amount if "x-cashu" in headers else 0
    assert change == sats - math.ceil(cost / 1000)


def test_models_catalogue_shape(node: NodeProcess) -> None:
    for path in ("/v1/models", "/v1/models/", "/models", "/models/"):
        status, doc = node.json("GET", path)
        assert status == 200 and doc["object"] == "list" and doc["data"]
        m = doc["data"][0]
        assert {"id", "name", "created", "description", "context_length", "architecture",
                "top_provider", "per_request_limits", "enabled", "sats_pricing"} <= set(m)
        assert {"prompt", "completion", "request", "image", "web_search", "internal_reasoning",
                "input_cache_read", "input_cache_write", "max_prompt_cost",
                "max_completion_cost", "max_cost"} <= set(m["sats_pricing"])
    status, doc = node.json("GET", "/v1/models?fields=id,sats_pricing")
    assert all(set(m) == {"id", "sats_pricing"} for m in doc["data"])


def test_responses_api_with_the_openai_sdk(node: NodeProcess, upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    client = OpenAI(api_key=key, base_url=node.base_url, max_retries=0)
    r = client.responses.create(model="gpt-4o-mini", input="Say hello")
    assert r.output_text == "Hello from upstream!"
    cost = actual_cost(PRICES.get("gpt-4o-mini"), 12, 5).total_msats
    assert r.usage is not None and r.usage.model_dump()["cost"]["total_msats"] == cost
    events = list(client.responses.create(model="gpt-4o-mini", input="Say hello", stream=True))
    types = [e.type for e in events]
    assert types[-1] == "response.completed"
    done = events[-1]
    assert done.response.usage.model_dump()["cost"]["total_msats"] == cost  # type: ignore[union-attr]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert text == "Hello from upstream!"
    status, info = node.json("GET", "/v1/wallet/info", headers={"Authorization": f"Bearer {key}"})
    assert info["balance"] == 5_000_000 - 2 * cost and info["reserved"] == 0


def test_moderations_pass_through(node: NodeProcess, upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    r = OpenAI(api_key=key, base_url=node.base_url).moderations.create(input="hello")
    assert r.results is not None
    assert upstream.requests[-1].path.endswith("/moderations")
    status, info = node.json("GET", "/v1/balance", headers={"Authorization": f"Bearer {key}"})
    assert info["balance"] == 5_000_000  # moderation is free


@pytest.mark.mint
def test_recovering_change_in_flight_is_425(node: NodeProcess, minter: Minter, mint_url: str,
                                            upstream: ScriptedUpstream) -> None:
    token = minter.token(mint_url, 100)
    upstream.enqueue(Behaviour(delay_s=1.5))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(node.request, "POST", "/v1/chat/completions",
                          {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 10},
                          {"X-Cashu": token})
        deadline = time.monotonic() + 5
        while True:
            status, headers, raw = node.request("POST", "/v1/wallet/refund",
                                                headers={"X-Cashu": token})
            if status != 404 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 425 and headers["retry-after"] == "2"
        assert fut.result(10)[0] == 200
    status, doc = node.json("POST", "/v1/wallet/refund", headers={"X-Cashu": token})
    assert status == 200 and doc["token"].startswith("cashuB")


def test_child_key_expiry_is_403(node: NodeProcess) -> None:
    parent = new_key(node)
    status, doc = node.json("POST", "/v1/balance/child-key",
                            {"count": 1, "validity_date": int(time.time()) + 2},
                            {"Authorization": f"Bearer {parent}"})
    assert status == 200
    child = doc["api_keys"][0]
    body = {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 5}
    assert node.json("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {child}"})[0] == 200
    time.sleep(2.5)
    status, err = node.json("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {child}"})
    assert status == 403 and err["error"]["code"] == "key_expired"
    status, err = node.json("POST", "/v1/balance/child-key", {"count": 1},
                            {"Authorization": f"Bearer {child}"})
    assert status in (400, 403)


@pytest.mark.mint
def test_refund_lnurl_header_pays_refund_over_lightning(node: NodeProcess, minter: Minter,
                                                        mint_url: str, mint_url_fee: str,
                                                        upstream: ScriptedUpstream) -> None:
    svc = LnurlService(mint_url_fee)
    try:
        status, doc = node.json("POST", "/v1/balance/create",
                                {"initial_balance_token": minter.token(mint_url, 60)})
        key = doc["api_key"]
        status, raw = node.json("POST", "/v1/chat/completions",
                                {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 5},
                                {"Authorization": f"Bearer {key}", "Refund-LNURL": svc.address,
                                 "Key-Expiry-Time": str(int(time.time()) + 3600)})
        assert status == 200
        sent = upstream.requests[-1].headers
        assert "refund-lnurl" not in sent and "key-expiry-time" not in sent
        status, doc = node.json("POST", "/v1/balance/refund", headers={"Authorization": f"Bearer {key}"})
        assert status == 200, doc
        assert doc["recipient"] == svc.address and int(doc["sats"]) > 0
        status, bad = node.json("POST", "/v1/chat/completions",
                                {"model": "gpt-4o-mini", "messages": MSG},
                                {"Authorization": f"Bearer {key}", "Key-Expiry-Time": "soon"})
        assert status == 400
    finally:
        svc.close()


def test_error_envelope_codes(node: NodeProcess) -> None:
    body = {"model": "gpt-4o-mini", "messages": MSG}
    cases = [({}, 401, "missing_api_key"), ({"Authorization": "Bearer "}, 401, "missing_api_key"),
             ({"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
             ({"Authorization": "Bearer cashuBgarbage"}, 400, "invalid_cashu_token"),
             ({"X-Cashu": "cashuAnotatoken"}, 400, "invalid_cashu_token")]
    for headers, status, code in cases:
        got, doc = node.json("POST", "/v1/chat/completions", body, headers)
        assert (got, doc["error"]["code"]) == (status, code), (headers, doc)
        assert set(doc["error"]) == {"type", "message", "code", "details"}
    status, doc = node.json("POST", "/v1/wallet/refund", headers={"Authorization": "Bearer cashuBnever"})
    assert status in (400, 401)
    status, doc = node.json("GET", "/v1/balance/info", headers={"Authorization": "Bearer sk-unknown"})
    assert status == 401 and doc["error"]["code"] == "invalid_api_key"
    assert json.dumps(doc)


# ---- Anthropic's Messages API (the Routstr SDK calls /v1/messages) ------------------------------
CLAUDE = "claude-3-5-haiku"
SAY_HELLO = [{"role": "user", "content": "Say hello"}]


def test_anthropic_messages_with_the_anthropic_sdk(node: NodeProcess,
                                                    upstream: ScriptedUpstream) -> None:
    from anthropic import Anthropic

    key = new_key(node)
    client = Anthropic(api_key=key, base_url=node.url, max_retries=0)  # it sends x-api-key
    cost = actual_cost(PRICES.get(CLAUDE), 12, 5).total_msats
    m = client.messages.create(model=CLAUDE, max_tokens=100, messages=SAY_HELLO)
    assert m.content[0].text == "Hello from upstream!"  # type: ignore[union-attr]
    assert m.usage.model_dump()["cost"]["total_msats"] == cost
    seen = upstream.requests[-1]
    assert seen.path == "/v1/messages" and seen.json()["max_tokens"] == 100
    assert "x-api-key" not in seen.headers and "authorization" not in seen.headers  # never ours
    assert seen.headers["anthropic-version"]  # the client's protocol headers pass through

    with client.messages.stream(model=CLAUDE, max_tokens=100, messages=SAY_HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from upstream!"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (12, 5)

    events = list(client.messages.create(model=CLAUDE, max_tokens=100, messages=SAY_HELLO,
                                         stream=True))
    assert [e.type for e in events][-2:] == ["message_delta", "message_stop"]
    assert events[-2].usage.model_dump()["cost"]["total_msats"] == cost  # type: ignore[union-attr]

    assert client.messages.count_tokens(model=CLAUDE, messages=SAY_HELLO).input_tokens == 12
    assert upstream.requests[-1].path == "/v1/messages/count_tokens"
    status, info = node.json("GET", "/v1/wallet/info", headers={"x-api-key": key})
    assert status == 200  # the balance API takes the key where the Anthropic SDK puts it
    assert info["balance"] == 5_000_000 - 3 * cost and info["reserved"] == 0  # counting is free


def test_anthropic_cache_tokens_are_billed_at_their_rates(node: NodeProcess,
                                                          upstream: ScriptedUpstream) -> None:
    """Anthropic reports cache reads and writes beside input_tokens: each at its own rate."""
    key = new_key(node)
    usage = {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100,
             "cache_creation_input_tokens": 20}
    upstream.enqueue(Behaviour(usage=usage))
    status, headers, raw = node.request(
        "POST", "/v1/messages", {"model": CLAUDE, "max_tokens": 50, "messages": SAY_HELLO,
                                 "system": "You are terse. " * 12},  # room for 130 tokens
        {"x-api-key": key, "anthropic-version": "2023-06-01"})
    assert status == 200, raw
    price = PRICES.get(CLAUDE)
    by_hand = -(-(10 * price.input_msats_per_1k + 100 * price.cached_input_msats_per_1k
                  + 20 * price.cache_write_msats_per_1k + 5 * price.output_msats_per_1k) // 1000)
    assert int(headers["x-routstr-cost-msats"]) == by_hand
    assert actual_cost(price, 130, 5, 100, 20).total_msats == by_hand
    cost = json.loads(raw)["usage"]["cost"]
    assert cost["cache_read_msats"] == 100 * price.cached_input_msats_per_1k // 1000
    assert cost["cache_creation_msats"] == 20 * price.cache_write_msats_per_1k // 1000
    assert json.loads(raw)["usage"]["cache_read_input_tokens"] == 100  # passed on as sent


def test_anthropic_stream_cut_short_ends_with_an_anthropic_error_event(
        node: NodeProcess, upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    upstream.enqueue(Behaviour(fail_after_events=3))  # message_start + 2 events, then the cut
    status, _, raw = node.request(
        "POST", "/v1/messages",
        {"model": CLAUDE, "max_tokens": 50, "messages": SAY_HELLO, "stream": True},
        {"Authorization": f"Bearer {key}"})
    assert status == 200
    last = raw.decode().strip().split("\n\n")[-1]
    assert last.startswith("event: error\n")
    error = json.loads(last.split("data: ", 1)[1])
    assert error["type"] == "error" and error["error"]["code"] == "upstream_stream_failed"
    status, info = node.json("GET", "/v1/balance", headers={"Authorization": f"Bearer {key}"})
    charged = 5_000_000 - info["balance"]
    assert info["reserved"] == 0
    # billed from what message_start reported (12 in, 1 out so far), not the worst case
    assert charged == actual_cost(PRICES.get(CLAUDE), 12, 1).total_msats
