"""NUT-18 payment requests: every vector in 18-tests.md, round trips, malformed input."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routstr.cashu import cbor
from routstr.cashu.tokens import NUT10Option, PaymentRequest, TokenError, Transport
from tests.cashu import vectors as V


def _vectors() -> list[tuple[str, dict[str, Any], str]]:
    """(title, JSON form, encoded string) for each vector section."""
    out = []
    blocks = V.under("18", "Payment Request Encoding/Decoding")
    for json_block, encoded_block in zip(blocks[::2], blocks[1::2], strict=True):
        assert json_block.heading == encoded_block.heading
        out.append((json_block.heading, json_block.json(), encoded_block.text.strip()))
    return out


VECTORS = _vectors()
BASIC = "Basic Payment Request"


def _raw_cbor(encoded: str) -> bytes:
    """Independent decode of a creqA string: stdlib base64 (either alphabet), our CBOR reader
    only for the structure comparison."""
    body = encoded[len("creqA") :]
    body += "=" * (-len(body) % 4)
    return base64.b64decode(body.replace("-", "+").replace("_", "/"), validate=True)


def _expected(d: dict[str, Any]) -> PaymentRequest:
    """The PaymentRequest a vector's JSON form describes."""
    nut10 = d.get("nut10")
    return PaymentRequest(
        amount=d.get("a"),
        unit=d.get("u"),
        mints=tuple(d.get("m", ())),
        id=d.get("i"),
        description=d.get("d"),
        single_use=d.get("s"),
        transports=tuple(
            Transport(t["t"], t["a"], tuple(tuple(g) for g in t.get("g", ())))
            for t in d.get("t", ())
        ),
        nut10=None
        if nut10 is None
        else NUT10Option(nut10["k"], nut10["d"], tuple(tuple(g) for g in nut10.get("t", ()))),
    )


def _drop_undefined(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_undefined(v) for k, v in obj.items() if v is not cbor.UNDEFINED}
    if isinstance(obj, list):
        return [_drop_undefined(v) for v in obj]
    return obj


def test_vector_count() -> None:
    assert len(VECTORS) == 6


@pytest.mark.parametrize(("title", "as_json", "encoded"), VECTORS, ids=[v[0] for v in VECTORS])
def test_decode_vectors(title: str, as_json: dict[str, Any], encoded: str) -> None:
    decoded = PaymentRequest.decode(encoded)
    if title == BASIC:
        # Known upstream slip: this vector's JSON and string disagree (see cashu-notes.md).
        # The decoder is checked against what the string holds, read independently: the JSON
        # form of the CBOR with the two fields that differ taken from the bytes themselves.
        raw = cbor.loads(_raw_cbor(encoded))
        assert isinstance(raw, dict)
        assert raw["m"] != as_json["m"] and raw["t"][0]["a"] != as_json["t"][0]["a"]
        as_json = {**as_json, "m": raw["m"], "t": [{**as_json["t"][0], "a": raw["t"][0]["a"]}]}
        assert raw == as_json  # everything else agrees with the published JSON
        assert decoded.mints == ("https://nofees.testnut.cashu.space",)  # as in 18.md's example
    assert decoded == _expected(as_json)


@pytest.mark.parametrize(("title", "as_json", "encoded"), VECTORS, ids=[v[0] for v in VECTORS])
def test_encode_vectors(title: str, as_json: dict[str, Any], encoded: str) -> None:
    if title == BASIC:
        as_json = cbor.loads(_raw_cbor(encoded))  # type: ignore[assignment]
    ours = PaymentRequest.encode(_expected(as_json))
    assert ours.startswith("creqA")
    ours_raw = _raw_cbor(ours)
    theirs_raw = _raw_cbor(encoded)
    if cbor.UNDEFINED in _walk(cbor.loads(theirs_raw)):
        # The upstream encoder writes absent transport tags as CBOR `undefined` ("g": f7); we
        # omit the key. Same content, same key order otherwise.
        assert cbor.loads(ours_raw) == _drop_undefined(cbor.loads(theirs_raw))
    else:
        assert ours_raw == theirs_raw  # byte for byte
        assert ours == encoded.replace("+", "-").replace("/", "_")


def _walk(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in [v, *_walk(v)]]
    if isinstance(obj, list):
        return [x for v in obj for x in [v, *_walk(v)]]
    return []


def test_decode_accepts_both_alphabets_padding_and_whitespace() -> None:
    _, _, encoded = VECTORS[1]  # contains '+'
    assert "+" in encoded
    expected = PaymentRequest.decode(encoded)
    urlsafe = encoded.replace("+", "-").replace("/", "_")
    assert PaymentRequest.decode(urlsafe) == expected
    assert PaymentRequest.decode(urlsafe.rstrip("=")) == expected
    assert PaymentRequest.decode(f"  {urlsafe}\n") == expected


# ----------------------------------------------------------------- round trips

texts = st.text(max_size=30)
tags = st.lists(st.lists(texts, min_size=1, max_size=3).map(tuple), max_size=3).map(tuple)
transports = st.builds(Transport, type=st.text(min_size=1, max_size=10), target=texts, tags=tags)
nut10s = st.builds(NUT10Option, kind=st.text(min_size=1, max_size=10), data=texts, tags=tags)


