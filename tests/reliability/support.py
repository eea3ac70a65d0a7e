"""Helpers of the reliability suite: a fault-scripted upstream, a raw HTTP load generator with
client disconnects, and the money audit every scenario ends with.

The audit works from the ledger's own records. Every request carries its own
``X-Request-ID``, which the node uses as its request id, so each `txlog` row of a request can be
told apart: a request reserves at most once, its reservation is consumed exactly once (settle,
release, expiry or orphan release), it is charged at most what it reserved, and a request the
client saw complete was charged exactly what its scenario costs — to the msat.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import resource
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routstr.db import Database
from routstr.ledger import Ledger
from routstr.pricing import actual_cost, load_price_table
from tests.support.node import NodeProcess
from tests.support.upstream import Behaviour, RecordedRequest, ScriptedUpstream

ADMIN = "reliability-admin-token-0123456789"
UPSTREAM_KEY = "upstream-secret-reliability-9876543210"
PRICES = load_price_table(None).at(100_000)
MODELS = ("gpt-4o-mini", "gpt-4o")
#: what one default upstream answer (usage 12 prompt / 5 completion tokens) costs, per model
CHAT_COST = {m: actual_cost(PRICES.get(m), 12, 5).total_msats for m in MODELS}
REQUEST_TIMEOUT_S = 30.0

#: Disable the per-key rate limits (the load is meant to reach the ledger) and make upstream
#: calls that hang fail fast.
NODE_FLAGS = ["--admin-token", ADMIN, "--upstream-api-key", UPSTREAM_KEY,
              "--upstream-read-timeout", "1", "--rate-limit-requests", "0",
              "--rate-limit-tokens", "0", "--rate-limit-concurrent", "0"]


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft fd limit towards `wanted` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# ---- the upstream: each request names its scenario -------------------------------------------
#: scenario -> (upstream behaviour, exact charge when the client read the whole answer:
#: "usage" = the default usage's price, None = not fixed in advance: charged by estimate, at
#: most the reservation)
SCENARIOS: dict[str, tuple[Behaviour, int | str | None]] = {
    "ok": (Behaviour(), "usage"),
    "slow": (Behaviour(delay_s=0.15), "usage"),
    "drip": (Behaviour(event_delay_s=0.03), "usage"),  # streamed slowly: disconnect target
    "e500": (Behaviour(status=500), 0),
    "e429": (Behaviour(status=429), 0),
    "e400": (Behaviour(status=400), 0),
    "hang": (Behaviour(hang=True), 0),  # the node gives up after --upstream-read-timeout
    "cut": (Behaviour(fail_after_events=2), None),  # the upstream connection breaks midway
    "no_usage": (Behaviour(usage="omit"), None),
}
SCENARIO_WEIGHTS = {"ok": 34, "slow": 5, "drip": 14, "e500": 6, "e429": 5, "e400": 3,
                    "hang": 2, "cut": 6, "no_usage": 5}
_SCENARIO = re.compile(r"scenario:(\w+)")


class FaultyUpstream(ScriptedUpstream):
    """ScriptedUpstream whose answer is chosen by the request (``scenario:NAME`` in the last
    message), so concurrent requests get their own scripted fault whatever their order."""

    async def _respond(self, conn: Any, req: RecordedRequest, b: Behaviour, seq: int) -> None:
        try:
            content = str(req.json()["messages"][-1]["content"])
        except (ValueError, KeyError, IndexError, TypeError):
            content = ""
        m = _SCENARIO.search(content)
        if m and m.group(1) in SCENARIOS:
            b = SCENARIOS[m.group(1)][0]
        await super()._respond(conn, req, b, seq)


# ---- node helpers ------------------------------------------------------------------------------
def new_key(node: NodeProcess, msats: int) -> str:
    status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": msats},
                            {"Authorization": f"Bearer {ADMIN}"})
    assert status == 201, doc
    return str(doc["api_key"])


def unhandled_errors(node: NodeProcess) -> list[str]:
    """Log lines of the server's error barrier (each one was a 500 or a dropped response)."""
    return [ln for ln in node.log_text().splitlines() if "unhandled error" in ln]


