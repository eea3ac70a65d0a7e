"""A process SIGKILLed between reserve and settle: after restart the money is spendable again.

The child process is a real interpreter (``python -c``) running the ledger against the same file;
it prints "reserved" once its reservation has committed, then waits to be killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from routstr.db import Database
from routstr.keys import generate_api_key, hash_key
from routstr.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from routstr.db import Database
    from routstr.ledger import Ledger
    path, account_id, amount, ttl = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    lg = Ledger(Database(path))
    lg.credit(account_id, 5_000, ref="paid-before-the-crash")   # durable: must survive
    r = lg.reserve(account_id, amount, request_id="doomed", ttl_s=ttl)
    print("reserved", r.id, lg.boot_id, flush=True)
    time.sleep(60)
    lg.settle(r.id, 1)   # never reached
    """
)


def run_and_kill(path: Path, account_id: int, amount: int, ttl: int) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(path), str(account_id), str(amount), str(ttl)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line.startswith("reserved"), (line, proc.stderr.read() if proc.stderr else "")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _, rid, boot = line.split()
    return int(rid), boot


@pytest.fixture
def account(tmp_path: Path) -> tuple[Path, int]:
    path = tmp_path / "crash.sqlite3"
    with Database(path) as d:
        acct = Ledger(d).create_account(
            key_hash=hash_key(generate_api_key()), kind="api", deposit_msats=10_000
        )
    return path, acct.id


def test_sigkill_then_single_process_start_releases_orphans(account: tuple[Path, int]) -> None:
    path, account_id = account
    rid, dead_boot = run_and_kill(path, account_id, 12_000, ttl=3600)
    with Database(path) as d:
        lg = Ledger(d)
        held = lg.get_account_by_id(account_id)
        assert (held.balance_msats, held.reserved_msats, held.deposited_msats) == (
            3_000,
            12_000,
            15_000,
        )
        assert lg.get_reservation(rid).owner == dead_boot
        lg.check_invariant()  # consistent even before recovery
        assert lg.startup_sweep(single_process=True) == 1
        after = lg.get_account_by_id(account_id)
        assert (after.balance_msats, after.reserved_msats, after.spent_msats) == (15_000, 0, 0)
        assert lg.transactions(account_id)[0][0].kind == "orphan"
        lg.check_invariant()
        # and the money is really spendable again
        lg.settle(lg.reserve(account_id, 15_000, request_id="again", ttl_s=60).id, 15_000)
        lg.check_invariant()


def test_sigkill_then_expiry_sweep_releases_with_workers(account: tuple[Path, int]) -> None:
    """With several workers a start may not release other boots' reservations; expiry does."""
    path, account_id = account
    run_and_kill(path, account_id, 15_000, ttl=30)
    with Database(path) as d:
        lg = Ledger(d)
        now = int(time.time())
        assert lg.startup_sweep(single_process=False, now=now) == 0
        assert lg.get_account_by_id(account_id).balance_msats == 0
        assert lg.sweep_expired(now=now + 31) == 1
        after = lg.get_account_by_id(account_id)
        assert (after.balance_msats, after.reserved_msats) == (15_000, 0)
        assert lg.transactions(account_id)[0][0].kind == "expire"
        lg.check_invariant()
