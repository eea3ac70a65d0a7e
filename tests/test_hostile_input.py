"""Issue 16, class 9: bad input never gives a 500.

Hostile bytes from a client (headers, query parameters, JSON bodies, Cashu tokens), from an
upstream (usage, nesting) or from a Lightning-address service get the spec's error JSON with a
4xx status (502 where the upstream is at fault) — never a 500 and a traceback — and move no
money: the ledger's invariant holds and nothing stays reserved.

The real node runs as a process over real sockets with a scripted upstream; the Cashu cases
use the real Nutshell mint. The bounded JSON reader itself has a property test.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routstr.cashu import cbor, strictjson
from routstr.cashu.secp256k1 import mul_g
from routstr.db import Database
from routstr.ledger import Ledger
from routstr.wire import wire_int
from tests.support.lnurl import LnurlService
from tests.support.minter import Minter
from tests.support.node import NodeProcess
from tests.support.upstream import Behaviour, ScriptedUpstream

ADMIN = "hostile-admin"
DEEP = b"[" * 100_000
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def node(upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("hostile"), [
        "--upstream-base-url", upstream.url, "--admin-token", ADMIN,
        "--upstream-read-timeout", "5", "--cashu-mints", "http://127.0.0.1:9"])  # never reached
    n.start()
    yield n
    n.stop()


def new_key(node: NodeProcess, msats: int = 10_000_000) -> str:
    status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": msats},
                            {"Authorization": f"Bearer {ADMIN}"})
    assert status == 201, doc
    return str(doc["api_key"])


def books(node: NodeProcess) -> dict[str, int]:
    """The conservation invariant, once every reservation has settled (5 s at most)."""
    db = Database(node.database)
    try:
        ledger = Ledger(db)
        deadline = time.monotonic() + 5
        while ledger.totals()["reservations"] and time.monotonic() < deadline:
            time.sleep(0.05)
        totals = ledger.check_invariant()
        assert totals["reservations"] == 0 and totals["reserved_msats"] == 0, totals
        return totals
    finally:
        db.close()


def spec_error(raw: bytes) -> dict[str, Any]:
    """The spec's error shape: {"error": {type, message, code, details}, "request_id"}."""
    doc = json.loads(raw)
    err = doc["error"]
    assert set(err) == {"type", "message", "code", "details"}, doc
    assert all(isinstance(err[k], str) and err[k] for k in ("type", "message", "code"))
    assert isinstance(err["details"], dict) and doc.get("request_id")
    assert err["type"] != "internal_error", doc
    return err


def hostile(node: NodeProcess, method: str, path: str, body: Any, headers: dict[str, str],
            statuses: tuple[int, ...] = (400,)) -> dict[str, Any]:
    """Send it; the answer is one of `statuses` in the spec's shape, and no traceback is logged."""
    tracebacks = node.log_text().count("Traceback")
    status, _, raw = node.request(method, path, body, headers)
    assert status in statuses, (status, raw[:300])
    err = spec_error(raw)
    assert node.log_text().count("Traceback") == tracebacks
    return err


