"""A scripted OpenAI-compatible upstream: a real HTTP/1.1 server (h11) on 127.0.0.1:0.

It runs in a background thread with its own anyio event loop, so sync tests (the `openai` SDK)
and async tests (the node under test, in the test's loop) can both talk to it over real sockets::

    with ScriptedUpstream() as up:
        up.enqueue(Behaviour(status=429), Behaviour(stream_chunks=["a", "b"], event_delay_s=0.1))
        ...  # point the code under test at up.url ("http://127.0.0.1:PORT/v1")
        assert up.requests[0].json()["model"] == "gpt-4o-mini"

Every request consumes the next enqueued `Behaviour` (FIFO) or, when none is queued, the default
`Behaviour()`. Default answers are deterministic and OpenAI-shaped (see `_Routes`):

* ``POST /v1/chat/completions``: "Hello from upstream!", usage 12/5/17; with ``tools`` a
  ``tool_calls`` answer calling the first tool with ``{"location": "Tokyo"}``. ``stream: true``:
  role chunk, content pieces, finish chunk, a usage chunk (``choices: []``) only when
  ``stream_options.include_usage`` is true (and then every chunk carries ``"usage": null`` as
  OpenAI does), then ``data: [DONE]``. The request's ``model`` is echoed.
* ``POST /v1/completions``, ``/v1/embeddings`` (8-dim vectors, float or base64; usage 8/8),
  ``/v1/images/generations`` (no usage), ``/v1/audio/transcriptions`` (multipart parsed; JSON
  ``{"text": "transcribed N bytes"}`` or text/plain for ``response_format=text``),
  ``GET /v1/models``, ``POST /v1/moderations``.
* ``POST /v1/responses``: a ``response`` object (output_text "Hello from upstream!", usage
  input 12 / output 5 / total 17). Streamed as OpenAI does, each event ``event: <type>`` +
  ``data: <json>``: response.created, response.in_progress, response.output_item.added,
  response.content_part.added, response.output_text.delta ×N, response.output_text.done,
  response.content_part.done, response.output_item.done, response.completed (the full response
  with usage). No ``[DONE]`` (OpenAI sends none on this API).
* ``POST /v1/messages`` (Anthropic's Messages API): a ``message`` (text "Hello from upstream!",
  usage input 12 / output 5, cache counts 0); streamed as Anthropic does, ``event: <type>`` +
  ``data: <json>``: message_start (input tokens), content_block_start, content_block_delta ×N,
  content_block_stop, message_delta (output tokens), message_stop. ``POST
  /v1/messages/count_tokens``: ``{"input_tokens": 12}``.
* Anything else: 404 with an OpenAI-style error body.

`closed_connections()` counts connections the *client* closed (EOF/reset seen by the server,
including while a response is delayed, hanging or streaming: the server watches the socket while it
answers), so disconnect tests can prove the upstream was let go; `wait_closed(n)` waits for it.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import re
import struct
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal
from urllib.parse import parse_qsl

import anyio
import anyio.from_thread
import h11
import pytest
from anyio.abc import ByteStream, Listener, SocketAttribute
from anyio.streams.tls import TLSListener

CREATED = 1_700_000_000
DEFAULT_TEXT = "Hello from upstream!"
DEFAULT_PIECES = ["Hello", " from", " up", "stream", "!"]
CHAT_USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
EMBEDDING_USAGE = {"prompt_tokens": 8, "total_tokens": 8}
RESPONSES_USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 5,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 17,
}
MESSAGES_USAGE = {
    "input_tokens": 12,
    "output_tokens": 5,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
}
MODELS = [
    "gpt-4o-mini",
    "gpt-4o",
    "text-embedding-3-small",
    "dall-e-3",
    "whisper-1",
    "omni-moderation-latest",
]
_IO_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)


@dataclass
class Behaviour:
    """One scripted answer. Fields left at their defaults give the default OpenAI answer.

    * `status`: the HTTP status; >= 400 without `json`/`body` sends an OpenAI-style error body.
    * `json` / `body`: replace the whole body (JSON document / raw bytes). A raw `body` answering a
      ``stream: true`` request (or with a text/event-stream content-type in `headers`) is streamed
      chunked, split at blank lines, so `event_delay_s` and `fail_after_events` still apply.
    * `headers`: extra response headers (a content-type here overrides ours).
    * `delay_s`: sleep before the response head. `event_delay_s`: sleep between SSE events.
    * `usage`: None = the default usage, a dict = this usage, "omit" = no usage anywhere.
    * `stream_chunks`: the content pieces (default 5); their concatenation is also the
      non-streamed content.
    * `fail_after_events`: close the socket abruptly after N SSE events (non-streamed answers:
      after the head and half the body).
    * `hang`: read the request, never answer, until the client goes away or the server stops.
    """

    status: int = 200
    json: object | None = None
    body: bytes | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay_s: float = 0.0
    usage: dict[str, Any] | None | Literal["omit"] = None
    stream_chunks: list[str] | None = None
    event_delay_s: float = 0.0
    fail_after_events: int | None = None
    hang: bool = False


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    form: dict[str, str] = field(default_factory=dict)  # multipart text fields
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # name -> (filename, data)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def file_size(self) -> int | None:
        """Size of the first uploaded file (multipart), if any."""
        for _name, (_filename, data) in self.files.items():
            return len(data)
        return None


# ---------------------------------------------------------------------------------------------
# A background anyio server (shared with tests/support/socks5.py)


class _QuietTLSListener(TLSListener):
    @staticmethod
    async def handle_handshake_error(exc: BaseException, stream: Any) -> None:
        await anyio.aclose_forcefully(stream)
        if not isinstance(exc, Exception):
            raise exc


class BackgroundServer:
    """Serves `handle(stream)` for every connection to 127.0.0.1:port in a thread of its own."""

    def __init__(self, ssl_context: Any = None) -> None:
        self._ssl_context = ssl_context
        self.port = 0
        self.errors: list[BaseException] = []  # unexpected handler errors, for assertions
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._accepted = 0
        self._closed_by_client = 0
        self._portal_cm: Any = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._future: concurrent.futures.Future[None] | None = None
        self._scope: anyio.CancelScope | None = None
        self._listener: Listener[Any] | None = None

    async def handle(self, stream: ByteStream) -> None:
        raise NotImplementedError

    # -- lifecycle --

    def start(self) -> None:
        self._portal_cm = anyio.from_thread.start_blocking_portal("asyncio")
        self._portal = self._portal_cm.__enter__()
        self.port = self._portal.call(self._open)
        self._future = self._portal.start_task_soon(self._serve)

    def stop(self) -> None:
        if self._portal is None:
            return
        portal, self._portal = self._portal, None
        try:
            portal.call(self._cancel)
            assert self._future is not None
            try:
                self._future.result(timeout=10)
            except concurrent.futures.CancelledError:
                pass
        finally:
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    async def _open(self) -> int:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port: int = listener.extra(SocketAttribute.local_port)
        self._listener = listener
        if self._ssl_context is not None:
            self._listener = _QuietTLSListener(
                listener, self._ssl_context, standard_compatible=False
            )
        return port

    async def _cancel(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def _serve(self) -> None:
        assert self._listener is not None
        with anyio.CancelScope() as scope:
            self._scope = scope
            async with self._listener:
                await self._listener.serve(self._guarded)

    async def _guarded(self, stream: ByteStream) -> None:
        with self._lock:
            self._accepted += 1
            self._changed.notify_all()
        try:
            await self.handle(stream)
        except Exception as exc:  # a bug in the fixture: keep serving, let tests see it
            self.errors.append(exc)
        finally:
            await anyio.aclose_forcefully(stream)

    # -- counters (thread-safe) --

    def note_closed_by_client(self) -> None:
        with self._lock:
            self._closed_by_client += 1
            self._changed.notify_all()

    def connection_count(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._accepted

    def closed_connections(self) -> int:
        """Connections the client closed (EOF or reset seen by the server)."""
        with self._lock:
            return self._closed_by_client

    def wait_closed(self, n: int = 1, timeout: float = 5.0) -> bool:
        """Block until at least `n` connections were closed by the client (False on timeout)."""
        with self._lock:
            return self._changed.wait_for(lambda: self._closed_by_client >= n, timeout)


# ---------------------------------------------------------------------------------------------
# HTTP plumbing


class _ClientGone(Exception):
    pass


class _Abort(Exception):
    """The script wants the connection cut right now."""


class _HttpConn:
    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=256 * 1024)
        self.pending: list[bytes] = []  # bytes read by the disconnect watcher

    async def next_event(self) -> Any:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise _ClientGone() from exc
            if event is not h11.NEED_DATA:
                return event
            if self.pending:
                self.h11.receive_data(self.pending.pop(0))
                continue
            try:
                data = await self.stream.receive(65536)
            except _IO_ERRORS:
                data = b""
            self.h11.receive_data(data)

    async def send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            try:
                await self.stream.send(data)
            except _IO_ERRORS as exc:
                raise _ClientGone() from exc

    async def watching_disconnect(self, respond: Callable[[], Awaitable[None]]) -> None:
        """Run `respond()` while watching the socket; raise _ClientGone if the client leaves."""
        gone = False
        failure: BaseException | None = None
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal gone
                while True:
                    try:
                        data = await self.stream.receive(65536)
                    except _IO_ERRORS:
                        data = b""
                    if not data:
                        gone = True
                        tg.cancel_scope.cancel()
                        return
                    self.pending.append(data)  # a pipelined request: keep for later

            tg.start_soon(watch)
            try:
                await respond()
            except Exception as exc:  # _ClientGone / _Abort: re-raised outside the group
                failure = exc
            tg.cancel_scope.cancel()
        if gone:
            raise _ClientGone()
        if failure is not None:
            raise failure


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, Any]]:
    """multipart/form-data (RFC 7578) -> (text fields, {name: (filename, bytes)})."""
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise ValueError("multipart body without a boundary")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    sections = (b"\r\n" + body).split(delimiter)
    if len(sections) < 3 or not sections[-1].startswith(b"--"):
        raise ValueError("multipart body without its closing delimiter")
    form: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    for section in sections[1:-1]:
        if not section.startswith(b"\r\n"):
            raise ValueError("malformed multipart delimiter line")
        head, sep, content = section[2:].partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("multipart part without a blank line after its headers")
        name = filename = None
        for line in head.decode("utf-8").split("\r\n"):
            hname, _, hvalue = line.partition(":")
            if hname.strip().lower() != "content-disposition":
                continue
            for param in hvalue.split(";")[1:]:
                key, _, value = param.strip().partition("=")
                value = value.strip().strip('"')
                if key.lower() == "name":
                    name = value
                elif key.lower() == "filename":
                    filename = value
        if name is None:
            raise ValueError("multipart part without a name")
        if filename is not None:
            files[name] = (filename, content)
        else:
            form[name] = content.decode("utf-8")
    return form, files


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _error_doc(message: str, type_: str, code: str | None, param: str | None = None) -> Any:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _status_error_doc(status: int) -> Any:
    type_ = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return _error_doc(f"Scripted upstream error {status}", type_, str(status))


def _sse(doc: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(doc, separators=(',', ':'))}\n\n".encode()


_DONE = b"data: [DONE]\n\n"
_SSE_BLOCK = re.compile(rb".*?(?:\r\n\r\n|\n\n|\r\r)|.+", re.S)


@dataclass
class _Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    events: list[bytes] | None = None  # SSE: sent chunked, one event per write

    @classmethod
    def of_json(cls, doc: Any, status: int = 200) -> _Reply:
        return cls(status, json.dumps(doc).encode())


# ---------------------------------------------------------------------------------------------
# The OpenAI-compatible routes


class _Routes:
    """Default answers. Each handler gets (request, parsed JSON or None, behaviour, sequence)."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, str], Callable[..., _Reply]] = {
            ("POST", "/v1/chat/completions"): self.chat,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/embeddings"): self.embeddings,
            ("POST", "/v1/images/generations"): self.images,
            ("POST", "/v1/audio/transcriptions"): self.transcriptions,
            ("GET", "/v1/models"): self.models,
            ("POST", "/v1/moderations"): self.moderations,
            ("POST", "/v1/responses"): self.responses,
            ("POST", "/v1/messages"): self.messages,
            ("POST", "/v1/messages/count_tokens"): self.count_tokens,
        }
        self.paths = {path for _method, path in self.table}

    def answer(self, req: RecordedRequest, b: Behaviour, seq: int) -> _Reply:
        handler = self.table.get((req.method, req.path))
        if handler is None:
            if req.path in self.paths:
                return _Reply.of_json(
                    _error_doc(f"Method {req.method} not allowed", "invalid_request_error", None),
                    405,
                )
            return _Reply.of_json(
                _error_doc(
                    f"Unknown request URL: {req.method} {req.path}. Please check the URL "
                    "for typos, or see the docs at https://platform.openai.com/docs/api-reference/.",
                    "invalid_request_error",
                    "unknown_url",
                ),
                404,
            )
        doc: Any = None
        if req.method == "POST" and not req.path.endswith("/transcriptions"):
            try:
                doc = json.loads(req.body)
            except ValueError:
                return _Reply.of_json(
                    _error_doc(
                        "We could not parse the JSON body of your request.",
                        "invalid_request_error",
                        None,
                    ),
                    400,
                )
            if not isinstance(doc, dict):
                return _Reply.of_json(
                    _error_doc("The body must be a JSON object.", "invalid_request_error", None),
                    400,
                )
        return handler(req, doc, b, seq)

    @staticmethod
    def _usage(b: Behaviour, default: dict[str, Any]) -> dict[str, Any] | None:
        if b.usage == "omit":
            return None
        if isinstance(b.usage, dict):
            return b.usage
        return dict(default)

    @staticmethod
    def _pieces(b: Behaviour) -> list[str]:
        return list(b.stream_chunks) if b.stream_chunks is not None else list(DEFAULT_PIECES)

    @staticmethod
    def _include_usage(doc: dict[str, Any]) -> bool:
        options = doc.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    @staticmethod
    def _first_tool(doc: dict[str, Any]) -> str | None:
        tools = doc.get("tools")
        if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
            return None
        fn = tools[0].get("function")
        name = fn.get("name") if isinstance(fn, dict) else tools[0].get("name")
        return name if isinstance(name, str) else "tool"

    # -- chat --

    def chat(self, req: RecordedRequest, doc: dict[str, Any], b: Behaviour, seq: int) -> _Reply:
        model = doc.get("model") or "gpt-4o-mini"
        cid = f"chatcmpl-scripted{seq}"
        usage = self._usage(b, CHAT_USAGE)
        tool = self._first_tool(doc)
        call_id = f"call_scripted{seq}"
        arguments = json.dumps({"location": "Tokyo"})
        if doc.get("stream"):
            include_usage = self._include_usage(doc)
            base: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "system_fingerprint": "fp_scripted",
            }

            def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
                out = {
                    **base,
                    "choices": [
                        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                    ],
                }
                if include_usage:
                    out["usage"] = None
                return _sse(out)

            events = [chunk({"role": "assistant", "content": "", "refusal": None})]
            if tool is not None:
                events.append(
                    chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": call_id,
                                    "type": "function",
                                    "function": {"name": tool, "arguments": ""},
                                }
                            ]
                        }
                    )
                )
                for part in (arguments[:12], arguments[12:]):
                    events.append(
                        chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
                    )
                events.append(chunk({}, "tool_calls"))
            else:
                events.extend(chunk({"content": piece}) for piece in self._pieces(b))
                events.append(chunk({}, "stop"))
            if include_usage and usage is not None:
                events.append(_sse({**base, "choices": [], "usage": usage}))
            events.append(_DONE)
            return _Reply(events=events, content_type="text/event-stream")

        if tool is not None:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": tool, "arguments": arguments},
                    }
                ],
            }
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": "".join(self._pieces(b)), "refusal": None}
            finish = "stop"
        out: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_scripted",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
        }
        if usage is not None:
            out["usage"] = usage
        return _Reply.of_json(out)

    # -- legacy completions --

    def completions(
        self, req: RecordedRequest, doc: dict[str, Any], b: Behaviour, seq: int
    ) -> _Reply:
        model = doc.get("model") or "gpt-3.5-turbo-instruct"
        base: dict[str, Any] = {
            "id": f"cmpl-scripted{seq}",
            "object": "text_completion",
            "created": CREATED,
            "model": model,
        }
        usage = self._usage(b, CHAT_USAGE)
        if doc.get("stream"):
            pieces = self._pieces(b)
            events = [
                _sse(
                    {
                        **base,
                        "choices": [
                            {
                                "text": piece,
                                "index": 0,
                                "logprobs": None,
                                "finish_reason": "stop" if i == len(pieces) - 1 else None,
                            }
                        ],
                    }
                )
                for i, piece in enumerate(pieces)
            ]
            if self._include_usage(doc) and usage is not None:
                events.append(_sse({**base, "choices": [], "usage": usage}))
            events.append(_DONE)
            return _Reply(events=events, content_type="text/event-stream")
        out = {
            **base,
            "choices": [
                {
                    "text": "".join(self._pieces(b)),
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
        }
        if usage is not None:
            out["usage"] = usage
        return _Reply.of_json(out)

    # -- embeddings --

    def embeddings(
        self, req: RecordedRequest, doc: dict[str, Any], b: Behaviour, seq: int
    ) -> _Reply:
        raw = doc.get("input")
        if isinstance(raw, str):
            inputs: list[Any] = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
            inputs = [raw]  # one input given as token ids
        elif isinstance(raw, list) and raw:
            inputs = raw
        else:
            return _Reply.of_json(
                _error_doc("'input' is required", "invalid_request_error", None, "input"), 400
            )
        as_base64 = doc.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            digest = hashlib.sha256(json.dumps(item).encode()).digest()
            vector = [round((digest[i] - 128) / 128, 4) for i in range(8)]
            embedding: Any = vector
            if as_base64:
                embedding = base64.b64encode(struct.pack("<8f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        out: dict[str, Any] = {
            "object": "list",
            "data": data,
            "model": doc.get("model") or "text-embedding-3-small",
        }
        usage = self._usage(b, EMBEDDING_USAGE)
        if usage is not None:
            out["usage"] = usage
        return _Reply.of_json(out)

    # -- images --

    def images(self, req: RecordedRequest, doc: dict[str, Any], b: Behaviour, seq: int) -> _Reply:
        n = doc["n"] if isinstance(doc.get("n"), int) else 1
        prompt = doc.get("prompt") or ""
        item: dict[str, Any] = {"revised_prompt": prompt}
        if doc.get("response_format") == "b64_json":
            item["b64_json"] = base64.b64encode(b"scripted image").decode()
        else:
            item["url"] = "https://example.invalid/img.png"
        out: dict[str, Any] = {"created": CREATED, "data": [dict(item) for _ in range(n)]}
        if isinstance(b.usage, dict):
            out["usage"] = b.usage
        return _Reply.of_json(out)

    # -- audio --

    def transcriptions(self, req: RecordedRequest, doc: Any, b: Behaviour, seq: int) -> _Reply:
        if "file" not in req.files:
            return _Reply.of_json(
                _error_doc("'file' is required", "invalid_request_error", None, "file"), 400
            )
        text = f"transcribed {len(req.files['file'][1])} bytes"
        fmt = req.form.get("response_format", "json")
        if fmt in ("text", "srt", "vtt"):
            return _Reply(body=text.encode(), content_type="text/plain; charset=utf-8")
        out: dict[str, Any] = {"text": text}
        if fmt == "verbose_json":
            out.update({"task": "transcribe", "language": "english", "duration": 1.0})
        if isinstance(b.usage, dict):
            out["usage"] = b.usage
        return _Reply.of_json(out)

    # -- models / moderations --

    def models(self, req: RecordedRequest, doc: Any, b: Behaviour, seq: int) -> _Reply:
        data = [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "scripted"} for m in MODELS
        ]
        return _Reply.of_json({"object": "list", "data": data})

    def moderations(
        self, req: RecordedRequest, doc: dict[str, Any], b: Behaviour, seq: int
    ) -> _Reply:
        raw = doc.get("input")
        inputs = raw if isinstance(raw, list) else [raw]
        categories = [
            "harassment",
            "harassment/threatening",
            "hate",
            "hate/threatening",
            "illicit",
            "illicit/violent",
            "self-harm",
            "self-harm/instructions",
            "self-harm/intent",
            "sexual",
            "sexual/minors",
            "violence",
            "violence/graphic",
        ]
        result = {
            "flagged": False,
            "categories": dict.fromkeys(categories, False),
            "category_scores": dict.fromkeys(categories, 0.0001),
            "category_applied_input_types": {c: ["text"] for c in categories},
        }
        return _Reply.of_json(
            {
                "id": f"modr-scripted{seq}",
                "model": doc.get("model") or "omni-moderation-latest",
                "results": [dict(result) for _ in inputs],
            }
        )

    # -- Responses API --

    def responses(
        self, req: RecordedRequest, doc: dict[str, Any], b: Behaviour, seq: int
    ) -> _Reply:
        rid = f"resp_scripted{seq}"
        mid = f"msg_scripted{seq}"
        pieces = self._pieces(b)
        text = "".join(pieces)
        usage = self._usage(b, RESPONSES_USAGE)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        message = {
            "id": mid,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }

        def response(status: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "response",
                "created_at": CREATED,
                "status": status,
                "background": False,
                "error": None,
                "incomplete_details": None,
                "instructions": doc.get("instructions"),
                "max_output_tokens": doc.get("max_output_tokens"),
                "model": doc.get("model") or "gpt-4o-mini",
                "output": output,
                "parallel_tool_calls": True,
                "previous_response_id": doc.get("previous_response_id"),
                "reasoning": {"effort": None, "summary": None},
                "store": True,
                "temperature": 1.0,
                "text": {"format": {"type": "text"}},
                "tool_choice": "auto",
                "tools": [],
                "top_p": 1.0,
                "truncation": "disabled",
                "usage": usage if with_usage else None,
                "user": None,
                "metadata": {},
            }

        if not doc.get("stream"):
            return _Reply.of_json(response("completed", [message], True))

        seqno = iter(range(1_000_000))

        def ev(type_: str, **fields: Any) -> bytes:
            return _sse({"type": type_, "sequence_number": next(seqno), **fields}, type_)

        loc = {"item_id": mid, "output_index": 0, "content_index": 0}
        events = [
            ev("response.created", response=response("in_progress", [], False)),
            ev("response.in_progress", response=response("in_progress", [], False)),
            ev(
                "response.output_item.added",
                output_index=0,
                item={**message, "status": "in_progress", "content": []},
            ),
            ev("response.content_part.added", **loc, part={**part, "text": ""}),
        ]
        events.extend(
            ev("response.output_text.delta", **loc, delta=piece, logprobs=[]) for piece in pieces
        )
        events += [
            ev("response.output_text.done", **loc, text=text, logprobs=[]),
            ev("response.content_part.done", **loc, part=part),
            ev("response.output_item.done", output_index=0, item=message),
            ev("response.completed", response=response("completed", [message], True)),
        ]
        return _Reply(events=events, content_type="text/event-stream")


    def messages(
        self, req: RecordedRequest, doc: dict[str, Any], b: Behaviour, seq: int
    ) -> _Reply:
        pieces = self._pieces(b)
        usage = self._usage(b, MESSAGES_USAGE)
        message: dict[str, Any] = {
            "id": f"msg_scripted{seq}",
            "type": "message",
            "role": "assistant",
            "model": doc.get("model") or "claude-3-5-haiku",
            "content": [{"type": "text", "text": "".join(pieces)}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if not doc.get("stream"):
            return _Reply.of_json(message)

        def ev(type_: str, **fields: Any) -> bytes:
            return _sse({"type": type_, **fields}, type_)

        start_usage = None if usage is None else {**usage, "output_tokens": 1}
        events = [
            ev("message_start", message={**message, "content": [], "stop_reason": None,
                                         "usage": start_usage}),
            ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
            *(ev("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
              for piece in pieces),
            ev("content_block_stop", index=0),
            ev("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None},
               usage=None if usage is None else {"output_tokens": usage["output_tokens"]}),
            ev("message_stop"),
        ]
        return _Reply(events=events, content_type="text/event-stream")

    def count_tokens(
        self, req: RecordedRequest, doc: dict[str, Any], b: Behaviour, seq: int
    ) -> _Reply:
        return _Reply.of_json({"input_tokens": 12})


# ---------------------------------------------------------------------------------------------
# The fixture


class ScriptedUpstream(BackgroundServer):
    """The scripted OpenAI-compatible upstream (see the module docstring). A context manager."""

    def __init__(self, *, ssl_context: Any = None, url_host: str = "127.0.0.1") -> None:
        super().__init__(ssl_context)
        self._url_host = url_host
        self.requests: list[RecordedRequest] = []
        self._queue: deque[Behaviour] = deque()
        self._routes = _Routes()
        self._seq = 0

    def __enter__(self) -> ScriptedUpstream:
        self.start()
        return self

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no path)."""
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self._url_host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL: ``http://127.0.0.1:PORT/v1``."""
        return f"{self.base_url}/v1"

    def enqueue(self, *behaviours: Behaviour) -> None:
        """Script the next requests' answers, first in first out."""
        self._queue.extend(behaviours)

    def pending_behaviours(self) -> int:
        return len(self._queue)

    def _next_behaviour(self) -> Behaviour:
        try:
            return self._queue.popleft()
        except IndexError:
            return Behaviour()

    # -- per connection --

    async def handle(self, stream: ByteStream) -> None:
        conn = _HttpConn(stream)
        try:
            while True:
                event = await conn.next_event()
                if type(event) is h11.ConnectionClosed:
                    raise _ClientGone()
                if type(event) is not h11.Request:
                    raise _ClientGone()
                request = await self._read_request(conn, event)
                behaviour = self._next_behaviour()
                with self._lock:
                    self._seq += 1
                    seq = self._seq
                    self.requests.append(request)

                async def respond(
                    request: RecordedRequest = request, behaviour: Behaviour = behaviour
                ) -> None:
                    await self._respond(conn, request, behaviour, seq)

                await conn.watching_disconnect(respond)
                if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                    return  # h11 says close (Connection: close, HTTP/1.0, ...)
                conn.h11.start_next_cycle()
        except _ClientGone:
            self.note_closed_by_client()
        except _Abort:
            pass

    async def _read_request(self, conn: _HttpConn, event: h11.Request) -> RecordedRequest:
        if conn.h11.they_are_waiting_for_100_continue:
            await conn.send(h11.InformationalResponse(status_code=100, headers=[]))
        chunks: list[bytes] = []
        while True:
            ev = await conn.next_event()
            if type(ev) is h11.Data:
                chunks.append(bytes(ev.data))
            elif type(ev) is h11.EndOfMessage:
                break
            else:
                raise _ClientGone()
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key, val = name.decode("latin-1"), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {val}" if key in headers else val
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        request = RecordedRequest(
            event.method.decode("ascii"), path, query, headers, b"".join(chunks)
        )
        ctype = headers.get("content-type", "")
        if ctype.lower().startswith("multipart/form-data"):
            try:
                request.form, request.files = _parse_multipart(ctype, request.body)
            except (ValueError, UnicodeDecodeError) as exc:
                self.errors.append(exc)
        elif ctype.lower().startswith("application/x-www-form-urlencoded"):
            request.form = dict(parse_qsl(request.body.decode("latin-1")))
        return request

    async def _respond(self, conn: _HttpConn, req: RecordedRequest, b: Behaviour, seq: int) -> None:
        if b.hang:
            await anyio.sleep_forever()
        if b.delay_s:
            await anyio.sleep(b.delay_s)
        reply = self._reply_for(req, b, seq)
        headers = [("content-type", reply.content_type), ("x-request-id", f"req_scripted{seq}")]
        if reply.events is not None:
            headers.append(("cache-control", "no-cache"))
        extra_names = {name.lower() for name, _value in b.headers}
        headers = [(n, v) for n, v in headers if n not in extra_names] + list(b.headers)
        if reply.events is None:
            headers.append(("content-length", str(len(reply.body))))
        await conn.send(
            h11.Response(status_code=reply.status, headers=headers, reason=_reason(reply.status))
        )
        if reply.events is None:
            if b.fail_after_events is not None:
                await conn.send(h11.Data(data=reply.body[: len(reply.body) // 2]))
                raise _Abort()
            if reply.body and req.method != "HEAD":
                await conn.send(h11.Data(data=reply.body))
            await conn.send(h11.EndOfMessage())
            return
        for index, event in enumerate(reply.events):
            if b.fail_after_events is not None and index >= b.fail_after_events:
                raise _Abort()
            if index and b.event_delay_s:
                await anyio.sleep(b.event_delay_s)
            await conn.send(h11.Data(data=event))
        if b.fail_after_events is not None and len(reply.events) <= b.fail_after_events:
            raise _Abort()
        await conn.send(h11.EndOfMessage())

    def _reply_for(self, req: RecordedRequest, b: Behaviour, seq: int) -> _Reply:
        wants_stream = False
        if req.body[:1] == b"{":
            try:
                wants_stream = bool(json.loads(req.body).get("stream"))
            except (ValueError, AttributeError):
                pass
        given_type = next((v for n, v in b.headers if n.lower() == "content-type"), None)
        if b.body is not None:
            ctype = given_type or ("text/event-stream" if wants_stream else "application/json")
            if ctype.startswith("text/event-stream"):
                events = _SSE_BLOCK.findall(b.body)
                return _Reply(b.status, content_type=ctype, events=events)
            return _Reply(b.status, b.body, ctype)
        if b.json is not None:
            return _Reply.of_json(b.json, b.status)
        if b.status >= 400:
            return _Reply.of_json(_status_error_doc(b.status), b.status)
        reply = self._routes.answer(req, b, seq)
        if reply.status == 200:
            reply.status = b.status
        return reply


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    """One scripted upstream per test module (a module may define its own)."""
    with ScriptedUpstream() as up:
        yield up
