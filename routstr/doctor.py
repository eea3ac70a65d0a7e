"""`python -m routstr doctor`: check a configuration the way the node would use it.

The settings come from the same flags and environment as the node's (`config.config_from`);
each check prints one line, ``OK``, ``WARN`` (works, but probably not what was meant) or
``FAIL`` (the node cannot do its job), as soon as it is known. Exit code 1 on any FAIL, else 0.

Checks: the configuration loads; the database exists, is a routstr database and takes a write
(`status.database_writable`, the node's health check); the upstream answers ``GET
{base}/models`` (with the upstream key, so a refused key shows); every trusted mint answers
``GET /v1/keysets`` with an active ``sat`` keyset; a public URL is set; relays without a
public URL (nothing would be announced); an admin token exists. Network checks go through
``--upstream-proxy`` like the node's and each takes at most ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from typing import Any, Final

import anyio

from . import admin_store
from .cli import CliError, find_database
from .client import HttpClient
from .config import Config, ConfigError, config_from
from .db import Database, NotUsable, open_existing
from .errors import UpstreamError
from .nostr import announced_endpoints
from .status import database_writable

OK: Final = "OK"
WARN: Final = "WARN"
FAIL: Final = "FAIL"
MAX_ANSWER_BYTES: Final = 4 << 20
WALLET_UNIT: Final = "sat"


class Report:
    def __init__(self) -> None:
        self.failed = False

    def line(self, level: str, check: str, detail: str) -> None:
        self.failed |= level == FAIL
        print(f"{level:<4} {check}: {detail}", flush=True)


def doctor(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    report = Report()
    try:
        config = config_from(args, environ)
    except ConfigError as exc:
        report.line(FAIL, "config", str(exc))
        return 1
    report.line(OK, "config", "loaded (flags, then environment, then defaults)")
    db = check_database(report, args.database, environ)
    try:
        anyio.run(check_network, report, config, float(args.timeout))
        check_public(report, config)
        check_admin_token(report, config, db)
    finally:
        if db is not None:
            db.close()
    return 1 if report.failed else 0


def check_database(report: Report, explicit: str | None,
                   environ: Mapping[str, str]) -> Database | None:
    try:
        path, source = find_database(explicit, environ)
        db = open_existing(path)
    except (CliError, NotUsable) as exc:
        report.line(FAIL, "database", str(exc))
        return None
    state = database_writable(db)
    where = f"{os.path.abspath(path)} ({source}, schema {db.schema_version})"
    if state != "ok":
        report.line(FAIL, "database", f"{where} does not take a write: {state}")
    else:
        report.line(OK, "database", f"{where}, writable")
    return db


async def check_network(report: Report, config: Config, wait_s: float) -> None:
    http = HttpClient(connect_timeout=wait_s, read_timeout=wait_s,
                      proxy=config.upstream_proxy or None)
    try:
        await check_upstream(report, config, http, wait_s)
        if not config.cashu_mints:
            report.line(WARN, "mints", "none (--cashu-mints / CASHU_MINTS): the node takes no"
                        " Cashu payments")
        for mint in config.cashu_mints:
            await check_mint(report, mint, http, wait_s)
    finally:
        await http.aclose()


async def _get(http: HttpClient, url: str, headers: list[tuple[str, str]],
               wait_s: float) -> tuple[int, bytes] | str:
    """(status, body), or why there is none (one line)."""
    try:
        with anyio.fail_after(wait_s):
            status, _, body = await http.fetch("GET", url, headers, max_bytes=MAX_ANSWER_BYTES)
    except TimeoutError:
        return f"no answer within {wait_s:g} s"
    except UpstreamError as exc:
        return f"{exc.code}: {exc.message}"
    return status, body


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


async def check_upstream(report: Report, config: Config, http: HttpClient,
                         wait_s: float) -> None:
    if not config.upstream_base_url:
        report.line(FAIL, "upstream", "not set (--upstream-base-url / UPSTREAM_BASE_URL)")
        return
    url = config.upstream_base_url.rstrip("/") + "/models"
    key = config.upstream_api_key
    got = await _get(http, url, [("authorization", f"Bearer {key}")] if key else [], wait_s)
    if isinstance(got, str):
        report.line(FAIL, "upstream", f"GET {url}: {got}")
        return
    status, body = got
    if status == 200:
        doc = _json(body)
        data = doc.get("data") if isinstance(doc, dict) else None
        count = f" ({len(data)} models)" if isinstance(data, list) else ""
        report.line(OK, "upstream", f"GET {url}: 200{count}")
    elif status in (401, 403):
        report.line(FAIL, "upstream", f"GET {url}: {status}, the upstream refuses the key"
                    " (--upstream-api-key / UPSTREAM_API_KEY)")
    else:
        report.line(FAIL if status >= 500 else WARN, "upstream", f"GET {url}: {status}")


async def check_mint(report: Report, mint: str, http: HttpClient, wait_s: float) -> None:
    url = mint.rstrip("/") + "/v1/keysets"
    got = await _get(http, url, [], wait_s)
    if isinstance(got, str):
        report.line(FAIL, f"mint {mint}", f"GET {url}: {got}")
        return
    status, body = got
    doc = _json(body)
    keysets = doc.get("keysets") if status == 200 and isinstance(doc, dict) else None
    if not isinstance(keysets, list):
        report.line(FAIL, f"mint {mint}", f"GET {url}: {status}, no keyset list")
        return
    sets = [k for k in keysets if isinstance(k, dict)]
    active = sorted({str(k.get("unit")) for k in sets if k.get("active")})
    detail = f"{len(sets)} keysets, active units: {', '.join(active) or 'none'}"
    if WALLET_UNIT not in active:
        report.line(FAIL, f"mint {mint}", f"{detail}; no active '{WALLET_UNIT}' keyset (the"
                    " node's wallet works in sat)")
    else:
        report.line(OK, f"mint {mint}", detail)


def check_public(report: Report, config: Config) -> None:
    urls = announced_endpoints(config.http_url, config.onion_url)
    if urls:
        report.line(OK, "public URL", ", ".join(urls))
    else:
        report.line(WARN, "public URL", "none (--http-url / --onion-url): clients and"
                    " directories learn no address for this node")
    if config.relays and not urls:
        report.line(WARN, "relays", f"{len(config.relays)} configured but no public URL:"
                    " nothing will be announced")
    elif config.relays:
        report.line(OK, "relays", f"{len(config.relays)}, announcing {', '.join(urls)}")


def check_admin_token(report: Report, config: Config, db: Database | None) -> None:
    if config.admin_token:
        report.line(OK, "admin token", "set by --admin-token / ADMIN_TOKEN")
    elif db is None:
        report.line(FAIL, "admin token", "unknown: no database to look in")
    elif db.read(admin_store.stored_admin_hash) is not None:
        report.line(OK, "admin token", "generated by the node (`python -m routstr admin-token"
                    " show` tells where)")
    else:
        report.line(FAIL, "admin token", "none: not set by --admin-token / ADMIN_TOKEN here and"
                    " none generated in the database (run doctor with the node's environment)")
