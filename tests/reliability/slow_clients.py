"""Slow (slowloris) clients in a process of their own, so that their event loop does not delay
the normal clients the test measures:

    python -m tests.reliability.slow_clients PORT N

Opens N connections to 127.0.0.1:PORT — a third silent, a third trickling request headers, a
third trickling a request body, one byte per `TRICKLE_S` — prints ``open`` once all are open,
keeps trickling until a line arrives on stdin, then prints one JSON list: per connection
``[kind, seconds after opening when the node closed it or null, first bytes of its answer]``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

TRICKLE_S = 0.5
KINDS = ("silent", "headers", "body")


async def one(port: int, kind: str, opened: list[float], all_open: asyncio.Event, n: int,
              stop: asyncio.Event) -> list[object]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened.append(time.monotonic())
    if len(opened) == n:
        all_open.set()
    if kind == "headers":
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: n\r\n")
    elif kind == "body":
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: n\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
    read = asyncio.ensure_future(reader.read(65536))
    stopped = asyncio.ensure_future(stop.wait())
    closed_at, answer = None, b""
    try:
        while True:
            done, _ = await asyncio.wait({read, stopped}, timeout=TRICKLE_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if read in done:  # the node answered or closed
                answer, closed_at = read.result(), time.monotonic()
                break
            if stopped in done:
                break
            if kind != "silent":
                writer.write(b"x")
                await writer.drain()
    except (ConnectionError, OSError):
        closed_at = time.monotonic()
    finally:
        read.cancel()
        stopped.cancel()
        writer.transport.abort()
    return [kind, None if closed_at is None else closed_at - opened[0], answer[:16].decode("latin-1")]


async def main(port: int, n: int) -> None:
    opened: list[float] = []
    all_open, stop = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.ensure_future(one(port, KINDS[i % 3], opened, all_open, n, stop))
             for i in range(n)]
    await asyncio.wait_for(all_open.wait(), 30)
    print("open", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    stop.set()
    print(json.dumps(await asyncio.gather(*tasks)), flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
