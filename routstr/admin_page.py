"""The dashboard's HTML: one self-contained page, rendered on the server.

No external assets and no build step: the CSS and a few lines of JavaScript are inline, both
under the response's CSP nonce; they, the page's frame and the login form are package files
(routstr/templates/admin.css, admin.js, admin.html, admin_login.html) read once at import. The
earnings chart is inline SVG, and every table and form works without JavaScript (Tor Browser at
"safer"): forms post to `/admin/...`, which redirect back here (`admin_forms`: post → redirect →
get, a one-use nonce per page). Script only adds a confirmation before deleting, a copy button,
and ignores a second click on a form already sent (the server ignores a repeated form anyway).
Light and dark follow ``prefers-color-scheme``.
Every value from the database or the request is escaped (`_e`).

Pure: `dashboard_page(Dashboard)` and `login_page(...)` return strings; `admin` gathers the data.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from string import Template
from typing import Any, Final
from urllib.parse import urlencode

# Query parameters that describe the page's state (kept across forms and redirects).
QUERY_FIELDS: Final = ("kq", "ko", "tk", "tkind", "tsince", "tuntil", "to", "done")
# Where a finished action sends the browser back to.
ANCHORS: Final = {
    "key_created": "keys", "key_disabled": "keys", "key_enabled": "keys",
    "key_deleted": "keys", "key_limits": "keys", "key_granted": "keys",
    "price_set": "prices", "price_reset": "prices", "withdrawn": "wallet",
    "paid_out": "wallet",
}
NOTICES: Final = {
    "key_created": "Key created.",
    "key_disabled": "Key disabled: it can no longer pay for requests.",
    "key_enabled": "Key enabled.",
    "key_deleted": "Key deleted.",
    "key_limits": "Limits saved.",
    "key_granted": "Balance granted.",
    "price_set": "Price saved; it applies to the next request.",
    "price_reset": "Price override removed.",
    "withdrawn": "Withdrawn as a Cashu token.",
    "paid_out": "Paid out over Lightning.",
    "already_submitted": "That form was already submitted; nothing was done again.",
    "form_expired": "That form is out of date (or from another session); nothing was done."
                    " Use the forms on this page.",
}
AGAIN: Final = "That form was already submitted; nothing was done again. Its result:"
GONE: Final = ("This page's one-time message was already shown; it is not shown again"
               " (reloading the page repeats nothing).")


@dataclass
class Dashboard:
    name: str
    version: str
    now: int
    query: dict[str, str]
    overview: dict[str, Any]
    keys: dict[str, Any]
    transactions: dict[str, Any]
    tx_kinds: list[str]
    prices: dict[str, Any]
    health: dict[str, Any]
    settings: dict[str, Any]
    wallet: dict[str, Any] | None
    wallet_error: str
    csrf: str
    notice: str = ""
    error: str = ""
    secret: dict[str, str] = field(default_factory=dict)
    nonce: str = ""  # the CSP nonce of this response's style and script
    form_nonce: str = ""  # the one-use nonce every state-changing form posts (admin_forms)
    again: bool = False  # this page answers a repeated form
    flash_gone: bool = False  # asked for a one-time message that was already shown


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def sats(msats: int) -> str:
    """msats as sats: '1,234' or '1,234.567'."""
    sign = "-" if msats < 0 else ""
    whole, frac = divmod(abs(msats), 1000)
    return f"{sign}{whole:,}" + (f".{frac:03d}" if frac else "")


def _amount(msats: int | None) -> str:
    if msats is None:
        return '<span class="muted">–</span>'
    return f'<span title="{msats:,} msats">{sats(msats)}</span>'


def _when(ts: int | None) -> str:
    if ts is None:
        return '<span class="muted">–</span>'
    stamp = dt.datetime.fromtimestamp(ts, dt.UTC)
    return f'<time datetime="{stamp.isoformat()}">{stamp:%Y-%m-%d %H:%M}</time>'


def _href(query: Mapping[str, str], anchor: str, **changes: object) -> str:
    merged = {k: v for k, v in query.items() if k != "done"}
    for k, v in changes.items():
        merged[k] = "" if v is None else str(v)
    kept = {k: v for k, v in merged.items() if v not in ("", "0")}
    return _e("/admin/" + ("?" + urlencode(kept) if kept else "") + "#" + anchor)


def _hidden(query: Mapping[str, str], csrf: str, skip: Sequence[str] = (),
            form_nonce: str = "") -> str:
    out = [f'<input type="hidden" name="csrf" value="{_e(csrf)}">'] if csrf else []
    if form_nonce:
        out.append(f'<input type="hidden" name="nonce" value="{_e(form_nonce)}">')
    for k in QUERY_FIELDS:
        if k != "done" and k not in skip and query.get(k):
            out.append(f'<input type="hidden" name="{k}" value="{_e(query[k])}">')
    return "".join(out)


def _posting(v: Dashboard) -> str:
    """The hidden fields of a form that changes something: CSRF token, form nonce, view."""
    return _hidden(v.query, v.csrf, form_nonce=v.form_nonce)


# --------------------------------------------------------------------------------------------
# Style and script
# --------------------------------------------------------------------------------------------

_TEMPLATES = resources.files(__package__).joinpath("templates")
_PAGE: Final = Template(_TEMPLATES.joinpath("admin.html").read_text("utf-8"))
_LOGIN: Final = Template(_TEMPLATES.joinpath("admin_login.html").read_text("utf-8"))
_CSS: Final = _TEMPLATES.joinpath("admin.css").read_text("utf-8")
_JS: Final = _TEMPLATES.joinpath("admin.js").read_text("utf-8")


def _document(title: str, body: str, nonce: str) -> str:
    """The page: `body` with the style and script, both under the response's CSP `nonce`."""
    return _PAGE.substitute(title=_e(title), nonce=_e(nonce), css=_CSS, js=_JS, body=body)


