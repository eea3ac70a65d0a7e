"""The price table, what a request may cost, what it did cost, and the ``/v1/models`` document.

Pure: no I/O except reading the operator's TOML file in `load_price_table`. Money is integer
msats; exact rationals (`Fraction`) are used where routstr-core's wire format has fractional
sats; floats appear only in the JSON `models_document` returns.

Two kinds of entries (the built-in table, routstr/prices.toml, and ``--pricing FILE`` alike)
    USD, the way providers publish (``input_usd_per_1m``, ``output_usd_per_1m``,
    ``cached_input_usd_per_1m``, ``cache_write_usd_per_1m``, ``request_usd``): billed at the
    live BTC/USD rate × ``--price-markup`` (`at_rate`: msats per 1,000 tokens = USD per 1M ×
    markup × 10⁸ / rate, an exact rational); or msats (``*_msats_per_1k``, ``request_msats``),
    fixed in sats. A USD entry's msat fields are placeholders until resolved: billing or
    publishing one unresolved raises (it would be free). The built-in table is USD list prices
    (dated in prices.toml), read by the same `_toml_entry` as an operator's file::

        [models."gpt-4o-mini"]           # a built-in model: only the fields given change
        output_usd_per_1m = 0.70         # (an msat field here stays fixed over the live rates)
        [models."my-local-model"]        # a new model: input, output, max_output_tokens and
        input_msats_per_1k = 150         # context_length are required
        ...
        [default]                        # optional: the price of any model not in the table
        include_builtin = false          # optional, top level: serve only the file's models

    Image and audio endpoints report no token usage; their models are priced by the request
    alone (dall-e-3: its dearest list price, $0.12 per HD 1024×1792 image, so no request costs
    the node more than it charges; whisper-1: five minutes at $0.006/min).

Cost of a request (issues 3, 18)::

    total = ceil(request_msats) + ceil((plain prompt tokens × input rate
                                        + cached tokens × cached-input rate
                                        + cache-written tokens × cache-write rate
                                        + completion tokens × output rate) / 1000)

each prompt token at exactly one rate (an entry without cache rates bills them as input),
reported as base + input + cache_read + cache_creation + output, where the cache and output
parts are floor(part / 1000) and input takes the rest of the token total (so the sub-msat
rounding lands in input). The ceiling prices the whole prompt bound at the dearest input rate,
so it stays an upper bound whatever split the upstream reports.

Reservation (worst case) of a request: a safe upper bound — request fee + prompt tokens bounded
by the body size (a token is at least one byte of the JSON body; content the body only refers to —
image URLs, files, stored prompts, previous responses, server-side tools — bounds it by the
context length instead) + ``n × max_tokens`` (or the model's ``max_output_tokens``) output tokens
— then capped by `client_reservation_msats`: what routstr-core's client-side formula gives from
the ``sats_pricing`` this node advertises, so a client that sizes an X-Cashu payment or a balance
by that formula is never refused (compatibility issue §1). A cost above the reservation is
charged at settlement from the remaining balance (see `ledger.settle`).

`sats_pricing` (routstr-core's field, sats per token) is derived exactly from the resolved entry:
prompt = input_msats_per_1k / 10⁶, completion = output_msats_per_1k / 10⁶, request =
request_msats / 1000 (0 when none is charged; a per-request model is advertised as one output
unit per request, see `sats_pricing`), input cache read/write = the cache rates (the input rate
where none); max_prompt_cost / max_completion_cost / max_cost in sats follow routstr-core's
derivation from context_length and max_output_tokens, and max_cost also includes the request
fee (we charge it; routstr-core does not). ``pricing`` (USD per token) is the same at the
current BTC/USD rate, for msat entries too (`model_object`). The JSON floats are the correctly
rounded values of those exact rationals.
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
from importlib import resources
from typing import Any, Final

from . import errors

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
MAX_MODEL_ID_CHARS: Final = 200  # a model id priced by the default, or an admin override

_TOL: Final = Fraction(100 - TOLERANCE_PERCENT, 100)
_DATE_SUFFIX: Final = re.compile(r"-\d{8}$")


#: A rate in msats (per 1,000 tokens, or per request): an int for an msat entry; for a USD entry
#: resolved at a BTC/USD rate, the exact rational (a charge rounds it once, to whole msats).
Msats = int | Fraction


@dataclass(frozen=True, slots=True)
class UsdPrices:
    """An entry priced the way providers publish: USD per 1M tokens, USD per request."""

    input: Fraction
    output: Fraction
    cached_input: Fraction | None = None
    cache_write: Fraction | None = None
    request: Fraction = Fraction(0)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A table entry. An msat entry has its rates in the `*_msats*` fields (fixed in sats); a
    USD entry has them in `usd` (its msat fields are 0 until `at_rate` resolves it at a
    BTC/USD rate). Cache rates None: those tokens are billed as input."""

    id: str
    input_msats_per_1k: Msats
    output_msats_per_1k: Msats
    request_msats: Msats
    max_output_tokens: int
    context_length: int
    name: str = ""
    description: str = ""
    created: int = 0
    owned_by: str = "routstr"
    input_modalities: tuple[str, ...] = ("text",)
    output_modalities: tuple[str, ...] = ("text",)
    tokenizer: str = "Other"
    cached_input_msats_per_1k: Msats | None = None
    cache_write_msats_per_1k: Msats | None = None
    usd: UsdPrices | None = None
    # msat rate fields fixed over a USD entry (an operator's override of one field, e.g. its
    # request fee): applied after the USD rates are resolved
    fixed: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.id or self.id != self.id.strip():
            raise ValueError(f"bad model id {self.id!r}")
        for f in _INT_FIELDS:
            value = getattr(self, f)
            if type(value) is not int or not 0 <= value <= MAX_PRICE_VALUE:
                raise ValueError(f"{self.id}: {f} must be an integer in 0..{MAX_PRICE_VALUE}")
        for f in _RATE_FIELDS:
            value = getattr(self, f)
            if value is None and f in _CACHE_FIELDS:
                continue
            if type(value) not in (int, Fraction) or not 0 <= value <= MAX_PRICE_VALUE:
                raise ValueError(f"{self.id}: {f} must be a number in 0..{MAX_PRICE_VALUE}")
        for f in ("name", "description", "owned_by", "tokenizer"):
            if not isinstance(getattr(self, f), str):
                raise ValueError(f"{self.id}: {f} must be a string")
        for f in ("input_modalities", "output_modalities"):
            value = getattr(self, f)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{self.id}: {f} must be a list of strings")

    @property
    def cached_rate(self) -> Msats:
        rate = self.cached_input_msats_per_1k
        return self.input_msats_per_1k if rate is None else rate

    @property
    def write_rate(self) -> Msats:
        rate = self.cache_write_msats_per_1k
        return self.input_msats_per_1k if rate is None else rate


