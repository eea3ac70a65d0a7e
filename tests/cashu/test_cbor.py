"""The strict CBOR subset: RFC 8949 appendix A examples in our subset, the NUT-00 raw token
bytes, round trips, and every kind of malformed input raising CBORError."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routstr.cashu import cbor
from routstr.cashu.cbor import UNDEFINED, CBORError, Undefined, dumps, loads
from tests.cashu import vectors as V

# RFC 8949 Appendix A (the subset we support), value -> hex.
RFC_EXAMPLES: list[tuple[Any, str]] = [
    (0, "00"),
    (1, "01"),
    (10, "0a"),
    (23, "17"),
    (24, "1818"),
    (25, "1819"),
    (100, "1864"),
    (1000, "1903e8"),
    (1000000, "1a000f4240"),
    (1000000000000, "1b000000e8d4a51000"),
    (18446744073709551615, "1bffffffffffffffff"),
    (-18446744073709551616, "3bffffffffffffffff"),
    (-1, "20"),
    (-10, "29"),
    (-100, "3863"),
    (-1000, "3903e7"),
    (False, "f4"),
    (True, "f5"),
    (None, "f6"),
    (UNDEFINED, "f7"),
    (b"", "40"),
    (bytes.fromhex("01020304"), "4401020304"),
    ("", "60"),
    ("a", "6161"),
    ("IETF", "6449455446"),
    ('"\\', "62225c"),
    ("\u00fc", "62c3bc"),
    ("\u6c34", "63e6b0b4"),
    ("\U00010151", "64f0908591"),
    ([], "80"),
    ([1, 2, 3], "83010203"),
    ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ({}, "a0"),
    ({1: 2, 3: 4}, "a201020304"),
    ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    (
        {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"},
        "a56161614161626142616361436164614461656145",
    ),
]


@pytest.mark.parametrize(("value", "hexstr"), RFC_EXAMPLES)
def test_rfc_examples(value: Any, hexstr: str) -> None:
    assert dumps(value).hex() == hexstr
    decoded = loads(bytes.fromhex(hexstr))
    assert decoded == value and type(decoded) is type(value)


def test_raw_v4_token_vector_bytes() -> None:
    """00-tests.md 'Raw Token Serialization': the CBOR after b'crawB' decodes to the JSON shown
    (h'' = bytes), and re-encodes to the same bytes (insertion order kept)."""
    raw_hex = re.search(r"Serialized to raw binary:\s*`h'([0-9a-f]+)'`", V.text("00"))
    assert raw_hex
    raw = bytes.fromhex(raw_hex.group(1))
    assert raw[:5] == b"crawB"
    expected = V.diag_json(V.under("00", "Raw Token Serialization")[0].text)
    assert loads(raw[5:]) == expected
    assert dumps(expected) == raw[5:]


def test_non_preferred_widths_are_accepted_on_decode() -> None:
    assert loads(bytes.fromhex("1800")) == 0
    assert loads(bytes.fromhex("190001")) == 1
    assert loads(bytes.fromhex("5a00000001ff")) == b"\xff"


def test_tuples_encode_as_arrays_and_undefined_is_a_singleton() -> None:
    assert dumps((1, 2)) == dumps([1, 2])
    assert Undefined() is UNDEFINED and not UNDEFINED and repr(UNDEFINED) == "UNDEFINED"


@pytest.mark.parametrize(
    "value", [1.5, float("nan"), 2**64, -(2**64) - 1, object(), {1, 2}, "\ud800", Undefined]
)
def test_unencodable_values_raise(value: Any) -> None:
    with pytest.raises(CBORError):
        dumps(value)


def test_encode_depth_limit() -> None:
    deep: Any = []
    for _ in range(cbor.MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(CBORError):
        dumps(deep)


MALFORMED = [
    "",  # empty
    "18",  # truncated argument
    "19 01",
    "1a 0000 00",
    "1b 00000000 000000",
    "1c",  # reserved additional info 28-30
    "1d",
    "1e",
    "1f",  # indefinite on a major type that has none
    "5f 41 00 ff",  # indefinite byte string
    "7f 61 61 ff",  # indefinite text string
    "9f 01 ff",  # indefinite array
    "bf 61 61 01 ff",  # indefinite map
    "ff",  # lone break
    "c2 41 01",  # tag 2 (bignum)
    "d8 20 60",  # tag 32
    "f9 3c 00",  # half float
    "fa 47 c3 50 00",  # float
    "fb 3f f1 99 99 99 99 99 9a",  # double
    "f8 20",  # simple value 32
    "f0",  # simple value 16
    "41",  # byte string missing its byte
    "62 61",  # text string truncated
    "62 c3 28",  # invalid UTF-8
    "61 ff",  # invalid UTF-8
    "63 ed a0 80",  # UTF-8 encoded surrogate
    "82 01",  # array missing an item
    "a1 01",  # map missing a value
    "a2 61 61 01 61 61 02",  # duplicate key
    "a1 80 01",  # array as a key
    "a1 a0 01",  # map as a key
    "a1 f7 01",  # undefined as a key
    "00 00",  # trailing bytes
    "9b ffffffffffffffff",  # array length 2^64 - 1 with no items
    "bb 7fffffffffffffff",  # huge map
    "5b 00000000ffffffff 00",  # huge byte string
    "7b ffffffffffffffff",  # huge text string
]


@pytest.mark.parametrize("hexstr", MALFORMED)
def test_malformed_inputs_raise_cbor_error(hexstr: str) -> None:
    with pytest.raises(CBORError):
        loads(bytes.fromhex(hexstr.replace(" ", "")))


def test_cbor_error_is_value_error() -> None:
    assert issubclass(CBORError, ValueError)


def test_decode_depth_limit() -> None:
    ok = b"\x81" * cbor.MAX_DEPTH + b"\x00"
    assert loads(ok) is not None
    with pytest.raises(CBORError):
        loads(b"\x81" * (cbor.MAX_DEPTH + 1) + b"\x00")
    with pytest.raises(CBORError):
        loads(b"\x81" * 100_000 + b"\x00")
    assert loads(b"\x81" * 5 + b"\x00", max_depth=5) == [[[[[0]]]]]


def test_size_limit_and_input_type() -> None:
    with pytest.raises(CBORError):
        loads(b"\x40" * 10, max_size=5)
    with pytest.raises(CBORError):
        loads("00")  # type: ignore[arg-type]
    assert loads(bytearray(b"\x01")) == 1 and loads(memoryview(b"\x02")) == 2


def test_boolean_and_integer_keys_collide_as_python_keys() -> None:
    """1 and true are distinct CBOR keys but equal Python keys: refused, never merged."""
    with pytest.raises(CBORError):
        loads(bytes.fromhex("a2 01 00 f5 00".replace(" ", "")))


# ----------------------------------------------------------------- round trips

keys = st.one_of(st.integers(-(2**64), 2**64 - 1), st.text(max_size=8), st.binary(max_size=8))
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.just(UNDEFINED),
    st.integers(-(2**64), 2**64 - 1),
    st.binary(max_size=40),
    st.text(max_size=40),
)
values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=6), st.dictionaries(keys, children, max_size=6)
    ),
    max_leaves=40,
)


@given(values)
@settings(max_examples=300)
def test_dumps_loads_round_trip(value: Any) -> None:
    encoded = dumps(value)
    assert loads(encoded) == value
    assert dumps(loads(encoded)) == encoded


@given(st.binary(max_size=64))
@settings(max_examples=500)
def test_random_bytes_never_escape_cbor_error(data: bytes) -> None:
    try:
        value = loads(data)
    except CBORError:
        return
    assert dumps(value) is not None
