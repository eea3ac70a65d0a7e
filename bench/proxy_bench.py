"""Proxy overhead benchmark: the same load straight at a fake upstream and through the node.

    python bench/proxy_bench.py [--requests 2000] [--seconds 5] [--concurrency 64] [--rounds 5]

Starts (as separate processes, all on 127.0.0.1) a minimal asyncio fake upstream, the node
(`python -m routstr`, fresh sqlite file, a prepaid key) and, as a reference, a *floor relay*:
the least an h11 + anyio relay can do (parse the request, forward it on a kept-alive upstream
connection, relay the answer — no auth, no billing, no headers touched). Then it measures with
raw keep-alive HTTP/1.1 clients, for paid requests (auth + reserve + forward + settle):

* latency at concurrency 1: p50 / p99, direct vs through the node (the difference is the
  node's added latency);
* throughput at concurrency N: requests/s, and the node's share of the direct figure;
* streaming time to first byte (first SSE event), p50, direct vs through the node.

Each measure alternates short rounds over direct / node / floor (`--rounds`), so a slow
moment of a shared machine lands on all of them alike; latencies pool the rounds' samples,
throughput takes the median round. Prints a Markdown table (the one quoted in README's
Performance section).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from node_bench import start_node  # noqa: E402

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


FLOOR = r'''
import sys, anyio, anyio.abc, h11
UP = int(sys.argv[1])
async def relay(client: anyio.abc.SocketStream) -> None:
    up = await anyio.connect_tcp("127.0.0.1", UP)
    cs, us = h11.Connection(h11.SERVER), h11.Connection(h11.CLIENT)
    async def next_event(conn, stream):
        while (event := conn.next_event()) is h11.NEED_DATA:
            try:
                conn.receive_data(await stream.receive())
            except anyio.EndOfStream:
                conn.receive_data(b"")
        return event
    async with client, up:
        while True:
            request = await next_event(cs, client)
            if not isinstance(request, h11.Request):
                return
            body = b""
            while not isinstance(event := await next_event(cs, client), h11.EndOfMessage):
                body += event.data
            out = us.send(request) + us.send(h11.Data(data=body)) + us.send(h11.EndOfMessage())
            await up.send(out)
            response = await next_event(us, up)
            head = h11.Response(status_code=response.status_code, headers=response.headers)
            await client.send(cs.send(head))
            while not isinstance(event := await next_event(us, up), h11.EndOfMessage):
                await client.send(cs.send(h11.Data(data=event.data)))
            await client.send(cs.send(h11.EndOfMessage()))
            us.start_next_cycle()
            cs.start_next_cycle()
async def main() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    print(listener.extra(anyio.abc.SocketAttribute.local_address)[1], flush=True)
    await listener.serve(relay)
anyio.run(main)
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


def start_port(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A helper process that prints its port on its first line."""
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="routstr-bench-"))
    up = start_port([sys.executable, "-c", UPSTREAM])
    up_port = int(up.stdout.readline())  # type: ignore[union-attr]
    floor = start_port([sys.executable, "-c", FLOOR, str(up_port)])
    floor_port = int(floor.stdout.readline())  # type: ignore[union-attr]
    db = str(tmp / "bench.sqlite3")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "routstr", "keys", "create", "--balance-msats",
                          str(10**13), "--database", db], capture_output=True, text=True,
                         env=env, check=True)
    key = json.loads(out.stdout)["api_key"]
    # the node as node_bench.py starts it: warnings only, per-key rate limits off (one key
    # drives the whole load), ready once it listens
    node, node_port = start_node(db, up_port, 1, tmp)
    targets = {"direct": up_port, "node": node_port, "floor": floor_port}
    lat: dict[str, list[float]] = {t: [] for t in targets}
    ttfb: dict[str, list[float]] = {t: [] for t in targets}
    tput: dict[str, list[float]] = {t: [] for t in targets}
    path = "/v1/chat/completions"
    rounds = max(1, args.rounds)
    try:
        for _ in range(rounds):  # alternate, so a slow moment lands on every target alike
            for name, port in targets.items():
                lat[name] += asyncio.run(latency(port, path, key, args.requests // rounds, CHAT))
                ttfb[name] += asyncio.run(latency(port, path, key, args.requests // 2 // rounds,
                                                  STREAM, True))
                tput[name].append(asyncio.run(throughput(port, path, key, args.concurrency,
                                                         args.seconds / rounds)))
    finally:
        node.terminate()
        node.wait(15)
        for proc in (up, floor):
            proc.terminate()
            proc.wait(5)
    d50, d99, n50, n99 = (pct(lat["direct"], .5), pct(lat["direct"], .99), pct(lat["node"], .5),
                          pct(lat["node"], .99))
    f50, f99 = pct(lat["floor"], .5), pct(lat["floor"], .99)
    t_d, t_n, t_f = (pct(ttfb[t], .5) for t in ("direct", "node", "floor"))
    tp = {t: statistics.median(xs) for t, xs in tput.items()}
    print(f"| measure (paid requests, {os.cpu_count()} cores) | direct upstream | through node "
          "| added / ratio | floor relay (h11 + anyio, no billing): added / ratio |")
    print("|---|---|---|---|---|")
    print(f"| latency p50, concurrency 1 | {d50:.2f} ms | {n50:.2f} ms | +{n50 - d50:.2f} ms "
          f"| +{f50 - d50:.2f} ms |")
    print(f"| latency p99, concurrency 1 | {d99:.2f} ms | {n99:.2f} ms | +{n99 - d99:.2f} ms "
          f"| +{f99 - d99:.2f} ms |")
    print(f"| throughput, concurrency {args.concurrency} | {tp['direct']:.0f} req/s "
          f"| {tp['node']:.0f} req/s | {100 * tp['node'] / tp['direct']:.1f} % "
          f"| {tp['floor']:.0f} req/s = {100 * tp['floor'] / tp['direct']:.1f} % |")
    print(f"| streaming time to first byte p50 | {t_d:.2f} ms | {t_n:.2f} ms "
          f"| +{t_n - t_d:.2f} ms | +{t_f - t_d:.2f} ms |")
    print(f"\nnode mean latency {statistics.mean(lat['node']) * 1000:.2f} ms over "
          f"{len(lat['node'])} requests; {rounds} alternating rounds")


if __name__ == "__main__":
    main()