# --------------------------------------------------------------------------------------------
# Login
# --------------------------------------------------------------------------------------------


def login_page(*, name: str, error: str, nonce: str) -> str:
    err = f'<p class="banner error" role="alert">{_e(error)}</p>' if error else ""
    return _document(f"{name} · admin login", _LOGIN.substitute(name=_e(name), error=err), nonce)


# --------------------------------------------------------------------------------------------
# Dashboard sections
# --------------------------------------------------------------------------------------------


def _card(label: str, value: str, sub: str = "") -> str:
    return (f'<div class="card"><div class="label">{_e(label)}</div>'
            f'<div class="value">{value}</div><div class="sub">{sub}</div></div>')


def earnings_chart(points: Sequence[Mapping[str, int]]) -> str:
    """Inline SVG bars of msats earned per hour (UTC), with a <title> per bar."""
    width, height, left, bottom, top = 720, 180, 48, 22, 10
    plot_w, plot_h = width - left - 8, height - bottom - top
    peak = max((p["msats"] for p in points), default=0)
    n = max(len(points), 1)
    slot = plot_w / n
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img"'
             ' aria-label="msats earned per hour, last 24 hours">',
             f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - 8}"'
             f' y2="{top + plot_h}"/>',
             f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>']
    if peak:
        parts.append(f'<text x="{left - 6}" y="{top + 8}" text-anchor="end">{_e(sats(peak))}'
                     "</text>")
    for i, p in enumerate(points):
        h = 0.0 if peak == 0 else plot_h * p["msats"] / peak
        x = left + i * slot + slot * 0.12
        hour = dt.datetime.fromtimestamp(p["hour"], dt.UTC)
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{slot * 0.76:.1f}"'
            f' height="{max(h, 0):.1f}"><title>{hour:%Y-%m-%d %H}:00 UTC: {p["msats"]:,} msats'
            "</title></rect>")
        if i % 6 == 0 or i == len(points) - 1:
            parts.append(f'<text x="{x + slot * 0.38:.1f}" y="{height - 6}"'
                         f' text-anchor="middle">{hour:%H}:00</text>')
    if peak == 0:
        parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{top + plot_h / 2:.0f}"'
                     ' text-anchor="middle">no earnings in the last 24 hours</text>')
    parts.append("</svg>")
    return "".join(parts)


