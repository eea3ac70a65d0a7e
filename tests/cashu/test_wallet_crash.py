"""Crash safety: the wallet runs in a subprocess that is SIGKILLed before / during / after its
mint calls; a fresh process then runs `recover()`, and every proof must be accounted for.

Pause points (set with CRASH_AT in the child's environment; the child prints ``PAUSED <point>``
and sleeps until it is killed):

- ``after_begin``    the intent is committed, the mint was not called;
- ``after_response`` the mint executed the call and answered; the wallet recorded nothing yet;
- ``after_finish``   the result is committed.

Accounting checked after recovery (the child's database, against the mint):

    Σ amount of finished receives and mints  (== what the ledger credited)
      == Σ our unspent proofs + Σ issued tokens + Σ melted + Σ fees paid on sends and melts

and every unspent proof we hold is UNSPENT at the mint; every token handed to the wallet was
either credited exactly once (SPENT at the mint) or is still UNSPENT for its owner.

Run the child by hand: ``python -m tests.cashu.test_wallet_crash DB SEED MINT CMD [ARG...]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from routstr import ledger
from routstr.cashu.mint import MintClient, MintError
from routstr.cashu.tokens import parse_token
from routstr.cashu.wallet import OperationPending, Wallet, proof_y
from routstr.db import Database
from routstr.walletstore import SqliteWalletStore
from tests.support.mint import UrllibTransport

ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 30.0
OPERATOR_KEY = "0f" * 32


# --------------------------------------------------------------------------- the child process


class _PausingStore:
    def __init__(self, inner: SqliteWalletStore, point: str) -> None:
        self._inner = inner
        self._point = point

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def begin(self, intent: Any) -> Any:
        op = self._inner.begin(intent)
        if self._point == "after_begin" and intent.kind != "mint" or (
            self._point == "after_begin_mint" and intent.kind == "mint"
        ):
            _pause("after_begin")
        return op

    def finish(self, op_id: int, outcome: Any) -> Any:
        op = self._inner.finish(op_id, outcome)
        if self._point == "after_finish":
            _pause("after_finish")
        return op


class _PausingTransport(UrllibTransport):
    def __init__(self, point: str) -> None:
        super().__init__()
        self._point = point

    async def __call__(self, method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        status, raw = await super().__call__(method, url, body)
        if self._point == "after_response" and status == 200 and url.endswith(
            ("/v1/swap", "/v1/mint/bolt11", "/v1/melt/bolt11")
        ):
            _pause("after_response")
        return status, raw


def _pause(point: str) -> None:
    print(f"PAUSED {point}", flush=True)
    time.sleep(3600)


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def _child(db_path: str, seed_hex: str, mint: str, cmd: str, args: list[str]) -> None:
    point = os.environ.get("CRASH_AT", "")
    db = Database(db_path)
    store = SqliteWalletStore(db)
    wallet = Wallet(_PausingStore(store, point), _PausingTransport(point),  # type: ignore[arg-type]
                    bytes.fromhex(seed_hex), inflight_grace_s=0.0)
    out: dict[str, Any] = {}
    print("READY", flush=True)
    if cmd == "fund":
        if db.read(lambda c: ledger.get_account(c, OPERATOR_KEY)) is None:
            db.transaction(lambda c: ledger.create_account(c, key_hash=OPERATOR_KEY, kind="api",
                                                           now=1), durable=True)
        acct = db.read(lambda c: ledger.get_account(c, OPERATOR_KEY))
        assert acct is not None
        q = await wallet.mint_quote(int(args[0]), mint)
        print(f"QUOTE {q.quote}", flush=True)
        got = await wallet.mint_paid(q.quote, {"action": "credit", "account_id": acct.id,
                                               "ref": f"invoice:{q.quote}"})
        out = {"minted": got.amount if got else None}
    elif cmd == "mint_paid":
        acct = db.read(lambda c: ledger.get_account(c, OPERATOR_KEY))
        assert acct is not None
        got = await wallet.mint_paid(args[0], {"action": "credit", "account_id": acct.id,
                                               "ref": f"invoice:{args[0]}"})
        out = {"minted": got.amount if got else None}
    elif cmd == "receive":
        for text in args:
            try:
                got = await wallet.receive(text, {"action": "create_account",
                                                  "key_hash": token_key(text), "kind": "token",
                                                  "ref": token_key(text)})
                out[token_key(text)] = got.amount
            except (MintError, OperationPending) as exc:
                out[token_key(text)] = type(exc).__name__
    elif cmd == "receive_split":  # keep, ref, token: an X-Cashu stream's split redemption
        keep, ref, text = int(args[0]), args[1], args[2]
        got = await wallet.receive(text, {"action": "create_account", "key_hash": token_key(text),
                                          "kind": "xcashu", "ref": token_key(text)},
                                   keep=keep, ref=ref)
        out = {"amount": got.amount, "token": got.token}
    elif cmd == "send":
        acct = db.read(lambda c: ledger.get_account(c, OPERATOR_KEY))
        assert acct is not None
        amount = int(args[0])
        tok = await wallet.send(amount, mint, {"action": "debit", "account_id": acct.id,
                                               "amount_msats": amount * 1000, "kind": "change"},
                                ref=args[1])
        out = {"token": tok.serialize()}
    elif cmd == "send_locked":  # amount, ref, pubkey: change locked to a client's key
        acct = db.read(lambda c: ledger.get_account(c, OPERATOR_KEY))
        assert acct is not None
        amount = int(args[0])
        tok = await wallet.send(amount, mint, {"action": "debit", "account_id": acct.id,
                                               "amount_msats": amount * 1000, "kind": "change"},
                                ref=args[1], lock=args[2])
        out = {"token": tok.serialize()}
    elif cmd == "melt":
        acct = db.read(lambda c: ledger.get_account(c, OPERATOR_KEY))
        assert acct is not None
        res = await wallet.melt(args[0], mint, {"action": "debit", "account_id": acct.id,
                                                "amount_msats": int(args[1]) * 1000,
                                                "kind": "payout"})
        out = {"amount": res.amount, "fee": res.fee}
    elif cmd == "recover":
        rep = await wallet.recover()
        out = {"finished": rep.finished, "rolled_back": rep.rolled_back,
               "pending": rep.still_pending, "revived": rep.revived}
    print("RESULT " + json.dumps(out), flush=True)
    db.close()


# --------------------------------------------------------------------------- the parent side


class Child:
    def __init__(self, db: Path, seed: bytes, mint: str) -> None:
        self.db, self.seed, self.mint = db, seed, mint

    def _cmd(self, cmd: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "tests.cashu.test_wallet_crash", str(self.db),
                self.seed.hex(), self.mint, cmd, *args]

    def run(self, cmd: str, *args: str) -> dict[str, Any]:
        out = subprocess.run(self._cmd(cmd, *args), cwd=ROOT, capture_output=True, text=True,
                             timeout=CHILD_TIMEOUT_S, check=False, env=_env(""))
        assert out.returncode == 0, out.stderr[-3000:]
        return _result(out.stdout)

    def crash(self, point: str, cmd: str, *args: str) -> str:
        """Run until the pause point, SIGKILL there; returns the child's stdout."""
        proc = subprocess.Popen(self._cmd(cmd, *args), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env(point))
        lines = []
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + CHILD_TIMEOUT_S
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
                if line.startswith("PAUSED"):
                    break
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        text = "".join(lines)
        assert "PAUSED" in text, (text, proc.stderr.read() if proc.stderr else "")
        return text

    def kill_after(self, delay_s: float, cmd: str, *args: str) -> bool:
        """SIGKILL `delay_s` after the child is ready to work; True if it was still working."""
        proc = subprocess.Popen(self._cmd(cmd, *args), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=_env(""))
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.strip() == "READY", ready
        try:
            proc.wait(timeout=delay_s)
            return False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            return True


