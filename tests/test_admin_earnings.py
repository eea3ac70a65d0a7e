"""Earnings and what of them is withdrawable, side by side (dashboard and /admin/api/overview):
the withdrawable figure is the one a withdrawal is refused with, and a line says why it is less
(earnings paid from admin-granted balance are not ecash; users' money is held back)."""

from __future__ import annotations

import html
from typing import Any

import pytest

from routstr.admin_page import sats
from tests.support.mint import WalletTool
from tests.support.upstream import ScriptedUpstream
from tests.test_admin import ADMIN, AUTH, api, call, chat, new_key
from tests.test_admin_forms import Session


def overview(n: Any) -> dict[str, Any]:
    status, doc = api(n, "GET", "/admin/api/overview")
    assert status == 200
    return dict(doc)


def refusal(n: Any, amount: int) -> dict[str, Any]:
    status, doc = api(n, "POST", "/admin/api/wallet/withdraw", {"amount_sats": amount})
    assert status == 400 and doc["error"]["code"] == "exceeds_earnings", doc
    return dict(doc["error"])


@pytest.mark.mint
def test_earnings_show_what_is_withdrawable_and_why(node_factory: Any, upstream: ScriptedUpstream,
                                                    mint_url: str) -> None:
    n = node_factory("--admin-token", ADMIN, "--upstream-base-url", upstream.url,
                     "--cashu-mints", mint_url)
    # A key funded by an admin grant spends on a request: earnings, but no ecash behind them.
    key = new_key(n, 0)
    status, _ = api(n, "POST", f"/admin/api/keys/{key['key']['id']}/grant",
                    {"amount_msats": 250_000})
    assert status == 200
    api(n, "PUT", "/admin/api/prices/gpt-4o-mini", {"request_msats": 214_867})
    chat(n, key["api_key"])
    o = overview(n)
    assert o["earnings_msats"] >= 214_867 and o["withdrawable_sats"] == 0
    assert o["withdrawable_msats"] == 0
    assert o["withdrawable_note"] == (
        f"Earnings {sats(o['earnings_msats'])} sat, of which 0 sat are withdrawable: earnings"
        " from admin-granted balance are not backed by ecash (250 sat granted in all);"
        " the wallet holds 0 sat of ecash; users' balances and requests in flight claim"
        " 36 sat of it (rounded up to whole sats).")  # 250 − 214.872, rounded up
    page = call(n, "GET", "/admin/", None, AUTH)[1]
    assert '<span id="withdrawable">0</span> sat withdrawable' in page
    assert html.escape(o["withdrawable_note"]) in page
    # Withdrawing refuses with the same number, through the API and the dashboard's form.
    err = refusal(n, 5)
    assert err["details"]["withdrawable"] == o["withdrawable_sats"] == 0
    assert err["message"].startswith("Only 0 sats are the node's own")
    s = Session(n)
    status, location = s.post("/admin/wallet/withdraw", {**s.hidden(), "amount_sats": "5"})
    assert status == 303
    assert html.escape("Only 0 sats are the node's own") in s.get(location)

    # Ecash earnings (a request paid with a 300-sat token): the figure follows, still the
    # refusal's; what was taken out is named once it is.
    tool = WalletTool()
    chat(n, tool.mint_token(mint_url, 300))
    o = overview(n)
    free = o["withdrawable_sats"]
    assert free > 0 and free == api(n, "GET", "/admin/api/wallet")[1]["withdrawable"]
    assert refusal(n, free + 1)["details"]["withdrawable"] == free
    assert f"Only {free} sats are the node's own" in refusal(n, free + 1)["message"]
    assert f'<span id="withdrawable">{free:,}</span>' in call(n, "GET", "/admin/", None, AUTH)[1]
    status, doc = api(n, "POST", "/admin/api/wallet/withdraw", {"amount_sats": 10})
    assert status == 200 and tool.receive(mint_url, doc["token"]) == 10
    o = overview(n)
    assert o["withdrawable_sats"] == free - 10
    assert "10 sat were taken out before (withdrawals and payouts)" in o["withdrawable_note"]


def test_without_a_wallet_nothing_is_withdrawable_and_the_line_says_so(node_factory: Any) -> None:
    n = node_factory("--admin-token", ADMIN)
    o = overview(n)
    assert o["withdrawable_sats"] is None and o["withdrawable_msats"] is None
    assert o["withdrawable_note"] == ("Earnings 0 sat; none can be withdrawn here: this node"
                                      " has no Cashu wallet (no mint).")
    page = call(n, "GET", "/admin/", None, AUTH)[1]
    assert 'id="withdrawable"' not in page and html.escape(o["withdrawable_note"]) in page
