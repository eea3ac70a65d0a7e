"""NUT-00 tokens: every V3/V4 vector in 00-tests.md, hypothesis round trips, strictness, and a
100,000-input fuzz run over parse_token, PaymentRequest.decode and cbor.loads."""

from __future__ import annotations

import base64
import copy
import json
import random
import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routstr.cashu import cbor
from routstr.cashu.secp256k1 import N, mul_g
from routstr.cashu.tokens import (
    DLEQProof,
    PaymentRequest,
    Proof,
    Token,
    TokenError,
    parse_raw_token,
    parse_token,
)
from tests.cashu import vectors as V

# ----------------------------------------------------------------- vectors

V3_JSON_BLOCK, V3_SERIALIZED_BLOCK = V.under("00", "Serialization of TokenV3")
V3_INVALID_BLOCK, V3_VALID_BLOCK, V3_PADDING_BLOCK = V.under("00", "Deserialization of TokenV3")
V4_SINGLE = V.under("00", "Single keyset")
V4_MULTI = V.under("00", "Multiple keysets")
RAW_JSON_BLOCK = V.under("00", "Raw Token Serialization")[0]


def _token_from_v3_json(d: dict[str, Any]) -> Token:
    (entry,) = d["token"]
    return Token(
        mint=entry["mint"],
        unit=d.get("unit", "sat"),
        proofs=tuple(Proof(p["amount"], p["id"], p["secret"], p["C"]) for p in entry["proofs"]),
        memo=d.get("memo"),
    )


def _token_from_v4_diag(d: dict[str, Any]) -> Token:
    return Token(
        mint=d["m"],
        unit=d["u"],
        proofs=tuple(
            Proof(p["a"], group["i"].hex(), p["s"], p["c"].hex())
            for group in d["t"]
            for p in group["p"]
        ),
        memo=d.get("d"),
    )


def test_v3_serialization_vector() -> None:
    expected = _token_from_v3_json(V3_JSON_BLOCK.json())
    serialized = V3_SERIALIZED_BLOCK.text.strip()
    assert parse_token(serialized) == expected
    assert expected.serialize(3) == serialized.rstrip("=")
    assert expected.amount == sum(p["amount"] for p in V3_JSON_BLOCK.json()["token"][0]["proofs"])


def test_v3_invalid_vectors() -> None:
    bad = V.lines(V3_INVALID_BLOCK.text)
    assert len(bad) == 2
    for text in bad:
        with pytest.raises(TokenError):
            parse_token(text)


def test_v3_valid_vector() -> None:
    (text,) = V.lines(V3_VALID_BLOCK.text)
    assert parse_token(text) == _token_from_v3_json(V3_JSON_BLOCK.json())


def test_v3_padding_vectors() -> None:
    padded, unpadded = V.lines(V3_PADDING_BLOCK.text)
    assert padded.endswith("=") and not unpadded.endswith("=")
    assert parse_token(padded) == parse_token(unpadded)
    assert parse_token(padded).memo != _token_from_v3_json(V3_JSON_BLOCK.json()).memo


@pytest.mark.parametrize("section", [V4_SINGLE, V4_MULTI], ids=["single", "multiple"])
def test_v4_vectors(section: list[V.Block]) -> None:
    diag, encoded_block = section
    expected = _token_from_v4_diag(V.diag_json(diag.text))
    encoded = encoded_block.text.strip()
    assert parse_token(encoded) == expected
    assert expected.serialize(4) == encoded.rstrip("=")  # byte-identical CBOR, unpadded


def test_raw_v4_vector() -> None:
    raw_hex = re.search(r"Serialized to raw binary:\s*`h'([0-9a-f]+)'`", V.text("00"))
    assert raw_hex
    raw = bytes.fromhex(raw_hex.group(1))
    expected = _token_from_v4_diag(V.diag_json(RAW_JSON_BLOCK.text))
    assert parse_raw_token(raw) == expected
    assert expected.to_raw() == raw
    # the raw and the base64 forms of this token agree
    assert parse_token(V4_SINGLE[1].text.strip()) == expected
    with pytest.raises(TokenError):
        parse_raw_token(raw[1:])
    with pytest.raises(TokenError):
        parse_raw_token(raw[:-1])


