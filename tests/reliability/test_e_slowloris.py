"""(e) Slowloris: 500 slow connections — silent ones, ones trickling their request headers a byte
at a time, ones trickling a request body — while normal paid clients keep their latency. The
node then closes the header tricklers at `--header-timeout` and the silent ones at
`--keepalive-timeout`. Prints the node's memory idle and with the 500 connections open.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

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
from tests.support.node import NodeProcess

pytestmark = pytest.mark.reliability

HEADER_TIMEOUT_S = 6.0
TRICKLE_S = 0.5


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


class Slow:
    """One slow connection: 'silent', 'headers' (trickled) or 'body' (trickled)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.closed_by_node_at: float | None = None
        self.answer = b""

    async def run(self, port: int, stop: asyncio.Event, opened: list[int],
                  all_open: asyncio.Event, n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened.append(1)
        if len(opened) == n:
            all_open.set()
        if self.kind == "headers":
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: n\r\n")
        elif self.kind == "body":
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: n\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
        read = asyncio.ensure_future(reader.read(65536))
        try:
            while not stop.is_set():
                done, _ = await asyncio.wait({read}, timeout=TRICKLE_S)
                if done:  # the node answered or closed
                    self.answer = read.result()
                    self.closed_by_node_at = time.monotonic()
                    return
                if self.kind != "silent":
                    writer.write(b"x")
                    await writer.drain()
        except (ConnectionError, OSError):
            self.closed_by_node_at = time.monotonic()
        finally:
            read.cancel()
            writer.transport.abort()


@pytest.mark.parametrize("n_slow", [pytest.param(500, id="500"),
                                    pytest.param(3000, id="3000", marks=pytest.mark.slow)])
def test_slow_connections_do_not_hurt_normal_clients(tmp_path: Path, n_slow: int) -> None:
    limit = raise_fd_limit(2 * n_slow + 512)
    assert limit >= n_slow + 256, f"fd limit {limit} too low for {n_slow} connections"
    with FaultyUpstream() as upstream:
        node = NodeProcess(tmp_path, ["--upstream-base-url", upstream.url, *NODE_FLAGS,
                                      "--header-timeout", str(HEADER_TIMEOUT_S),
                                      "--keepalive-timeout", str(HEADER_TIMEOUT_S)]).start()
        try:
            key = new_key(node, 10**9)
            assert node.proc is not None
            rss_idle = rss_kib(node.proc.pid)

            async def scenario() -> tuple[list[float], list[float], list[Slow], float, float]:
                base = await normal_latencies(node.port, key, 2.0)
                stop = asyncio.Event()
                opened: list[int] = []
                slow = [Slow(("silent", "headers", "body")[i % 3]) for i in range(n_slow)]
                t_open = time.monotonic()
                all_open = asyncio.Event()
                tasks = [asyncio.ensure_future(s.run(node.port, stop, opened, all_open, n_slow))
                         for s in slow]
                await asyncio.wait_for(all_open.wait(), 20)
                await asyncio.sleep(0.5)
                rss = rss_kib(node.proc.pid)  # type: ignore[union-attr]
                loaded = await normal_latencies(node.port, key, 3.0)
                # the node cuts the tricklers and the silent ones by itself
                await asyncio.sleep(max(0.0, t_open + HEADER_TIMEOUT_S + 2.5 - time.monotonic()))
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
                return base, loaded, slow, rss, t_open

            base, loaded, slow, rss_loaded, t_open = asyncio.run(scenario())
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
    cut = [s for s in slow if s.kind in ("silent", "headers")]
    assert all(s.closed_by_node_at is not None for s in cut), \
        sum(s.closed_by_node_at is None for s in cut)
    assert all(s.closed_by_node_at <= t_open + HEADER_TIMEOUT_S + 2.5 for s in cut)  # type: ignore[operator]
    assert all(s.answer.startswith(b"HTTP/1.1 408") for s in slow if s.kind == "headers")