def _overview(v: Dashboard) -> str:
    o = v.overview
    free = o.get("withdrawable_sats")
    cards = "".join([
        _card("Earnings", _amount(o["earnings_msats"]) + " sat",
              f"{sats(o['earnings_24h_msats'])} sat in 24 h"
              + ("" if free is None else
                 f' · <span id="withdrawable">{int(free):,}</span> sat withdrawable')),
        _card("Requests", f"{o['requests']:,}", f"{o['requests_24h']:,} in 24 h"),
        _card("Active keys (24 h)", f"{o['active_keys']:,}",
              f"{o['keys']:,} keys · {o['funded_keys']:,} funded · {o['disabled_keys']:,}"
              " disabled"),
        _card("Reserved", _amount(o["reserved_msats"]) + " sat",
              f"{o['reservations']:,} requests in flight"),
        _card("Held for users", _amount(o["liability_msats"]) + " sat",
              f"deposited {sats(o['deposited_msats'])} · granted {sats(o['granted_msats'])}"
              f" · refunded {sats(o['refunded_msats'])}"),
    ])
    return (f'<section id="overview"><h2>Overview</h2><div class="cards">{cards}</div>'
            f'<p class="muted" id="earnings-note">{_e(o.get("withdrawable_note", ""))}</p>'
            '<h3>Earned per hour (sats, UTC, last 24 h)</h3>'
            f'{earnings_chart(o["earnings_per_hour"])}</section>')


def _pager(v: Dashboard, page: Mapping[str, Any], param: str, anchor: str, what: str) -> str:
    total, limit, offset = page["total"], page["limit"], page["offset"]
    shown = len(page["data"])
    first = offset + 1 if shown else 0
    links = []
    if offset > 0:
        newer = _href(v.query, anchor, **{param: max(0, offset - limit)})
        links.append(f'<a rel="prev" href="{newer}">← Newer</a>')
    if page["has_more"]:
        older = _href(v.query, anchor, **{param: offset + limit})
        links.append(f'<a rel="next" href="{older}">Older →</a>')
    return (f'<div class="pager"><span class="muted">{what} {first:,}–{offset + shown:,}'
            f' of {total:,}</span>{"".join(links)}</div>')


def _limit_text(k: Mapping[str, Any]) -> str:
    parts = []
    if k["balance_limit_msats"] is not None:
        parts.append(f"{sats(k['balance_limit_msats'])} sat"
                     + (f"/{k['balance_limit_reset']}" if k["balance_limit_reset"] else ""))
    if k["validity_date"] is not None:
        stamp = dt.datetime.fromtimestamp(k["validity_date"], dt.UTC)
        parts.append(f"until {stamp:%Y-%m-%d %H:%M}")
    return _e(", ".join(parts)) if parts else '<span class="muted">–</span>'


