"""The price table the node serves: the configured table plus the operator's runtime overrides.

`PriceBook` is a `pricing.PriceTable` (the proxy, ``/v1/models`` and ``/v1/info`` use it
unchanged) whose entries are rebuilt whenever the admin API changes an override. Overrides
live in sqlite (``price_overrides``), so they survive a restart; `pricing` stays pure.

An override names a model and some of its five price fields (``input_msats_per_1k``,
``output_msats_per_1k``, ``request_msats``, ``max_output_tokens``, ``context_length``): for a
model in the configured table only those fields change; a model not in it is added and needs
all of them but ``request_msats`` (as in a ``--pricing`` file). Removing an override restores
the configured price. An override the configured table can no longer carry (its model was
removed from a ``--pricing`` file and the override is incomplete) is skipped with a warning.

One process serves the database, so the in-memory copy is the truth; another process (the
``keys`` CLI) never edits prices.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, Final

from . import admin_store
from .db import Database
from .errors import ApiError
from .pricefeed import RateFeed
from .pricing import MAX_MODEL_ID_CHARS, MAX_PRICE_VALUE, ModelPrice, PriceTable, at_rate, override

log = logging.getLogger("routstr.prices")

PRICE_FIELDS: Final = (
    "input_msats_per_1k",
    "output_msats_per_1k",
    "request_msats",
    "max_output_tokens",
    "context_length",
)


def apply_override(base: ModelPrice | None, model_id: str, fields: Mapping[str, int]) -> ModelPrice:
    """The price with `fields` overridden; a new model needs all fields but request_msats.

    Raises `ValueError` for an unknown field, a value that is not an integer in range, or a
    new model without enough fields.
    """
    unknown = sorted(set(fields) - set(PRICE_FIELDS))
    if unknown:
        raise ValueError(f"unknown price field(s): {', '.join(unknown)}")
    for name, value in fields.items():
        if type(value) is not int or not 0 <= value <= MAX_PRICE_VALUE:
            raise ValueError(f"{name} must be an integer in 0..{MAX_PRICE_VALUE}")
    if base is not None:  # over a USD entry, msat rates stay fixed over the live ones
        return override(base, fields)
    missing = [f for f in PRICE_FIELDS if f != "request_msats" and f not in fields]
    if missing:
        raise ValueError(f"a model not in the table needs {', '.join(missing)}")
    values: dict[str, Any] = {"request_msats": 0, **fields}
    return ModelPrice(id=model_id, name=model_id, owned_by="operator", **values)


class PriceBook(PriceTable):
    def __init__(self, base: PriceTable, db: Database) -> None:
        self.base = base
        self._db = db
        self.overrides: dict[str, tuple[str, dict[str, int]]] = {}
        self.rates: RateFeed | None = None  # set by the node: entries() shows msats at its rate
        self.markup = Fraction(1)
        super().__init__(list(base), default=base.default)
        self.reload()

    def reload(self) -> None:
        self.overrides = self._db.read(admin_store.load_overrides)
        self._rebuild()

    def _base_price(self, model_id: str) -> ModelPrice | None:
        return next((p for p in self.base if p.id.lower() == model_id.lower()), None)

    def _rebuild(self) -> None:
        merged = {p.id.lower(): p for p in self.base}
        for key, (model_id, fields) in self.overrides.items():
            try:
                merged[key] = apply_override(merged.get(key), model_id, fields)
            except ValueError as exc:
                log.warning("price override for %r skipped: %s", model_id, exc)
        PriceTable.__init__(self, list(merged.values()), default=self.base.default)

    def set_override(self, model_id: str, fields: Mapping[str, int]) -> ModelPrice:
        """Validate, persist and apply an override (merged into an existing one). ValueError
        when invalid; nothing changes then."""
        model_id = model_id.strip()
        if not model_id or len(model_id) > MAX_MODEL_ID_CHARS or any(
                c.isspace() or not c.isprintable() for c in model_id):
            raise ValueError("model id must be 1..200 printable characters without spaces")
        base = self._base_price(model_id)
        previous = self.overrides.get(model_id.lower())
        merged_fields = {**(previous[1] if previous else {}), **fields}
        spelled = base.id if base is not None else model_id
        price = apply_override(base, spelled, merged_fields)
        self._db.transaction(lambda c: admin_store.put_override(
            c, spelled, merged_fields, int(time.time())))
        self.overrides[spelled.lower()] = (spelled, merged_fields)
        self._rebuild()
        log.info("price override set for %s: %s", spelled, merged_fields)
        return price

    def clear_override(self, model_id: str) -> bool:
        """Remove a model's override (a model only the override added disappears)."""
        removed = self._db.transaction(lambda c: admin_store.delete_override(c, model_id))
        self.overrides.pop(model_id.strip().lower(), None)
        self._rebuild()
        if removed:
            log.info("price override removed for %s", model_id)
        return removed

    def price_fields(self, price: ModelPrice) -> dict[str, Any]:
        """The price fields in msats at the current rate (None for a USD entry with no rate);
        `usd`: whether the entry follows BTC/USD."""
        rate = self.rates.usd_per_btc() if self.rates is not None else None
        try:
            now = at_rate(price, rate, self.markup)
        except ApiError:
            return {**{f: None for f in PRICE_FIELDS}, "usd": True}
        values = {f: getattr(now, f) for f in PRICE_FIELDS}
        return {**{f: v if isinstance(v, int) else float(v) for f, v in values.items()},
                "usd": price.usd is not None}

    def entries(self) -> list[dict[str, Any]]:
        """Every served model with its configured price and whether an override applies."""
        out = []
        for price in self:
            base = self._base_price(price.id)
            override = self.overrides.get(price.id.lower())
            out.append({
                "id": price.id,
                "name": price.name or price.id,
                **self.price_fields(price),
                "overridden": override is not None,
                "override": dict(override[1]) if override else None,
                "base": self.price_fields(base) if base else None,
            })
        return out
