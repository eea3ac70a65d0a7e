"""routstr.nostr: BIP-340 (the BIP's vectors, verbatim), NIP-19 (the NIP's vectors), NIP-01
serialisation and ids, the kind-38421 announcement, relay messages."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routstr import nostr
from routstr.nostr import (
    AnnouncementFacts,
    Bech32Error,
    InvalidEvent,
    RelayAuth,
    RelayClosed,
    RelayEose,
    RelayEvent,
    RelayNotice,
    RelayOk,
    RelayProtocolError,
    SecretKey,
)

VECTORS = Path(__file__).parent / "bip340-test-vectors.csv"


def _vectors() -> list[dict[str, str]]:
    with VECTORS.open(newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------- BIP-340


def test_the_vector_file_is_the_bips_own() -> None:
    rows = _vectors()
    assert [int(r["index"]) for r in rows] == list(range(19))
    assert sum(r["verification result"] == "TRUE" for r in rows) == 9


@pytest.mark.parametrize("row", _vectors(), ids=lambda r: f"vector{r['index']}")
def test_bip340_vectors(row: dict[str, str]) -> None:
    pubkey = bytes.fromhex(row["public key"])
    msg = bytes.fromhex(row["message"])
    sig = bytes.fromhex(row["signature"])
    expected = row["verification result"] == "TRUE"
    assert nostr.schnorr_verify(pubkey, msg, sig) is expected, row["comment"]
    if row["secret key"]:
        seckey = bytes.fromhex(row["secret key"])
        assert nostr.xonly_pubkey(seckey) == pubkey
        assert nostr.schnorr_sign(seckey, msg, bytes.fromhex(row["aux_rand"])) == sig


def test_sign_rejects_bad_secret_and_aux() -> None:
    for bad in (bytes(32), nostr.N.to_bytes(32, "big"), b"\x01" * 31):
        with pytest.raises(ValueError):
            nostr.schnorr_sign(bad, b"m", bytes(32))
    with pytest.raises(ValueError):
        nostr.schnorr_sign(b"\x01" * 32, b"m", bytes(31))


def test_verify_rejects_wrong_lengths() -> None:
    row = _vectors()[1]
    pk, msg, sig = (bytes.fromhex(row[k]) for k in ("public key", "message", "signature"))
    assert nostr.schnorr_verify(pk, msg, sig)
    assert not nostr.schnorr_verify(pk[:31], msg, sig)
    assert not nostr.schnorr_verify(pk, msg, sig[:63])
    assert not nostr.schnorr_verify(pk, msg + b"\x00", sig)


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=200), st.binary(min_size=32,
                                                                               max_size=32))
def test_sign_verify_round_trip(seed: bytes, msg: bytes, aux: bytes) -> None:
    d = int.from_bytes(seed, "big") % (nostr.N - 1) + 1
    sk = d.to_bytes(32, "big")
    sig = nostr.schnorr_sign(sk, msg, aux)
    pk = nostr.xonly_pubkey(sk)
    assert nostr.schnorr_verify(pk, msg, sig)
    flipped = bytes([sig[0], sig[1] ^ 1]) + sig[2:]
    assert not nostr.schnorr_verify(pk, msg, flipped)


# ---------------------------------------------------------------------------------- NIP-19

NPUB_VECTOR = ("npub10elfcs4fr0l0r8af98jlmgdh9c8tcxjvz9qkw038js35mp4dma8qzvjptg",
               "7e7e9c42a91bfef19fa929e5fda1b72e0ebc1a4c1141673e2794234d86addf4e")
NSEC_VECTOR = ("nsec1vl029mgpspedva04g90vltkh6fvh240zqtv9k0t9af8935ke9laqsnlfe5",
               "67dea2ed018072d675f5415ecfaed7d2597555e202d85b3d65ea4e58d2d92ffa")
NPUB_EXAMPLE = ("npub180cvv07tjdrrgpa0j7j7tmnyl2yr6yr7l8j4s3evf6u64th6gkwsyjh6w6",
                "3bf0c63fcb93463407af97a5e5ee64fa883d107ef9e558472c4eb9aaaefa459d")


@pytest.mark.parametrize("npub,hexkey", [NPUB_VECTOR, NPUB_EXAMPLE])
def test_nip19_npub(npub: str, hexkey: str) -> None:
    assert nostr.decode_npub(npub).hex() == hexkey
    assert nostr.encode_npub(bytes.fromhex(hexkey)) == npub
    assert nostr.decode_npub(npub.upper()).hex() == hexkey  # all-uppercase is valid bech32


def test_nip19_nsec() -> None:
    nsec, hexkey = NSEC_VECTOR
    assert nostr.decode_nsec(nsec).hex() == hexkey
    assert nostr.encode_nsec(bytes.fromhex(hexkey)) == nsec
    key = SecretKey.parse(nsec)
    assert key.nsec() == nsec
    assert SecretKey.parse(hexkey).pubkey_hex == key.pubkey_hex
    assert key.npub == nostr.encode_npub(key.public_key)


def test_nprofile_example_is_valid_bech32_with_tlv() -> None:
    hrp, data = nostr.bech32_decode(
        "nprofile1qqsrhuxx8l9ex335q7he0f09aej04zpazpl0ne2cgukyawd24mayt8gpp4mhxue69uhhytnc9e3k"
        "7mgpz4mhxue69uhkg6nzv9ejuumpv34kytnrdaksjlyr9p")
    assert hrp == "nprofile"
    assert data[:2] == b"\x00\x20" and data[2:34].hex() == NPUB_EXAMPLE[1]
    assert b"wss://r.x.com" in data and b"wss://djbas.sadkb.com" in data


@pytest.mark.parametrize("text", [
    NPUB_VECTOR[0][:-1] + ("q" if NPUB_VECTOR[0][-1] != "q" else "p"),  # checksum
    NPUB_VECTOR[0][:10] + NPUB_VECTOR[0][10:].upper(),  # mixed case
    "npub1" + "b" * 58,  # 'b' is not a bech32 character
    "npub1qqqqqq",  # too short
    "1qqqqqqqqqqqqq",  # empty hrp
    "npub" + "x" * 5000,  # too long
    "npub1\x7f" + NPUB_VECTOR[0][6:],
])
def test_bech32_rejects(text: str) -> None:
    with pytest.raises(Bech32Error):
        nostr.decode_npub(text)


def test_bech32m_checksum_is_not_bech32() -> None:
    # BIP-350's valid bech32m test string: a NIP-19 decoder must refuse it
    with pytest.raises(Bech32Error):
        nostr.bech32_decode("a1lqfn3a")
    assert nostr.bech32_decode("a12uel5l") == ("a", b"")  # BIP-173 valid bech32


def test_wrong_entity_and_length() -> None:
    with pytest.raises(Bech32Error, match="expected an nsec"):
        nostr.decode_nsec(NPUB_VECTOR[0])
    short = nostr.bech32_encode("npub", b"\x01" * 31)
    with pytest.raises(Bech32Error, match="32 bytes"):
        nostr.decode_npub(short)


@given(st.binary(max_size=64), st.sampled_from(["npub", "nsec", "note", "x"]))
def test_bech32_round_trip(data: bytes, hrp: str) -> None:
    assert nostr.bech32_decode(nostr.bech32_encode(hrp, data)) == (hrp, data)


def test_secret_key_never_shows_the_secret() -> None:
    nsec, hexkey = NSEC_VECTOR
    key = SecretKey.parse(nsec)
    for shown in (repr(key), str(key), f"{key}"):
        assert hexkey not in shown and nsec not in shown and key.npub in shown
    for bad in ("nsec1xyz", "00" * 32, "ff" * 32, "zz" * 32, NPUB_VECTOR[0]):
        with pytest.raises(ValueError) as err:
            SecretKey.parse(bad)
        assert bad not in str(err.value)


# ---------------------------------------------------------------------------------- NIP-01


def test_serialisation_follows_nip01_escaping() -> None:
    content = 'line\nquote" back\\ cr\r tab\t bs\b ff\f é 🎉 </script> \u2028'
    raw = nostr.serialize_event("ab" * 32, 1700000000, 1, [["t", "x"], ["p", "é"]], content)
    expected = (
        '[0,"' + "ab" * 32 + '",1700000000,1,[["t","x"],["p","é"]],"line\\nquote\\" back\\\\ '
        'cr\\r tab\\t bs\\b ff\\f é 🎉 </script> \u2028"]'
    )
    assert raw == expected.encode("utf-8")
    assert nostr.event_id("ab" * 32, 1700000000, 1, [["t", "x"], ["p", "é"]], content) == (
        hashlib.sha256(raw).hexdigest())


def test_signed_event_verifies_and_tampering_does_not() -> None:
    key = SecretKey.parse(NSEC_VECTOR[0])
    ev = nostr.sign_event(key, 1, [["t", "routstr"]], "hello\n\"world\"", 1700000000)
    assert ev.pubkey == key.pubkey_hex and len(ev.sig) == 128
    assert nostr.verify_event(ev)
    assert nostr.verify_event(nostr.parse_event(json.loads(json.dumps(ev.to_dict()))))
    d = ev.to_dict()
    for field, value in (("content", "hello"), ("created_at", 1700000001), ("kind", 2),
                         ("tags", []), ("pubkey", "00" * 32)):
        forged = dict(d, **{field: value})
        assert not nostr.verify_event(nostr.parse_event(forged)), field
        # the forger recomputes the id: the signature still fails
        forged["id"] = nostr.event_id(forged["pubkey"], forged["created_at"], forged["kind"],
                                      forged["tags"], forged["content"])
        assert not nostr.verify_event(nostr.parse_event(forged)), field
    bad_sig = dict(d, sig=d["sig"][:-2] + ("00" if d["sig"][-2:] != "00" else "01"))
    assert not nostr.verify_event(nostr.parse_event(bad_sig))


def test_lone_surrogate_content_is_invalid_not_a_crash() -> None:
    key = SecretKey.parse(NSEC_VECTOR[0])
    d = nostr.sign_event(key, 1, [], "x", 1700000000).to_dict()
    d["content"] = "\ud800"
    assert not nostr.verify_event(nostr.parse_event(d))


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("sig"),
    lambda d: d.update(id=d["id"].upper()),
    lambda d: d.update(pubkey=d["pubkey"][:-1]),
    lambda d: d.update(created_at=True),
    lambda d: d.update(created_at=1.5),
    lambda d: d.update(created_at=-1),
    lambda d: d.update(kind="1"),
    lambda d: d.update(kind=70000),
    lambda d: d.update(content=None),
    lambda d: d.update(tags=[["e", 1]]),
    lambda d: d.update(tags=["e"]),
    lambda d: d.update(tags={"e": "x"}),
    lambda d: d.update(tags=[["t"]] * (nostr.MAX_TAGS + 1)),
])
def test_parse_event_rejects_bad_shapes(mutate) -> None:  # type: ignore[no-untyped-def]
    key = SecretKey.parse(NSEC_VECTOR[0])
    d = nostr.sign_event(key, 1, [], "x", 1700000000).to_dict()
    mutate(d)
    with pytest.raises(InvalidEvent):
        nostr.parse_event(d)


def test_parse_event_rejects_non_objects() -> None:
    for raw in (None, [], "event", 1):
        with pytest.raises(InvalidEvent):
            nostr.parse_event(raw)


# ---------------------------------------------------------------------------------- kind 38421


def _facts(**kw: object) -> AnnouncementFacts:
    base: dict[str, object] = dict(
        d="5fcb0e2991dc", endpoint_urls=("https://node.example", "http://abc.onion"),
        mints=("https://mint.example", "https://mint2.example"), version="0.1.0",
        name="Näme", about="About \"it\"")
    base.update(kw)
    return AnnouncementFacts(**base)  # type: ignore[arg-type]


def test_announcement_has_routstr_cores_exact_shape() -> None:
    key = SecretKey.parse(NSEC_VECTOR[0])
    ev = nostr.build_announcement(key, _facts(), 1700000000)
    assert ev.kind == 38421 == nostr.KIND_ANNOUNCEMENT
    assert [list(t) for t in ev.tags] == [
        ["d", "5fcb0e2991dc"],
        ["u", "https://node.example"],
        ["u", "http://abc.onion"],
        ["mint", "https://mint.example"],
        ["mint", "https://mint2.example"],
        ["version", "0.1.0"],
    ]
    # routstr-core: json.dumps({"name", "about"}, separators=(",", ":")) — ASCII-escaped
    assert ev.content == '{"name":"N\\u00e4me","about":"About \\"it\\""}'
    assert nostr.verify_event(ev)
    assert nostr.build_announcement(key, _facts(version=""), 1).tags[-1][0] == "mint"


def test_announced_endpoints_like_routstr_core() -> None:
    assert nostr.announced_endpoints("https://a.example", "") == ("https://a.example",)
    assert nostr.announced_endpoints("http://localhost:8000", "") == ()
    assert nostr.announced_endpoints("", "abc.onion") == ("http://abc.onion",)
    assert nostr.announced_endpoints(" https://a ", "https://b.onion") == ("https://a",
                                                                          "https://b.onion")


def test_parse_announcement_gives_the_providers_entry() -> None:
    key = SecretKey.parse(NSEC_VECTOR[0])
    ev = nostr.build_announcement(key, _facts(), 1700000000)
    assert nostr.parse_announcement(ev) == {
        "id": "5fcb0e2991dc",
        "pubkey": key.pubkey_hex,
        "created_at": 1700000000,
        "kind": 38421,
        "endpoint_url": "https://node.example",
        "endpoint_urls": ["https://node.example", "http://abc.onion"],
        "name": "Näme",
        "description": 'About "it"',
        "mint_urls": ["https://mint.example", "https://mint2.example"],
        "version": "0.1.0",
        "content": ev.content,
    }
    no_u = nostr.sign_event(key, 38421, [["d", "x"]], "{}", 1)
    no_d = nostr.sign_event(key, 38421, [["u", "https://x"]], "{}", 1)
    bad_u = nostr.sign_event(key, 38421, [["d", "x"], ["u", "javascript:alert(1)"]], "{}", 1)
    assert nostr.parse_announcement(no_u) is None
    assert nostr.parse_announcement(no_d) is None
    assert nostr.parse_announcement(bad_u) is None
    odd = nostr.sign_event(key, 38421, [["d", "x"], ["u", "https://x"]], "[1]", 1)
    entry = nostr.parse_announcement(odd)
    assert entry is not None and entry["name"] == "Unknown Provider"
    assert entry["description"] is None and entry["version"] is None


# ---------------------------------------------------------------------------------- relay messages


def test_client_messages() -> None:
    key = SecretKey.parse(NSEC_VECTOR[0])
    ev = nostr.sign_event(key, 1, [], "é", 1)
    assert json.loads(nostr.client_event(ev)) == ["EVENT", ev.to_dict()]
    assert "é" in nostr.client_event(ev)
    assert nostr.client_req("s1", {"kinds": [38421], "limit": 5}) == (
        '["REQ","s1",{"kinds":[38421],"limit":5}]')
    assert nostr.client_close("s1") == '["CLOSE","s1"]'


def test_parse_relay_messages() -> None:
    eid = "ab" * 32
    assert nostr.parse_relay_message(f'["OK","{eid}",true,""]') == RelayOk(eid, True, "")
    assert nostr.parse_relay_message(f'["OK","{eid}",false,"invalid: bad"]') == RelayOk(
        eid, False, "invalid: bad")
    assert nostr.parse_relay_message(f'["OK","{eid}",true]') == RelayOk(eid, True, "")
    assert nostr.parse_relay_message('["OK","",false,"invalid: x"]') == RelayOk("", False,
                                                                               "invalid: x")
    assert nostr.parse_relay_message('["EOSE","s"]') == RelayEose("s")
    assert nostr.parse_relay_message('["CLOSED","s","error: x"]') == RelayClosed("s", "error: x")
    assert nostr.parse_relay_message('["NOTICE","hi"]') == RelayNotice("hi")
    assert nostr.parse_relay_message('["AUTH","chal"]') == RelayAuth("chal")
    assert nostr.parse_relay_message('["EVENT","s",{"a":1}]') == RelayEvent("s", {"a": 1})


@pytest.mark.parametrize("text", [
    "", "not json", "{}", "[]", "[1]", '["OK"]', '["OK",1,true,""]', '["OK","' + "a" * 65 + '",true,""]',
    '["OK","' + "ab" * 32 + '","yes",""]', '["EVENT",{}]', '["EVENT","' + "s" * 65 + '",{}]',
    '["EOSE"]', '["NOTICE",1]', '["WHAT","x"]', "[" * 100000 + "]" * 100000, '["EVENT","",{}]',
])
def test_parse_relay_message_rejects(text: str) -> None:
    with pytest.raises(RelayProtocolError):
        nostr.parse_relay_message(text)