_PRICE_FIELDS: Final = (
    "input_msats_per_1k",
    "output_msats_per_1k",
    "request_msats",
    "max_output_tokens",
    "context_length",
)
_CACHE_FIELDS: Final = ("cached_input_msats_per_1k", "cache_write_msats_per_1k")
_RATE_FIELDS: Final = ("input_msats_per_1k", "output_msats_per_1k", "request_msats",
                       *_CACHE_FIELDS)
_INT_FIELDS: Final = ("max_output_tokens", "context_length", "created")
_USD_FIELDS: Final = {  # TOML key → UsdPrices field
    "input_usd_per_1m": "input",
    "output_usd_per_1m": "output",
    "cached_input_usd_per_1m": "cached_input",
    "cache_write_usd_per_1m": "cache_write",
    "request_usd": "request",
}
_TOML_FIELDS: Final = tuple(f.name for f in dataclasses.fields(ModelPrice)
                            if f.name not in ("id", "usd", "fixed")) + tuple(_USD_FIELDS)
MAX_USD_VALUE: Final = 10**9  # USD per 1M tokens or per request, in a table entry


@dataclass(frozen=True, slots=True)
class Cost:
    base_msats: int
    input_msats: int
    output_msats: int
    total_msats: int
    cache_read_msats: int = 0
    cache_creation_msats: int = 0


def _exact(x: Fraction) -> Msats:
    return x.numerator if x.denominator == 1 else x