@st.composite
def requests(draw: st.DrawFn) -> PaymentRequest:
    unit = draw(st.none() | st.text(min_size=1, max_size=8))
    amount = None if unit is None else draw(st.none() | st.integers(1, 2**63 - 1))
    return PaymentRequest(
        amount=amount,
        unit=unit,
        mints=tuple(draw(st.lists(st.text(min_size=1, max_size=40), max_size=3))),
        id=draw(st.none() | texts),
        description=draw(st.none() | texts),
        single_use=draw(st.none() | st.booleans()),
        transports=tuple(draw(st.lists(transports, max_size=3))),
        nut10=draw(st.none() | nut10s),
    )


@given(requests())
@settings(max_examples=300)
def test_encode_decode_round_trip(pr: PaymentRequest) -> None:
    encoded = pr.encode()
    assert encoded.startswith("creqA")
    assert PaymentRequest.decode(encoded) == pr


# ----------------------------------------------------------------- malformed


def _creq(obj: Any) -> str:
    return "creqA" + base64.urlsafe_b64encode(cbor.dumps(obj)).decode()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "creqA",
        "creqB" + VECTORS[0][2][5:],
        "creqa" + VECTORS[0][2][5:],
        VECTORS[0][2][:-10],
        "creqA!!!!",
        "creqA" + "A" * 5,
        _creq([1, 2]),
        _creq({"a": 10}),  # amount without unit
        _creq({"a": 0, "u": "sat"}),
        _creq({"a": -1, "u": "sat"}),
        _creq({"a": True, "u": "sat"}),
        _creq({"a": "10", "u": "sat"}),
        _creq({"u": 1}),
        _creq({"u": ""}),
        _creq({"m": "https://mint"}),
        _creq({"m": [1]}),
        _creq({"s": 1}),
        _creq({"t": {}}),
        _creq({"t": [{"t": "post"}]}),
        _creq({"t": [{"a": "x"}]}),
        _creq({"t": [{"t": "nostr", "a": "x", "g": [[]]}]}),
        _creq({"t": [{"t": "nostr", "a": "x", "g": [["n", 17]]}]}),
        _creq({"t": [{"t": "nostr", "a": "x", "g": "n"}]}),
        _creq({"nut10": {"k": "P2PK"}}),
        _creq({"nut10": ["P2PK"]}),
        _creq({"i": b"bytes"}),
        _creq({"d": 5}),
    ],
)
def test_malformed_requests_raise_token_error(text: str) -> None:
    with pytest.raises(TokenError):
        PaymentRequest.decode(text)


def test_decode_rejects_non_strings() -> None:
    with pytest.raises(TokenError):
        PaymentRequest.decode(b"creqA")  # type: ignore[arg-type]


def test_null_and_undefined_mean_absent() -> None:
    pr = PaymentRequest.decode(_creq({"a": None, "u": None, "i": cbor.UNDEFINED, "m": None}))
    assert pr == PaymentRequest()
    assert PaymentRequest.decode(_creq({"x": 1, "u": "sat"})) == PaymentRequest(unit="sat")


def test_constructor_validates() -> None:
    with pytest.raises(TokenError):
        PaymentRequest(amount=5)
    with pytest.raises(TokenError):
        PaymentRequest(transports=("post",))  # type: ignore[arg-type]
    with pytest.raises(TokenError):
        Transport("", "x")
    assert PaymentRequest(mints=["https://a"]).mints == ("https://a",)  # type: ignore[arg-type]


# ---- NUT-26 creqB (vectors: cashubtc/nuts tests/26-test.md) ---------------------------------
CREQB_VECTORS = [
    (dict(id="7f4a2b39", unit="sat", mints=("https://mint.example.com",)),
     "CREQB1QYQQSDMXX3SNYC3N8YPSQQGQQ5QPS6R5W3C8XW309AKKJMN59EJHSCTDWPKX2TNRDAKSYP0LHG"),
    (dict(id="demo123", amount=1000, unit="sat", single_use=True,
          mints=("https://mint.example.com",), description="Coffee payment"),
     "CREQB1QYQQWER9D4HNZV3NQGQQSQQQQQQQQQQRAQPSQQGQQSQQZQG9QQVXSAR5WPEN5TE0D45KUAPWV4UXZMTSD3JJ"
     "UCM0D5RQQRJRDANXVET9YPCXZ7TDV4H8GXHR3TQ"),
    (dict(id="c9e45d2a", amount=500, unit="sat", mints=("https://mint.example.com",),
          nut10=("P2PK", "02c3b5bb27e361457c92d93d78dd73d3d53732110b2cfe8b50fbc0abc615e9c331",
                 (("timeout", "3600"),))),
     "CREQB1QYQQSCEEV56R2EPJVYPQQZQQQQQQQQQQQ86QXQQPQQZSQXRGW368QUE69UHK66TWWSHX27RPD4CXCEFWVDHK6"
     "ZQQTYQSQQGQQGQYYVPJVVEKYDTZVGERWEFNXCCNGDFHVVUNYEPEXDJRWWRYVSMNXEPNVS6NXDENXGCNZVRZXF3KVE"
     "FCVG6NQENZVVCXZCNRXCCN2EFEVVENXVGRQQXSWARFD4JK7AT5QSENVVPS2N5FAS"),
]


@pytest.mark.parametrize(("fields", "encoded"), CREQB_VECTORS)
def test_creqb_encoding_matches_the_nut26_vectors(fields: dict[str, Any], encoded: str) -> None:
    if "nut10" in fields:
        fields = {**fields, "nut10": NUT10Option(*fields["nut10"])}
    assert PaymentRequest(**fields).encode_b() == encoded
