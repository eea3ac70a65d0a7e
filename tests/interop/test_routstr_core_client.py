"""This node behind a relay that acts as routstr-core does (tests/interop/relay.py).

The chain: the OpenAI SDK → `CoreLikeRelay` (paying from a balance created on this node with a
real token) → this node → the scripted upstream, with the real Nutshell mint. Each test checks
what the relay's user sees, what the relay bills its user (only from `usage`, priced from our
USD `pricing` × its fee ÷ its BTC/USD) and what we charged the relay, per request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai import OpenAI

from routstr.cashu.tokens import parse_token
from routstr.db import Database
from routstr.ledger import Ledger
from routstr.pricing import actual_cost, load_price_table, per_request_model
from tests.interop.relay import CoreLikeRelay, usd_max_cost
from tests.support.minter import Minter
from tests.support.node import NodeProcess
from tests.support.upstream import Behaviour, ScriptedUpstream

pytestmark = pytest.mark.mint

TABLE = load_price_table(None)
MSG = [{"role": "user", "content": "Hello!"}]
FEE = 1.01
DEPOSIT_SATS = 3000
USER_MSATS = 2_000_000
#: BTC/USD rates the relay prices at, with the node pinned at the same rate (its USD `pricing`
#: follows its own rate, issue 18): the relay must then bill exactly our sats × its fee.
NODE_ARGS_FOR_RATE: dict[int, list[str]] = {100_000: ["--btc-usd", "100000"],
                                            150_000: ["--btc-usd", "150000"]}


@pytest.fixture(scope="module", params=sorted(NODE_ARGS_FOR_RATE))
def btc_usd(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture(scope="module")
def node(upstream: ScriptedUpstream, mint_url: str, btc_usd: int,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("corenode"), [
        "--upstream-base-url", upstream.url, "--cashu-mints", mint_url,
        *NODE_ARGS_FOR_RATE[btc_usd]])
    n.start()
    yield n
    n.stop()


@pytest.fixture(scope="module")
def deposit(node: NodeProcess, minter: Minter, mint_url: str) -> dict[str, str]:
    """The relay's balance on this node, bought with a real token (as its operator does)."""
    token = minter.token(mint_url, DEPOSIT_SATS)
    status, doc = node.json("POST", "/v1/balance/create", {"initial_balance_token": token})
    assert status == 200, doc
    return {"token": token, "key": doc["api_key"]}


@pytest.fixture(scope="module")
def relay(node: NodeProcess, deposit: dict[str, str], btc_usd: int) -> Iterator[CoreLikeRelay]:
    with CoreLikeRelay(node.url, deposit["key"], btc_usd, fee=FEE) as r:
        yield r


@pytest.fixture
def user(relay: CoreLikeRelay) -> Iterator[tuple[OpenAI, str]]:
    key = relay.add_user(f"sk-user-{len(relay.users)}", USER_MSATS)
    yield OpenAI(api_key=key, base_url=relay.base_url, max_retries=0), key


def charged_by_node(node: NodeProcess, key: str) -> list[int]:
    """What this node charged the relay's key, per request (settle and charge rows)."""
    db = Database(node.database)
    try:
        from routstr.keys import hash_key
        acct = Ledger(db).get_account(hash_key(key))
        assert acct is not None
        return [r[0] for r in db.read(lambda c: c.execute(
            "SELECT amount_msats FROM txlog WHERE key_id = ? AND kind IN ('settle', 'charge')"
            " ORDER BY id", (acct.id,)).fetchall())]
    finally:
        db.close()


def relay_price(node_msats: int | float, btc_usd: int) -> float:
    """What the relay should bill for a request we charged `node_msats`: our USD price is our
    msats at our rate (the node is pinned at `btc_usd` too) → × fee ÷ its own rate (the same):
    our sats × its fee, at every rate."""
    del btc_usd
    return float(node_msats) * FEE


def test_chat_billed_from_usage_on_both_sides(relay: CoreLikeRelay, node: NodeProcess,
                                               deposit: dict[str, str],
                                               user: tuple[OpenAI, str], btc_usd: int) -> None:
    client, key = user
    before = len(charged_by_node(node, deposit["key"]))
    r = client.chat.completions.create(model="gpt-4o-mini", messages=MSG)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "Hello from upstream!"
    ours = charged_by_node(node, deposit["key"])[before:]
    assert ours == [actual_cost(TABLE.at(btc_usd).get("gpt-4o-mini"), 12, 5).total_msats]
    billed = relay.users[key].charges
    assert billed[0] == pytest.approx(relay_price(ours[0], btc_usd), abs=1)


def test_stream_every_chunk_iterates_and_is_billed(relay: CoreLikeRelay, node: NodeProcess,
                                                   deposit: dict[str, str],
                                                   user: tuple[OpenAI, str],
                                                   btc_usd: int) -> None:
    """The relay holds [DONE] back and re-emits it last: nothing of ours may follow the last
    event (it used to: `event: routstr-cost` became a chunk with choices None)."""
    client, key = user
    before = len(charged_by_node(node, deposit["key"]))
    text, last = "", None
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MSG,  # type: ignore[arg-type]
                                            stream=True)
    for chunk in stream:
        for c in chunk.choices:  # a chunk with choices=None raised TypeError here
            text += c.delta.content or ""
        last = chunk
    assert text == "Hello from upstream!"
    assert last is not None and last.usage is not None
    ours = charged_by_node(node, deposit["key"])[before:]
    assert len(ours) == 1 and ours[0] > 0
    assert relay.users[key].charges == [pytest.approx(relay_price(ours[0], btc_usd), abs=1)]


