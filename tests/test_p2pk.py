"""Payments locked to the node's key (NUT-10/11 P2PK), against the real Nutshell mint and wallet.

A token locked to the key in `/v1/info.cashu_p2pk_pubkey` is redeemed by the node's signature;
a copy is worthless to anyone else. Tokens locked otherwise are refused with 400 before any mint
call, untouched. The 402 payment request asks for the lock (NUT-18 `nut10`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from routstr.cashu.bech32 import bech32_decode
from routstr.cashu.tokens import PaymentRequest, parse_token
from routstr.db import Database
from routstr.ledger import Ledger
from tests.support.node import NodeProcess
from tests.support.upstream import ScriptedUpstream

pytestmark = pytest.mark.mint

MSG = [{"role": "user", "content": "Hello!"}]
CHAT = {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 100}
OTHER = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"


@pytest.fixture(scope="module")
def node(upstream: ScriptedUpstream, mint_url: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("p2pknode"), [
        "--upstream-base-url", upstream.url, "--cashu-mints", mint_url])
    n.start()
    yield n
    n.stop()


@pytest.fixture(scope="module")
def node_key(node: NodeProcess) -> str:
    status, info = node.json("GET", "/v1/info")
    assert status == 200
    key = info["cashu_p2pk_pubkey"]
    assert isinstance(key, str) and len(key) == 66 and key[:2] in ("02", "03")
    return key


def books(node: NodeProcess) -> None:
    db = Database(node.database)
    try:
        Ledger(db).check_invariant()
    finally:
        db.close()


def test_the_key_is_the_wallets_and_survives_a_restart(node_factory: Any, mint_url: str,
                                                       upstream: ScriptedUpstream) -> None:
    n = node_factory("--upstream-base-url", upstream.url, "--cashu-mints", mint_url)
    first = n.json("GET", "/v1/info")[1]["cashu_p2pk_pubkey"]
    n.stop()
    again = node_factory("--upstream-base-url", upstream.url, "--cashu-mints", mint_url,
                         workdir=n.workdir)
    assert again.json("GET", "/v1/info")[1]["cashu_p2pk_pubkey"] == first
    (n.workdir / "bare").mkdir()
    bare = node_factory("--upstream-base-url", upstream.url, workdir=n.workdir / "bare")
    assert bare.json("GET", "/v1/info")[1]["cashu_p2pk_pubkey"] is None  # no mints, no key


def test_xcashu_locked_to_the_node_pays_and_gets_change(node: NodeProcess, node_key: str,
                                                        mint_url: str, wallet_tool: Any) -> None:
    token = wallet_tool.lock(mint_url, 64, node_key)
    assert '"P2PK"' in parse_token(token).proofs[0].secret
    status, headers, raw = node.request("POST", "/v1/chat/completions", CHAT,
                                        {"X-Cashu": token})
    assert status == 200, raw
    assert wallet_tool.state(mint_url, token) == ["SPENT"] * len(parse_token(token).proofs)
    assert wallet_tool.receive(mint_url, headers["x-cashu"]) > 0  # plain change
    books(node)


def test_bearer_and_create_with_locked_tokens(node: NodeProcess, node_key: str, mint_url: str,
                                              wallet_tool: Any) -> None:
    token = wallet_tool.lock(mint_url, 50, node_key)
    status, doc = node.json("GET", "/v1/balance/info", headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and doc["balance"] == 50_000, doc
    other = wallet_tool.lock(mint_url, 40, node_key)
    status, doc = node.json("POST", "/v1/balance/create", {"initial_balance_token": other})
    assert status == 200 and doc["balance"] == 40_000, doc
    status, doc = node.json("POST", "/v1/chat/completions", CHAT,
                            {"Authorization": f"Bearer {doc['api_key']}"})
    assert status == 200
    books(node)


@pytest.mark.parametrize("spec", [
    {"pubkey": OTHER},  # someone else's
    {"pubkey": "NODE", "pubkeys": [OTHER], "n_sigs": 2},  # needs two signatures
    {"pubkey": "NODE", "locktime": 1_000, "refund": [OTHER]},  # expired, the sender can reclaim
    {"pubkey": OTHER, "sig_all": True},
], ids=["another-key", "two-of-two", "expired-with-refund", "sig-all-another-key"])
def test_tokens_the_node_cannot_redeem_are_refused_untouched(
        spec: dict[str, Any], node: NodeProcess, node_key: str, mint_url: str,
        wallet_tool: Any) -> None:
    spec = {**spec, "pubkey": node_key if spec["pubkey"] == "NODE" else spec["pubkey"]}
    token = wallet_tool.lock(mint_url, 30, **spec)
    n_proofs = len(parse_token(token).proofs)
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
    assert wallet_tool.state(mint_url, token) == ["UNSPENT"] * n_proofs
    books(node)


def _pays_sig_all(node: NodeProcess, mint: str, tool: Any) -> None:
    """A SIG_ALL token of several proofs pays as X-Cashu (change back) and as a Bearer key."""
    key = node.json("GET", "/v1/info")[1]["cashu_p2pk_pubkey"]
    token = tool.lock(mint, 63, key, sig_all=True)  # 32+16+8+4+2+1: one signature for six
    proofs = parse_token(token).proofs
    assert len(proofs) > 1 and all('"SIG_ALL"' in p.secret for p in proofs)
    status, headers, raw = node.request("POST", "/v1/chat/completions", CHAT, {"X-Cashu": token})
    assert status == 200, raw
    assert tool.state(mint, token) == ["SPENT"] * len(proofs)
    assert tool.receive(mint, headers["x-cashu"]) > 0
    bearer = tool.lock(mint, 40, key, sig_all=True)
    status, doc = node.json("GET", "/v1/balance/info",
                            headers={"Authorization": f"Bearer {bearer}"})
    assert status == 200 and doc["balance"] == 40_000, doc
    books(node)


def test_sig_all_pays_on_a_mint_of_the_current_nut11(
        upstream: ScriptedUpstream, mint_url_current: str, wallet_tool_current: Any,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    n = NodeProcess(tmp_path_factory.mktemp("sigallnode"), [
        "--upstream-base-url", upstream.url, "--cashu-mints", mint_url_current])
    n.start()
    try:
        _pays_sig_all(n, mint_url_current, wallet_tool_current)
    finally:
        n.stop()


def test_sig_all_pays_on_a_mint_of_the_older_message(node: NodeProcess, mint_url: str,
                                                      wallet_tool: Any) -> None:
    """Nutshell 0.19 signs SIG_ALL over the secrets and the B_ only: it refuses the current
    message, and the wallet's one retry with the older message is taken."""
    _pays_sig_all(node, mint_url, wallet_tool)


