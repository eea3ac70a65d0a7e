"""Webhooks through the real node: registration and the SSRF guard, balance.low delivered with
a valid signature across a restart (durable outbox, retries), key.expired."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from routstr.pricing import actual_cost, load_price_table
from tests.support.node import NodeProcess
from tests.support.upstream import ScriptedUpstream

ADMIN = "adm-webhook-test"
DEPOSIT = 10_000_000
CHAT_COST = actual_cost(load_price_table(None).at(100_000).get("gpt-4o-mini"), 12, 5).total_msats
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
SECRET = "whsec_test_secret_0123456789"


class Receiver:
    """A webhook endpoint on 127.0.0.1: records every POST, answers `status`."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                outer.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(outer.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 8.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out; received {self.received}"
            time.sleep(0.02)


def new_key(node: NodeProcess, **extra: Any) -> str:
    status, doc = node.json("POST", "/admin/api/keys", {"balance_msats": DEPOSIT, **extra},
                            {"Authorization": f"Bearer {ADMIN}"})
    assert status == 201, doc
    return str(doc["api_key"])


def hook(node: NodeProcess, key: str, body: dict[str, Any]) -> tuple[int, Any]:
    return node.json("POST", "/v1/webhooks", body, {"Authorization": f"Bearer {key}"})


def test_registration_list_delete_and_ssrf_guard(node_factory: Any) -> None:
    node = node_factory("--admin-token", ADMIN)
    key = new_key(node)
    for url, code in [
        ("http://127.0.0.1:9/hook", "webhook_url_forbidden"),
        ("http://localhost/hook", "webhook_url_forbidden"),
        ("http://10.1.2.3/hook", "webhook_url_forbidden"),
        ("http://192.168.0.10/hook", "webhook_url_forbidden"),
        ("http://169.254.169.254/latest/meta-data", "webhook_url_forbidden"),
        ("http://[::1]:8080/hook", "webhook_url_forbidden"),
        ("http://[::ffff:127.0.0.1]/hook", "webhook_url_forbidden"),
        ("http://0.0.0.0/hook", "webhook_url_forbidden"),
        ("ftp://93.184.216.34/hook", "invalid_webhook_url"),
        ("https://user:pw@93.184.216.34/hook", "invalid_webhook_url"),
    ]:
        status, doc = hook(node, key, {"url": url, "events": ["balance.low"]})
        assert (status, doc["error"]["code"]) == (400, code), url
    status, doc = hook(node, key, {"url": "https://93.184.216.34/hook", "events": ["nope"]})
    assert status == 400 and doc["error"]["code"] == "invalid_webhook_events"
    status, doc = hook(node, key, {"url": "https://93.184.216.34/hook",
                                   "events": ["balance.low"], "secret": "short"})
    assert status == 400 and doc["error"]["code"] == "invalid_webhook_secret"
    # A public address is accepted; the secret is shown once, generated when not given.
    status, created = hook(node, key, {"url": "https://93.184.216.34/hook",
                                       "events": ["balance.low", "key.expired"]})
    assert status == 201 and created["secret"].startswith("whsec_")
    assert created["id"].startswith("wh_") and created["events"] == ["balance.low", "key.expired"]
    status, listing = node.json("GET", "/v1/webhooks?fields=id,secret",
                                headers={"Authorization": f"Bearer {key}"})
    assert status == 200 and listing["total"] == 1 and listing["has_more"] is False
    assert listing["data"] == [{"id": created["id"],
                                "secret": created["secret"][:6] + "…" + created["secret"][-4:]}]
    other = new_key(node)
    status, theirs = node.json("GET", "/v1/webhooks", headers={"Authorization": f"Bearer {other}"})
    assert status == 200 and theirs["data"] == []
    status, _ = node.json("DELETE", f"/v1/webhooks/{created['id']}",
                          headers={"Authorization": f"Bearer {other}"})
    assert status == 404  # not theirs
    status, _, _ = node.request("DELETE", f"/v1/webhooks/{created['id']}",
                                headers={"Authorization": f"Bearer {key}"})
    assert status == 204
    status, _ = node.json("DELETE", f"/v1/webhooks/{created['id']}",
                          headers={"Authorization": f"Bearer {key}"})
    assert status == 404
    status, doc = node.json("GET", "/v1/webhooks")
    assert status == 401


