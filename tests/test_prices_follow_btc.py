"""Prices that follow BTC/USD (issue 18): USD list prices billed at a live rate, exactly.

The node runs for real on 127.0.0.1; its price feed asks scripted exchange servers
(tests/support/exchange.py) — honest, lying, slow, down, behind a SOCKS proxy — or is pinned.
Each charge is checked to the msat against the list price computed here by hand:

    msats per 1,000 tokens = USD per 1M tokens × markup × 10⁸ / (USD per BTC)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from routstr.db import Database
from routstr.keys import hash_key
from routstr.ledger import Ledger
from tests.support.exchange import Exchange
from tests.support.node import NodeProcess
from tests.support.socks5 import Socks5Server
from tests.support.upstream import Behaviour, ScriptedUpstream

ADMIN = "btc-admin"
MSG = [{"role": "user", "content": "Hello!"}]
GPT4 = ("30", "60")  # gpt-4's list price, $ per 1M tokens in / out (routstr/prices.toml)


def by_hand(usd: tuple[str, str], rate: int | str | Fraction, prompt: int = 12,
            completion: int = 5, markup: str = "1") -> int:
    """The charge for the scripted upstream's usage (12 / 5 tokens), by the formula above."""
    k = Fraction(markup) * 10**8 / Fraction(rate)
    total = prompt * Fraction(usd[0]) * k + completion * Fraction(usd[1]) * k
    return -(-total // 1000)


def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


@pytest.fixture
def exchange() -> Iterator[Exchange]:
    with Exchange() as ex:
        yield ex


def start(node_factory: Any, upstream: ScriptedUpstream, *args: str, **kw: Any) -> NodeProcess:
    node: NodeProcess = node_factory("--upstream-base-url", upstream.url, "--admin-token", ADMIN,
                                     *args, **kw)
    return node


def key(node: NodeProcess, msats: int = 10_000_000) -> str:
    status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": msats},
                            {"Authorization": f"Bearer {ADMIN}"})
    assert status == 201
    return str(doc["api_key"])


def chat(node: NodeProcess, api_key: str, model: str = "gpt-4") -> tuple[int, Any]:
    return node.json("POST", "/v1/chat/completions", {"model": model, "messages": MSG},
                     {"Authorization": f"Bearer {api_key}"})


def charged(node: NodeProcess, api_key: str) -> list[int]:
    db = Database(node.database)
    try:
        acct = Ledger(db).get_account(hash_key(api_key))
        assert acct is not None
        assert acct.reserved_msats == 0
        return [r[0] for r in db.read(lambda c: c.execute(
            "SELECT amount_msats FROM txlog WHERE key_id = ? AND kind = 'settle' ORDER BY id",
            (acct.id,)).fetchall())]
    finally:
        db.close()


def rate_of(node: NodeProcess) -> str | None:
    status, info = node.json("GET", "/v1/info")
    assert status == 200
    return info["btc_usd"]["usd_per_btc"]  # type: ignore[no-any-return]


def model(node: NodeProcess, model_id: str) -> dict[str, Any]:
    status, doc = node.json("GET", "/v1/models")
    assert status == 200
    return next(m for m in doc["data"] if m["id"] == model_id)  # type: ignore[no-any-return]