def test_a_thief_with_a_copy_gets_nothing(node: NodeProcess, node_key: str, mint_url: str,
                                          wallet_tool: Any) -> None:
    """A locked payment copied on its way (a proxy, a log): another wallet cannot redeem it;
    the node still can; replayed to the node after that, it is just spent."""
    token = wallet_tool.lock(mint_url, 32, node_key)
    with pytest.raises(RuntimeError):  # Nutshell's wallet, its own key: the mint refuses
        wallet_tool.receive_locked(mint_url, token)
    assert set(wallet_tool.state(mint_url, token)) == {"UNSPENT"}
    status, doc = node.json("POST", "/v1/chat/completions", CHAT, {"X-Cashu": token})
    assert status == 200, doc
    status, doc = node.json("POST", "/v1/chat/completions", CHAT, {"X-Cashu": token})
    assert status == 400 and doc["error"]["code"] == "cashu_token_already_spent"
    status, doc = node.json("GET", "/v1/balance/info",
                            headers={"Authorization": f"Bearer {token}"})
    assert status == 401 or doc.get("balance", 0) == 0, doc  # opens no key for the thief
    books(node)


def test_the_402_asks_for_a_payment_locked_to_the_node(node: NodeProcess, node_key: str,
                                                       mint_url: str, wallet_tool: Any) -> None:
    small = wallet_tool.lock(mint_url, 1, node_key)
    status, headers, raw = node.request("POST", "/v1/chat/completions",
                                        {**CHAT, "max_tokens": 100_000, "model": "gpt-4o"},
                                        {"X-Cashu": small})
    assert status == 402, raw
    req = PaymentRequest.decode(headers["x-cashu"])
    assert req.nut10 is not None and req.nut10.kind == "P2PK" and req.nut10.data == node_key
    assert ("sigflag", "SIG_INPUTS") in req.nut10.tags
    details = json.loads(raw)["error"]["details"]
    assert details["payment_request"] == headers["x-cashu"]
    # the NUT-26 form of the same request: bech32m, the lock's key inside its TLV
    creqb = details["payment_request_creqb"]
    assert creqb.startswith("CREQB1")
    hrp, tlv = bech32_decode(creqb, m=True, max_chars=10_000)
    assert hrp == "creqb" and node_key.encode() in tlv and mint_url.encode() in tlv
    assert int.from_bytes(tlv[tlv.index(b"\x02\x00\x08") + 3:][:8], "big") == req.amount