def _key_actions(v: Dashboard, k: Mapping[str, Any]) -> str:
    hidden = _posting(v)
    act = f'/admin/keys/{k["id"]}'
    toggle = "enable" if k["disabled"] else "disable"
    valid = ""
    if k["validity_date"] is not None:
        valid = f"{dt.datetime.fromtimestamp(k['validity_date'], dt.UTC):%Y-%m-%dT%H:%M}"
    limit = sats(k["balance_limit_msats"]) if k["balance_limit_msats"] is not None else ""
    resets = "".join(
        f'<option value="{r}"{" selected" if k["balance_limit_reset"] == r else ""}>{r}</option>'
        for r in ("", "daily", "weekly", "monthly"))
    return (
        f'<form class="inline" method="post" action="{act}">{hidden}'
        f'<button name="action" value="{toggle}" type="submit">{toggle.title()}</button></form> '
        f'<form class="inline" method="post" action="{act}" data-confirm="Delete key'
        f' #{k["id"]}? It can never be used again.">{hidden}'
        '<button class="danger" name="action" value="delete" type="submit">Delete</button>'
        "</form> "
        f'<details><summary>Limits</summary><form class="row" method="post" action="{act}">'
        f'{hidden}<input type="hidden" name="action" value="limits">'
        f'<label>Limit (sat, blank = none)<input name="limit_sats" value="{_e(limit)}"'
        ' inputmode="decimal"></label>'
        f'<label>Resets<select name="limit_reset">{resets}</select></label>'
        f'<label>Valid until (UTC)<input type="datetime-local" name="valid_until"'
        f' value="{valid}"></label><button type="submit">Save</button></form></details> '
        f'<details><summary>Grant</summary><form class="row" method="post" action="{act}">'
        f'{hidden}<input type="hidden" name="action" value="grant">'
        '<label>Amount (sat)<input name="amount_sats" inputmode="decimal" required></label>'
        '<button type="submit">Grant</button></form></details> '
        f'<a href="{_href(v.query, "transactions", tk="#" + str(k["id"]), to=0)}">History</a>'
    )


def _keys(v: Dashboard) -> str:
    rows = []
    for k in v.keys["data"]:
        status = ('<span class="badge bad">disabled</span>' if k["disabled"]
                  else '<span class="badge ok">active</span>')
        parent = f' <span class="muted">child of #{k["parent_id"]}</span>' if k["parent_id"] else ""
        rows.append(
            f'<tr data-key-id="{k["id"]}"><td class="num" data-label="#">#{k["id"]}</td>'
            f'<td data-label="Key"><code>{_e(k["key"])}</code>{parent}</td>'
            f'<td data-label="Kind">{_e(k["kind"])}</td>'
            f'<td class="num" data-label="Balance (sat)">{_amount(k["balance_msats"])}</td>'
            f'<td class="num" data-label="Reserved">{_amount(k["reserved_msats"])}</td>'
            f'<td class="num" data-label="Spent">{_amount(k["usage_msats"])}</td>'
            f'<td class="num" data-label="Requests">{k["total_requests"]:,}</td>'
            f'<td data-label="Limit">{_limit_text(k)}</td>'
            f'<td data-label="Created (UTC)">{_when(k["created_at"])}</td>'
            f'<td data-label="Last used">{_when(k["last_used_at"])}</td>'
            f'<td data-label="Status">{status}</td>'
            f'<td class="actions"><div class="acts">{_key_actions(v, k)}</div></td></tr>')
    if not rows:
        rows.append('<tr><td colspan="12" class="muted">No keys match.</td></tr>')
    search = v.query.get("kq", "")
    hidden = _posting(v)
    return (
        '<section id="keys"><h2>Keys</h2>'
        '<form class="row" method="get" action="/admin/#keys">'
        f'{_hidden(v.query, "", skip=("kq", "ko"))}'
        f'<label>Search (last 4 characters, or a whole key)<input name="kq" value="{_e(search)}"'
        ' maxlength="200" placeholder="abcd"></label><button type="submit">Search</button>'
        + (f' <a href="{_href(v.query, "keys", kq="", ko=0)}">clear</a>' if search else "")
        + "</form>"
        f'<form class="row" method="post" action="/admin/keys">{hidden}'
        '<label>New key: balance (sat)<input name="balance_sats" inputmode="decimal"'
        ' required value="0"></label>'
        '<label>Limit (sat, optional)<input name="limit_sats" inputmode="decimal"></label>'
        '<label>Resets<select name="limit_reset"><option value=""></option>'
        '<option>daily</option><option>weekly</option><option>monthly</option></select></label>'
        '<label>Valid until (UTC, optional)<input type="datetime-local" name="valid_until">'
        '</label><button class="primary" type="submit">Create key</button></form>'
        '<div class="scroll"><table id="keys-table" class="stack"><thead><tr>'
        '<th class="num">#</th><th>Key</th>'
        '<th>Kind</th><th class="num">Balance (sat)</th><th class="num">Reserved</th>'
        '<th class="num">Spent</th><th class="num">Requests</th><th>Limit</th><th>Created (UTC)'
        "</th><th>Last used</th><th>Status</th><th>Actions</th></tr></thead>"
        f'<tbody>{"".join(rows)}</tbody></table></div>'
        f'{_pager(v, v.keys, "ko", "keys", "keys")}</section>'
    )


