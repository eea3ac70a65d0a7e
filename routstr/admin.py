"""The admin API (`/admin/api/*`) and the dashboard (`/admin/`).

Authentication
    Every admin route but ``POST /admin/login`` needs one of

    * ``Authorization: Bearer <admin token>`` — the token's SHA-256 is compared with the
      configured one in constant time (`keys.secrets_equal`). An ``sk-`` key or a Cashu token
      is refused outright: no user credential ever reaches an admin route;
    * the session cookie set by ``POST /admin/login`` (the admin token posted as a form field
      or JSON). The cookie is ``HttpOnly; SameSite=Strict; Path=/admin`` (+ ``Secure`` when the
      request came over TLS — ``X-Forwarded-Proto: https`` from the reverse proxy); the
      database keeps only its hash; it expires after `SESSION_TTL_S` and dies when the admin
      token changes.

    Without either: 401 in the error shape of `errors` (a browser asking for HTML gets the
    login form, still with status 401). Failed token checks (login, Bearer, the ``/metrics``
    scrape: one shared `LoginLimiter`) are limited per client address and in total: past the
    limit a wrong token gets 429 with Retry-After; the right token is compared first and always
    gets in (no lockout of the operator by guessers).

CSRF
    A state-changing request (any method but GET/HEAD) authenticated by the cookie must carry
    the session's CSRF token (form field ``csrf`` or header ``X-CSRF-Token``; derived from the
    session token with HMAC, sent masked with a fresh random pad in every page so compression
    cannot leak it) and, when the browser sends an ``Origin``, it must be this host. Bearer
    requests need neither (a browser never adds that header by itself). SameSite=Strict keeps
    the cookie off cross-site requests in the first place.

The admin token
    ``--admin-token`` if given; else the one generated at first start by `ensure_admin_token`,
    written to the file ``<database>.admin-token`` (mode 0600, next to the database) — never
    to the log; ``__main__`` logs only the file's path. The database stores only its hash (in
    ``node_settings``); deleting the file does not change the token. ``python -m routstr
    admin-token rotate`` (`rotate_admin_token`) replaces a generated one: the hash is read on
    every admin request, so the new token works at once and the old one — and every session
    opened with it — stops working, without a restart.

Routes (JSON unless noted; amounts in msats, the wallet's in sats)
    ``GET /admin`` dashboard (HTML) · ``POST /admin/login`` · ``POST /admin/logout`` ·
    ``GET /admin/api/overview`` · ``GET|POST /admin/api/keys`` (``limit``, ``offset``,
    ``search``, ``kind``) · ``GET|PATCH|DELETE /admin/api/keys/{id}`` ·
    ``POST /admin/api/keys/{id}/grant`` · ``GET /admin/api/transactions`` (``key_id`` or
    ``key``, ``kind``, ``since``, ``until``, ``limit``, ``offset``) · ``GET /admin/api/prices``
    · ``PUT|DELETE /admin/api/prices/{model}`` · ``GET /admin/api/health`` ·
    ``GET /admin/api/settings`` · ``GET /admin/api/wallet`` ·
    ``POST /admin/api/wallet/withdraw`` · ``POST /admin/api/wallet/payout`` ·
    ``POST /admin/withdraw`` (routstr-core's) · dashboard forms: ``POST /admin/keys``,
    ``/admin/keys/{id}``, ``/admin/prices``, ``/admin/wallet/withdraw``,
    ``/admin/wallet/payout`` — each answers 303 to the page, a form posted twice does nothing
    the second time, a new key or token is shown once (`admin_forms`).

Everything the dashboard can do is also an API call; both use `admin_service.AdminService`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

from . import __version__, admin_forms, admin_page, admin_store
from .admin_service import MAX_PAGE, AdminService, AdminWallet
from .admin_service import create_key as create_key
from .config import Config, ConfigError
from .db import Database
from .errors import (
    ApiError,
    AuthenticationFailed,
    Forbidden,
    InvalidRequest,
    NotFound,
    RateLimited,
)
from .keys import secrets_equal
from .ledger import Ledger
from .messages import Request, Response, bounded_int, json_response
from .pricebook import PRICE_FIELDS, PriceBook
from .router import Route
from .wire import MAX_UNIX_S, wire_int

log = logging.getLogger("routstr.admin")

SESSION_COOKIE: Final = "routstr_admin"
SESSION_TTL_S: Final = 12 * 3600
LOGIN_WINDOW_S: Final = 60.0
LOGIN_MAX_FAILURES_PER_CLIENT: Final = 5
LOGIN_MAX_FAILURES_TOTAL: Final = 30
KEYS_PAGE: Final = 20
# The dashboard lists keys; one-request X-Cashu accounts stay in the API (`?kind=xcashu`).
DASHBOARD_KEY_KINDS: Final = ("api", "token", "child")
TX_PAGE: Final = 25
MAX_ADMIN_TOKEN_CHARS: Final = 512
USER_CREDENTIAL_PREFIXES: Final = ("sk-", "cashu")
ADMIN_TOKEN_FILE_SUFFIX: Final = ".admin-token"  # noqa: S105 - a file name

_CSRF_LABEL: Final = b"routstr admin csrf"
_EPOCH_LABEL: Final = b"routstr admin session epoch\x00"
_KIND_RE: Final = re.compile(r"[a-z_]{1,32}")
_SATS_RE: Final = re.compile(r"(\d{1,15})(?:\.(\d{1,3}))?")


# --------------------------------------------------------------------------------------------
# The admin token
# --------------------------------------------------------------------------------------------


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_admin_token(token: str) -> None:
    """A configured admin token must not look like a user credential (those are refused)."""
    if token.startswith(USER_CREDENTIAL_PREFIXES):
        raise ConfigError("--admin-token must not start with 'sk-' or 'cashu'"
                         " (user credentials are refused on admin routes)")
    if len(token) > MAX_ADMIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError("--admin-token must be at most 512 characters without spaces")


def admin_token_path(database: str) -> str | None:
    """Where a generated admin token is kept: ``<database>.admin-token`` (None in memory)."""
    if database == ":memory:" or database.startswith("file:"):
        return None
    return database + ADMIN_TOKEN_FILE_SUFFIX


def write_private_file(path: str, text: str) -> None:
    """`text` into `path`, readable by this user only (mode 0600 from the first byte: the
    file is created with that mode, an existing one is truncated and re-moded; a symlink in
    its place is refused)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_admin_token(db: Database, config: Config, *, now: int | None = None) -> str | None:
    """With no ``--admin-token`` and none stored: generate one, write it to the 0600 file
    `admin_token_path` (inside the transaction that stores its hash, so only the process that
    stores it writes the file) and return that file's path. Otherwise None.

    The token itself is never printed or logged: logs end up in journals and support tickets.
    """
    if config.admin_token:
        return None
    if db.read(admin_store.stored_admin_hash) is not None:
        return None
    path = admin_token_path(db.path)
    if path is None:
        log.warning("no --admin-token and the database is in memory: the admin API is closed")
        return None
    token = new_admin_token()
    t = int(time.time()) if now is None else now

    def op(conn: Any) -> bool:
        if admin_store.stored_admin_hash(conn) is not None:  # another process won
            return False
        admin_store.store_admin_hash(conn, token_hash(token), t)
        write_private_file(path, token + "\n")  # a failure rolls the hash back
        return True

    return path if db.transaction(op, durable=True) else None


