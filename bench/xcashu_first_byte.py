"""First-byte cost of an X-Cashu stream: one tree against another, interleaved.

    MINT_VENV=.cache/mint-venv python bench/xcashu_first_byte.py \
        --tree A=/path/to/old/checkout --tree B=. [--rounds 40] [--sats 200] [--max-tokens 3000]

For each tree a node (`python -m routstr` from that tree) runs on 127.0.0.1 against one real
Nutshell mint (tests/mint) and one scripted upstream (tests/support/upstream.py). Each round
pays one streamed chat completion per tree, in alternating order, with a fresh token of `--sats`
(minted before the clock starts), and records the time from sending the request to the end of
the response head (the first byte a client can act on: the head is where the X-Cashu change
beyond the worst case now travels) and to the end of the stream. Prints median and p90 per tree
and whether its head carried change.

The X-Cashu redemption is a swap at the mint, so the figures include the mint's own time; they
are comparable only within one run (same mint, same machine load, interleaved).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.mint import MintProcess  # noqa: E402
from tests.support.minter import Minter  # noqa: E402
from tests.support.node import NodeProcess  # noqa: E402
from tests.support.upstream import ScriptedUpstream  # noqa: E402


def one(node: NodeProcess, token: str, max_tokens: int) -> tuple[float, float, bool]:
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "Hello!"}]})
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body,
                 {"Content-Type": "application/json", "X-Cashu": token})
    resp = conn.getresponse()
    head = time.perf_counter() - t0
    resp.read()
    total = time.perf_counter() - t0
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}")
    return head, total, bool(resp.getheader("x-cashu"))


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH (repeatable)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--sats", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=3000)
    args = ap.parse_args()
    trees = [t.split("=", 1) for t in args.tree]
    work = Path(tempfile.mkdtemp(prefix="xcashu-bench-"))
    mint = MintProcess.fresh(0).start()
    (work / "minter").mkdir()
    minter = Minter(work / "minter")
    nodes: dict[str, NodeProcess] = {}
    try:
        with ScriptedUpstream() as up:
            for name, path in trees:
                d = work / name
                d.mkdir()
                # the rate through the environment: a tree from before issue 18 has no flag
                n = NodeProcess(d, ["--upstream-base-url", up.url, "--cashu-mints", mint.url],
                                env={"BTC_USD": "100000"})
                nodes[name] = _start(n, Path(path).resolve())
            results: dict[str, list[tuple[float, float, bool]]] = {n: [] for n in nodes}
            names = list(nodes)
            for name in names:  # warm-up: keysets fetched, code paths imported
                one(nodes[name], minter.token(mint.url, args.sats), args.max_tokens)
            for r in range(args.rounds):
                order = names if r % 2 == 0 else names[::-1]
                tokens = {name: minter.token(mint.url, args.sats) for name in order}
                for name in order:
                    results[name].append(one(nodes[name], tokens[name], args.max_tokens))
        print(f"X-Cashu stream, {args.sats}-sat token, max_tokens {args.max_tokens},"
              f" {args.rounds} interleaved rounds")
        print("| tree | head median ms | head p90 ms | stream median ms | change in head |")
        print("|---|---|---|---|---|")
        for name in names:
            heads = [h for h, _, _ in results[name]]
            totals = [t for _, t, _ in results[name]]
            print(f"| {name} | {statistics.median(heads) * 1000:.1f} |"
                  f" {pct(heads, 0.9) * 1000:.1f} | {statistics.median(totals) * 1000:.1f} |"
                  f" {all(c for _, _, c in results[name])} |")
    finally:
        for n in nodes.values():
            n.stop()
        minter.close()
        mint.stop()


def _start(node: NodeProcess, root: Path) -> NodeProcess:
    """`NodeProcess.start`, with `root` (the tree under test) first on PYTHONPATH."""
    import tests.support.node as node_mod

    saved = node_mod.ROOT
    node_mod.ROOT = root
    try:
        return node.start()
    finally:
        node_mod.ROOT = saved


if __name__ == "__main__":
    main()