@functools.lru_cache(maxsize=4096)
def _resolved(price: ModelPrice, btc_usd: Fraction, markup: Fraction) -> ModelPrice:
    u = price.usd
    assert u is not None
    k = markup * 100_000_000 / btc_usd  # msats per 1k tokens for $1 per 1M tokens
    rates: dict[str, Any] = {
        "input_msats_per_1k": _exact(u.input * k),
        "output_msats_per_1k": _exact(u.output * k),
        "request_msats": _exact(u.request * k * 1000),
        "cached_input_msats_per_1k":
            None if u.cached_input is None else _exact(u.cached_input * k),
        "cache_write_msats_per_1k": None if u.cache_write is None else _exact(u.cache_write * k),
    }
    # resolved: no `usd` left, so nothing can resolve (or mistake) it twice
    return dataclasses.replace(price, **{**rates, **dict(price.fixed)}, usd=None, fixed=())


def at_rate(price: ModelPrice, btc_usd: Fraction | None,
            markup: Fraction = Fraction(1)) -> ModelPrice:
    """`price` in msats: a USD entry × `markup` at `btc_usd` (USD per BTC), exactly; an msat
    entry as it is. A USD entry with no rate known cannot be priced: 503 ``price_unavailable``
    (and ``/health`` says why)."""
    if price.usd is None:
        return price
    if btc_usd is None:
        raise errors.ServiceUnavailable(
            f"Model '{price.id}' is priced in USD and this node has no BTC/USD rate yet",
            code="price_unavailable", details={"model": price.id})
    try:
        return _resolved(price, btc_usd, markup)
    except ValueError:  # a rate (or markup) that puts a price beyond MAX_PRICE_VALUE msats
        raise errors.ServiceUnavailable(
            f"Model '{price.id}' is priced beyond what can be billed at this BTC/USD rate",
            code="price_unavailable", details={"model": price.id}) from None


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
            if len(model_id) > MAX_MODEL_ID_CHARS:  # each id is a priced entry, cached
                raise errors.InvalidRequest(
                    f"Model id longer than {MAX_MODEL_ID_CHARS} characters",
                    code="model_not_found", details={"model": model_id[:MAX_MODEL_ID_CHARS]})
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

    def at(self, btc_usd: int | Fraction, markup: Fraction = Fraction(1)) -> PriceTable:
        """Every entry resolved in msats at `btc_usd` (what a node pinned there bills)."""
        rate = Fraction(btc_usd)
        default = None if self.default is None else at_rate(self.default, rate, markup)
        return PriceTable([at_rate(p, rate, markup) for p in self], default=default)


def usd_amount(value: object, what: str) -> Fraction:
    """A USD price from a TOML or JSON value: a number or a decimal string, exactly (a float is
    taken as the decimal it was written as: 0.15 is 15/100, not its binary neighbour)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{what} must be a number of USD, got {value!r}")
    text = repr(value) if isinstance(value, float) else str(value).strip()
    if not re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,12})?(e-[0-9]{1,2})?", text):  # ASCII only
        raise ValueError(f"{what} must be a non-negative decimal number of USD, got {value!r}")
    amount = Fraction(text)
    if amount > MAX_USD_VALUE:
        raise ValueError(f"{what} is too large ({value})")
    return amount


def _kind(keys: set[str]) -> str | None:
    """"usd" / "msat" by the rate keys an entry gives; None when it gives none."""
    usd = keys & set(_USD_FIELDS)
    msat = keys & set(_RATE_FIELDS)
    if usd and msat:
        raise ValueError(f"mixes USD ({', '.join(sorted(usd))}) and msat"
                         f" ({', '.join(sorted(msat))}) prices; an entry has one kind")
    return "usd" if usd else "msat" if msat else None


def override(base: ModelPrice, values: Mapping[str, Any],
             usd: Mapping[str, Fraction] | None = None) -> ModelPrice:
    """`base` with some fields changed (a `--pricing` file's or the admin's override): USD
    rates of a USD entry change its list prices; msat rates given for a USD entry stay fixed
    in sats over the live ones (`fixed`); other fields replace the base's."""
    changes = dict(values)
    if usd:
        assert base.usd is not None
        changes["usd"] = dataclasses.replace(base.usd, **usd)
    if base.usd is not None:
        fixed = {k: changes.pop(k) for k in list(changes) if k in _RATE_FIELDS}
        if fixed:
            changes["fixed"] = tuple(sorted({**dict(base.fixed), **fixed}.items()))
    return dataclasses.replace(base, **changes)


