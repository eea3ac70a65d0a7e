"""The paid proxy end to end: the real node process, the real OpenAI SDK, a scripted upstream.

Every test checks money: the exact charge from the upstream's usage, nothing charged on
failures, nothing left reserved, and the ledger's conservation invariant.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from routstr.db import Database
from routstr.ledger import Ledger
from routstr.pricing import actual_cost, load_price_table
from tests.support.node import NodeProcess
from tests.support.socks5 import Socks5Server
from tests.support.upstream import Behaviour, ScriptedUpstream

ADMIN = "test-admin-token"
PRICES = load_price_table(None).at(100_000)


def cost(model: str, prompt: int, completion: int) -> int:
    return actual_cost(PRICES.get(model), prompt, completion).total_msats


CHAT_COST = cost("gpt-4o-mini", 12, 5)


@pytest.fixture(scope="module")
def node(upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("proxy"), [
        "--upstream-base-url", upstream.url, "--upstream-api-key", "upstream-secret",
        "--admin-token", ADMIN, "--upstream-read-timeout", "2"])
    n.start()
    yield n
    n.stop()


class Money:
    """Reads the node's ledger from the test process (sqlite WAL allows a second reader)."""

    def __init__(self, node: NodeProcess) -> None:
        self.db = Database(node.database)
        self.ledger = Ledger(self.db)

    def account(self, api_key: str) -> Any:
        from routstr.keys import hash_key
        acct = self.ledger.get_account(hash_key(api_key))
        assert acct is not None
        return acct

    def check(self) -> dict[str, int]:
        return self.ledger.check_invariant()


@pytest.fixture
def money(node: NodeProcess) -> Iterator[Money]:
    m = Money(node)
    yield m
    m.check()
    m.db.close()


def err_of(exc: openai.APIStatusError) -> dict[str, Any]:
    """The spec's error object (the SDK may or may not have unwrapped `error` already)."""
    body: Any = exc.body
    return body.get("error", body) if isinstance(body, dict) else {}


def new_key(node: NodeProcess, msats: int = 10_000_000) -> str:
    status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": msats},
                            {"Authorization": f"Bearer {ADMIN}"})
    assert status == 201, doc
    return str(doc["api_key"])


def sdk(node: NodeProcess, key: str) -> OpenAI:
    return OpenAI(api_key=key, base_url=node.base_url, max_retries=0, timeout=20)


def settled(money: Money, key: str, deposit: int, charged: int) -> None:
    """The key holds exactly deposit − charged, with nothing left reserved."""
    deadline = time.monotonic() + 5
    while True:
        acct = money.account(key)
        if acct.reserved_msats == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert acct.reserved_msats == 0
    assert acct.balance_msats == deposit - charged
    assert acct.usage_msats == charged


# ---- the seed's examples, unchanged but for base URL and key ---------------------------------
def test_chat_and_history(node: NodeProcess, money: Money, upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    client = sdk(node, key)
    messages: list[dict[str, str]] = []

    def chat(user_input: str) -> str:
        messages.append({"role": "user", "content": user_input})
        response = client.chat.completions.create(model="gpt-3.5-turbo", messages=messages,
                                                  temperature=0.7, max_tokens=150)
        ai = response.choices[0].message
        messages.append({"role": "assistant", "content": ai.content or ""})
        return ai.content or ""

    assert chat("What's the weather like?") == "Hello from upstream!"
    assert chat("How should I dress?") == "Hello from upstream!"
    sent = upstream.requests[-1]
    assert sent.json()["messages"][1] == {"role": "assistant", "content": "Hello from upstream!"}
    assert sent.headers["authorization"] == "Bearer upstream-secret"
    settled(money, key, 10_000_000, 2 * cost("gpt-3.5-turbo", 12, 5))


def test_cost_headers_and_usage_cost(node: NodeProcess, money: Money) -> None:
    key = new_key(node)
    raw = sdk(node, key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}])
    completion = raw.parse()
    assert raw.headers["x-routstr-cost-msats"] == str(CHAT_COST)
    assert raw.headers["x-routstr-balance-msats"] == str(10_000_000 - CHAT_COST)
    whole, frac = divmod(CHAT_COST, 1000)
    assert raw.headers["x-routstr-cost"] == f"{whole}.{frac:03d}"
    assert raw.headers["x-routstr-balance"] == f"{(10_000_000 - CHAT_COST) // 1000}.{(10_000_000 - CHAT_COST) % 1000:03d}"
    usage = completion.usage.model_dump()  # type: ignore[union-attr]
    assert usage["cost"]["total_msats"] == CHAT_COST
    assert usage["remaining_balance_msats"] == 10_000_000 - CHAT_COST
    assert int(raw.headers["x-routstr-input-cost-msats"]) + int(raw.headers["x-routstr-output-cost-msats"]) == CHAT_COST
    settled(money, key, 10_000_000, CHAT_COST)


