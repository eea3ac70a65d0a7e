"""(a) Load with faults: paid requests at high concurrency mixing streams, upstream failures
(5xx, 429, 400, hangs, connections cut midway, missing usage) and client disconnects (FIN and
RST, mid-upload, mid-stream). Afterwards the ledger balances to the msat and nothing is held.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from routstr.db import Database
from tests.reliability.support import (
    NODE_FLAGS,
    Call,
    FaultyUpstream,
    audit,
    http_call,
    new_key,
    plan_calls,
    raise_fd_limit,
    run_calls,
    unhandled_errors,
)

pytestmark = pytest.mark.reliability


def reservation_of(database: str, rid: str) -> int:
    db = Database(database)
    try:
        return int(db.read(lambda c: c.execute(
            "SELECT amount_msats FROM txlog WHERE kind = 'reserve' AND request_id = ?", (rid,)
        ).fetchone()[0]))
    finally:
        db.close()


@pytest.mark.parametrize(("requests", "concurrency", "workers"), [
    pytest.param(2000, 64, 1, id="2000x64"),
    pytest.param(2000, 64, 2, id="2000x64-2workers"),
    pytest.param(20000, 128, 1, id="20000x128", marks=pytest.mark.slow),
])
def test_paid_load_with_faults_balances_to_the_msat(tmp_path: Path, spawn: Any, requests: int,
                                                    concurrency: int, workers: int) -> None:
    seed = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 10**6))
    print(f"seed {seed}")
    rng = random.Random(seed)
    raise_fd_limit(4 * concurrency + 256)
    with FaultyUpstream() as upstream:
        node = spawn(tmp_path, ["--upstream-base-url", upstream.url, "--workers", str(workers),
                                *NODE_FLAGS])
        try:
            deposits = {new_key(node, 10**9): 10**9 for _ in range(20)}
            rich = list(deposits)
            probe = asyncio.run(http_call(node.port, Call("probe", rich[0], "ok", False)))
            assert probe.status == 200 and probe.completed
            held = reservation_of(node.database, "probe")
            # poor keys run dry under load: 402s, and the reservation race at the last msats
            poor = {new_key(node, held * 3 + held // 2): held * 3 + held // 2 for _ in range(4)}
            deposits.update(poor)
            calls = plan_calls(rich * 5 + list(poor), requests, rng, prefix=f"a{seed}")
            t0 = time.monotonic()
            outcomes = asyncio.run(run_calls(node.port, calls, concurrency))
            elapsed = time.monotonic() - t0
            notable = [ln for ln in node.log_text().splitlines()
                       if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
            print("\n".join(notable[-40:]))  # shown when an assertion below fails
            assert "restarting" not in node.log_text()  # no worker died
            assert len(outcomes) == requests
            failures = [o for o in outcomes if o.error and not o.disconnected]
            assert not failures, failures[:5]
            result = audit(node.database, [probe, *outcomes], deposits)
            assert not unhandled_errors(node)
            assert node.proc is not None and node.proc.poll() is None
            status, _ = node.json("GET", "/health")
            assert status == 200
            # the mix really happened
            assert result.statuses[200] > requests // 3 and result.statuses[402] > 0
            assert sum(n for s, n in result.statuses.items() if s >= 500) > 0
            assert result.kinds["release"] > 0 and result.kinds["settle"] > requests // 3
            # ~14 % of the clients hang up at a random moment; those answered first do not count
            assert sum(o.disconnected for o in outcomes) > requests // 50
            print(f"{requests} requests at concurrency {concurrency}, {workers} worker(s): "
                  f"{elapsed:.1f}s ({requests / elapsed:.0f}/s); statuses "
                  f"{dict(sorted(result.statuses.items()))}; ledger rows "
                  f"{dict(result.kinds)}; exact charges checked {result.exact_checked}; "
                  f"charged {result.charged_msats} msats")
        finally:
            node.stop()