# ---- JSON bodies: one bounded reader on every route ------------------------------------------
JSON_ROUTES = [
    ("POST", "/admin/login"), ("POST", "/v1/batch"), ("POST", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"), ("POST", "/v1/responses"), ("POST", "/v1/messages"),
    ("POST", "/v1/images/generations"), ("POST", "/chat/completions"),
    ("POST", "/v1/balance/child-key"), ("POST", "/v1/balance/topup"),
    ("POST", "/v1/wallet/create"), ("POST", "/lightning/invoice"), ("POST", "/lightning/recover"),
    ("POST", "/v1/webhooks"), ("POST", "/admin/api/keys"), ("PATCH", "/admin/api/keys/1"),
    ("PUT", "/admin/api/prices/gpt-4o-mini"), ("POST", "/admin/api/wallet/withdraw"),
]
BAD_JSON = {
    "deep": DEEP,
    "deep-object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "129-deep": b"[" * 129 + b"]" * 129,
    "5000-digits": b'{"model":"gpt-4o-mini","max_tokens":' + b"9" * 5000 + b"}",
    "nan": b'{"model":"gpt-4o-mini","max_tokens":NaN}',
    "1e400": b'{"model":"gpt-4o-mini","temperature":1e400}',
    "duplicate-key": b'{"model":"gpt-4o-mini","model":"o3","messages":[]}',
    "surrogate": b'{"model":"\\ud800","messages":[]}',
    "not-utf8": b'{"model":"\xff"}',
}


@pytest.mark.parametrize("method,path", JSON_ROUTES)
def test_deep_json_on_every_route_is_400(node: NodeProcess, method: str, path: str) -> None:
    key = new_key(node)
    headers = {"Authorization": f"Bearer {ADMIN if '/admin/' in path else key}",
               "Content-Type": "application/json"}
    err = hostile(node, method, path, DEEP, headers)
    assert err["code"] == "invalid_json"
    books(node)


@pytest.mark.parametrize("name", sorted(BAD_JSON))
def test_hostile_json_bodies_are_400_invalid_json(node: NodeProcess, upstream: ScriptedUpstream,
                                                  name: str) -> None:
    key = new_key(node)
    before = len(upstream.requests)
    err = hostile(node, "POST", "/v1/chat/completions", BAD_JSON[name],
                  {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert err["code"] == "invalid_json"
    assert len(upstream.requests) == before  # nothing was forwarded
    assert books(node)


# ---- integers from headers, query parameters and JSON fields ---------------------------------
def _cases(key: str) -> list[tuple[str, str, str, Any, dict[str, str]]]:
    auth, admin = {"Authorization": f"Bearer {key}"}, {"Authorization": f"Bearer {ADMIN}"}
    big = "9" * 30
    return [
        ("x-max-cost 1e306", "POST", "/v1/chat/completions", CHAT, {**auth, "X-Max-Cost": "1e306"}),
        ("x-max-cost 30 digits", "POST", "/v1/chat/completions", CHAT, {**auth, "X-Max-Cost": big}),
        ("x-max-cost inf", "POST", "/v1/chat/completions", CHAT, {**auth, "X-Max-Cost": "inf"}),
        ("key-expiry-time", "POST", "/v1/chat/completions", CHAT,
         {**auth, "Refund-LNURL": "alice@example.com", "Key-Expiry-Time": big}),
        ("key-expiry-time negative", "POST", "/v1/chat/completions", CHAT,
         {**auth, "Refund-LNURL": "alice@example.com", "Key-Expiry-Time": "-5"}),
        ("key-expiry-time underscore", "POST", "/v1/chat/completions", CHAT,
         {**auth, "Refund-LNURL": "alice@example.com", "Key-Expiry-Time": "1_000"}),
        ("child balance_limit", "POST", "/v1/balance/child-key",
         {"count": 1, "balance_limit": 10**30}, auth),
        ("child validity_date", "POST", "/v1/balance/child-key",
         {"count": 1, "validity_date": 10**30}, auth),
        ("child validity_date query", "POST", "/v1/balance/child-key?validity_date=" + big,
         {}, auth),
        ("child balance_limit float", "POST", "/v1/balance/child-key",
         {"count": 1, "balance_limit": 1e300}, auth),
        ("admin since", "GET", "/admin/api/transactions?since=" + big, None, admin),
        ("admin until", "GET", "/admin/api/transactions?until=" + big, None, admin),
        ("admin since iso", "GET", "/admin/api/transactions?since=99999-01-01", None, admin),
        ("admin key filter", "GET", "/admin/api/transactions?key=%23" + big, None, admin),
        ("admin key filter digits", "GET", "/admin/api/transactions?key=%23" + "9" * 5000,
         None, admin),
        ("admin key filter superscript", "GET", "/admin/api/transactions?key=%23%C2%B2", None,
         admin),
        ("dashboard key filter", "GET", "/admin?tk=%23" + big, None, admin),
        ("admin price", "PUT", "/admin/api/prices/gpt-4o-mini",
         {"input_msats_per_1k": 10**30}, admin),
        ("admin price created", "PUT", "/admin/api/prices/gpt-4o-mini", {"created": 10**30}, admin),
        ("admin grant", "POST", "/admin/api/keys/1/grant", {"amount_msats": 10**30}, admin),
        ("admin key validity", "POST", "/admin/api/keys", {"validity_date": 10**30}, admin),
        ("admin withdraw", "POST", "/admin/api/wallet/withdraw", {"amount_sats": 10**30}, admin),
        ("invoice amount", "POST", "/lightning/invoice", {"amount_sats": 10**30}, {}),
        ("offset", "GET", "/v1/transactions?offset=" + big, None, auth),
        ("limit digits", "GET", "/v1/transactions?limit=" + "1" * 5000, None, auth),
        ("images n", "POST", "/v1/images/generations",
         {"model": "dall-e-3", "prompt": "x", "n": 10**30}, auth),
        ("images n float", "POST", "/v1/images/generations",
         {"model": "dall-e-3", "prompt": "x", "n": 1e30}, auth),
        ("chat n", "POST", "/v1/chat/completions", {**CHAT, "n": 10**30}, auth),
        ("max_tokens 10**30", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 10**30}, auth),
        ("webhook threshold", "POST", "/v1/webhooks",
         {"url": "https://example.com/h", "balance_threshold_msats": 10**30}, auth),
    ]


CASE_NAMES = [c[0] for c in _cases("")]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_out_of_range_integers_are_4xx(node: NodeProcess, upstream: ScriptedUpstream,
                                       name: str) -> None:
    key = new_key(node)
    _, method, path, body, headers = next(c for c in _cases(key) if c[0] == name)
    before = len(upstream.requests)
    hostile(node, method, path, body, headers, (400, 402))
    assert len(upstream.requests) == before
    books(node)


def test_x_max_cost_is_exact_decimal_sats(node: NodeProcess) -> None:
    """'0.0015' sats is a cap of 1 msat (cut, never rounded up): below the worst case → 402."""
    key = new_key(node)
    err = hostile(node, "POST", "/v1/chat/completions", CHAT,
                  {"Authorization": f"Bearer {key}", "X-Max-Cost": "0.0019"}, (402,))
    assert err["code"] == "max_cost_exceeded" and err["details"]["max_cost"] == 1
    status, _, _ = node.request("POST", "/v1/chat/completions", CHAT,
                                {"Authorization": f"Bearer {key}", "X-Max-Cost": "100.5"})
    assert status == 200
    books(node)


# ---- a hostile upstream ------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 10**30, "completion_tokens": 1, "total_tokens": 1},
    {"prompt_tokens": 1, "completion_tokens": 10**30, "total_tokens": 1},
    {"input_tokens": 1, "output_tokens": 5, "cache_read_input_tokens": 10**30}])
