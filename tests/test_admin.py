"""The admin API end to end: the real node process on 127.0.0.1, real sockets, the real ledger.

Security first (every admin route over the whole route table, the token's first start, login,
cookie, CSRF, the rate limit), then each area: keys, transactions, overview, prices, health and
settings, the no-JavaScript dashboard forms, and the wallet against the real test mint.
Money checks read the node's own database from the test process and run the ledger's
invariant check.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from openai import OpenAI

from routstr.app import Node, routes
from routstr.config import load_config
from routstr.db import Database
from routstr.keys import hash_key
from routstr.ledger import Ledger
from routstr.pricing import actual_cost, load_price_table
from tests.support.lnurl import LnurlService
from tests.support.mint import WalletTool
from tests.support.node import NodeProcess
from tests.support.upstream import ScriptedUpstream

ADMIN = "admin-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
PRICES = load_price_table(None).at(100_000)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 303 is the answer under test, not something to follow


_OPENER = urllib.request.build_opener(_NoRedirect)


def call(node: NodeProcess, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    """One request, redirects not followed: (status, JSON or text body, lower-cased headers)."""
    hdrs_out = dict(headers or {})
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs_out.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(node.url + path, data=data, method=method, headers=hdrs_out)
    try:
        with _OPENER.open(req, timeout=30) as resp:
            status, hdrs, raw = resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        status, hdrs, raw = err.code, dict(err.headers.items()), err.read()
    hdrs = {k.lower(): v for k, v in hdrs.items()}
    doc: Any = None
    if raw and hdrs.get("content-type", "").startswith("application/json"):
        doc = json.loads(raw)
    elif raw:
        doc = raw.decode()
    return status, doc, hdrs


def api(node: NodeProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, doc, _ = call(node, method, path, body, AUTH)
    return status, doc


def new_key(node: NodeProcess, msats: int = 10_000_000, **extra: Any) -> dict[str, Any]:
    status, doc = api(node, "POST", "/admin/api/keys", {"balance_msats": msats, **extra})
    assert status == 201, doc
    return dict(doc)


def is_auth_error(doc: Any) -> bool:
    return (isinstance(doc, dict) and doc["error"]["type"] == "authentication_failed"
            and isinstance(doc["error"]["code"], str) and doc["error"]["message"])


class Books:
    """The node's ledger read from the test process (sqlite WAL allows a second user)."""

    def __init__(self, node: NodeProcess) -> None:
        self.db = Database(node.database)
        self.ledger = Ledger(self.db)

    def check(self) -> dict[str, int]:
        return self.ledger.check_invariant()

    def close(self) -> None:
        self.db.close()


def login(node: NodeProcess, headers: dict[str, str] | None = None) -> tuple[str, str, str]:
    """(cookie header value, masked csrf token, the raw Set-Cookie) of a fresh session."""
    status, doc, hdrs = call(node, "POST", "/admin/login", {"token": ADMIN}, headers)
    assert status == 200, doc
    set_cookie = hdrs["set-cookie"]
    return set_cookie.split(";")[0], doc["csrf_token"], set_cookie


@pytest.fixture(scope="module")
def node(upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("admin"), [
        "--upstream-base-url", upstream.url, "--upstream-api-key", "upstream-secret-value",
        "--admin-token", ADMIN])
    n.start()
    yield n
    n.stop()


@pytest.fixture
def books(node: NodeProcess) -> Iterator[Books]:
    b = Books(node)
    yield b
    b.check()
    b.close()


def admin_route_table(tmp_path: Path) -> list[tuple[str, str]]:
    """Every (method, path pattern) under /admin, from the node's own router table."""
    config = load_config(["--database", str(tmp_path / "routes.sqlite3")], {})
    built = Node.open(config)
    try:
        table = routes(built)
    finally:
        anyio.run(built.aclose)
    return [(r.method, r.pattern) for r in table if r.pattern.startswith("/admin")]


def concrete(pattern: str) -> str:
    return pattern.replace("{id}", "1").replace("{model}", "gpt-4o-mini")


# --------------------------------------------------------------------------------------------
# security over the whole route table
# --------------------------------------------------------------------------------------------