def test_balance_low_delivered_signed_after_a_restart(upstream: ScriptedUpstream,
                                                      tmp_path: Path) -> None:
    args = ["--upstream-base-url", upstream.url, "--admin-token", ADMIN,
            "--webhooks-allow-private", "--webhook-retry-base", "0.2",
            "--webhook-scan-interval", "0.5"]
    with Receiver() as receiver:
        receiver.status = 500  # the receiver is down at first: deliveries are retried
        node = NodeProcess(tmp_path, args).start()
        try:
            key = new_key(node)
            status, created = hook(node, key, {
                "url": receiver.url, "events": ["balance.low"], "secret": SECRET,
                "balance_threshold_msats": DEPOSIT - CHAT_COST // 2})
            assert status == 201
            status, _, _ = node.request("POST", "/v1/chat/completions", CHAT,
                                        {"Authorization": f"Bearer {key}"})
            assert status == 200  # the settlement takes the balance under the threshold
            receiver.wait_for(lambda: len(receiver.received) >= 1)
        finally:
            assert node.stop() == 0
        failed_attempts = len(receiver.received)
        receiver.status = 200
        node = NodeProcess(tmp_path, args).start()  # same database: the outbox survived
        try:
            receiver.wait_for(lambda: len(receiver.received) > failed_attempts)
            headers, body = receiver.received[-1]
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["x-webhook-signature"], expected)
            event = json.loads(body)
            assert event["type"] == "balance.low" and headers["x-webhook-event"] == "balance.low"
            assert event["data"]["balance_msats"] == DEPOSIT - CHAT_COST
            assert event["data"]["threshold_msats"] == DEPOSIT - CHAT_COST // 2
            assert event["data"]["webhook_id"] == created["id"]
            assert key not in body.decode()  # never the key itself
            ids = {h["x-webhook-id"] for h, _ in receiver.received}
            assert ids == {event["id"]}  # every attempt carried the same event
            attempts = [int(h["x-webhook-attempt"]) for h, _ in receiver.received]
            assert attempts == list(range(1, len(attempts) + 1))
            # Still below the threshold: a second settlement does not fire again.
            node.request("POST", "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {key}"})
            time.sleep(1.0)
            assert len(receiver.received) == failed_attempts + 1
        finally:
            node.stop()


def test_key_expired_fires_once(node_factory: Any) -> None:
    with Receiver() as receiver:
        node = node_factory("--admin-token", ADMIN, "--webhooks-allow-private",
                            "--webhook-scan-interval", "0.3")
        key = new_key(node, validity_date=int(time.time()) + 2)
        status, _ = hook(node, key, {"url": receiver.url, "events": ["key.expired"],
                                     "secret": SECRET})
        assert status == 201
        time.sleep(0.5)
        assert receiver.received == []  # not yet expired
        receiver.wait_for(lambda: len(receiver.received) == 1)
        headers, body = receiver.received[0]
        event = json.loads(body)
        assert event["type"] == "key.expired" and event["data"]["validity_date"] <= time.time()
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["x-webhook-signature"] == expected
        time.sleep(0.8)
        assert len(receiver.received) == 1


def test_through_a_proxy_names_are_not_resolved_locally(node_factory: Any) -> None:
    # Deliveries go through the SOCKS5 proxy (Tor), which resolves names itself: no local DNS
    # lookup (it would leak), but address literals and localhost are still refused.
    node = node_factory("--admin-token", ADMIN, "--upstream-proxy", "socks5h://127.0.0.1:9")
    key = new_key(node)
    status, doc = hook(node, key, {"url": "http://hidden-service-name.onion/hook",
                                   "events": ["balance.low"]})
    assert status == 201, doc
    for url in ("http://127.0.0.1/hook", "http://localhost:8080/hook", "http://[fe80::1]/"):
        status, doc = hook(node, key, {"url": url, "events": ["balance.low"]})
        assert (status, doc["error"]["code"]) == (400, "webhook_url_forbidden"), url
    status, doc = hook(node, key, {"url": "http://unresolvable-name.invalid/hook",
                                   "events": ["balance.low"]})
    assert status == 201
