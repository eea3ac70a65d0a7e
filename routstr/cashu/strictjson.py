"""The one bounded JSON reader for everything that arrives from someone else.

Python's `json.loads` is a fine parser for trusted text and a poor one for hostile text:

- 100 000 ``[`` raise `RecursionError`, and a document just under the interpreter's limit
  makes every later recursive walk (ours, `json.dumps`) fail instead;
- a 5 000-digit integer raises a plain `ValueError` (Python's int-string limit) that is not a
  `JSONDecodeError`; 4 000 digits parse and then overflow sqlite's signed 64-bit INTEGER;
- ``NaN``, ``Infinity`` and ``1e400`` (→ ``inf``) are accepted although RFC 8259 has no such
  numbers;
- a duplicate key silently keeps the last value, while other parsers keep the first;
- ``"\\ud800"`` (a lone surrogate) parses into a `str` that cannot be encoded as UTF-8 again.

`loads` refuses all of these with `JsonError` (a `ValueError`) and raises nothing else:

- nesting deeper than `MAX_JSON_DEPTH` arrays/objects;
- a number token longer than `MAX_JSON_NUMBER_CHARS` characters, and a float that is not
  finite (what a value *means* — a token count, an amount — is bounded where it is read: the
  node's `routstr.wire.wire_int`);
- NaN / Infinity / -Infinity;
- duplicate keys in one object. Policy: refused, never first- or last-wins: the node forwards a
  request's bytes upstream unchanged, and a duplicate ``model`` the node read one way and the
  upstream another would bill one model and serve another;
- lone UTF-16 surrogates (escaped or raw), and bytes that are not UTF-8 (or UTF-16/32 with
  the encoding `json.loads` detects).

Everything else is exactly what `json.loads` returns. The depth check runs on the text (strings
removed, then a running sum over the brackets), after `json.loads` has accepted the document
— so it only ever scans valid JSON, where that regex is linear — and before anything walks
the result. This module imports nothing of the node: the wallet reads mint answers and tokens
with it, and `routstr.wire` re-exports it for the rest of the node.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any, Final

__all__ = ["MAX_JSON_DEPTH", "MAX_JSON_NUMBER_CHARS", "JsonError", "loads"]

MAX_JSON_DEPTH: Final = 128  # nested arrays/objects; real API bodies stay well under 32
MAX_JSON_NUMBER_CHARS: Final = 100  # one number token, sign and exponent included

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: one pass
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_RAW_SURROGATE = re.compile("[\ud800-\udfff]")
_DELTA: Final = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class JsonError(ValueError):
    """Text that is not JSON, or JSON beyond this module's bounds."""


def _reject_constant(name: str) -> Any:
    raise JsonError(f"{name} is not a JSON number")


def _int(text: str) -> int:
    if len(text) > MAX_JSON_NUMBER_CHARS:
        raise JsonError(f"a number longer than {MAX_JSON_NUMBER_CHARS} characters")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_JSON_NUMBER_CHARS:
        raise JsonError(f"a number longer than {MAX_JSON_NUMBER_CHARS} characters")
    value = float(text)
    if not math.isfinite(value):
        raise JsonError("a number out of the range of a double")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JsonError(f"duplicate key {key[:40]!r}")
            seen.add(key)
    return out


def _text(data: str | bytes | bytearray) -> str:
    if isinstance(data, str):
        return data
    raw = bytes(data)
    try:
        return raw.decode(json.detect_encoding(raw))
    except (UnicodeDecodeError, LookupError):
        raise JsonError("not UTF-8 text") from None


def depth_of(text: str) -> int:
    """The deepest nesting of arrays/objects in valid JSON `text` (0 for a scalar)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    return max(accumulate(map(_DELTA.__getitem__, brackets)), default=0)


def _might_hold_surrogates(text: str, *, raw: bool) -> bool:
    """`raw`: the text came as str (bytes were decoded as UTF-8, which refuses surrogates)."""
    if "\\u" in text and _ESCAPED_SURROGATE.search(text):
        return True
    return raw and not text.isascii() and _RAW_SURROGATE.search(text) is not None


def loads(data: str | bytes | bytearray, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads` within the bounds above; raises only `JsonError`."""
    if not isinstance(data, (str, bytes, bytearray)):
        raise JsonError("JSON must be text or bytes")
    text = _text(data)
    try:
        doc = json.loads(text, object_pairs_hook=_object, parse_int=_int,
                         parse_float=_float, parse_constant=_reject_constant)
    except JsonError:
        raise
    except RecursionError:
        raise JsonError(f"nested deeper than {max_depth}") from None
    except ValueError as exc:  # JSONDecodeError, and int() limits
        raise JsonError(str(exc)[:200]) from None
    # fewer opening brackets than the limit (the common case, counted at C speed): no scan
    if text.count("[") + text.count("{") > max_depth and depth_of(text) > max_depth:
        raise JsonError(f"nested deeper than {max_depth}")
    if _might_hold_surrogates(text, raw=isinstance(data, str)):
        try:
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise JsonError("a lone UTF-16 surrogate in a string") from None
    return doc