def test_every_admin_route_refuses_without_admin_auth(node_factory: Any, tmp_path: Path) -> None:
    table = admin_route_table(tmp_path)
    assert len(table) >= 20 and ("GET", "/admin") in table
    assert ("POST", "/admin/api/keys") in table and ("GET", "/admin/api/transactions") in table
    n = node_factory("--admin-token", ADMIN)
    user_key = new_key(n, 1000)["api_key"]
    open_routes = []
    for method, pattern in table:
        path = concrete(pattern)
        body = {} if method in ("POST", "PUT", "PATCH") else None
        status, doc, hdrs = call(n, method, path, body)
        if status != 401:
            open_routes.append((method, pattern, status))
            continue
        assert is_auth_error(doc), (method, path, doc)
        # A user's sk- key or a Cashu token never opens an admin route.
        for cred in (user_key, "cashuAeyJ0b2tlbiI6W119"):
            status, doc, _ = call(n, method, path, body, {"Authorization": f"Bearer {cred}"})
            assert status == 401 and doc["error"]["code"] == "not_an_admin_token", (path, doc)
        status, doc, _ = call(n, method, path, body, {"Authorization": f"Basic {ADMIN}"})
        assert status == 401 and is_auth_error(doc), (path, doc)
        status, doc, _ = call(n, method, path, body,
                              {"Cookie": "routstr_admin=forged-session-value"})
        assert status == 401 and doc["error"]["code"] == "admin_session_expired", (path, doc)
    # Only the login itself answers without a credential (and grants nothing without the token).
    assert open_routes == [("POST", "/admin/login", 400)], open_routes
    # With the token every route is reachable (no 401/403 left anywhere).
    for method, pattern in table:
        if pattern == "/admin/login":
            continue
        status, doc, _ = call(n, method, concrete(pattern),
                              {} if method in ("POST", "PUT", "PATCH") else None, AUTH)
        assert status not in (401, 403), (method, pattern, status, doc)


