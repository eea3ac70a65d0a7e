"""The dashboard's forms over real sockets: post → redirect → get, the one-use form nonce, the
one-time flash message (routstr/admin_forms.py) — and the sealing and expiry rules in-process.

Every state-changing form answers 303 to a GET of the page; posting the same form (its nonce)
again does nothing and lands on the first answer's page; a new key's sk- value and a withdrawn
token are shown once, never in a URL, never in the database in clear.
"""

from __future__ import annotations

import concurrent.futures
import html
import re
import urllib.parse
from pathlib import Path
from typing import Any

import anyio
import pytest

from routstr import admin_forms
from routstr.admin_page import AGAIN, GONE, NOTICES
from routstr.db import Database
from tests.support.mint import WalletTool
from tests.support.node import NodeProcess
from tests.support.upstream import ScriptedUpstream
from tests.test_admin import ADMIN, api, call, chat, new_key

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class Session:
    """A browser without JavaScript: the login form's cookie, pages, the page's forms."""

    def __init__(self, node: NodeProcess) -> None:
        status, _, hdrs = call(node, "POST", "/admin/login", b"token=" + ADMIN.encode(), FORM)
        assert status == 303
        self.node = node
        self.cookie = hdrs["set-cookie"].split(";")[0]

    def get(self, path: str = "/admin/") -> str:
        status, page, _ = call(self.node, "GET", path, None, {"Cookie": self.cookie})
        assert status == 200, page
        return str(page)

    def hidden(self, page: str | None = None) -> dict[str, str]:
        """The csrf and nonce fields of a page's forms (a fresh page unless given)."""
        page = self.get() if page is None else page
        found = dict(re.findall(r'name="(csrf|nonce)" value="([^"]+)"', page))
        assert set(found) == {"csrf", "nonce"}, found
        return found

    def post(self, path: str, fields: dict[str, str]) -> tuple[int, str]:
        """(status, Location) of one form post."""
        body = urllib.parse.urlencode(fields).encode()
        status, doc, hdrs = call(self.node, "POST", path, body,
                                 {"Cookie": self.cookie, "Origin": self.node.url, **FORM})
        return status, hdrs.get("location", str(doc))


def shown(text: str, page: str) -> bool:
    return html.escape(text, quote=True) in page


def secret_on(page: str) -> str | None:
    m = re.search(r'<code id="secret-value">([^<]+)</code>', page)
    return m.group(1) if m else None


def state(node: NodeProcess) -> Any:
    """Everything a dashboard form can change, through the admin API."""
    return (api(node, "GET", "/admin/api/keys?limit=200")[1],
            api(node, "GET", "/admin/api/transactions?limit=1")[1]["total"],
            api(node, "GET", "/admin/api/prices")[1])


def test_every_form_redirects_and_a_replay_does_nothing(node_factory: Any) -> None:
    n = node_factory("--admin-token", ADMIN)
    s = Session(n)
    key_id = new_key(n, 5_000_000)["key"]["id"]
    empty_id = new_key(n, 0)["key"]["id"]
    cases = [
        ("/admin/keys", {"balance_sats": "10"}, "key_created"),
        (f"/admin/keys/{key_id}", {"action": "disable"}, "key_disabled"),
        (f"/admin/keys/{key_id}", {"action": "enable"}, "key_enabled"),
        (f"/admin/keys/{key_id}", {"action": "limits", "limit_sats": "3",
                                   "limit_reset": "daily", "valid_until": ""}, "key_limits"),
        (f"/admin/keys/{key_id}", {"action": "grant", "amount_sats": "2"}, "key_granted"),
        (f"/admin/keys/{empty_id}", {"action": "delete"}, "key_deleted"),
        ("/admin/prices", {"model": "gpt-4o", "request_msats": "7"}, "price_set"),
        ("/admin/prices", {"model": "gpt-4o", "action": "reset"}, "price_reset"),
        # refused (no wallet here): a 303 too, the error as a one-time message
        ("/admin/wallet/withdraw", {"amount_sats": "5"}, ""),
        ("/admin/wallet/payout", {"amount_sats": "5", "lightning_address": "a@b.example"}, ""),
        (f"/admin/keys/{key_id}", {"action": "delete"}, ""),  # it holds money: 409 before
    ]
    for path, fields, done in cases:
        before = state(n)
        form = {**s.hidden(), **fields}
        status, location = s.post(path, form)
        assert status == 303 and location.startswith("/admin/?"), (path, fields, location)
        assert ("done=" + done in location) if done else ("done=" not in location), location
        after = state(n)
        assert (after != before) == bool(done), (path, fields)
        page = s.get(location)
        assert shown(NOTICES[done], page) if done else ('class="banner error"' in page), path
        # The same form again (a reload of a POST, back + resubmit, a double click): nothing
        # happens, and the answer is the first one's page, marked as a repeat.
        status, repeat = s.post(path, form)
        assert status == 303 and repeat == admin_forms.again(location), (location, repeat)
        assert state(n) == after, (path, fields)
        page = s.get(repeat)
        assert shown(AGAIN, page) and (shown(NOTICES[done], page) if done else True)
        assert 'class="banner error"' not in page and secret_on(page) is None  # shown once
        assert shown(GONE, page) == ("flash=" in location)
    # A cookie session's form without a nonce, with a forged one or one of another session
    # does nothing either.
    other = Session(n).hidden()["nonce"]
    before = state(n)
    for nonce in ("", "1.abcdefghijklmnop." + "0" * 32, other, "x" * 5000):
        fields = {**s.hidden(), "balance_sats": "1"}
        fields["nonce"] = nonce
        status, location = s.post("/admin/keys", fields)
        assert status == 303 and "done=form_expired" in location, (nonce[:40], location)
    assert state(n) == before
    assert shown(NOTICES["form_expired"], s.get("/admin/?done=form_expired"))


