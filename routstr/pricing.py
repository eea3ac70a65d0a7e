"""The price table, what a request may cost, what it did cost, and the ``/v1/models`` document.

Pure: no I/O except reading the operator's TOML file in `load_price_table`. Money is integer
msats; exact rationals (`Fraction`) are used where routstr-core's wire format has fractional
sats; floats appear only in the JSON `models_document` returns.

The built-in table
    List prices in USD per 1M tokens as published by each provider (OpenAI, Anthropic, Groq for
    the Llama models, DeepSeek) as of 2025-06-15, converted at an assumed, fixed
    ``BTC_USD = 100_000``: $1 = 1,000 sats = 1,000,000 msats, so "$X per 1M tokens" is exactly
    X × 1000 msats per 1,000 tokens (gpt-4o-mini: $0.15 / $0.60 → 150 / 600 msats per 1k).
    The rate is not refreshed: the node prices in sats. Operators adjust with ``--pricing
    FILE`` (TOML)::

        [models."gpt-4o-mini"]           # a built-in model: only the fields given change
        input_msats_per_1k = 150         # per 1,000 prompt tokens
        output_msats_per_1k = 600        # per 1,000 completion tokens
        request_msats = 0                # flat fee per request
        max_output_tokens = 16384        # worst case when the request sets no max_tokens
        context_length = 128000

        [models."my-local-model"]        # a new model: the five fields above are required
        ...
        [default]                        # optional: the price of any model not in the table
        ...
        include_builtin = false          # optional, top level: serve only the file's models

    Image and audio endpoints report no token usage; their models are priced by `request_msats`
    alone (dall-e-3: its dearest list price, $0.12 per HD 1024×1792 image, so no request costs
    the node more than it charges; whisper-1: five minutes at $0.006/min).

Cost of a request (issue 3)::

    total = request_msats + ceil((prompt_tokens × input_msats_per_1k
                                  + completion_tokens × output_msats_per_1k) / 1000)

reported as base (= request_msats) + input + output, where output = floor(completion part /
1000) and input takes the rest of the token total (so the sub-msat rounding lands in input).

Reservation (worst case) of a request: a safe upper bound — request fee + prompt tokens bounded
by the body size (a token is at least one byte of the JSON body; content the body only refers to —
image URLs, files, stored prompts, previous responses, server-side tools — bounds it by the
context length instead) + ``n × max_tokens`` (or the model's ``max_output_tokens``) output tokens
— then capped by `client_reservation_msats`: what routstr-core's client-side formula gives from
the ``sats_pricing`` this node advertises, so a client that sizes an X-Cashu payment or a balance
by that formula is never refused (compatibility issue §1). A cost above the reservation is
charged at settlement from the remaining balance (see `ledger.settle`).

`sats_pricing` (routstr-core's field, sats per token) is derived exactly from the msat table:
prompt = input_msats_per_1k / 10⁶, completion = output_msats_per_1k / 10⁶, request =
request_msats / 1000 (0 when none is charged; a per-request model is advertised as one output
unit per request, see `sats_pricing`), input cache read/write = prompt
(cached tokens are billed at the input price); max_prompt_cost / max_completion_cost / max_cost
in sats follow routstr-core's derivation from context_length and max_output_tokens, and
max_cost also includes the request fee (we charge it; routstr-core does not). ``pricing`` (USD)
carries zeros: we price in sats, and a USD figure would need a live exchange rate. The JSON
floats are the correctly rounded values of those exact rationals.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Final

from . import errors
from .money import ceil_div

BTC_USD: Final = 100_000  # assumed exchange rate behind the built-in table
PRICES_AS_OF: Final = "2025-06-15"
TOLERANCE_PERCENT: Final = 1  # routstr-core's TOLERANCE_PERCENTAGE, assumed by clients
MIN_REQUEST_MSATS: Final = 1  # routstr-core's MIN_REQUEST_MSAT
# A float-evaluating client can land up to 1 msat lower than the exact value at each of the
# formula's three roundings; the node's cap stays below it by this much.
CLIENT_ROUNDING_MARGIN_MSATS: Final = 3
PROMPT_OVERHEAD_TOKENS: Final = 16  # chat-template tokens not present as body bytes
# With tools, providers add a system prompt of their own (Anthropic documents 313–346 tokens).
TOOLS_OVERHEAD_TOKENS: Final = 1024
MAX_N: Final = 128  # the most choices (`n`, `best_of`) or images a request may ask for
DEFAULT_MAX_OUTPUT_TOKENS: Final = 32_000  # a model with no limits: routstr-core's fallback
DEFAULT_CONTEXT_TOKENS: Final = 1_000_000  # likewise, for a prompt the body only points at
MAX_TOKENS_BOUND: Final = 10**9  # any token limit above this is taken as this
MAX_PRICE_VALUE: Final = 10**15

_TOL: Final = Fraction(100 - TOLERANCE_PERCENT, 100)
_DATE_SUFFIX: Final = re.compile(r"-\d{8}$")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    id: str
    input_msats_per_1k: int
    output_msats_per_1k: int
    request_msats: int
    max_output_tokens: int
    context_length: int
    name: str = ""
    description: str = ""
    created: int = 0
    owned_by: str = "routstr"
    input_modalities: tuple[str, ...] = ("text",)
    output_modalities: tuple[str, ...] = ("text",)
    tokenizer: str = "Other"

    def __post_init__(self) -> None:
        if not self.id or self.id != self.id.strip():
            raise ValueError(f"bad model id {self.id!r}")
        for f in _INT_FIELDS:
            value = getattr(self, f)
            if type(value) is not int or not 0 <= value <= MAX_PRICE_VALUE:
                raise ValueError(f"{self.id}: {f} must be an integer in 0..{MAX_PRICE_VALUE}")
        for f in ("name", "description", "owned_by", "tokenizer"):
            if not isinstance(getattr(self, f), str):
                raise ValueError(f"{self.id}: {f} must be a string")
        for f in ("input_modalities", "output_modalities"):
            value = getattr(self, f)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{self.id}: {f} must be a list of strings")


_PRICE_FIELDS: Final = (
    "input_msats_per_1k",
    "output_msats_per_1k",
    "request_msats",
    "max_output_tokens",
    "context_length",
)
_INT_FIELDS: Final = _PRICE_FIELDS + ("created",)
_TOML_FIELDS: Final = tuple(f.name for f in dataclasses.fields(ModelPrice) if f.name != "id")


@dataclass(frozen=True, slots=True)
class Cost:
    base_msats: int
    input_msats: int
    output_msats: int
    total_msats: int


# --------------------------------------------------------------------------------------------
# The built-in table (USD list prices per 1M tokens as of PRICES_AS_OF, at BTC_USD)
# --------------------------------------------------------------------------------------------


def _usd_per_m(usd: str) -> int:
    """$ per 1M tokens → msats per 1k tokens at BTC_USD (exact; refuses sub-msat results)."""
    value = Fraction(usd) * 100_000_000 * 1000 / BTC_USD / 1000
    if value.denominator != 1:
        raise ValueError(f"${usd}/1M is not a whole number of msats per 1k tokens")
    return int(value)


def _usd_flat(usd: str) -> int:
    """$ per request → msats at BTC_USD."""
    value = Fraction(usd) * 100_000_000 * 1000 / BTC_USD
    if value.denominator != 1:
        raise ValueError(f"${usd} is not a whole number of msats")
    return int(value)


_FAMILIES: Final = {  # family → (display prefix, owned_by, tokenizer)
    "openai": ("OpenAI", "openai", "GPT"),
    "anthropic": ("Anthropic", "anthropic", "Claude"),
    "meta": ("Meta", "meta-llama", "Llama3"),  # at Groq's list prices
    "deepseek": ("DeepSeek", "deepseek", "DeepSeek"),  # standard-hours list prices
}

# Token-priced chat models. $ per 1M tokens (input, output), max output tokens, context length,
# release date (unix), family, inputs (text or vision = text+image), display name.
_CHAT_TABLE: Final = """
gpt-4o                   2.50  10.00  16384  128000 1715558400 openai    vision GPT-4o
gpt-4o-mini              0.15   0.60  16384  128000 1721260800 openai    vision GPT-4o mini
gpt-4.1                  2.00   8.00  32768 1047576 1744588800 openai    vision GPT-4.1
gpt-4.1-mini             0.40   1.60  32768 1047576 1744588800 openai    vision GPT-4.1 mini
gpt-4.1-nano             0.10   0.40  32768 1047576 1744588800 openai    vision GPT-4.1 nano
o3                       2.00   8.00 100000  200000 1744761600 openai    vision o3
o3-mini                  1.10   4.40 100000  200000 1738281600 openai    text   o3-mini
o4-mini                  1.10   4.40 100000  200000 1744761600 openai    vision o4-mini
gpt-4-turbo             10.00  30.00   4096  128000 1712620800 openai    vision GPT-4 Turbo
gpt-4                   30.00  60.00   8192    8192 1678838400 openai    text   GPT-4
gpt-3.5-turbo            0.50   1.50   4096   16385 1677628800 openai    text   GPT-3.5 Turbo
claude-3-5-sonnet        3.00  15.00   8192  200000 1729555200 anthropic vision Claude 3.5 Sonnet
claude-3-5-haiku         0.80   4.00   8192  200000 1730678400 anthropic text   Claude 3.5 Haiku
claude-3-7-sonnet        3.00  15.00  64000  200000 1740355200 anthropic vision Claude 3.7 Sonnet
claude-sonnet-4          3.00  15.00  64000  200000 1747872000 anthropic vision Claude Sonnet 4
claude-opus-4           15.00  75.00  32000  200000 1747872000 anthropic vision Claude Opus 4
llama-3.1-8b-instruct    0.05   0.08  32768  131072 1721692800 meta      text   Llama 3.1 8B
llama-3.3-70b-instruct   0.59   0.79  32768  131072 1733443200 meta      text   Llama 3.3 70B
deepseek-chat            0.27   1.10   8192   64000 1735084800 deepseek  text   DeepSeek V3
deepseek-reasoner        0.55   2.19  32768   64000 1737331200 deepseek  text   DeepSeek R1
"""

_EMBEDDINGS: Final = (
    # id, $ in / 1M, context length, created
    ("text-embedding-3-small", "0.02", 8191, 1705968000),
    ("text-embedding-3-large", "0.13", 8191, 1705968000),
    ("text-embedding-ada-002", "0.10", 8191, 1671148800),
)


def _builtin() -> tuple[ModelPrice, ...]:
    prices = []
    for line in _CHAT_TABLE.strip().splitlines():
        id_, usd_in, usd_out, max_out, ctx, created, family, inputs, name = line.split(None, 8)
        prefix, owner, tokenizer = _FAMILIES[family]
        prices.append(
            ModelPrice(
                id=id_,
                input_msats_per_1k=_usd_per_m(usd_in),
                output_msats_per_1k=_usd_per_m(usd_out),
                request_msats=0,
                max_output_tokens=int(max_out),
                context_length=int(ctx),
                name=f"{prefix}: {name}",
                description=f"{prefix}: {name}; list price ${usd_in} in / ${usd_out} out per 1M"
                f" tokens ({PRICES_AS_OF}) at {BTC_USD} USD/BTC",
                created=int(created),
                owned_by=owner,
                input_modalities=("text", "image") if inputs == "vision" else ("text",),
                tokenizer=tokenizer,
            )
        )
    prices += [
        ModelPrice(
            id=id_,
            input_msats_per_1k=_usd_per_m(usd_in),
            output_msats_per_1k=0,
            request_msats=0,
            max_output_tokens=0,
            context_length=ctx,
            name=f"OpenAI: {id_}",
            description=f"OpenAI: {id_}; list price ${usd_in} per 1M input tokens"
            f" ({PRICES_AS_OF}) at {BTC_USD} USD/BTC",
            created=created,
            owned_by="openai",
            output_modalities=("embeddings",),
            tokenizer="GPT",
        )
        for id_, usd_in, ctx, created in _EMBEDDINGS
    ]
    prices.append(
        ModelPrice(
            id="dall-e-3",
            input_msats_per_1k=0,
            output_msats_per_1k=0,
            request_msats=_usd_flat("0.12"),
            max_output_tokens=0,
            context_length=0,
            name="OpenAI: DALL-E 3",
            description="OpenAI: DALL-E 3; flat $0.12 per request (its dearest list price, HD"
            f" 1024x1792, {PRICES_AS_OF}) at {BTC_USD} USD/BTC",
            created=1698796800,
            owned_by="openai",
            output_modalities=("image",),
        )
    )
    prices.append(
        ModelPrice(
            id="whisper-1",
            input_msats_per_1k=0,
            output_msats_per_1k=0,
            request_msats=_usd_flat("0.03"),
            max_output_tokens=0,
            context_length=0,
            name="OpenAI: Whisper",
            description="OpenAI: Whisper; flat $0.03 per request (five minutes at $0.006/min,"
            f" {PRICES_AS_OF}) at {BTC_USD} USD/BTC",
            created=1677628800,
            owned_by="openai",
            input_modalities=("audio",),
        )
    )
    return tuple(sorted(prices, key=lambda p: p.id))


BUILTIN_PRICES: Final[tuple[ModelPrice, ...]] = _builtin()


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def _lookup_keys(model_id: str) -> Iterator[str]:
    """Spellings a requested id may resolve by: as given, without a provider prefix
    (``openai/gpt-4o``), and each without a trailing ``-YYYYMMDD`` (routstr-core's rule)."""
    m = model_id.strip().lower()
    candidates = [m]
    if "/" in m:
        candidates.append(m.rsplit("/", 1)[1])
    for c in list(candidates):
        stripped = _DATE_SUFFIX.sub("", c)
        if stripped != c:
            candidates.append(stripped)
    yield from candidates


class PriceTable:
    """Model id → `ModelPrice`, case-insensitive, with an optional price for unknown models."""

    def __init__(self, prices: Sequence[ModelPrice], *, default: ModelPrice | None = None):
        by_id: dict[str, ModelPrice] = {}
        for p in prices:
            key = p.id.lower()
            if key in by_id:
                raise ValueError(f"model {p.id!r} listed twice")
            by_id[key] = p
        self._by_id = by_id
        self.default = default

    def get(self, model_id: str) -> ModelPrice:
        """The price of `model_id`; unknown → 400 ``model_not_found`` unless a default is set."""
        for key in _lookup_keys(model_id):
            found = self._by_id.get(key)
            if found is not None:
                return found
        if self.default is not None:
            return dataclasses.replace(self.default, id=model_id.strip() or self.default.id)
        raise errors.InvalidRequest(
            f"Model '{model_id}' not found", code="model_not_found", details={"model": model_id}
        )

    def __contains__(self, model_id: object) -> bool:
        return isinstance(model_id, str) and any(k in self._by_id for k in _lookup_keys(model_id))

    def __iter__(self) -> Iterator[ModelPrice]:
        return iter(sorted(self._by_id.values(), key=lambda p: p.id))

    def __len__(self) -> int:
        return len(self._by_id)


def _toml_entry(where: str, table: object, base: ModelPrice | None, model_id: str) -> ModelPrice:
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table")
    unknown = sorted(set(table) - set(_TOML_FIELDS))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_TOML_FIELDS)}"
        )
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in _INT_FIELDS:
            if type(value) is not int:
                raise ValueError(f"{where}.{key} must be an integer, got {value!r}")
            if value < 0:
                raise ValueError(f"{where}.{key} must not be negative, got {value}")
            if value > MAX_PRICE_VALUE:
                raise ValueError(f"{where}.{key} is too large ({value})")
        elif key in ("input_modalities", "output_modalities"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}.{key} must be a list of strings")
            value = tuple(value)
        elif not isinstance(value, str):
            raise ValueError(f"{where}.{key} must be a string")
        values[key] = value
    if base is not None:
        return dataclasses.replace(base, **values)
    missing = [f for f in _PRICE_FIELDS if f != "request_msats" and f not in values]
    if missing:
        raise ValueError(f"{where}: a model not in the built-in table needs {', '.join(missing)}")
    values.setdefault("request_msats", 0)
    values.setdefault("name", model_id)
    values.setdefault("owned_by", "operator")
    return ModelPrice(id=model_id, **values)


