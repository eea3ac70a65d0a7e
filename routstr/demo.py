"""`--demo`: a built-in upstream so a first start can serve before there is an upstream account.

It is a real upstream, not a shortcut through the node: an OpenAI-compatible server on a free
127.0.0.1 port, run by this process with the node's own HTTP server, and the node is configured
to forward to it. Requests are reserved, forwarded, metered from the usage it reports and
settled like any other, so keys, Cashu payments, streaming and the dashboard can be seen working.

Its one model, `demo-echo`, answers with the last user message echoed back (it is not an LLM),
counts one token per word, streams word by word and is priced in msats (no BTC/USD rate needed).
It is labelled as a demo in `/v1/models`, the start-up log, `/health` and the dashboard.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import anyio

from .errors import InvalidRequest, NotFound
from .messages import Request, Response, json_response
from .pricing import ModelPrice
from .router import Route, Router

MODEL: Final = "demo-echo"
MAX_ECHO_WORDS: Final = 200  # its most output tokens: the ceiling of a request is honest
OWNER: Final = "routstr-demo"
PRICE: Final = ModelPrice(
    id=MODEL, input_msats_per_1k=10_000, output_msats_per_1k=20_000, request_msats=0,
    max_output_tokens=MAX_ECHO_WORDS, context_length=8192, name="Demo echo (not an LLM)",
    description="Built-in demo (--demo): echoes your last message back, one token per word."
                " Start with --upstream-base-url for real models.",
    owned_by=OWNER)
WORD_DELAY_S: Final = 0.02  # so a stream is seen arriving word by word


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(p["text"] for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _words(text: str) -> list[str]:
    return text.split()


def _reply(prompt: str, max_tokens: Any) -> list[str]:
    limit = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else MAX_ECHO_WORDS
    return (["Echo:", *_words(prompt)] if prompt.strip() else ["Echo:", "(nothing)"])[
        :min(limit, MAX_ECHO_WORDS)]


def _usage(prompt_tokens: int, words: list[str]) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words)}


def _model_of(body: dict[str, Any]) -> str:
    if body.get("model") != MODEL:
        raise NotFound(f"The demo upstream serves only '{MODEL}'", code="model_not_found")
    return MODEL


async def chat(request: Request, params: dict[str, str]) -> Response:
    body = request.json_object()
    model = _model_of(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", code="invalid_request")
    texts = [_text(m.get("content")) if isinstance(m, dict) else "" for m in messages]
    last_user = next((t for m, t in zip(reversed(messages), reversed(texts), strict=True)
                      if isinstance(m, dict) and m.get("role") == "user"), "")
    prompt_tokens = sum(len(_words(t)) + 1 for t in texts)
    words = _reply(last_user, body.get("max_completion_tokens", body.get("max_tokens")))
    ident = f"chatcmpl-demo{time.monotonic_ns()}"
    head = {"id": ident, "created": int(time.time()), "model": model}
    if body.get("stream") is True:
        opts = body.get("stream_options")
        with_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        return _stream(head, words, _usage(prompt_tokens, words) if with_usage else None)
    return json_response({
        **head, "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": " ".join(words)}}],
        "usage": _usage(prompt_tokens, words)})


def _stream(head: dict[str, Any], words: list[str], usage: dict[str, int] | None) -> Response:
    def event(doc: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps({**head, "object": "chat.completion.chunk", **doc},
                                      separators=(",", ":")).encode() + b"\n\n"

    async def events() -> AsyncIterator[bytes]:
        yield event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i, word in enumerate(words):
            await anyio.sleep(WORD_DELAY_S)
            yield event({"choices": [{"index": 0, "delta": {
                "content": word if i == 0 else " " + word}}]})
        yield event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if usage is not None:
            yield event({"choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    return Response(200, [("content-type", "text/event-stream")], stream=_Events(events()))


class _Events:
    def __init__(self, gen: AsyncIterator[bytes]) -> None:
        self._gen = gen

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._gen

    async def aclose(self) -> None:
        await self._gen.aclose()  # type: ignore[attr-defined]


async def models(request: Request, params: dict[str, str]) -> Response:
    return json_response({"object": "list", "data": [
        {"id": MODEL, "object": "model", "created": 0, "owned_by": OWNER}]})


def app() -> Callable[[Request], Awaitable[Response]]:
    """The demo upstream's handler (served by `server.Server` on 127.0.0.1)."""
    router = Router([Route("GET", "/v1/models", models),
                     Route("POST", "/v1/chat/completions", chat)])

    async def handle(request: Request) -> Response:
        try:
            handler, params = router.resolve(request.method, request.path)
        except NotFound as exc:
            raise NotFound(f"The demo upstream serves only chat completions with '{MODEL}'",
                           code="not_found") from exc
        return await handler(request, params)

    return handle
