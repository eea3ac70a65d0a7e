"""A test relay that acts on the wire as routstr-core 0.4.5 does with a `routstr` provider.

routstr-core is on no package registry and its code stays out of this repository, so what it
does with this node as its upstream is encoded here, from `../shared/reference/routstr-core.md`
(the digest; section numbers below are its) and from watching the real one by hand:

* It pays from a balance created on this node (an `sk-` key bought with a real token) and
  forwards its users' `/v1/...` requests unchanged, with that key as Bearer (§6 "core as client").
* Catalogue (§1a): from our `/v1/models` it takes the USD `pricing` (per token), multiplies it
  by its provider fee and divides by *its own* BTC/USD — it ignores our `sats_pricing` — and
  derives each model's max cost from `top_provider` / `context_length` (§1a's derivation).
* Reservation (§3 step 1): max cost × (1 − tolerance), less the unused prompt allowance and,
  with `max_tokens`, the unused completion allowance; 402 when its user's balance is short.
* Streams (§2c): forces `stream_options.include_usage`; passes every event through re-framed
  (`event:` and `id:` lines kept) except `data: [DONE]` and the usage chunk, which it holds
  back and emits last — the usage chunk with its own cost fields, then `[DONE]` (only if the
  upstream sent one). Responses streams: `response.completed` is held and emitted last.
* Billing (§3 step 2): only from `usage`. No usage → 0. Token rates from the sats pricing;
  a zero input or output rate → the full reservation (what it does to embeddings).
* Non-streamed answers: usage.cost replaced by its object, plus `usage.cost_sats`; our response
  headers are copied onto the rewritten body, less Transfer-Encoding and Content-Encoding — our
  Content-Length included, when we send one (its X-Cashu path does this; README.md here).

Multipart bodies (audio) are forwarded as they came, the model read from the form: the real
routstr-core parses every body as JSON and cannot pass them (see README.md here).
"""

from __future__ import annotations

import http.client
import json
import math
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

TIMEOUT_S = 30.0


def usd_max_cost(m: dict[str, Any]) -> float:
    """routstr-core's max cost of a model read from our /v1/models (§1a), in USD per request,
    from the USD `pricing` (per token) and the limits. Written from the digest, independently
    of routstr/pricing.py."""
    pr, top = m["pricing"], m.get("top_provider") or {}
    p, c = pr["prompt"], pr["completion"]
    cl, mct = top.get("context_length"), top.get("max_completion_tokens")
    if cl or mct:
        if cl and mct:
            return float(cl * max(p, c) if cl <= mct else (cl - mct) * p + mct * c)
        if cl:
            return float(cl * max(p, c))
        return float(mct * c)
    if m["context_length"]:
        return float(m["context_length"] * max(p, c))
    return max(p * 1e6 + c * 32_000 + pr["request"] * 1e5 + pr["image"] * 100
               + pr["web_search"] * 1000 + pr["internal_reasoning"] * 100, 1e-6)


def prompt_limit(m: dict[str, Any]) -> int:
    top = m.get("top_provider") or {}
    cl, mct = top.get("context_length"), top.get("max_completion_tokens")
    if cl and mct:
        return int(cl - mct) if cl > mct else int(cl)
    if cl:
        return int(cl)
    if mct:
        return 0
    return int(m["context_length"] or 0)


@dataclass
class CoreModel:
    """One catalogue entry as routstr-core holds it: sats per token, max costs in sats."""

    id: str
    prompt: float  # sats per token
    completion: float
    max_cost: float  # sats
    max_prompt_cost: float
    max_completion_cost: float
    prompt_limit: int

    @classmethod
    def of(cls, m: dict[str, Any], usd_per_sat: float, fee: float) -> CoreModel:
        pr = m["pricing"]
        top = m.get("top_provider") or {}
        p, c = pr["prompt"] * fee / usd_per_sat, pr["completion"] * fee / usd_per_sat
        cl, mct = top.get("context_length"), top.get("max_completion_tokens")
        limit = prompt_limit(m)
        mct_cost = (mct or cl or m["context_length"] or 32_000) * c
        return cls(m["id"], p, c, usd_max_cost(m) * fee / usd_per_sat, limit * p, mct_cost,
                   limit)


@dataclass
class User:
    balance_msats: int
    reserved_msats: int = 0
    spent_msats: int = 0
    charges: list[int] = field(default_factory=list)


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    chars = 0
    for msg in body.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text", "")) for p in content
                         if isinstance(p, dict) and p.get("type") == "text")
    return chars // 3


def normalize_usage(usage: Any) -> tuple[int, int] | None:
    """(input tokens, output tokens) of an OpenAI, Responses or Anthropic usage object."""
    if not isinstance(usage, dict):
        return None
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    if "input_tokens" in usage or "output_tokens" in usage:
        extra = int(usage.get("cache_read_input_tokens") or 0) \
            + int(usage.get("cache_creation_input_tokens") or 0)
        return int(usage.get("input_tokens") or 0) + extra, int(usage.get("output_tokens") or 0)
    return None


