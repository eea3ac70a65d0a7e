"""Configuration as one table.

Every setting is a field of the frozen `Config` dataclass; its metadata (help text, optional
validator) is the single source for the CLI flag (`--upstream-base-url`), the environment
variable (`UPSTREAM_BASE_URL`: the flag upper-cased, `-` → `_`), the defaults shown by `--help`
and `contrib/routstr.env.example`. Flags win over the environment, the environment over the
defaults. Invalid values stop the node at start with one clear line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import ipaddress
import os
import socket
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .nostr import secret_from_text
from .pricefeed import DEFAULT_FEEDS, parse_feeds, rate_from_text
from .pricing import usd_amount

MiB = 1024 * 1024


class ConfigError(ValueError):
    """A setting has an invalid value, or the node cannot start with it: reported as one line
    saying what is wrong and what to do, exit code 2 (`LOG_LEVEL=DEBUG` adds the traceback)."""


def listen_error(exc: OSError, host: str, port: int) -> ConfigError:
    """Why the node cannot listen on `host`:`port`, said for the operator."""
    if isinstance(exc, socket.gaierror):
        return ConfigError(f"--host {host!r} is not a name this machine can resolve"
                           f" ({exc.strerror}); use an address such as 127.0.0.1 or 0.0.0.0")
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"port {port} on {host} is already in use (another routstr?);"
                           " stop that process or choose another --port (PORT)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"--host {host} is not an address of this machine; use 127.0.0.1,"
                           " 0.0.0.0 or one of its own addresses")
    if exc.errno == errno.EACCES:
        return ConfigError(f"not allowed to listen on port {port} (ports below 1024 need"
                           " privileges); choose --port 1024 or above")
    return ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


def _url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"not an http(s) URL: {value!r}")


def _urls(values: tuple[str, ...]) -> None:
    for v in values:
        _url(v)


def _opt_url(value: str) -> None:
    if value:
        _url(value)


def _ws_urls(values: tuple[str, ...]) -> None:
    for v in values:
        parts = urlsplit(v)
        if parts.scheme not in ("ws", "wss") or not parts.hostname or parts.fragment:
            raise ConfigError(f"not a ws(s):// URL: {v!r}")


def _nsec(value: str) -> None:
    if value.strip():
        try:
            secret_from_text(value)
        except ValueError as exc:  # its message never contains the value
            raise ConfigError(f"{exc} (value not shown)") from None


def _proxy(value: str) -> None:
    if value:
        parts = urlsplit(value)
        if parts.scheme not in ("socks5", "socks5h") or not parts.hostname or not parts.port:
            raise ConfigError(f"not a socks5://host:port URL: {value!r}")


def _port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"port out of range: {value}")


def _positive(value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"must be positive: {value}")


def _non_negative(value: int | float) -> None:
    if value < 0:
        raise ConfigError(f"must not be negative: {value}")


def _log_level(value: str) -> None:
    if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"unknown log level: {value!r}")


def _host(value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not value or any(c.isspace() for c in value):
            raise ConfigError(f"not a host: {value!r}") from None


def _btc_usd(value: str) -> None:
    if value:
        try:
            rate_from_text(value)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _feeds(value: str) -> None:
    try:
        parse_feeds(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _markup(value: str) -> None:
    try:
        markup = usd_amount(value, "markup")
    except ValueError:
        raise ConfigError(f"not a decimal number: {value!r}") from None
    if not 0 < markup <= 1000:
        raise ConfigError(f"must be above 0 and at most 1000: {value}")


def _s(help: str, check: Callable[[Any], None] | None = None, secret: bool = False) -> Any:
    return {"help": help, "check": check, "secret": secret}


@dataclass(frozen=True)
class Config:
    host: str = field(default="127.0.0.1", metadata=_s("address to listen on", _host))
    port: int = field(default=8000, metadata=_s("TCP port to listen on (0 = any free port)", _port))
    workers: int = field(
        default=1,
        metadata=_s("processes sharing the listening socket and the database (at most the core"
                    " count is useful); background jobs run in the first", _positive),
    )
    database: str = field(default="routstr.sqlite3", metadata=_s("sqlite database file"))
    demo: bool = field(
        default=False,
        metadata=_s("serve the built-in demo upstream (an echo model, billed like any other) to"
                    " see keys, payments and streaming work before there is an upstream"),
    )
    upstream_base_url: str = field(
        default="",
        metadata=_s("OpenAI-compatible upstream, e.g. https://api.openai.com/v1", _opt_url),
    )
    upstream_api_key: str = field(
        default="", metadata=_s("API key sent upstream as Bearer", secret=True)
    )
    upstream_proxy: str = field(
        default="", metadata=_s("SOCKS5 proxy for upstream and mint calls (Tor)", _proxy)
    )
    upstream_connect_timeout: float = field(
        default=10.0, metadata=_s("upstream connect timeout, seconds", _positive)
    )
    upstream_read_timeout: float = field(
        default=300.0, metadata=_s("upstream inactivity timeout, seconds", _positive)
    )
    admin_token: str = field(
        default="", metadata=_s("admin API token (if unset: generated at first start and"
                                " written to <database>.admin-token, mode 0600)", secret=True)
    )
    pricing: str = field(default="", metadata=_s("TOML file overriding the built-in price table"))
    btc_usd: str = field(
        default="", metadata=_s("pin the BTC/USD rate (USD per BTC) USD-priced models are billed"
                                " at; unset: the price feeds", _btc_usd)
    )
    price_feeds: str = field(
        default=DEFAULT_FEEDS,
        metadata=_s("BTC/USD sources, comma-separated: NAME (coinbase, kraken, bitstamp) or"
                    " NAME=URL (that answer format at another URL); none: no feed", _feeds),
    )
    price_refresh: int = field(
        default=300, metadata=_s("seconds between BTC/USD refreshes", _positive)
    )
    price_max_age: int = field(
        default=3600,
        metadata=_s("a BTC/USD rate older than this marks /health degraded (it is still used)",
                    _positive),
    )
    price_markup: str = field(
        default="1", metadata=_s("multiplier on USD list prices (1.2 = 20 % above)", _markup)
    )
    cashu_mints: tuple[str, ...] = field(
        default=(), metadata=_s("trusted Cashu mints, comma-separated; first = primary", _urls)
    )
    name: str = field(default="ARoutstrNode", metadata=_s("node name shown in /v1/info"))
    description: str = field(
        default="A Routstr Node", metadata=_s("node description shown in /v1/info")
    )
    http_url: str = field(default="", metadata=_s("public http(s) URL of this node", _opt_url))
    onion_url: str = field(default="", metadata=_s("public .onion URL of this node"))
    chat_completions_api_version: str = field(
        default="", metadata=_s("Azure: api-version appended to upstream /chat/completions")
    )
    max_body_bytes: int = field(
        default=10 * MiB, metadata=_s("largest request body accepted", _positive)
    )
    cors_origins: tuple[str, ...] = field(
        default=("*",), metadata=_s("allowed CORS origins, comma-separated")
    )
    keepalive_timeout: float = field(
        default=30.0, metadata=_s("idle keep-alive connections closed after, seconds", _positive)
    )
    header_timeout: float = field(
        default=10.0, metadata=_s("time a client has to send its request headers", _positive)
    )
    shutdown_grace: float = field(
        default=10.0, metadata=_s("seconds in-flight requests get on SIGTERM", _non_negative)
    )
    reservation_ttl: int = field(
        default=900, metadata=_s("seconds before an unsettled reservation is released", _positive)
    )
    recovery_window: int = field(
        default=600,
        metadata=_s("seconds during which a redeemed token re-posted to /v1/balance/create still"
                    " returns its key, and X-Cashu change already handed out is returned again"
                    " (the lost-answer case); later the token is just spent", _positive),
    )
    receive_ln_address: str = field(
        default="", metadata=_s("operator Lightning address for payouts of earnings")
    )
    min_payout_sats: int = field(
        default=210, metadata=_s("earnings threshold for a payout, sats", _positive)
    )
    payout_interval: int = field(
        default=900, metadata=_s("seconds between payout checks", _positive)
    )
    child_key_cost_msats: int = field(
        default=0, metadata=_s("price of one child key, msats", _non_negative)
    )
    log_level: str = field(default="INFO", metadata=_s("DEBUG, INFO, WARNING or ERROR", _log_level))
    rate_limit_requests: int = field(
        default=1000, metadata=_s("requests per minute per key (0 = unlimited)", _non_negative)
    )
    rate_limit_tokens: int = field(
        default=1_000_000,
        metadata=_s("tokens per hour per key, counted from settled usage (0 = unlimited)",
                    _non_negative),
    )
    rate_limit_concurrent: int = field(
        default=10, metadata=_s("requests in flight per key (0 = unlimited)", _non_negative)
    )
    rate_limit_queue_wait: float = field(
        default=10.0,
        metadata=_s("seconds a request over the concurrency limit waits for a slot before 429",
                    _non_negative),
    )
    idempotency_ttl: int = field(
        default=86400, metadata=_s("seconds an Idempotency-Key and its response are kept",
                                   _positive)
    )
    batch_max_requests: int = field(
        default=50, metadata=_s("most sub-requests in one POST /v1/batch", _positive)
    )
    batch_max_bytes: int = field(
        default=1 * MiB, metadata=_s("largest POST /v1/batch body, bytes", _positive)
    )
    batch_concurrency: int = field(
        default=4, metadata=_s("sub-requests of one batch run at the same time", _positive)
    )
    webhooks_allow_private: bool = field(
        default=False,
        metadata=_s("let webhooks target private, loopback and link-local addresses (testing)"),
    )
    lnurl_allow_private: bool = field(
        default=False,
        metadata=_s("let Lightning-address/LNURL lookups (Refund-LNURL refunds, payouts) reach"
                    " private, loopback and link-local addresses (testing)"),
    )
    webhook_low_balance_msats: int = field(
        default=100_000,
        metadata=_s("balance.low threshold for webhooks that set none, msats", _non_negative),
    )
    webhook_scan_interval: float = field(
        default=60.0, metadata=_s("seconds between webhook checks (key.expired)", _positive)
    )
    webhook_retry_base: float = field(
        default=10.0,
        metadata=_s("first webhook retry after this many seconds, doubling up to 1 h", _positive),
    )
    webhook_max_attempts: int = field(
        default=12, metadata=_s("webhook delivery attempts before giving up", _positive)
    )
    nsec: str = field(
        default="",
        metadata=_s("Nostr identity, nsec1… or 64 hex (generated at first start and kept in the"
                    " database if unset)", _nsec, secret=True),
    )
    relays: tuple[str, ...] = field(
        default=(), metadata=_s("Nostr relays to announce on and discover from, ws(s)://,"
                                " comma-separated (none: no Nostr)", _ws_urls)
    )
    announce_interval: int = field(
        default=3600, metadata=_s("seconds between re-announcements to every relay", _positive)
    )
    providers_refresh: int = field(
        default=0,
        metadata=_s("seconds between provider discovery refreshes; 0 disables /v1/providers/",
                    _non_negative),
    )
    providers_allow_private: bool = field(
        default=False,
        metadata=_s("probe discovered nodes on private, loopback and link-local addresses"
                    " (testing)"),
    )

    @property
    def primary_mint(self) -> str | None:
        return self.cashu_mints[0] if self.cashu_mints else None

    def public_items(self) -> list[tuple[str, Any]]:
        """Settings with secrets masked (for the admin page and logs)."""
        out: list[tuple[str, Any]] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "********"
            out.append((f.name, value))
        return out


def where(config: Config, port: int) -> str:
    """The start-up line telling the operator where the dashboard and the database are."""
    host = config.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - all addresses: 127.0.0.1 is one of them
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return (f"dashboard: http://{host}:{port}/admin/ · database: "
            f"{os.path.abspath(config.database)}")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return name.upper()


def _field_type(f: dataclasses.Field[Any]) -> Any:
    hints = typing.get_type_hints(Config)
    return hints[f.name]


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = _field_type(f)
    origin = typing.get_origin(kind)
    try:
        if kind is int:
            return int(raw.strip())
        if kind is float:
            return float(raw.strip())
        if kind is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if origin is tuple:
            return tuple(p.strip().rstrip("/") if "://" in p else p.strip()
                         for p in raw.split(",") if p.strip())
        if kind is str or origin is types.UnionType:
            return raw.strip()
    except ValueError:
        raise ConfigError(f"{flag_name(f.name)}: invalid value {raw!r}") from None
    raise ConfigError(f"{flag_name(f.name)}: unsupported type")


COMMANDS_EPILOG = """\
Every flag can also be set by the environment variable shown in brackets.

