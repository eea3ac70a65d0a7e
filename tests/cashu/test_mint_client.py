"""routstr.cashu.mint against the real Nutshell test mint, and its error mapping.

The errors the mint can be made to produce here (spent, already signed, unbalanced, invalid
proof, quote issued, unknown keyset) come from the real mint; the rest (Lightning failures,
inactive keysets, pending/expired quotes, ...) from scripted answers in Nutshell's shape
``{"detail": str, "code": int}`` with HTTP 400.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest

from routstr.cashu import bdhke
from routstr.cashu.mint import (
    ERROR_CODES,
    BlindedMessage,
    DleqInvalid,
    KeysetIdMismatch,
    KeysetInactive,
    KeysetUnknown,
    LightningPaymentFailed,
    MintClient,
    MintError,
    MintProtocolError,
    MintUnreachable,
    OutputsAlreadySigned,
    ProofInvalid,
    ProofsAlreadySpent,
    ProofsPending,
    QuoteAlreadyIssued,
    QuoteExpired,
    QuoteNotPaid,
    QuotePending,
    TransactionNotBalanced,
    error_from_response,
    input_fee,
)
from routstr.cashu.secp256k1 import point_from_hex
from routstr.cashu.tokens import Proof
from tests.support.mint import UrllibTransport, free_port

pytestmark = [pytest.mark.mint, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


Output = tuple[BlindedMessage, str, int]


def outputs(keyset_id: str, amounts: list[int]) -> list[Output]:
    res = []
    for a in amounts:
        secret = os.urandom(32).hex()
        B_, r = bdhke.blind(secret.encode())
        res.append((BlindedMessage(a, keyset_id, B_.to_hex()), secret, r))
    return res


async def unblind_all(client: MintClient, outs: list[Output], sigs: list[Any]) -> list[Proof]:
    proofs = []
    for (_, secret, r), sig in zip(outs, sigs, strict=True):
        K = point_from_hex((await client.keys(sig.id)).keys[sig.amount])
        C = bdhke.unblind(point_from_hex(sig.C_), r, K)
        proofs.append(Proof(sig.amount, sig.id, secret, C.to_hex()))
    return proofs


async def mint_proofs(client: MintClient, amounts: list[int]) -> list[Proof]:
    ks = await client.active_keyset()
    q = await client.mint_quote(sum(amounts))
    assert (await client.mint_quote_state(q.quote)).state == "PAID"  # FakeWallet pays at once
    outs = outputs(ks.id, amounts)
    sigs = await client.mint(q.quote, [o[0] for o in outs])
    assert all(s.dleq is not None for s in sigs)  # Nutshell sends NUT-12 proofs: all verified
    return await unblind_all(client, outs, sigs)


@pytest.fixture
def client(mint_url: str) -> MintClient:
    return MintClient(mint_url, UrllibTransport())


async def test_info_keysets_keys_verified_and_cached(mint_url: str) -> None:
    transport = UrllibTransport()
    client = MintClient(mint_url, transport)
    info = await client.info()
    assert info["version"].startswith("Nutshell/")
    assert {"7", "8", "9", "12"} <= set(info["nuts"])
    sets = await client.keysets()
    active = [k for k in sets if k.active and k.unit == "sat"]
    assert active and active[0].input_fee_ppk == 0
    ks = await client.active_keyset("sat")
    assert ks.id == active[0].id and set(ks.keys) >= {1, 2, 4, 1 << 20}
    calls = transport.calls
    assert (await client.keys(ks.id)).keys == ks.keys
    await client.active_keyset("sat")
    assert transport.calls == calls  # keysets and keys are cached
    with pytest.raises(KeysetUnknown):
        await client.keys("00ffffffffffffff")
    with pytest.raises(KeysetUnknown):
        await client.active_keyset("usd")


async def test_fees_are_exact(mint_url_fee: str) -> None:
    client = MintClient(mint_url_fee, UrllibTransport())
    ks = await client.active_keyset()
    assert ks.input_fee_ppk == 100
    proofs = await mint_proofs(client, [1] * 11 + [4, 8, 16])
    assert await client.fee_for(proofs[:1]) == 1  # 100 ppk rounds up to 1
    assert await client.fee_for(proofs[:10]) == 1  # 1000 ppk = exactly 1
    assert await client.fee_for(proofs[:11]) == 2
    assert input_fee([]) == 0 and input_fee([999]) == 1 and input_fee([1000, 1]) == 2
    # the mint agrees: 11 inputs worth 11 pay 2, so 9 comes out
    outs = outputs(ks.id, [1, 8])
    sigs = await client.swap(proofs[:11], [o[0] for o in outs])
    assert sum(s.amount for s in sigs) == 9
    with pytest.raises(MintError) as unbalanced:  # ignoring the fee is refused
        await client.swap(proofs[11:], [o[0] for o in outputs(ks.id, [4, 8, 16])])
    # Nutshell 0.19.2 reports "not balanced" with its generic 11000, not the NUT's 11005
    assert unbalanced.value.nut_code in (11000, 11005)


async def test_swap_checkstate_restore(client: MintClient) -> None:
    ks = await client.active_keyset()
    proofs = await mint_proofs(client, [32, 16, 8, 8])
    ys = [bdhke.hash_to_curve(p.secret.encode()).to_hex() for p in proofs]
    assert [s.state for s in await client.check_state(ys)] == ["UNSPENT"] * 4
    outs = outputs(ks.id, [64])
    sigs = await client.swap(proofs, [o[0] for o in outs])
    assert [s.amount for s in sigs] == [64]
    assert [s.state for s in await client.check_state(ys)] == ["SPENT"] * 4
    new = await unblind_all(client, outs, sigs)
    assert (await client.check_state([bdhke.hash_to_curve(new[0].secret.encode()).to_hex()]))[
        0
    ].state == "UNSPENT"
    # NUT-09: the mint returns what it signed, and nothing for outputs it never saw
    unseen = outputs(ks.id, [1])
    restored = await client.restore([unseen[0][0], outs[0][0]])
    assert [(o.B_, s.C_) for o, s in restored] == [(outs[0][0].B_, sigs[0].C_)]
    assert await client.restore([unseen[0][0]]) == []


async def test_error_codes_from_the_real_mint(client: MintClient) -> None:
    ks = await client.active_keyset()
    proofs = await mint_proofs(client, [8, 8, 4, 4])
    used = outputs(ks.id, [8, 8])
    await client.swap(proofs[:2], [o[0] for o in used])
    with pytest.raises(ProofsAlreadySpent) as spent:
        await client.swap(proofs[:2], [o[0] for o in outputs(ks.id, [16])])
    assert spent.value.nut_code == 11001 and spent.value.status == 400 and spent.value.definite
    with pytest.raises(OutputsAlreadySigned):
        await client.swap(proofs[2:], [o[0] for o in used[:1]])
    with pytest.raises(MintError) as unbalanced:
        await client.swap(proofs[2:], [o[0] for o in outputs(ks.id, [16])])
    assert unbalanced.value.nut_code in (11000, 11005) and unbalanced.value.definite
    forged = Proof(4, ks.id, os.urandom(32).hex(), proofs[3].C)
    with pytest.raises(ProofInvalid):
        await client.swap([forged], [o[0] for o in outputs(ks.id, [4])])
    q = await client.mint_quote(4)
    await client.mint(q.quote, [o[0] for o in outputs(ks.id, [4])])
    with pytest.raises(QuoteAlreadyIssued):
        await client.mint(q.quote, [o[0] for o in outputs(ks.id, [4])])
    with pytest.raises(KeysetUnknown):
        await client._call("GET", "/v1/keys/00ffffffffffffff")
    # the untouched proofs are still good after all those refusals
    assert len(await client.swap(proofs[2:], [o[0] for o in outputs(ks.id, [8])])) == 1


def nut_error(code: int, detail: str = "x") -> tuple[int, bytes]:
    return 400, json.dumps({"detail": detail, "code": code}).encode()


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (10001, ProofInvalid),
        (11001, ProofsAlreadySpent),
        (11002, ProofsPending),
        (11003, OutputsAlreadySigned),
        (11005, TransactionNotBalanced),
        (12001, KeysetUnknown),
        (12002, KeysetInactive),
        (20001, QuoteNotPaid),
        (20002, QuoteAlreadyIssued),
        (20004, LightningPaymentFailed),
        (20005, QuotePending),
        (20007, QuoteExpired),
    ],
)
def test_error_code_mapping(code: int, cls: type[MintError]) -> None:
    err = error_from_response(*nut_error(code, "from the mint"))
    assert type(err) is cls and err.nut_code == code and err.detail == "from the mint"
    assert err.definite and ERROR_CODES[code] is cls


def test_error_mapping_without_a_known_code() -> None:
    other = error_from_response(*nut_error(11000, "mint quote already issued"))
    assert type(other) is MintError and other.nut_code == 11000 and other.definite
    assert type(error_from_response(404, b"Not Found")) is MintError
    for status in (500, 502, 503, 504):
        err = error_from_response(status, b"<html>bad gateway</html>")
        assert isinstance(err, MintUnreachable) and not err.definite and err.maybe_delivered
    # a 5xx that still names a NUT code is that error (the mint refused, definitely)
    assert type(error_from_response(500, nut_error(11001)[1])) is ProofsAlreadySpent


class Scripted:
    """A transport that passes calls to the real mint, letting a test rewrite answers."""

    def __init__(self, edit: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
                 raise_exc: BaseException | None = None) -> None:
        self.real = UrllibTransport()
        self.edit = edit
        self.raise_exc = raise_exc

    async def __call__(self, method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        if self.raise_exc is not None:
            raise self.raise_exc
        status, raw = await self.real(method, url, body)
        if status == 200 and self.edit is not None:
            raw = json.dumps(self.edit(url, json.loads(raw))).encode()
        return status, raw


async def test_unreachable_refused_and_timeout() -> None:
    refused = MintClient(f"http://127.0.0.1:{free_port()}", UrllibTransport(timeout_s=2))
    with pytest.raises(MintUnreachable) as exc:
        await refused.info()
    assert not exc.value.maybe_delivered  # refused: the request never left
    timeout = MintClient("http://127.0.0.1:1", Scripted(raise_exc=TimeoutError("read")))
    with pytest.raises(MintUnreachable) as exc:
        await timeout.keysets()
    assert exc.value.maybe_delivered  # a timeout may come after the mint acted


async def test_bad_dleq_is_a_hard_error(client: MintClient, mint_url: str) -> None:
    proofs = await mint_proofs(client, [2, 2])

    def flip_s(url: str, doc: dict[str, Any]) -> dict[str, Any]:
        if url.endswith("/v1/swap"):
            s = doc["signatures"][0]["dleq"]["s"]
            doc["signatures"][0]["dleq"]["s"] = f"{(int(s, 16) + 1):064x}"
        return doc

    tampered = MintClient(mint_url, Scripted(flip_s))
    ks = await tampered.active_keyset()
    with pytest.raises(DleqInvalid):
        await tampered.swap(proofs[:1], [o[0] for o in outputs(ks.id, [2])])

    def drop_dleq(url: str, doc: dict[str, Any]) -> dict[str, Any]:
        for s in doc.get("signatures", []):
            s.pop("dleq", None)
        return doc

    lax = MintClient(mint_url, Scripted(drop_dleq))  # no DLEQ sent: nothing to verify
    assert len(await lax.swap(proofs[1:], [o[0] for o in outputs(ks.id, [2])])) == 1


async def test_wrong_signature_amount_and_keyset_id_mismatch(
    client: MintClient, mint_url: str
) -> None:
    proofs = await mint_proofs(client, [4])

    def double(url: str, doc: dict[str, Any]) -> dict[str, Any]:
        if url.endswith("/v1/swap"):
            doc["signatures"][0]["amount"] *= 2
        return doc

    greedy = MintClient(mint_url, Scripted(double))
    ks = await greedy.active_keyset()
    with pytest.raises(MintProtocolError):
        await greedy.swap(proofs, [o[0] for o in outputs(ks.id, [4])])

    def swap_keys(url: str, doc: dict[str, Any]) -> dict[str, Any]:
        if "/v1/keys/" in url:
            keys = doc["keysets"][0]["keys"]
            keys["1"], keys["2"] = keys["2"], keys["1"]
        return doc

    liar = MintClient(mint_url, Scripted(swap_keys))
    with pytest.raises(KeysetIdMismatch):
        await liar.active_keyset()


async def test_melt_returns_verified_change(client: MintClient, mint_url_fee: str) -> None:
    other = MintClient(mint_url_fee, UrllibTransport())
    invoice = (await other.mint_quote(10)).request
    q = await client.melt_quote(invoice)
    assert q.amount == 10 and q.state == "UNPAID"
    proofs = await mint_proofs(client, [16, 8])
    ks = await client.active_keyset()
    overpay = 24 - 10
    blanks = outputs(ks.id, [1] * overpay.bit_length())
    res = await client.melt(q.quote, proofs, [o[0] for o in blanks])
    assert res.state == "PAID"
    change = await unblind_all(client, blanks[: len(res.change)], list(res.change))
    paid_fee = 24 - 10 - sum(p.amount for p in change)
    assert 0 <= paid_fee <= q.fee_reserve
    assert (await client.melt_quote_state(q.quote)).state == "PAID"
    ys = [bdhke.hash_to_curve(p.secret.encode()).to_hex() for p in change]
    assert {s.state for s in await client.check_state(ys)} <= {"UNSPENT"}