def _multipart_model(body: bytes, ctype: str) -> str | None:
    m = re.search(r'name="model"\r\n\r\n([^\r]*)\r\n', body.decode("latin-1"))
    return m.group(1) if m else None


class CoreLikeRelay:
    """The relay: `with CoreLikeRelay(node_url, key, btc_usd) as relay:` then point an OpenAI
    SDK at `relay.base_url` with a key from `relay.add_user(msats)`."""

    def __init__(self, node_url: str, node_key: str, btc_usd: float, *, fee: float = 1.01,
                 tolerance_pct: float = 1.0) -> None:
        self.node = urlsplit(node_url)
        self.node_key = node_key
        self.usd_per_sat = btc_usd / 100_000_000
        self.fee = fee
        self.tol = 1 - tolerance_pct / 100
        self.users: dict[str, User] = {}
        self.models: dict[str, CoreModel] = {}
        self.reservations: list[tuple[str, int]] = []  # (model, msats reserved)
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---- life cycle --------------------------------------------------------------------------
    def __enter__(self) -> CoreLikeRelay:
        self.refresh_models()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                relay.get(self)

            def do_POST(self) -> None:  # noqa: N802
                relay.post(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def add_user(self, key: str, msats: int) -> str:
        self.users[key] = User(msats)
        return key

    def refresh_models(self) -> None:
        status, _, raw = self._node("GET", "/v1/models", None, {})
        assert status == 200, raw
        self.models = {m["id"]: CoreModel.of(m, self.usd_per_sat, self.fee)
                       for m in json.loads(raw)["data"]}

    # ---- talking to the node -----------------------------------------------------------------
    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.node.hostname or "127.0.0.1", self.node.port,
                                          timeout=TIMEOUT_S)

    def _node(self, method: str, path: str, body: bytes | None,
              headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        conn = self._conn()
        try:
            conn.request(method, path, body, {"Authorization": f"Bearer {self.node_key}",
                                              **headers})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def node_balance_msats(self) -> int:
        status, _, raw = self._node("GET", "/v1/balance/info", None, {})
        assert status == 200, raw
        doc = json.loads(raw)
        return int(doc.get("balance_msats", doc["balance"]))

    def refund_from_node(self) -> dict[str, Any]:
        status, _, raw = self._node("POST", "/v1/balance/refund", b"", {})
        assert status == 200, raw
        return dict(json.loads(raw))

    # ---- billing -----------------------------------------------------------------------------
    def _reserve(self, m: CoreModel, body: dict[str, Any]) -> int:
        res = m.max_cost * 1000 * self.tol
        est = estimate_prompt_tokens(body)
        allowance = m.prompt_limit * m.prompt * self.tol
        if allowance - est * m.prompt > 0:
            res -= math.floor((allowance - est * m.prompt) * 1000)
        mt = body.get("max_tokens")
        if isinstance(mt, int) and not isinstance(mt, bool):
            unused = m.max_completion_cost * self.tol - mt * m.completion
            if unused > 0:
                res -= math.floor(unused * 1000)
        return max(1, int(res))

    def cost_msats(self, m: CoreModel, usage: Any, reserved: int) -> int:
        tokens = normalize_usage(usage)
        if tokens is None:
            return 0  # "no usage ⇒ charge 0" (§3 step 2.1)
        if m.prompt == 0 or m.completion == 0:
            return reserved  # a zero rate: the full reservation (§3 step 2.4)
        in_rate, out_rate = m.prompt * 1e6, m.completion * 1e6  # msats per 1000 tokens
        return math.ceil(round(tokens[0] / 1000 * in_rate, 3)
                         + round(tokens[1] / 1000 * out_rate, 3))

    def _settle(self, key: str, reserved: int, cost: int) -> int:
        with self.lock:
            u = self.users[key]
            u.reserved_msats -= reserved
            cost = min(cost, u.balance_msats)
            u.balance_msats -= cost
            u.spent_msats += cost
            u.charges.append(cost)
            return u.balance_msats

    def _cost_fields(self, usage: dict[str, Any], cost: int, left: int) -> None:
        usage["cost"] = {"base_msats": 0, "input_msats": cost, "output_msats": 0,
                         "total_msats": cost}
        usage["cost_sats"] = cost // 1000
        usage["remaining_balance_msats"] = left

    # ---- serving its users -------------------------------------------------------------------
    def _reply(self, h: BaseHTTPRequestHandler, status: int, doc: Any,
               headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(doc).encode()
        h.send_response(status)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(raw)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(raw)

    def get(self, h: BaseHTTPRequestHandler) -> None:
        status, headers, raw = self._node("GET", h.path, None, {})
        self._reply(h, status, json.loads(raw) if raw else None)

    def post(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("content-length") or 0))
        ctype = h.headers.get("content-type") or "application/json"
        key = (h.headers.get("authorization") or "").removeprefix("Bearer ").strip()
        if ctype.startswith("multipart/"):
            body: dict[str, Any] = {"model": _multipart_model(raw, ctype)}
        else:
            body = json.loads(raw or b"{}")
        m = self.models.get(str(body.get("model")))
        if m is None:
            self._reply(h, 400, {"error": {"message": f"Model '{body.get('model')}' not found",
                                           "type": "invalid_model", "code": 400}})
            return
        if key not in self.users:
            self._reply(h, 401, {"detail": "Unauthorized"})
            return
        reserved = self._reserve(m, body)
        with self.lock:
            u = self.users[key]
            if u.balance_msats - u.reserved_msats < reserved:
                self._reply(h, 402, {"error": {"message": "Insufficient balance",
                                               "type": "insufficient_quota",
                                               "code": "insufficient_balance"}})
                return
            u.reserved_msats += reserved
            self.reservations.append((m.id, reserved))
        if body.get("stream") is True and not ctype.startswith("multipart/"):
            if h.path.endswith("/chat/completions"):
                body["stream_options"] = {**(body.get("stream_options") or {}),
                                          "include_usage": True}
            raw = json.dumps(body).encode()
        conn = self._conn()
        try:
            conn.request("POST", h.path, raw, {"Authorization": f"Bearer {self.node_key}",
                                               "Content-Type": ctype})
            resp = conn.getresponse()
            rtype = resp.getheader("content-type") or ""
            if resp.status != 200:
                data = resp.read()
                self._settle(key, reserved, 0)
                h.send_response(resp.status)
                h.send_header("content-type", rtype or "application/json")
                h.send_header("content-length", str(len(data)))
                h.end_headers()
                h.wfile.write(data)
            elif "text/event-stream" in rtype:
                self._stream(h, resp, key, m, reserved)
            else:
                self._complete(h, resp, rtype, key, m, reserved)
        finally:
            conn.close()

    def _complete(self, h: BaseHTTPRequestHandler, resp: http.client.HTTPResponse, rtype: str,
                  key: str, m: CoreModel, reserved: int) -> None:
        data = resp.read()
        doc = json.loads(data) if "json" in rtype else None
        usage = doc.get("usage") if isinstance(doc, dict) else None
        left = self._settle(key, reserved, self.cost_msats(m, usage, reserved))
        if isinstance(usage, dict):
            self._cost_fields(usage, self.users[key].charges[-1], left)
            data = json.dumps(doc).encode()
        # Our headers go back to its user, less Transfer-Encoding and Content-Encoding — with
        # our Content-Length, if we sent one, on the body it rewrote (its X-Cashu path)
        h.send_response(200)
        ours = [(k.lower(), v) for k, v in resp.getheaders()
                if k.lower() not in ("transfer-encoding", "content-encoding", "connection",
                                     "date", "server")]
        for k, v in ours:
            h.send_header(k, v)
        if "content-length" not in dict(ours):
            h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _stream(self, h: BaseHTTPRequestHandler, resp: http.client.HTTPResponse, key: str,
                m: CoreModel, reserved: int) -> None:
        h.send_response(200)
        h.send_header("content-type", "text/event-stream")
        h.send_header("transfer-encoding", "chunked")
        h.end_headers()

        def send(text: str) -> None:
            raw = text.encode()
            h.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            h.wfile.flush()

        held: tuple[list[str], dict[str, Any]] | None = None  # (event lines, doc with usage)
        done = False
        lines: list[str] = []
        try:
            for line_b in resp:
                line = line_b.decode().rstrip("\r\n")
                if line:
                    if not line.startswith(":"):  # keep-alive comments dropped
                        lines.append(line)
                    continue
                if not lines:
                    continue
                event, lines = lines, []
                data = "\n".join(x[5:].lstrip() for x in event if x.startswith("data:"))
                others = [x for x in event if not x.startswith("data:")]
                if data == "[DONE]":
                    done = True
                    continue
                try:
                    doc = json.loads(data) if data else None
                except ValueError:
                    doc = None
                if isinstance(doc, dict) and self._carries_usage(doc):
                    held = (others, doc)
                    continue
                send("".join(x + "\n" for x in others) + (f"data: {data}\n" if data else "")
                     + "\n")
        except (http.client.IncompleteRead, OSError):
            pass
        usage = self._usage_of(held[1]) if held else None
        left = self._settle(key, reserved, self.cost_msats(m, usage, reserved))
        if held is not None and isinstance(usage, dict):
            self._cost_fields(usage, self.users[key].charges[-1], left)
            send("".join(x + "\n" for x in held[0]) + f"data: {json.dumps(held[1])}\n\n")
        if done:
            send("data: [DONE]\n\n")
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()

    @staticmethod
    def _carries_usage(doc: dict[str, Any]) -> bool:
        if doc.get("type") == "response.completed":
            return True
        return isinstance(doc.get("usage"), dict) and doc.get("object") == "chat.completion.chunk"

    @staticmethod
    def _usage_of(doc: dict[str, Any]) -> Any:
        if doc.get("type") == "response.completed":
            return (doc.get("response") or {}).get("usage")
        return doc.get("usage")