Commands: python -m routstr COMMAND … (each has --help; none creates a database):
  keys create|list|show|disable|enable|refund-to-token   prepaid keys
  admin-token show|rotate                                 where the admin token is; a new one
  doctor                                                  check this configuration
"""


def build_parser(prog: str = "python -m routstr") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A Routstr node: OpenAI-compatible gateway paid with Cashu ecash.",
        epilog=COMMANDS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_setting_flags(parser)
    return parser


def add_setting_flags(parser: argparse.ArgumentParser, *, shown: bool = True,
                      skip: Sequence[str] = ()) -> None:
    """One flag per setting (default None: "not given") but those in `skip`; `shown=False`
    keeps them out of the parser's --help (the command line's subcommands, which point at the
    node's --help)."""
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        default = _shown_default(f.default)
        value = "(unset)" if default == "" or f.metadata.get("secret") else default
        text = f"{f.metadata['help']} [{env_name(f.name)}; default: {value}]"
        help = text if shown else argparse.SUPPRESS
        if _field_type(f) is bool:  # a switch: --x / --no-x (the environment: X=true|false)
            parser.add_argument(flag_name(f.name), dest=f.name, default=None, help=help,
                                action=argparse.BooleanOptionalAction)
            continue
        parser.add_argument(flag_name(f.name), dest=f.name, default=None,
                            metavar=env_name(f.name), help=help)