def test_accepts_uri_prefix_whitespace_and_standard_alphabet() -> None:
    encoded = V4_MULTI[1].text.strip()
    expected = parse_token(encoded)
    assert parse_token(f"cashu:{encoded}") == expected
    assert parse_token(f"  CASHU:{encoded}\r\n") == expected
    assert "-" in encoded or "_" in encoded
    assert parse_token(encoded.replace("-", "+").replace("_", "/")) == expected


# ----------------------------------------------------------------- semantics


def _pt(k: int) -> str:
    return mul_g(k).to_hex()


def _proof(n: int, keyset_id: str = "009a1f293253e41e", **kw: Any) -> Proof:
    return Proof(
        amount=kw.pop("amount", 1 << (n % 8)),
        id=keyset_id,
        secret=f"secret-{n}",
        C=_pt(n + 1),
        **kw,
    )


def _v3(d: Any) -> str:
    return "cashuA" + base64.urlsafe_b64encode(json.dumps(d).encode()).decode()


def _v4(d: Any) -> str:
    return "cashuB" + base64.urlsafe_b64encode(cbor.dumps(d)).decode()


def test_v3_entries_of_one_mint_are_merged_and_unit_defaults_to_sat() -> None:
    p1, p2, p3 = (_proof(i).to_dict() for i in range(3))
    text = _v3(
        {
            "token": [
                {"mint": "https://m.example", "proofs": [p1, p2]},
                {"mint": "https://m.example/", "proofs": [p3]},
            ]
        }
    )
    token = parse_token(text)
    assert token.mint == "https://m.example"
    assert token.unit == "sat" and token.memo is None
    assert token.proofs == tuple(_proof(i) for i in range(3))


def test_v3_several_mints_rejected() -> None:
    text = _v3(
        {
            "token": [
                {"mint": "https://a.example", "proofs": [_proof(0).to_dict()]},
                {"mint": "https://b.example", "proofs": [_proof(1).to_dict()]},
            ]
        }
    )
    with pytest.raises(TokenError, match="several mints"):
        parse_token(text)


def test_to_dict_for_mints_omits_dleq_but_tokens_carry_it() -> None:
    dleq = DLEQProof(e="aa" * 32, s="bb" * 32, r="cc" * 32)
    p = _proof(1, dleq=dleq, witness='{"signatures": []}')
    assert p.to_dict() == {
        "amount": p.amount,
        "id": p.id,
        "secret": p.secret,
        "C": p.C,
        "witness": p.witness,
    }
    assert p.to_dict(include_dleq=True)["dleq"] == {"e": "aa" * 32, "s": "bb" * 32, "r": "cc" * 32}
    token = Token("https://m.example", "sat", (p,))
    for version in (3, 4):
        assert parse_token(token.serialize(version)) == token


def test_incomplete_dleq_is_dropped_on_serialization() -> None:
    p = _proof(1, dleq=DLEQProof(e="aa" * 32, s="bb" * 32))
    token = Token("https://m.example", "sat", (p,))
    for version in (3, 4):
        assert parse_token(token.serialize(version)).proofs[0].dleq is None
    # storage keeps it as held
    assert Proof.from_dict(p.to_dict(include_dleq=True)) == p
    # but a token that carries one still parses
    d = {
        "token": [
            {
                "mint": "https://m.example",
                "proofs": [{**p.to_dict(), "dleq": {"e": "AA" * 32, "s": "bb" * 32}}],
            }
        ]
    }
    assert parse_token(_v3(d)).proofs[0].dleq == DLEQProof(e="aa" * 32, s="bb" * 32)


def test_from_dict_normalises_hex_case_and_ignores_unknown_fields() -> None:
    p = _proof(3)
    d = {**p.to_dict(), "id": p.id.upper(), "C": p.C.upper(), "Y": "whatever", "dleq": None}
    assert Proof.from_dict(d) == p


