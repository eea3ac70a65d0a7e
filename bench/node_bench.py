"""Node benchmark: throughput with `--workers N`, streaming, and memory.

    python bench/node_bench.py [--workers 1,2] [--seconds 5] [--concurrency 64] [--clients 2]

Starts, all on 127.0.0.1, the fast fake upstream of `proxy_bench.py` (one asyncio process per
core, sharing one port with SO_REUSEPORT, so it is never the bottleneck) and the node
(`python -m routstr --workers N`, fresh sqlite file, one prepaid key), and drives paid requests
(auth + reserve + forward + settle) with raw keep-alive HTTP/1.1 clients spread over
`--clients` processes. For each worker count it measures:

* throughput of plain chat completions at `--concurrency` (requests/s, and the ratio to one
  worker);
* throughput of streamed chat completions (5 content events + usage, requests/s) and of long
  streams (200 events each: relayed events/s);
* RSS: idle after warm-up, and with 500 extra idle keep-alive connections open (summed over
  the worker processes; the supervisor is counted too).

Prints a Markdown table (the one quoted in README's Performance section). The load generator
and the fake upstream share the machine with the node: on a machine with few cores they take
a good part of it, so the figures are a floor for the node itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

UPSTREAM = r'''
import asyncio, json, os, socket, sys
def chunk(d): return b"data: " + json.dumps(d).encode() + b"\n\n"
def events(n):
    words = ["Hello", " from", " up", "stream", "!"]
    body = b"".join(chunk({"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
                           "choices": [{"index": 0, "delta": {"content": words[i % 5]}}]})
                    for i in range(n))
    return body + chunk({"id": "c", "object": "chat.completion.chunk", "choices": [],
                         "usage": {"prompt_tokens": 12, "completion_tokens": n,
                                   "total_tokens": 12 + n}}) + b"data: [DONE]\n\n"
BODY = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
    "model": "gpt-4o-mini", "choices": [{"index": 0, "message": {"role": "assistant",
    "content": "Hello from upstream!"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}).encode()
SHORT, LONG = events(5), events(200)
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
                ev = LONG if b'"max_tokens": 200' in body else SHORT
                self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n"
                             + b"%x\r\n" % len(ev) + ev + b"\r\n0\r\n\r\n")
            else:
                self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n" % len(BODY) + BODY)
async def main(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port)); s.listen(1024)
    srv = await asyncio.get_running_loop().create_server(P, sock=s)
    print(s.getsockname()[1], flush=True)
    await srv.serve_forever()
asyncio.run(main(int(sys.argv[1])))
'''

CHAT = json.dumps({"model": "gpt-4o-mini", "max_tokens": 50,
                   "messages": [{"role": "user", "content": "Hello!"}]}).encode()
STREAM = json.dumps({"model": "gpt-4o-mini", "max_tokens": 50, "stream": True,
                     "stream_options": {"include_usage": True},
                     "messages": [{"role": "user", "content": "Hello!"}]}).encode()
LONG_STREAM = json.dumps({"model": "gpt-4o-mini", "max_tokens": 200, "stream": True,
                          "messages": [{"role": "user", "content": "Hello!"}]}).encode()
BODIES = {"chat": CHAT, "stream": STREAM, "long": LONG_STREAM}


class Client:
    """One raw keep-alive HTTP/1.1 connection (Content-Length or chunked responses)."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> None:
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)

    async def call(self, body: bytes, key: str) -> None:
        self.w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer "
                     b"%s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (key.encode(), len(body), body))
        head = await self.r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:300]
        m = re.search(rb"(?i)content-length: *(\d+)", head)
        if m:
            await self.r.readexactly(int(m.group(1)))
            return
        while True:
            size = int((await self.r.readuntil(b"\r\n")).strip(), 16)
            await self.r.readexactly(size + 2)
            if size == 0:
                return


def _client_proc(port: int, key: str, kind: str, conc: int, seconds: float, out: object) -> None:
    async def run() -> int:
        clients = [Client(port) for _ in range(conc)]
        await asyncio.gather(*(c.open() for c in clients))
        done = 0
        stop = time.perf_counter() + seconds

        async def worker(c: Client) -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await c.call(BODIES[kind], key)
                done += 1

        await asyncio.gather(*(worker(c) for c in clients))
        return done

    out.put(asyncio.run(run()))  # type: ignore[attr-defined]


