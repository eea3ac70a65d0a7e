"""The cashu-ts wallet (`@cashu/cashu-ts` on npm) pays the node with tokens locked to its key.

Another wallet implementation than Nutshell's (tests/test_p2pk.py): cashu-ts mints at the real
test mint, locks the proofs to `/v1/info.cashu_p2pk_pubkey` with its own P2PK send (NUT-11), and
the node redeems them by its signature — per request (X-Cashu), as a Bearer key, and through
/v1/balance/create. A token locked to another key is refused untouched. The node's 402 payment
request (NUT-18 creqA, NUT-26 CREQB) decodes in cashu-ts with the lock to the node's key.
The script is tests/js/p2pk.mjs; npm installs tests/js/package.json once (tests/support/js.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routstr.cashu.tokens import PaymentRequest, parse_token
from routstr.db import Database
from routstr.ledger import Ledger
from tests.support.js import js_tree
from tests.support.node import NodeProcess
from tests.support.upstream import ScriptedUpstream

pytestmark = pytest.mark.mint

CASHU_TS_VERSION = "3.7.1"  # tests/js/package.json
MSG = [{"role": "user", "content": "Hello!"}]
CHAT = {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 100}
OTHER = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
SCRIPT_TIMEOUT_S = 30


class CashuTs:
    """tests/js/p2pk.mjs run with node in the installed tree."""

    def __init__(self, tree: Path, mint_url: str) -> None:
        self.tree = tree
        self.mint_url = mint_url

    def run(self, *args: str) -> list[str]:
        out = subprocess.run(["node", "p2pk.mjs", *args], cwd=self.tree, capture_output=True,
                             text=True, timeout=SCRIPT_TIMEOUT_S, check=False,
                             env={"PATH": os.environ.get("PATH", "")})
        if out.returncode != 0:
            pytest.fail(f"p2pk.mjs {args[0]} failed ({out.returncode}): {out.stderr[-3000:]}")
        return out.stdout.split()

    def lock(self, pubkey: str | dict[str, Any], *sats: int) -> list[str]:
        """Tokens minted by cashu-ts, each worth one of `sats`, locked to `pubkey` (or as
        cashu-ts's `P2PKOptions` given say)."""
        lock = pubkey if isinstance(pubkey, str) else json.dumps(pubkey)
        tokens = self.run("lock", self.mint_url, lock, *map(str, sats))
        assert len(tokens) == len(sats)
        return tokens

    def state(self, token: str) -> set[str]:
        return set(self.run("state", self.mint_url, token))

    def decode(self, request: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(" ".join(self.run("decode", request)))
        return doc


@pytest.fixture(scope="module")
def cashu_ts(mint_url: str) -> CashuTs:
    ts = CashuTs(js_tree("the cashu-ts wallet tests"), mint_url)
    assert ts.run("version") == [CASHU_TS_VERSION]
    return ts


@pytest.fixture(scope="module")
def node(upstream: ScriptedUpstream, mint_url: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("cashutsnode"), [
        "--upstream-base-url", upstream.url, "--cashu-mints", mint_url])
    n.start()
    yield n
    n.stop()


@pytest.fixture(scope="module")
def node_key(node: NodeProcess) -> str:
    status, info = node.json("GET", "/v1/info")
    assert status == 200
    key: str = info["cashu_p2pk_pubkey"]
    assert isinstance(key, str) and len(key) == 66 and key[:2] in ("02", "03")
    return key


def books(node: NodeProcess) -> None:
    db = Database(node.database)
    try:
        Ledger(db).check_invariant()
    finally:
        db.close()


def locked_to(token: str) -> set[str]:
    """The keys the proofs of `token` are locked to (each must be a NUT-10 P2PK secret)."""
    keys = set()
    for p in parse_token(token).proofs:
        kind, body = json.loads(p.secret)
        assert kind == "P2PK", p.secret
        keys.add(body["data"])
    return keys


def test_xcashu_locked_by_cashu_ts_pays_and_gets_change(node: NodeProcess, node_key: str,
                                                         cashu_ts: CashuTs, mint_url: str,
                                                         wallet_tool: Any) -> None:
    [token] = cashu_ts.lock(node_key, 64)
    assert token.startswith("cashuB") and locked_to(token) == {node_key}
    assert parse_token(token).amount == 64
    status, headers, raw = node.request("POST", "/v1/chat/completions", CHAT,
                                        {"X-Cashu": token})
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["message"]["content"]
    change = headers["x-cashu"]
    assert 0 < parse_token(change).amount < 64  # plain change, cashu-ts's mint
    assert cashu_ts.state(change) == {"UNSPENT"}
    # Nutshell's wallet, asked independently: the locked inputs were redeemed
    assert wallet_tool.state(mint_url, token) == ["SPENT"] * len(parse_token(token).proofs)
    status, doc = node.json("POST", "/v1/chat/completions", CHAT, {"X-Cashu": token})
    assert status == 400 and doc["error"]["code"] == "cashu_token_already_spent", doc
    books(node)


def test_bearer_and_create_with_cashu_ts_locked_tokens(node: NodeProcess, node_key: str,
                                                        cashu_ts: CashuTs) -> None:
    bearer, initial = cashu_ts.lock(node_key, 50, 40)
    auth = {"Authorization": f"Bearer {bearer}"}
    status, doc = node.json("GET", "/v1/balance/info", headers=auth)
    assert status == 200 and doc["balance"] == 50_000, doc
    status, doc = node.json("POST", "/v1/chat/completions", CHAT, auth)
    assert status == 200, doc
    status, doc = node.json("GET", "/v1/balance/info", headers=auth)
    assert status == 200 and 0 < doc["balance"] < 50_000 and doc["reserved"] == 0, doc
    assert cashu_ts.state(bearer) == {"SPENT"}

    status, doc = node.json("POST", "/v1/balance/create", {"initial_balance_token": initial})
    assert status == 200 and doc["balance"] == 40_000, doc
    key = doc["api_key"]
    status, doc = node.json("POST", "/v1/chat/completions", CHAT,
                            {"Authorization": f"Bearer {key}"})
    assert status == 200, doc
    assert cashu_ts.state(initial) == {"SPENT"}
    # reposted (a lost answer, within the recovery window): the same key, nothing added
    status, again = node.json("POST", "/v1/balance/create", {"initial_balance_token": initial})
    assert status == 200 and again["api_key"] == key and again["balance"] < 40_000, again
    books(node)


def test_cashu_ts_token_locked_to_another_key_is_refused_untouched(
        node: NodeProcess, node_key: str, cashu_ts: CashuTs, mint_url: str,
        wallet_tool: Any) -> None:
    [token] = cashu_ts.lock(OTHER, 30)
    assert locked_to(token) == {OTHER}
    status, headers, raw = node.request("POST", "/v1/chat/completions", CHAT,
                                        {"X-Cashu": token})
    err = json.loads(raw)["error"]
    assert status == 400 and err["code"] == "cashu_token_locked", raw
    assert err["details"]["cashu_p2pk_pubkey"] == node_key
    assert headers["x-cashu"] == token  # echoed: still the sender's
    for path, body, hdrs in (
            ("/v1/balance/info", None, {"Authorization": f"Bearer {token}"}),
            ("/v1/balance/create", {"initial_balance_token": token}, {})):
        status, doc = node.json("GET" if body is None else "POST", path, body, hdrs)
        assert status == 400 and doc["error"]["code"] == "cashu_token_locked", doc
    assert wallet_tool.state(mint_url, token) == ["UNSPENT"] * len(parse_token(token).proofs)
    books(node)


@pytest.mark.parametrize(("options", "tags", "accepted"), [
    ({"pubkey": "NODE", "locktime": "SOON", "refundKeys": [OTHER]},
     {"locktime", "refund"}, True),  # not expired yet
    ({"pubkey": [OTHER, "NODE"], "requiredSignatures": 1},
     {"pubkeys"}, True),  # one of two: the node's
    ({"pubkey": ["NODE", OTHER], "requiredSignatures": 2},
     {"pubkeys", "n_sigs"}, False),  # needs another signature
    ({"pubkey": "NODE", "sigFlag": "SIG_ALL"}, {"sigflag"}, True),  # one signature, whole swap
], ids=["locktime-refund", "one-of-two", "two-of-two", "sig-all"])
def test_cashu_ts_lock_options(options: dict[str, Any], tags: set[str], accepted: bool,
                               node: NodeProcess, node_key: str, cashu_ts: CashuTs) -> None:
    """The secrets cashu-ts's P2PK options write (tags, multisig, refund): redeemed when the
    node's signature alone unlocks them, refused untouched otherwise. (SIG_INPUTS, the default,
    cashu-ts writes as no sigflag tag at all: the plain lock of the tests above.)"""
    def resolve(v: Any) -> Any:
        if isinstance(v, list):
            return [resolve(x) for x in v]
        return {"NODE": node_key, "SOON": int(time.time()) + 3600}.get(v, v) \
            if isinstance(v, str) else v
    [token] = cashu_ts.lock({k: resolve(v) for k, v in options.items()}, 16)
    for p in parse_token(token).proofs:  # the options made it into the secret
        assert {t[0] for t in json.loads(p.secret)[1]["tags"]} >= tags, p.secret
    status, doc = node.json("POST", "/v1/chat/completions", CHAT, {"X-Cashu": token})
    if accepted:
        assert status == 200, doc
        assert cashu_ts.state(token) == {"SPENT"}
    else:
        assert status == 400 and doc["error"]["code"] == "cashu_token_locked", doc
        assert cashu_ts.state(token) == {"UNSPENT"}
    books(node)


def test_the_402_payment_request_decodes_in_cashu_ts(node: NodeProcess, node_key: str,
                                                      cashu_ts: CashuTs, mint_url: str) -> None:
    [small] = cashu_ts.lock(node_key, 1)
    status, headers, raw = node.request("POST", "/v1/chat/completions",
                                        {**CHAT, "max_tokens": 100_000, "model": "gpt-4o"},
                                        {"X-Cashu": small})
    assert status == 402, raw
    details = json.loads(raw)["error"]["details"]
    creqa = headers["x-cashu"]
    assert creqa.startswith("creqA") and details["payment_request"] == creqa
    ours = PaymentRequest.decode(creqa)
    lock = {"kind": "P2PK", "data": node_key, "tags": [["sigflag", "SIG_INPUTS"]]}

    a = cashu_ts.decode(creqa)
    assert a["amount"] == ours.amount and a["amount"] > 1
    assert a["unit"] == "sat" and a["mints"] == [mint_url]
    assert a["nut10"] == lock

    creqb = details["payment_request_creqb"]
    assert creqb.startswith("CREQB1")
    b = cashu_ts.decode(creqb)
    assert {k: b[k] for k in ("id", "amount", "unit", "mints", "singleUse")} \
        == {k: a[k] for k in ("id", "amount", "unit", "mints", "singleUse")}
    # cashu-ts 3.7.1 parses the creqB nut10 TLV but its PaymentRequest.fromEncodedRequest drops
    # it (4.x keeps it); the lock in the CREQB form is checked by tests/test_p2pk.py
    assert b["nut10"] is None
