"""pricing.py: the table, the TOML override, costs, the reservation cap, and /v1/models."""

from __future__ import annotations

import dataclasses
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from routstr import errors, pricing
from routstr.money import ceil_div
from routstr.pricing import (
    BUILTIN_PRICES,
    ModelPrice,
    actual_cost,
    ceiling,
    client_reservation_msats,
    load_price_table,
    model_object,
    models_document,
    reservation_msats,
)
from tests.interop.relay import usd_max_cost

RATE = Fraction(100_000)  # USD per BTC: the built-in list prices are whole msats here
TABLE = load_price_table(None).at(RATE)


# --------------------------------------------------------------------------------------------
# routstr-core's client-side formula, transcribed in floats (payment/helpers.py at 8bd7d7e,
# get_max_cost_for_model + calculate_discounted_max_cost + estimate_tokens; TOLERANCE 1 %,
# MIN_REQUEST_MSAT 1; image tokens counted as 0, which only lowers the result). The oracle
# reads the model as a client does: from the JSON this node serves.
# --------------------------------------------------------------------------------------------


def core_estimate_tokens(messages: Any) -> int:
    total = 0
    for msg in messages:
        if isinstance(msg, dict):
            content = msg.get("content")
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(
                    len(item.get("text", ""))
                    for item in content
                    if isinstance(item, dict) and item.get("type") == "text"
                )
    return total // 3


def core_reservation(model: dict[str, Any], body: dict[str, Any]) -> int:
    sp = model["sats_pricing"]
    max_cost_for_model = max(1, int(sp["max_cost"] * 1000 * (1 - 1.0 / 100)))
    tol_factor = max(0.0, 1 - 1.0 / 100.0)
    max_prompt_allowed_sats = sp["max_prompt_cost"] * tol_factor
    max_completion_allowed_sats = sp["max_completion_cost"] * tol_factor
    prompt_token_limit = None
    tp = model["top_provider"]
    if tp and (tp["context_length"] or tp["max_completion_tokens"]):
        cl, mct = tp["context_length"], tp["max_completion_tokens"]
        if cl and mct:
            prompt_token_limit = max(0, cl - mct)
        elif cl:
            prompt_token_limit = cl
        elif mct:
            prompt_token_limit = 0
    elif model["context_length"]:
        prompt_token_limit = model["context_length"]
    if prompt_token_limit is not None:
        max_prompt_allowed_sats = prompt_token_limit * sp["prompt"] * tol_factor
    adjusted = max_cost_for_model
    if messages := body.get("messages"):
        prompt_tokens = core_estimate_tokens(messages)
        delta = max_prompt_allowed_sats - prompt_tokens * sp["prompt"]
        if delta > 0:
            adjusted = adjusted - math.floor(delta * 1000)
    max_tokens_raw = body.get("max_tokens", None)
    if max_tokens_raw is not None:
        try:
            max_tokens_int = int(max_tokens_raw)
        except (TypeError, ValueError):
            pass
        else:
            delta = max_completion_allowed_sats - max_tokens_int * sp["completion"]
            if delta > 0:
                adjusted = adjusted - math.floor(delta * 1000)
    return max(1, adjusted)


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

