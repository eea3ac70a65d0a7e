"""Proxy overhead benchmark: the same load straight at a fake upstream and through the node.

    python bench/proxy_bench.py [--requests 2000] [--seconds 5] [--concurrency 64]

Starts (as separate processes, all on 127.0.0.1) a minimal asyncio fake upstream and the node
(`python -m routstr`, fresh sqlite file, a prepaid key), then measures with raw keep-alive
HTTP/1.1 clients, for paid requests (auth + reserve + forward + settle):

* latency at concurrency 1: p50 / p99, direct vs through the node (the difference is the
  node's added latency);
* throughput at concurrency N: requests/s, and the node's share of the direct figure;
* streaming time to first byte (first SSE event), p50, direct vs through the node.

Prints a Markdown table (the one quoted in README's Performance section).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

UPSTREAM = r'''
import asyncio, json, sys
BODY = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from upstream!"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}).encode()
def chunk(d): return b"data: " + json.dumps(d).encode() + b"\n\n"
EVENTS = b"".join([chunk({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": w}}]})
                   for w in ["Hello", " from", " up", "stream", "!"]]
                  + [chunk({"id": "c", "object": "chat.completion.chunk", "choices": [],
                            "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}), b"data: [DONE]\n\n"])
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, data):
        self.buf += data
        while True:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep: return
            m = [l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
            n = int(m[0].split(b":")[1]) if m else 0
            if len(rest) < n: return
            body, self.buf = rest[:n], rest[n:]
            if b'"stream": true' in body or b'"stream":true' in body:
                self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                             + b"%x\r\n" % len(EVENTS) + EVENTS + b"\r\n0\r\n\r\n")
            else:
                self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY)
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", 0)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await srv.serve_forever()
asyncio.run(main())
'''


class Client:
    """One raw keep-alive HTTP/1.1 connection (Content-Length or chunked responses)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def open(self) -> None:
        self.r, self.w = await asyncio.open_connection(self.host, self.port)

    async def call(self, path: str, body: bytes, key: str, *, ttfb: bool = False) -> float:
        t0 = time.perf_counter()
        self.w.write(b"POST %s HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer %s\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (path.encode(), key.encode(), len(body), body))
        head = await self.r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        first = 0.0
        m = re.search(rb"(?i)content-length: *(\d+)", head)
        if m:
            await self.r.readexactly(int(m.group(1)))
            first = time.perf_counter()
        else:
            while True:
                size = int((await self.r.readuntil(b"\r\n")).strip(), 16)
                if not first:
                    first = time.perf_counter()
                await self.r.readexactly(size + 2)
                if size == 0:
                    break
        return (first if ttfb else time.perf_counter()) - t0


CHAT = json.dumps({"model": "gpt-4o-mini", "max_tokens": 50,
                   "messages": [{"role": "user", "content": "Hello!"}]}).encode()
STREAM = json.dumps({"model": "gpt-4o-mini", "max_tokens": 50, "stream": True,
                     "messages": [{"role": "user", "content": "Hello!"}]}).encode()


async def latency(port: int, path: str, key: str, n: int, body: bytes, ttfb: bool = False) -> list[float]:
    c = Client("127.0.0.1", port)
    await c.open()
    for _ in range(50):  # warm-up
        await c.call(path, body, key, ttfb=ttfb)
    return [await c.call(path, body, key, ttfb=ttfb) for _ in range(n)]


async def throughput(port: int, path: str, key: str, conc: int, seconds: float) -> float:
    clients = [Client("127.0.0.1", port) for _ in range(conc)]
    await asyncio.gather(*(c.open() for c in clients))
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(c: Client) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await c.call(path, CHAT, key)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    return done / (time.perf_counter() - t0)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="routstr-bench-"))
    up = subprocess.Popen([sys.executable, "-c", UPSTREAM], stdout=subprocess.PIPE, text=True)
    up_port = int(up.stdout.readline())  # type: ignore[union-attr]
    db = str(tmp / "bench.sqlite3")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "routstr", "keys", "create", "--balance-msats",
                          str(10**13), "--database", db], capture_output=True, text=True,
                         env=env, check=True)
    key = json.loads(out.stdout)["api_key"]
    log = open(tmp / "node.log", "w")  # noqa: SIM115
    node = subprocess.Popen([sys.executable, *(["/tmp/prof_run.py"] if os.environ.get("PROF") else ["-m", "routstr"]), "--port", "0", "--database", db,
                             "--log-level", "WARNING",
                             # one key drives the whole load: per-key rate limits off
                             "--rate-limit-requests", "0", "--rate-limit-concurrent", "0",
                             "--rate-limit-tokens", "0",
                             "--upstream-base-url", f"http://127.0.0.1:{up_port}/v1"],
                            stderr=log, env={**env, "ROUTSTR_BENCH": "1"})
    # --log-level WARNING hides the "listening" line: find the port from /proc instead
    port = 0
    deadline = time.monotonic() + 20
    while not port and time.monotonic() < deadline:
        time.sleep(0.1)
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if f"pid={node.pid}," in line:
                port = int(line.split()[3].rsplit(":", 1)[1])
    try:
        direct_lat = asyncio.run(latency(up_port, "/v1/chat/completions", key, args.requests, CHAT))
        node_lat = asyncio.run(latency(port, "/v1/chat/completions", key, args.requests, CHAT))
        direct_ttfb = asyncio.run(latency(up_port, "/v1/chat/completions", key, args.requests // 2, STREAM, True))
        node_ttfb = asyncio.run(latency(port, "/v1/chat/completions", key, args.requests // 2, STREAM, True))
        direct_tp = asyncio.run(throughput(up_port, "/v1/chat/completions", key, args.concurrency, args.seconds))
        node_tp = asyncio.run(throughput(port, "/v1/chat/completions", key, args.concurrency, args.seconds))
    finally:
        node.terminate()
        node.wait(15)
        up.terminate()
        up.wait(5)
    d50, d99, n50, n99 = pct(direct_lat, .5), pct(direct_lat, .99), pct(node_lat, .5), pct(node_lat, .99)
    t_d, t_n = pct(direct_ttfb, .5), pct(node_ttfb, .5)
    print(f"| measure (paid requests, {os.cpu_count()} cores) | direct upstream | through node | added / ratio |")
    print("|---|---|---|---|")
    print(f"| latency p50, concurrency 1 | {d50:.2f} ms | {n50:.2f} ms | +{n50 - d50:.2f} ms |")
    print(f"| latency p99, concurrency 1 | {d99:.2f} ms | {n99:.2f} ms | +{n99 - d99:.2f} ms |")
    print(f"| throughput, concurrency {args.concurrency} | {direct_tp:.0f} req/s | {node_tp:.0f} req/s | {100 * node_tp / direct_tp:.0f} % |")
    print(f"| streaming time to first byte p50 | {t_d:.2f} ms | {t_n:.2f} ms | +{t_n - t_d:.2f} ms |")
    print(f"\nmedian of means check: {statistics.mean(node_lat) * 1000:.2f} ms mean through node")


if __name__ == "__main__":
    main()