def test_v4_groups_proofs_by_keyset_and_accepts_short_ids() -> None:
    full_v2 = "01" + "ab" * 32
    proofs = (_proof(0, "009a1f293253e41e"), _proof(1, full_v2), _proof(2, "009a1f293253e41e"))
    token = Token("https://m.example", "sat", proofs)
    round_tripped = parse_token(token.serialize(4))
    assert round_tripped.proofs == (proofs[0], proofs[2], proofs[1])
    assert parse_token(token.serialize(3)) == token

    short = Token("https://m.example", "sat", (_proof(5, full_v2[:16]),))
    parsed = parse_token(short.serialize(4))
    assert parsed.proofs[0].id == full_v2[:16]
    resolved = parsed.resolve_keyset_ids([full_v2, "009a1f293253e41e"])
    assert resolved.proofs[0].id == full_v2
    assert resolved.resolve_keyset_ids([full_v2]) == resolved
    with pytest.raises(TokenError, match="ambiguous"):
        parsed.resolve_keyset_ids([full_v2, full_v2[:16] + "00" * 25])
    with pytest.raises(TokenError, match="unknown"):
        parsed.resolve_keyset_ids(["009a1f293253e41e"])


def test_token_properties_and_validation() -> None:
    token = Token("https://m.example///", "sat", [_proof(0), _proof(1, "00ffffffffffffff")])  # type: ignore[arg-type]
    assert token.mint == "https://m.example"
    assert isinstance(token.proofs, tuple)
    assert token.amount == sum(p.amount for p in token.proofs)
    assert token.keyset_ids == ("009a1f293253e41e", "00ffffffffffffff")
    with pytest.raises(TokenError):
        token.serialize(5)
    with pytest.raises(TokenError):
        Token("https://m.example", "sat", ())
    with pytest.raises(TokenError):
        Token("https://m.example", "sat", (_proof(0), _proof(0)))  # same secret twice
    for mint in ("", "ftp://m", "https://", "m.example", "https://a b", 5):
        with pytest.raises(TokenError):
            Token(mint, "sat", (_proof(0),))  # type: ignore[arg-type]
    with pytest.raises(TokenError):
        Token("https://m.example", "", (_proof(0),))


BAD_PROOF_FIELDS: list[dict[str, Any]] = [
    {"amount": 0},
    {"amount": -1},
    {"amount": 2**64},
    {"amount": 2**63},
    {"amount": True},
    {"amount": 1.0},
    {"amount": "1"},
    {"id": "009a1f293253e4"},
    {"id": "009a1f293253e41g"},
    {"id": "I2yN+iRYfkzT"},  # pre-0.15 base64 keyset id
    {"id": None},
    {"secret": ""},
    {"secret": 5},
    {"secret": "\ud800"},
    {"C": "02" + "00" * 32},  # x = 0 is not on the curve
    {"C": "04" + "11" * 32},
    {"C": mul_g(5).to_hex(False)},
    {"C": None},
    {"dleq": {"e": "aa" * 32}},
    {"dleq": {"e": "aa" * 31, "s": "bb" * 32}},
    {"dleq": {"e": "aa" * 32, "s": "bb" * 32, "r": "cc"}},
    {"dleq": "x"},
    {"witness": 5},
]


@pytest.mark.parametrize("bad", BAD_PROOF_FIELDS)
def test_bad_proof_fields(bad: dict[str, Any]) -> None:
    d = {**_proof(1).to_dict(), **bad}
    with pytest.raises(TokenError):
        Proof.from_dict(d)
    with pytest.raises(TokenError):
        parse_token(_v3({"token": [{"mint": "https://m.example", "proofs": [d]}]}))


@pytest.mark.parametrize("missing", ["amount", "id", "secret", "C"])
def test_missing_proof_fields(missing: str) -> None:
    d = _proof(1).to_dict()
    del d[missing]
    with pytest.raises(TokenError):
        Proof.from_dict(d)