def test_new_key_shown_once_never_in_the_url_or_the_database(node_factory: Any,
                                                              tmp_path: Path) -> None:
    n = node_factory("--admin-token", ADMIN)
    s = Session(n)
    status, location = s.post("/admin/keys", {**s.hidden(), "balance_sats": "10"})
    assert status == 303 and "flash=" in location and "sk-" not in location
    # Another session cannot read this one's message (and does not use it up).
    intruder = Session(n).get(location)
    assert secret_on(intruder) is None and shown(GONE, intruder)
    page = s.get(location)
    secret = secret_on(page)
    assert secret is not None and secret.startswith("sk-") and page.count(secret) == 1
    assert api(n, "GET", "/admin/api/keys")[1]["data"][0]["hint"] == secret[-4:]
    # A reload shows it no more, and says so.
    again = s.get(location)
    assert secret_on(again) is None and shown(GONE, again)
    assert shown(NOTICES["key_created"], again)
    # The node keeps only the key's hash: the sk- value never reached the database file.
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("node.sqlite3*"))
    assert secret.encode() not in raw and secret[3:].encode() not in raw
    assert secret not in n.log_text()


def test_concurrent_double_submit_across_workers_makes_one_key(node_factory: Any) -> None:
    """Two worker processes: the nonce and the flash live in the database, so a repeat lands
    on either process and is still caught, and the new key is shown whichever one answers."""
    n = node_factory("--admin-token", ADMIN, "--workers", "2")
    s = Session(n)
    for _ in range(3):
        before = api(n, "GET", "/admin/api/keys")[1]["total"]
        form = {**s.hidden(), "balance_sats": "10"}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: s.post("/admin/keys", form), range(6)))
        assert {status for status, _ in answers} == {303}
        firsts = [loc for _, loc in answers if "again=1" not in loc]
        assert len(firsts) == 1, answers
        assert all(loc in (firsts[0], admin_forms.again(firsts[0])) for _, loc in answers)
        assert api(n, "GET", "/admin/api/keys")[1]["total"] == before + 1
        assert secret_on(s.get(firsts[0])) is not None  # on whichever worker answers


@pytest.mark.mint
def test_withdraw_form_redirects_shows_the_token_once_and_refuses_a_replay(
        node_factory: Any, upstream: ScriptedUpstream, mint_url: str) -> None:
    n = node_factory("--admin-token", ADMIN, "--upstream-base-url", upstream.url,
                     "--cashu-mints", mint_url)
    api(n, "PUT", "/admin/api/prices/gpt-4o-mini", {"request_msats": 120_000})
    tool = WalletTool()
    chat(n, tool.mint_token(mint_url, 300))  # earnings in ecash: about 120 sats withdrawable
    total = api(n, "GET", "/admin/api/wallet")[1]["total"]
    s = Session(n)
    form = {**s.hidden(), "amount_sats": "40"}
    status, location = s.post("/admin/wallet/withdraw", form)
    assert status == 303 and "done=withdrawn" in location and "flash=" in location
    assert "cashu" not in location.lower()
    # A double click: the repeat withdraws nothing more and lands on the first answer, which
    # (not yet seen) still shows the token — once.
    status, repeat = s.post("/admin/wallet/withdraw", form)
    assert status == 303 and repeat == admin_forms.again(location)
    assert api(n, "GET", "/admin/api/wallet")[1]["total"] == total - 40
    page = s.get(repeat)
    token = secret_on(page)
    assert token is not None and token.startswith("cashuB") and shown(AGAIN, page)
    assert secret_on(s.get(location)) is None and secret_on(s.get(repeat)) is None
    assert tool.receive(mint_url, token) == 40  # a real token, of the amount asked for
    assert token not in n.log_text()


