"""A LUD-16 Lightning-address service on loopback; invoices come from a test mint's quote."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.request
from typing import Any
from urllib.parse import parse_qs, urlsplit


class LnurlService:
    """LUD-16 on loopback: invoices come from a mint quote of the second test mint."""

    def __init__(self, mint: str, min_msat: int = 1000, max_msat: int = 1_000_000) -> None:
        service = self
        self.mint = mint
        self.lie = False

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                url = urlsplit(self.path)
                if url.path == "/.well-known/lnurlp/alice":
                    doc: dict[str, Any] = {
                        "tag": "payRequest", "callback": f"{service.base}/cb?x=1",
                        "minSendable": min_msat, "maxSendable": max_msat,
                        "metadata": json.dumps([["text/plain", "alice"]]),
                    }
                elif url.path == "/cb":
                    msat = int(parse_qs(url.query)["amount"][0])
                    sats = msat // 1000 + (1 if service.lie else 0)
                    doc = {"pr": service.invoice(sats), "routes": []}
                else:
                    doc = {"status": "ERROR", "reason": "no such user"}
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.address = f"alice@127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def invoice(self, sats: int) -> str:
        req = urllib.request.Request(
            f"{self.mint}/v1/mint/quote/bolt11", method="POST",
            data=json.dumps({"amount": sats, "unit": "sat"}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
            return str(json.loads(r.read())["request"])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
