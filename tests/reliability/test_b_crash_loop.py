"""(b) Crash loop: SIGKILL the node at random moments under paid load, restart it on the same
database, again and again. Between crashes the ledger's invariant holds (every transaction is
atomic); each restart releases exactly the reservations the dead process held; at the end
every request's reservation was consumed exactly once and the books balance to the msat.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from routstr.db import Database
from routstr.ledger import Ledger
from tests.reliability.support import (
    NODE_FLAGS,
    FaultyUpstream,
    Outcome,
    audit,
    new_key,
    plan_calls,
    raise_fd_limit,
    run_calls,
    unhandled_errors,
)
from tests.support.node import NodeProcess

pytestmark = pytest.mark.reliability
_RELEASED = re.compile(r"released (\d+) reservations left by a previous run")


def held_reservations(database: str) -> int:
    db = Database(database)
    try:
        Ledger(db).check_invariant()  # holds at any instant, even right after a SIGKILL
        return int(db.read(lambda c: c.execute("SELECT COUNT(*) FROM reservations")
                           .fetchone()[0]))
    finally:
        db.close()


async def load_until_killed(node: NodeProcess, calls: list, kill_after_s: float,
                            concurrency: int) -> list[Outcome]:
    stop = asyncio.Event()

    def kill() -> None:
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGKILL)
        stop.set()

    asyncio.get_running_loop().call_later(kill_after_s, kill)
    return await run_calls(node.port, calls, concurrency, stop)


@pytest.mark.parametrize("crashes", [pytest.param(10, id="10-crashes"),
                                     pytest.param(40, id="40-crashes", marks=pytest.mark.slow)])
def test_sigkill_under_load_loses_nothing(tmp_path: Path, spawn: Any, crashes: int) -> None:
    seed = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 10**6))
    print(f"seed {seed}")
    rng = random.Random(seed)
    raise_fd_limit(1024)
    outcomes: list[Outcome] = []
    held_at_crash: list[int] = []
    t0 = time.monotonic()
    with FaultyUpstream() as upstream:
        args = ["--upstream-base-url", upstream.url, *NODE_FLAGS]
        node = spawn(tmp_path, args)
        deposits = {new_key(node, 10**9): 10**9 for _ in range(8)}
        keys = list(deposits)
        for crash in range(crashes):
            calls = plan_calls(keys, 400, rng, prefix=f"b{seed}-{crash}")
            outcomes += asyncio.run(load_until_killed(node, calls, rng.uniform(0.2, 1.2), 32))
            assert node.proc is not None
            node.proc.wait(10)
            assert not unhandled_errors(node)
            node.log.close()
            held = held_reservations(node.database)
            held_at_crash.append(held)
            node = spawn(tmp_path, args)
            m = _RELEASED.search(node.log_text())
            assert (int(m.group(1)) if m else 0) == held, node.log_text()
            assert held_reservations(node.database) == 0
        try:
            result = audit(node.database, outcomes, deposits)
            assert not unhandled_errors(node)
        finally:
            node.stop()
    assert sum(held_at_crash) > 0, "no crash caught a request in flight"
    print(f"{crashes} SIGKILLs in {time.monotonic() - t0:.1f}s; {len(outcomes)} requests; "
          f"reservations released at restart {held_at_crash}; ledger rows {dict(result.kinds)}; "
          f"exact charges checked {result.exact_checked}")
