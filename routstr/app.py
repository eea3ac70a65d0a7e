"""Wiring: the one list of routes, each bound to the services it needs."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from . import __version__, demo
from .admin import LoginLimiter, admin_routes
from .admin_wallet import NodeWallet
from .balance import BalanceHandlers, CashuBalanceHandlers
from .cashu.lnurl import LnurlError, in_lookup
from .cashu.mint import MintError, Transport
from .cashu.wallet import Wallet, WalletError
from .cashupay import CashuConfig, CashuPayments, xcashu_key_hash
from .client import HttpClient
from .config import Config, ConfigError
from .db import Database, DatabaseError, SchemaError, checkpoint_file
from .discovery import NostrService, open_nostr
from .errors import ApiError, UpstreamError
from .features import Platform, admin_bearer
from .ledger import Ledger
from .messages import BodyStream, Request, Response
from .netguard import Guard, foreign
from .payments import Payments
from .pricebook import PriceBook
from .pricefeed import (
    MAX_ANSWER_BYTES,
    RateFeed,
    load_rate,
    parse_feeds,
    rate_from_text,
    save_rate,
)
from .pricing import PriceTable, load_price_table, usd_amount
from .proxy import (
    AUDIO,
    CHAT,
    COMPLETIONS,
    COUNT_TOKENS,
    EMBEDDINGS,
    IMAGES,
    MESSAGES,
    MODERATIONS,
    RESPONSES,
    Proxy,
    ProxyConfig,
)
from .router import Route, Router
from .status import (
    CachedProbe,
    StatusHandlers,
    database_writable,
    mint_probe,
    setup_problems,
)
from .walletstore import SqliteWalletStore, client_transport, setting_get_or_create

log = logging.getLogger("routstr.app")

SWEEP_INTERVAL_S = 60.0
CHECKPOINT_INTERVAL_S = 1.0
INVOICE_POLL_S = 5.0
WALLET_RECOVER_S = 60.0
FOLLOW_RATE_S = 10.0  # a worker that does not poll the price feeds adopts the stored rate


def lnurl_guarded(transport: Transport) -> Transport:
    """The wallet's transport with LNURL lookups (`lnurl.in_lookup`) sent as foreign URLs:
    the HTTP client's outbound URL guard (`routstr.netguard`, ``--lnurl-allow-private``)
    checks them and the address they connect to. Mint calls (the operator's mints) pass as
    they are."""

    async def call(method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        if not in_lookup():
            return await transport(method, url, body)
        with foreign():
            return await transport(method, url, body)

    return call


@dataclass
class Node:
    """The composed services of one running node (built in `__main__`)."""

    config: Config
    db: Database
    ledger: Ledger
    prices: PriceBook
    http: HttpClient
    payments: Payments
    wallet: Wallet | None = None
    cashu: CashuPayments | None = None
    platform: Platform = field(init=False)  # rate limits, idempotency, webhooks, metrics, …
    nostr: NostrService = field(init=False)  # identity, announcement, discovery
    rates: RateFeed = field(init=False)  # BTC/USD, for USD-priced models

    def __post_init__(self) -> None:
        self.rates = open_rates(self.config, self.db, self.http)
        self.prices.rates = self.rates
        self.prices.markup = usd_amount(self.config.price_markup, "--price-markup")
        # the `[default]` too: a USD default bills every model not in the table at the rate
        self.rates.needed = any(p is not None and p.usd is not None
                                for p in (*self.prices, self.prices.default))
        self.nostr = open_nostr(self.config, self.db, self.http, self.p2pk_pubkey)
        self.platform = Platform(self.config, self.db, self.ledger.boot_id,
                                 lambda request: self.payments.account_for(request,
                                                                           create=False),
                                 self.known_owner)
        self.platform.extra_metrics.append(self.nostr.metrics_extra)
        self.platform.extra_metrics.append(self.rates_metrics)

    def rates_metrics(self) -> dict[str, tuple[str, str, dict[tuple[Any, ...], float]]]:
        rate, age = self.rates.usd_per_btc(), self.rates.age_s()
        extra: dict[str, tuple[str, str, dict[tuple[Any, ...], float]]] = {
            "routstr_price_refreshes_total": ("counter", "BTC/USD refreshes attempted.",
                                              {(): float(self.rates.refreshes)}),
            "routstr_price_refresh_failures_total": (
                "counter", "BTC/USD refreshes that got no rate.", {(): float(self.rates.failures)}),
        }
        if rate is not None:
            extra["routstr_btc_usd"] = ("gauge", "BTC/USD rate USD-priced models are billed at.",
                                        {(): float(rate)})
        if age is not None:
            extra["routstr_btc_usd_age_seconds"] = ("gauge", "Age of the BTC/USD rate.",
                                                    {(): float(age)})
        return extra

    @classmethod
    def open(cls, config: Config, *, boot_id: str | None = None) -> Node:
        # before the database: a typo creates nothing
        table = PriceTable([demo.PRICE]) if config.demo else read_price_table(config.pricing)
        db = open_database(config.database)
        ledger = Ledger(db, boot_id=boot_id)
        prices = PriceBook(table, db)
        http = HttpClient(connect_timeout=config.upstream_connect_timeout,
                          read_timeout=config.upstream_read_timeout,
                          proxy=config.upstream_proxy or None,
                          foreign_guard=Guard(allow_private=config.lnurl_allow_private))
        wallet = cashu = None
        if config.cashu_mints:
            seed = bytes.fromhex(setting_get_or_create(db, "wallet_seed",
                                                       lambda: secrets.token_hex(64)))
            wallet = Wallet(SqliteWalletStore(db), wallet_transport(db, http), seed)
            cashu = CashuPayments(CashuConfig(config.cashu_mints, config.reservation_ttl,
                                              config.recovery_window),
                                  ledger, wallet, db)
        return cls(config, db, ledger, prices, http, Payments(ledger, cashu), wallet, cashu)

    @property
    def p2pk_pubkey(self) -> str:
        """NUT-11: the key to lock payments to ("" when the node takes no Cashu)."""
        return self.wallet.p2pk_pubkey if self.wallet is not None else ""

    async def known_owner(self, request: Request) -> bool:
        """Does the ledger know the paying credential (an existing key, an accepted X-Cashu
        payment or redeemed Cashu-token key)? Idempotent answers are stored only for those."""
        xcashu = (request.header("x-cashu") or "").strip()
        if xcashu:
            return self.ledger.get_account(xcashu_key_hash(xcashu)) is not None
        try:
            await self.payments.account_for(request, create=False)
        except ApiError:
            return False
        return True

    async def aclose(self) -> None:
        await self.platform.aclose()
        await self.http.aclose()
        await self.db.sync_durable()
        self.db.close()

    def info_doc(self) -> dict[str, object]:
        c = self.config
        return {
            "name": c.name,
            "description": c.description,
            "version": __version__,
            "npub": self.nostr.key.npub,
            "mints": list(c.cashu_mints),
            "http_url": c.http_url,
            "onion_url": c.onion_url,
            "child_key_cost_msats": c.child_key_cost_msats,
            "cashu_p2pk_pubkey": self.p2pk_pubkey or None,
            "models": [p.id for p in self.prices],
            "btc_usd": self.rates.status(),
        }

    async def rates_forever(self, *, jobs: bool) -> None:
        """Keep the BTC/USD rate fresh: the jobs process polls the feeds and stores each rate;
        the other workers adopt the stored one."""
        if jobs:
            await self.rates.run()
        else:
            await self.rates.follow(lambda: load_rate(self.db),
                                    min(FOLLOW_RATE_S, self.config.price_refresh))

    async def database_probe(self) -> str:
        return database_writable(self.db) if self.db.ping() else "error"

    async def upstream_probe(self) -> str:
        parts = urlsplit(self.config.upstream_base_url)
        try:
            status, _, _ = await self.http.fetch("GET", self.config.upstream_base_url.rstrip("/")
                                                 + "/models", max_bytes=1 << 20)
        except UpstreamError as exc:
            return f"error: {exc.code} ({parts.hostname})"
        return "ok" if status < 500 else f"error: status {status}"

    async def wallet_forever(self) -> None:
        """Reconcile pending wallet intents at start and periodically; settle paid invoices."""
        if self.wallet is None or self.cashu is None:
            return
        last_recover = -WALLET_RECOVER_S
        while True:
            now = anyio.current_time()
            if now - last_recover >= WALLET_RECOVER_S:
                last_recover = now
                try:
                    report = await self.wallet.recover()
                    if report.finished or report.rolled_back or report.revived:
                        log.warning("wallet recovery: %s", report)
                except MintError as exc:
                    log.warning("wallet recovery postponed: %s", type(exc).__name__)
            try:
                await self.cashu.settle_pending_invoices()
            except MintError as exc:
                log.info("invoice settlement postponed: %s", type(exc).__name__)
            await anyio.sleep(INVOICE_POLL_S)

    async def payout_forever(self) -> None:
        """Operator payouts of earnings to --receive-ln-address, on a schedule."""
        address = self.config.receive_ln_address
        if not address or self.cashu is None:
            return
        while True:
            await anyio.sleep(self.config.payout_interval)
            try:
                await self.cashu.payout_once(address, self.config.min_payout_sats)
            except (MintError, WalletError, LnurlError) as exc:
                log.warning("payout postponed: %s", type(exc).__name__)

    async def checkpoint_forever(self) -> None:
        """WAL checkpoints in a worker thread, so no request's commit pays for the fsync."""
        if self.config.database == ":memory:":
            return
        self.db.move_checkpoints_off_this_connection()
        try:
            while True:
                await anyio.sleep(CHECKPOINT_INTERVAL_S)
                await anyio.to_thread.run_sync(checkpoint_file, self.config.database)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(checkpoint_file, self.config.database)

    async def sweep_forever(self, *, release_expired: bool = True) -> None:
        """Renew the holds of this process's requests in flight and (in the one process that
        runs the background jobs) release expired ones; at least three times per ttl, so a live
        request's hold never expires (ledger.sweep_expired). Every worker runs this."""
        while True:
            await anyio.sleep(min(SWEEP_INTERVAL_S, self.config.reservation_ttl / 3))
            if not release_expired:
                self.ledger.renew_live()
                continue
            released = self.ledger.sweep_expired()
            if released:
                log.warning("released %d expired reservations", released)


def open_database(path: str) -> Database:
    try:
        return Database(path)
    except SchemaError as exc:
        raise ConfigError(f"the database {path}: {exc}") from exc
    except (DatabaseError, OSError) as exc:
        hint = ("check that it is the node's sqlite database and that this user can read and"
                " write it and its directory" if os.path.exists(path) else
                "point --database (DATABASE) at a file in a directory this user can write")
        raise ConfigError(f"cannot open the database {path} ({exc}); {hint}") from exc


def read_price_table(path: str) -> PriceTable:
    try:
        return load_price_table(path or None)
    except OSError as exc:
        raise ConfigError(f"cannot read the pricing file {path} ({exc.strerror});"
                          " check --pricing (PRICING)") from exc
    except ValueError as exc:  # names the file and the key
        raise ConfigError(f"{exc}; fix the file or leave --pricing out") from exc


def open_rates(config: Config, db: Database, http: HttpClient) -> RateFeed:
    """The BTC/USD feed of `config`, starting from the last stored rate."""

    async def fetch(url: str) -> tuple[int, bytes]:
        status, _, body = await http.fetch(
            "GET", url, [("accept", "application/json"), ("user-agent", f"routstr/{__version__}")],
            max_bytes=MAX_ANSWER_BYTES)
        return status, body

    pinned = rate_from_text(config.btc_usd) if config.btc_usd else None
    rates = RateFeed(parse_feeds(config.price_feeds), pinned=pinned,
                     refresh_s=config.price_refresh, max_age_s=config.price_max_age,
                     fetch=fetch, store=lambda rate: save_rate(db, rate))
    rates.adopt(load_rate(db))
    return rates


def routes(node: Node) -> list[Route]:
    c = node.config
    status = StatusHandlers(
        node.info_doc, node.database_probe, node.rates,
        CachedProbe(node.upstream_probe if c.upstream_base_url else None),
        CachedProbe(mint_probe(node.http, c.cashu_mints) if c.cashu_mints else None),
        setup_problems(c),
    )
    proxy = Proxy(ProxyConfig(c.upstream_base_url, c.upstream_api_key,
                              c.chat_completions_api_version, c.reservation_ttl),
                  node.ledger, node.prices, node.http, node.payments, observer=node.platform,
                  rates=node.rates, markup=node.prices.markup)
    balance = BalanceHandlers(node.ledger, node.payments)
    table = [
        Route("GET", "/health", status.health),
        Route("GET", "/v1/info", status.info),
        Route("GET", "/", status.root),
        Route("GET", "/v1/models", proxy.models),
        Route("GET", "/models", proxy.models),
        Route("GET", "/v1/transactions", balance.transactions),
        Route("GET", "/v1/providers", node.nostr.providers),
    ]
    wallet = (NodeWallet(node.wallet, node.db, wallet_transport(node.db, node.http),
                         c.cashu_mints)
              if node.wallet is not None else None)
    admin_limiter = LoginLimiter()  # admin API and /metrics: one count of failed tokens
    table += admin_routes(c, node.db, node.ledger, node.prices,
                          {"database": status.database, "upstream": status.upstream,
                           "mint": status.mint}, wallet, npub=node.nostr.key.npub,
                          limiter=admin_limiter)
    pay = CashuBalanceHandlers(node.ledger, node.payments, node.cashu, c.child_key_cost_msats)
    for prefix in ("/v1/balance", "/v1/wallet"):
        table += [
            Route("GET", prefix, balance.info),
            Route("GET", prefix + "/info", balance.info),
            Route("GET", prefix + "/create", pay.create),
            Route("POST", prefix + "/create", pay.create),
            Route("POST", prefix + "/topup", pay.topup),
            Route("POST", prefix + "/refund", pay.refund),
            Route("POST", prefix + "/child-key", pay.child_keys),
            Route("POST", prefix + "/child-key/reset", pay.child_key_reset),
        ]
    for prefix in ("/lightning", "/v1/balance/lightning"):
        table += [
            Route("POST", prefix + "/invoice", pay.invoice),
            Route("GET", prefix + "/invoice/{invoice_id}", pay.invoice_status),
            Route("GET", prefix + "/invoice/{invoice_id}/status", pay.invoice_status),
            Route("POST", prefix + "/recover", pay.invoice_recover),
        ]
    for endpoint in (CHAT, COMPLETIONS, EMBEDDINGS, IMAGES, AUDIO, RESPONSES, MODERATIONS,
                     MESSAGES, COUNT_TOKENS):
        handler = proxy.handler(endpoint)
        table.append(Route("POST", "/v1" + endpoint.path, handler))
        table.append(Route("POST", endpoint.path, handler))  # routstr-core serves both
    table += node.platform.routes(lambda: table, admin_bearer(node.db, c, admin_limiter))
    return table


def build_app(node: Node) -> Callable[[Request], Awaitable[Response]]:
    """The node's request handler. Durable commits leave their fsync to a worker thread from
    here on (`Database.defer_durable_sync`): `synced_answers` and `synced_transport` are the
    barriers that keep them as safe as a commit with the fsync inline."""
    table = routes(node)
    router = Router(table)

    async def app(request: Request) -> Response:
        handler, params = router.resolve(request.method, request.path)
        return await handler(request, params)

    node.db.defer_durable_sync()
    return synced_answers(node.db, node.platform.wrap(app, table))


App = Callable[[Request], Awaitable[Response]]


# Answers that tell nothing of what durable commits wrote (the node's status and settings):
# they need not wait for another request's fsync — a monitor is never stalled behind a deposit.
UNSYNCED_PATHS: Final = frozenset({"/health", "/", "/v1/info"})


def synced_answers(db: Database, app: App) -> App:
    """No answer (nor streamed chunk) tells a client of a durable commit made while its
    request ran before that commit's fsync is done (`Database.sync_durable`, in a thread)."""

    async def synced(request: Request) -> Response:
        if request.path in UNSYNCED_PATHS and request.method in ("GET", "HEAD"):
            return await app(request)
        mark = db.durable_mark
        try:
            response = await app(request)
        except ApiError:
            await db.sync_durable(since=mark)
            raise
        await db.sync_durable(since=mark)
        if response.stream is not None:
            response.stream = _SyncedStream(db, response.stream, mark)
        return response

    return synced


class _SyncedStream:
    """Relays a stream; a chunk produced after a durable commit waits for its fsync."""

    def __init__(self, db: Database, inner: BodyStream, mark: int) -> None:
        self._db = db
        self._inner = inner
        self._mark = mark
        self._iter: AsyncIterator[bytes] | None = None

    def __aiter__(self) -> _SyncedStream:
        return self

    async def __anext__(self) -> bytes:
        if self._iter is None:
            self._iter = self._inner.__aiter__()
        chunk = await self._iter.__anext__()
        await self._db.sync_durable(since=self._mark)
        return chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


def wallet_transport(db: Database, http: HttpClient) -> Transport:
    """The one transport stack of the node's wallet (payments and the admin wallet alike):
    write-ahead synced, LNURL lookups address-guarded."""
    return synced_transport(db, lnurl_guarded(client_transport(http)))


def synced_transport(db: Database, transport: Transport) -> Transport:
    """The wallet's mint transport, behind the write-ahead rule: every durable commit so far
    (the operation's intent above all) is on disk before a mint hears of the operation."""

    async def call(method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        await db.sync_durable()
        return await transport(method, url, body)

    return call
