"""(e) Slowloris: 500 slow connections — silent ones, ones trickling their request headers a byte
at a time, ones trickling a request body — while normal paid clients keep their latency. The
node then closes the header tricklers at `--header-timeout` and the silent ones at
`--keepalive-timeout`. Prints the node's memory idle and with the 500 connections open.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.support import (
    NODE_FLAGS,
    Call,
    FaultyUpstream,
    http_call,
    new_key,
    raise_fd_limit,
    rss_kib,
    unhandled_errors,
)

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parents[2]

HEADER_TIMEOUT_S = 6.0


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000


async def normal_latencies(port: int, key: str, seconds: float, clients: int = 8) -> list[float]:
    out: list[float] = []
    stop = time.monotonic() + seconds
    n = 0

    async def client() -> None:
        nonlocal n
        while time.monotonic() < stop:
            n += 1
            o = await http_call(port, Call(f"e-{id(out)}-{n}", key, "ok", n % 3 == 0), timeout_s=10)
            assert o.status == 200 and o.completed, o
            out.append(o.latency_s)

    await asyncio.gather(*(client() for _ in range(clients)))
    return out


@pytest.mark.parametrize("n_slow", [pytest.param(500, id="500"),
                                    pytest.param(3000, id="3000", marks=pytest.mark.slow)])
def test_slow_connections_do_not_hurt_normal_clients(tmp_path: Path, spawn: Any,
                                                     n_slow: int) -> None:
    limit = raise_fd_limit(2 * n_slow + 512)
    assert limit >= n_slow + 256, f"fd limit {limit} too low for {n_slow} connections"
    with FaultyUpstream() as upstream:
        node = spawn(tmp_path, ["--upstream-base-url", upstream.url, *NODE_FLAGS,
                                "--header-timeout", str(HEADER_TIMEOUT_S),
                                "--keepalive-timeout", str(HEADER_TIMEOUT_S)])
        try:
            key = new_key(node, 10**9)
            assert node.proc is not None
            rss_idle = rss_kib(node.proc.pid)

            base = asyncio.run(normal_latencies(node.port, key, 2.0))
            slow = subprocess.Popen([sys.executable, "-m", "tests.reliability.slow_clients",
                                     str(node.port), str(n_slow)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, cwd=ROOT)
            try:
                t_open = time.monotonic()
                assert slow.stdout is not None and slow.stdin is not None
                assert slow.stdout.readline().strip() == "open"
                time.sleep(0.5)
                rss_loaded = rss_kib(node.proc.pid)
                loaded = asyncio.run(normal_latencies(node.port, key, 3.0))
                # the node cuts the tricklers and the silent ones by itself
                time.sleep(max(0.0, t_open + HEADER_TIMEOUT_S + 2.5 - time.monotonic()))
                slow.stdin.write("stop\n")
                slow.stdin.flush()
                results = json.loads(slow.stdout.readline())
            finally:
                slow.kill()
                slow.wait(10)
            assert not unhandled_errors(node)
            assert node.json("GET", "/health")[0] == 200
        finally:
            node.stop()
    b50, b99, l50, l99 = pct(base, .5), pct(base, .99), pct(loaded, .5), pct(loaded, .99)
    print(f"{n_slow} slow connections: normal latency p50 {b50:.1f} -> {l50:.1f} ms, "
          f"p99 {b99:.1f} -> {l99:.1f} ms ({len(base)} / {len(loaded)} requests); node RSS idle "
          f"{rss_idle / 1024:.1f} MiB, with {n_slow} connections {rss_loaded / 1024:.1f} MiB")
    assert len(loaded) > len(base) * 0.5  # throughput kept (3 s vs 2 s of measuring)
    assert l50 <= 2 * b50 + 10, (b50, l50)
    assert l99 <= 3 * b99 + 50, (b99, l99)
    assert statistics.mean(loaded) < 0.25
    cut = [r for r in results if r[0] in ("silent", "headers")]
    assert len(results) == n_slow
    assert all(r[1] is not None for r in cut), sum(r[1] is None for r in cut)
    assert all(r[1] <= HEADER_TIMEOUT_S + 2.5 for r in cut), max(r[1] for r in cut)
    assert all(r[2].startswith("HTTP/1.1 408") for r in results if r[0] == "headers")