def test_cut_stream_is_billed_what_we_charged(relay: CoreLikeRelay, node: NodeProcess,
                                              deposit: dict[str, str], upstream: ScriptedUpstream,
                                              user: tuple[OpenAI, str], btc_usd: int) -> None:
    """A stream the upstream cuts is charged an estimate here; the usage chunk saying so comes
    before the error event, so the relay bills its user that much, not 0."""
    client, key = user
    before = len(charged_by_node(node, deposit["key"]))
    upstream.enqueue(Behaviour(fail_after_events=3))
    got = ""
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(model="gpt-4o-mini",  # type: ignore[arg-type]
                                                    messages=MSG, stream=True):
            for c in chunk.choices:
                got += c.delta.content or ""
    assert got  # part of the answer was relayed
    ours = charged_by_node(node, deposit["key"])[before:]
    assert len(ours) == 1 and ours[0] > 0
    # The SDK raises at the error event; the relay settles once the node's stream has ended,
    # in its own thread: wait (bounded) for that rather than race it.
    deadline = time.monotonic() + 10
    while not relay.users[key].charges and time.monotonic() < deadline:
        time.sleep(0.02)
    assert relay.users[key].charges == [pytest.approx(relay_price(ours[0], btc_usd), abs=1)]


def test_responses_stream_passes_whole(relay: CoreLikeRelay, node: NodeProcess,
                                       deposit: dict[str, str], user: tuple[OpenAI, str],
                                       btc_usd: int) -> None:
    client, key = user
    before = len(charged_by_node(node, deposit["key"]))
    types = [e.type for e in client.responses.create(model="gpt-4o-mini", input="Hello!",
                                                     stream=True)]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    ours = charged_by_node(node, deposit["key"])[before:]
    assert len(ours) == 1 and ours[0] > 0
    assert relay.users[key].charges == [pytest.approx(relay_price(ours[0], btc_usd), abs=1)]


@pytest.mark.parametrize("model", ["dall-e-3", "whisper-1"])
def test_images_and_audio_pass_the_relays_max_cost(model: str, relay: CoreLikeRelay,
                                                    node: NodeProcess, deposit: dict[str, str],
                                                    user: tuple[OpenAI, str],
                                                    btc_usd: int) -> None:
    """Its reservation, derived from our catalogue, is our price (not request × 100 000, which
    it refused with 402), and the request goes through."""
    client, _ = user
    before = len(charged_by_node(node, deposit["key"]))
    if model == "dall-e-3":
        img = client.images.generate(model=model, prompt="a lighthouse", n=1)
        assert img.data
    else:
        tr = client.audio.transcriptions.create(model=model, file=("a.wav", b"RIFF" + b"\0" * 60))
        assert tr.text.startswith("transcribed")
    price = TABLE.at(btc_usd).get(model)
    ours = charged_by_node(node, deposit["key"])[before:]
    assert ours == [-(-price.request_msats // 1)]
    reserved = [r for m, r in relay.reservations if m == model][-1]
    assert reserved == pytest.approx(relay_price(price.request_msats, btc_usd) * 0.99, rel=0.02)


def test_prices_agree_with_ours_for_every_token_model(relay: CoreLikeRelay, node: NodeProcess,
                                                      btc_usd: int) -> None:
    """Its sats per token (from our USD `pricing`, × fee ÷ its rate) are ours × fee, and its
    max cost of each model is ours × fee, within rounding."""
    status, doc = node.json("GET", "/v1/models")
    assert status == 200
    for m in doc["data"]:
        price = TABLE.at(btc_usd).get(m["id"])
        if per_request_model(price):  # images, audio: one output unit per request (above)
            continue
        core = relay.models[m["id"]]
        assert core.prompt * 1e6 == pytest.approx(
            relay_price(price.input_msats_per_1k, btc_usd), rel=1e-9, abs=1e-9), m["id"]
        assert core.completion * 1e6 == pytest.approx(
            relay_price(price.output_msats_per_1k, btc_usd), rel=1e-9, abs=1e-9), m["id"]
        usd_per_sat = btc_usd / 100_000_000
        assert core.max_cost == pytest.approx(usd_max_cost(m) * FEE / usd_per_sat)
        assert core.max_cost * 1000 == pytest.approx(
            relay_price(float(m["sats_pricing"]["max_cost"]) * 1000, btc_usd), rel=0.02)


def test_money_reconciles_at_the_mint(relay: CoreLikeRelay, node: NodeProcess,
                                      deposit: dict[str, str], minter: Minter, mint_url: str,
                                      wallet_tool: Any) -> None:
    """Last: what the relay deposited = what we charged it + what it gets back, to the sat,
    the deposit spent at the mint and the refund redeemable by the Nutshell wallet."""
    charged = sum(charged_by_node(node, deposit["key"]))
    assert charged > 0
    assert set(minter.state(mint_url, deposit["token"])) == {"SPENT"}
    balance = relay.node_balance_msats()
    assert balance == DEPOSIT_SATS * 1000 - charged
    refund = relay.refund_from_node()
    assert parse_token(refund["token"]).amount == balance // 1000
    assert wallet_tool.receive(mint_url, refund["token"]) == balance // 1000
    db = Database(node.database)
    try:
        totals = Ledger(db).check_invariant()
    finally:
        db.close()
    assert totals["deposited_msats"] >= DEPOSIT_SATS * 1000
    assert json.dumps(totals)  # the invariant holds (check_invariant raises otherwise)