def test_cookie_session_csrf_and_logout(node_factory: Any) -> None:
    n = node_factory("--admin-token", ADMIN)
    cookie, csrf, raw = login(n)
    attrs = [a.strip() for a in raw.split(";")]
    assert {"HttpOnly", "SameSite=Strict", "Path=/admin"} <= set(attrs)
    assert "Secure" not in attrs and cookie.startswith("routstr_admin=")
    assert ADMIN not in raw
    _, _, tls_raw = login(n, {"X-Forwarded-Proto": "https"})
    assert "Secure" in [a.strip() for a in tls_raw.split(";")]

    status, doc, _ = call(n, "GET", "/admin/api/overview", None, {"Cookie": cookie})
    assert status == 200 and doc["keys"] == 0
    # A state change with the cookie alone is refused: no CSRF token, a wrong one, a foreign
    # Origin (even with the right token).
    for extra, code in (({}, "csrf_token_invalid"),
                        ({"X-CSRF-Token": "00" * 64}, "csrf_token_invalid"),
                        ({"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
                         "csrf_origin_mismatch")):
        status, doc, _ = call(n, "POST", "/admin/api/keys", {"balance_msats": 5},
                              {"Cookie": cookie, **extra})
        assert status == 403 and doc["error"]["code"] == code, (extra, doc)
    status, doc, _ = call(n, "POST", "/admin/api/keys", {"balance_msats": 5},
                          {"Cookie": cookie, "X-CSRF-Token": csrf,
                           "Origin": n.url})
    assert status == 201 and doc["balance_msats"] == 5
    # Form posts carry the token as a field (and the page's form nonce); the login form is
    # refused cross-origin.
    page = call(n, "GET", "/admin/", None, {"Cookie": cookie})[1]
    nonce = re.search(r'name="nonce" value="([^"]+)"', page)
    assert nonce is not None
    form = urllib.parse.urlencode({"csrf": csrf, "nonce": nonce.group(1),
                                   "balance_sats": "1"}).encode()
    ctype = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, hdrs = call(n, "POST", "/admin/keys", form, {"Cookie": cookie, **ctype})
    assert status == 303 and "done=key_created" in hdrs["location"]
    status, _, _ = call(n, "POST", "/admin/keys", urllib.parse.urlencode(
        {"balance_sats": "1", "nonce": nonce.group(1)}).encode(), {"Cookie": cookie, **ctype})
    assert status == 403
    status, doc, _ = call(n, "POST", "/admin/login", {"token": ADMIN},
                          {"Origin": "http://evil.example"})
    assert status == 403 and doc["error"]["code"] == "csrf_origin_mismatch"
    assert api(n, "GET", "/admin/api/keys")[1]["total"] == 2
    # Logout ends the session for good and clears the cookie.
    status, doc, hdrs = call(n, "POST", "/admin/logout", {}, {"Cookie": cookie,
                                                               "X-CSRF-Token": csrf})
    assert status == 200 and "Max-Age=0" in hdrs["set-cookie"]
    status, doc, _ = call(n, "GET", "/admin/api/overview", None, {"Cookie": cookie})
    assert status == 401 and doc["error"]["code"] == "admin_session_expired"


def test_login_attempts_are_rate_limited(node_factory: Any) -> None:
    n = node_factory("--admin-token", ADMIN)
    cookie, _, _ = login(n)
    for _ in range(5):
        status, doc, _ = call(n, "POST", "/admin/login", {"token": "guess"})
        assert status == 401 and doc["error"]["code"] == "invalid_admin_token"
    status, doc, hdrs = call(n, "POST", "/admin/login", {"token": "guess"})
    assert status == 429 and doc["error"]["code"] == "admin_login_rate_limited"
    assert 1 <= int(hdrs["retry-after"]) <= 60
    # Only failures are limited: the right token still gets in (login and Bearer) ...
    assert call(n, "POST", "/admin/login", {"token": ADMIN})[0] == 200
    assert call(n, "GET", "/admin/api/overview", None, AUTH)[0] == 200
    assert call(n, "GET", "/admin/api/overview", None,
                {"Authorization": "Bearer guess"})[0] == 429
    # ... and an existing session goes on working.
    assert call(n, "GET", "/admin/api/overview", None, {"Cookie": cookie})[0] == 200
    # A browser gets the login form with the message.
    status, page, _ = call(n, "POST", "/admin/login", b"token=guess",
                           {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 429 and "Too many failed admin logins" in page


def test_admin_token_generated_at_first_start_kept_in_a_file_stored_hashed(
        node_factory: Any, tmp_path: Path) -> None:
    first = node_factory()
    token_file = Path(first.database + ".admin-token")
    token = token_file.read_text().strip()
    assert token.startswith("adm-") and token not in first.log_text()
    assert f"generated the admin token; it is in {token_file}" in first.log_text()
    assert "python -m routstr admin-token show" in first.log_text()
    assert call(first, "GET", "/admin/api/health", None,
                {"Authorization": f"Bearer {token}"})[0] == 200
    first.stop()
    second = node_factory(workdir=tmp_path)
    assert token not in second.log_text() and "admin token" not in second.log_text()
    assert call(second, "GET", "/admin/api/health", None,
                {"Authorization": f"Bearer {token}"})[0] == 200
    second.stop()
    with sqlite3.connect(first.database) as conn:
        stored = conn.execute(
            "SELECT value FROM node_settings WHERE name = 'admin_token_hash'").fetchone()[0]
    assert stored == hash_key(token)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("node.sqlite3*")
                   if not p.name.endswith(".admin-token"))
    assert token.encode() not in raw
    # An explicit --admin-token wins; one shaped like a user key is refused at start.
    third = node_factory("--admin-token", ADMIN, workdir=tmp_path)
    assert call(third, "GET", "/admin/api/health", None,
                {"Authorization": f"Bearer {token}"})[0] == 401
    assert call(third, "GET", "/admin/api/health", None, AUTH)[0] == 200
    third.stop()
    bad = node_factory("--admin-token", "sk-looks-like-a-user-key", workdir=tmp_path,
                       start=False)
    with pytest.raises(RuntimeError, match="must not start with 'sk-'"):
        bad.start()


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------


def chat(node: NodeProcess, key: str, model: str = "gpt-4o-mini") -> Any:
    client = OpenAI(api_key=key, base_url=node.base_url, max_retries=0, timeout=20)
    return client.chat.completions.create(model=model,
                                          messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=20)


def test_keys_list_pagination_and_search(node: NodeProcess, books: Books) -> None:
    before = api(node, "GET", "/admin/api/keys?limit=1")[1]["total"]
    made = [new_key(node, 1000 * (i + 1)) for i in range(7)]
    status, page = api(node, "GET", "/admin/api/keys?limit=3")
    assert status == 200 and page["total"] == before + 7 and page["has_more"] is True
    assert [k["id"] for k in page["data"]] == [m["key"]["id"] for m in made[::-1][:3]]
    status, page = api(node, "GET", f"/admin/api/keys?limit=3&offset={before + 6}")
    assert len(page["data"]) == 1 and page["has_more"] is False
    target = made[3]
    last4 = target["api_key"][-4:]
    status, page = api(node, "GET", f"/admin/api/keys?search={last4}")
    assert target["key"]["id"] in [k["id"] for k in page["data"]]
    assert all(k["hint"] == last4 for k in page["data"])
    assert all(target["api_key"] not in json.dumps(k) for k in page["data"])  # never in clear
    status, page = api(node, "GET", "/admin/api/keys?search="
                       + urllib.parse.quote(target["api_key"]))
    assert [k["id"] for k in page["data"]] == [target["key"]["id"]]
    status, page = api(node, "GET", "/admin/api/keys?search=" + urllib.parse.quote("sk-…" + last4))
    assert target["key"]["id"] in [k["id"] for k in page["data"]]
    status, doc = api(node, "GET", f"/admin/api/keys/{target['key']['id']}")
    assert status == 200 and doc["balance_msats"] == 4000 and doc["children"] == []
    for bad in ("limit=0", "limit=201", "offset=-1", "limit=x"):
        status, doc = api(node, "GET", f"/admin/api/keys?{bad}")
        assert status == 400 and doc["error"]["code"] == "invalid_parameter", bad
    assert api(node, "GET", "/admin/api/keys/999999")[0] == 404
    assert api(node, "GET", "/admin/api/keys/abc")[0] == 404


def test_create_key_keeps_the_old_contract_and_validates(node: NodeProcess, books: Books) -> None:
    status, doc = api(node, "POST", "/admin/api/keys", {"balance_msats": 2500})
    assert status == 201 and doc["balance_msats"] == 2500 and doc["api_key"].startswith("sk-")
    acct = books.ledger.get_account(hash_key(doc["api_key"]))
    assert acct is not None and acct.granted_msats == 2500 and acct.hint == doc["api_key"][-4:]
    limited = new_key(node, 5000, balance_limit_msats=3000, balance_limit_reset="daily",
                      validity_date=4_000_000_000)
    assert limited["key"]["balance_limit_msats"] == 3000
    assert limited["key"]["balance_limit_reset"] == "daily"
    for body in ({"balance_msats": -1}, {"balance_msats": 1.5}, {"balance_msats": True},
                 {"balance_msats": 10**16}, {"balance_msats": 1, "extra": 1},
                 {"balance_msats": 1, "balance_limit_reset": "hourly"}):
        status, doc = api(node, "POST", "/admin/api/keys", body)
        assert status == 400, (body, doc)
    status, doc, _ = call(node, "POST", "/admin/api/keys", b"{not json", AUTH)
    assert status == 400 and doc["error"]["code"] == "invalid_json"


def test_disable_limits_grant_and_delete(node: NodeProcess, books: Books) -> None:
    created = new_key(node, 2_000_000)
    key, key_id = created["api_key"], created["key"]["id"]
    assert chat(node, key).choices[0].message.content == "Hello from upstream!"

    status, doc = api(node, "PATCH", f"/admin/api/keys/{key_id}", {"disabled": True})
    assert status == 200 and doc["disabled"] is True
    status, doc, _ = call(node, "POST", "/v1/chat/completions",
                          {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
                          {"Authorization": f"Bearer {key}"})
    assert status == 401 and doc["error"]["code"] == "key_disabled"
    api(node, "PATCH", f"/admin/api/keys/{key_id}", {"disabled": False})

    # A limit below the worst case refuses the request; clearing it lets it through.
    status, doc = api(node, "PATCH", f"/admin/api/keys/{key_id}",
                      {"balance_limit_msats": 10, "balance_limit_reset": "weekly"})
    assert status == 200 and doc["balance_limit_msats"] == 10
    assert doc["balance_limit_reset"] == "weekly" and doc["limit_spent_msats"] == 0
    status, doc, _ = call(node, "POST", "/v1/chat/completions",
                          {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
                          {"Authorization": f"Bearer {key}"})
    assert status == 402 and doc["error"]["code"] == "balance_limit_exceeded"
    status, doc = api(node, "PATCH", f"/admin/api/keys/{key_id}",
                      {"balance_limit_msats": None, "balance_limit_reset": None,
                       "validity_date": None})
    assert status == 200 and doc["balance_limit_msats"] is None
    chat(node, key)
    for body in ({}, {"disabled": "yes"}, {"balance_limit_msats": -5}, {"owner": "x"},
                 {"validity_date": "tomorrow"}):
        assert api(node, "PATCH", f"/admin/api/keys/{key_id}", body)[0] == 400, body

    status, doc = api(node, "POST", f"/admin/api/keys/{key_id}/grant", {"amount_msats": 7000})
    assert status == 200
    acct = books.ledger.get_account(hash_key(key))
    assert acct is not None and acct.granted_msats == 2_007_000
    assert doc["balance_msats"] == acct.balance_msats
    assert api(node, "POST", f"/admin/api/keys/{key_id}/grant", {"amount_msats": 0})[0] == 400

    # A key holding money cannot be deleted (it would make users' money vanish) ...
    status, doc = api(node, "DELETE", f"/admin/api/keys/{key_id}")
    assert status == 409 and doc["error"]["code"] == "key_holds_money"
    assert doc["error"]["details"]["balance_msats"] == acct.balance_msats
    # ... an empty one can: it disappears and its key never works again; the books still add up.
    empty = new_key(node, 0)
    status, doc = api(node, "DELETE", f"/admin/api/keys/{empty['key']['id']}")
    assert status == 200 and doc["deleted"] == [empty["key"]["id"]]
    assert api(node, "GET", f"/admin/api/keys/{empty['key']['id']}")[0] == 404
    assert api(node, "DELETE", f"/admin/api/keys/{empty['key']['id']}")[0] == 404
    listed = api(node, "GET", "/admin/api/keys?search=" + empty["api_key"][-4:])[1]
    assert empty["key"]["id"] not in [k["id"] for k in listed["data"]]
    status, doc, _ = call(node, "GET", "/v1/balance/info", None,
                          {"Authorization": f"Bearer {empty['api_key']}"})
    assert status == 401
    status, page = api(node, "GET", f"/admin/api/transactions?key_id={empty['key']['id']}")
    assert [t["kind"] for t in page["data"]] == ["delete", "create"]


# --------------------------------------------------------------------------------------------
# transactions and overview
# --------------------------------------------------------------------------------------------


def test_transactions_paged_and_filtered(node: NodeProcess, books: Books) -> None:
    a, b = new_key(node, 1_000_000), new_key(node, 1_000_000)
    started = int(time.time())
    for _ in range(3):
        chat(node, a["api_key"])
    chat(node, b["api_key"])
    status, page = api(node, "GET", f"/admin/api/transactions?key_id={a['key']['id']}&limit=4")
    assert status == 200 and page["total"] == 2 + 3 * 2  # create, grant, 3 × reserve + settle
    assert page["has_more"] is True and len(page["data"]) == 4
    assert all(t["key_id"] == a["key"]["id"] for t in page["data"])
    ids = [t["id"] for t in page["data"]]
    assert ids == sorted(ids, reverse=True)
    rest = api(node, "GET", f"/admin/api/transactions?key_id={a['key']['id']}&limit=4&offset=4")[1]
    assert rest["has_more"] is False and len(rest["data"]) == 4
    assert not set(ids) & {t["id"] for t in rest["data"]}

    settles = api(node, "GET", f"/admin/api/transactions?key={a['api_key'][-4:]}&kind=settle")[1]
    assert settles["total"] == 3 and {t["kind"] for t in settles["data"]} == {"settle"}
    charged = sum(t["amount_msats"] for t in settles["data"])
    acct = books.ledger.get_account(hash_key(a["api_key"]))
    assert acct is not None and charged == acct.spent_msats
    assert charged == 3 * actual_cost(PRICES.get("gpt-4o-mini"), 12, 5).total_msats

    both = api(node, "GET", "/admin/api/transactions?kind=settle,grant&since="
               f"{started - 5}&limit=200")[1]
    assert {t["kind"] for t in both["data"]} == {"settle", "grant"}
    assert {a["key"]["id"], b["key"]["id"]} <= {t["key_id"] for t in both["data"]}
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started - 5))
    same = api(node, "GET", f"/admin/api/transactions?kind=settle,grant&since={iso}&limit=200")[1]
    assert same["total"] == both["total"]
    past = api(node, "GET", "/admin/api/transactions?until=2000-01-01")[1]
    assert past["total"] == 0 and past["data"] == [] and past["has_more"] is False
    nobody = api(node, "GET", "/admin/api/transactions?key=zzzz")[1]
    assert nobody["total"] == 0
    for bad in ("since=yesterday", "kind=DROP%20TABLE", "key_id=x", "limit=0"):
        assert api(node, "GET", f"/admin/api/transactions?{bad}")[0] == 400, bad


def test_overview_earnings_per_hour(node_factory: Any) -> None:
    n = node_factory("--admin-token", ADMIN)
    key = new_key(n, 1_000_000)
    books = Books(n)
    try:
        now = int(time.time())
        hour = now - now % 3600
        # Requests settled two and five hours ago, and one in flight now.
        for ago, cost in ((2, 1234), (5, 4321), (5, 1000)):
            t = now - ago * 3600
            r = books.ledger.reserve(key["key"]["id"], 5000, request_id=f"r{ago}{cost}",
                                     ttl_s=600, now=t)
            books.ledger.settle(r.id, cost, now=t)
        live = books.ledger.reserve(key["key"]["id"], 777, request_id="live", ttl_s=600)
        status, o = api(n, "GET", "/admin/api/overview")
        assert status == 200
        assert o["earnings_msats"] == o["earnings_24h_msats"] == 1234 + 4321 + 1000
        assert o["requests"] == o["requests_24h"] == 4
        assert o["reserved_msats"] == 777 and o["reservations"] == 1
        assert o["keys"] == 1 and o["active_keys"] == 1 and o["funded_keys"] == 1
        assert o["liability_msats"] == 1_000_000 - 6555
        per_hour = {p["hour"]: p["msats"] for p in o["earnings_per_hour"]}
        assert len(per_hour) == 24 and max(per_hour) == hour
        assert per_hour[hour - 2 * 3600] == 1234 and per_hour[hour - 5 * 3600] == 5321
        assert sum(per_hour.values()) == 6555
        books.ledger.release(live.id)
        assert api(n, "GET", "/admin/api/overview")[1]["reserved_msats"] == 0
        books.check()
    finally:
        books.close()


# --------------------------------------------------------------------------------------------
# prices
# --------------------------------------------------------------------------------------------


def model_msats(node: NodeProcess, model: str) -> dict[str, int] | None:
    doc = call(node, "GET", "/v1/models")[1]
    found = [m["pricing_msats"] for m in doc["data"] if m["id"] == model]
    return found[0] if found else None


def test_price_overrides_apply_at_once_and_persist(node_factory: Any,
                                                   upstream: ScriptedUpstream) -> None:
    n = node_factory("--admin-token", ADMIN, "--upstream-base-url", upstream.url)
    base = PRICES.get("gpt-4o-mini")
    status, doc = api(n, "GET", "/admin/api/prices")
    row = next(m for m in doc["data"] if m["id"] == "gpt-4o-mini")
    assert row["input_msats_per_1k"] == base.input_msats_per_1k and row["overridden"] is False

    status, doc = api(n, "PUT", "/admin/api/prices/gpt-4o-mini",
                      {"input_msats_per_1k": 1000, "request_msats": 2000})
    assert status == 200 and doc["overridden"] is True and doc["input_msats_per_1k"] == 1000
    assert doc["base"]["input_msats_per_1k"] == base.input_msats_per_1k
    assert model_msats(n, "gpt-4o-mini") == {
        "input_msats_per_1k": 1000, "output_msats_per_1k": base.output_msats_per_1k,
        "cached_input_msats_per_1k": base.cached_input_msats_per_1k,
        "cache_write_msats_per_1k": None,
        "request_msats": 2000, "max_output_tokens": base.max_output_tokens}
    # The next request is charged the new price, exactly.
    key = new_key(n, 1_000_000)
    chat(n, key["api_key"])
    books = Books(n)
    try:
        acct = books.ledger.get_account(hash_key(key["api_key"]))
    finally:
        books.close()
    assert acct is not None
    assert acct.spent_msats == 2000 + -(-(12 * 1000 + 5 * base.output_msats_per_1k) // 1000)

    # A second edit merges with the first; a new model needs every field; bad input changes nothing.
    api(n, "PUT", "/admin/api/prices/gpt-4o-mini", {"output_msats_per_1k": 3})
    assert model_msats(n, "gpt-4o-mini")["input_msats_per_1k"] == 1000  # type: ignore[index]
    status, doc = api(n, "PUT", "/admin/api/prices/" + urllib.parse.quote("acme/local-1", safe=""),
                      {"input_msats_per_1k": 5, "output_msats_per_1k": 6,
                       "max_output_tokens": 100, "context_length": 1000})
    assert status == 200 and doc["id"] == "acme/local-1"
    assert model_msats(n, "acme/local-1") == {"input_msats_per_1k": 5, "output_msats_per_1k": 6,
                                             "cached_input_msats_per_1k": None,
                                             "cache_write_msats_per_1k": None,
                                             "request_msats": 0, "max_output_tokens": 100}
    for model, body in (("brand-new", {"input_msats_per_1k": 5}),
                        ("gpt-4o-mini", {"input_msats_per_1k": -1}),
                        ("gpt-4o-mini", {"input_msats_per_1k": "5"}),
                        ("gpt-4o-mini", {"colour": 1})):
        status, doc = api(n, "PUT", f"/admin/api/prices/{model}", body)
        assert status == 400 and doc["error"]["code"] == "invalid_price", (model, body)
    assert model_msats(n, "brand-new") is None

    # Persisted: a restart serves the same prices; removing an override restores the table.
    n.stop()
    n2 = node_factory("--admin-token", ADMIN, workdir=n.workdir)
    assert model_msats(n2, "gpt-4o-mini")["output_msats_per_1k"] == 3  # type: ignore[index]
    assert model_msats(n2, "acme/local-1") is not None
    status, doc = api(n2, "DELETE", "/admin/api/prices/gpt-4o-mini")
    assert status == 200 and doc["removed"] is True
    assert model_msats(n2, "gpt-4o-mini") == {
        "input_msats_per_1k": base.input_msats_per_1k,
        "output_msats_per_1k": base.output_msats_per_1k,
        "cached_input_msats_per_1k": base.cached_input_msats_per_1k,
        "cache_write_msats_per_1k": None,
        "request_msats": 0, "max_output_tokens": base.max_output_tokens}
    assert api(n2, "DELETE", "/admin/api/prices/gpt-4o-mini")[0] == 404
    assert api(n2, "DELETE", "/admin/api/prices/acme%2Flocal-1")[0] == 200
    assert model_msats(n2, "acme/local-1") is None


# --------------------------------------------------------------------------------------------
# health, settings, the dashboard without JavaScript, the wallet
# --------------------------------------------------------------------------------------------


def test_health_and_settings_with_secrets_masked(node: NodeProcess) -> None:
    status, doc = api(node, "GET", "/admin/api/health")
    # no mint on this node: served, but degraded, with the reason /health gives
    assert status == 200 and doc["status"] == "degraded"
    assert doc["reasons"] == node.json("GET", "/health")[1]["reasons"]
    assert len(doc["reasons"]) == 1 and "no trusted mint" in doc["reasons"][0]
    assert doc["checks"]["database"] == "ok" and doc["checks"]["ledger"] == "ok"
    assert doc["checks"]["upstream"] == "ok" and doc["wallet"] == "not_configured"
    assert doc["schema_version"] >= 4 and doc["models"] > 20
    status, doc, _ = call(node, "GET", "/admin/api/settings", None, AUTH)
    assert status == 200
    assert doc["upstream_api_key"] == "********" and doc["admin_token"] == "********"
    assert doc["port"] == 0 and doc["upstream_base_url"].startswith("http://127.0.0.1")
    raw = json.dumps(doc)
    assert "upstream-secret-value" not in raw and ADMIN not in raw
    npub = node.json("GET", "/v1/info")[1]["npub"]
    assert npub.startswith("npub1") and doc["npub"] == npub  # the node's Nostr identity
    page = call(node, "GET", "/admin/", None, AUTH)[1]
    assert "upstream-secret-value" not in page and ADMIN not in page and "********" in page
    assert npub in page
    status, doc = api(node, "GET", "/admin/api/wallet")
    assert status == 503 and doc["error"]["code"] == "wallet_not_configured"


def test_settings_mask_credentials_inside_urls(node_factory: Any) -> None:
    n = node_factory("--admin-token", ADMIN, "--upstream-proxy",
                     "socks5h://tor:proxy-password@127.0.0.1:9050")
    status, doc = api(n, "GET", "/admin/api/settings")
    assert status == 200 and doc["upstream_proxy"] == "socks5h://********@127.0.0.1:9050"
    assert "proxy-password" not in json.dumps(doc)


def test_dashboard_works_without_javascript(node: NodeProcess, books: Books) -> None:
    status, page, hdrs = call(node, "GET", "/admin/", None, {"Accept": "text/html"})
    assert status == 401 and hdrs["content-type"].startswith("text/html")
    assert 'action="/admin/login"' in page
    status, _, hdrs = call(node, "POST", "/admin/login", b"token=" + ADMIN.encode(),
                           {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 303 and hdrs["location"] == "/admin/"
    cookie = hdrs["set-cookie"].split(";")[0]
    status, page, hdrs = call(node, "GET", "/admin/", None, {"Cookie": cookie})
    assert status == 200
    csp = hdrs["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert hdrs["cache-control"] == "no-store" and hdrs["x-frame-options"] == "DENY"
    assert not re.search(r"""(src|href)=["']https?://""", page)  # no external assets
    assert "<svg" in page and "prefers-color-scheme:dark" in page
    csrf = re.search(r'name="csrf" value="([0-9a-f]{128})"', page)
    assert csrf is not None

    def post(path: str, fields: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        page = call(node, "GET", "/admin/", None, {"Cookie": cookie})[1]
        nonce = re.search(r'name="nonce" value="([^"]+)"', page)
        assert nonce is not None
        body = urllib.parse.urlencode({"csrf": csrf.group(1), "nonce": nonce.group(1),
                                       **fields}).encode()
        return call(node, "POST", path, body, {"Cookie": cookie, "Origin": node.url,
                                               "Content-Type": "application/x-www-form-urlencoded"})

    status, _, hdrs = post("/admin/keys", {"balance_sats": "12.5", "limit_sats": "3",
                                           "limit_reset": "daily", "valid_until": ""})
    assert status == 303 and "done=key_created" in hdrs["location"]
    status, page, _ = call(node, "GET", hdrs["location"], None, {"Cookie": cookie})
    key = re.search(r'<code id="secret-value">(sk-[0-9a-z]{32})</code>', page)
    assert key is not None and page.count(key.group(1)) == 1
    acct = books.ledger.get_account(hash_key(key.group(1)))
    assert acct is not None and acct.balance_msats == 12_500
    assert acct.balance_limit_msats == 3000 and acct.balance_limit_reset == "daily"
    status, _, hdrs = post(f"/admin/keys/{acct.id}", {"action": "disable"})
    assert status == 303 and hdrs["location"].startswith("/admin/?done=key_disabled")
    status, _, _ = post(f"/admin/keys/{acct.id}", {"action": "grant", "amount_sats": "0.5"})
    assert status == 303
    acct = books.ledger.get_account_by_id(acct.id)
    assert acct is not None and acct.disabled and acct.balance_msats == 13_000
    status, _, hdrs = post(f"/admin/keys/{acct.id}", {"action": "delete"})
    assert status == 303 and "done=" not in hdrs["location"]
    page = call(node, "GET", hdrs["location"], None, {"Cookie": cookie})[1]
    assert 'class="banner error"' in page and "still holds money" in page
    status, _, _ = post("/admin/prices", {"model": "gpt-4o", "request_msats": "7"})
    assert status == 303 and model_msats(node, "gpt-4o")["request_msats"] == 7  # type: ignore[index]
    status, _, _ = post("/admin/prices", {"model": "gpt-4o", "action": "reset"})
    assert status == 303 and model_msats(node, "gpt-4o")["request_msats"] == 0  # type: ignore[index]
    status, page, _ = call(node, "GET", f"/admin/?tk=%23{acct.id}&kq={key.group(1)[-4:]}", None,
                           {"Cookie": cookie})
    assert status == 200 and f'data-key-id="{acct.id}"' in page and "grant" in page


@pytest.mark.mint
def test_wallet_balances_withdraw_and_payout(node_factory: Any, upstream: ScriptedUpstream,
                                             mint_url: str, mint_url_fee: str) -> None:
    n = node_factory("--admin-token", ADMIN, "--upstream-base-url", upstream.url,
                     "--cashu-mints", mint_url, "--lnurl-allow-private")
    # Make earnings: a user pays with a 300-sat token for one request priced at 120 sats.
    api(n, "PUT", "/admin/api/prices/gpt-4o-mini", {"request_msats": 120_000})
    tool = WalletTool()
    token = tool.mint_token(mint_url, 300)
    chat(n, token)
    status, w = api(n, "GET", "/admin/api/wallet")
    assert status == 200 and w["unit"] == "sat" and w["pending"] == []
    assert w["mints"][0]["mint"] == mint_url and w["mints"][0]["balance"] == 300
    assert w["mints"][0]["proofs"] >= 1 and w["total"] == 300
    cost = 120_000 + actual_cost(PRICES.get("gpt-4o-mini"), 12, 5).total_msats
    held = -(-(300_000 - cost) // 1000)  # the user's remaining balance, rounded up to sats
    assert w["held_for_users"] == held and w["withdrawable"] == 300 - held

    status, doc = api(n, "POST", "/admin/api/wallet/withdraw", {"amount_sats": held + 200})
    assert status == 400 and doc["error"]["code"] == "exceeds_earnings"
    status, doc = api(n, "POST", "/admin/api/wallet/withdraw", {"amount_sats": 40})
    assert status == 200 and doc["token"].startswith("cashuB") and doc["mint"] == mint_url
    assert tool.receive(mint_url, doc["token"]) == 40  # a real, spendable token

    svc = LnurlService(mint_url_fee)
    try:
        status, doc = api(n, "POST", "/admin/api/wallet/payout",
                          {"lightning_address": svc.address, "amount_sats": 21})
        assert status == 200 and doc["amount_sats"] == 21, doc
        status, doc = api(n, "POST", "/admin/api/wallet/payout",
                          {"lightning_address": "nobody", "amount_sats": 5})
        assert status == 400 and doc["error"]["code"] == "invalid_lightning_address"
    finally:
        svc.close()
    status, w = api(n, "GET", "/admin/api/wallet")
    assert w["total"] == 300 - 40 - 21 - melt_fees(n) and w["held_for_users"] == held
    page = call(n, "GET", "/admin/", None, AUTH)[1]
    assert f"<td>{mint_url}</td>" in page and 'action="/admin/wallet/withdraw"' in page
    books = Books(n)
    try:
        books.check()
    finally:
        books.close()


def melt_fees(node: NodeProcess) -> int:
    """Lightning fees the node paid (the payout's melt), from the wallet's own records."""
    with sqlite3.connect(node.database) as conn:
        row = conn.execute("SELECT COALESCE(SUM(fee), 0) FROM wallet_ops WHERE kind = 'melt'"
                           " AND state = 'done'").fetchone()
    return int(row[0])