def _toml_entry(where: str, table: object, base: ModelPrice | None, model_id: str) -> ModelPrice:
    """One `[models."id"]` (or `[default]`) table. An entry is of one kind: USD (`*_usd*`
    keys, resolved at the live rate) or msats (`*_msats*` keys, fixed in sats). Overriding a
    built-in entry changes only the keys given; switching its kind needs input and output."""
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table")
    unknown = sorted(set(table) - set(_TOML_FIELDS))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_TOML_FIELDS)}"
        )
    try:
        kind = _kind(set(table))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    values: dict[str, Any] = {}
    usd: dict[str, Fraction] = {}
    for key, value in table.items():
        if key in _USD_FIELDS:
            usd[_USD_FIELDS[key]] = usd_amount(value, f"{where}.{key}")
        elif key in _INT_FIELDS or key in _RATE_FIELDS:
            if type(value) is not int:
                raise ValueError(f"{where}.{key} must be an integer, got {value!r}")
            if value < 0:
                raise ValueError(f"{where}.{key} must not be negative, got {value}")
            if value > MAX_PRICE_VALUE:
                raise ValueError(f"{where}.{key} is too large ({value})")
            values[key] = value
        elif key in ("input_modalities", "output_modalities"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}.{key} must be a list of strings")
            values[key] = tuple(value)
        elif not isinstance(value, str):
            raise ValueError(f"{where}.{key} must be a string")
        else:
            values[key] = value
    if base is not None and (kind != "usd" or base.usd is not None):
        return override(base, values, usd)
    needed = ["max_output_tokens", "context_length"] if base is None else []
    needed += ["input_usd_per_1m", "output_usd_per_1m"] if kind == "usd" \
        else ["input_msats_per_1k", "output_msats_per_1k"]
    missing = [f for f in needed if f not in table]
    if missing:
        what = "a model not in the built-in table" if base is None \
            else f"switching {model_id} to {kind} prices"
        raise ValueError(f"{where}: {what} needs {', '.join(missing)}")
    values.setdefault("request_msats", 0)
    if kind == "usd":
        values.update(input_msats_per_1k=0, output_msats_per_1k=0, usd=UsdPrices(**usd))
    if base is not None:  # an msat entry switched to USD: its msat rates go
        values.update(cached_input_msats_per_1k=None, cache_write_msats_per_1k=None, fixed=())
        return dataclasses.replace(base, **values)
    values.setdefault("name", model_id)
    values.setdefault("owned_by", "operator")
    return ModelPrice(id=model_id, **values)


def _builtin() -> tuple[ModelPrice, ...]:
    """The built-in table: routstr/prices.toml (USD list prices as of PRICES_AS_OF), read as an
    operator's ``--pricing`` file is read."""
    text = resources.files(__package__).joinpath("prices.toml").read_text("utf-8")
    models = tomllib.loads(text)["models"]
    return tuple(sorted((_toml_entry(f"routstr/prices.toml: models.{k}", v, None, k)
                         for k, v in models.items()), key=lambda p: p.id))


BUILTIN_PRICES: Final[tuple[ModelPrice, ...]] = _builtin()


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