def _env(point: str) -> dict[str, str]:
    env = dict(os.environ, CRASH_AT=point)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _result(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT "):]))
    raise AssertionError(f"no result in {stdout!r}")


def books(db_path: Path) -> dict[str, int]:
    """The child's books: proofs by state, operations by outcome, what the ledger credited."""
    db = Database(db_path)
    try:
        store = SqliteWalletStore(db)
        t = store.totals()
        ops = store.operations(limit=10_000)
        led = db.read(ledger.check_invariant)
    finally:
        db.close()
    done = [o for o in ops if o.state == "done"]
    return {
        "unspent": t["unspent"], "issued": t["issued"], "reserved": t["reserved"],
        "pending": t.get("ops_pending", 0),
        "in": sum(o.amount for o in done if o.kind in ("receive", "mint")),
        "melted": sum(o.amount for o in done if o.kind == "melt"),
        "fees": sum(o.fee for o in done if o.kind in ("send", "melt")),
        "deposited_msats": led["deposited_msats"], "refunded_msats": led["refunded_msats"],
        "balance_msats": led["balance_msats"],
    }


def assert_conserved(db_path: Path) -> dict[str, int]:
    b = books(db_path)
    assert b["pending"] == 0 and b["reserved"] == 0, b
    assert b["in"] == b["unspent"] + b["issued"] + b["melted"] + b["fees"], b
    assert b["deposited_msats"] == b["in"] * 1000, b  # every sat in was credited, once
    return b


pytestmark = [pytest.mark.mint, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def source(tmp_path: Path, mint_url_fee: str) -> Wallet:
    """Where test tokens come from (the fee mint: fees must be accounted for exactly)."""
    db = Database(tmp_path / "source.sqlite3")
    return Wallet(SqliteWalletStore(db), UrllibTransport(), os.urandom(64))


async def fund_source(source: Wallet, mint: str, amount: int) -> None:
    q = await source.mint_quote(amount, mint)
    await source.mint_paid(q.quote)


async def states(mint: str, token: str) -> set[str]:
    proofs = parse_token(token).proofs
    res = await MintClient(mint, UrllibTransport()).check_state([proof_y(p.secret)
                                                                for p in proofs])
    return {s.state for s in res}


async def unspent_at_mint(db_path: Path, mint: str) -> bool:
    db = Database(db_path)
    try:
        proofs = SqliteWalletStore(db).unspent(mint, "sat")
    finally:
        db.close()
    if not proofs:
        return True
    res = await MintClient(mint, UrllibTransport()).check_state([proof_y(p.secret)
                                                                for p in proofs])
    return {s.state for s in res} == {"UNSPENT"}


@pytest.mark.parametrize("point", ["after_begin", "after_response", "after_finish"])
async def test_receive_crash(point: str, tmp_path: Path, source: Wallet,
                             mint_url_fee: str) -> None:
    mint = mint_url_fee
    await fund_source(source, mint, 50)
    token = (await source.send(37, mint)).serialize()
    child = Child(tmp_path / "node.sqlite3", os.urandom(64), mint)
    child.crash(point, "receive", token)
    rec = child.run("recover")
    b = assert_conserved(child.db)
    if point == "after_begin":  # never reached the mint: rolled back, the token is untouched
        assert rec["rolled_back"] and await states(mint, token) == {"UNSPENT"}
        assert b["in"] == 0
        got = child.run("receive", token)  # and it can be redeemed normally afterwards
        assert isinstance(got[token_key(token)], int)
    elif point == "after_response":  # executed by the mint: restored and credited
        assert rec["finished"] and await states(mint, token) == {"SPENT"}
    else:
        assert rec == {"finished": [], "rolled_back": [], "pending": [], "revived": []}
    b = assert_conserved(child.db)
    fee = (len(parse_token(token).proofs) * 100 + 999) // 1000
    assert b["in"] == 37 - fee and await states(mint, token) == {"SPENT"}
    again = child.run("receive", token)  # a second presentation credits nothing
    assert again[token_key(token)] == "ProofsAlreadySpent"
    assert assert_conserved(child.db)["in"] == 37 - fee
    assert await unspent_at_mint(child.db, mint)


@pytest.mark.parametrize("point", ["after_response", "after_finish"])
async def test_split_receive_crash_issues_the_change_once(point: str, tmp_path: Path,
                                                         source: Wallet, mint_url_fee: str) -> None:
    """A receive that splits the client's change off (X-Cashu stream), killed after the mint
    signed: recovery finishes it from the restore with the same split — the change token under
    its reference, paid out of the account in the transaction that stores the proofs."""
    mint = mint_url_fee
    await fund_source(source, mint, 64)
    token = (await source.send(40, mint)).serialize()
    fee = (len(parse_token(token).proofs) * 100 + 999) // 1000
    child = Child(tmp_path / "node.sqlite3", os.urandom(64), mint)
    child.crash(point, "receive_split", "13", "split-1", token)
    child.run("recover")
    b = assert_conserved(child.db)
    assert b["in"] == 40 - fee and b["unspent"] == 13 and b["issued"] == 40 - fee - 13, b
    assert b["refunded_msats"] == (40 - fee - 13) * 1000 and b["balance_msats"] == 13_000, b
    db = Database(child.db)
    op = SqliteWalletStore(db).by_ref("split-1")
    db.close()
    assert op is not None and op.state == "done" and op.token is not None
    assert parse_token(op.token).amount == 40 - fee - 13
    assert await states(mint, op.token) == {"UNSPENT"}
    assert (await source.receive(op.token)).amount > 0  # the recovered change is good
    again = child.run("receive", token)  # the payment token credits nothing more
    assert again[token_key(token)] == "ProofsAlreadySpent"
    assert assert_conserved(child.db)["refunded_msats"] == (40 - fee - 13) * 1000
    assert await unspent_at_mint(child.db, mint)


async def test_a_locked_send_killed_after_the_mint_signed_is_restored_locked(
        tmp_path: Path, mint_url_fee: str) -> None:
    """A token locked to a client's key (X-Cashu-Lock) is made of outputs derived from the seed
    like any other (the P2PK secret's nonce is the NUT-13 secret): a restore finds them."""
    mint = mint_url_fee
    client = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
    child = Child(tmp_path / "node.sqlite3", os.urandom(64), mint)
    child.run("fund", "64")
    child.crash("after_response", "send_locked", "21", "ref-locked", client)
    rec = child.run("recover")
    assert rec["finished"] and not rec["pending"]
    b = assert_conserved(child.db)
    assert b["issued"] == 21 and b["refunded_msats"] == 21_000
    db = Database(child.db)
    op = SqliteWalletStore(db).by_ref("ref-locked")
    db.close()
    assert op is not None and op.state == "done" and op.token is not None
    tok = parse_token(op.token)
    assert tok.amount == 21 and all(json.loads(p.secret)[1]["data"] == client for p in tok.proofs)
    assert await states(mint, op.token) == {"UNSPENT"}


@pytest.mark.parametrize("point", ["after_begin", "after_response"])
async def test_send_crash_then_token_by_reference(point: str, tmp_path: Path, source: Wallet,
                                                  mint_url_fee: str) -> None:
    mint = mint_url_fee
    child = Child(tmp_path / "node.sqlite3", os.urandom(64), mint)
    child.run("fund", "64")
    child.crash(point, "send", "21", "ref-1")
    rec = child.run("recover")
    assert rec["finished"] and not rec["pending"]  # our own proofs: the swap is completed
    b = assert_conserved(child.db)
    assert b["issued"] == 21 and b["refunded_msats"] == 21_000  # debited once
    db = Database(child.db)
    op = SqliteWalletStore(db).by_ref("ref-1")
    db.close()
    assert op is not None and op.state == "done" and op.token is not None
    assert parse_token(op.token).amount == 21 and await states(mint, op.token) == {"UNSPENT"}
    assert (await source.receive(op.token)).amount > 0  # the recovered token is good
    assert await unspent_at_mint(child.db, mint)


async def test_mint_and_melt_crash(tmp_path: Path, mint_url: str, mint_url_fee: str) -> None:
    child = Child(tmp_path / "node.sqlite3", os.urandom(64), mint_url)
    out = child.crash("after_response", "fund", "100")  # minted at the mint, not recorded
    quote = out.split("QUOTE ", 1)[1].split()[0]
    rec = child.run("recover")
    assert rec["finished"]
    assert assert_conserved(child.db)["in"] == 100
    assert child.run("mint_paid", quote) == {"minted": 100}  # minted and credited once
    assert assert_conserved(child.db)["deposited_msats"] == 100_000

    invoice = (await MintClient(mint_url_fee, UrllibTransport()).mint_quote(30)).request
    child.crash("after_response", "melt", invoice, "30")  # paid, change not recorded
    rec = child.run("recover")
    assert rec["finished"]
    b = assert_conserved(child.db)
    assert b["melted"] == 30 and b["unspent"] == 100 - 30 - b["fees"]
    assert b["refunded_msats"] == 30_000
    assert await unspent_at_mint(child.db, mint_url)


async def test_random_kills(tmp_path: Path, source: Wallet, mint_url_fee: str) -> None:
    """Kill the wallet at random moments while it redeems a batch of tokens; recover; repeat."""
    mint = mint_url_fee
    rng = random.Random(os.urandom(8))
    await fund_source(source, mint, 16 * 40)
    tokens = [(await source.send(rng.randint(5, 30), mint)).serialize() for _ in range(16)]
    child = Child(tmp_path / "node.sqlite3", os.urandom(64), mint)
    settled: list[int] = []
    killed = 0
    for _ in range(8):
        killed += child.kill_after(rng.uniform(0.02, 0.3), "receive", *tokens)
        rec = child.run("recover")
        settled += rec["finished"] + rec["rolled_back"]
        assert not rec["pending"]
        assert_conserved(child.db)
    print(f"random kills: {killed} kills mid-work, {len(settled)} intents settled by recover()")
    assert killed
    child.run("receive", *tokens)  # whatever is left
    b = assert_conserved(child.db)
    expected = 0
    for t in tokens:
        assert await states(mint, t) == {"SPENT"}
        p = parse_token(t)
        expected += p.amount - (len(p.proofs) * 100 + 999) // 1000
    assert b["in"] == expected  # every token credited exactly once, exactly value − fee
    db = Database(child.db)
    try:
        for t in tokens:
            acct = db.read(lambda c, t=t: ledger.get_account(c, token_key(t)))
            assert acct is not None and acct.deposited_msats > 0
    finally:
        db.close()
    assert await unspent_at_mint(child.db, mint)


if __name__ == "__main__":
    import anyio

    anyio.run(_child, sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