def test_upstream_usage_of_10_to_the_30_settles(node: NodeProcess, upstream: ScriptedUpstream,
                                                usage: dict[str, int], stream: bool) -> None:
    """Served, settled (what the charge should be is class 2's), nothing left reserved."""
    key = new_key(node)  # a fresh key: the lie also fills this key's tokens-per-hour window
    upstream.enqueue(Behaviour(usage=usage))
    tracebacks = node.log_text().count("Traceback")
    status, _, raw = node.request("POST", "/v1/chat/completions", {**CHAT, "stream": stream},
                                  {"Authorization": f"Bearer {key}"})
    assert status == 200, raw[:300]
    assert not stream or b"data: [DONE]" in raw
    assert node.log_text().count("Traceback") == tracebacks
    books(node)


@pytest.mark.parametrize("body", [b"[" * 200_000, b'{"usage":' * 100_000,
                                  b'{"usage":{"prompt_tokens":' + b"9" * 5000 + b"}}",
                                  b'{"usage":{"prompt_tokens":NaN}}'])
def test_hostile_upstream_json_never_500(node: NodeProcess, upstream: ScriptedUpstream,
                                         body: bytes) -> None:
    for stream in (False, True):
        key = new_key(node)
        upstream.enqueue(Behaviour(body=body if not stream else b"data: " + body + b"\n\n",
                                   headers=[("content-type", "text/event-stream" if stream
                                             else "application/json")]))
        tracebacks = node.log_text().count("Traceback")
        status, _, raw = node.request("POST", "/v1/chat/completions", {**CHAT, "stream": stream},
                                      {"Authorization": f"Bearer {key}"})
        assert status in (200, 502), raw[:300]
        if status == 502:
            assert spec_error(raw)["type"] == "upstream_error"
        assert node.log_text().count("Traceback") == tracebacks
        books(node)


def test_upstream_error_body_nested_deep_is_502(node: NodeProcess, upstream: ScriptedUpstream) -> None:
    key = new_key(node)
    upstream.enqueue(Behaviour(status=500, body=b'{"error":' * 100_000,
                               headers=[("content-type", "application/json")]))
    err = hostile(node, "POST", "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {key}"},
                  (502,))
    assert err["type"] == "upstream_error"
    books(node)


# ---- Cashu: proof amounts and Lightning addresses ---------------------------------------------
@pytest.fixture(scope="module")
def paynode(upstream: ScriptedUpstream, mint_url: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("hostile-pay"), [
        "--upstream-base-url", upstream.url, "--admin-token", ADMIN, "--cashu-mints", mint_url])
    n.start()
    yield n
    n.stop()