def new_admin_token() -> str:
    return "adm-" + secrets.token_urlsafe(24)  # 192 random bits


def rotate_admin_token(db: Database, path: str, *, now: int | None = None) -> str:
    """A new generated admin token: its hash replaces the stored one and the token is written
    to the 0600 file `path`, in one transaction (a failed write keeps the old token). Returns
    the token (shown once by the command line)."""
    token = new_admin_token()
    t = int(time.time()) if now is None else now

    def op(conn: Any) -> None:
        admin_store.store_admin_hash(conn, token_hash(token), t)
        write_private_file(path, token + "\n")

    db.transaction(op, durable=True)
    return token


def resolve_admin_hash(db: Database, config: Config) -> str:
    """The hash admin credentials are checked against ('' = no admin access at all)."""
    if config.admin_token:
        return token_hash(config.admin_token)
    return db.read(admin_store.stored_admin_hash) or ""


# --------------------------------------------------------------------------------------------
# Login rate limit
# --------------------------------------------------------------------------------------------


class LoginLimiter:
    """Failed admin-token checks: at most N per client and M in total per sliding window.

    Only failures are limited: `check_admin_token_limited` compares the token first (in
    constant time) and lets the right one in whatever the counters say, so guesses — behind
    Tor every client is 127.0.0.1 — can never lock the operator out. Past the limit a wrong
    token gets 429 with Retry-After instead of 401 (and is not logged again), which bounds the
    log and the work a guesser causes; the token's entropy is what makes guessing hopeless
    (the generated one has 192 bits; choose a long ``--admin-token``).
    """

    def __init__(self, *, window_s: float = LOGIN_WINDOW_S,
                 per_client: int = LOGIN_MAX_FAILURES_PER_CLIENT,
                 total: int = LOGIN_MAX_FAILURES_TOTAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.per_client = per_client
        self.total = total
        self._clock = clock
        self._by_client: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()

    def _prune(self, now: float) -> None:
        edge = now - self.window_s
        while self._all and self._all[0] <= edge:
            self._all.popleft()
        for client in list(self._by_client):
            q = self._by_client[client]
            while q and q[0] <= edge:
                q.popleft()
            if not q:
                del self._by_client[client]

    def check(self, client: str) -> None:
        """429 when `client` (or everyone together) failed too often within the window."""
        now = self._clock()
        self._prune(now)
        mine = self._by_client.get(client)
        full = mine if mine is not None and len(mine) >= self.per_client else (
            self._all if len(self._all) >= self.total else None)
        if full is not None:
            wait = full[0] + self.window_s - now
            raise RateLimited(
                "Too many failed admin logins; try again later.", code="admin_login_rate_limited",
                details={"retry_after_s": max(1, int(wait + 0.999))},
                headers=[("retry-after", str(max(1, int(wait + 0.999))))])

    def failed(self, client: str) -> None:
        now = self._clock()
        self._by_client.setdefault(client, deque()).append(now)
        self._all.append(now)


def check_admin_token_limited(limiter: LoginLimiter, request: Request, token: str,
                              expected_hash: str) -> None:
    """Accept the admin token, or raise: 401 for a wrong one, 429 once wrong ones are over
    the limit. The comparison comes first, so the right token is never refused by the limit."""
    if expected_hash and secrets_equal(token_hash(token), expected_hash):
        return
    client = _client_address(request)
    limiter.check(client)
    limiter.failed(client)
    log.warning("failed admin authentication from %s", client)
    raise AuthenticationFailed("Invalid admin token", code="invalid_admin_token")


# --------------------------------------------------------------------------------------------
# Request helpers
# --------------------------------------------------------------------------------------------


def _client_address(request: Request) -> str:
    return request.client.rsplit(":", 1)[0] if request.client else "?"


def _is_form(request: Request) -> bool:
    ctype = (request.header("content-type") or "").split(";")[0].strip().lower()
    return ctype == "application/x-www-form-urlencoded"


def _form(request: Request) -> dict[str, str]:
    try:
        text = request.body.decode()
    except UnicodeDecodeError:
        raise InvalidRequest("Form body is not UTF-8", code="invalid_form") from None
    return dict(parse_qsl(text, keep_blank_values=True))


def _wants_html(request: Request) -> bool:
    return "text/html" in (request.header("accept") or "")


def _over_tls(request: Request) -> bool:
    proto = (request.header("x-forwarded-proto") or "").split(",")[0].strip().lower()
    forwarded = (request.header("forwarded") or "").lower()
    return proto == "https" or "proto=https" in forwarded


def _cookie(request: Request, name: str) -> str | None:
    for header in (v for k, v in request.headers if k == "cookie"):
        for part in header.split(";"):
            key, sep, value = part.strip().partition("=")
            if sep and key == name:
                return value.strip().strip('"')
    return None


def _time_param(raw: str | None, name: str) -> int | None:
    """Unix seconds, or an ISO 8601 date / date-time (UTC unless it says otherwise)."""
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if text.isdigit():
        return wire_int(text, name, high=MAX_UNIX_S)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"'{name}' must be unix seconds or an ISO 8601 date/time",
                             code="invalid_parameter") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp())


