"""The BTC/USD rate that USD-priced models are billed at (issue 18).

`--btc-usd RATE` pins it. Otherwise `RateFeed.run` polls the `--price-feeds` sources every
`--price-refresh` seconds with the node's own HTTP client (so through `--upstream-proxy`: a Tor
node asks through Tor). Each source's answer is parsed strictly (a decimal rate within
[MIN_RATE, MAX_RATE]); the rate is the median of those that answered, recomputed without any
source more than OUTLIER from it (a lying or broken source cannot move the rate on its own
while others answer). A refresh that gets nothing keeps the last rate; a rate older than
`--price-max-age` marks `/health` degraded. No rate at all: USD entries are refused with 503
(`pricing.at_rate`), msat entries are served.

A request resolves its price once, from `RateFeed.current()` (one `Rate`, an immutable
snapshot): its reservation and its settlement use that snapshot whatever refresh happens
meanwhile.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from statistics import median
from typing import Any, Final
from urllib.parse import urlsplit

import anyio

from . import wire
from .db import Database, DatabaseError
from .errors import UpstreamError

log = logging.getLogger("routstr.prices")

MIN_RATE: Final = Fraction(1)  # USD per BTC a source may report (anything else: ignored)
MAX_RATE: Final = Fraction(10**9)
OUTLIER: Final = Fraction(5, 100)  # a source this far from the median is ignored
FETCH_TIMEOUT_S: Final = 10.0
MAX_ANSWER_BYTES: Final = 64 * 1024
RETRY_S: Final = 30.0  # after a refresh that got no rate, try again this soon
DEFAULT_FEEDS: Final = "coinbase,kraken,bitstamp"
_DECIMAL: Final = re.compile(r"[0-9]{1,12}(\.[0-9]{1,12})?")  # ASCII digits only
_STORED: Final = re.compile(r"[0-9]{1,40}(/[0-9]{1,40})?")  # str(Fraction) as save_rate writes


def _coinbase(doc: Any) -> object:
    return doc["data"]["amount"]


def _kraken(doc: Any) -> object:
    if doc.get("error"):
        raise ValueError(f"kraken error {doc['error']!r}")
    (pair,) = doc["result"].values()  # one pair asked for, one answered
    last = pair["c"]  # [price, lot volume]; a string's first character is no price
    if not isinstance(last, list):
        raise ValueError("kraken: the last trade is not a list")
    return last[0]


def _bitstamp(doc: Any) -> object:
    return doc["last"]


#: name → (public URL, how its answer carries the last BTC/USD trade price)
SOURCES: Final[dict[str, tuple[str, Callable[[Any], object]]]] = {
    "coinbase": ("https://api.coinbase.com/v2/prices/BTC-USD/spot", _coinbase),
    "kraken": ("https://api.kraken.com/0/public/Ticker?pair=XBTUSD", _kraken),
    "bitstamp": ("https://www.bitstamp.net/api/v2/ticker/btcusd/", _bitstamp),
}


@dataclass(frozen=True)
class Source:
    name: str
    url: str

    def parse(self, body: bytes) -> Fraction:
        """The rate in a source's answer; ValueError for anything else."""
        try:
            raw = SOURCES[self.name][1](wire.loads(body))
        except (KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as exc:
            raise ValueError(f"unexpected answer ({type(exc).__name__})") from None
        return parse_rate(raw)


def parse_rate(raw: object) -> Fraction:
    """A BTC/USD rate given as a decimal string or a JSON number, exactly, within bounds."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ValueError("the rate is not a number")
    text = repr(raw) if isinstance(raw, float) else str(raw).strip()
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"the rate {text[:40]!r} is not a decimal number")
    rate = Fraction(text)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"the rate {text} is out of bounds")
    return rate


def parse_feeds(spec: str) -> tuple[Source, ...]:
    """`--price-feeds`: comma-separated `NAME` or `NAME=URL`; `none` (or empty): no feed."""
    items = [p.strip() for p in spec.split(",") if p.strip()]
    if items in ([], ["none"]):
        return ()
    sources = []
    for item in items:
        name, _, url = item.partition("=")
        name = name.strip().lower()
        if name not in SOURCES:
            raise ValueError(f"unknown price source {name!r}; known: {', '.join(SOURCES)}"
                             " (or none)")
        url = url.strip() or SOURCES[name][0]
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"price source {name}: not an http(s) URL: {url!r}")
        sources.append(Source(name, url))
    if len({s.url for s in sources}) != len(sources):
        raise ValueError("a price source is listed twice")
    return tuple(sources)


def combine(quotes: Sequence[tuple[str, Fraction]]) -> tuple[Fraction, tuple[str, ...]] | None:
    """The median of the quotes, recomputed without those more than OUTLIER from it; and the
    sources it is made of. None without quotes, or when none is within OUTLIER of the median
    (two sources more than twice OUTLIER apart: which one lies, nobody can tell)."""
    if not quotes:
        return None
    first = median(q for _, q in quotes)
    kept = [(n, q) for n, q in quotes if abs(q - first) <= first * OUTLIER]
    if not kept:
        return None
    return Fraction(median(q for _, q in kept)), tuple(n for n, _ in kept)


@dataclass(frozen=True)
class Rate:
    """One BTC/USD snapshot: USD per BTC, when it was obtained, from what."""

    usd_per_btc: Fraction
    at: float
    sources: tuple[str, ...]


Fetch = Callable[[str], Any]  # async (url) -> (status, body)


class RateFeed:
    """The current rate: pinned, or kept fresh by `run` from `sources`."""

    def __init__(self, sources: Sequence[Source], *, pinned: Fraction | None = None,
                 refresh_s: float = 300.0, max_age_s: float = 3600.0,
                 fetch: Fetch | None = None, clock: Callable[[], float] = time.time,
                 store: Callable[[Rate], None] | None = None) -> None:
        self.sources = tuple(sources)
        self._store = store
        self.refresh_s = refresh_s
        self.max_age_s = max_age_s
        self._fetch = fetch
        self._clock = clock
        self._rate = Rate(pinned, clock(), ("pinned",)) if pinned is not None else None
        self.pinned = pinned is not None
        self.needed = True  # False: no USD-priced model is served, a missing rate is no problem
        self.last_error = ""
        self.refreshes = 0
        self.failures = 0

    def current(self) -> Rate | None:
        return self._rate

    def adopt(self, rate: Rate | None) -> None:
        """A rate obtained elsewhere (the last one stored, another worker's refresh): taken
        when newer than ours. A pinned rate never changes."""
        if rate is None or self.pinned:
            return
        if self._rate is None or rate.at > self._rate.at:
            self._rate = rate

    def usd_per_btc(self) -> Fraction | None:
        rate = self._rate
        return None if rate is None else rate.usd_per_btc

    def age_s(self) -> float | None:
        rate = self._rate
        return None if rate is None or self.pinned else max(0.0, self._clock() - rate.at)

    def problem(self) -> str | None:
        """Why USD prices are not current (for /health), or None."""
        if not self.needed:
            return None
        if self._rate is None:
            if not self.sources:
                return "no BTC/USD rate: --price-feeds none and no --btc-usd; USD-priced" \
                       " models are not served"
            return "no BTC/USD rate yet (" + (self.last_error or "price feeds not answered") \
                + "); USD-priced models are not served"
        age = self.age_s()
        if age is not None and age > self.max_age_s:
            return f"BTC/USD rate is {int(age)} s old (--price-max-age {int(self.max_age_s)});" \
                f" last refresh: {self.last_error or 'no answer'}"
        return None

    def status(self) -> dict[str, Any]:
        """For /v1/info and /health."""
        rate = self._rate
        age = self.age_s()
        return {
            "usd_per_btc": None if rate is None else str(_decimal(rate.usd_per_btc)),
            "age_s": None if age is None else int(age),
            "sources": [] if rate is None else list(rate.sources),
            "pinned": self.pinned,
        }

    async def _quote(self, source: Source) -> Fraction:
        assert self._fetch is not None
        with anyio.fail_after(min(FETCH_TIMEOUT_S, self.refresh_s)):
            status, body = await self._fetch(source.url)
        if status != 200:
            raise ValueError(f"HTTP {status}")
        return source.parse(body)

    async def refresh_once(self) -> Rate | None:
        """Ask every source at once; a new rate if any answered (else the old one is kept)."""
        if self.pinned or not self.sources:
            return self._rate
        quotes: list[tuple[str, Fraction]] = []
        errors: list[str] = []

        async def ask(source: Source) -> None:
            try:
                quotes.append((source.name, await self._quote(source)))
            except (ValueError, TimeoutError, OSError, UpstreamError) as exc:
                errors.append(f"{source.name}: {type(exc).__name__}: {str(exc)[:80]}")

        async with anyio.create_task_group() as tg:
            for source in self.sources:
                tg.start_soon(ask, source)
        self.refreshes += 1
        combined = combine(sorted(quotes))
        if combined is None and quotes:
            errors.append(f"the sources disagree by more than {int(200 * OUTLIER)} %: "
                          + ", ".join(f"{n} {_decimal(q)}" for n, q in sorted(quotes)))
        self.last_error = "; ".join(sorted(errors))
        if combined is None:
            self.failures += 1
            log.warning("BTC/USD refresh got no rate (%s); keeping %s", self.last_error,
                        "none" if self._rate is None else _decimal(self._rate.usd_per_btc))
            return self._rate
        rate, used = combined
        ignored = sorted({n for n, _ in quotes} - set(used))
        if ignored:
            log.warning("BTC/USD: ignored %s, too far from the median", ", ".join(ignored))
        self._rate = Rate(rate, self._clock(), used)
        if self._store is not None:
            try:
                self._store(self._rate)
            except DatabaseError as exc:  # the rate is still used here; kept next time
                log.warning("BTC/USD rate not stored: %s", exc)
        return self._rate

    async def follow(self, load: Callable[[], Rate | None], every_s: float) -> None:
        """In a worker that does not poll the sources: adopt the stored rate every `every_s`."""
        if self.pinned or not self.sources:
            return
        while True:
            self.adopt(load())
            await anyio.sleep(every_s)

    async def run(self) -> None:
        """Refresh forever: every refresh_s, sooner after a refresh that got nothing."""
        if self.pinned or not self.sources:
            return
        while True:
            rate = await self.refresh_once()
            fresh = rate is not None and self._clock() - rate.at < 1.0
            await anyio.sleep(self.refresh_s if fresh else min(RETRY_S, self.refresh_s))


def _decimal(x: Fraction) -> str:
    """An exact decimal when there is one (rates come from decimal strings), else 8 places."""
    d = x.denominator
    k = 0
    while d % 2 == 0 or d % 5 == 0:
        d //= 2 if d % 2 == 0 else 5
        k += 1
    if d != 1 or k > 12:
        return f"{float(x):.8f}"
    scaled = x * 10**k
    text = str(scaled.numerator).rjust(k + 1, "0")
    return text if k == 0 else (text[:-k] + "." + text[-k:]).rstrip("0").rstrip(".")


def rate_from_text(value: str) -> Fraction:
    """`--btc-usd`: a positive decimal number within bounds."""
    return parse_rate(value.strip())


SETTING: Final = "btc_usd_rate"


def save_rate(db: Database, rate: Rate) -> None:
    """Keep the last rate (node_settings), so a restart or another worker has it at once."""
    value = json.dumps({"usd_per_btc": str(rate.usd_per_btc), "at": rate.at,
                        "sources": list(rate.sources)})
    db.transaction(lambda c: c.execute(
        "INSERT INTO node_settings (name, value, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value,"
        " updated_at = excluded.updated_at", (SETTING, value, int(rate.at))))


def load_rate(db: Database, now: Callable[[], float] = time.time) -> Rate | None:
    """The stored rate; None when there is none or it is malformed. Its time is read from the
    database too: one not finite is malformed, one ahead of the clock (set back since) is taken
    as now — else that rate would be newer than every later one (`RateFeed.adopt`: a worker
    would keep it for good) and never stale in /health."""
    row = db.read(lambda c: c.execute("SELECT value FROM node_settings WHERE name = ?",
                                      (SETTING,)).fetchone())
    if row is None:
        return None
    try:
        doc = json.loads(row[0])
        text = str(doc["usd_per_btc"])
        if not _STORED.fullmatch(text):  # never build a huge number from a tampered row
            return None
        rate = Fraction(text)
        if not MIN_RATE <= rate <= MAX_RATE:
            return None
        at = float(doc["at"])
        if not math.isfinite(at):
            return None
        return Rate(rate, min(at, now()), tuple(str(x) for x in doc["sources"]))
    except (ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