def _good_v4() -> dict[str, Any]:
    return {
        "t": [
            {
                "i": bytes.fromhex("009a1f293253e41e"),
                "p": [{"a": 1, "s": "x", "c": bytes.fromhex(_pt(9))}],
            }
        ],
        "m": "https://m.example",
        "u": "sat",
    }


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("m"),
        lambda d: d.pop("u"),
        lambda d: d.pop("t"),
        lambda d: d.update(t=[]),
        lambda d: d.update(t={}),
        lambda d: d.update(d=5),
        lambda d: d.update(m=b"https://m.example"),
        lambda d: d["t"][0].update(i="009a1f293253e41e"),
        lambda d: d["t"][0].update(i=b"\x00" * 7),
        lambda d: d["t"][0].update(i=b"\x00" * 16),
        lambda d: d["t"][0].update(p={}),
        lambda d: d["t"][0].update(p=[]),  # no proofs at all
        lambda d: d["t"][0]["p"][0].update(a=0),
        lambda d: d["t"][0]["p"][0].update(a=-5),
        lambda d: d["t"][0]["p"][0].update(s=b"x"),
        lambda d: d["t"][0]["p"][0].update(c=_pt(9)),
        lambda d: d["t"][0]["p"][0].update(c=bytes.fromhex(_pt(9))[:-1]),
        lambda d: d["t"][0]["p"][0].update(d={"e": b"\x00" * 32}),
        lambda d: d["t"][0]["p"][0].update(d={"e": b"\x00" * 32, "s": b"\x00" * 31}),
        lambda d: d["t"][0]["p"][0].update(d=[1]),
        lambda d: d["t"][0]["p"][0].update(w=b"w"),
        lambda d: d["t"].append(5),
    ],
)
def test_bad_v4_structures(mutate: Any) -> None:
    d = _good_v4()
    assert parse_token(_v4(d)).amount == 1
    mutate(d)
    with pytest.raises(TokenError):
        parse_token(_v4(d))


def test_v4_null_and_undefined_optional_fields_and_unknown_keys() -> None:
    d = _good_v4()
    d["d"] = None
    d["x"] = [1, 2]
    d["t"][0]["p"][0].update(d=cbor.UNDEFINED, w=None, z=1)
    token = parse_token(_v4(d))
    assert token.memo is None and token.proofs[0].dleq is None and token.proofs[0].witness is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "cashu",
        "cashuA",
        "cashuB",
        "cashuC" + "A" * 8,
        "cashuA" + "A",  # 1 mod 4
        "cashuA" + "AAAA===",
        "cashuA" + "A=AA",
        "cashuA" + "AA AA",
        "cashuA" + base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        _v3([]),
        _v3({"token": []}),
        _v3({"token": {}}),
        _v3({"token": [5]}),
        _v3({"token": [{"proofs": []}]}),
        _v3({"token": [{"mint": "https://m.example", "proofs": []}]}),
        _v3({"token": [{"mint": "https://m.example", "proofs": {}}]}),
        _v3({"token": [{"mint": "https://m.example", "proofs": [_proof(1).to_dict()]}], "unit": 5}),
        _v3(
            {
                "token": [{"mint": "https://m.example", "proofs": [_proof(1).to_dict()]}],
                "memo": ["x"],
            }
        ),
        "cashuA" + base64.urlsafe_b64encode(b'{"token": NaN}').decode(),
        "cashuA" + base64.urlsafe_b64encode(b'{"token": 1, "token": 2}').decode(),
        "cashuA" + base64.urlsafe_b64encode(b"[" * 100_000).decode(),
        "cashuA" + base64.urlsafe_b64encode(b'{"a": 1' + b"0" * 5000 + b"}").decode(),
        "cashuB" + base64.urlsafe_b64encode(b"\x81" * 100).decode(),
        "cashuB" + base64.urlsafe_b64encode(cbor.dumps([1])).decode(),
        "cashuA" + "A" * 1_000_001,
    ],
)
def test_malformed_tokens_raise_token_error(text: str) -> None:
    with pytest.raises(TokenError):
        parse_token(text)


def test_non_string_input() -> None:
    for bad in (None, b"cashuA", 5):
        with pytest.raises(TokenError):
            parse_token(bad)  # type: ignore[arg-type]
    with pytest.raises(TokenError):
        parse_raw_token("crawB")  # type: ignore[arg-type]