def _kinds_param(raw: str | None) -> tuple[str, ...]:
    if raw is None:
        return ()
    kinds = tuple(k.strip() for k in raw.split(",") if k.strip())
    for k in kinds:
        if not _KIND_RE.fullmatch(k):
            raise InvalidRequest(f"bad kind {k!r}", code="invalid_parameter")
    return kinds


def parse_sats(raw: str, name: str) -> int:
    """'12' or '12.345' sats → msats, exactly (the dashboard's forms speak sats)."""
    m = _SATS_RE.fullmatch(raw.strip())
    if not m:
        raise InvalidRequest(f"'{name}' must be an amount in sats (up to 3 decimals)",
                             code="invalid_amount")
    return int(m.group(1)) * 1000 + int((m.group(2) or "").ljust(3, "0"))


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Auth:
    via: str  # "bearer" | "session"
    session: str = field(default="", repr=False)  # the session token when via == "session"
    # what form nonces and flash messages are keyed by: the session token, or the admin token
    credential: str = field(default="", repr=False)


def _security_headers(nonce: str = "") -> list[tuple[str, str]]:
    script = f"'nonce-{nonce}'" if nonce else "'none'"
    style = f"'nonce-{nonce}'" if nonce else "'none'"
    return [
        ("cache-control", "no-store"),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "same-origin"),
        ("content-security-policy",
         f"default-src 'none'; script-src {script}; style-src {style}; img-src data:;"
         " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ]


def _json(doc: Any, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    return json_response(doc, status, [("cache-control", "no-store"), *(headers or [])])


def _epoch(admin_hash: str) -> str:
    """Sessions are bound to the admin token they were opened with: a new token ends them."""
    return hashlib.sha256(_EPOCH_LABEL + admin_hash.encode()).hexdigest()[:16]


class AdminHandlers:
    """`admin_hash()`: the hash admin credentials are checked against, asked on every
    request, so a token rotated in the database (``python -m routstr admin-token rotate``)
    counts at once, without a restart."""

    def __init__(self, service: AdminService, admin_hash: Callable[[], str],
                 limiter: LoginLimiter | None = None) -> None:
        self.service = service
        self.admin_hash = admin_hash
        self.limiter = limiter or LoginLimiter()
        self.forms = admin_forms.Forms(service.db, service.now)

    # -- authentication --------------------------------------------------------------------

    def _check_token(self, request: Request, token: str, expected: str) -> None:
        if token.startswith(USER_CREDENTIAL_PREFIXES):
            raise AuthenticationFailed("API keys and Cashu tokens have no access to the admin"
                                       " API; use the admin token.", code="not_an_admin_token")
        check_admin_token_limited(self.limiter, request, token, expected)

    def authorize(self, request: Request) -> Auth:
        header = request.header("authorization")
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise AuthenticationFailed("Use 'Authorization: Bearer <admin token>'",
                                           code="admin_auth_required")
            self._check_token(request, token, self.admin_hash())
            return Auth("bearer", credential=token)
        session = _cookie(request, SESSION_COOKIE)
        if not session:
            raise AuthenticationFailed(
                "Admin authentication required: 'Authorization: Bearer <admin token>' or a"
                " session from POST /admin/login", code="admin_auth_required",
                headers=[("www-authenticate", 'Bearer realm="routstr-admin"')])
        now = self.service.now()
        expected = self.admin_hash()
        valid = expected and self.service.db.read(
            lambda c: admin_store.session_valid(c, token_hash(session), _epoch(expected), now))
        if not valid:
            raise AuthenticationFailed("Admin session expired; log in again",
                                       code="admin_session_expired")
        if request.method not in ("GET", "HEAD"):
            self._check_csrf(request, session)
        return Auth("session", session, credential=session)

    def _check_same_origin(self, request: Request) -> None:
        origin = request.header("origin")
        if origin is None or origin == "null":
            return
        hosts = {h.strip().lower() for h in (request.header("host"),
                                              request.header("x-forwarded-host")) if h}
        if (urlsplit(origin).netloc or "").lower() not in hosts:
            raise Forbidden("Cross-origin request refused", code="csrf_origin_mismatch")

    def _check_csrf(self, request: Request, session: str) -> None:
        self._check_same_origin(request)
        presented = request.header("x-csrf-token")
        if presented is None and _is_form(request):
            presented = _form(request).get("csrf")
        if not presented or not secrets_equal(_unmask(presented), csrf_token(session)):
            raise Forbidden("Missing or invalid CSRF token", code="csrf_token_invalid")

    def _session_cookie(self, request: Request, value: str, max_age: int) -> tuple[str, str]:
        parts = [f"{SESSION_COOKIE}={value}", "Path=/admin", f"Max-Age={max_age}", "HttpOnly",
                 "SameSite=Strict"]
        if _over_tls(request):
            parts.append("Secure")
        return ("set-cookie", "; ".join(parts))

    # -- login / logout --------------------------------------------------------------------

    async def login(self, request: Request, params: dict[str, str]) -> Response:
        form = _is_form(request)
        expected = self.admin_hash()
        try:
            self._check_same_origin(request)
            token = (_form(request) if form else request.json_object()).get("token")
            if not isinstance(token, str) or not token.strip():
                raise InvalidRequest("Post the admin token as 'token'", code="missing_token")
            self._check_token(request, token.strip(), expected)
        except ApiError as exc:
            if form:
                return self._login_page(request, exc)
            raise
        session = secrets.token_urlsafe(32)
        now = self.service.now()
        self.service.db.transaction(lambda c: admin_store.create_session(
            c, token_hash(session), _epoch(expected), now=now, ttl_s=SESSION_TTL_S))
        log.info("admin logged in from %s", _client_address(request))
        cookie = self._session_cookie(request, session, SESSION_TTL_S)
        if form:
            return Response(303, [("location", "/admin/"), cookie, *_security_headers()])
        return _json({"ok": True, "expires_in": SESSION_TTL_S,
                      "csrf_token": masked_csrf(session)}, headers=[cookie])

    async def logout(self, request: Request, params: dict[str, str]) -> Response:
        auth = self.authorize(request)
        if auth.via == "session":
            self.service.db.transaction(
                lambda c: admin_store.delete_session(c, token_hash(auth.session)))
        cookie = self._session_cookie(request, "", 0)
        if _is_form(request):
            return Response(303, [("location", "/admin/"), cookie, *_security_headers()])
        return _json({"ok": True}, headers=[cookie])

    def _login_page(self, request: Request, error: ApiError | None) -> Response:
        nonce = secrets.token_urlsafe(16)
        message = error.message if error is not None else ""
        status = 401 if error is None else error.status
        body = admin_page.login_page(name=self.service.config.name, error=message, nonce=nonce)
        headers = [("content-type", "text/html; charset=utf-8"), *_security_headers(nonce)]
        if error is not None:
            headers += error.headers
        return Response(status, headers, body.encode())

    # -- JSON API --------------------------------------------------------------------------

    def api(self, fn: Callable[[Request, dict[str, str]], Awaitable[Any]],
            status: int = 200) -> Callable[[Request, dict[str, str]], Awaitable[Response]]:
        async def handle(request: Request, params: dict[str, str]) -> Response:
            self.authorize(request)
            return _json(await fn(request, params), status)
        return handle

    async def _overview(self, request: Request, params: dict[str, str]) -> Any:
        return self.service.overview()

    async def _keys(self, request: Request, params: dict[str, str]) -> Any:
        return self.service.list_keys(
            search=request.query("search") or "",
            kinds=_kinds_param(request.query("kind")),
            limit=bounded_int(request.query("limit"), "limit", 50, 1, MAX_PAGE),
            offset=bounded_int(request.query("offset"), "offset", 0, 0, 1 << 62))

    async def _create_key(self, request: Request, params: dict[str, str]) -> Any:
        return self.service.create_key(request.json_object())

    async def _get_key(self, request: Request, params: dict[str, str]) -> Any:
        return self.service.get_key(_key_id(params))

    async def _update_key(self, request: Request, params: dict[str, str]) -> Any:
        return self.service.update_key(_key_id(params), request.json_object())

    async def _delete_key(self, request: Request, params: dict[str, str]) -> Any:
        return self.service.delete_key(_key_id(params))

    async def _grant(self, request: Request, params: dict[str, str]) -> Any:
        body = request.json_object()
        return self.service.grant(_key_id(params), body.get("amount_msats"))

    async def _transactions(self, request: Request, params: dict[str, str]) -> Any:
        key_ids: tuple[int, ...] | None = None
        if request.query("key_id"):
            key_ids = (bounded_int(request.query("key_id"), "key_id", 0, 1, 1 << 62),)
        elif request.query("key"):
            key_ids = self.service.key_filter(request.query("key") or "")
        return self.service.transactions(
            key_ids=key_ids, kinds=_kinds_param(request.query("kind")),
            since=_time_param(request.query("since"), "since"),
            until=_time_param(request.query("until"), "until"),
            limit=bounded_int(request.query("limit"), "limit", 50, 1, MAX_PAGE),
            offset=bounded_int(request.query("offset"), "offset", 0, 0, 1 << 62))

    async def _prices(self, request: Request, params: dict[str, str]) -> Any:
        return self.service.price_list()

    async def _set_price(self, request: Request, params: dict[str, str]) -> Any:
        return self.service.set_price(unquote(params["model"]), request.json_object())

    async def _clear_price(self, request: Request, params: dict[str, str]) -> Any:
        return self.service.clear_price(unquote(params["model"]))

    async def _health(self, request: Request, params: dict[str, str]) -> Any:
        return await self.service.health()

    async def _settings(self, request: Request, params: dict[str, str]) -> Any:
        return self.service.settings()

    async def _wallet(self, request: Request, params: dict[str, str]) -> Any:
        return self.service.wallet_summary()

    async def _withdraw(self, request: Request, params: dict[str, str]) -> Any:
        return await self.service.withdraw(request.json_object())

    async def _pay_out(self, request: Request, params: dict[str, str]) -> Any:
        return await self.service.pay_out(request.json_object())

    async def _core_withdraw(self, request: Request, params: dict[str, str]) -> Any:
        """routstr-core's ``POST /admin/withdraw {amount, mint_url?, unit}`` → ``{token,
        mint_url}`` (sats only)."""
        body = request.json_object()
        if body.get("unit", "sat") != "sat":
            raise InvalidRequest("Only unit 'sat' is supported", code="unsupported_unit")
        result = await self.service.withdraw({"amount_sats": body.get("amount"),
                                              "mint": body.get("mint_url")})
        return {**result, "mint_url": result["mint"]}

    # -- the dashboard ---------------------------------------------------------------------

    async def dashboard(self, request: Request, params: dict[str, str]) -> Response:
        try:
            auth = self.authorize(request)
        except AuthenticationFailed as exc:
            if _wants_html(request):
                return self._login_page(request, exc if _cookie(request, SESSION_COOKIE)
                                        else None)
            raise
        except RateLimited as exc:
            if _wants_html(request):
                return self._login_page(request, exc)
            raise
        q = {k: request.query(k) or "" for k in admin_page.QUERY_FIELDS}
        flash = self.forms.take(auth.credential, request.query("flash") or "")
        return await self._render(auth, q, flash, again=request.query("again") == "1")

    async def _render(self, auth: Auth, q: Mapping[str, str], flash: admin_forms.Flash, *,
                      again: bool) -> Response:
        s = self.service
        error = flash.error
        try:
            key_offset = bounded_int(q.get("ko"), "ko", 0, 0, 1 << 62)
            tx_offset = bounded_int(q.get("to"), "to", 0, 0, 1 << 62)
            tx_kinds = _kinds_param(q.get("tkind") or None)
            since = _time_param(q.get("tsince"), "tsince")
            until = _time_param(q.get("tuntil"), "tuntil")
        except InvalidRequest as exc:  # a hand-edited address: show the page unfiltered
            error = error or exc.message
            q = {}
            key_offset = tx_offset = 0
            tx_kinds, since, until = (), None, None
        keys = s.list_keys(search=q.get("kq", ""), kinds=DASHBOARD_KEY_KINDS, limit=KEYS_PAGE,
                           offset=key_offset)
        txs = s.transactions(key_ids=s.key_filter(q.get("tk", "")), kinds=tx_kinds,
                             since=since, until=until, limit=TX_PAGE, offset=tx_offset)
        wallet: dict[str, Any] | None = None
        wallet_error = ""
        if s.wallet is not None:
            try:
                wallet = s.wallet.summary()
            except ApiError as exc:
                wallet_error = exc.message
        nonce = secrets.token_urlsafe(16)
        view = admin_page.Dashboard(
            name=s.config.name, version=__version__, now=s.now(), query=dict(q),
            overview=s.overview(), keys=keys, transactions=txs, tx_kinds=s.tx_kinds(),
            prices=s.price_list(), health=await s.health(), settings=s.settings(),
            wallet=wallet, wallet_error=wallet_error,
            csrf=masked_csrf(auth.session) if auth.via == "session" else "",
            notice=q.get("done", ""), error=error, secret=flash.secret, nonce=nonce,
            form_nonce=self.forms.nonce(auth.credential), again=again,
            flash_gone=flash.gone)
        body = admin_page.dashboard_page(view)
        headers = [("content-type", "text/html; charset=utf-8"), *_security_headers(nonce)]
        return Response(200, headers, body.encode())

    def page_action(self, fn: Callable[[dict[str, str], dict[str, str]], Awaitable[Any]]
                    ) -> Callable[[Request, dict[str, str]], Awaitable[Response]]:
        """A dashboard form: post → redirect → get (`admin_forms`). Always 303 to the page:
        with the notice, the one-time secret or the error as a flash message; a repeated or
        out-of-date form (its nonce) does nothing and lands where the first one went."""
        async def handle(request: Request, params: dict[str, str]) -> Response:
            try:
                auth = self.authorize(request)
            except (AuthenticationFailed, RateLimited) as exc:
                if _wants_html(request):
                    return self._login_page(request, exc)
                raise
            form = _form(request) if _is_form(request) else {}
            back = {k: form.get(k, "") for k in admin_page.QUERY_FIELDS if form.get(k)}
            claim = await self.forms.claim(auth.credential, form.get(admin_forms.NONCE_FIELD, ""),
                                           back, required=auth.via == "session")
            if claim.redirect:
                return Response(303, [("location", claim.redirect), *_security_headers()])
            try:
                result = await fn(form, params)
            except ApiError as exc:
                location = self.forms.finish(auth.credential, claim, back, "", error=exc.message)
            else:
                done, secret = ((str(result["done"]), result["secret"]) if isinstance(result, dict)
                                else (str(result), None))
                location = self.forms.finish(auth.credential, claim, back, done, secret=secret)
            return Response(303, [("location", location), *_security_headers()])
        return handle

    async def _form_create_key(self, form: dict[str, str], params: dict[str, str]) -> Any:
        body: dict[str, Any] = {"balance_msats": parse_sats(form.get("balance_sats") or "0",
                                                            "balance_sats")}
        body.update(_form_limits(form))
        created = self.service.create_key(body)
        return {"done": "key_created",
                "secret": {"label": f"New key #{created['key']['id']} (shown once)",
                           "value": created["api_key"], "kind": "api_key"}}

    async def _form_key_action(self, form: dict[str, str], params: dict[str, str]) -> Any:
        key_id = _key_id(params)
        action = form.get("action", "")
        if action in ("disable", "enable"):
            self.service.update_key(key_id, {"disabled": action == "disable"})
            return f"key_{action}d"
        if action == "delete":
            self.service.delete_key(key_id)
            return "key_deleted"
        if action == "limits":
            limits = _form_limits(form)
            self.service.update_key(key_id, limits)
            return "key_limits"
        if action == "grant":
            self.service.grant(key_id, parse_sats(form.get("amount_sats", ""), "amount_sats"))
            return "key_granted"
        raise InvalidRequest(f"unknown action {action!r}", code="invalid_parameter")

    async def _form_price(self, form: dict[str, str], params: dict[str, str]) -> Any:
        model = form.get("model", "").strip()
        if not model:
            raise InvalidRequest("Name the model", code="invalid_parameter")
        if form.get("action") == "reset":
            self.service.clear_price(model)
            return "price_reset"
        fields = {f: bounded_int(form.get(f), f, 0, 0, 10**15) for f in PRICE_FIELDS
                  if form.get(f, "").strip()}
        if not fields:
            raise InvalidRequest("Give at least one price field", code="invalid_parameter")
        self.service.set_price(model, fields)
        return "price_set"

    async def _form_withdraw(self, form: dict[str, str], params: dict[str, str]) -> Any:
        amount = bounded_int(form.get("amount_sats"), "amount_sats", 0, 1, 10**12)
        result = await self.service.withdraw({"amount_sats": amount,
                                              "mint": form.get("mint") or None})
        return {"done": "withdrawn",
                "secret": {"label": f"Cashu token for {amount} sats (shown once)",
                           "value": str(result.get("token", "")), "kind": "token"}}

    async def _form_pay_out(self, form: dict[str, str], params: dict[str, str]) -> Any:
        amount = bounded_int(form.get("amount_sats"), "amount_sats", 0, 1, 10**12)
        await self.service.pay_out({"amount_sats": amount,
                                    "lightning_address": form.get("lightning_address", "")})
        return "paid_out"

    # -- the route table -------------------------------------------------------------------

    def routes(self) -> list[Route]:
        api, page = self.api, self.page_action
        return [
            Route("GET", "/admin", self.dashboard),
            Route("POST", "/admin/login", self.login),
            Route("POST", "/admin/logout", self.logout),
            Route("POST", "/admin/keys", page(self._form_create_key)),
            Route("POST", "/admin/keys/{id}", page(self._form_key_action)),
            Route("POST", "/admin/prices", page(self._form_price)),
            Route("POST", "/admin/wallet/withdraw", page(self._form_withdraw)),
            Route("POST", "/admin/wallet/payout", page(self._form_pay_out)),
            Route("GET", "/admin/api/overview", api(self._overview)),
            Route("GET", "/admin/api/keys", api(self._keys)),
            Route("POST", "/admin/api/keys", api(self._create_key, 201)),
            Route("GET", "/admin/api/keys/{id}", api(self._get_key)),
            Route("PATCH", "/admin/api/keys/{id}", api(self._update_key)),
            Route("DELETE", "/admin/api/keys/{id}", api(self._delete_key)),
            Route("POST", "/admin/api/keys/{id}/grant", api(self._grant)),
            Route("GET", "/admin/api/transactions", api(self._transactions)),
            Route("GET", "/admin/api/prices", api(self._prices)),
            Route("PUT", "/admin/api/prices/{model}", api(self._set_price)),
            Route("DELETE", "/admin/api/prices/{model}", api(self._clear_price)),
            Route("GET", "/admin/api/health", api(self._health)),
            Route("GET", "/admin/api/settings", api(self._settings)),
            Route("GET", "/admin/api/wallet", api(self._wallet)),
            Route("POST", "/admin/api/wallet/withdraw", api(self._withdraw)),
            Route("POST", "/admin/api/wallet/payout", api(self._pay_out)),
            Route("POST", "/admin/withdraw", api(self._core_withdraw)),  # routstr-core's name
        ]


def admin_routes(config: Config, db: Database, ledger: Ledger, prices: PriceBook,
                 probes: Mapping[str, Callable[[], Awaitable[str]]],
                 wallet: AdminWallet | None = None, npub: str = "",
                 limiter: LoginLimiter | None = None) -> list[Route]:
    """The admin part of the route table (`app.routes` adds it; `limiter` is shared with the
    ``/metrics`` check)."""
    service = AdminService(config, db, ledger, prices, probes, wallet, npub=npub)
    return AdminHandlers(service, lambda: resolve_admin_hash(db, config), limiter).routes()


def _key_id(params: Mapping[str, str]) -> int:
    raw = params.get("id", "").lstrip("#")
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound("Key not found", code="key_not_found")
    return int(raw)


def _form_limits(form: Mapping[str, str]) -> dict[str, Any]:
    """The limit fields of a dashboard form (blank = no limit / no expiry)."""
    out: dict[str, Any] = {}
    if "limit_sats" in form:
        raw = form["limit_sats"].strip()
        out["balance_limit_msats"] = parse_sats(raw, "limit_sats") if raw else None
    if "limit_reset" in form:
        out["balance_limit_reset"] = form["limit_reset"].strip() or None
    if "valid_until" in form:
        out["validity_date"] = _time_param(form["valid_until"], "valid_until")
    return out


def csrf_token(session: str) -> str:
    return hmac.new(session.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def masked_csrf(session: str) -> str:
    """The CSRF token XOR a fresh random pad, pad first (hex): different in every page."""
    token = bytes.fromhex(csrf_token(session))
    pad = secrets.token_bytes(len(token))
    return (pad + bytes(a ^ b for a, b in zip(pad, token, strict=True))).hex()


def _unmask(masked: str) -> str:
    try:
        raw = bytes.fromhex(masked.strip())
    except ValueError:
        return ""
    half = len(raw) // 2
    if len(raw) != 64:
        return ""
    return bytes(a ^ b for a, b in zip(raw[:half], raw[half:], strict=True)).hex()