# ---- change and refunds locked to the client's key (X-Cashu-Lock) ------------------------------
@pytest.fixture(scope="module")
def client_wallet(tmp_path_factory: pytest.TempPathFactory, mint_url: str,
                  wallet_tool: Any) -> tuple[str, str]:
    """A Nutshell wallet kept on disk: (its directory, its P2PK public key)."""
    d = str(tmp_path_factory.mktemp("client-wallet"))
    return d, wallet_tool.pubkey(mint_url, d)


def locked_to(token: str) -> set[str]:
    keys = set()
    for p in parse_token(token).proofs:
        kind, body = json.loads(p.secret)
        assert kind == "P2PK"
        keys.add(body["data"])
    return keys


def test_xcashu_change_locked_to_the_clients_key(node: NodeProcess, mint_url: str,
                                                 wallet_tool: Any,
                                                 client_wallet: tuple[str, str]) -> None:
    wallet_dir, client_key = client_wallet
    token = wallet_tool.mint_token(mint_url, 60)
    status, headers, raw = node.request("POST", "/v1/chat/completions", CHAT,
                                        {"X-Cashu": token, "X-Cashu-Lock": client_key})
    assert status == 200, raw
    change = headers["x-cashu"]
    assert locked_to(change) == {client_key}
    amount = parse_token(change).amount
    with pytest.raises(RuntimeError):  # anyone else (a fresh wallet): the mint refuses
        wallet_tool.receive_locked(mint_url, change)
    assert wallet_tool.receive_locked(mint_url, change, wallet_dir) == amount  # the client
    # recovered change is the same locked token
    status, doc = node.json("POST", "/v1/balance/refund", headers={"X-Cashu": token})
    assert status == 200 and doc["token"] == change
    books(node)


def test_stream_head_change_and_key_refund_locked(node: NodeProcess, mint_url: str,
                                                  wallet_tool: Any,
                                                  client_wallet: tuple[str, str]) -> None:
    wallet_dir, client_key = client_wallet
    token = wallet_tool.mint_token(mint_url, 200)
    body = {**CHAT, "stream": True, "max_tokens": 2000}
    status, headers, raw = node.request("POST", "/v1/chat/completions", body,
                                        {"X-Cashu": token, "X-Cashu-Lock": client_key})
    assert status == 200
    assert locked_to(headers["x-cashu"]) == {client_key}  # the split-off part, in the head
    key_token = wallet_tool.mint_token(mint_url, 30)
    auth = {"Authorization": f"Bearer {key_token}"}
    assert node.json("GET", "/v1/balance/info", headers=auth)[0] == 200
    status, doc = node.json("POST", "/v1/balance/refund", headers={**auth,
                                                                   "X-Cashu-Lock": client_key})
    assert status == 200 and locked_to(doc["token"]) == {client_key}
    assert wallet_tool.receive_locked(mint_url, doc["token"], wallet_dir) == 30
    books(node)


@pytest.mark.parametrize("bad", ["nope", "04" + "11" * 32, "02" + "00" * 32, "02" + "ab" * 31])
def test_a_bad_lock_header_is_400_and_nothing_is_spent(bad: str, node: NodeProcess,
                                                       mint_url: str, wallet_tool: Any) -> None:
    token = wallet_tool.mint_token(mint_url, 20)
    status, doc = node.json("POST", "/v1/chat/completions", CHAT,
                            {"X-Cashu": token, "X-Cashu-Lock": bad})
    assert status == 400 and doc["error"]["code"] == "invalid_header", doc
    assert set(wallet_tool.state(mint_url, token)) == {"UNSPENT"}