def test_streaming_injects_usage_and_hides_it(node: NodeProcess, money: Money,
                                              upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    client = sdk(node, key)
    stream = client.chat.completions.create(
        model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Write a short story"}],
        stream=True)
    text = ""
    for chunk in stream:
        assert chunk.choices, "the usage chunk the client did not ask for must not be passed on"
        if chunk.choices[0].delta.content is not None:
            text += chunk.choices[0].delta.content
    assert text == "Hello from upstream!"
    assert upstream.requests[-1].json()["stream_options"] == {"include_usage": True}
    # a client that asks for usage gets it, last, with the cost
    chunks = list(client.chat.completions.create(
        model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert chunks[-1].usage.model_dump()["cost"]["total_msats"] == cost("gpt-3.5-turbo", 12, 5)
    settled(money, key, 10_000_000, 2 * cost("gpt-3.5-turbo", 12, 5))


def test_function_calling(node: NodeProcess, money: Money) -> None:
    key = new_key(node)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get current weather",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["location"]}}}]
    response = sdk(node, key).chat.completions.create(
        model="gpt-4", messages=[{"role": "user", "content": "What's the weather in Tokyo?"}],
        tools=tools, tool_choice="auto")  # type: ignore[arg-type]
    call = response.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"location": "Tokyo"}  # type: ignore[union-attr]
    settled(money, key, 10_000_000, cost("gpt-4", 12, 5))


def test_embeddings_images_audio_models(node: NodeProcess, money: Money,
                                        upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    client = sdk(node, key)
    emb = client.embeddings.create(model="text-embedding-3-small",
                                   input="The quick brown fox jumps over the lazy dog")
    assert len(emb.data[0].embedding) == 8
    charged = cost("text-embedding-3-small", 8, 0)
    img = client.images.generate(model="dall-e-3", prompt="A futuristic city with flying cars",
                                 size="1024x1024", quality="standard", n=1)
    assert img.data and img.data[0].url
    charged += cost("dall-e-3", 0, 0)
    audio = io.BytesIO(b"ID3" + bytes(range(256)) * 40)
    audio.name = "audio.mp3"
    text = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format="text")
    assert "transcribed" in str(text)
    assert upstream.requests[-1].file_size == 3 + 256 * 40
    charged += cost("whisper-1", 0, 0)
    models = client.models.list()
    assert len(models.data) > 0 and any(m.id == "gpt-4o-mini" for m in models.data)
    assert cost("dall-e-3", 0, 0) > 0 and cost("whisper-1", 0, 0) > 0
    settled(money, key, 10_000_000, charged)


def test_async_client_gather(node: NodeProcess, money: Money) -> None:
    key = new_key(node)

    async def main() -> list[str]:
        client = AsyncOpenAI(api_key=key, base_url=node.base_url, max_retries=0)
        tasks = [client.chat.completions.create(model="gpt-3.5-turbo",
                                                messages=[{"role": "user", "content": m}])
                 for m in ["Hello", "How are you?", "What's 2+2?"] * 4]
        responses = await asyncio.gather(*tasks)
        await client.close()
        return [r.choices[0].message.content or "" for r in responses]

    assert asyncio.run(main()) == ["Hello from upstream!"] * 12
    settled(money, key, 10_000_000, 12 * cost("gpt-3.5-turbo", 12, 5))


# ---- failures: nothing charged, nothing left reserved ----------------------------------------
def test_insufficient_balance_402(node: NodeProcess, money: Money, upstream: ScriptedUpstream) -> None:
    key = new_key(node, 1)
    before = len(upstream.requests)
    with pytest.raises(openai.APIStatusError) as info:
        sdk(node, key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hello"}])
    assert info.value.status_code == 402
    err = err_of(info.value)
    assert err["type"] == "insufficient_balance" and err["code"] == "insufficient_balance"
    assert err["details"]["available"] == 1 and err["details"]["required"] > 1
    assert "insufficient_balance" in str(info.value)  # the seed's string match works
    assert len(upstream.requests) == before
    settled(money, key, 1, 0)


def test_x_max_cost(node: NodeProcess, money: Money, upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    before = len(upstream.requests)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    status, doc = node.json("POST", "/v1/chat/completions", body,
                            {"Authorization": f"Bearer {key}", "X-Max-Cost": "0.001"})
    assert status == 402 and doc["error"]["code"] == "max_cost_exceeded"
    assert len(upstream.requests) == before
    status, doc = node.json("POST", "/v1/chat/completions", {**body, "max_tokens": 10},
                            {"Authorization": f"Bearer {key}", "X-Max-Cost": "500"})
    assert status == 200
    assert doc["usage"]["cost"]["total_msats"] == cost("gpt-4o", 12, 5) <= 500_000
    settled(money, key, 10_000_000, cost("gpt-4o", 12, 5))


@pytest.mark.parametrize("behaviour,status", [
    (Behaviour(status=500), 502), (Behaviour(status=503), 502),
    (Behaviour(hang=True), 502), (Behaviour(fail_after_events=0), 502)])
def test_upstream_failures_charge_nothing(node: NodeProcess, money: Money, upstream: ScriptedUpstream,
                                          behaviour: Behaviour, status: int) -> None:
    key = new_key(node)
    upstream.enqueue(behaviour)
    with pytest.raises(openai.APIStatusError) as info:
        sdk(node, key).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == status
    assert err_of(info.value)["type"] == "upstream_error"
    settled(money, key, 10_000_000, 0)


def test_upstream_4xx_passes_status_and_message(node: NodeProcess, money: Money,
                                                upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    upstream.enqueue(Behaviour(status=400, json={"error": {"message": "bad temperature", "type": "invalid_request_error"}}))
    with pytest.raises(openai.BadRequestError) as info:
        sdk(node, key).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    err = err_of(info.value)
    assert err["message"] == "bad temperature" and err["details"]["upstream_status"] == 400
    settled(money, key, 10_000_000, 0)


def test_stream_failing_midway_gets_error_event_and_estimate(node: NodeProcess, money: Money,
                                                             upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    upstream.enqueue(Behaviour(fail_after_events=3, stream_chunks=["aaaa"] * 10))
    got = ""
    with pytest.raises(openai.APIError):
        for chunk in sdk(node, key).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                got += chunk.choices[0].delta.content
    assert got == "aaaa" * 2  # role chunk + two content chunks relayed before the cut
    acct = money.account(key)
    assert acct.reserved_msats == 0
    assert 0 < acct.usage_msats  # charged by estimate, not more than reserved
    assert acct.balance_msats == 10_000_000 - acct.usage_msats


def test_no_usage_charged_by_estimate(node: NodeProcess, money: Money, upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    upstream.enqueue(Behaviour(usage="omit"), Behaviour(usage="omit"))
    client = sdk(node, key)
    r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Hello from upstream!"
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert chunks
    acct = money.account(key)
    assert acct.reserved_msats == 0 and acct.usage_msats > 0
    assert "charged by estimate" in node.log_text()


def test_slow_upstream_is_waited_for(node: NodeProcess, money: Money, upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    upstream.enqueue(Behaviour(delay_s=1.0, event_delay_s=0.1))
    t0 = time.monotonic()
    chunks = list(sdk(node, key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert time.monotonic() - t0 >= 1.0 and len(chunks) >= 5
    settled(money, key, 10_000_000, CHAT_COST)


def test_client_disconnect_mid_stream_settles(node: NodeProcess, money: Money,
                                              upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    upstream.enqueue(Behaviour(stream_chunks=["word "] * 50, event_delay_s=0.1))
    closed_before = upstream.closed_connections()
    body = json.dumps({"model": "gpt-4o-mini", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    seen = b""
    while seen.count(b"data:") < 4:
        seen += s.recv(65536)
    s.close()  # the client goes away mid-stream
    assert upstream.wait_closed(closed_before + 1, timeout=5), "upstream request must be closed promptly"
    deadline = time.monotonic() + 5
    while money.account(key).reserved_msats and time.monotonic() < deadline:
        time.sleep(0.05)
    acct = money.account(key)
    assert acct.reserved_msats == 0
    assert 0 < acct.usage_msats < 10_000_000
    assert acct.balance_msats == 10_000_000 - acct.usage_msats


# ---- auth and validation ---------------------------------------------------------------------
def test_auth_and_model_errors(node: NodeProcess, upstream: ScriptedUpstream) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    status, doc = node.json("POST", "/v1/chat/completions", body)
    assert status == 401 and doc["error"]["type"] == "authentication_failed"
    assert doc["error"]["code"] == "missing_api_key"
    status, doc = node.json("POST", "/v1/chat/completions", body, {"Authorization": "Bearer sk-nope"})
    assert status == 401 and doc["error"]["code"] == "invalid_api_key"
    key = new_key(node)
    status, doc = node.json("POST", "/v1/chat/completions", {**body, "model": "no-such-model"},
                            {"Authorization": f"Bearer {key}"})
    assert status == 400 and doc["error"] == {
        "type": "invalid_request", "code": "model_not_found",
        "message": "Model 'no-such-model' not found", "details": {"model": "no-such-model"}}
    status, _, raw = node.request("POST", "/v1/chat/completions", b"{not json",
                                  {"Authorization": f"Bearer {key}"})
    assert status == 400 and json.loads(raw)["error"]["code"] == "invalid_json"


def test_without_v1_prefix(node: NodeProcess, money: Money) -> None:
    key = new_key(node)
    status, doc = node.json("POST", "/chat/completions",
                            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                            {"Authorization": f"Bearer {key}"})
    assert status == 200 and doc["choices"][0]["message"]["content"] == "Hello from upstream!"
    settled(money, key, 10_000_000, CHAT_COST)


def test_balance_and_transactions(node: NodeProcess, money: Money) -> None:
    key = new_key(node)
    sdk(node, key).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    for path in ("/v1/balance", "/v1/balance/info", "/v1/wallet/info", "/v1/wallet/"):
        status, doc = node.json("GET", path, headers={"Authorization": f"Bearer {key}"})
        assert status == 200, path
        assert doc["api_key"] == key and doc["balance"] == 10_000_000 - CHAT_COST
        assert doc["reserved"] == 0 and doc["total_spent"] == CHAT_COST and doc["total_requests"] == 1
    status, doc = node.json("GET", "/v1/transactions?limit=1", headers={"Authorization": f"Bearer {key}"})
    assert status == 200 and doc["limit"] == 1 and doc["offset"] == 0
    assert doc["total"] >= 2 and doc["has_more"] is True and len(doc["data"]) == 1


def test_no_upstream_configured_is_503(node_factory: Any) -> None:
    n = node_factory("--admin-token", ADMIN)
    key = new_key(n)
    status, doc = n.json("POST", "/v1/chat/completions",
                         {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                         {"Authorization": f"Bearer {key}"})
    assert status == 503 and doc["error"]["code"] == "upstream_not_configured"


def test_azure_api_version(node_factory: Any, upstream: ScriptedUpstream) -> None:
    n = node_factory("--admin-token", ADMIN, "--upstream-base-url", upstream.url,
                     "--chat-completions-api-version", "2024-05-01-preview")
    key = new_key(n)
    sdk(n, key).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert upstream.requests[-1].path.endswith("/chat/completions")
    assert "api-version=2024-05-01-preview" in upstream.requests[-1].query
    sdk(n, key).embeddings.create(model="text-embedding-3-small", input="x")
    assert "api-version" not in upstream.requests[-1].query


def test_socks5_upstream_with_remote_dns(node_factory: Any, upstream: ScriptedUpstream) -> None:
    with Socks5Server({"upstream.onion": ("127.0.0.1", upstream.port)}) as socks:
        n = node_factory("--admin-token", ADMIN, "--upstream-base-url", "http://upstream.onion/v1",
                         "--upstream-proxy", socks.url)
        key = new_key(n)
        r = sdk(n, key).chat.completions.create(model="gpt-4o-mini",
                                                messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "Hello from upstream!"
        assert "upstream.onion" in socks.requested_hosts


def test_keys_never_in_clear(node: NodeProcess, money: Money) -> None:
    key = new_key(node)
    sdk(node, key).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    money.db.close()
    for path in Path(node.database).parent.glob("node.sqlite3*"):
        assert key.encode() not in path.read_bytes()
    assert key not in node.log_text()
    money.db = Database(node.database)
    money.ledger = Ledger(money.db)