def _shown_default(default: Any) -> Any:
    """A default as the environment would spell it (tuples comma-joined, booleans lower-case)."""
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, tuple):
        return ",".join(default)
    return default


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """argv (flags) > environ > defaults. Raises ConfigError with one clear line."""
    return config_from(build_parser().parse_args(list(argv)), environ)


def config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """The settings of parsed flags (`add_setting_flags`) > environ > defaults."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        raw = getattr(args, f.name)
        if isinstance(raw, bool):  # a switch given on the command line
            values[f.name] = raw
            continue
        if raw is None:
            raw = environ.get(env_name(f.name))
        if raw is None:
            continue
        values[f.name] = _convert(f, raw)
    config = Config(**values)
    for f in dataclasses.fields(Config):
        check = f.metadata.get("check")
        if check is not None:
            try:
                check(getattr(config, f.name))
            except ConfigError as exc:
                raise ConfigError(f"{flag_name(f.name)}: {exc}") from None
    if config.demo and (config.upstream_base_url or config.pricing):
        raise ConfigError("--demo serves its own upstream and price: leave out"
                          " --upstream-base-url and --pricing (or leave out --demo)")
    return config


def env_example() -> str:
    """The text of contrib/routstr.env.example, generated from the table."""
    lines = ["# routstr settings: every flag has an environment variable of the same name.", ""]
    for f in dataclasses.fields(Config):
        lines.append(f"# {f.metadata['help']}")
        lines.append(f"#{env_name(f.name)}={_shown_default(f.default)}")
    return "\n".join(lines) + "\n"
