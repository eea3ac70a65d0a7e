"""A stream stays a plain stream of its dialect through any relay, and says what it cost.

A proxy in front of this node (routstr-core, with its `routstr` provider) holds `data: [DONE]`
back and re-emits it last while passing every other event through, and bills its own user from
the stream's `usage` only. So: no event of ours after the last one (it would reach the proxy's
SDK user as a chunk without `choices`); the cost rides in the final usage-bearing event; and a
stream the node charges always carries that event — synthesized from the node's estimate when
the upstream sent no usage or was cut short — before any error event.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.node import NodeProcess
from tests.support.upstream import Behaviour, ScriptedUpstream
from tests.test_proxy import ADMIN, CHAT_COST, Money, new_key

CLAUDE = "claude-3-5-sonnet-20241022"
SAY_HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def node(upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("stream-cost"), [
        "--upstream-base-url", upstream.url, "--upstream-api-key", "upstream-secret",
        "--admin-token", ADMIN, "--upstream-read-timeout", "2"])
    n.start()
    yield n
    n.stop()


@pytest.fixture
def money(node: NodeProcess) -> Iterator[Money]:
    m = Money(node)
    yield m
    m.check()
    m.db.close()


def events(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) of each block that carries data, in order."""
    out = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        if data:
            out.append((name, "\n".join(data)))
    return out