def _transactions(v: Dashboard) -> str:
    rows = []
    for t in v.transactions["data"]:
        child = f' <span class="muted">child #{t["child_id"]}</span>' if t["child_id"] else ""
        rows.append(
            f'<tr><td class="num" data-label="#">{t["id"]}</td>'
            f'<td data-label="Time (UTC)">{_when(t["time"])}</td>'
            f'<td data-label="Kind">{_e(t["kind"])}</td>'
            f'<td data-label="Key">#{t["key_id"]} <code>{_e(t["key"])}</code>{child}</td>'
            f'<td class="num" data-label="Amount (sat)">{_amount(t["amount_msats"])}</td>'
            f'<td class="wrap muted wide" data-label="Memo">{_e(t["memo"])}</td></tr>')
    if not rows:
        rows.append('<tr><td colspan="6" class="muted">No transactions match.</td></tr>')
    q = v.query
    kinds = "".join(f'<option{" selected" if q.get("tkind") == k else ""}>{_e(k)}</option>'
                    for k in v.tx_kinds)
    return (
        '<section id="transactions"><h2>Transactions</h2>'
        '<form class="row" method="get" action="/admin/#transactions">'
        f'{_hidden(q, "", skip=("tk", "tkind", "tsince", "tuntil", "to"))}'
        f'<label>Key (#id or last 4)<input name="tk" value="{_e(q.get("tk", ""))}"'
        ' maxlength="200"></label>'
        f'<label>Kind<select name="tkind"><option value="">any</option>{kinds}</select></label>'
        f'<label>From (UTC)<input type="datetime-local" name="tsince"'
        f' value="{_e(q.get("tsince", ""))}"></label>'
        f'<label>Until (UTC)<input type="datetime-local" name="tuntil"'
        f' value="{_e(q.get("tuntil", ""))}"></label><button type="submit">Filter</button>'
        f' <a href="{_href(q, "transactions", tk="", tkind="", tsince="", tuntil="", to=0)}">'
        "clear</a></form>"
        '<div class="scroll"><table id="tx-table"><thead><tr><th class="num">#</th>'
        '<th>Time (UTC)</th><th>Kind</th><th>Key</th><th class="num">Amount (sat)</th>'
        f'<th>Memo</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
        f'{_pager(v, v.transactions, "to", "transactions", "rows")}</section>'
    )