# ---- the load generator -----------------------------------------------------------------------
@dataclass
class Call:
    rid: str
    key: str
    scenario: str
    stream: bool
    disconnect_after: float | None = None  # close the connection this long after sending
    abort: bool = False  # close with RST instead of FIN
    partial_body: bool = False  # send half the body, then close
    model: str = MODELS[0]

    def expected_msats(self) -> int | None:
        expected = SCENARIOS[self.scenario][1]
        return CHAT_COST[self.model] if expected == "usage" else expected  # type: ignore[return-value]

    def body(self) -> bytes:
        doc: dict[str, Any] = {"model": self.model, "max_tokens": 50,
                               "messages": [{"role": "user", "content": f"scenario:{self.scenario}"}]}
        if self.stream:
            doc["stream"] = True
            doc["stream_options"] = {"include_usage": True}
        return json.dumps(doc).encode()


@dataclass
class Outcome:
    call: Call
    status: int = 0
    completed: bool = False  # the whole response was read
    disconnected: bool = False  # the client hung up on purpose
    error: str = ""
    cost_msats: int | None = None  # what the node told the client it charged
    latency_s: float = 0.0


_COST_EVENT = re.compile(rb'"total_msats"\s*:\s*(\d+)')


def _complete(head: bytes, body: bytes) -> bool:
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if m:
        return len(body) == int(m.group(1))
    if re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
        return body.endswith(b"0\r\n\r\n")
    return True