# ----------------------------------------------------------------- hypothesis round trips


def _hex(n: int) -> st.SearchStrategy[str]:
    return st.binary(min_size=n, max_size=n).map(bytes.hex)


points = st.integers(1, N - 1).map(lambda k: mul_g(k).to_hex())
keyset_ids = st.one_of(
    _hex(7).map(lambda h: "00" + h),
    _hex(32).map(lambda h: "01" + h),
    _hex(8),
    st.sampled_from(["009a1f293253e41e", "00ad268c4d1f5826"]),
)
complete_dleqs = st.builds(DLEQProof, e=_hex(32), s=_hex(32), r=_hex(32))
proofs = st.builds(
    Proof,
    amount=st.integers(1, 2**60),  # six of them stay below the 2^63 total
    id=keyset_ids,
    secret=st.text(min_size=1, max_size=80),
    C=points,
    dleq=st.none() | complete_dleqs,
    witness=st.none() | st.text(max_size=80),
)
mints = st.one_of(
    st.sampled_from(
        ["https://8333.space:3338", "http://localhost:3338", "https://mint.example/path"]
    ),
    st.from_regex(
        r"https?://[a-z0-9.-]{1,30}(:[0-9]{1,5})?(/[a-z0-9_~-]{0,10}){0,2}", fullmatch=True
    ),
)
tokens = st.builds(
    Token,
    mint=mints,
    unit=st.text(min_size=1, max_size=10),
    proofs=st.lists(proofs, min_size=1, max_size=6, unique_by=lambda p: p.secret).map(tuple),
    memo=st.none() | st.text(max_size=60),
)


def _grouped(token: Token) -> Token:
    order = {kid: i for i, kid in enumerate(token.keyset_ids)}
    proofs = tuple(sorted(token.proofs, key=lambda p: order[p.id]))  # stable
    return Token(token.mint, token.unit, proofs, token.memo)


@given(tokens)
@settings(max_examples=200, deadline=None)
def test_v3_round_trip(token: Token) -> None:
    text = token.serialize(3)
    assert text.startswith("cashuA") and "=" not in text
    assert parse_token(text) == token


@given(tokens)
@settings(max_examples=200, deadline=None)
def test_v4_round_trip(token: Token) -> None:
    text = token.serialize(4)
    assert text.startswith("cashuB") and "=" not in text
    assert parse_token(text) == _grouped(token)
    assert parse_token(_grouped(token).serialize(4)) == _grouped(token)
    assert parse_raw_token(token.to_raw()) == _grouped(token)


@given(tokens)
@settings(max_examples=50, deadline=None)
def test_proof_dict_round_trip(token: Token) -> None:
    for p in token.proofs:
        assert Proof.from_dict(p.to_dict(include_dleq=True)) == p
        assert Proof.from_dict(json.loads(json.dumps(p.to_dict()))) == Proof(
            p.amount, p.id, p.secret, p.C, None, p.witness
        )


# ----------------------------------------------------------------- fuzz

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
FUZZ_INPUTS = 100_000


def _seed_tokens(rnd: random.Random) -> list[str]:
    seeds = [
        V3_SERIALIZED_BLOCK.text.strip(),
        *V.lines(V3_PADDING_BLOCK.text),
        V4_SINGLE[1].text.strip(),
        V4_MULTI[1].text.strip(),
    ]
    for i in range(6):
        dleq = DLEQProof(*(rnd.randbytes(32).hex() for _ in range(3))) if i % 2 else None
        ps = tuple(
            Proof(
                1 << rnd.randrange(10),
                rnd.choice(["009a1f293253e41e", "01" + "ab" * 32]),
                rnd.randbytes(32).hex(),
                mul_g(rnd.randrange(1, N)).to_hex(),
                dleq,
                "w" if i == 3 else None,
            )
            for _ in range(1 + i % 3)
        )
        t = Token("https://mint.example", "sat", ps, "memo" if i % 3 == 0 else None)
        seeds += [t.serialize(3), t.serialize(4)]
    return seeds


def _seed_requests() -> list[str]:
    return [encoded for _, _, encoded in VECTORS_18]