def _wallet(v: Dashboard) -> str:
    if v.wallet is None:
        text = v.wallet_error or "No Cashu wallet: the node has no mint configured" \
            " (<code>--cashu-mints</code>)."
        return f'<section id="wallet"><h2>Wallet</h2><p class="muted">{text}</p></section>'
    w = v.wallet
    unit = _e(w.get("unit", "sat"))
    mints = "".join(
        f'<tr><td>{_e(m["mint"])}</td><td class="num">{m["balance"]:,}</td>'
        f'<td class="num">{m["proofs"]:,}</td></tr>' for m in w.get("mints", []))
    if not mints:
        mints = '<tr><td colspan="3" class="muted">No proofs yet.</td></tr>'
    pending = "".join(
        f'<tr><td class="num">{p["id"]}</td><td>{_e(p["kind"])}</td><td>{_e(p["mint"])}</td>'
        f'<td class="num">{p["amount"]:,}</td><td>{_when(p.get("created_at"))}</td></tr>'
        for p in w.get("pending", []))
    if not pending:
        pending = '<tr><td colspan="5" class="muted">None.</td></tr>'
    facts = "".join(
        f"<dt>{_e(k.replace('_', ' '))}</dt><dd>{_e(f'{val:,}' if isinstance(val, int) else val)}"
        "</dd>" for k, val in w.items()
        if k not in ("mints", "pending", "unit") and isinstance(val, (int, str)))
    hidden = _posting(v)
    options = "".join(f'<option value="{_e(m["mint"])}">{_e(m["mint"])}</option>'
                      for m in w.get("mints", []))
    return (
        f'<section id="wallet"><h2>Wallet</h2><dl class="cards">{facts}</dl>'
        '<div class="scroll"><table id="wallet-table"><thead><tr><th>Mint</th>'
        f'<th class="num">Balance ({unit})</th><th class="num">Proofs</th></tr></thead>'
        f"<tbody>{mints}</tbody></table></div>"
        '<h3>Pending operations</h3><div class="scroll"><table><thead><tr><th class="num">#'
        '</th><th>Kind</th><th>Mint</th><th class="num">Amount</th><th>Since (UTC)</th></tr>'
        f"</thead><tbody>{pending}</tbody></table></div>"
        '<h3>Take earnings out</h3>'
        f'<form class="row" method="post" action="/admin/wallet/withdraw">{hidden}'
        f'<label>Amount ({unit})<input type="number" name="amount_sats" min="1" required></label>'
        f'<label>Mint<select name="mint"><option value="">any</option>{options}</select></label>'
        '<button type="submit">Withdraw as Cashu token</button></form>'
        f'<form class="row" method="post" action="/admin/wallet/payout" data-confirm="Pay out'
        f' now?">{hidden}<label>Lightning address<input name="lightning_address"'
        ' placeholder="name@example.com" required></label>'
        f'<label>Amount ({unit})<input type="number" name="amount_sats" min="1" required></label>'
        '<button type="submit">Pay out now</button></form></section>'
    )


def _price_cell(x: int | float | None) -> str:
    """A price field: msats (a USD entry's rates at the current BTC/USD are fractional)."""
    if x is None:
        return "—"
    return f"{x:,}" if isinstance(x, int) else f"{x:,.3f}"


def _prices(v: Dashboard) -> str:
    p = v.prices
    fields = p["fields"]
    hidden = _posting(v)
    heads = "".join(f'<th class="num">{_e(f.replace("_msats", "").replace("_", " "))}</th>'
                    for f in fields)
    rows = []
    for m in p["data"]:
        cells = "".join(f'<td class="num">{_price_cell(m[f])}</td>' for f in fields)
        if m["overridden"]:
            status = (
                '<span class="badge warn">override</span> '
                f'<form class="inline" method="post" action="/admin/prices">{hidden}'
                f'<input type="hidden" name="model" value="{_e(m["id"])}">'
                '<button name="action" value="reset" type="submit">Reset</button></form>')
        else:
            status = '<span class="muted">configured</span>'
        rows.append(f'<tr data-model="{_e(m["id"])}"><td><code>{_e(m["id"])}</code></td>'
                    f"{cells}<td>{status}</td></tr>")
    datalist = "".join(f'<option value="{_e(m["id"])}">' for m in p["data"])
    inputs = "".join(
        f'<label>{_e(f)}<input type="number" min="0" name="{_e(f)}"></label>' for f in fields)
    default = ""
    if p.get("default"):
        default = ('<p class="muted">Models not listed are priced at the default: '
                   + _e(", ".join(f"{k} {_price_cell(val)}" for k, val in p["default"].items()
                                  if k in fields)) + "</p>")
    return (
        '<section id="prices"><h2>Prices</h2>'
        '<p class="muted">msats per 1,000 tokens (in / out), per request, and the limits used'
        " for the worst-case reservation. Overrides are stored in the database and apply at"
        " once; blank fields keep their value.</p>"
        f'<form class="row" method="post" action="/admin/prices">{hidden}'
        '<label>Model<input name="model" list="models" required maxlength="200"></label>'
        f'<datalist id="models">{datalist}</datalist>{inputs}'
        '<button class="primary" name="action" value="set" type="submit">Save override</button>'
        '<button name="action" value="reset" type="submit">Reset to configured</button></form>'
        f"{default}"
        '<div class="scroll"><table id="prices-table"><thead><tr><th>Model</th>'
        f'{heads}<th>Source</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
        "</section>"
    )


