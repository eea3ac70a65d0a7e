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
