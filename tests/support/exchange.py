"""Scripted BTC/USD exchange APIs on 127.0.0.1, for the node's price feed (issue 18).

One server answers the three formats the node knows, each at its own path, with a rate the test
sets (and may change at any time), or a status, a delay, or a malformed body::

    with Exchange() as ex:
        ex.set("coinbase", rate="101000.5")
        node args: --price-feeds coinbase=<ex.url("coinbase")>,kraken=<ex.url("kraken")>
        assert ex.hits["coinbase"] >= 1
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def answer(name: str, rate: str) -> Any:
    """`rate` in the answer format of exchange `name`."""
    if name == "coinbase":
        return {"data": {"amount": rate, "base": "BTC", "currency": "USD"}}
    if name == "kraken":
        return {"error": [], "result": {"XXBTZUSD": {"a": [rate, "1", "1.0"],
                                                     "c": [rate, "0.01"]}}}
    if name == "bitstamp":
        return {"last": rate, "bid": rate, "ask": rate}
    raise ValueError(name)


@dataclass
class Script:
    rate: str = "100000"
    status: int = 200
    delay_s: float = 0.0
    body: bytes | None = None  # instead of the answer


class Exchange:
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {n: Script() for n in ("coinbase", "kraken", "bitstamp")}
        self.hits: dict[str, int] = {n: 0 for n in self.scripts}
        self._server: ThreadingHTTPServer | None = None

    def set(self, name: str, **changes: Any) -> None:
        s = self.scripts[name]
        for k, v in changes.items():
            setattr(s, k, v)

    def url(self, name: str, host: str = "127.0.0.1") -> str:
        assert self._server is not None
        return f"http://{host}:{self.port}/{name}"

    def feeds(self, *names: str) -> str:
        """The node's `--price-feeds` value for these sources, here."""
        return ",".join(f"{n}={self.url(n)}" for n in names)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def __enter__(self) -> Exchange:
        ex = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                name = self.path.strip("/").split("?")[0]
                script = ex.scripts.get(name)
                if script is None:
                    self.send_error(404)
                    return
                ex.hits[name] += 1
                if script.delay_s:
                    time.sleep(script.delay_s)
                body = script.body if script.body is not None \
                    else json.dumps(answer(name, script.rate)).encode()
                try:
                    self.send_response(script.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the node gave up waiting

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
