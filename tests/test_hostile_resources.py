"""Issue 16, resources: hostile clients against the real node (subprocess, real sockets).

* 10a — garbage credentials with fresh ``Idempotency-Key``s never grow the database; a real
  key's answers are replayed and bounded per owner.
* 11 — failed admin-token checks are limited, the right token never is (``/metrics`` too).
* 15 — the generated admin token is never written to the log, only to a 0600 file.
* 16 — a slow durable commit (fsync) does not stall the event loop.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

ADMIN = "adm-hostile-resources-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def is_error(doc: Any, status: int, code: str) -> bool:
    """The spec's error shape: {"error": {"type", "code", "message", ...}}."""
    err = doc.get("error") if isinstance(doc, dict) else None
    return (isinstance(err, dict) and err.get("code") == code
            and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)
            and status in (401, 429))


# --------------------------------------------------------------------------------------------
# 15: the generated admin token goes to a 0600 file next to the database, never to the log
# --------------------------------------------------------------------------------------------


def test_generated_admin_token_is_in_a_private_file_not_in_the_log(
        node_factory: Any, tmp_path: Path) -> None:
    node = node_factory()
    token_file = Path(node.database + ".admin-token")
    assert token_file.exists(), node.log_text()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert re.fullmatch(r"adm-[A-Za-z0-9_\-]{20,}", token), token
    log_text = node.log_text()
    assert token not in log_text
    assert not re.search(r"\badm-[A-Za-z0-9_\-]{16,}", log_text), log_text
    assert str(token_file) in log_text  # the operator is told where to look
    status, _ = node.json("GET", "/admin/api/health", None,
                          {"Authorization": f"Bearer {token}"})
    assert status == 200
    status, doc = node.json("POST", "/admin/login", {"token": token})
    assert status == 200 and doc["ok"] is True
    node.stop()
    # A restart neither generates a new token nor rewrites the file; the token keeps working.
    again = node_factory(workdir=tmp_path)
    assert token_file.read_text().strip() == token
    assert token not in again.log_text()
    status, _ = again.json("GET", "/admin/api/health", None,
                           {"Authorization": f"Bearer {token}"})
    assert status == 200


# --------------------------------------------------------------------------------------------
# 11: wrong admin tokens are limited; the right one always gets in
# --------------------------------------------------------------------------------------------


def test_wrong_admin_tokens_never_lock_out_the_right_one(node_factory: Any) -> None:
    node = node_factory("--admin-token", ADMIN)
    answers = []
    for i in range(50):  # behind Tor every client is 127.0.0.1: this is "everyone"
        status, headers, raw = node.request(
            "GET", "/admin/api/overview", None, {"Authorization": f"Bearer wrong-{i:04d}"})
        answers.append((status, headers, json.loads(raw)))
    assert all(s == 401 for s, _, _ in answers[:5]), [s for s, _, _ in answers]
    limited = [(s, h, d) for s, h, d in answers[5:]]
    for status, headers, doc in limited:
        assert status == 429 and is_error(doc, status, "admin_login_rate_limited"), doc
        assert 1 <= int(headers["retry-after"]) <= 60
    # The right token: as Bearer, on the login form, and on /metrics — all while limited.
    assert node.json("GET", "/admin/api/overview", None, AUTH)[0] == 200
    status, doc = node.json("POST", "/admin/login", {"token": ADMIN})
    assert status == 200 and doc["ok"] is True
    status, headers, _ = node.request("GET", "/metrics", None, AUTH)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    # Failures go on being limited after the admin got in (a success does not reset them all).
    status, doc = node.json("POST", "/admin/login", {"token": "guess"})
    assert status in (401, 429) and doc["error"]["code"] in ("invalid_admin_token",
                                                             "admin_login_rate_limited")


def test_metrics_wrong_tokens_share_the_admin_limiter(node_factory: Any) -> None:
    node = node_factory("--admin-token", ADMIN)
    statuses = []
    for i in range(12):
        status, headers, raw = node.request("GET", "/metrics", None,
                                            {"Authorization": f"Bearer nope-{i}"})
        statuses.append(status)
        if status == 429:
            assert is_error(json.loads(raw), status, "admin_login_rate_limited")
            assert int(headers["retry-after"]) >= 1
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}, statuses
    # The admin API is limited by the same counter, and the right token still works on both.
    status, doc = node.json("GET", "/admin/api/overview", None,
                            {"Authorization": "Bearer another-guess"})
    assert status == 429, doc
    assert node.request("GET", "/metrics", None, AUTH)[0] == 200
    assert node.json("GET", "/admin/api/overview", None, AUTH)[0] == 200
