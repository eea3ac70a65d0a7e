"""`--workers N`: N processes on one port and one sqlite file, background jobs in exactly one.

Under paid load: both workers serve; a SIGKILLed worker is restarted with its index (so the
jobs never run twice); a SIGKILLed supervisor takes its workers down with it; the next start
releases what the dead workers held, and the books balance to the msat.
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

from tests.reliability.support import (
    NODE_FLAGS,
    FaultyUpstream,
    Outcome,
    audit,
    new_key,
    plan_calls,
    run_calls,
    unhandled_errors,
)

pytestmark = pytest.mark.reliability


def workers_of(pid: int) -> dict[int, int]:
    """index -> pid of the supervisor's live worker processes."""
    out: dict[int, int] = {}
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return out
    for child in children:
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"_worker" in argv:
            out[int(argv[argv.index(b"_worker") + 1])] = int(child)
    return out


def wait_for(predicate: object, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_workers_share_the_port_and_the_books(tmp_path: Path, spawn: Any) -> None:
    rng = random.Random(9)
    with FaultyUpstream() as upstream:
        args = ["--upstream-base-url", upstream.url, "--workers", "2", *NODE_FLAGS]
        node = spawn(tmp_path, args)
        assert node.proc is not None
        sup = node.proc.pid
        wait_for(lambda: len(workers_of(sup)) == 2)
        log = node.log_text()
        assert log.count("(background jobs: yes)") == 1 and log.count("(background jobs: no)") == 1
        deposits = {new_key(node, 10**9): 10**9 for _ in range(6)}
        keys = list(deposits)
        outcomes: list[Outcome] = asyncio.run(run_calls(
            node.port, plan_calls(keys, 300, rng, prefix="w-a"), 32))
        served = set(re.findall(r"routstr\.access\[w(\d)\]", node.log_text()))
        assert served == {"0", "1"}, served

        # a worker dies under load: restarted with the same index, the jobs stay in worker 0
        for index in (1, 0):
            before = workers_of(sup)

            async def load_and_kill(index: int = index, before: dict[int, int] = before) -> list:
                loop = asyncio.get_running_loop()
                loop.call_later(0.4, os.kill, before[index], signal.SIGKILL)
                return await run_calls(node.port, plan_calls(keys, 300, rng,
                                                             prefix=f"w-k{index}"), 32)

            outcomes += asyncio.run(load_and_kill())
            wait_for(lambda index=index, before=before: workers_of(sup).get(index, before[index])
                     != before[index])
            wait_for(lambda index=index: node.log_text().count(
                f"worker {index} of 2 serving") == 2)
            assert f"worker {index} exited with -9; restarting" in node.log_text()
        assert node.log_text().count("(background jobs: yes)") == 2  # worker 0, then its heir

        # the supervisor dies: its workers notice and stop
        pids = list(workers_of(sup).values())
        os.kill(sup, signal.SIGKILL)
        node.proc.wait(5)
        wait_for(lambda: not any(alive(p) for p in pids), 10)
        assert f"supervisor {sup} gone" in node.log_text()
        assert not unhandled_errors(node)
        node.log.close()

        # the next start releases what the killed workers held; the books balance
        node = spawn(tmp_path, args)
        try:
            result = audit(node.database, outcomes, deposits)
            assert result.statuses[200] > 300
        finally:
            assert node.stop() == 0
    print(f"workers: {len(outcomes)} requests; ledger rows {dict(result.kinds)}")


def test_dead_workers_reservations_are_released_at_once(tmp_path: Path) -> None:
    """A SIGKILLed worker's in-flight requests can never settle: the supervisor releases what
    they held as soon as it sees the worker gone — not when the reservations expire."""
    import concurrent.futures

    from routstr.db import Database
    from routstr.ledger import Ledger
    from tests.support.node import NodeProcess
    from tests.support.upstream import Behaviour, ScriptedUpstream

    with ScriptedUpstream() as up:
        node = NodeProcess(tmp_path, ["--workers", "2", "--upstream-base-url", up.url,
                                      "--admin-token", "adm", "--reservation-ttl", "3600"]).start()
        try:
            status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": 10_000_000},
                                    {"Authorization": "Bearer adm"})
            assert status == 201
            key = doc["api_key"]
            up.enqueue(*[Behaviour(hang=True) for _ in range(4)])
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                calls = [pool.submit(node.request, "POST", "/v1/chat/completions", body,
                                     {"Authorization": f"Bearer {key}"}, 20) for _ in range(4)]

                def held() -> int:
                    db = Database(node.database)
                    try:
                        return Ledger(db).totals()["reserved_msats"]
                    finally:
                        db.close()

                wait_for(lambda: held() > 0 and len(up.requests) >= 4)
                assert node.proc is not None
                for pid in workers_of(node.proc.pid).values():
                    os.kill(pid, signal.SIGKILL)
                wait_for(lambda: held() == 0, timeout_s=10)
                for call in calls:  # each client saw its connection die
                    try:
                        assert call.result(20)[0] != 200
                    except OSError:
                        pass
            wait_for(lambda: len(workers_of(node.proc.pid)) == 2)  # type: ignore[union-attr]
            db = Database(node.database)
            try:
                Ledger(db).check_invariant()
                acct_reserved = Ledger(db).totals()["reserved_msats"]
            finally:
                db.close()
            assert acct_reserved == 0
            assert "reservations held by the dead worker" in node.log_text()
        finally:
            node.stop()
