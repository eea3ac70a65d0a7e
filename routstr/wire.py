"""What the node reads off the wire: one JSON reader, one integer reader, one sats reader.

Every value a client, an upstream, a mint, a relay or an LNURL service sends passes one of
these before the node computes with it or stores it:

- `loads` (re-exported from `cashu.strictjson`, which the wallet library uses too): JSON
  within `MAX_JSON_DEPTH` nesting and `MAX_JSON_NUMBER_CHARS`-character numbers, no NaN or
  Infinity, no duplicate keys, no lone surrogates; raises only `JsonError`.
  `request_json` maps that to 400 ``invalid_json``; callers reading a foreign service's answer
  map it to their own upstream error (502) where the answer enters.
- `wire_int`: an integer from a header, a query parameter or a JSON field, within
  [low, high] — by default [0, `MAX_WIRE_INT`], sqlite's signed 64-bit INTEGER — so nothing
  that reaches the database can overflow it. Text must be ASCII digits (Python's `int()`
  also takes ``"1_000"``, ``"٣"`` and 5 000 digits); JSON values must be ints — not bools,
  not floats (``2.0`` would be 2 here and 1 choice to code that tests ``type(v) is int``).
  Anything else → 400 ``invalid_parameter``.
- `sats_msats`: a decimal amount of sats (``"12"``, ``"0.5"``) → msats exactly, without a float;
  digits past the msat are cut (this reads caps and limits: rounding down never raises one).
- `usage_count`: a token count an upstream reported, clamped to `MAX_USAGE_TOKENS`: a count
  beyond any context window is a lying or broken upstream, and billing caps what it charges.
"""

from __future__ import annotations

import re
from typing import Any, Final

from .cashu.strictjson import MAX_JSON_DEPTH, MAX_JSON_NUMBER_CHARS, JsonError, loads
from .errors import InvalidRequest

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_JSON_NUMBER_CHARS",
    "MAX_UNIX_S",
    "MAX_USAGE_TOKENS",
    "MAX_WIRE_INT",
    "JsonError",
    "loads",
    "request_json",
    "sats_msats",
    "usage_count",
    "wire_int",
]

MAX_WIRE_INT: Final = (1 << 63) - 1  # sqlite's INTEGER is signed 64-bit
MAX_UNIX_S: Final = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second datetime can show
MAX_USAGE_TOKENS: Final = 1 << 40  # ~10^12 tokens: far beyond any model's context
_MAX_SATS_DIGITS: Final = 16  # 21·10^14 sats is every bitcoin: 16 digits
_DIGITS = re.compile(r"[+-]?[0-9]{1,19}")
_SATS = re.compile(rf"([0-9]{{1,{_MAX_SATS_DIGITS}}})(?:\.([0-9]{{0,18}}))?")


def request_json(body: bytes | str) -> Any:
    """A request body as JSON; anything `loads` refuses → 400 ``invalid_json``."""
    try:
        return loads(body)
    except JsonError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}",
                             code="invalid_json") from None


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        return int(text) if _DIGITS.fullmatch(text) else None
    return None


def wire_int(value: object, name: str, *, low: int = 0, high: int = MAX_WIRE_INT) -> int:
    """`value` (header/query text or a JSON value) as an int in [low, high], else 400."""
    out = _int_or_none(value)
    if out is None:
        raise InvalidRequest(f"'{name}' must be an integer", code="invalid_parameter")
    if not low <= out <= high:
        raise InvalidRequest(f"'{name}' must be between {low} and {high}",
                             code="invalid_parameter", details={"min": low, "max": high})
    return out


def sats_msats(raw: str, name: str, *, high_msats: int, code: str = "invalid_parameter") -> int:
    """Decimal sats text → msats (exact, cut below the msat), at most `high_msats`, else 400."""
    m = _SATS.fullmatch(raw.strip())
    if m is None:
        raise InvalidRequest(f"{name} must be a non-negative decimal number of sats", code=code)
    msats = int(m.group(1)) * 1000 + int((m.group(2) or "")[:3].ljust(3, "0"))
    if msats > high_msats:
        raise InvalidRequest(f"{name} must be at most {high_msats // 1000} sats", code=code,
                             details={"max_msats": high_msats})
    return msats


def usage_count(value: object) -> int | None:
    """A token count from an upstream's `usage`: a non-negative int, clamped to
    `MAX_USAGE_TOKENS`; None when it is not one."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return None
    return min(value, MAX_USAGE_TOKENS)
