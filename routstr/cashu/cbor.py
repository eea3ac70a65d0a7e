"""The strict subset of CBOR (RFC 8949) that cashuB tokens (NUT-00) and payment requests
(NUT-18) use.

Supported data model, both directions:

- major types 0/1: integers in [-2^64, 2^64 - 1] (no bignum tags);
- major type 2: byte strings (`bytes`), major type 3: UTF-8 text strings (`str`);
- major type 4: arrays (decoded as `list`; `list` and `tuple` encode),
- major type 5: maps (decoded as `dict`, keys must be int/str/bytes/bool/None, no duplicates);
- major type 7: false, true, null and `undefined` (simple value 23, the singleton `UNDEFINED`;
  NUT-18's official vectors encode absent transport tags as undefined).

Encoding uses definite lengths and the shortest argument form ("preferred serialization");
map keys keep the dict's insertion order (the NUT vectors are not in canonical key order).
Decoding accepts any well-formed argument width, and rejects with `CBORError` (a `ValueError`)
everything else: indefinite lengths (no NUT vector uses them), tags, floats, other simple
values, reserved additional-information values, truncated input, trailing bytes, invalid
UTF-8, nesting deeper than `max_depth`, declared lengths that cannot fit in the remaining
input, and inputs over `max_size` bytes. No other exception type escapes `loads`.
"""

from __future__ import annotations

from typing import Final

__all__ = ["UNDEFINED", "CBORError", "Undefined", "dumps", "loads"]

MAX_DEPTH: Final = 16
MAX_SIZE: Final = 1 << 20  # bytes; a NUT-00 token of ~5,000 proofs

_UINT64_MAX = (1 << 64) - 1


class CBORError(ValueError):
    """Malformed or unsupported CBOR."""


class Undefined:
    """CBOR's `undefined` (0xf7). Use the singleton `UNDEFINED`."""

    _instance: Undefined | None = None

    def __new__(cls) -> Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNDEFINED"

    def __bool__(self) -> bool:
        return False


UNDEFINED: Final = Undefined()


# --------------------------------------------------------------------------- encoding


def _head(major: int, n: int, out: bytearray) -> None:
    mt = major << 5
    if n < 24:
        out.append(mt | n)
    elif n < 0x100:
        out.append(mt | 24)
        out.append(n)
    elif n < 0x10000:
        out.append(mt | 25)
        out += n.to_bytes(2, "big")
    elif n < 0x100000000:
        out.append(mt | 26)
        out += n.to_bytes(4, "big")
    else:
        out.append(mt | 27)
        out += n.to_bytes(8, "big")


def _encode(obj: object, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CBORError("value nested too deeply")
    if obj is None:
        out.append(0xF6)
    elif obj is True:
        out.append(0xF5)
    elif obj is False:
        out.append(0xF4)
    elif obj is UNDEFINED:
        out.append(0xF7)
    elif isinstance(obj, int):
        if 0 <= obj <= _UINT64_MAX:
            _head(0, obj, out)
        elif -_UINT64_MAX - 1 <= obj < 0:
            _head(1, -1 - obj, out)
        else:
            raise CBORError("integer out of the 64-bit CBOR range")
    elif isinstance(obj, bytes | bytearray | memoryview):
        b = bytes(obj)
        _head(2, len(b), out)
        out += b
    elif isinstance(obj, str):
        try:
            b = obj.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates
            raise CBORError("text is not encodable as UTF-8") from exc
        _head(3, len(b), out)
        out += b
    elif isinstance(obj, list | tuple):
        _head(4, len(obj), out)
        for item in obj:
            _encode(item, out, depth + 1)
    elif isinstance(obj, dict):
        _head(5, len(obj), out)
        for k, v in obj.items():
            _encode(k, out, depth + 1)
            _encode(v, out, depth + 1)
    else:
        raise CBORError(f"cannot encode {type(obj).__name__} as CBOR")


def dumps(obj: object) -> bytes:
    """Encode `obj` (None, bool, int, bytes, str, list/tuple, dict, UNDEFINED) as CBOR."""
    out = bytearray()
    _encode(obj, out, 0)
    return bytes(out)


# --------------------------------------------------------------------------- decoding


class _Decoder:
    __slots__ = ("buf", "pos", "max_depth")

    def __init__(self, buf: bytes, max_depth: int) -> None:
        self.buf = buf
        self.pos = 0
        self.max_depth = max_depth

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise CBORError("truncated CBOR")
        chunk = self.buf[self.pos : end]
        self.pos = end
        return chunk

    def _argument(self, info: int) -> int:
        if info < 24:
            return info
        if info == 24:
            return self._take(1)[0]
        if info == 25:
            return int.from_bytes(self._take(2), "big")
        if info == 26:
            return int.from_bytes(self._take(4), "big")
        if info == 27:
            return int.from_bytes(self._take(8), "big")
        if info == 31:
            raise CBORError("indefinite-length items are not supported")
        raise CBORError("reserved additional information value")

    def _count(self, info: int, min_item_size: int) -> int:
        n = self._argument(info)
        if n * min_item_size > len(self.buf) - self.pos:
            raise CBORError("declared length exceeds the input")
        return n

    def item(self, depth: int) -> object:
        if depth > self.max_depth:
            raise CBORError("CBOR nested too deeply")
        initial = self._take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if major == 0:
            return self._argument(info)
        if major == 1:
            return -1 - self._argument(info)
        if major == 2:
            return self._take(self._count(info, 1))
        if major == 3:
            raw = self._take(self._count(info, 1))
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CBORError("text string is not valid UTF-8") from exc
        if major == 4:
            n = self._count(info, 1)
            return [self.item(depth + 1) for _ in range(n)]
        if major == 5:
            n = self._count(info, 2)
            out: dict[object, object] = {}
            for _ in range(n):
                key = self.item(depth + 1)
                if not (key is None or isinstance(key, int | str | bytes)):
                    raise CBORError("map key must be an integer, string, bool or null")
                if key in out:
                    raise CBORError("duplicate map key")
                out[key] = self.item(depth + 1)
            return out
        if major == 6:
            raise CBORError("CBOR tags are not supported")
        # major 7
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        if info == 23:
            return UNDEFINED
        raise CBORError("unsupported simple value or float")


def loads(
    data: bytes | bytearray | memoryview, *, max_depth: int = MAX_DEPTH, max_size: int = MAX_SIZE
) -> object:
    """Decode exactly one CBOR item from `data`; raise `CBORError` on anything malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CBORError("CBOR input must be bytes")
    buf = bytes(data)
    if len(buf) > max_size:
        raise CBORError("CBOR input too large")
    dec = _Decoder(buf, max_depth)
    value = dec.item(0)
    if dec.pos != len(buf):
        raise CBORError("trailing bytes after the CBOR item")
    return value
