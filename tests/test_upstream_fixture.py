"""The scripted upstream (tests/support/upstream.py), checked with the real `openai` SDK.

If the official client parses what the fixture sends, proxy tests built on the fixture exercise
the node against the shapes real clients and upstreams use.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.support.upstream import Behaviour, ScriptedUpstream, _parse_multipart

MESSAGES: Any = [{"role": "user", "content": "What is the weather in Tokyo?"}]
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}},
                "required": ["location"],
            },
        },
    }
]


@pytest.fixture
def up() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server
        assert server.errors == []


@pytest.fixture
def client(up: ScriptedUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=up.url, api_key="sk-test", max_retries=0, timeout=10) as c:
        yield c


def test_url_shape(up: ScriptedUpstream) -> None:
    assert up.url == f"http://127.0.0.1:{up.port}/v1"
    assert up.base_url == f"http://127.0.0.1:{up.port}"


# ---------------------------------------------------------------------------------------------
# default answers through the SDK


def test_chat_completion(up: ScriptedUpstream, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert r.object == "chat.completion" and r.model == "gpt-4o-mini"
    assert r.choices[0].message.content == "Hello from upstream!"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (12, 5, 17)
    [seen] = up.requests
    assert (seen.method, seen.path, seen.query) == ("POST", "/v1/chat/completions", "")
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert seen.json()["messages"] == MESSAGES


def test_chat_stream_without_usage(up: ScriptedUpstream, client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="m-1", messages=MESSAGES, stream=True))
    assert [c.choices[0].delta.content for c in chunks] == [
        "",
        "Hello",
        " from",
        " up",
        "stream",
        "!",
        None,
    ]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None and c.model == "m-1" for c in chunks)
    assert up.connection_count() == 1


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    *content, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.total_tokens == 17
    assert "".join(c.choices[0].delta.content or "" for c in content) == "Hello from upstream!"


def test_chat_tools(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Tokyo"}


def test_chat_tools_streamed(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model="m", messages=MESSAGES, tools=TOOLS) as stream:
        for _event in stream:
            pass
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Tokyo"}
    assert final.choices[0].finish_reason == "tool_calls"


def test_legacy_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hello")
    assert r.object == "text_completion" and r.choices[0].text == "Hello from upstream!"
    assert r.usage is not None and r.usage.total_tokens == 17
    chunks = list(
        client.completions.create(
            model="x", prompt="hi", stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello from upstream!"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_embeddings(up: ScriptedUpstream, client: openai.OpenAI) -> None:
    r = client.embeddings.create(model="text-embedding-3-small", input=["one", "two", "three"])
    assert up.requests[-1].json()["encoding_format"] == "base64"  # what the SDK asks for
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(len(d.embedding) == 8 for d in r.data)
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (8, 8)
    floats = client.embeddings.create(model="e", input="one", encoding_format="float")
    assert len(floats.data) == 1
    assert floats.data[0].embedding == pytest.approx(r.data[0].embedding, abs=1e-6)


def test_images(client: openai.OpenAI) -> None:
    r = client.images.generate(model="dall-e-3", prompt="a red cat")
    assert r.data is not None and r.data[0].url == "https://example.invalid/img.png"
    assert r.data[0].revised_prompt == "a red cat"
    assert r.usage is None


def test_audio_transcription(up: ScriptedUpstream, client: openai.OpenAI) -> None:
    audio = bytes(range(256)) * 10 + b"\r\n--not-a-boundary\r\n"
    r = client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", audio))
    assert r.text == f"transcribed {len(audio)} bytes"
    seen = up.requests[-1]
    assert seen.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert seen.form["model"] == "whisper-1"
    assert seen.files["file"] == ("clip.wav", audio) and seen.file_size == len(audio)
    text = client.audio.transcriptions.create(
        model="whisper-1", file=("clip.wav", b"abc"), response_format="text"
    )
    assert text == "transcribed 3 bytes"


def test_models_and_moderations(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert "gpt-4o-mini" in ids and "whisper-1" in ids
    r = client.moderations.create(input=["fine", "also fine"])
    assert len(r.results) == 2 and not r.results[0].flagged


def test_responses_api(client: openai.OpenAI) -> None:
    r = client.responses.create(model="gpt-4o", input="Hello?")
    assert r.object == "response" and r.status == "completed"
    assert r.output_text == "Hello from upstream!"
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (12, 5, 17)


def test_responses_api_streamed(up: ScriptedUpstream, client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="gpt-4o", input="Hello?", stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 5
    assert "response.output_text.done" in types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.usage is not None and completed.response.usage.total_tokens == 17
    # the SDK's accumulating helper rebuilds the same response from the events
    up.enqueue(Behaviour(stream_chunks=["Hi", " there"]))
    with client.responses.stream(model="gpt-4o", input="Hello?") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["Hi", " there"] and final.output_text == "Hi there"
    assert final.usage is not None and final.usage.output_tokens == 5


def test_unknown_path_is_openai_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.get("/nope", cast_to=object)
    assert info.value.status_code == 404
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "unknown_url"


# ---------------------------------------------------------------------------------------------
# scripted behaviours


def test_error_status_and_json_override(up: ScriptedUpstream, client: openai.OpenAI) -> None:
    up.enqueue(
        Behaviour(status=429, headers=[("retry-after", "7")]),
        Behaviour(status=400, json={"error": {"message": "bad thing", "type": "x", "code": "y"}}),
        Behaviour(status=503),
        Behaviour(json={"whatever": True}),
    )
    with pytest.raises(openai.RateLimitError) as rate:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert rate.value.response.headers["retry-after"] == "7"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert "bad thing" in str(bad.value)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    assert json.loads(raw.http_response.content) == {"whatever": True}
    assert up.pending_behaviours() == 0 and len(up.requests) == 4


def test_usage_override_and_omit(up: ScriptedUpstream, client: openai.OpenAI) -> None:
    custom = {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}
    up.enqueue(Behaviour(usage=custom), Behaviour(usage="omit"), Behaviour(usage="omit"))
    assert client.chat.completions.create(model="m", messages=MESSAGES).usage.total_tokens == 150  # type: ignore[union-attr]
    assert client.chat.completions.create(model="m", messages=MESSAGES).usage is None
    chunks = list(
        client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.usage is None for c in chunks) and chunks[-1].choices


def test_stream_chunks_and_raw_body(up: ScriptedUpstream, client: openai.OpenAI) -> None:
    up.enqueue(
        Behaviour(stream_chunks=["a", "b", "c"]),
        Behaviour(stream_chunks=["x", "y"]),
        Behaviour(body=b'data: {"id":"raw","object":"chat.completion.chunk","created":1,'
                  b'"model":"m","choices":[]}\r\n\r\n: comment\n\ndata: [DONE]\n\n'),
    )  # fmt: skip
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert [c.choices[0].delta.content for c in stream][1:-1] == ["a", "b", "c"]
    r = client.chat.completions.create(model="m", messages=MESSAGES)
    assert r.choices[0].message.content == "xy"
    raw = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert [c.id for c in raw] == ["raw"]


def test_delays(up: ScriptedUpstream, client: openai.OpenAI) -> None:
    up.enqueue(Behaviour(delay_s=0.3), Behaviour(event_delay_s=0.1))
    started = time.monotonic()
    client.chat.completions.create(model="m", messages=MESSAGES)
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    first = next(iter(stream))
    first_at = time.monotonic() - started
    list(stream)
    assert first.choices[0].delta.role == "assistant"
    assert first_at < 0.3 and time.monotonic() - started >= 0.7  # 8 gaps of 0.1 s


def test_fail_after_events(up: ScriptedUpstream, client: openai.OpenAI) -> None:
    up.enqueue(Behaviour(fail_after_events=3), Behaviour(fail_after_events=0))
    got = []
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
            got.append(chunk)
    assert len(got) == 3
    with pytest.raises(openai.APIConnectionError):  # non-streamed: head, half the body, close
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert up.closed_connections() == 0  # the server cut these, not the client


def test_hang_until_the_client_goes_away(up: ScriptedUpstream) -> None:
    up.enqueue(Behaviour(hang=True))
    with openai.OpenAI(base_url=up.url, api_key="k", max_retries=0, timeout=0.5) as c:
        started = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            c.chat.completions.create(model="m", messages=MESSAGES)
        assert time.monotonic() - started < 3
    assert up.wait_closed(1, timeout=3)
    assert len(up.requests) == 1


def test_closed_connections_counts_client_disconnects_mid_stream(up: ScriptedUpstream) -> None:
    up.enqueue(Behaviour(event_delay_s=0.5, stream_chunks=["x"] * 20))
    with openai.OpenAI(base_url=up.url, api_key="k", max_retries=0) as c:
        stream = c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        next(iter(stream))
        started = time.monotonic()
        stream.close()
    assert up.wait_closed(1, timeout=3)
    assert time.monotonic() - started < 1.0  # noticed at once, not at the next write


def test_keep_alive_and_connection_counts(up: ScriptedUpstream) -> None:
    with socket.create_connection(("127.0.0.1", up.port)) as s:
        for _ in range(3):
            s.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
            data = b""
            while b'"object": "list"' not in data or not data.endswith(b"]}"):
                data += s.recv(65536)
            assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert up.connection_count() == 1
    assert up.wait_closed(1, timeout=3)


def test_threads_can_share_the_fixture(up: ScriptedUpstream) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with openai.OpenAI(base_url=up.url, api_key="k", max_retries=0) as c:
                for _ in range(5):
                    c.chat.completions.create(model="m", messages=MESSAGES)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(up.requests) == 30


def test_https_variant_urls(tmp_path: Any) -> None:
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with ScriptedUpstream(ssl_context=ctx, url_host="localhost") as server:
        assert server.url == f"https://localhost:{server.port}/v1"


def test_multipart_parser() -> None:
    body = (
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="model"\r\n\r\n'
        b"whisper-1\r\n"
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="file"; filename="a.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
        b"\r\n--XY is not the boundary\r\n\x00\xff\r\n"
        b"--XyZ--\r\n"
    )
    form, files = _parse_multipart('multipart/form-data; boundary="XyZ"', body)
    assert form == {"model": "whisper-1"}
    assert files == {"file": ("a.bin", b"\r\n--XY is not the boundary\r\n\x00\xff")}
    with pytest.raises(ValueError):
        _parse_multipart("multipart/form-data", body)
    with pytest.raises(ValueError):
        _parse_multipart("multipart/form-data; boundary=XyZ", body.replace(b"--XyZ--", b""))