# ---- the feed ------------------------------------------------------------------------------
def test_the_rate_is_the_median_of_honest_sources_a_liar_is_ignored(
        node_factory: Any, upstream: ScriptedUpstream, exchange: Exchange) -> None:
    exchange.set("coinbase", rate="100000")
    exchange.set("kraken", rate="100200")
    exchange.set("bitstamp", rate="1000000")  # ten times the others
    node = start(node_factory, upstream, "--price-feeds",
                 exchange.feeds("coinbase", "kraken", "bitstamp"))
    assert wait_for(lambda: rate_of(node)) == "100100"
    status, info = node.json("GET", "/v1/info")
    assert info["btc_usd"]["sources"] == ["coinbase", "kraken"] and not info["btc_usd"]["pinned"]
    k = key(node)
    status, doc = chat(node, k)
    assert status == 200, doc
    assert charged(node, k) == [by_hand(GPT4, 100100)]
    m = model(node, "gpt-4")
    assert m["pricing"]["prompt"] == pytest.approx(30e-6, rel=1e-12)  # the list price, in USD
    assert m["sats_pricing"]["prompt"] == pytest.approx(30e-6 * 1e8 / 100100, rel=1e-12)
    assert "routstr_btc_usd 100100" in node.request(
        "GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})[2].decode()


def test_a_slow_source_does_not_hold_the_rate(node_factory: Any, upstream: ScriptedUpstream,
                                              exchange: Exchange) -> None:
    exchange.set("bitstamp", delay_s=20.0)
    exchange.set("coinbase", rate="90000")
    exchange.set("kraken", rate="90010")
    node = start(node_factory, upstream, "--price-refresh", "2", "--price-feeds",
                 exchange.feeds("coinbase", "kraken", "bitstamp"))
    assert wait_for(lambda: rate_of(node), timeout=6) == "90005"
    status, doc = node.json("GET", "/health")
    assert doc["checks"]["btc_usd"] == "ok"


def test_no_rate_usd_models_refused_msat_models_served_until_a_source_answers(
        node_factory: Any, upstream: ScriptedUpstream, exchange: Exchange,
        tmp_path: Path) -> None:
    for name in ("coinbase", "kraken"):
        exchange.set(name, status=503)
    exchange.set("bitstamp", body=b'{"last": "NaN"}')  # malformed: no rate either
    pricing = tmp_path / "prices.toml"
    pricing.write_text('[models."local-fixed"]\ninput_msats_per_1k = 1000\n'
                       'output_msats_per_1k = 2000\nmax_output_tokens = 100\n'
                       'context_length = 4000\n')
    node = start(node_factory, upstream, "--price-refresh", "1", "--pricing", str(pricing),
                 "--price-feeds", exchange.feeds("coinbase", "kraken", "bitstamp"))
    k = key(node)
    wait_for(lambda: exchange.hits["coinbase"] >= 1)
    status, doc = chat(node, k)
    assert status == 503 and doc["error"]["code"] == "price_unavailable", doc
    assert charged(node, k) == []  # nothing reserved, nothing charged
    status, doc = chat(node, k, "local-fixed")
    assert status == 200 and charged(node, k) == [-(-(12 * 1000 + 5 * 2000) // 1000)]
    status, health = node.json("GET", "/health")
    assert status == 200 and health["status"] == "degraded"
    assert "no BTC/USD rate" in health["reasons"][0] and "coinbase" in health["reasons"][0]
    assert model(node, "gpt-4")["sats_pricing"] is None  # clients skip it
    assert model(node, "local-fixed")["sats_pricing"]["prompt"] == 0.001
    exchange.set("kraken", status=200, rate="120000")  # one source back
    assert wait_for(lambda: rate_of(node)) == "120000"
    status, doc = chat(node, k)
    assert status == 200 and charged(node, k)[-1] == by_hand(GPT4, 120000)
    # the rate is fine again (the node stays degraded for its missing mint, a reason of its own)
    health = node.json("GET", "/health")[1]
    assert health["checks"]["btc_usd"] == "ok"
    assert not any("BTC/USD" in r for r in health["reasons"]), health


def test_a_stale_rate_is_kept_and_marks_health_degraded(
        node_factory: Any, upstream: ScriptedUpstream, exchange: Exchange) -> None:
    exchange.set("coinbase", rate="80000")
    node = start(node_factory, upstream, "--price-refresh", "1", "--price-max-age", "2",
                 "--price-feeds", exchange.feeds("coinbase"))
    assert wait_for(lambda: rate_of(node)) == "80000"
    exchange.set("coinbase", status=500)
    health = wait_for(lambda: (lambda d: d if d["checks"]["btc_usd"] == "degraded" else None)(
        node.json("GET", "/health")[1]), timeout=8)
    assert health["status"] == "degraded"
    assert "s old" in health["reasons"][0] and health["btc_usd"]["usd_per_btc"] == "80000"
    k = key(node)
    status, _ = chat(node, k)  # still served, at the last rate
    assert status == 200 and charged(node, k) == [by_hand(GPT4, 80000)]


def test_the_feed_goes_through_the_upstream_proxy(node_factory: Any, upstream: ScriptedUpstream,
                                                  exchange: Exchange) -> None:
    """A Tor node asks the exchanges through Tor: the name reaches the proxy, not DNS."""
    exchange.set("kraken", rate="95000")
    with Socks5Server({"rates.example": ("127.0.0.1", exchange.port),
                       "127.0.0.1": ("127.0.0.1", upstream.port)}) as socks:
        node = start(node_factory, upstream, "--upstream-proxy", socks.url, "--price-feeds",
                     f"kraken={exchange.url('kraken', host='rates.example')}")
        assert wait_for(lambda: rate_of(node)) == "95000"
        assert "rates.example" in socks.requested_hosts


def test_a_pinned_rate_never_asks_and_never_moves(node_factory: Any, upstream: ScriptedUpstream,
                                                  exchange: Exchange) -> None:
    node = start(node_factory, upstream, "--btc-usd", "150000", "--price-feeds",
                 exchange.feeds("coinbase"))
    k = key(node)
    status, _ = chat(node, k)
    assert status == 200 and charged(node, k) == [by_hand(GPT4, 150000)]
    status, info = node.json("GET", "/v1/info")
    assert info["btc_usd"] == {"usd_per_btc": "150000", "age_s": None, "sources": ["pinned"],
                               "pinned": True}
    time.sleep(1.0)
    assert exchange.hits["coinbase"] == 0


def test_one_rate_per_request_across_a_refresh(node_factory: Any, upstream: ScriptedUpstream,
                                               exchange: Exchange) -> None:
    """A request reserved at one rate is settled at that rate, whatever refresh happens while
    it runs; the next request pays the new rate."""
    exchange.set("coinbase", rate="100000")
    node = start(node_factory, upstream, "--price-refresh", "1", "--price-feeds",
                 exchange.feeds("coinbase"))
    assert wait_for(lambda: rate_of(node)) == "100000"
    k = key(node)
    upstream.enqueue(Behaviour(delay_s=4.0))
    seen = len(upstream.requests)
    import threading
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(chat(node, k)))
    t.start()
    wait_for(lambda: len(upstream.requests) > seen)  # reserved and forwarded at 100 000
    exchange.set("coinbase", rate="50000")
    assert wait_for(lambda: rate_of(node) == "50000", timeout=3)
    t.join(10)
    assert result and result[0][0] == 200
    assert charged(node, k) == [by_hand(GPT4, 100000)]
    status, _ = chat(node, k)
    assert charged(node, k) == [by_hand(GPT4, 100000), by_hand(GPT4, 50000)]
    assert by_hand(GPT4, 50000) == 2 * by_hand(GPT4, 100000)


def test_a_restart_starts_from_the_last_rate(node_factory: Any, upstream: ScriptedUpstream,
                                             exchange: Exchange) -> None:
    exchange.set("bitstamp", rate="77777.5")
    node = start(node_factory, upstream, "--price-feeds", exchange.feeds("bitstamp"))
    assert wait_for(lambda: rate_of(node)) == "77777.5"
    node.stop()
    exchange.set("bitstamp", status=500)
    again = start(node_factory, upstream, "--price-feeds", exchange.feeds("bitstamp"),
                  workdir=node.workdir)
    assert rate_of(again) == "77777.5"  # at once, from the database
    k = key(again)
    status, _ = chat(again, k)
    assert status == 200 and charged(again, k) == [by_hand(GPT4, "77777.5")]


def test_markup_applies_to_usd_entries_only(node_factory: Any, upstream: ScriptedUpstream,
                                            tmp_path: Path) -> None:
    pricing = tmp_path / "prices.toml"
    pricing.write_text('[models."local-fixed"]\ninput_msats_per_1k = 1000\n'
                       'output_msats_per_1k = 2000\nmax_output_tokens = 100\n'
                       'context_length = 4000\n')
    node = start(node_factory, upstream, "--btc-usd", "100000", "--price-markup", "1.25",
                 "--pricing", str(pricing))
    k = key(node)
    chat(node, k)
    chat(node, k, "local-fixed")
    assert charged(node, k) == [by_hand(GPT4, 100000, markup="1.25"), 22]
    assert model(node, "gpt-4")["pricing"]["prompt"] == pytest.approx(30e-6 * 1.25, rel=1e-12)


@pytest.mark.parametrize("rate", [50_000, 100_000, 150_000])
def test_published_prices_and_charges_at_three_rates(node_factory: Any, upstream: ScriptedUpstream,
                                                     rate: int) -> None:
    """What /v1/models publishes at a rate is what a request is charged at it: `pricing` (USD)
    stays the list price, `sats_pricing` moves inversely with the rate, the charge follows."""
    node = start(node_factory, upstream, "--btc-usd", str(rate))
    m = model(node, "gpt-4")
    usd, sats = m["pricing"], m["sats_pricing"]
    assert usd["prompt"] == pytest.approx(30e-6, rel=1e-12)
    assert usd["completion"] == pytest.approx(60e-6, rel=1e-12)
    assert sats["prompt"] == pytest.approx(30e-6 * 1e8 / rate, rel=1e-12)
    assert sats["max_cost"] * rate / 1e8 == pytest.approx(usd["max_cost"], rel=1e-12)
    k = key(node)
    status, doc = chat(node, k)
    assert status == 200
    assert charged(node, k) == [by_hand(GPT4, rate)]
    assert doc["usage"]["cost"]["total_msats"] == by_hand(GPT4, rate)


# ---- cache-aware billing ----------------------------------------------------------------------
LONG = [{"role": "user", "content": "word " * 500}]  # room for 2 000 prompt tokens


def test_openai_cached_prompt_tokens_at_the_cached_rate(node_factory: Any,
                                                        upstream: ScriptedUpstream) -> None:
    node = start(node_factory, upstream)  # pinned at 100 000 USD/BTC (tests/support/node.py)
    k = key(node)
    upstream.enqueue(Behaviour(usage={"prompt_tokens": 2000, "completion_tokens": 10,
                                      "total_tokens": 2010,
                                      "prompt_tokens_details": {"cached_tokens": 1500},
                                      "completion_tokens_details": {"reasoning_tokens": 4}}))
    status, doc = node.json("POST", "/v1/chat/completions",
                            {"model": "gpt-4o-mini", "messages": LONG},
                            {"Authorization": f"Bearer {k}"})
    assert status == 200, doc
    # gpt-4o-mini: $0.15 in, $0.075 cached, $0.60 out per 1M = 150 / 75 / 600 msats per 1k;
    # the 4 reasoning tokens are inside the 10 completion tokens: counted once
    assert charged(node, k) == [-(-(500 * 150 + 1500 * 75 + 10 * 600) // 1000)] == [194]
    cost = doc["usage"]["cost"]
    assert cost["cache_read_msats"] == 112 and cost["output_msats"] == 6
    assert cost["input_msats"] == 194 - 112 - 6 and cost["cache_creation_msats"] == 0


def test_responses_cached_input_tokens_at_the_cached_rate(node_factory: Any,
                                                          upstream: ScriptedUpstream) -> None:
    node = start(node_factory, upstream)
    k = key(node)
    upstream.enqueue(Behaviour(usage={"input_tokens": 2000, "output_tokens": 10,
                                      "total_tokens": 2010,
                                      "input_tokens_details": {"cached_tokens": 1500}}))
    status, doc = node.json("POST", "/v1/responses",
                            {"model": "gpt-4o-mini", "input": "word " * 500},
                            {"Authorization": f"Bearer {k}"})
    assert status == 200, doc
    assert charged(node, k) == [194]


def test_anthropic_cache_reads_and_writes_streamed(node_factory: Any,
                                                   upstream: ScriptedUpstream) -> None:
    node = start(node_factory, upstream)
    k = key(node)
    upstream.enqueue(Behaviour(usage={"input_tokens": 100, "output_tokens": 20,
                                      "cache_read_input_tokens": 1000,
                                      "cache_creation_input_tokens": 600}))
    status, _, raw = node.request(
        "POST", "/v1/messages", {"model": "claude-3-5-sonnet", "max_tokens": 50, "stream": True,
                                 "messages": LONG},
        {"x-api-key": k, "anthropic-version": "2023-06-01"})
    assert status == 200
    # claude-3-5-sonnet: $3 in, $0.30 cache read, $3.75 cache write, $15 out per 1M
    expected = -(-(100 * 3000 + 1000 * 300 + 600 * 3750 + 20 * 15000) // 1000)
    assert charged(node, k) == [expected] == [3150]
    usage = [json.loads(line[6:]) for line in raw.decode().splitlines()
             if line.startswith("data: ") and '"usage"' in line][-1]["usage"]
    assert usage["cost"]["total_msats"] == 3150
    assert usage["cost"]["cache_creation_msats"] == 2250


def test_a_payment_sized_from_sats_pricing_covers_a_long_prompt_to_a_cache_write_model(
        node_factory: Any, upstream: ScriptedUpstream) -> None:
    """routstr-core sizes what it pays from `sats_pricing` (the prompt at the input rate); a
    Claude model's dearer cache-write rate bounds the ceiling, not the hold: a client capping
    the request at that size (X-Max-Cost, as an X-Cashu payment would be) is served."""
    from tests.test_pricing import core_reservation
    node = start(node_factory, upstream, "--btc-usd", "63123")
    k = key(node)
    body = {"model": "claude-sonnet-4", "max_tokens": 100,
            "messages": [{"role": "user", "content": "word " * 6000}]}
    sats = -(-core_reservation(model(node, "claude-sonnet-4"), body) // 1000)
    status, doc = node.json("POST", "/v1/chat/completions", body,
                            {"Authorization": f"Bearer {k}", "X-Max-Cost": str(sats)})
    assert status == 200, doc
    assert len(charged(node, k)) == 1


@pytest.mark.parametrize("at", ["Infinity", "NaN", "1e400", str(time.time() + 86_400)])
def test_a_stored_rate_with_a_bad_or_future_time_does_not_freeze_the_rate(
        node_factory: Any, upstream: ScriptedUpstream, exchange: Exchange, at: str) -> None:
    """The stored rate's `at` is read from the database: one not finite (or ahead of the
    clock, after it was set back) made that rate newer than every later one — never replaced
    in a worker that adopts the stored rate, never stale in /health — while the exchanges are
    down: billed at a rate nobody checks, reported healthy."""
    exchange.set("coinbase", rate="50000")
    node = start(node_factory, upstream, "--price-feeds", exchange.feeds("coinbase"))
    assert wait_for(lambda: rate_of(node)) == "50000"
    node.stop()
    db = Database(node.database)
    try:
        db.transaction(lambda c: c.execute(
            "UPDATE node_settings SET value = ? WHERE name = 'btc_usd_rate'",
            ('{"usd_per_btc": "50000", "at": ' + at + ', "sources": ["coinbase"]}',)))
    finally:
        db.close()
    exchange.set("coinbase", status=500)
    again = start(node_factory, upstream, "--price-feeds", exchange.feeds("coinbase"),
                  "--price-refresh", "1", "--price-max-age", "2", workdir=node.workdir)
    health = wait_for(lambda: (lambda d: d if d["checks"]["btc_usd"] == "degraded" else None)(
        again.json("GET", "/health")[1]), timeout=8)
    assert health["status"] == "degraded"
    exchange.set("coinbase", status=200, rate="60000")
    assert wait_for(lambda: rate_of(again) == "60000")


def test_a_kraken_answer_with_a_string_for_its_trade_is_no_rate(
        node_factory: Any, upstream: ScriptedUpstream, exchange: Exchange) -> None:
    """Kraken's last trade is `c: [price, volume]`; a `c` that is a string was read by its
    first character — "104321.5" as a rate of 1 USD/BTC, every USD price 10⁵ times too high."""
    exchange.set("kraken", body=b'{"error": [], "result": {"XXBTZUSD": {"c": "104321.5"}}}')
    node = start(node_factory, upstream, "--price-refresh", "1", "--price-feeds",
                 exchange.feeds("kraken"))
    wait_for(lambda: exchange.hits["kraken"] >= 1)
    health = wait_for(lambda: (lambda d: d if "kraken" in str(d.get("reasons")) else None)(
        node.json("GET", "/health")[1]))
    assert health["btc_usd"]["usd_per_btc"] is None and rate_of(node) is None


def test_a_per_request_price_in_fractional_msats_is_charged_within_the_ceiling(
        node_factory: Any, upstream: ScriptedUpstream) -> None:
    """dall-e-3 is $0.12 a request: 190 105.03… msats at 63 123 USD/BTC. Each image is charged
    ceil(that); the ceiling (what X-Max-Cost is checked against, and the hold) had floored the
    total — three images charged 3 msats above an X-Max-Cost the node had accepted."""
    node = start(node_factory, upstream, "--btc-usd", "63123")
    k = key(node)
    each = -(-Fraction("0.12") * 10**11 // 63123)
    assert each == 190106
    body = {"model": "dall-e-3", "prompt": "a city", "n": 3}
    auth = {"Authorization": f"Bearer {k}"}
    floored = Fraction("0.36") * 10**11 // 63123  # 570 315 msats
    status, doc = node.json("POST", "/v1/images/generations", body,
                            {**auth, "X-Max-Cost": f"{floored / 1000:.3f}"})
    assert status == 402 and doc["error"]["code"] == "max_cost_exceeded", doc
    assert charged(node, k) == []
    status, doc = node.json("POST", "/v1/images/generations", body,
                            {**auth, "X-Max-Cost": f"{3 * each / 1000:.3f}"})
    assert status == 200, doc
    assert charged(node, k) == [3 * each]


def test_two_sources_that_disagree_give_no_rate_and_the_node_keeps_serving(
        node_factory: Any, upstream: ScriptedUpstream, exchange: Exchange) -> None:
    """Two answers more than 10 % apart are each more than 5 % from their median: no quote is
    left to take the median of. That raised out of the feed's task and stopped the node; it is
    a refresh that got no rate (the last one is kept), the reason in /health."""
    exchange.set("coinbase", rate="100000")
    exchange.set("kraken", rate="130000")  # one of them lies; which, nobody can tell
    exchange.set("bitstamp", status=503)
    node = start(node_factory, upstream, "--price-refresh", "1", "--price-feeds",
                 exchange.feeds("coinbase", "kraken", "bitstamp"))
    wait_for(lambda: exchange.hits["kraken"] >= 2, timeout=8)
    status, health = node.json("GET", "/health")
    assert status == 200 and health["btc_usd"]["usd_per_btc"] is None
    assert "disagree" in health["reasons"][0], health
    k = key(node)
    assert chat(node, k, "gpt-4")[0] == 503 and charged(node, k) == []
    exchange.set("kraken", rate="100100")
    assert wait_for(lambda: rate_of(node)) == "100050"


def test_a_usd_default_price_needs_the_rate_in_health(
        node_factory: Any, upstream: ScriptedUpstream, exchange: Exchange,
        tmp_path: Path) -> None:
    """A `[default]` priced in USD bills every model not in the table at the live rate: with no
    rate those requests get 503, and /health must say why (it looked only at the table)."""
    exchange.set("coinbase", status=503)
    pricing = tmp_path / "prices.toml"
    pricing.write_text('include_builtin = false\n[models."local-fixed"]\n'
                       'input_msats_per_1k = 1000\noutput_msats_per_1k = 2000\n'
                       'max_output_tokens = 100\ncontext_length = 4000\n'
                       '[default]\ninput_usd_per_1m = 1\noutput_usd_per_1m = 2\n'
                       'max_output_tokens = 100\ncontext_length = 4000\n')
    node = start(node_factory, upstream, "--pricing", str(pricing), "--price-feeds",
                 exchange.feeds("coinbase"))
    wait_for(lambda: exchange.hits["coinbase"] >= 1)
    k = key(node)
    status, doc = chat(node, k, "anything-else")
    assert status == 503 and doc["error"]["code"] == "price_unavailable", doc
    status, health = node.json("GET", "/health")
    assert health["status"] == "degraded" and "no BTC/USD rate" in health["reasons"][0], health