VECTORS_18 = [
    (b.heading, None, b.text.strip())
    for b in V.under("18", "Payment Request Encoding/Decoding")
    if b.text.strip().startswith("creqA")
]


def _mutate_text(rnd: random.Random, s: str) -> str:
    choice = rnd.randrange(6)
    if choice == 0:  # character flips
        chars = list(s)
        for _ in range(rnd.randint(1, 4)):
            chars[rnd.randrange(len(chars))] = rnd.choice(B64 + "=+/ .\x00é")
        return "".join(chars)
    if choice == 1:  # truncation
        return s[: rnd.randrange(len(s))]
    if choice == 2:  # random base64 after the prefix
        return s[:6] + "".join(rnd.choice(B64) for _ in range(rnd.randrange(200)))
    if choice == 3:  # deletion / duplication of a slice
        i, j = sorted(rnd.randrange(len(s) + 1) for _ in range(2))
        return s[:i] + s[j:] if rnd.random() < 0.5 else s[:j] + s[i:]
    if choice == 4:  # insertion
        i = rnd.randrange(len(s) + 1)
        return s[:i] + "".join(rnd.choice(B64) for _ in range(rnd.randint(1, 8))) + s[i:]
    return s  # unchanged (valid inputs stay in the mix)


def _mutate_bytes(rnd: random.Random, b: bytes) -> bytes:
    if not b:
        return rnd.randbytes(rnd.randrange(16))
    arr = bytearray(b)
    choice = rnd.randrange(5)
    if choice == 0:
        for _ in range(rnd.randint(1, 3)):
            arr[rnd.randrange(len(arr))] ^= 1 << rnd.randrange(8)
    elif choice == 1:
        for _ in range(rnd.randint(1, 3)):
            arr[rnd.randrange(len(arr))] = rnd.randrange(256)
    elif choice == 2:
        del arr[rnd.randrange(len(arr)) :]
    elif choice == 3:
        i = rnd.randrange(len(arr) + 1)
        arr[i:i] = rnd.randbytes(rnd.randint(1, 6))
    else:
        i, j = sorted(rnd.randrange(len(arr) + 1) for _ in range(2))
        del arr[i:j]
    return bytes(arr)


_JUNK: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**63,
    2**64 - 1,
    "",
    "x",
    "https://m.example",
    "00" * 8,
    b"",
    b"\x00" * 8,
    b"\x02" * 33,
    b"\x00" * 32,
    [],
    [[]],
    {},
    {"a": 1},
]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _mutate_structure(rnd: random.Random, obj: Any, json_safe: bool) -> Any:
    """Replace, delete or duplicate one node of a decoded token / request."""
    obj = copy.deepcopy(obj)
    path = rnd.choice(_paths(obj)[1:])
    parent = obj
    for step in path[:-1]:
        parent = parent[step]
    junk = [j for j in _JUNK if not (json_safe and isinstance(j, bytes))]
    if not json_safe:
        junk.append(cbor.UNDEFINED)
    else:
        junk.append(1.5)
    choice = rnd.randrange(3)
    if choice == 0:
        parent[path[-1]] = rnd.choice(junk)
    elif choice == 1:
        del parent[path[-1]]
    elif isinstance(parent, list):
        parent.append(copy.deepcopy(parent[path[-1]]))
    else:
        parent[rnd.choice(["x", "d", "w", "r", "g", "nut10"])] = rnd.choice(junk)
    return obj


def _payload(s: str, prefix_len: int) -> bytes:
    body = s[prefix_len:].rstrip("=")
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def _rewrap(prefix: str, data: bytes, rnd: random.Random) -> str:
    text = base64.urlsafe_b64encode(data).decode()
    return prefix + (text if rnd.random() < 0.5 else text.rstrip("="))


def _check_token(token: object) -> None:
    assert isinstance(token, Token)
    assert token.amount > 0 and token.proofs
    for version in (3, 4):
        again = parse_token(token.serialize(version))
        assert (again.mint, again.unit, again.memo, again.amount) == (
            token.mint,
            token.unit,
            token.memo,
            token.amount,
        )
        assert sorted(p.secret for p in again.proofs) == sorted(p.secret for p in token.proofs)