def stream(node: NodeProcess, key: str, path: str, body: dict[str, Any]) -> list[tuple[str | None, str]]:
    status, headers, raw = node.request("POST", path, {**body, "stream": True},
                                        {"Authorization": f"Bearer {key}"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), raw
    return events(raw)


def charged(money: Money, key: str) -> int:
    acct = money.account(key)
    assert acct.reserved_msats == 0
    return int(acct.usage_msats)


def assert_cost(usage: dict[str, Any], total: int, balance: int) -> None:
    assert usage["cost"]["total_msats"] == total
    assert usage["cost_sats"] == total // 1000
    assert usage["remaining_balance_msats"] == balance


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream_survives_a_relay_that_moves_done_last(node: NodeProcess, money: Money,
                                                           include_usage: bool) -> None:
    key = new_key(node)
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": SAY_HI}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    evs = stream(node, key, "/v1/chat/completions", body)
    assert evs[-1] == (None, "[DONE]"), "nothing of ours may follow the stream's last event"
    # Moving [DONE] to the end changes nothing: every other event is a chunk with `choices`.
    assert all(name is None for name, _ in evs)
    chunks = [json.loads(data) for _, data in evs[:-1]]
    assert all(isinstance(c.get("choices"), list) for c in chunks)
    assert charged(money, key) == CHAT_COST
    with_usage = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert with_usage == [chunks[-1]] and chunks[-1]["choices"] == []
        assert_cost(chunks[-1]["usage"], CHAT_COST, 10_000_000 - CHAT_COST)
    else:
        assert with_usage == []  # the client did not ask for usage: OpenAI's contract


def test_chat_stream_without_upstream_usage_gets_the_estimate_as_usage(
        node: NodeProcess, money: Money, upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    upstream.enqueue(Behaviour(usage="omit"))
    evs = stream(node, key, "/v1/chat/completions",
                 {"model": "gpt-4o-mini", "messages": SAY_HI,
                  "stream_options": {"include_usage": True}})
    assert evs[-1] == (None, "[DONE]")
    last = json.loads(evs[-2][1])
    first = json.loads(evs[0][1])
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk"
    assert last["id"] == first["id"] and last["model"] == first["model"]
    usage = last["usage"]
    total = charged(money, key)
    assert total > 0
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert_cost(usage, total, 10_000_000 - total)


@pytest.mark.parametrize("include_usage", [True, False])
def test_cut_chat_stream_says_what_it_charged_before_the_error(
        node: NodeProcess, money: Money, upstream: ScriptedUpstream, include_usage: bool) -> None:
    key = new_key(node)
    upstream.enqueue(Behaviour(fail_after_events=3, stream_chunks=["aaaa"] * 10))
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": SAY_HI}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    evs = stream(node, key, "/v1/chat/completions", body)
    docs = [json.loads(data) for _, data in evs]
    assert docs[-1]["error"]["code"] == "upstream_stream_failed"
    usage_chunk = docs[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["id"] == docs[0]["id"]
    total = charged(money, key)
    assert total > 0
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 0
    assert_cost(usage, total, 10_000_000 - total)
    assert sum(1 for d in docs if d.get("usage")) == 1


def test_chat_stream_ending_without_done_says_what_it_charged(
        node: NodeProcess, money: Money, upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    body = (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
            b'"choices":[{"index":0,"delta":{"content":"abcdefgh"}}]}\n\n')
    upstream.enqueue(Behaviour(body=body, headers=[("content-type", "text/event-stream")]))
    evs = stream(node, key, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": SAY_HI})
    docs = [json.loads(data) for _, data in evs]
    assert docs[-1]["error"]["code"] == "upstream_stream_incomplete"
    total = charged(money, key)
    assert docs[-2]["choices"] == [] and docs[-2]["id"] == "c1"
    assert_cost(docs[-2]["usage"], total, 10_000_000 - total)


def test_anthropic_cut_stream_carries_its_usage_before_the_error(
        node: NodeProcess, money: Money, upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    upstream.enqueue(Behaviour(fail_after_events=3))  # message_start + 2 events, then the cut
    evs = stream(node, key, "/v1/messages",
                 {"model": CLAUDE, "max_tokens": 50, "messages": SAY_HI})
    assert evs[-1][0] == "error"
    name, data = evs[-2]
    delta = json.loads(data)
    assert name == "message_delta" and delta["type"] == "message_delta"
    assert delta["delta"] == {"stop_reason": None, "stop_sequence": None}
    total = charged(money, key)
    assert total > 0
    assert delta["usage"]["input_tokens"] == 12 and delta["usage"]["output_tokens"] >= 1
    assert_cost(delta["usage"], total, 10_000_000 - total)


def test_anthropic_stream_has_nothing_after_message_stop(node: NodeProcess, money: Money) -> None:
    key = new_key(node)
    evs = stream(node, key, "/v1/messages", {"model": CLAUDE, "max_tokens": 50, "messages": SAY_HI})
    assert evs[-1][0] == "message_stop"
    delta = json.loads(evs[-2][1])
    total = charged(money, key)
    assert_cost(delta["usage"], total, 10_000_000 - total)


def test_responses_cut_stream_ends_with_response_failed_carrying_usage(
        node: NodeProcess, money: Money, upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    upstream.enqueue(Behaviour(fail_after_events=4))
    evs = stream(node, key, "/v1/responses", {"model": "gpt-4o-mini", "input": "hi"})
    name, data = evs[-1]
    doc = json.loads(data)
    created = json.loads(evs[0][1])
    assert name == "response.failed" and doc["type"] == "response.failed"
    resp = doc["response"]
    assert resp["status"] == "failed" and resp["id"] == created["response"]["id"]
    assert resp["error"]["code"] == "upstream_stream_failed"
    total = charged(money, key)
    assert total > 0 and resp["usage"]["input_tokens"] > 0
    assert resp["usage"]["total_tokens"] == (resp["usage"]["input_tokens"]
                                             + resp["usage"]["output_tokens"])
    assert_cost(resp["usage"], total, 10_000_000 - total)
    assert sum(1 for _, d in evs if (json.loads(d).get("response") or {}).get("usage")) == 1


def test_responses_stream_has_nothing_after_response_completed(node: NodeProcess,
                                                               money: Money) -> None:
    key = new_key(node)
    evs = stream(node, key, "/v1/responses", {"model": "gpt-4o-mini", "input": "hi"})
    name, data = evs[-1]
    assert name == "response.completed"
    total = charged(money, key)
    assert_cost(json.loads(data)["response"]["usage"], total, 10_000_000 - total)
