"""Hostile uses of the Cashu wallet paths (issue 16, classes 4-7 and 10b): the real node, the
real Nutshell mint, real sockets. Every test checks money per request, not only the books."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routstr.cashu.tokens import parse_token
from routstr.cashupay import xcashu_key_hash
from routstr.db import Database
from routstr.ledger import Ledger
from tests.support.minter import Minter
from tests.support.node import NodeProcess
from tests.support.upstream import ScriptedUpstream

pytestmark = pytest.mark.mint

ADMIN = "hostile-wallet-admin"
MSG = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def minter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Minter]:
    m = Minter(tmp_path_factory.mktemp("minter"))
    yield m
    m.close()


@pytest.fixture(scope="module")
def node(upstream: ScriptedUpstream, mint_url: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("hostile-wallet"), [
        "--upstream-base-url", upstream.url, "--admin-token", ADMIN, "--cashu-mints", mint_url])
    n.start()
    yield n
    n.stop()


def books(node: NodeProcess) -> dict[str, int]:
    """Conservation, and the wallet holds at least what the node owes its users."""
    db = Database(node.database)
    try:
        totals = Ledger(db).check_invariant()
        held = db.read(lambda c: c.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM wallet_proofs WHERE state = 'unspent'"
        ).fetchone()[0])
        assert held * 1000 >= totals["liability_msats"], (held, totals)
        return totals
    finally:
        db.close()


def txlog(node: NodeProcess, key_hash: str) -> list[tuple[str, int]]:
    db = Database(node.database)
    try:
        acct = Ledger(db).get_account(key_hash)
        if acct is None:
            return []
        return db.read(lambda c: c.execute(
            "SELECT kind, amount_msats FROM txlog WHERE key_id = ? ORDER BY id", (acct.id,)
        ).fetchall())
    finally:
        db.close()


# ---- class 4: one token, many parallel X-Cashu requests ---------------------------------------
def test_one_xcashu_token_in_parallel_each_request_served_exactly_or_refused(
        node: NodeProcess, minter: Minter, mint_url: str, wallet_tool: Any) -> None:
    """N threads post the same X-Cashu token at once. Each answer is either a 200 charged
    exactly its cost with its own change (redeemable at the mint), or a refusal with nothing
    charged; change + charges (+ the sub-sat rounding) add up to the token's value."""
    value_sats, n = 40, 8
    for _round in range(4):
        token = minter.token(mint_url, value_sats)
        body = {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 50}

        def call(_: int, token: str = token, body: dict[str, Any] = body
                 ) -> tuple[int, dict[str, str], bytes]:
            return node.request("POST", "/v1/chat/completions", body, {"X-Cashu": token})

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(call, range(n)))
        served = [(h, raw) for s, h, raw in answers if s == 200]
        refused = [(s, h, raw) for s, h, raw in answers if s != 200]
        assert served, [(s, raw[:200]) for s, _, raw in answers]
        charged = 0
        change_msats = 0
        changes = []
        for headers, raw in served:
            cost = int(headers["x-routstr-cost-msats"])
            assert cost > 0
            assert "x-cashu" in headers, "a served request got no change"
            change = headers["x-cashu"]
            assert change not in changes, "two requests were handed the same change"
            changes.append(change)
            amount = parse_token(change).amount
            change_msats += amount * 1000
            charged += cost
        for status, headers, raw in refused:
            err = json.loads(raw)["error"]
            assert status in (400, 402, 425), (status, err)
            assert "x-routstr-cost-msats" not in headers
            assert "x-cashu" not in headers or status == 402, (status, err)
        for change in changes:
            assert wallet_tool.receive(mint_url, change) == parse_token(change).amount
        log = txlog(node, xcashu_key_hash(token))
        kinds = [k for k, _ in log]
        assert kinds.count("deposit") == 1
        settled = sum(a for k, a in log if k == "settle")
        rounding = sum(a for k, a in log if k == "charge")
        assert settled == charged, (log, [(s, raw[:120]) for s, _, raw in answers])
        assert 0 <= rounding < 1000
        assert change_msats + charged + rounding == value_sats * 1000, log
    books(node)