token_limit = st.one_of(st.just(0), st.integers(1, 2_000_000))
prices = st.builds(
    ModelPrice,
    id=st.just("m"),
    input_msats_per_1k=st.one_of(st.just(0), st.integers(1, 100_000)),
    output_msats_per_1k=st.one_of(st.just(0), st.integers(1, 200_000)),
    request_msats=st.one_of(st.just(0), st.integers(1, 500_000)),
    max_output_tokens=token_limit,
    context_length=token_limit,
)
builtin_prices = st.sampled_from(tuple(TABLE))
text = st.text(max_size=400)
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": st.just("x")})}
    ),
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"])},
    optional={"content": st.one_of(text, st.lists(part, max_size=4), st.none())},
)
max_tokens_value = st.one_of(
    st.integers(-10, 300_000),
    st.floats(min_value=-5, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.integers(0, 5000).map(str),
    st.just("many"),
    st.booleans(),
    st.lists(st.integers(), max_size=1),
)
bodies = st.fixed_dictionaries(
    {"model": st.just("m")},
    optional={
        "messages": st.one_of(st.lists(message, max_size=5), text, st.just([])),
        "input": text,
        "max_tokens": max_tokens_value,
        "max_completion_tokens": max_tokens_value,
        "n": st.integers(1, 128),
        "best_of": st.integers(1, 128),
        "stream": st.booleans(),
    },
)


def wire(doc: Any) -> Any:
    return json.loads(json.dumps(doc))


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def test_builtin_table_is_sane() -> None:
    ids = [p.id for p in BUILTIN_PRICES]
    assert len(ids) == len(set(ids)) >= 20
    for name in (
        "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o3-mini", "gpt-3.5-turbo", "gpt-4",
        "text-embedding-3-small", "text-embedding-3-large", "dall-e-3", "whisper-1",
        "claude-3-5-sonnet", "claude-3-5-haiku", "llama-3.3-70b-instruct",
    ):  # fmt: skip
        assert name in TABLE
    mini = TABLE.get("gpt-4o-mini")
    assert (mini.input_msats_per_1k, mini.output_msats_per_1k) == (150, 600)  # issue 3's example
    assert TABLE.get("gpt-4o").input_msats_per_1k == 2_500  # $2.50 / 1M at 100k USD/BTC
    assert TABLE.get("dall-e-3").request_msats == 120_000
    for p in TABLE:  # at 100 000 USD/BTC
        assert p.input_msats_per_1k + p.output_msats_per_1k + p.request_msats > 0, p.id
        assert p.name and p.description and p.created > 1_600_000_000
        if p.output_msats_per_1k:
            assert 0 < p.max_output_tokens <= p.context_length, p.id


@pytest.mark.parametrize(
    "spelling",
    ["gpt-4o", "GPT-4o", " gpt-4o ", "openai/gpt-4o", "OpenAI/GPT-4O", "x/y/gpt-4o"],
)
def test_lookup_spellings(spelling: str) -> None:
    assert TABLE.get(spelling).id == "gpt-4o"


def test_lookup_strips_date_suffix_and_refuses_unknown() -> None:
    assert TABLE.get("claude-3-5-sonnet-20241022").id == "claude-3-5-sonnet"
    assert TABLE.get("anthropic/claude-3-5-haiku-20241022").id == "claude-3-5-haiku"
    with pytest.raises(errors.InvalidRequest) as e:
        TABLE.get("gpt-4o-2024-05-13")  # a dated OpenAI snapshot may be priced differently
    assert e.value.code == "model_not_found" and e.value.status == 400
    assert "nonexistent" not in TABLE
    fallback = ModelPrice("default", 1_000, 2_000, 5, 4096, 32_000)
    table = load_price_table(None, default_price=fallback)
    got = table.get("my-own-model")
    assert got.id == "my-own-model" and got.output_msats_per_1k == 2_000


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "pricing.toml"
    p.write_text(text)
    return str(p)


def test_toml_override_and_new_model(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [models."gpt-4o-mini"]
        input_msats_per_1k = 200     # per 1,000 prompt tokens
        request_msats = 7

        [models."My-Model"]
        input_msats_per_1k = 10
        output_msats_per_1k = 20
        max_output_tokens = 1000
        context_length = 8000
        input_modalities = ["text", "image"]

        [default]
        input_msats_per_1k = 1
        output_msats_per_1k = 1
        max_output_tokens = 100
        context_length = 1000
        """,
    )
    table = load_price_table(path).at(RATE)
    mini = table.get("gpt-4o-mini")
    assert (mini.input_msats_per_1k, mini.output_msats_per_1k, mini.request_msats) == (200, 600, 7)
    mine = table.get("my-model")
    assert mine.id == "My-Model" and mine.request_msats == 0 and mine.owned_by == "operator"
    assert mine.input_modalities == ("text", "image")
    assert table.get("gpt-4o").input_msats_per_1k == 2_500  # untouched
    assert table.get("anything").context_length == 1000  # the file's default
    only = load_price_table(
        write(
            tmp_path,
            "include_builtin = false\n[models.a]\ninput_msats_per_1k = 1\n"
            "output_msats_per_1k = 1\nmax_output_tokens = 1\ncontext_length = 2\n",
        )
    )
    assert [p.id for p in only] == ["a"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models."gpt-4o"]\ninput_msat_per_1k = 1\n', "unknown key"),
        ('[models."gpt-4o"]\ninput_msats_per_1k = -1\n', "must not be negative"),
        ('[models."gpt-4o"]\ninput_msats_per_1k = 1.5\n', "must be an integer"),
        ('[models."gpt-4o"]\ninput_msats_per_1k = true\n', "must be an integer"),
        ('[models."gpt-4o"]\nname = 3\n', "must be a string"),
        ('[models."new"]\ninput_msats_per_1k = 1\n', "needs"),
        ("colour = 1\n", "unknown key"),
        ("include_builtin = 1\n", "true or false"),
        ("models = 3\n", "table"),
        ("[models\n", "pricing file"),
    ],
)
def test_toml_errors_are_clear(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_price_table(write(tmp_path, text))


# --------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------


def test_actual_cost_examples() -> None:
    mini = TABLE.get("gpt-4o-mini")
    assert actual_cost(mini, 1000, 1000) == pricing.Cost(0, 150, 600, 750)
    assert actual_cost(mini, 1, 0) == pricing.Cost(0, 1, 0, 1)  # 0.15 msat rounds up
    assert actual_cost(mini, 0, 0).total_msats == 0
    assert actual_cost(TABLE.get("dall-e-3"), 0, 0) == pricing.Cost(120_000, 0, 0, 120_000)
    with pytest.raises(ValueError):
        actual_cost(mini, -1, 0)


@given(prices, st.integers(0, 10**7), st.integers(0, 10**7))
def test_actual_cost_formula(price: ModelPrice, prompt: int, completion: int) -> None:
    c = actual_cost(price, prompt, completion)
    tokens = prompt * price.input_msats_per_1k + completion * price.output_msats_per_1k
    assert c.total_msats == price.request_msats + ceil_div(tokens, 1000)
    assert c.base_msats + c.input_msats + c.output_msats == c.total_msats
    assert min(c.base_msats, c.input_msats, c.output_msats) >= 0
    assert c.output_msats == completion * price.output_msats_per_1k // 1000


def safe_upper_bound_msats(price: ModelPrice, body: dict, body_len: int) -> int:
    return ceiling(price, body, body_len).msats


def worst_case_msats(price: ModelPrice, body: dict, body_len: int) -> int:
    return reservation_msats(price, body, ceiling(price, body, body_len))


def _output_bound(price: ModelPrice, body: dict) -> int:
    """The test's own statement of the output rule (issue 13): every choice may write up to the
    largest limit the request sets, else the model's default; never past the model's limit."""
    default = price.max_output_tokens or price.context_length or 32_000
    limits = [v if type(v) is int and v >= 0 else default
              for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")
              if (v := body.get(k)) is not None]
    model_limits = [n for n in (price.max_output_tokens, price.context_length) if n]
    out = min(max(limits) if limits else default, *model_limits, 10**9)
    return max(body.get("n") or 1, body.get("best_of") or 1) * out


@settings(max_examples=400)
@given(st.one_of(prices, builtin_prices), bodies)
def test_reservation_covers_the_output_in_full_and_stays_under_the_ceiling(
    price: ModelPrice, body: dict
) -> None:
    body_len = len(json.dumps(body).encode())
    ceil = ceiling(price, body, body_len)
    reserved = reservation_msats(price, body, ceil)
    assert ceil.output_tokens == _output_bound(price, body)
    assert 1 <= reserved <= max(1, ceil.msats)
    # the output part in full (plus the request fee), whatever the client formula says
    assert reserved >= actual_cost(price, 0, ceil.output_tokens).total_msats
    # never below what a routstr-core client reserves (less the float rounding margin)
    client = core_reservation(wire(model_object(price, RATE)), wire(body))
    assert reserved >= min(ceil.msats, client - 2 * pricing.CLIENT_ROUNDING_MARGIN_MSATS)


@settings(max_examples=300)
@given(st.one_of(prices, builtin_prices), st.lists(message, max_size=5), st.integers(0, 300_000))
def test_a_plain_request_with_max_tokens_passes_on_a_client_sized_payment(
    price: ModelPrice, messages: list, max_tokens: int
) -> None:
    """One choice, `max_tokens` set (what routstr-core's formula discounts), no request fee: a
    payment of the client's reservation rounded up to whole sats (as wallets pay) covers the
    node's hold. (Only up to 99 % of the model's limit: above that the formula's 1 % tolerance
    leaves part of the output uncovered, and the node asks for the full amount with a 402.)"""
    # models stating both limits (as every built-in one does): with only one, routstr-core's
    # max_cost takes one price for the whole context and its two discounts can undercut it
    price = dataclasses.replace(price, request_msats=0,
                                context_length=price.context_length or 128_000,
                                max_output_tokens=price.max_output_tokens or 4096)
    assume(price.context_length > price.max_output_tokens)
    limit = price.max_output_tokens
    body = {"model": "m", "messages": messages, "max_tokens": min(max_tokens, limit * 99 // 100)}
    body_len = len(json.dumps(body).encode())
    reserved = reservation_msats(price, body, ceiling(price, body, body_len))
    client = core_reservation(wire(model_object(price, RATE)), wire(body))
    # the formula floors three times, so it can land a few msats under the true output cost;
    # wallets pay whole sats, which absorbs that unless the formula ends on a sat boundary
    assert reserved <= max(ceil_div(client, 1000) * 1000, client + 10)


def test_n_and_best_of_multiply_the_output() -> None:
    """Issue 13's example: n=128 × 1 000 max tokens reserved 598 msats against a 76 803 msat
    cost. Now the reservation covers all 128 choices."""
    mini = TABLE.get("gpt-4o-mini")
    body = {"model": "gpt-4o-mini", "n": 128, "max_tokens": 1000,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    ceil = ceiling(mini, body, len(json.dumps(body)))
    assert ceil.output_tokens == 128_000
    assert reservation_msats(mini, body, ceil) >= 128_000 * 600 // 1000
    legacy = {"model": "gpt-4o-mini", "prompt": "hi", "best_of": 5, "n": 2, "max_tokens": 10}
    assert ceiling(mini, legacy, 60).output_tokens == 50
    bigger = {**body, "n": 1, "max_tokens": 10, "max_completion_tokens": 4000}
    assert ceiling(mini, bigger, 60).output_tokens == 4000


@pytest.mark.parametrize("n", [0, -1, 129, 1e30, 2.0, "2", True, [2]])
def test_a_bad_choice_count_is_refused(n: Any) -> None:
    mini = TABLE.get("gpt-4o-mini")
    for billing in ("tokens", "per_request"):
        with pytest.raises(errors.InvalidRequest):
            ceiling(mini, {"model": "m", "n": n}, 10, billing)


@given(st.one_of(prices, builtin_prices), bodies, st.integers(0, 10**40), st.integers(0, 10**40))
def test_a_charge_is_the_clamped_usage_never_above_the_ceiling(
    price: ModelPrice, body: dict, prompt: int, completion: int
) -> None:
    body_len = len(json.dumps(body).encode())
    ceil = ceiling(price, body, body_len)
    charged = ceil.charge(price, prompt, completion)
    expected = actual_cost(price, min(prompt, ceil.prompt_tokens),
                           min(completion, ceil.output_tokens)).total_msats
    assert charged.total_msats == min(expected, ceil.msats)
    assert charged.base_msats + charged.input_msats + charged.output_msats == charged.total_msats
    assert min(charged.base_msats, charged.input_msats, charged.output_msats) >= 0


@given(st.one_of(prices, builtin_prices), bodies)
def test_exact_client_formula_matches_the_float_transcription(price: ModelPrice, body: dict):
    exact = client_reservation_msats(price, body)
    floats = core_reservation(wire(model_object(price, RATE)), wire(body))
    assert abs(exact - floats) <= pricing.CLIENT_ROUNDING_MARGIN_MSATS


@given(st.one_of(prices, builtin_prices), bodies)
def test_integer_client_formula_equals_the_fraction_form(price: ModelPrice, body: dict) -> None:
    """The hot path works over integers scaled by a common denominator; it must give exactly
    what the same formula gives in `Fraction` arithmetic."""
    reservation, prompt_allowed, prompt, completion_allowed, completion = (
        pricing._exact_client_constants(price))
    expected = reservation
    if body.get("messages"):
        delta = prompt_allowed - pricing._estimate_prompt_tokens(body["messages"]) * prompt
        if delta > 0:
            expected -= int(delta * 1000)
    max_tokens = (pricing._as_python_int(body["max_tokens"])
                  if body.get("max_tokens") is not None else None)
    if max_tokens is not None:
        delta = completion_allowed - max_tokens * completion
        if delta > 0:
            expected -= int(delta * 1000)
    assert client_reservation_msats(price, body) == max(pricing.MIN_REQUEST_MSATS, expected)


@given(
    st.one_of(prices, builtin_prices),
    st.lists(st.text(max_size=300), min_size=1, max_size=4),
    st.integers(0, 5000),
    st.data(),
)
def test_safe_bound_covers_any_honest_text_request(
    price: ModelPrice, texts: list[str], max_tokens: int, data: st.DataObject
) -> None:
    """Prompt tokens ≤ body bytes (+ template overhead), completion ≤ max_tokens (and the
    model's own limits)."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": t} for t in texts],
        "max_tokens": max_tokens,
    }
    raw = json.dumps(body, ensure_ascii=False).encode()
    limit = min(len(raw) + pricing.PROMPT_OVERHEAD_TOKENS, price.context_length or len(raw) + 16)
    prompt = data.draw(st.integers(0, limit))
    model_limits = [n for n in (price.max_output_tokens, price.context_length) if n]
    completion = data.draw(st.integers(0, min([max_tokens, *model_limits])))
    bound = safe_upper_bound_msats(price, body, len(raw))
    assert actual_cost(price, prompt, completion).total_msats <= bound


def test_safe_bound_details() -> None:
    mini = TABLE.get("gpt-4o-mini")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    n = len(json.dumps(body))
    default_out = safe_upper_bound_msats(mini, body, n)
    assert default_out == ceil_div((n + 16) * 150 + 16384 * 600, 1000)
    assert safe_upper_bound_msats(mini, {**body, "max_tokens": 10}, n) == ceil_div(
        (n + 16) * 150 + 10 * 600, 1000
    )
    assert safe_upper_bound_msats(mini, {**body, "max_tokens": "10"}, n) == default_out
    assert safe_upper_bound_msats(mini, {**body, "max_tokens": 10, "n": 3}, n) == ceil_div(
        (n + 16) * 150 + 30 * 600, 1000
    )
    # content the body only points at: the prompt is bounded by the context length instead
    with_image = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
        "max_tokens": 10,
    }  # fmt: skip
    assert safe_upper_bound_msats(mini, with_image, 100) == ceil_div(128_000 * 150 + 10 * 600, 1000)
    responses = {"model": "gpt-4o-mini", "input": "hi", "previous_response_id": "resp_1"}
    assert safe_upper_bound_msats(mini, responses, 60) >= 128_000 * 150 // 1000
    tools = {"model": "gpt-4o-mini", "input": "hi", "tools": [{"type": "web_search_preview"}]}
    assert safe_upper_bound_msats(mini, tools, 60) >= 128_000 * 150 // 1000
    fn_tools = {"model": "gpt-4o-mini", "input": "hi", "tools": [{"type": "function"}]}
    assert safe_upper_bound_msats(mini, fn_tools, 60) < 128_000 * 150 // 1000


def test_worst_case_example_matches_client_discount() -> None:
    """A chat request with max_tokens: the reservation is the truth at the estimated prompt
    (100 + 100 tokens, 75 msats), within what the client computes (76)."""
    mini = TABLE.get("gpt-4o-mini")
    body = {"model": "gpt-4o-mini", "max_tokens": 100,
            "messages": [{"role": "user", "content": "x" * 300}]}  # fmt: skip
    # client: int(26.5728 sats * 990) = 26307, less prompt allowance (111616*0.00015*0.99 - 100
    # tokens*0.00015 = 16.55 sats → 16559), less completion (9.8304*0.99 - 100*0.0006 sats
    # → 9672): 26307 - 16559 - 9672 = 76 msats; the truth (100 + 100 tokens) is 75 msats.
    assert core_reservation(wire(model_object(mini, RATE)), body) == 76
    assert worst_case_msats(mini, body, len(json.dumps(body))) == 75


# --------------------------------------------------------------------------------------------
# /v1/models
# --------------------------------------------------------------------------------------------

ROUTSTR_MODEL_FIELDS = {
    "id", "name", "created", "description", "context_length", "architecture", "pricing",
    "sats_pricing", "per_request_limits", "top_provider", "enabled", "upstream_provider_id",
    "canonical_slug", "alias_ids", "forwarded_model_id",
}  # fmt: skip
PRICING_FIELDS = {
    "prompt", "completion", "request", "image", "web_search", "internal_reasoning",
    "input_cache_read", "input_cache_write", "max_prompt_cost", "max_completion_cost", "max_cost",
}  # fmt: skip


def test_models_document_shape() -> None:
    doc = wire(models_document(TABLE, btc_usd=RATE))
    assert doc["object"] == "list" and len(doc["data"]) == len(BUILTIN_PRICES)
    for m in doc["data"]:
        assert ROUTSTR_MODEL_FIELDS <= set(m)
        assert m["object"] == "model" and isinstance(m["owned_by"], str)
        assert set(m["pricing"]) == PRICING_FIELDS == set(m["sats_pricing"])
        assert all(isinstance(v, float) for v in m["pricing"].values())  # parses as floats
        assert all(isinstance(v, float) for v in m["sats_pricing"].values())
        # USD per token = sats per token × USD per sat (a routstr-core upstream reads `pricing`)
        for k, sats in m["sats_pricing"].items():
            assert m["pricing"][k] == pytest.approx(sats * 100_000 / 100_000_000, rel=1e-12)
        assert m["pricing"]["max_cost"] > 0
        assert set(m["architecture"]) == {
            "modality", "input_modalities", "output_modalities", "tokenizer", "instruct_type"
        }  # fmt: skip
        assert set(m["top_provider"]) == {"context_length", "max_completion_tokens", "is_moderated"}
        assert isinstance(m["context_length"], int) and isinstance(m["created"], int)
        assert set(m["pricing_msats"]) == {
            "input_msats_per_1k", "output_msats_per_1k", "request_msats", "max_output_tokens",
            "cached_input_msats_per_1k", "cache_write_msats_per_1k",
        }  # fmt: skip
        assert m["sats_pricing"]["max_cost"] >= 0.001
        # only what is billed is advertised: no request fee where none is charged
        pm = m["pricing_msats"]
        per_request = pm["input_msats_per_1k"] == pm["output_msats_per_1k"] == 0
        billed_per_request = 0 if per_request else pm["request_msats"]
        assert m["sats_pricing"]["request"] == billed_per_request / 1000


def test_sats_pricing_is_exact() -> None:
    m = model_object(TABLE.get("gpt-4o-mini"), RATE)
    sp = m["sats_pricing"]
    assert sp["prompt"] == 0.00015 and sp["completion"] == 0.0006
    assert sp["input_cache_read"] == 0.000075  # $0.075 / 1M cached input
    assert sp["input_cache_write"] == sp["prompt"]  # no write premium: billed as input
    # cl 128000 > mct 16384: prompt cl*p, completion mct*c, total (cl-mct)*p + mct*c
    assert sp["max_prompt_cost"] == float(Fraction(128_000 * 150, 10**6)) == 19.2
    assert sp["max_completion_cost"] == float(Fraction(16_384 * 600, 10**6))
    assert sp["max_cost"] == float(Fraction((128_000 - 16_384) * 150 + 16_384 * 600, 10**6))
    gpt4 = model_object(TABLE.get("gpt-4"), RATE)["sats_pricing"]  # cl <= mct: cl * max(p, c)
    assert gpt4["max_cost"] == 8192 * 0.06
    dalle = model_object(TABLE.get("dall-e-3"), RATE)  # per request: one output unit of 120 sats
    assert dalle["sats_pricing"]["completion"] == dalle["sats_pricing"]["max_cost"] == 120.0
    assert dalle["sats_pricing"]["request"] == dalle["sats_pricing"]["prompt"] == 0.0
    assert dalle["top_provider"]["max_completion_tokens"] == 1
    assert model_object(TABLE.get("gpt-4o-mini"), RATE)["sats_pricing"]["request"] == 0.0  # not billed
    emb = model_object(TABLE.get("text-embedding-3-small"), RATE)
    assert emb["top_provider"]["max_completion_tokens"] is None
    assert emb["sats_pricing"]["max_cost"] == float(Fraction(8191 * 20, 10**6))


@given(prices)
def test_sats_pricing_floats_are_the_rounded_exact_values(price: ModelPrice) -> None:
    sp = pricing.sats_pricing(price)
    served = wire(model_object(price, RATE))["sats_pricing"]
    assert served["max_cost"] == float(sp.max_cost)
    if pricing.per_request_model(price):  # one output unit per request
        assert served["prompt"] == served["request"] == 0.0
        assert served["completion"] == price.request_msats / 1000
        return
    assert served["prompt"] == float(Fraction(price.input_msats_per_1k, 10**6))
    assert served["completion"] == float(Fraction(price.output_msats_per_1k, 10**6))
    assert served["request"] == price.request_msats / 1000


def core_max_cost_msats(m: dict[str, Any], btc_usd: int = 100_000) -> float:
    """routstr-core 0.4.5's max cost of a model it reads from our /v1/models (digest §1a), in
    msats at `btc_usd` (tests/interop/relay.py, written from the digest independently of
    routstr/pricing.py)."""
    return usd_max_cost(m) / (btc_usd / 100_000_000) * 1000


PER_REQUEST_BODIES = {"dall-e-3": ("per_request", {"prompt": "a city", "n": 1}),
                      "whisper-1": ("per_request", {})}


@pytest.mark.parametrize("model", [p.id for p in BUILTIN_PRICES])
def test_routstr_core_derives_our_max_cost(model: str) -> None:
    """A routstr-core node using us as upstream derives, from what we advertise, the max cost
    we reserve (within 2 %): otherwise it refuses its users (402 for `request × 100 000`) or
    holds too little. Ours: the reservation of a default request for per-request models
    (images, audio); the advertised max cost (context-filling prompt) for token models."""
    price = TABLE.get(model)
    m = wire(model_object(price, RATE))
    if model in PER_REQUEST_BODIES:
        billing, body = PER_REQUEST_BODIES[model]
        ceil = pricing.ceiling(price, {"model": model, **body}, 100, billing)
        ours = pricing.reservation_msats(price, {"model": model, **body}, ceil, billing)
        assert ours == price.request_msats
    else:
        ours = float(pricing.sats_pricing(price).max_cost) * 1000
    assert core_max_cost_msats(m) == pytest.approx(ours, rel=0.02)


@given(prices)
def test_routstr_core_derives_our_max_cost_for_any_price(price: ModelPrice) -> None:
    assume(price.request_msats == 0 or pricing.per_request_model(price))
    m = wire(model_object(price, RATE))
    ours = max(float(pricing.sats_pricing(price).max_cost) * 1000, 1)
    assert core_max_cost_msats(m) == pytest.approx(ours, rel=0.02, abs=1)


# ---- USD entries (issue 18) -------------------------------------------------------------------
def test_usd_entry_is_billed_only_once_resolved() -> None:
    """A USD entry's msat fields are placeholders (0): billing or publishing it unresolved
    would serve for free. Both refuse; resolving leaves nothing to resolve again."""
    raw = load_price_table(None).get("gpt-4o-mini")
    assert raw.usd is not None and raw.input_msats_per_1k == 0
    with pytest.raises(ValueError, match="resolved"):
        actual_cost(raw, 12, 5)
    with pytest.raises(ValueError, match="resolved"):
        pricing.sats_pricing(raw)
    with pytest.raises(errors.ServiceUnavailable):
        pricing.at_rate(raw, None)
    at = pricing.at_rate(raw, Fraction(123_456))
    assert at.usd is None and pricing.at_rate(at, Fraction(1)) is at
    assert at.input_msats_per_1k == Fraction("0.15") * 10**8 / 123_456  # exact, not a float


def test_toml_usd_entries_are_exact_and_of_one_kind(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [models."my-usd"]
        input_usd_per_1m = 0.15          # a float, taken as the decimal written
        output_usd_per_1m = "0.6"
        cached_input_usd_per_1m = 0.075
        request_usd = 0.001
        max_output_tokens = 100
        context_length = 1000

        [models."gpt-4o"]                # a USD built-in: one msat field stays fixed in sats
        request_msats = 7

        [models."claude-3-5-haiku"]      # a USD built-in, one USD field changed
        output_usd_per_1m = 5
        """)
    table = load_price_table(path)
    mine = table.get("my-usd")
    assert mine.usd == pricing.UsdPrices(Fraction(15, 100), Fraction(6, 10), Fraction(75, 1000),
                                         None, Fraction(1, 1000))
    at = pricing.at_rate(mine, Fraction(100_000))
    assert (at.input_msats_per_1k, at.output_msats_per_1k, at.cached_input_msats_per_1k,
            at.request_msats) == (150, 600, 75, 1000)
    gpt4o = pricing.at_rate(table.get("gpt-4o"), Fraction(200_000))
    assert gpt4o.request_msats == 7 and gpt4o.input_msats_per_1k == 1250
    haiku = pricing.at_rate(table.get("claude-3-5-haiku"), Fraction(100_000))
    assert (haiku.input_msats_per_1k, haiku.output_msats_per_1k) == (800, 5000)
    bad = {
        "input_usd_per_1m = 1\ninput_msats_per_1k = 1\noutput_usd_per_1m = 1\n"
        "max_output_tokens = 1\ncontext_length = 1": "mixes USD",
        "input_usd_per_1m = -1\noutput_usd_per_1m = 1\nmax_output_tokens = 1\n"
        "context_length = 1": "non-negative decimal",
        "input_usd_per_1m = 1e400\noutput_usd_per_1m = 1\nmax_output_tokens = 1\n"
        "context_length = 1": "decimal",
        "input_usd_per_1m = nan\noutput_usd_per_1m = 1\nmax_output_tokens = 1\n"
        "context_length = 1": "decimal",
        "input_usd_per_1m = true\noutput_usd_per_1m = 1\nmax_output_tokens = 1\n"
        "context_length = 1": "number of USD",
        "input_usd_per_1m = 1\nmax_output_tokens = 1\ncontext_length = 1": "output_usd_per_1m",
    }
    for body, message in bad.items():
        with pytest.raises(ValueError, match=message):
            load_price_table(write(tmp_path, '[models."x"]\n' + body))


def test_switching_an_msat_entry_to_usd_needs_input_and_output(tmp_path: Path) -> None:
    base = write(tmp_path, """
        include_builtin = false
        [models."m"]
        input_msats_per_1k = 1
        output_msats_per_1k = 2
        cached_input_msats_per_1k = 1
        max_output_tokens = 10
        context_length = 100
        """)
    assert load_price_table(base).get("m").usd is None
    with pytest.raises(ValueError, match="a model not in the built-in table needs"):
        load_price_table(write(tmp_path, 'include_builtin = false\n[models."m"]\n'
                                         "input_usd_per_1m = 1\n"))


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6),
       st.integers(0, 10**6), builtin_prices, st.integers(1, 5000))
@settings(max_examples=300, deadline=None)
def test_cache_counts_never_charge_above_the_ceiling(prompt: int, completion: int, cached: int,
                                                     written: int, price: ModelPrice,
                                                     body_len: int) -> None:
    """Whatever cache split an upstream reports, the charge stays within the ceiling, and each
    input token is billed at exactly one rate (no more than at the dearest, no less than at the
    cheapest)."""
    body = {"model": price.id, "messages": [{"role": "user", "content": "x"}]}
    ceil = ceiling(price, body, body_len)
    cost = ceil.charge(price, prompt, completion, cached, written)
    assert cost.total_msats <= ceil.msats
    assert cost.base_msats + cost.input_msats + cost.output_msats + cost.cache_read_msats \
        + cost.cache_creation_msats == cost.total_msats
    p, c = ceil.clamp(prompt, completion)
    dearest = actual_cost(pricing.dearest_prompt(price), p, c).total_msats
    rates = (price.input_msats_per_1k, price.cached_rate, price.write_rate)
    cheapest = dataclasses.replace(price, input_msats_per_1k=min(rates),
                                   cached_input_msats_per_1k=None, cache_write_msats_per_1k=None)
    assert actual_cost(cheapest, p, c).total_msats <= actual_cost(price, p, c, cached, written) \
        .total_msats <= dearest


def test_a_rate_that_prices_beyond_every_bitcoin_is_refused_not_a_500(tmp_path: Path) -> None:
    table = load_price_table(write(tmp_path, '[models."dear"]\ninput_usd_per_1m = 1000000000\n'
                                             "output_usd_per_1m = 1\nmax_output_tokens = 1\n"
                                             "context_length = 1\n"))
    with pytest.raises(errors.ServiceUnavailable) as got:
        pricing.at_rate(table.get("dear"), Fraction(1), Fraction(1000))
    assert got.value.code == "price_unavailable"


@pytest.mark.parametrize("rate", [Fraction(100_000), Fraction(63_123), Fraction(1),
                                  Fraction("104234.123456789012")])
@pytest.mark.parametrize("model", ["claude-sonnet-4", "claude-3-5-haiku", "claude-opus-4"])
def test_a_cache_write_rate_does_not_raise_the_hold_above_a_client_sized_payment(
        model: str, rate: Fraction) -> None:
    """A model whose cache writes cost more than input (Anthropic: 1.25×) advertises its input
    rate as `sats_pricing.prompt`; routstr-core sizes the payment from it. The hold must not
    price the estimated prompt at the cache-write rate (that is the ceiling's job: a dearer
    split is charged at settlement, up to it), or every long prompt gets 402."""
    price = pricing.at_rate(load_price_table(None).get(model), rate)
    body = {"model": model, "messages": [{"role": "user", "content": "x" * 30_000}],
            "max_tokens": 100}
    body_len = len(json.dumps(body).encode())
    reserved = reservation_msats(price, body, ceiling(price, body, body_len))
    client = core_reservation(wire(model_object(price, rate)), wire(body))
    assert reserved <= max(ceil_div(client, 1000) * 1000, client + 10)


def test_prices_and_rates_take_ascii_digits_only() -> None:
    from routstr.pricefeed import parse_rate
    for text in ("\u0661\u0660\u0660\u0660\u0660\u0660", "１００", "1\u0660"):
        with pytest.raises(ValueError):
            pricing.usd_amount(text, "x")
        with pytest.raises(ValueError):
            parse_rate(text)


def test_a_model_id_priced_by_the_default_is_bounded() -> None:
    fallback = dataclasses.replace(TABLE.get("gpt-4o-mini"), id="default")
    table = pricing.PriceTable(list(TABLE), default=fallback)
    assert table.get("x" * 200).id == "x" * 200
    with pytest.raises(errors.InvalidRequest):
        table.get("x" * 201)


def test_a_tampered_stored_rate_is_no_rate(tmp_path: Path) -> None:
    import json as json_

    from routstr.db import Database
    from routstr.pricefeed import SETTING, Rate, load_rate, save_rate
    db = Database(str(tmp_path / "r.sqlite3"))
    try:
        save_rate(db, Rate(Fraction(200201, 2), 1000.0, ("a", "b")))
        assert load_rate(db, now=lambda: 2000.0) == Rate(Fraction(200201, 2), 1000.0, ("a", "b"))
        for bad in ("1e999999999", "1" * 41, "-5", "1/0"):
            value = json_.dumps({"usd_per_btc": bad, "at": 1000.0, "sources": []})
            db.transaction(lambda c: c.execute("UPDATE node_settings SET value = ? WHERE name = ?",
                                               (value, SETTING)))
            assert load_rate(db) is None, bad
    finally:
        db.close()