def load_price_table(path: str | None, *, default_price: ModelPrice | None = None) -> PriceTable:
    """The built-in table, overridden by the TOML file at `path` (if any).

    Errors in the file (unknown keys, negative or non-integer values, missing fields for a new
    model) raise `ValueError` naming the file and the key. `default_price` (from the command
    line) wins over a ``[default]`` table in the file.
    """
    if path is None:
        return PriceTable(BUILTIN_PRICES, default=default_price)
    with open(path, "rb") as f:
        try:
            doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"pricing file {path}: {e}") from e
    unknown = sorted(set(doc) - {"models", "default", "include_builtin"})
    if unknown:
        raise ValueError(
            f"pricing file {path}: unknown key(s) {', '.join(unknown)};"
            " allowed: models, default, include_builtin"
        )
    include_builtin = doc.get("include_builtin", True)
    if not isinstance(include_builtin, bool):
        raise ValueError(f"pricing file {path}: include_builtin must be true or false")
    prices = {p.id.lower(): p for p in BUILTIN_PRICES} if include_builtin else {}
    models = doc.get("models", {})
    if not isinstance(models, dict):
        raise ValueError(f"pricing file {path}: [models] must be a table of models")
    for model_id, entry in models.items():
        if not model_id.strip() or model_id != model_id.strip():
            raise ValueError(f"pricing file {path}: bad model id {model_id!r}")
        base = prices.get(model_id.lower())
        where = f"pricing file {path}: models.{model_id}"
        prices[model_id.lower()] = _toml_entry(where, entry, base, base.id if base else model_id)
    if default_price is None and "default" in doc:
        default_price = _toml_entry(
            f"pricing file {path}: default", doc["default"], None, "default"
        )
    return PriceTable(list(prices.values()), default=default_price)