def actual_cost(price: ModelPrice, prompt_tokens: int, completion_tokens: int,
                cached_tokens: int = 0, cache_write_tokens: int = 0) -> Cost:
    """ceil(request) + ceil(Σ tokens × rate / 1000), split base / input / cache / output.

    `prompt_tokens` counts every input token; of them `cached_tokens` are billed at the cached
    rate and `cache_write_tokens` at the cache-write rate (each input token at one rate; counts
    beyond the prompt are clamped to it). The cache and output parts are floor(part / 1000);
    input takes the rest of the token total, so the sub-msat rounding lands in input."""
    if price.usd is not None:  # its msat fields are placeholders: never bill them (free)
        raise ValueError(f"{price.id}: a USD entry is billed only once resolved (at_rate)")
    prompt = _count(prompt_tokens, "prompt_tokens")
    cached = min(_count(cached_tokens, "cached_tokens"), prompt)
    written = min(_count(cache_write_tokens, "cache_write_tokens"), prompt - cached)
    input_part = (prompt - cached - written) * price.input_msats_per_1k
    read_part = cached * price.cached_rate if cached else 0
    write_part = written * price.write_rate if written else 0
    completion_part = _count(completion_tokens, "completion_tokens") * price.output_msats_per_1k
    tokens_msats = int(-(-(input_part + read_part + write_part + completion_part) // 1000))
    output_msats = int(completion_part // 1000)
    read_msats, write_msats = int(read_part // 1000), int(write_part // 1000)
    input_msats = tokens_msats - output_msats - read_msats - write_msats
    base = int(-(-price.request_msats // 1))
    return Cost(base, input_msats, output_msats, base + tokens_msats, read_msats, write_msats)


def dearest_prompt(price: ModelPrice) -> ModelPrice:
    """`price` with every input token at its dearest input rate: what bounds a prompt whose
    split into cached / written / plain tokens is known only afterwards."""
    dearest = max(price.input_msats_per_1k, price.cached_rate, price.write_rate)
    if dearest == price.input_msats_per_1k:
        return price
    return dataclasses.replace(price, input_msats_per_1k=dearest,
                               cached_input_msats_per_1k=None, cache_write_msats_per_1k=None)


@dataclass(frozen=True, slots=True)
class SatsPricing:
    """routstr-core's ``sats_pricing`` (sats per token; max_* in sats), exactly."""

    prompt: Fraction
    completion: Fraction
    request: Fraction
    max_prompt_cost: Fraction
    max_completion_cost: Fraction
    max_cost: Fraction
    cache_read: Fraction = Fraction(0)
    cache_write: Fraction = Fraction(0)

    def as_json(self) -> dict[str, float]:
        return {
            "prompt": float(self.prompt),
            "completion": float(self.completion),
            "request": float(self.request),
            "image": 0.0,
            "web_search": 0.0,
            "internal_reasoning": 0.0,
            "input_cache_read": float(self.cache_read),
            "input_cache_write": float(self.cache_write),
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
    u = price.usd
    if u is not None:
        return u.request > 0 and not u.input and not u.output
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
    if price.usd is not None:
        raise ValueError(f"{price.id}: a USD entry is published only once resolved (at_rate)")
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
        cache_read=Fraction(price.cached_rate, 1_000_000),
        cache_write=Fraction(price.write_rate, 1_000_000),
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

    def charge(self, price: ModelPrice, prompt: int, completion: int, cached: int = 0,
               written: int = 0) -> Cost:
        """The priced usage, clamped to the bounds, capped at `msats` (`cached` / `written`:
        of the prompt, the tokens read from / written to the provider's cache)."""
        prompt, completion = self.clamp(prompt, completion)
        cost = actual_cost(price, prompt, completion, cached, written)
        if cost.total_msats <= self.msats:
            return cost
        left = self.msats
        parts = []
        for part in (cost.base_msats, cost.input_msats, cost.cache_read_msats,
                     cost.cache_creation_msats):
            parts.append(min(part, left))
            left -= parts[-1]
        base, input_msats, read, write = parts
        return Cost(base, input_msats, left, self.msats, read, write)


def ceiling(price: ModelPrice, body: Mapping[str, Any], body_len: int, billing: str = "tokens",
            cap_msats: int | None = None) -> Ceiling:
    """The request's ceiling. `billing`: "tokens" (prompt + output), "prompt" (embeddings: no
    output), "per_request" (`n` items at request_msats each; images, audio: each item charged
    whole msats, so the bound is ceil(request_msats) × n, not the floor of the exact product —
    below what `n` items are charged at a rate where a USD request fee is fractional msats)."""
    if billing == "per_request":
        units = _choices(body)
        prompt = output = 0
        msats = actual_cost(price, 0, 0).total_msats * units
    else:
        units = 1
        prompt = _prompt_bound(price, body, body_len)
        output = 0 if billing == "prompt" else _choices(body) * _max_output_tokens(price, body)
        msats = actual_cost(dearest_prompt(price), prompt, output).total_msats
    if cap_msats is not None:
        msats = min(msats, cap_msats)
    return Ceiling(prompt, output, units, int(msats))


def reservation_msats(price: ModelPrice, body: Mapping[str, Any], ceil: Ceiling,
                      billing: str = "tokens") -> int:
    """What to hold before forwarding: the ceiling's output part in full, plus the prompt at
    routstr-core's estimate (so a payment sized from `sats_pricing` passes) — or the client-side
    formula when that is larger — never above the ceiling, at least MIN_REQUEST_MSATS.

    A prompt longer than its estimate is charged at settlement, up to the ceiling, from what is
    left of the balance or the payment (the ledger's settle). So is a prompt split dearer than
    plain input (cache writes): the estimate is priced at the input rate, the one
    `sats_pricing.prompt` advertises — at the dearest rate, a hold above every payment sized
    from it (402); the ceiling prices the dearest split."""
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


def _number(x: Msats | None) -> int | float | None:
    return None if x is None else (x if isinstance(x, int) else float(x))


def model_object(price: ModelPrice, btc_usd: Fraction | None = None,
                 markup: Fraction = Fraction(1)) -> dict[str, Any]:
    """One ``/v1/models`` entry at the current BTC/USD rate (`btc_usd`; None: none known).

    `sats_pricing` is what is billed; `pricing` is the same in USD at that rate — for msat
    entries too, so a client pricing in USD at its own rate (routstr-core) agrees with our sats
    when its rate is ours. A USD entry with no rate known has no `sats_pricing` (clients skip
    it; requests get 503) and its USD list prices × markup; an msat entry with no rate, USD
    zeros."""
    try:
        resolved: ModelPrice | None = at_rate(price, btc_usd, markup)
    except errors.ServiceUnavailable:
        resolved = None
    cl, mct = _limits(resolved or price)
    sats = sats_pricing(resolved) if resolved is not None else None
    if sats is not None and btc_usd is not None:
        usd_per_sat = btc_usd / 100_000_000
        usd = SatsPricing(*(getattr(sats, f.name) * usd_per_sat
                            for f in dataclasses.fields(SatsPricing))).as_json()
    elif sats is not None:
        usd = SatsPricing(*(Fraction(0) for _ in dataclasses.fields(SatsPricing))).as_json()
    else:
        assert price.usd is not None
        usd = _usd_list_pricing(price, markup)
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
        "sats_pricing": sats.as_json() if sats is not None else None,
        "pricing_msats": None if resolved is None else {
            "input_msats_per_1k": _number(resolved.input_msats_per_1k),
            "output_msats_per_1k": _number(resolved.output_msats_per_1k),
            "cached_input_msats_per_1k": _number(resolved.cached_input_msats_per_1k),
            "cache_write_msats_per_1k": _number(resolved.cache_write_msats_per_1k),
            "request_msats": _number(resolved.request_msats),
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


def _usd_list_pricing(price: ModelPrice, markup: Fraction) -> dict[str, float]:
    """routstr-core's USD `pricing` (per token) straight from a USD entry's list prices."""
    u = price.usd
    assert u is not None
    per_token = markup / 1_000_000
    inp = u.input * per_token
    return {
        "prompt": float(inp), "completion": float(u.output * per_token),
        "request": float(u.request * markup), "image": 0.0, "web_search": 0.0,
        "internal_reasoning": 0.0,
        "input_cache_read": float(inp if u.cached_input is None else u.cached_input * per_token),
        "input_cache_write": float(inp if u.cache_write is None else u.cache_write * per_token),
        "max_prompt_cost": 0.0, "max_completion_cost": 0.0, "max_cost": 0.0,
    }


def models_document(table: PriceTable, *, btc_usd: Fraction | None = None,
                    markup: Fraction = Fraction(1)) -> dict[str, Any]:
    """The ``/v1/models`` body at `btc_usd` (``?fields=`` is the listing middleware's)."""
    return {"object": "list", "data": [model_object(p, btc_usd, markup) for p in table]}