def _keyset(mint_url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(mint_url + "/v1/keysets", timeout=10) as r:  # noqa: S310
        return str(next(k["id"] for k in json.loads(r.read())["keysets"] if k["active"]))


def forged(mint_url: str, amounts: list[int], version: int) -> str:
    """A token no mint ever signed, with these amounts, written by hand (our own `Token`
    refuses to build it): V3 JSON or V4 CBOR."""
    kid = _keyset(mint_url)
    proofs = [(a, os.urandom(16).hex(), mul_g(i + 2).to_hex()) for i, a in enumerate(amounts)]
    if version == 3:
        doc = {"token": [{"mint": mint_url, "proofs": [
            {"amount": a, "id": kid, "secret": sec, "C": c} for a, sec, c in proofs]}],
            "unit": "sat"}
        raw = json.dumps(doc).encode()
    else:
        raw = cbor.dumps({"t": [{"i": bytes.fromhex(kid), "p": [
            {"a": a, "s": sec, "c": bytes.fromhex(c)} for a, sec, c in proofs]}],
            "m": mint_url, "u": "sat"})
    prefix = "cashuA" if version == 3 else "cashuB"
    return prefix + base64.urlsafe_b64encode(raw).decode().rstrip("=")


HUGE_TOKENS = {"2^63": [1 << 63], "2^64-1": [(1 << 64) - 1],
               "sum past 2^63": [1 << 62, 1 << 62, 1 << 61],
               "msats past 2^63": [1 << 53]}


@pytest.mark.mint
@pytest.mark.parametrize("version", [3, 4])
@pytest.mark.parametrize("name", sorted(HUGE_TOKENS))
def test_huge_proof_amounts_are_400(paynode: NodeProcess, mint_url: str, name: str,
                                    version: int) -> None:
    token = forged(mint_url, HUGE_TOKENS[name], version)
    ops = wallet_ops(paynode)
    for method, path, body, headers in (
            ("POST", "/v1/balance/create", {"initial_balance_token": token}, {}),
            ("GET", "/v1/balance/create?initial_balance_token=" + token, None, {}),
            ("POST", "/v1/chat/completions", CHAT, {"X-Cashu": token}),
            ("POST", "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {token}"})):
        err = hostile(paynode, method, path, body, headers, (400,))
        assert err["code"] == "invalid_cashu_token", err
    assert wallet_ops(paynode) == ops  # refused before any write-ahead, so before any mint call
    books(paynode)


def wallet_ops(node: NodeProcess) -> int:
    db = Database(node.database)
    try:
        return int(db.read(lambda c: c.execute("SELECT COUNT(*) FROM wallet_ops").fetchone()[0]))
    finally:
        db.close()


@pytest.mark.mint
def test_refund_to_a_failing_lightning_address_is_502(paynode: NodeProcess, minter: Minter,
                                                      mint_url: str) -> None:
    service = LnurlService(mint_url)
    try:
        status, doc = paynode.json("POST", "/v1/balance/create",
                                   {"initial_balance_token": minter.token(mint_url, 20)})
        assert status == 200, doc
        key = doc["api_key"]
        bob = service.address.replace("alice@", "bob@")  # the service answers ERROR for bob
        status, _, raw = paynode.request("POST", "/v1/chat/completions", CHAT,  # stores it
                                         {"Authorization": f"Bearer {key}", "Refund-LNURL": bob})
        assert status == 200, raw
        before = books(paynode)
        for _ in range(2):  # every attempt, not only the first
            err = hostile(paynode, "POST", "/v1/balance/refund", None,
                          {"Authorization": f"Bearer {key}"}, (502,))
            assert err["code"] == "lnurl_error"
        after = books(paynode)
        assert after["balance_msats"] == before["balance_msats"]  # nothing debited
    finally:
        service.close()


# ---- the bounded reader and the integer reader, as properties --------------------------------
_json_scalars = (st.none() | st.booleans() | st.integers(-(10**40), 10**40)
                 | st.floats(allow_nan=False, allow_infinity=False) | st.text())
_json_docs = st.recursive(
    _json_scalars, lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(), kids,
                                                                              max_size=5),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(_json_docs)
def test_bounded_reader_agrees_with_json_loads(doc: Any) -> None:
    text = json.dumps(doc)
    assert strictjson.loads(text) == json.loads(text)
    assert strictjson.loads(text.encode()) == json.loads(text)