def _health(v: Dashboard) -> str:
    h = v.health
    rows = "".join(
        f"<tr><td>{_e(name)}</td><td>"
        + (f'<span class="badge ok">{_e(state)}</span>' if state in ("ok", "not_configured")
           else f'<span class="badge bad">{_e(state)}</span>') + "</td></tr>"
        for name, state in h["checks"].items())
    facts = "".join(f"<tr><td>{_e(k.replace('_', ' '))}</td><td>{_e(h[k])}</td></tr>"
                    for k in ("version", "schema_version", "uptime_s", "models",
                              "price_overrides", "wallet") if k in h)
    settings = "".join(
        f"<tr><td><code>{_e(k)}</code></td><td class=\"wrap\">"
        f"{_e(', '.join(map(str, val)) if isinstance(val, list) else val)}</td></tr>"
        for k, val in v.settings.items())
    return (
        f'<section id="health"><h2>Health</h2><div class="scroll"><table>{rows}{facts}</table>'
        '</div></section><section id="settings"><h2>Settings</h2>'
        '<p class="muted">Read-only: set by flags or the environment at start; secrets masked.'
        f'</p><div class="scroll"><table id="settings-table">{settings}</table></div></section>'
    )


def _banners(v: Dashboard) -> str:
    out = [f'<p class="banner warn" role="status" data-setup>{_e(reason)}</p>'
           for reason in v.health.get("reasons") or ()]  # no upstream, demo mode, …
    if v.error:
        out.append(f'<p class="banner error" role="alert">{_e(v.error)}</p>')
    if v.again:
        out.append(f'<p class="banner notice" role="status" id="again">{_e(AGAIN)}</p>')
    if v.notice:
        out.append(f'<p class="banner notice" role="status">{_e(NOTICES.get(v.notice, v.notice))}'
                   "</p>")
    if v.flash_gone:
        out.append(f'<p class="banner notice" role="status" id="flash-gone">{_e(GONE)}</p>')
    if v.secret:
        out.append(
            f'<div class="banner secret" id="secret"><strong>{_e(v.secret.get("label"))}</strong>'
            f'<code id="secret-value">{_e(v.secret.get("value"))}</code>'
            '<button type="button" data-copy="secret-value" hidden>Copy</button>'
            ' <span class="muted">Store it now: the node keeps only a hash.</span></div>')
    return "".join(out)


def dashboard_page(v: Dashboard) -> str:
    healthy = v.health.get("status") == "healthy"
    badge = (f'<span class="badge {"ok" if healthy else "bad"}">'
             f'{_e(v.health.get("status"))}</span>')
    logout = (
        '<form class="inline" method="post" action="/admin/logout">'
        + (f'<input type="hidden" name="csrf" value="{_e(v.csrf)}">' if v.csrf else "")
        + '<button type="submit">Log out</button></form>')
    body = (
        f'<header id="top"><div><h1>{_e(v.name)}</h1><div class="meta">routstr {_e(v.version)}'
        f" · {_when(v.now)} UTC · {badge}</div></div>{logout}</header>"
        '<nav><a href="#overview">Overview</a><a href="#keys">Keys</a>'
        '<a href="#transactions">Transactions</a><a href="#wallet">Wallet</a>'
        '<a href="#prices">Prices</a><a href="#health">Health</a>'
        '<a href="#settings">Settings</a></nav>'
        f"<main>{_banners(v)}{_overview(v)}{_keys(v)}{_transactions(v)}{_wallet(v)}"
        f"{_prices(v)}{_health(v)}</main>"
    )
    return _document(f"{v.name} · admin", body, v.nonce)
