"""Make real Cashu tokens quickly: our own wallet mints them at the real test mint.

(NUT-04 with the FakeWallet backend pays every invoice at once.) The Nutshell reference wallet
(`wallet_tool`) is ~2 s a call; tests use it where an independent implementation matters
(accepting our change/refund tokens, minting a token of its own) and this for the rest.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from routstr.cashu.wallet import Wallet
from routstr.db import Database
from routstr.walletstore import SqliteWalletStore
from tests.support.mint import UrllibTransport


class Minter:
    def __init__(self, workdir: Path) -> None:
        self.db = Database(workdir / f"minter-{secrets.token_hex(4)}.sqlite3")
        self.wallet = Wallet(SqliteWalletStore(self.db), UrllibTransport(), secrets.token_bytes(64))

    def token(self, mint_url: str, sats: int) -> str:
        async def make() -> str:
            quote = await self.wallet.mint_quote(sats, mint_url)
            got = await self.wallet.mint_paid(quote.quote)
            assert got is not None and got.amount == sats
            return (await self.wallet.send(sats, mint_url)).serialize()

        return anyio.run(make)

    def state(self, mint_url: str, token: str) -> list[str]:
        from routstr.cashu.tokens import parse_token
        from routstr.cashu.wallet import proof_y

        async def check() -> list[str]:
            tok = parse_token(token)
            states = await self.wallet.client(mint_url).check_state(
                [proof_y(p.secret) for p in tok.proofs])
            return [s.state for s in states]

        return anyio.run(check)

    def close(self) -> None:
        self.db.close()


@pytest.fixture(scope="module")
def minter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Minter]:
    """Real tokens from the test mint, one minting wallet per test module."""
    m = Minter(tmp_path_factory.mktemp("minter"))
    yield m
    m.close()
