"""(d) Fuzzing the live node with hypothesis: raw bytes on the HTTP request path, JSON bodies on
every route that takes one (listed from the node's own /openapi.json), and Cashu tokens where the
node accepts them (Bearer, X-Cashu, create/top-up bodies; mutations of real tokens of the real
test mint, so the wallet and the mint client are reached too).

Never a 500 (the server's error barrier logs "unhandled error" for each), the node stays up,
and the books still balance. The decoders alone are fuzzed with 100,000 inputs in
tests/cashu/test_tokens.py; here they are reached through the HTTP stack.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routstr.db import Database
from routstr.ledger import Ledger
from tests.reliability.support import ADMIN, NODE_FLAGS, FaultyUpstream, new_key, unhandled_errors
from tests.support.minter import Minter
from tests.support.node import NodeProcess

pytestmark = pytest.mark.reliability


def examples(ci: int) -> Any:
    return settings(max_examples=ci, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Fuzzed:
    def __init__(self, node: NodeProcess, key: str, tokens: list[str]) -> None:
        self.node = node
        self.key = key
        self.tokens = tokens
        self.statuses: dict[int, int] = {}

    def raw(self, data: bytes, timeout: float = 5.0) -> int:
        """Send raw bytes; the response status (0 = closed without a response)."""
        with socket.create_connection(("127.0.0.1", self.node.port), timeout=timeout) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the node may close first (a 431/400 answered early): read what it said
            chunks = []
            try:
                while chunk := s.recv(65536):
                    chunks.append(chunk)
            except (TimeoutError, ConnectionResetError):
                pass
        first = b"".join(chunks)
        m = re.match(rb"HTTP/1\.[01] (\d{3}) ", first)
        status = int(m.group(1)) if m else 0
        self.statuses[status] = self.statuses.get(status, 0) + 1
        return status


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, mint_url: str) -> Iterator[Fuzzed]:
    workdir = tmp_path_factory.mktemp("fuzz")
    minter = Minter(workdir)
    with FaultyUpstream() as upstream:
        node = NodeProcess(workdir, ["--upstream-base-url", upstream.url, "--cashu-mints",
                                     mint_url, *NODE_FLAGS, "--max-body-bytes", "65536",
                                     "--header-timeout", "2"]).start()
        tokens = [minter.token(mint_url, n) for n in (1, 5, 64)]
        try:
            yield Fuzzed(node, new_key(node, 10**9), tokens)
            assert not unhandled_errors(node), unhandled_errors(node)[:3]
            assert node.json("GET", "/health")[0] == 200
            db = Database(node.database)
            try:
                Ledger(db).check_invariant()
            finally:
                db.close()
            print(f"fuzz statuses {dict(sorted(fuzzed_statuses(node).items()))}")
        finally:
            node.stop()
            minter.close()


def fuzzed_statuses(node: NodeProcess) -> dict[int, int]:
    counts: dict[int, int] = {}
    for m in re.finditer(r"routstr\.access: \S+ \S+ \S+ \S+ (\d{3}) ", node.log_text()):
        counts[int(m.group(1))] = counts.get(int(m.group(1)), 0) + 1
    return counts


# ---- the HTTP request path: raw bytes ----------------------------------------------------------
TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
methods = st.one_of(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS",
                                     "CONNECT", "TRACE", "get", "PRI"]),
                    st.text(TOKEN_CHARS, min_size=1, max_size=12))
paths = st.one_of(
    st.sampled_from(["/", "/health", "/v1/info", "/v1/models", "/v1/chat/completions",
                     "/v1/balance/create", "/v1/wallet/topup", "/v1/balance/refund",
                     "/admin/api/keys", "/admin/api/keys/1", "/v1/webhooks", "/v1/batch",
                     "/openapi.json", "/docs", "*", "http://x/v1/info", "//v1/info"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=300)
    .map(lambda s: "/" + s),
    st.binary(min_size=1, max_size=64).map(lambda b: "/" + b.decode("latin-1")),
)
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.1x", "",
                            "http/1.1"])
header_names = st.one_of(
    st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Authorization", "X-Cashu",
                     "Content-Type", "Expect", "Connection", "X-Request-ID", "Origin",
                     "Accept-Encoding", "X-Max-Cost", "Idempotency-Key", "X-Routstr-Version",
                     "Refund-LNURL", "Key-Expiry-Time"]),
    st.text(TOKEN_CHARS, min_size=1, max_size=20), st.just(""), st.just("Bad Name"))
header_values = st.one_of(
    st.sampled_from(["chunked", "gzip, chunked", "100-continue", "close", "-1", "0",
                     "99999999999999999999", "Bearer ", "Bearer sk-", "Bearer cashuA",
                     "Bearer cashuBo2F0", "application/json", "v1", "v9"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xff, exclude_characters="\r\n"),
            max_size=200),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
bodies = st.one_of(st.binary(max_size=2000), st.just(b"0\r\n\r\n"),
                   st.binary(max_size=64).map(lambda b: b"%x\r\n" % len(b) + b + b"\r\n0\r\n\r\n"),
                   st.just(b"zz\r\n"))


@st.composite
def raw_requests(draw: Any) -> bytes:
    line = f"{draw(methods)} {draw(paths)} {draw(versions)}".encode("latin-1", "replace")
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=8))
    if draw(st.booleans()):
        headers.append(("Host", "node"))
    head = line + b"\r\n" + b"".join(
        f"{n}: {v}".encode("latin-1", "replace") + draw(st.sampled_from([b"\r\n", b"\n"]))
        for n, v in headers)
    junk = draw(st.sampled_from([b"", b"", b" folded\r\n", b"\x00\r\n", b"X" * 70000 + b"\r\n"]))
    return head + junk + b"\r\n" + draw(bodies)


@pytest.mark.parametrize("n", [pytest.param(1000, id="1000"),
                               pytest.param(10000, id="10000", marks=pytest.mark.slow)])
def test_raw_http_never_500(fuzzed: Fuzzed, n: int) -> None:
    @examples(n)
    @given(raw_requests())
    def run(data: bytes) -> None:
        assert fuzzed.raw(data) != 500

    run()
    assert not unhandled_errors(fuzzed.node)


# ---- JSON bodies on every route that takes one ----------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40) | st.sampled_from(["gpt-4o-mini", "user", "", "sk-x", "cashuA"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=20)
FIELDS = ["model", "messages", "stream", "max_tokens", "max_completion_tokens", "input", "prompt",
          "n", "stream_options", "tools", "role", "content", "balance_msats", "initial_balance_token",
          "cashu_token", "url", "events", "secret", "requests", "count", "price", "amount",
          "name", "validity_date", "balance_limit"]


@st.composite
def json_bodies(draw: Any) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    doc = draw(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6))
    if draw(st.booleans()):
        doc.setdefault("model", "gpt-4o-mini")
        doc.setdefault("messages", [{"role": "user", "content": "scenario:ok"}])
    return json.dumps(doc).encode()


def body_routes(node: NodeProcess) -> list[tuple[str, str]]:
    status, doc = node.json("GET", "/openapi.json")
    assert status == 200
    out = []
    for path, ops in doc["paths"].items():
        for method in ops:
            if method.upper() in ("POST", "PUT", "PATCH", "DELETE"):
                out.append((method.upper(), re.sub(r"\{[^}]+\}", "1", path)))
    assert len(out) > 20, out
    return sorted(out)


@pytest.mark.parametrize("n", [pytest.param(600, id="600"),
                               pytest.param(6000, id="6000", marks=pytest.mark.slow)])
def test_json_bodies_never_500(fuzzed: Fuzzed, n: int) -> None:
    routes = body_routes(fuzzed.node)
    auths = [f"Bearer {fuzzed.key}", f"Bearer {ADMIN}", "", "Bearer sk-nope"]

    @examples(n)
    @given(st.sampled_from(routes), json_bodies(), st.sampled_from(auths))
    def run(route: tuple[str, str], body: bytes, auth: str) -> None:
        method, path = route
        head = (f"{method} {path} HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                + (f"Authorization: {auth}\r\n" if auth else "") + "\r\n")
        assert fuzzed.raw(head.encode() + body, timeout=15) != 500

    run()
    assert not unhandled_errors(fuzzed.node)


# ---- tokens where the node takes them -------------------------------------------------------------
@st.composite
def mutated_tokens(draw: Any, seeds: list[str]) -> str:
    token = draw(st.sampled_from(seeds))
    prefix, payload = token[:6], token[6:]
    kind = draw(st.integers(0, 5))
    if kind == 0:  # flip bytes of the encoded payload
        raw = bytearray(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] = draw(st.integers(0, 255))
        return prefix + base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    if kind == 1:  # truncate or extend
        cut = draw(st.integers(0, len(token)))
        return token[:cut] + draw(st.text(string.ascii_letters + string.digits + "-_=", max_size=8))
    if kind == 2:  # another prefix
        return draw(st.sampled_from(["cashuA", "cashuB", "cashuC", "cashu", "creqA"])) + payload
    if kind == 3:  # random payload
        return prefix + draw(st.text(string.ascii_letters + string.digits + "-_+/=", max_size=300))
    if kind == 4:  # a v3 JSON token with random structure
        doc = {"token": [{"mint": draw(st.sampled_from(["http://127.0.0.1:1", ""])),
                          "proofs": draw(json_values)}], "unit": draw(json_values)}
        return "cashuA" + base64.urlsafe_b64encode(json.dumps(doc).encode()).decode()
    return token  # the real one (redeemed once, then "already spent")


@pytest.mark.mint
@pytest.mark.parametrize("n", [pytest.param(150, id="150"),
                               pytest.param(2000, id="2000", marks=pytest.mark.slow)])
def test_tokens_over_http_never_500(fuzzed: Fuzzed, n: int) -> None:
    places = ["bearer", "xcashu", "create", "topup"]

    @examples(n)
    @given(mutated_tokens(fuzzed.tokens), st.sampled_from(places))
    def run(token: str, place: str) -> None:
        node = fuzzed.node
        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "scenario:ok"}]}
        if place == "bearer":
            status, _, _ = node.request("POST", "/v1/chat/completions", chat,
                                        {"Authorization": f"Bearer {token}"}, 15)
        elif place == "xcashu":
            status, _, _ = node.request("POST", "/v1/chat/completions", chat,
                                        {"X-Cashu": token}, 15)
        elif place == "create":
            status, _, _ = node.request("POST", "/v1/balance/create",
                                        {"initial_balance_token": token}, None, 15)
        else:
            status, _, _ = node.request("POST", "/v1/wallet/topup", {"cashu_token": token},
                                        {"Authorization": f"Bearer {fuzzed.key}"}, 15)
        assert status != 500

    run()
    assert not unhandled_errors(fuzzed.node)


def test_fuzzing_left_the_node_serving(fuzzed: Fuzzed, tmp_path: Path) -> None:
    status, _, raw = fuzzed.node.request("POST", "/v1/chat/completions",
                                         {"model": "gpt-4o-mini",
                                          "messages": [{"role": "user", "content": "scenario:ok"}]},
                                         {"Authorization": f"Bearer {fuzzed.key}"})
    assert status == 200, raw
    print(f"raw fuzz statuses {dict(sorted(fuzzed.statuses.items()))}")