async def http_call(port: int, call: Call, *, timeout_s: float = REQUEST_TIMEOUT_S,
                    path: str = "/v1/chat/completions") -> Outcome:
    out = Outcome(call)
    body = call.body()
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    except (TimeoutError, OSError) as exc:
        out.error = f"connect: {type(exc).__name__}"
        return out
    try:
        head = (f"POST {path} HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer {call.key}\r\n"
                f"X-Request-ID: {call.rid}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        if call.partial_body:
            writer.write(head + body[: len(body) // 2])
            await writer.drain()
            await asyncio.sleep(random.uniform(0, 0.05))
            out.disconnected = True
            writer.transport.abort()
            return out
        writer.write(head + body)
        await writer.drain()
        limit = timeout_s if call.disconnect_after is None else call.disconnect_after
        try:
            raw = await asyncio.wait_for(reader.read(-1), limit)
        except TimeoutError:
            if call.disconnect_after is None:
                out.error = "timeout"
            out.disconnected = True
            if call.abort:
                writer.transport.abort()
            return out
        head_bytes, _, rest = raw.partition(b"\r\n\r\n")
        if not head_bytes.startswith(b"HTTP/1.1 "):
            out.error = f"no response: {raw[:80]!r}"
            return out
        out.status = int(head_bytes[9:12])
        out.completed = _complete(head_bytes, rest)
        m = re.search(rb"(?im)^x-routstr-cost-msats:\s*(\d+)", head_bytes)
        costs = _COST_EVENT.findall(rest)
        if m:
            out.cost_msats = int(m.group(1))
        elif costs:
            out.cost_msats = int(costs[-1])
        out.latency_s = time.perf_counter() - started
        return out
    except (OSError, asyncio.IncompleteReadError) as exc:
        out.error = f"io: {type(exc).__name__}"
        return out
    finally:
        if not writer.transport.is_closing():
            writer.close()


async def run_calls(port: int, calls: Sequence[Call], concurrency: int,
                    stop: asyncio.Event | None = None) -> list[Outcome]:
    """Run `calls` with `concurrency` clients; a set `stop` ends the run early (calls not yet
    started are dropped)."""
    queue = list(reversed(calls))
    outcomes: list[Outcome] = []

    async def client() -> None:
        while queue and not (stop is not None and stop.is_set()):
            outcomes.append(await http_call(port, queue.pop()))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes


def plan_calls(keys: Sequence[str], n: int, rng: random.Random, *, prefix: str,
               disconnect_share: float = 0.12, partial_share: float = 0.02) -> list[Call]:
    names = list(SCENARIO_WEIGHTS)
    weights = [SCENARIO_WEIGHTS[s] for s in names]
    calls = []
    for i in range(n):
        scenario = rng.choices(names, weights)[0]
        stream = scenario == "drip" or rng.random() < 0.4
        call = Call(f"{prefix}-{i}", rng.choice(keys), scenario, stream,
                    model=rng.choice(MODELS))
        r = rng.random()
        if r < partial_share:
            call.partial_body = True
        elif r < partial_share + disconnect_share:
            call.disconnect_after = rng.uniform(0.0, 0.2)
            call.abort = rng.random() < 0.5
        calls.append(call)
    return calls


# ---- the audit --------------------------------------------------------------------------------
@dataclass
class Audit:
    totals: dict[str, int]
    statuses: Counter[int] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    exact_checked: int = 0
    charged_msats: int = 0


def wait_reservations_gone(database: str | Path, timeout_s: float = 20.0) -> int:
    """Poll until no reservation is held (in-flight requests finish); returns how many are left."""
    db = Database(database)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            left = int(db.read(lambda c: c.execute("SELECT COUNT(*) FROM reservations")
                               .fetchone()[0]))
            if left == 0 or time.monotonic() > deadline:
                return left
            time.sleep(0.1)
    finally:
        db.close()


def audit(database: str | Path, outcomes: Iterable[Outcome], deposits: dict[str, int]) -> Audit:
    """Conservation to the msat; every reservation consumed once; exact charges.

    `deposits`: api key -> what it was funded with (no other money entered those keys)."""
    from routstr.keys import hash_key

    outcomes = list(outcomes)
    assert wait_reservations_gone(database) == 0, "a reservation is still held"
    db = Database(database)
    try:
        ledger = Ledger(db)
        totals = ledger.check_invariant()
        assert totals.get("reserved_msats", 0) == 0, totals
        rows = db.read(lambda c: c.execute(
            "SELECT kind, amount_msats, request_id, memo FROM txlog WHERE request_id IS NOT NULL"
        ).fetchall())
        accounts = {k: ledger.get_account(hash_key(k)) for k in deposits}
    finally:
        db.close()
    by_rid: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
    for kind, amount, rid, memo in rows:
        by_rid[rid].append((kind, int(amount), memo))
    mine = {o.call.rid for o in outcomes}
    strangers = set(by_rid) - mine
    assert not strangers, f"money moved for requests nobody made: {sorted(strangers)[:5]}"
    result = Audit(totals)
    spent_by_key: Counter[str] = Counter()
    for o in outcomes:
        result.statuses[o.status] += 1
        entries = by_rid.get(o.call.rid, [])
        result.kinds.update(k for k, _, _ in entries)
        reserves = [a for k, a, _ in entries if k == "reserve"]
        ends = [k for k, _, _ in entries if k in ("settle", "release", "expire", "orphan")]
        charged = sum(a for k, a, _ in entries if k in ("settle", "charge"))
        assert len(reserves) <= 1, (o, entries)
        assert len(ends) == len(reserves), f"reservation not consumed exactly once: {o} {entries}"
        if not reserves:
            assert charged == 0, (o, entries)
        elif not any("overdraft" in memo for _, _, memo in entries):
            assert charged <= reserves[0], (o, entries)
        expected = o.call.expected_msats()
        if o.completed and not o.disconnected and o.status == 200 and expected is not None:
            assert charged == expected, f"charged {charged}, expected {expected}: {o} {entries}"
            result.exact_checked += 1
        if o.completed and not o.disconnected and expected == 0 and reserves:
            assert charged == 0, (o, entries)
        if o.completed and o.cost_msats is not None and o.status == 200:
            assert o.cost_msats == charged, f"told the client {o.cost_msats}, charged {charged}"
        spent_by_key[o.call.key] += charged
        result.charged_msats += charged
    for key, deposit in deposits.items():
        acct = accounts[key]
        assert acct is not None
        assert acct.reserved_msats == 0, (key[:8], acct)
        assert acct.spent_msats == spent_by_key[key], (acct.spent_msats, spent_by_key[key])
        assert acct.balance_msats == deposit - spent_by_key[key], (acct, deposit)
    return result


# ---- a TCP proxy that loses one answer ---------------------------------------------------------
class DroppingProxy:
    """A TCP proxy on 127.0.0.1 to `target_port`. After `drop_next(prefix)`, the next request
    whose first bytes start with `prefix` reaches the server, but its answer is swallowed and
    the client's connection closed: the client cannot tell whether it was executed."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target_port = target_port
        self._prefix: bytes | None = None
        self._lock = threading.Lock()
        self.dropped = 0
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_next(self, prefix: bytes) -> None:
        with self._lock:
            self._prefix = prefix

    def close(self) -> None:
        self._closed = True
        self._srv.close()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), 5)
            except OSError:
                client.close()
                continue
            state = {"drop": False}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, client: Any, server: Any, state: dict[str, bool]) -> None:
        try:
            while data := client.recv(65536):
                with self._lock:
                    if self._prefix is not None and data.startswith(self._prefix):
                        self._prefix = None
                        state["drop"] = True
                server.sendall(data)
        except OSError:
            pass
        finally:
            server.close()

    def _down(self, server: Any, client: Any, state: dict[str, bool]) -> None:
        try:
            while data := server.recv(65536):
                if state["drop"]:
                    with self._lock:
                        self.dropped += 1
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            server.close()