def throughput(port: int, key: str, kind: str, conc: int, seconds: float, procs: int) -> float:
    q: multiprocessing.Queue[int] = multiprocessing.Queue()
    ps = [multiprocessing.Process(target=_client_proc,
                                  args=(port, key, kind, max(1, conc // procs), seconds, q))
          for _ in range(procs)]
    t0 = time.perf_counter()
    for p in ps:
        p.start()
    total = sum(q.get(timeout=seconds + 60) for _ in ps)
    for p in ps:
        p.join(30)
    return total / (time.perf_counter() - t0)


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds used so far by `pids`."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        kids = []
    return [pid] + [p for k in kids for p in tree(int(k))]


async def hold_idle(port: int, n: int, key: str, hold_s: float, pids: list[int]) -> int:
    """Open `n` keep-alive connections (one request each), measure RSS while they idle."""
    conns = []
    for _ in range(n):
        c = Client(port)
        await c.open()
        conns.append(c)
    await asyncio.gather(*(c.call(CHAT, key) for c in conns))
    await asyncio.sleep(hold_s)
    rss = rss_kib(pids)
    for c in conns:
        c.w.close()
    return rss


def listeners(port: int) -> int:
    try:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=5).stdout
    except FileNotFoundError:
        return -1
    return len(out.splitlines())


def start_node(db: str, up_port: int, workers: int, tmp: Path) -> tuple[subprocess.Popen, int]:
    """The node on a free port, logging warnings only (an access-log line per request would
    be measured too); ready once every worker listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(tmp / f"node-{workers}.log", "w")  # noqa: SIM115
    node = subprocess.Popen([sys.executable, "-m", "routstr", "--port", str(port),
                             "--database", db, "--workers", str(workers), "--log-level",
                             "WARNING", "--rate-limit-requests", "0", "--rate-limit-tokens",
                             "0", "--rate-limit-concurrent", "0", "--btc-usd", "100000",
                             "--upstream-base-url", f"http://127.0.0.1:{up_port}/v1"],
                            stderr=log, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        n = listeners(port)
        if n >= workers or (n < 0 and time.monotonic() > deadline - 27):
            return node, port
        if node.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError((tmp / f"node-{workers}.log").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default=f"1,{os.cpu_count() or 1}")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--clients", type=int, default=max(1, (os.cpu_count() or 1) // 2))
    ap.add_argument("--idle-connections", type=int, default=500)
    args = ap.parse_args()
    counts = sorted({int(w) for w in args.workers.split(",")})
    tmp = Path(tempfile.mkdtemp(prefix="routstr-nodebench-"))
    cores = os.cpu_count() or 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        up_port = s.getsockname()[1]
    ups = [subprocess.Popen([sys.executable, "-c", UPSTREAM, str(up_port)],
                            stdout=subprocess.PIPE, text=True) for _ in range(cores)]
    for u in ups:
        u.stdout.readline()  # type: ignore[union-attr]
    rows = []
    try:
        for w in counts:
            db = str(tmp / f"bench-{w}.sqlite3")
            out = subprocess.run([sys.executable, "-m", "routstr", "keys", "create",
                                  "--balance-msats", str(10**13), "--database", db],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            key = json.loads(out.stdout)["api_key"]
            node, port = start_node(db, up_port, w, tmp)
            try:
                throughput(port, key, "chat", 8, 1.0, 1)  # warm-up
                pids = tree(node.pid)
                idle = rss_kib(pids)
                cpu0, t0 = cpu_s(pids), time.perf_counter()
                chat = throughput(port, key, "chat", args.concurrency, args.seconds, args.clients)
                node_cores = (cpu_s(pids) - cpu0) / (time.perf_counter() - t0)
                stream = throughput(port, key, "stream", args.concurrency, args.seconds,
                                    args.clients)
                long_ = throughput(port, key, "long", args.concurrency, args.seconds, args.clients)
                held = asyncio.run(hold_idle(port, args.idle_connections, key, 1.0, pids))
            finally:
                node.terminate()
                node.wait(30)
            rows.append((w, chat, node_cores, stream, long_ * 200, idle, held))
            print(f"workers {w}: chat {chat:.0f}/s using {node_cores:.2f} cores, stream "
                  f"{stream:.0f}/s, long stream {long_ * 200:.0f} events/s, RSS idle "
                  f"{idle / 1024:.1f} MiB, with {args.idle_connections} connections "
                  f"{held / 1024:.1f} MiB", file=sys.stderr)
    finally:
        for u in ups:
            u.terminate()
            u.wait(5)
    base = rows[0][1]
    per_core = rows[0][1] / rows[0][2]
    print(f"| workers ({cores} cores) | chat req/s (× 1 worker) | node CPU used | chat req/s per"
          f" node core | streamed req/s | long-stream events/s | RSS idle | RSS + "
          f"{args.idle_connections} idle connections |")
    print("|---|---|---|---|---|---|---|---|")
    for w, chat, used, stream, events, idle, held in rows:
        print(f"| {w} | {chat:.0f} (× {chat / base:.2f}) | {used:.2f} cores | {chat / used:.0f} "
              f"({100 * chat / used / per_core:.0f} %) | {stream:.0f} | {events:.0f} | "
              f"{idle / 1024:.1f} MiB | {held / 1024:.1f} MiB |")
    print(f"\nconcurrency {args.concurrency}, {args.seconds:g} s per figure, "
          f"{args.clients} client process(es); command: python bench/node_bench.py "
          f"--workers {args.workers} --seconds {args.seconds:g}")


if __name__ == "__main__":
    main()