def _depth(doc: Any) -> int:
    if isinstance(doc, list):
        return 1 + max(map(_depth, doc), default=0)
    if isinstance(doc, dict):
        return 1 + max(map(_depth, doc.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(_json_docs, st.sampled_from(["[", "]", "{", "}", '"', "\\", '\\"']))
def test_depth_scan_counts_only_structure(doc: Any, noise: str) -> None:
    """Brackets and escaped quotes inside strings never count as nesting."""
    wrapped = [doc, noise, {noise: [noise * 3]}]
    assert strictjson.depth_of(json.dumps(wrapped)) == _depth(wrapped)


_json_alphabet = st.sampled_from(list('[]{}",:0123456789.eE+-tfnrulsaINfy \\u\ud800'))


@settings(max_examples=500, deadline=None)
@given(st.text(_json_alphabet, max_size=60) | st.binary(max_size=40))
def test_bounded_reader_raises_only_json_error(data: str | bytes) -> None:
    try:
        strictjson.loads(data)
    except strictjson.JsonError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=300))
def test_bounded_reader_depth_limit(depth: int) -> None:
    text = "[" * depth + "]" * depth
    if depth <= strictjson.MAX_JSON_DEPTH:
        assert strictjson.loads(text) is not None
    else:
        with pytest.raises(strictjson.JsonError):
            strictjson.loads(text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(), st.text(max_size=30), st.floats(), st.booleans(), st.none()))
def test_wire_int_is_in_range_or_400(value: Any) -> None:
    from routstr.errors import InvalidRequest
    try:
        out = wire_int(value, "x", low=0, high=1000)
    except InvalidRequest as exc:
        assert exc.status == 400
    else:
        assert type(out) is int and 0 <= out <= 1000


# ---- siblings: every other reader of foreign JSON --------------------------------------------
def test_batch_item_with_a_deep_upstream_answer(node: NodeProcess, upstream: ScriptedUpstream) -> None:
    """A batch sub-request's answer is an upstream's body, re-read to embed it in the batch."""
    key = new_key(node)
    upstream.enqueue(Behaviour(body=b"[" * 200_000, headers=[("content-type", "application/json")]))
    tracebacks = node.log_text().count("Traceback")
    status, _, raw = node.request("POST", "/v1/batch", {"requests": [
        {"method": "POST", "endpoint": "/chat/completions", "body": CHAT}]},
        {"Authorization": f"Bearer {key}"})
    assert status == 200, raw[:300]
    assert node.log_text().count("Traceback") == tracebacks
    books(node)


HOSTILE_ANSWERS = [b"[" * 100_000, b'{"keysets":' * 50_000, b'{"keysets":NaN}',
                   b'{"keysets":[],"keysets":[]}', b'{"keysets":[' + b"9" * 5000 + b"]}"]


@pytest.mark.parametrize("answer", HOSTILE_ANSWERS, ids=range(len(HOSTILE_ANSWERS)))
def test_mint_and_lnurl_answers_are_protocol_errors(answer: bytes) -> None:
    """The wallet library's readers of a mint's and an LNURL service's answers raise their
    own typed errors (MintProtocolError, LnurlError), nothing else."""
    import anyio

    from routstr.cashu.lnurl import LnurlError, fetch_pay_request
    from routstr.cashu.mint import MintClient, MintProtocolError, error_from_response

    async def transport(method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        return 200, answer

    async def run() -> None:
        with pytest.raises(MintProtocolError):
            await MintClient("https://mint.example", transport).keysets()
        with pytest.raises(LnurlError):
            await fetch_pay_request(transport, "alice@example.com")

    anyio.run(run)
    assert error_from_response(400, answer).nut_code is None


def test_mint_amounts_beyond_2_63_are_protocol_errors() -> None:
    import anyio

    from routstr.cashu.lnurl import LnurlError, fetch_pay_request
    from routstr.cashu.mint import MintClient, MintProtocolError

    quote = {"quote": "q", "request": "lnbc1", "amount": 1 << 63, "fee_reserve": 0,
             "state": "UNPAID", "expiry": None, "unit": "sat"}
    pay = {"tag": "payRequest", "callback": "https://example.com/cb", "minSendable": 1,
           "maxSendable": 1 << 63, "metadata": "[]"}

    async def transport(method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        return 200, json.dumps(pay if "lnurlp" in url else quote).encode()

    async def run() -> None:
        with pytest.raises(MintProtocolError):
            await MintClient("https://mint.example", transport).melt_quote("lnbc1", "sat")
        with pytest.raises(LnurlError):
            await fetch_pay_request(transport, "alice@example.com")

    anyio.run(run)


@pytest.mark.parametrize("text", ['["EVENT","s",' * 50_000, '["EVENT","s",{"kind":NaN}]',
                                  '["NOTICE",' + "9" * 5000 + "]"])
def test_relay_messages_are_relay_protocol_errors(text: str) -> None:
    from routstr.nostr import RelayProtocolError, parse_relay_message
    with pytest.raises(RelayProtocolError):
        parse_relay_message(text)