# --------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------


def _count(value: int, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return value


def actual_cost(price: ModelPrice, prompt_tokens: int, completion_tokens: int) -> Cost:
    """request_msats + ceil((prompt × in + completion × out) / 1000), split base/input/output."""
    prompt_part = _count(prompt_tokens, "prompt_tokens") * price.input_msats_per_1k
    completion_part = _count(completion_tokens, "completion_tokens") * price.output_msats_per_1k
    tokens_msats = ceil_div(prompt_part + completion_part, 1000)
    output_msats = completion_part // 1000
    input_msats = tokens_msats - output_msats
    total = price.request_msats + tokens_msats
    return Cost(price.request_msats, input_msats, output_msats, total)


@dataclass(frozen=True, slots=True)
class SatsPricing:
    """routstr-core's ``sats_pricing`` (sats per token; max_* in sats), exactly."""

    prompt: Fraction
    completion: Fraction
    request: Fraction
    max_prompt_cost: Fraction
    max_completion_cost: Fraction
    max_cost: Fraction

    def as_json(self) -> dict[str, float]:
        return {
            "prompt": float(self.prompt),
            "completion": float(self.completion),
            "request": float(self.request),
            "image": 0.0,
            "web_search": 0.0,
            "internal_reasoning": 0.0,
            "input_cache_read": float(self.prompt),
            "input_cache_write": float(self.prompt),
            "max_prompt_cost": float(self.max_prompt_cost),
            "max_completion_cost": float(self.max_completion_cost),
            "max_cost": float(self.max_cost),
        }

    def advertised(self) -> SatsPricing:
        """The values a client reads: each field as the float it receives, exactly."""
        return SatsPricing(
            *(Fraction(float(getattr(self, f.name))) for f in dataclasses.fields(self))
        )


def per_request_model(price: ModelPrice) -> bool:
    """Priced by the request alone (images, audio): no token prices, a request fee."""
    return price.request_msats > 0 and not price.input_msats_per_1k \
        and not price.output_msats_per_1k


def _limits(price: ModelPrice) -> tuple[int | None, int | None]:
    """(top_provider.context_length, top_provider.max_completion_tokens) as advertised.

    A per-request model is advertised as one output unit per request (see `sats_pricing`)."""
    if per_request_model(price):
        return None, 1
    return (price.context_length or None, price.max_output_tokens or None)


def sats_pricing(price: ModelPrice) -> SatsPricing:
    """routstr-core's fields, advertising only what is billed (`request` 0 when no request
    fee is charged, where routstr-core advertises its 0.001 floor).

    A per-request model (images, audio) is advertised as ONE OUTPUT UNIT per request:
    completion = its price, max_completion_tokens = 1, request = 0. routstr-core, using this
    node as upstream, derives a model's max cost from the token prices and limits and counts
    `request` only when no limit is given — then × 100 000 — so this is the one encoding under
    which it reserves what the request costs (issue 17 §3), not 0 nor 10⁵ times too much."""
    p = Fraction(price.input_msats_per_1k, 1_000_000)
    c = Fraction(price.output_msats_per_1k, 1_000_000)
    r = Fraction(price.request_msats, 1000)
    if per_request_model(price):
        c, r = r, Fraction(0)
    cl, mct = _limits(price)
    # routstr-core's max-cost derivation (payment/models.py, _calculate_usd_max_costs)
    if cl and mct and cl > mct:
        mp, mc, tokens = cl * p, mct * c, (cl - mct) * p + mct * c
    elif cl:
        mp, mc, tokens = cl * p, cl * c, cl * max(p, c)
    elif mct:
        mp, mc, tokens = mct * p, mct * c, mct * c
    else:
        mp, mc = p * 1_000_000, c * 32_000
        tokens = mp + mc
    floor = Fraction(MIN_REQUEST_MSATS, 1000)
    return SatsPricing(
        prompt=p,
        completion=c,
        request=r,
        max_prompt_cost=mp,
        max_completion_cost=mc,
        max_cost=max(tokens + r, floor),
    )


def _as_python_int(value: Any) -> int | None:
    """``int(value)`` as routstr-core applies it to ``max_tokens``; None where that fails."""
    if not isinstance(value, (int, float, str)):
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _estimate_prompt_tokens(messages: Any) -> int:
    """routstr-core's estimate: characters of string contents and ``text`` parts, // 3.

    Images are left out (routstr-core adds their tokens, so leaving them out can only lower the
    estimate, hence the cap) — as are non-string values routstr-core would choke on.
    """
    if not isinstance(messages, list):
        return 0
    total = 0
    for msg in messages:
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            for item in content:
                if isinstance(item, dict) and item.get("type") == "text":
                    text = item.get("text", "")
                    if isinstance(text, str):
                        total += len(text)
    return total // 3


@dataclass(frozen=True, slots=True)
class _ClientConstants:
    """Per-price parts of routstr-core's reservation, scaled to integers over one common
    denominator `d` (so the per-request arithmetic is exact and needs no `Fraction`):
    `reservation` msats undiscounted; the prompt / completion allowances and the per-token
    advertised prices, each × 1000 × d."""

    reservation: int
    d: int
    prompt_allowed: int
    prompt_per_token: int
    completion_allowed: int
    completion_per_token: int


def _exact_client_constants(price: ModelPrice) -> tuple[int, Fraction, Fraction, Fraction,
                                                        Fraction]:
    """(reservation, prompt allowance, prompt sats/token, completion allowance, completion
    sats/token) from the advertised pricing, in exact arithmetic."""
    sp = sats_pricing(price).advertised()
    reservation = max(MIN_REQUEST_MSATS, int(sp.max_cost * 1000 * _TOL))
    prompt_allowed = sp.max_prompt_cost * _TOL
    completion_allowed = sp.max_completion_cost * _TOL
    cl, mct = _limits(price)
    if cl or mct:
        limit = max(0, cl - mct) if cl and mct else (cl if cl else 0)
        prompt_allowed = limit * sp.prompt * _TOL
    return reservation, prompt_allowed, sp.prompt, completion_allowed, sp.completion


@functools.lru_cache(maxsize=4096)
def _client_constants(price: ModelPrice) -> _ClientConstants:
    """Computed once per price: this is on every request's path."""
    reservation, pa, pp, ca, cp = _exact_client_constants(price)
    d = math.lcm(pa.denominator, pp.denominator, ca.denominator, cp.denominator)

    def scaled(x: Fraction) -> int:
        return x.numerator * (d // x.denominator) * 1000

    return _ClientConstants(reservation, d, scaled(pa), scaled(pp), scaled(ca), scaled(cp))


def client_reservation_msats(price: ModelPrice, body: Mapping[str, Any],
                             prompt_estimate: int | None = None) -> int:
    """What routstr-core reserves for `body` (and clients pay for), from the advertised pricing.

    payment/helpers.py `get_max_cost_for_model` + `calculate_discounted_max_cost`, evaluated in
    exact arithmetic on the floats this node advertises: int(max_cost × 1000 × 0.99), less the
    prompt allowance not used by the estimated prompt, less the completion allowance not used
    by ``max_tokens`` (only that field), at least MIN_REQUEST_MSATS. (Each discount is
    floor(delta × 1000) for delta > 0, computed as an integer quotient over `d`.)
    `prompt_estimate`: `_estimate_prompt_tokens(body["messages"])` when the caller has it.
    """
    k = _client_constants(price)
    reservation = k.reservation
    if body.get("messages"):
        if prompt_estimate is None:
            prompt_estimate = _estimate_prompt_tokens(body["messages"])
        delta = k.prompt_allowed - prompt_estimate * k.prompt_per_token
        if delta > 0:
            reservation -= delta // k.d
    if body.get("max_tokens") is not None:
        max_tokens = _as_python_int(body["max_tokens"])
        if max_tokens is not None:
            delta = k.completion_allowed - max_tokens * k.completion_per_token
            if delta > 0:
                reservation -= delta // k.d
    return max(MIN_REQUEST_MSATS, reservation)


_EXTERNAL_KEYS: Final = frozenset(
    {
        "image_url",
        "input_image",
        "image",
        "images",
        "input_audio",
        "audio",
        "file",
        "file_id",
        "file_data",
        "file_url",
        "input_file",
        "document",
        "previous_response_id",
        "conversation",
        "mcp_servers",
    }
)
_EXTERNAL_TYPES: Final = frozenset(
    {
        "image",
        "image_url",
        "input_image",
        "input_audio",
        "audio",
        "file",
        "input_file",
        "document",
        "container_upload",
    }
)
_LOCAL_TOOL_TYPES: Final = frozenset({"function", "custom"})


def _refers_outside(body: Any, depth: int = 0) -> bool:
    """Does the request pull in prompt tokens that are not bytes of its body?"""
    if depth > 64:
        return True
    if isinstance(body, Mapping):
        if _EXTERNAL_KEYS.intersection(body) or body.get("type") in _EXTERNAL_TYPES:
            return True
        prompt = body.get("prompt")
        if isinstance(prompt, Mapping):  # Responses API stored prompt template
            return True
        tools = body.get("tools")
        if isinstance(tools, list) and any(
            isinstance(t, Mapping) and t.get("type", "function") not in _LOCAL_TOOL_TYPES
            for t in tools
        ):
            return True
        return any(_refers_outside(v, depth + 1) for v in body.values())
    if isinstance(body, list):
        return any(_refers_outside(v, depth + 1) for v in body)
    return False


def _choices(body: Mapping[str, Any]) -> int:
    """How many outputs the request asks for: the larger of `n` and `best_of` (legacy
    completions generate `best_of` and bill them all), each an integer in 1..MAX_N when given."""
    choices = 1
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int or not 1 <= value <= MAX_N:
            raise errors.InvalidRequest(f"'{name}' must be an integer from 1 to {MAX_N}",
                                        code=f"invalid_{name}")
        choices = max(choices, value)
    return choices


def _default_output_tokens(price: ModelPrice) -> int:
    """What a model can write when the request sets no limit (capped by the caller)."""
    return price.max_output_tokens or price.context_length or DEFAULT_MAX_OUTPUT_TOKENS


def _max_output_tokens(price: ModelPrice, body: Mapping[str, Any]) -> int:
    """The output tokens one choice may have: the largest of ``max_tokens`` /
    ``max_completion_tokens`` / ``max_output_tokens`` the request sets (an upstream honours the
    one it knows, so the largest bounds them all) — else, or where one is not a non-negative
    int, the model's default. Never above the model's own limits (``max_output_tokens``, the
    context length): an upstream refuses a larger limit, and no model writes past its context."""
    limits: list[int] = []
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(name)
        if value is None:
            continue
        ok = type(value) is int and value >= 0
        limits.append(value if ok else _default_output_tokens(price))
    out = max(limits) if limits else _default_output_tokens(price)
    limits = [n for n in (price.max_output_tokens, price.context_length) if n]
    return min(out, *limits, MAX_TOKENS_BOUND)


def _prompt_bound(price: ModelPrice, body: Mapping[str, Any], body_len: int) -> int:
    """Prompt tokens ≤ the body's bytes (+ the chat template, + the hidden system prompt a
    provider wraps tool definitions in), unless the body points at content elsewhere (images,
    files, stored responses, server tools): then the context length."""
    bound = _count(body_len, "body_len") + PROMPT_OVERHEAD_TOKENS
    if body.get("tools") or body.get("functions"):
        bound += TOOLS_OVERHEAD_TOKENS
    if _refers_outside(body):
        return max(bound, price.context_length or DEFAULT_CONTEXT_TOKENS)
    return min(bound, price.context_length) if price.context_length else bound


@dataclass(frozen=True, slots=True)
class Ceiling:
    """The most an honest upstream can report for one request (issue 13), and its price.

    `prompt_tokens` and `output_tokens` (all choices together) bound what the upstream may
    report; `units` counts the per-request-priced items (images); `msats` is the price of the
    whole bound (`cap_msats`, the client's X-Max-Cost, lowers it when smaller). A charge is the
    priced usage with each count clamped to its bound, and never above `msats`.
    """

    prompt_tokens: int
    output_tokens: int
    units: int
    msats: int

    def clamp(self, prompt: int, completion: int) -> tuple[int, int]:
        return min(prompt, self.prompt_tokens), min(completion, self.output_tokens)

    def over(self, prompt: int, completion: int) -> bool:
        """Does a usage report exceed what an honest upstream can report?"""
        return prompt > self.prompt_tokens or completion > self.output_tokens

    def charge(self, price: ModelPrice, prompt: int, completion: int) -> Cost:
        """The priced usage, clamped to the bounds, capped at `msats`."""
        cost = actual_cost(price, *self.clamp(prompt, completion))
        if cost.total_msats <= self.msats:
            return cost
        base = min(cost.base_msats, self.msats)
        input_msats = min(cost.input_msats, self.msats - base)
        return Cost(base, input_msats, self.msats - base - input_msats, self.msats)


def ceiling(price: ModelPrice, body: Mapping[str, Any], body_len: int, billing: str = "tokens",
            cap_msats: int | None = None) -> Ceiling:
    """The request's ceiling. `billing`: "tokens" (prompt + output), "prompt" (embeddings: no
    output), "per_request" (`n` items at request_msats each; images, audio)."""
    if billing == "per_request":
        units = _choices(body)
        prompt = output = 0
        msats = price.request_msats * units
    else:
        units = 1
        prompt = _prompt_bound(price, body, body_len)
        output = 0 if billing == "prompt" else _choices(body) * _max_output_tokens(price, body)
        msats = actual_cost(price, prompt, output).total_msats
    if cap_msats is not None:
        msats = min(msats, cap_msats)
    return Ceiling(prompt, output, units, msats)


def reservation_msats(price: ModelPrice, body: Mapping[str, Any], ceil: Ceiling,
                      billing: str = "tokens") -> int:
    """What to hold before forwarding: the ceiling's output part in full, plus the prompt at
    routstr-core's estimate (so a payment sized from `sats_pricing` passes) — or the client-side
    formula when that is larger — never above the ceiling, at least MIN_REQUEST_MSATS.

    A prompt longer than its estimate is charged at settlement, up to the ceiling, from what is
    left of the balance or the payment (the ledger's settle)."""
    if billing == "per_request":
        return max(MIN_REQUEST_MSATS, ceil.msats)
    estimate = _estimate_prompt_tokens(body.get("messages"))  # walked once per request
    own = actual_cost(price, min(estimate, ceil.prompt_tokens), ceil.output_tokens).total_msats
    client_body = {**body, "max_tokens": 0} if billing == "prompt" else body
    client = client_reservation_msats(price, client_body, estimate) - CLIENT_ROUNDING_MARGIN_MSATS
    return max(MIN_REQUEST_MSATS, min(ceil.msats, max(own, client)))


# --------------------------------------------------------------------------------------------
# /v1/models
# --------------------------------------------------------------------------------------------


def model_object(price: ModelPrice) -> dict[str, Any]:
    cl, mct = _limits(price)
    sats = sats_pricing(price)
    # routstr-core's USD `pricing` (per token; max_* in USD) at the same fixed BTC_USD the
    # table was built with, so a routstr-core node using us as upstream prices us correctly.
    usd_per_sat = Fraction(BTC_USD, 100_000_000)
    usd = SatsPricing(*(getattr(sats, f.name) * usd_per_sat
                        for f in dataclasses.fields(SatsPricing))).as_json()
    return {
        "id": price.id,
        "object": "model",
        "created": price.created,
        "owned_by": price.owned_by,
        "name": price.name or price.id,
        "description": price.description,
        "context_length": price.context_length,
        "architecture": {
            "modality": "+".join(price.input_modalities) + "->" + "+".join(price.output_modalities),
            "input_modalities": list(price.input_modalities),
            "output_modalities": list(price.output_modalities),
            "tokenizer": price.tokenizer,
            "instruct_type": None,
        },
        "pricing": usd,
        "sats_pricing": sats.as_json(),
        "pricing_msats": {
            "input_msats_per_1k": price.input_msats_per_1k,
            "output_msats_per_1k": price.output_msats_per_1k,
            "request_msats": price.request_msats,
            "max_output_tokens": price.max_output_tokens,
        },
        "per_request_limits": None,
        "top_provider": {
            "context_length": cl,
            "max_completion_tokens": mct,
            "is_moderated": False,
        },
        "enabled": True,
        "upstream_provider_id": None,
        "canonical_slug": None,
        "alias_ids": None,
        "forwarded_model_id": None,
    }


def models_document(table: PriceTable, *, fields: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``/v1/models`` body; `fields` (from ``?fields=id,pricing``) keeps only those keys."""
    data = [model_object(p) for p in table]
    if fields is not None:
        keep = {f.strip() for f in fields if f.strip()}
        data = [{k: v for k, v in m.items() if k in keep} for m in data]
    return {"object": "list", "data": data}
