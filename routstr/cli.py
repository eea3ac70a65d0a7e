"""The operator's command line: ``python -m routstr keys|admin-token|doctor …``.

The node's database
    No command ever creates a database: a key made in a new, empty file is a key the running
    node rejects. The file is ``--database``, else ``DATABASE``, else the first of
    `DATABASE_SEARCH` that exists (``./routstr.sqlite3``, then the Tor/systemd layout's
    ``/var/lib/routstr/routstr.sqlite3``); it must already be a routstr database
    (`db.open_existing`). The one used is named on stderr; none found is one line and exit 2.

Output
    What a command produces goes to stdout (a new key or token once, JSON or a table);
    which database was used, and expected failures, are one line each on stderr ("routstr:
    …"; a failure exits 2). Secrets go nowhere else: nothing here logs.

Commands that need the node's settings (``keys refund-to-token``, ``admin-token``, ``doctor``)
take every node flag and read the environment as the node does (`config.config_from`): run
them with the node's environment (e.g. ``set -a; . /etc/routstr/routstr.env; set +a``).
`__main__` hands over the arguments and the environment (`main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import anyio

from . import admin_store
from .admin import admin_token_path, rotate_admin_token, token_hash
from .admin_service import MAX_GRANT_MSATS, key_doc, new_key
from .config import Config, ConfigError, add_setting_flags, config_from
from .db import Database, DatabaseError, NotUsable, open_existing
from .errors import ApiError
from .ledger import LIMIT_RESETS, Account, Ledger

COMMANDS: Final = ("keys", "admin-token", "doctor")
#: Where a database is looked for when neither --database nor DATABASE names one.
DATABASE_SEARCH: Final = ("routstr.sqlite3", "/var/lib/routstr/routstr.sqlite3")
#: Replaces `DATABASE_SEARCH` (paths separated by os.pathsep): for the tests only.
SEARCH_ENV: Final = "ROUTSTR_DATABASE_SEARCH"
LIST_KINDS: Final = ("api", "token", "child")
LIST_LIMIT: Final = 200
PREFIX_MIN_HEX: Final = 8
NODE_FLAGS: Final = ("takes every node flag (python -m routstr --help) and the node's"
                     " environment variables")


class CliError(Exception):
    """An expected failure: one line on stderr, exit code 2."""


def say(line: str) -> None:
    print(f"routstr: {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Finding the node's database
# --------------------------------------------------------------------------------------------


def database_candidates(environ: Mapping[str, str]) -> tuple[str, ...]:
    raw = environ.get(SEARCH_ENV)
    return tuple(p for p in raw.split(os.pathsep) if p) if raw is not None else DATABASE_SEARCH


def find_database(explicit: str | None, environ: Mapping[str, str]) -> tuple[str, str]:
    """(path, where it came from) of the node's database; CliError when there is none."""
    named = [(explicit, "--database"), (environ.get("DATABASE"), "DATABASE")]
    for path, source in named:
        if path:
            if not os.path.isfile(path):
                raise CliError(f"{path} (from {source}) does not exist; point at the node's"
                               " database with --database PATH or DATABASE=PATH")
            return path, f"from {source}"
    looked = database_candidates(environ)
    for path in looked:
        if os.path.isfile(path):
            return path, "found"
    shown = ", ".join(os.path.abspath(p) for p in looked) or "(nowhere)"
    raise CliError(f"no routstr database at {shown}; point at the"
                   " node's database with --database PATH or DATABASE=PATH")


def open_database(explicit: str | None, environ: Mapping[str, str]) -> Database:
    path, source = find_database(explicit, environ)
    db = open_existing(path)
    say(f"database {os.path.abspath(path)} ({source})")
    return db