def test_forms_rules_in_process(tmp_path: Path) -> None:
    db = Database(tmp_path / "forms.sqlite3")
    now = [1_700_000_000]
    forms = admin_forms.Forms(db, lambda: now[0])
    cred = "session-token-a"
    try:
        # Sealing: round trip; another credential or id, or one flipped bit, opens nothing.
        sealed = admin_forms.seal(cred, "id1", {"secret": {"value": "sk-xyz"}})
        assert b"sk-xyz" not in sealed
        assert admin_forms.unseal(cred, "id1", sealed) == {"secret": {"value": "sk-xyz"}}
        assert admin_forms.unseal("session-token-b", "id1", sealed) is None
        assert admin_forms.unseal(cred, "id2", sealed) is None
        assert admin_forms.unseal(cred, "id1", sealed[:-1] + bytes([sealed[-1] ^ 1])) is None
        assert admin_forms.unseal(cred, "id1", b"short") is None
        # A flash is read once, and not after its TTL.
        loc = forms.finish(cred, admin_forms.Claim(), {"kq": "ab"}, "key_created",
                           secret={"value": "sk-1"})
        assert loc.startswith("/admin/?kq=ab&done=key_created&flash=") and loc.endswith("#keys")
        fid = urllib.parse.parse_qs(urllib.parse.urlsplit(loc).query)["flash"][0]
        assert forms.take("session-token-b", fid).gone
        assert forms.take(cred, fid).secret == {"value": "sk-1"}
        assert forms.take(cred, fid).gone
        loc = forms.finish(cred, admin_forms.Claim(), {}, "", error="nope")
        fid = urllib.parse.parse_qs(urllib.parse.urlsplit(loc).query)["flash"][0]
        now[0] += admin_forms.FLASH_TTL_S
        assert forms.take(cred, fid).gone
        # Nonces: used once; an old one (past the TTL) or one "from the future" is refused.
        nonce = forms.nonce(cred)
        first = anyio.run(lambda: forms.claim(cred, nonce, {}, required=True))
        assert first.redirect == "" and first.nonce_hash
        forms.finish(cred, first, {}, "price_set")
        second = anyio.run(lambda: forms.claim(cred, nonce, {}, required=True))
        assert second.redirect == admin_forms.again("/admin/?done=price_set#prices")
        old = forms.nonce(cred)
        now[0] += admin_forms.NONCE_TTL_S
        late = anyio.run(lambda: forms.claim(cred, old, {}, required=True))
        assert "done=form_expired" in late.redirect
        early = admin_forms.issue_nonce(cred, now[0] + admin_forms.NONCE_SKEW_S + 5)
        assert "done=form_expired" in anyio.run(
            lambda: forms.claim(cred, early, {}, required=True)).redirect
        assert anyio.run(lambda: forms.claim(cred, "", {}, required=False)) == admin_forms.Claim()
        # Bounded: at most MAX_FLASHES wait; expired nonces are dropped with the next use.
        for _ in range(80):
            forms.finish(cred, admin_forms.Claim(), {}, "", error="e")
        count = db.read(lambda c: c.execute("SELECT COUNT(*) FROM admin_flash").fetchone()[0])
        assert count == 64
        def used() -> list[str]:
            return db.read(lambda c: [r[0] for r in c.execute(
                "SELECT nonce_hash FROM admin_used_nonces").fetchall()])

        assert used() == [first.nonce_hash]  # expired by now: dropped with the next use
        fresh = anyio.run(lambda: forms.claim(cred, forms.nonce(cred), {}, required=True))
        assert used() == [fresh.nonce_hash]
    finally:
        db.close()


@pytest.mark.parametrize("flash_id", ["", "x" * 65, "%00", "../../etc"])
def test_odd_flash_ids_are_harmless(tmp_path: Path, flash_id: str) -> None:
    db = Database(tmp_path / "odd.sqlite3")
    try:
        flash = admin_forms.Forms(db, lambda: 1).take("cred", flash_id)
        assert flash.secret == {} and flash.error == "" and flash.gone == bool(flash_id)
    finally:
        db.close()