def test_fuzz_parsers_raise_only_their_typed_error() -> None:
    rnd = random.Random(0xCA5B)
    token_seeds = _seed_tokens(rnd)
    request_seeds = _seed_requests()
    token_payloads = [(s[:6], _payload(s, 6)) for s in token_seeds]
    request_payloads = [_payload(s, 5) for s in request_seeds]
    cbor_seeds = [p for prefix, p in token_payloads if prefix == "cashuB"] + request_payloads

    counts = {"token_ok": 0, "token_err": 0, "req_ok": 0, "req_err": 0, "cbor_ok": 0, "cbor_err": 0}
    failures: list[tuple[str, object, BaseException]] = []
    t0 = time.perf_counter()
    for i in range(FUZZ_INPUTS):
        kind = i % 10
        if kind < 5:  # parse_token: text mutations, payload mutations, pure noise
            mode = rnd.randrange(10)
            if mode < 4:
                inp: object = _mutate_text(rnd, rnd.choice(token_seeds))
            elif mode < 7:
                prefix, payload = rnd.choice(token_payloads)
                inp = _rewrap(prefix, _mutate_bytes(rnd, payload), rnd)
            elif mode < 9:
                prefix, payload = rnd.choice(token_payloads)
                if prefix == "cashuA":
                    tree = _mutate_structure(rnd, json.loads(payload), json_safe=True)
                    data = json.dumps(tree).encode()
                else:
                    data = cbor.dumps(_mutate_structure(rnd, cbor.loads(payload), False))
                inp = _rewrap(prefix, data, rnd)
            else:
                inp = rnd.choice(["cashuA", "cashuB", "cashu:cashuB", ""]) + "".join(
                    rnd.choice(B64 + "=") for _ in range(rnd.randrange(120))
                )
            try:
                _check_token(parse_token(inp))  # type: ignore[arg-type]
                counts["token_ok"] += 1
            except TokenError:
                counts["token_err"] += 1
            except BaseException as exc:  # noqa: BLE001 - the point of the test
                failures.append(("parse_token", inp, exc))
        elif kind < 8:  # PaymentRequest.decode
            mode = rnd.randrange(10)
            if mode < 4:
                inp = _mutate_text(rnd, rnd.choice(request_seeds))
            elif mode < 7:
                inp = _rewrap("creqA", _mutate_bytes(rnd, rnd.choice(request_payloads)), rnd)
            elif mode < 9:
                tree = _mutate_structure(rnd, cbor.loads(rnd.choice(request_payloads)), False)
                inp = _rewrap("creqA", cbor.dumps(tree), rnd)
            else:
                inp = "creqA" + "".join(rnd.choice(B64) for _ in range(rnd.randrange(120)))
            try:
                pr = PaymentRequest.decode(inp)
                assert PaymentRequest.decode(pr.encode()) == pr
                counts["req_ok"] += 1
            except TokenError:
                counts["req_err"] += 1
            except BaseException as exc:  # noqa: BLE001
                failures.append(("PaymentRequest.decode", inp, exc))
        else:  # cbor.loads
            inp = (
                _mutate_bytes(rnd, rnd.choice(cbor_seeds))
                if rnd.random() < 0.8
                else rnd.randbytes(rnd.randrange(40))
            )
            try:
                value = cbor.loads(inp)
                assert cbor.loads(cbor.dumps(value)) == value
                counts["cbor_ok"] += 1
            except cbor.CBORError:
                counts["cbor_err"] += 1
            except BaseException as exc:  # noqa: BLE001
                failures.append(("cbor.loads", inp, exc))
        if len(failures) > 5:
            break
    elapsed = time.perf_counter() - t0

    assert not failures, failures[:5]
    assert sum(counts.values()) == FUZZ_INPUTS
    # the corpus must exercise both outcomes of every parser
    assert all(v > 100 for v in counts.values()), counts
    print(f"\n[fuzz] {FUZZ_INPUTS} inputs in {elapsed:.1f} s: {counts}")