def node_config(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """The node's settings from these flags and the environment, with the database found."""
    config = config_from(args, environ)
    path, source = find_database(args.database, environ)
    open_existing(path).close()  # exists and is a routstr database: never created below
    say(f"database {os.path.abspath(path)} ({source})")
    return dataclasses.replace(config, database=path)


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------


def find_key(db: Database, text: str) -> Account:
    """A key by id (``12``, ``#12``), by the start of its hash (as `keys list` shows it), by
    the key itself or by ``sk-…abcd`` as listed (when no other key ends the same)."""
    term = text.strip()
    raw = term[1:] if term.startswith("#") else term
    if re.fullmatch(r"[0-9]{1,18}", raw):
        acct = db.read(lambda c: admin_store.get_key(c, int(raw))
                       if not admin_store.is_deleted(c, int(raw)) else None)
        if acct is not None or term.startswith("#") or len(raw) < PREFIX_MIN_HEX:
            if acct is None:
                raise CliError(f"no key #{raw}")
            return acct
    if term.startswith(("sk-", "cashu")):  # the key, or sk-…abcd as listed (its last four)
        found, _ = db.read(lambda c: admin_store.list_keys(c, search=term, limit=2, offset=0))
    elif re.fullmatch(rf"[0-9a-fA-F]{{{PREFIX_MIN_HEX},64}}", term):
        found = db.read(lambda c: admin_store.keys_by_hash_prefix(c, term))
    else:
        raise CliError(f"{text!r}: give a key id (12 or #12), at least {PREFIX_MIN_HEX} hex"
                       " digits of its hash (as `keys list` shows it), the key or sk-…abcd")
    if len(found) != 1:
        raise CliError(f"no key matches {text!r}" if not found else
                       f"{text!r} matches several keys; give more of the hash, or the id")
    return found[0]


def key_status(a: Account, now: float) -> str:
    if a.disabled:
        return "disabled"
    return "expired" if a.validity_date is not None and now >= a.validity_date else "active"


def key_json(a: Account) -> dict[str, Any]:
    return {**key_doc(a), "key_hash": a.key_hash, "status": key_status(a, time.time())}


def _when(t: int | None) -> str:
    return "-" if t is None else dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M")


def key_table(keys: Sequence[Account]) -> str:
    head = ("ID", "KIND", "KEY", "HASH", "BALANCE_MSATS", "RESERVED_MSATS", "REQUESTS",
            "STATUS", "CREATED (UTC)")
    now = time.time()
    rows = [head] + [(str(a.id), a.kind, f"sk-…{a.hint}", a.key_hash[:12], str(a.balance_msats),
                      str(a.reserved_msats), str(a.total_requests), key_status(a, now),
                      _when(a.created_at)) for a in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def msats_arg(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,16}", text.strip()) or int(text) > MAX_GRANT_MSATS:
        raise argparse.ArgumentTypeError(f"not a whole number of msats from 0 to"
                                         f" {MAX_GRANT_MSATS}: {text!r}")
    return int(text)


def time_arg(text: str) -> int:
    """Unix seconds, or an ISO 8601 date / date and time (UTC unless it names a zone)."""
    raw = text.strip()
    try:
        when = int(raw) if re.fullmatch(r"[0-9]{1,13}", raw) else int(_iso(raw).timestamp())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not unix seconds or an ISO date: {text!r}") from None
    if not 0 <= when < 1 << 40:
        raise argparse.ArgumentTypeError(f"out of range: {text!r}")
    return when


def _iso(raw: str) -> dt.datetime:
    when = dt.datetime.fromisoformat(raw)
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def keys_create(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    db = open_database(args.database, environ)
    try:
        api_key, acct = new_key(Ledger(db), args.balance_msats,
                                balance_limit_msats=args.balance_limit_msats,
                                balance_limit_reset=args.balance_limit_reset,
                                validity_date=args.expires)
    finally:
        db.close()
    print(json.dumps({"api_key": api_key, "balance_msats": acct.balance_msats, "id": acct.id}))
    return 0


def keys_list(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    kinds = tuple(args.kind) if args.kind else LIST_KINDS
    with open_database(args.database, environ) as db:
        keys, total = db.read(lambda c: admin_store.list_keys(
            c, kinds=kinds, limit=args.limit, offset=0))
    if args.json:
        print(json.dumps({"data": [key_json(a) for a in keys], "total": total},
                         ensure_ascii=False))
        return 0
    print(key_table(keys))
    if total > len(keys):
        say(f"{len(keys)} of {total} keys shown (newest first); --limit shows more")
    return 0


def keys_show(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    with open_database(args.database, environ) as db:
        acct = find_key(db, args.key)
        kids, _ = db.read(lambda c: admin_store.list_keys(c, parent_id=acct.id,
                                                          limit=LIST_LIMIT, offset=0))
    print(json.dumps({**key_json(acct), "children": [k.id for k in kids]}, indent=2,
                     ensure_ascii=False))
    return 0


def keys_set_disabled(disabled: bool) -> Callable[[argparse.Namespace, Mapping[str, str]], int]:
    def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
        with open_database(args.database, environ) as db:
            key_id = find_key(db, args.key).id
            now = int(time.time())
            acct = db.transaction(lambda c: admin_store.set_disabled(c, key_id, disabled,
                                                                     now=now))
        print(f"key #{acct.id} (sk-…{acct.hint}): {key_status(acct, now)}")
        return 0
    return run


def keys_refund(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    config = node_config(args, environ)
    if not config.cashu_mints:
        raise CliError("no trusted mints (--cashu-mints / CASHU_MINTS, as the node has them):"
                       " the refund is made by the node's wallet at its mints")
    return anyio.run(_refund, config, args.key)


async def _refund(config: Config, selector: str) -> int:
    from .app import Node  # the node's own wallet and refund path (heavy: only here)

    node = Node.open(config)
    try:
        acct = find_key(node.db, selector)
        assert node.cashu is not None
        try:
            result = await node.cashu.refund(acct, to_token=True)
        except ApiError as exc:
            after = node.ledger.get_account_by_id(acct.id) or acct
            why = ("the mint is unreachable" if exc.code == "cashu_mint_unreachable"
                   else exc.message)
            raise CliError(f"refund of key #{acct.id} failed: {why} ({exc.code}); its balance"
                           f" is {after.balance_msats} msats") from None
    finally:
        with anyio.CancelScope(shield=True):
            await node.aclose()
    print(json.dumps({"key_id": acct.id, **result}))
    return 0


# --------------------------------------------------------------------------------------------
# admin-token
# --------------------------------------------------------------------------------------------

ADMIN_FLAGS: Final = "--admin-token / ADMIN_TOKEN"


def _token_file(path: str, stored: str) -> str:
    """What the token file holds, as one line for the operator (the token only if current)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return (f"{path} is missing; the generated token still works (only its hash is"
                " stored): `admin-token rotate` makes a new one")
    except OSError as exc:
        return f"{path} is not readable by this user ({exc.strerror}): run as the node's user"
    if token_hash(text) != stored:
        return f"{path} does not hold the current token: `admin-token rotate` makes a new one"
    return f"file: {path} (mode {os.stat(path).st_mode & 0o777:04o})\n{text}"


def admin_token_show(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    config = node_config(args, environ)
    if config.admin_token:
        print(f"the admin token is set by {ADMIN_FLAGS}: it is not stored in clear here")
        return 0
    with Database(config.database) as db:
        stored = db.read(admin_store.stored_admin_hash)
    path = admin_token_path(config.database)
    if stored is None or path is None:
        print(f"no generated admin token in this database: the node runs with {ADMIN_FLAGS}"
              " (not stored in clear)")
        return 0
    print(_token_file(os.path.abspath(path), stored))
    return 0


def admin_token_rotate(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    config = node_config(args, environ)
    if config.admin_token:
        raise CliError(f"the admin token is set by {ADMIN_FLAGS}, which wins over a stored one:"
                       " change it there and restart the node")
    path = admin_token_path(config.database)
    with Database(config.database) as db:
        if db.read(admin_store.stored_admin_hash) is None or path is None:
            raise CliError(f"no generated admin token in this database: the node runs with"
                           f" {ADMIN_FLAGS}; change it there and restart the node")
        token = rotate_admin_token(db, path)
    _same_owner(path, config.database)
    print(token)
    say(f"new admin token, also in {os.path.abspath(path)} (mode 0600); the running node"
        " takes it now, the old one and its sessions no longer work (a node started with"
        f" {ADMIN_FLAGS} would still use that one)")
    return 0


def _same_owner(path: str, database: str) -> None:
    """Run as root (sudo), a new token file would be root's: give it the database's owner."""
    if os.geteuid() == 0:
        st = os.stat(database)
        os.chown(path, st.st_uid, st.st_gid)


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------

Run = Callable[[argparse.Namespace, Mapping[str, str]], int]
DATABASE_HELP: Final = ("the node's sqlite database [DATABASE; default: the first that exists"
                        " of ./routstr.sqlite3, /var/lib/routstr/routstr.sqlite3]; never created")


def _command(sub: Any, name: str, run: Run, help: str, *,
             node_flags: bool = False) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=help + (f"; {NODE_FLAGS}." if node_flags else "."))
    if node_flags:  # all but --database, which is found as below
        add_setting_flags(parser, shown=False, skip=("database",))
    parser.add_argument("--database", default=None, metavar="PATH", help=DATABASE_HELP)
    parser.set_defaults(run=run)
    return parser


def _keys_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="prepaid sk- keys", description="Prepaid sk- keys.")
    ksub = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = _command(ksub, "create", keys_create,
                      "create a key funded by an operator grant (printed once, stored hashed)")
    create.add_argument("--balance-msats", type=msats_arg, required=True, metavar="MSATS")
    create.add_argument("--balance-limit-msats", type=msats_arg, metavar="MSATS",
                        help="most it may spend per period (default: no limit)")
    create.add_argument("--balance-limit-reset", choices=LIMIT_RESETS,
                        help="the limit's period (default: never reset)")
    create.add_argument("--expires", type=time_arg, metavar="WHEN",
                        help="unusable from then on: unix seconds or an ISO 8601 date/time"
                             " (UTC unless a zone is given)")
    listing = _command(ksub, "list", keys_list, "list keys, newest first")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.add_argument("--kind", action="append", metavar="KIND",
                         help=f"only this kind (repeatable; default: {', '.join(LIST_KINDS)};"
                              " one-request X-Cashu accounts: xcashu)")
    listing.add_argument("--limit", type=int, default=LIST_LIMIT, help="most keys shown")
    selector = ("KEY", "an id (12 or #12), the start of its hash (at least"
                f" {PREFIX_MIN_HEX} hex digits, as `keys list` shows it), the key, or sk-…abcd"
                " as listed")
    for name, run, help in (
            ("show", keys_show, "one key as JSON"),
            ("disable", keys_set_disabled(True), "stop a key paying for requests (401)"),
            ("enable", keys_set_disabled(False), "let a disabled key pay again")):
        _command(ksub, name, run, help).add_argument("key", metavar=selector[0],
                                                     help=selector[1])
    refund = _command(ksub, "refund-to-token", keys_refund,
                      "refund a key's balance (whole sats) as a Cashu token from the node's"
                      " wallet", node_flags=True)
    refund.add_argument("key", metavar=selector[0], help=selector[1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m routstr", description="The node's command line; without a command"
        " (or with flags only) `python -m routstr` runs the node.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _keys_parser(sub)
    token = sub.add_parser("admin-token", help="the admin token",
                           description="Where the admin token is, or a new one.")
    tsub = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    _command(tsub, "show", admin_token_show, "where the admin token is (and it, if readable)",
             node_flags=True)
    _command(tsub, "rotate", admin_token_rotate, "a new generated admin token, printed once;"
             " the running node takes it at once", node_flags=True)
    from .doctor import doctor  # it uses this module's helpers

    doc = _command(sub, "doctor", doctor, "check this configuration: one OK/WARN/FAIL line per"
                   " check, exit 1 on any FAIL", node_flags=True)
    doc.add_argument("--timeout", type=float, default=5.0, metavar="S",
                     help="seconds each network check may take (default 5)")
    return parser


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """`python -m routstr COMMAND …` (`__main__` passes argv without the program, and
    os.environ). Expected failures: one line on stderr, exit 2."""
    args = build_parser().parse_args(list(argv))
    try:
        return int(args.run(args, environ))
    except (CliError, ConfigError, NotUsable) as exc:
        say(str(exc))
    except ApiError as exc:  # the ledger's refusals (no such key, …)
        say(f"{exc.message} ({exc.code})")
    except (DatabaseError, OSError) as exc:
        say(f"{type(exc).__name__}: {exc}")
    return 2
