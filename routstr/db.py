"""The sqlite layer: open (WAL, foreign keys, busy timeout), migrate, and the one write gateway.

Only this module and `ledger.py` import `sqlite3`. Everything that writes goes through
`Database.transaction(fn)`: ``BEGIN IMMEDIATE`` (take the write lock up front, so a
read-then-write inside `fn` can never be overtaken by another writer), run the plain function
``fn(conn)``, ``COMMIT``; any exception rolls back and is re-raised. `fn` must not await — a
transaction never spans an `await`, so it is short and no other task can interleave with it.

Several processes may open the same file (``--workers N``): correctness comes from sqlite's
locking (one writer at a time, ``busy_timeout`` waits for the lock), never from Python locks.
The connection belongs to the thread that opened it (the event-loop thread; sqlite3 refuses use
from another thread — open a second `Database` there); each call is synchronous and short.
Transactions slower than `SLOW_TRANSACTION_S` are logged.

Migrations
    `MIGRATIONS[i]` is an SQL script that takes ``PRAGMA user_version`` from ``i`` to ``i + 1``.
    At open, the missing ones run in order, each in its own ``BEGIN IMMEDIATE`` transaction that
    first re-reads ``user_version`` (two processes starting together migrate once). Later modules
    append entries; never edit or reorder a published entry. A file whose version is newer than
    this code refuses to open.

Durability (measured on this machine's ext4 disk, see the numbers below)
    The database runs in WAL mode with ``synchronous=NORMAL``: a commit appends to the WAL and
    does not wait for the disk; the WAL is fsynced at checkpoints. ``transaction(fn,
    durable=True)`` switches the connection to ``synchronous=FULL`` for that one commit, which
    fsyncs the WAL before ``COMMIT`` returns.

    Policy (applied by `ledger.Ledger`): money entering or leaving the node — deposits, grants,
    refunds, payouts, X-Cashu change, child-key fees — commits durably; the per-request
    reserve / settle / release / sweep commit with NORMAL.

    The fsync never runs on the event loop (`defer_durable_sync`, switched on by the node): on
    an SD card one fsync takes up to seconds, and every connection would stall meanwhile. A
    durable transaction then commits like a NORMAL one (the write lock is held for
    microseconds, no await inside: the one-writer rule is unchanged) and the connection owes
    an fsync of the WAL; `await sync_durable()` pays it in a worker thread — one fsync for
    every commit before it (group commit), while the loop goes on serving. The rule that makes
    this as safe as ``synchronous=FULL``: nothing outside the process may learn of a durable
    commit before its fsync — the node awaits `sync_durable` before every mint call (the
    wallet's transport: a write-ahead intent is on disk before the mint hears of it) and
    before any answer, or streamed chunk, of a request during which a durable commit
    happened. A power cut can lose only the unsynced suffix of the WAL (a prefix survives,
    see below), and nobody was told of it — other requests may have *seen* the state (a
    balance) meanwhile, and what they did with it is later in the WAL and lost with it; an
    upstream may have served a request paid by a deposit whose credit was lost, which the
    wallet's recovery credits again at start (the node forgoes that request, as for a lost
    settle). The durability is the same as FULL's; what moves is only which thread waits for
    the disk (tests/test_hostile_resources.py slows the real fsync system call with
    tests/support/slowfsync.c, LD_PRELOAD, to show it).

    What a power cut (or kernel crash) can lose: only a *suffix* of the most recent NORMAL commits
    — the WAL is a log, so an fsync for a durable commit also makes every earlier commit durable,
    and what survives is always a prefix of the commit history (never a torn or reordered
    state). Concretely: reservations made, and requests settled, in the last moments before the
    cut. A lost settle means the reservation reappears and is released by the start-up sweep: the
    user keeps the money for those requests and the node forgoes their revenue; a user's balance
    is never reduced by a lost write.
    What it cannot lose: any deposit, grant, refund or payout whose transaction returned (with
    the fsync deferred: whose request was answered, or whose mint call was made), nor
    anything committed before it. A process crash (SIGKILL, OOM) loses nothing that was
    committed, in either mode — the WAL is in the OS page cache.

    Measured on this machine (ext4 on a virtual disk; tests/test_db.py and
    tests/test_ledger.py print their numbers): a NORMAL commit ≈ 8 µs, a FULL commit ≈ 0.2–0.8
    ms median (one WAL fdatasync; p99 a few ms). One reserve + settle pair — two NORMAL
    transactions, what every proxied request costs the ledger — ≈ 65 µs median; a durable
    credit ≈ 0.2 ms. FULL for every per-request operation would add two fsyncs per request for
    nothing a user can observe, hence the split. The pair's p99 (≈ 3.5 ms) is sqlite's automatic
    WAL checkpoint (every 1000 pages, about every 70 requests), which fsyncs the database file;
    the node turns it off and runs `checkpoint_file` once a second from a worker thread instead,
    which also keeps the WAL bounded under sustained load (see there).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")

# For modules that run SQL through `Database.transaction` / `read` without importing sqlite3.
Connection = sqlite3.Connection
DatabaseError = sqlite3.Error

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000
# Every commit appends each page it touched to the WAL in full: with the node's small rows, 1 KiB
# pages write a quarter of what sqlite's default 4 KiB do (a proxied request: ~17 KB instead of
# ~66 KB) and made the per-request ledger work about a quarter faster here.
PAGE_SIZE_BYTES = 1024
WAL_RESTART_FRAMES = 2000  # WAL frames left after a passive checkpoint that force a restart
WAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024  # a restarted WAL file is truncated back to this
SLOW_TRANSACTION_S = 0.050
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

# --------------------------------------------------------------------------------------------
# Migrations. Entry i takes user_version from i to i+1. Append only.
# --------------------------------------------------------------------------------------------

_MIGRATION_1_LEDGER = """
-- Accounts: one row per API key, Cashu-token key, X-Cashu payment or child key.
-- Money columns are integer msats. Conservation, per row:
--   deposited + granted = balance + reserved + spent + refunded
-- Child keys hold no money (all money columns stay 0): they spend their parent's balance.
CREATE TABLE keys (
    id                  INTEGER PRIMARY KEY,
    key_hash            TEXT    NOT NULL UNIQUE CHECK (length(key_hash) = 64),
    hint                TEXT    NOT NULL DEFAULT '' CHECK (length(hint) <= 4),
    kind                TEXT    NOT NULL CHECK (kind IN ('api', 'token', 'xcashu', 'child')),
    parent_id           INTEGER REFERENCES keys (id),
    balance_msats       INTEGER NOT NULL DEFAULT 0 CHECK (balance_msats >= 0),
    reserved_msats      INTEGER NOT NULL DEFAULT 0 CHECK (reserved_msats >= 0),
    spent_msats         INTEGER NOT NULL DEFAULT 0 CHECK (spent_msats >= 0),
    deposited_msats     INTEGER NOT NULL DEFAULT 0 CHECK (deposited_msats >= 0),
    granted_msats       INTEGER NOT NULL DEFAULT 0 CHECK (granted_msats >= 0),
    refunded_msats      INTEGER NOT NULL DEFAULT 0 CHECK (refunded_msats >= 0),
    usage_msats         INTEGER NOT NULL DEFAULT 0 CHECK (usage_msats >= 0),
    total_requests      INTEGER NOT NULL DEFAULT 0 CHECK (total_requests >= 0),
    tx_count            INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    last_used_at        INTEGER,
    disabled            INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    balance_limit_msats INTEGER CHECK (balance_limit_msats IS NULL OR balance_limit_msats >= 0),
    balance_limit_reset TEXT    CHECK (balance_limit_reset IS NULL
                                       OR balance_limit_reset IN ('daily', 'weekly', 'monthly')),
    limit_window_start  INTEGER,
    limit_spent_msats   INTEGER NOT NULL DEFAULT 0 CHECK (limit_spent_msats >= 0),
    validity_date       INTEGER,
    refund_address      TEXT,
    refund_expiry       INTEGER,
    refund_mint         TEXT,
    refund_unit         TEXT,
    CHECK (balance_msats + reserved_msats + spent_msats + refunded_msats
           = deposited_msats + granted_msats),
    CHECK ((kind = 'child') = (parent_id IS NOT NULL)),
    CHECK (kind != 'child' OR (balance_msats = 0 AND reserved_msats = 0 AND spent_msats = 0
                               AND deposited_msats = 0 AND granted_msats = 0
                               AND refunded_msats = 0))
);
CREATE INDEX keys_parent ON keys (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX keys_hint ON keys (hint);

-- Money held for requests in flight. key_id is the account whose balance is held (the parent
-- for a child key); child_id the child key that made the request. owner = boot id of the
-- process that made it (see ledger.release_orphans).
CREATE TABLE reservations (
    id           INTEGER PRIMARY KEY,
    key_id       INTEGER NOT NULL REFERENCES keys (id),
    child_id     INTEGER REFERENCES keys (id),
    amount_msats INTEGER NOT NULL CHECK (amount_msats >= 0),
    request_id   TEXT    NOT NULL,
    owner        TEXT    NOT NULL DEFAULT '',
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);
CREATE INDEX reservations_key ON reservations (key_id);
CREATE INDEX reservations_child ON reservations (child_id) WHERE child_id IS NOT NULL;
CREATE INDEX reservations_expiry ON reservations (expires_at);

-- Append-only transaction log: one row per ledger operation. key_id is the account whose money
-- moved (the parent for child-key activity), child_id the child key involved, if any.
CREATE TABLE txlog (
    id           INTEGER PRIMARY KEY,
    time         INTEGER NOT NULL,
    kind         TEXT    NOT NULL,
    key_id       INTEGER NOT NULL REFERENCES keys (id),
    child_id     INTEGER REFERENCES keys (id),
    amount_msats INTEGER NOT NULL CHECK (amount_msats >= 0),
    request_id   TEXT,
    ref          TEXT,
    memo         TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX txlog_key ON txlog (key_id, id DESC);
CREATE INDEX txlog_child ON txlog (child_id, id DESC) WHERE child_id IS NOT NULL;
-- A deposit reference (token, invoice) is credited once, and a refund reversed once, whatever
-- the caller does.
CREATE UNIQUE INDEX txlog_once_ref ON txlog (kind, ref)
    WHERE kind IN ('deposit', 'reversal') AND ref IS NOT NULL;

CREATE TRIGGER txlog_no_update BEFORE UPDATE ON txlog
BEGIN
    SELECT RAISE(ABORT, 'txlog is append-only');
END;
CREATE TRIGGER txlog_no_delete BEFORE DELETE ON txlog
BEGIN
    SELECT RAISE(ABORT, 'txlog is append-only');
END;
-- Per-key row counts, so a history page reports its total without counting the history.
CREATE TRIGGER txlog_count AFTER INSERT ON txlog
BEGIN
    UPDATE keys SET tx_count = tx_count + 1 WHERE id = NEW.key_id;
    UPDATE keys SET tx_count = tx_count + 1 WHERE id = NEW.child_id;
END;
"""

_MIGRATION_2_WALLET = """
-- The node's Cashu wallet (routstr/walletstore.py implements cashu.wallet.WalletStore on these).
-- Operations are write-ahead intents: a row is 'pending' before the mint is called, then
-- 'done' (result recorded) or 'failed' (rolled back). Outputs are NUT-13 derivations
-- [keyset_id, amount, counter, role], so their secrets can be re-derived from the seed.
CREATE TABLE wallet_ops (
    id            INTEGER PRIMARY KEY,
    kind          TEXT    NOT NULL CHECK (kind IN ('receive', 'send', 'melt', 'mint')),
    mint          TEXT    NOT NULL,
    unit          TEXT    NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('pending', 'done', 'failed')),
    own_inputs    INTEGER NOT NULL CHECK (own_inputs IN (0, 1)),
    inputs        TEXT    NOT NULL,
    outputs       TEXT    NOT NULL,
    purpose       TEXT,
    purpose_at    TEXT    NOT NULL CHECK (purpose_at IN ('begin', 'finish')),
    amount        INTEGER NOT NULL CHECK (amount >= 0),
    fee           INTEGER NOT NULL CHECK (fee >= 0),
    ref           TEXT,
    quote         TEXT,
    data          TEXT    NOT NULL DEFAULT '{}',
    token         TEXT,
    result        TEXT    NOT NULL DEFAULT '{}',
    error         TEXT,
    recheck_until REAL,
    created_at    REAL    NOT NULL,
    updated_at    REAL    NOT NULL
);
CREATE INDEX wallet_ops_pending ON wallet_ops (id) WHERE state = 'pending';
CREATE INDEX wallet_ops_ref ON wallet_ops (ref, id) WHERE ref IS NOT NULL;
CREATE INDEX wallet_ops_watched ON wallet_ops (recheck_until) WHERE recheck_until IS NOT NULL;
-- A mint quote is minted by at most one live or finished operation.
CREATE UNIQUE INDEX wallet_ops_mint_quote ON wallet_ops (quote)
    WHERE kind = 'mint' AND state != 'failed';

-- Our proofs. unspent: spendable; reserved: input of the pending operation op_id;
-- spent: consumed by op_id; issued: handed out in the token of op_id.
CREATE TABLE wallet_proofs (
    secret     TEXT    PRIMARY KEY,
    mint       TEXT    NOT NULL,
    unit       TEXT    NOT NULL,
    keyset_id  TEXT    NOT NULL,
    amount     INTEGER NOT NULL CHECK (amount > 0),
    c          TEXT    NOT NULL,
    dleq       TEXT,
    state      TEXT    NOT NULL CHECK (state IN ('unspent', 'reserved', 'spent', 'issued')),
    op_id      INTEGER REFERENCES wallet_ops (id),
    origin_op  INTEGER REFERENCES wallet_ops (id),
    created_at REAL    NOT NULL,
    CHECK ((state = 'reserved') <= (op_id IS NOT NULL))
);
CREATE INDEX wallet_proofs_unspent ON wallet_proofs (mint, unit) WHERE state = 'unspent';
CREATE INDEX wallet_proofs_op ON wallet_proofs (op_id) WHERE op_id IS NOT NULL;

-- Foreign proofs (tokens being received) held by a live or finished receive operation.
CREATE TABLE wallet_input_locks (
    secret TEXT    PRIMARY KEY,
    op_id  INTEGER NOT NULL REFERENCES wallet_ops (id)
);
CREATE INDEX wallet_input_locks_op ON wallet_input_locks (op_id);

-- NUT-13: the next unused derivation counter per keyset (bumped before the mint signs).
CREATE TABLE wallet_counters (
    keyset_id TEXT    PRIMARY KEY,
    next      INTEGER NOT NULL CHECK (next >= 0)
);

-- NUT-04 mint quotes we asked for (Lightning invoices to top up).
CREATE TABLE wallet_quotes (
    quote      TEXT    PRIMARY KEY,
    mint       TEXT    NOT NULL,
    unit       TEXT    NOT NULL,
    amount     INTEGER NOT NULL CHECK (amount > 0),
    request    TEXT    NOT NULL,
    expiry     INTEGER,
    created_at REAL    NOT NULL
);
"""

_MIGRATION_3_PAYMENTS = """
-- Node-wide secrets and settings (wallet seed, ...): name -> value. Never logged.
CREATE TABLE node_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
-- Lightning top-ups (NUT-04 mint quotes at the primary mint), settled exactly once.
CREATE TABLE lightning_invoices (
    id TEXT PRIMARY KEY,
    quote TEXT NOT NULL UNIQUE,
    mint TEXT NOT NULL,
    bolt11 TEXT NOT NULL,
    amount_sats INTEGER NOT NULL CHECK (amount_sats > 0),
    purpose TEXT NOT NULL CHECK (purpose IN ('create', 'topup')),
    account_id INTEGER REFERENCES keys(id),
    key_hash TEXT,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'paid', 'expired')),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    paid_at INTEGER
);
CREATE INDEX lightning_invoices_pending ON lightning_invoices (state, expires_at);
"""

_MIGRATION_4_ADMIN = """
-- The admin API (routstr/admin_store.py): dashboard sessions (token hashes only), keys the
-- operator deleted, price overrides edited at runtime, and a time index for the transaction
-- filters and the earnings chart. The generated admin token's hash lives in node_settings.
CREATE TABLE admin_sessions (
    token_hash TEXT    PRIMARY KEY CHECK (length(token_hash) = 64),
    epoch      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX admin_sessions_expiry ON admin_sessions (expires_at);
CREATE TABLE admin_deleted_keys (
    key_id     INTEGER PRIMARY KEY REFERENCES keys (id),
    deleted_at INTEGER NOT NULL
);
CREATE TABLE price_overrides (
    model      TEXT    PRIMARY KEY,
    model_id   TEXT    NOT NULL,
    fields     TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX txlog_time ON txlog (time);
"""

_MIGRATION_5_PLATFORM = """
-- The platform features of routstr/idempotency.py, routstr/webhooks.py and the health check.
-- Idempotency-Key: one row per (credential, key); 'pending' while the first request runs
-- (boot_id = the process running it), then 'done' with the response to replay. Swept after
-- the retention period (24 h by default).
CREATE TABLE idempotency (
    owner_hash   TEXT    NOT NULL CHECK (length(owner_hash) = 64),
    idem_key     TEXT    NOT NULL,
    request_hash TEXT    NOT NULL CHECK (length(request_hash) = 64),
    state        TEXT    NOT NULL CHECK (state IN ('pending', 'done')),
    boot_id      TEXT    NOT NULL,
    status       INTEGER,
    headers      TEXT,
    body         BLOB,
    stored       INTEGER NOT NULL DEFAULT 1 CHECK (stored IN (0, 1)),
    created_at   REAL    NOT NULL,
    PRIMARY KEY (owner_hash, idem_key)
) WITHOUT ROWID;
CREATE INDEX idempotency_created ON idempotency (created_at);

-- Webhooks registered by a key (account_id), and their durable outbox: an event row is
-- written before any delivery is tried and survives restarts; 'pending' rows are retried
-- with backoff until 'delivered' or 'failed'.
CREATE TABLE webhooks (
    id                      INTEGER PRIMARY KEY,
    public_id               TEXT    NOT NULL UNIQUE,
    account_id              INTEGER NOT NULL REFERENCES keys (id),
    url                     TEXT    NOT NULL,
    events                  TEXT    NOT NULL,
    secret                  TEXT    NOT NULL,
    balance_threshold_msats INTEGER CHECK (balance_threshold_msats IS NULL
                                           OR balance_threshold_msats >= 0),
    low_fired               INTEGER NOT NULL DEFAULT 0 CHECK (low_fired IN (0, 1)),
    expired_fired           INTEGER NOT NULL DEFAULT 0 CHECK (expired_fired IN (0, 1)),
    created_at              INTEGER NOT NULL
);
CREATE INDEX webhooks_account ON webhooks (account_id);
CREATE TABLE webhook_outbox (
    id              INTEGER PRIMARY KEY,
    event_id        TEXT    NOT NULL UNIQUE,
    webhook_id      INTEGER NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event           TEXT    NOT NULL,
    payload         BLOB    NOT NULL,
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at REAL    NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    finished_at     INTEGER
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_outbox_webhook ON webhook_outbox (webhook_id);

-- /health writes this one row to prove the database accepts writes.
CREATE TABLE health_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at REAL    NOT NULL
);
"""

_MIGRATION_6_RECOVERY = """
-- A paid 'create' invoice's key is handed out by bolt11 alone only until it was first collected
-- (routstr/cashupay.py): then only with the invoice id, the creator's secret.
ALTER TABLE lightning_invoices ADD COLUMN collected_at INTEGER;
-- Failed wallet operations are swept after their retention (SqliteWalletStore.sweep_failed):
-- found by this index, kept while a proof refers to them.
CREATE INDEX wallet_ops_failed ON wallet_ops (updated_at) WHERE state = 'failed';
CREATE INDEX wallet_proofs_origin ON wallet_proofs (origin_op) WHERE origin_op IS NOT NULL;
"""

_MIGRATION_7_ADMIN_FORMS = """
-- The dashboard's forms (routstr/admin_forms.py). Each rendered page carries a one-use nonce:
-- a used one is kept here (its hash, where its answer redirected to) until it would have
-- expired anyway. What a form's redirect shows once (a new key, a withdrawn token, an error)
-- waits in admin_flash, sealed under a key derived from the admin's session token (which the
-- database never holds), deleted when shown or after a few minutes.
CREATE TABLE admin_used_nonces (
    nonce_hash TEXT    PRIMARY KEY CHECK (length(nonce_hash) = 64),
    location   TEXT,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX admin_used_nonces_expiry ON admin_used_nonces (expires_at);
CREATE TABLE admin_flash (
    id_hash    TEXT    PRIMARY KEY CHECK (length(id_hash) = 64),
    sealed     BLOB    NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX admin_flash_expiry ON admin_flash (expires_at);
"""

MIGRATIONS: tuple[str, ...] = (
    _MIGRATION_1_LEDGER,
    _MIGRATION_2_WALLET,
    _MIGRATION_3_PAYMENTS,
    _MIGRATION_4_ADMIN,
    _MIGRATION_5_PLATFORM,
    _MIGRATION_6_RECOVERY,
    _MIGRATION_7_ADMIN_FORMS,
)


def split_statements(script: str) -> Iterator[str]:
    """Split an SQL script into complete statements (trigger bodies and quoted ';' included).

    `executescript` would COMMIT first, so migrations run statement by statement inside our own
    transaction instead.
    """
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            statement = buffer.strip()
            buffer = ""
            if statement != ";":
                yield statement
    if buffer.strip(" \t\r\n;"):
        raise ValueError(f"incomplete SQL statement at end of script: {buffer.strip()[:80]!r}")


class Database:
    """One sqlite connection with the project's settings; the only way to write is `transaction`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "NORMAL",
        migrations: tuple[str, ...] = MIGRATIONS,
    ) -> None:
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}")
        self.path = os.fspath(path)
        self._synchronous = synchronous
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # Only a new (empty) file takes it; an existing one keeps the size it was made with.
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE_BYTES}")
            if self.path != ":memory:":
                mode = _switch_to_wal(conn)
                if str(mode).lower() != "wal":
                    raise RuntimeError(f"could not switch {self.path} to WAL (got {mode})")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}")
            _migrate(conn, migrations)
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn
        self._defer_sync = False
        self._durable_commits = 0  # durable commits made with the fsync deferred ...
        self._synced_commits = 0  # ... and how many of them an fsync has covered
        self._sync_lock: anyio.Lock | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("database is closed")
        return self._conn

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def transaction(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        """Run `fn(conn)` in one ``BEGIN IMMEDIATE`` transaction; commit, or roll back and re-raise.

        `durable=True` commits with ``synchronous=FULL`` (an fsync of the WAL before returning).
        """
        conn = self.conn
        if conn.in_transaction:
            raise RuntimeError("nested transaction: ledger ops take the connection instead")
        started = time.perf_counter()
        deferred = durable and self._defer_sync
        full_now = durable and not deferred and self._synchronous != "FULL"
        if full_now:
            conn.execute("PRAGMA synchronous = FULL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                if hasattr(result, "__await__"):
                    close = getattr(result, "close", None)
                    if callable(close):
                        close()
                    raise TypeError("transaction functions are plain defs; no await inside")
                conn.execute("COMMIT")
                if deferred:
                    self._durable_commits += 1
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            if full_now:
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            elapsed = time.perf_counter() - started
            if elapsed > SLOW_TRANSACTION_S:
                log.warning(
                    "slow transaction: %.1f ms (%s)",
                    elapsed * 1000,
                    getattr(fn, "__qualname__", "fn"),
                )
        return result

    # -- durable commits without an fsync on the event loop (see the module docstring) -------

    def defer_durable_sync(self) -> None:
        """From now on `transaction(durable=True)` leaves its fsync to `sync_durable`. Only for
        a caller that awaits `sync_durable` before anything outside learns of a commit."""
        if self.path != ":memory:" and self._synchronous != "FULL":
            self._defer_sync = True

    @property
    def durable_mark(self) -> int:
        """A mark to pass to `sync_durable(since=...)`: the durable commits made so far."""
        return self._durable_commits

    async def sync_durable(self, *, since: int | None = None) -> None:
        """Return once every durable commit made so far is on disk (an fsync of the WAL in a
        worker thread, shared by all waiters). `since`: a `durable_mark`; nothing to wait for
        unless a durable commit happened after it."""
        target = self._durable_commits
        if target <= self._synced_commits or (since is not None and target <= since):
            return
        if self._sync_lock is None:
            self._sync_lock = anyio.Lock()
        async with self._sync_lock:
            if self._synced_commits >= target:  # another waiter's fsync covered it
                return
            covered = self._durable_commits  # everything committed up to now
            await anyio.to_thread.run_sync(fsync_wal, self.path)
            self._synced_commits = max(self._synced_commits, covered)

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run read-only `fn(conn)` on one consistent snapshot; writes inside it fail."""
        conn = self.conn
        if conn.in_transaction:
            raise RuntimeError("read() inside a transaction")
        conn.execute("PRAGMA query_only = ON")
        try:
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        finally:
            conn.execute("PRAGMA query_only = OFF")

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """One read-only statement in autocommit mode (a single statement is its own consistent
        snapshot): the cheap path for hot single-row lookups; `read` for several statements."""
        if not sql.lstrip().upper().startswith("SELECT"):
            raise ValueError("query() runs SELECT statements only")
        return self.conn.execute(sql, params).fetchall()

    def ping(self) -> bool:
        """True when the database answers a read (the health check)."""
        try:
            self.conn.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True

    def checkpoint(self) -> None:
        """Copy the WAL back into the database file now (PASSIVE: never waits for readers)."""
        self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def move_checkpoints_off_this_connection(self) -> None:
        """Stop sqlite's automatic checkpoint on this connection's commits (it fsyncs the
        database file every ~1000 WAL pages, a multi-ms stall on whichever request commits
        then); the caller must run `checkpoint_file` periodically from another thread."""
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NotUsable(RuntimeError):
    """An existing file that is not a routstr database this code can open (one line)."""


ROUTSTR_TABLES = ("keys", "txlog", "node_settings")


def open_existing(path: str) -> Database:
    """`path` opened as the node opens it, provided it already is a routstr database: it is
    first opened read-write without being created (sqlite URI ``mode=rw``) and its schema
    checked. For the command line, which must never make a new, empty database."""
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=rw"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            version = _user_version(conn)
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master"
                                                 " WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise NotUsable(f"cannot use {path}: {exc}") from None
    if version < 1 or not set(ROUTSTR_TABLES) <= tables:
        raise NotUsable(f"{path} is not a routstr database (no routstr tables in it)")
    if version > len(MIGRATIONS):
        raise NotUsable(f"{path} has schema version {version}, newer than this code"
                        f" ({len(MIGRATIONS)}); upgrade routstr")
    try:
        return Database(path)
    except sqlite3.Error as exc:
        raise NotUsable(f"cannot use {path}: {exc}") from None


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _switch_to_wal(conn: sqlite3.Connection) -> str:
    """``journal_mode = WAL``; the switch of a new file needs an exclusive lock and sqlite does
    not wait for it (no busy handler), so processes opening a new file together (workers
    starting) retry it for up to the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


class SchemaError(RuntimeError):
    """The database was written by a newer routstr."""


def _migrate(conn: sqlite3.Connection, migrations: tuple[str, ...]) -> None:
    target = len(migrations)
    version = _user_version(conn)
    if version > target:
        raise SchemaError(
            f"database schema version {version} is newer than this code ({target}); upgrade"
        )
    start = version
    while version < target:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = _user_version(conn)  # another process may have migrated meanwhile
            if version < target:
                for statement in split_statements(migrations[version]):
                    conn.execute(statement)
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    if version != start:
        log.info("database schema migrated from version %d to %d", start, version)


def fsync_wal(path: str) -> None:
    """Flush `path`'s WAL file to the disk (what ``synchronous=FULL`` does at each commit).

    An fsync covers the file, not the descriptor: every frame any connection wrote is on disk
    when it returns. Frames a checkpoint already copied back are in the database file, which
    sqlite synced before it let the WAL start over. Safe from any thread (no sqlite handle)."""
    try:
        fd = os.open(path + "-wal", os.O_RDONLY)
    except FileNotFoundError:  # no WAL: every commit was checkpointed (and synced) already
        return
    try:
        getattr(os, "fdatasync", os.fsync)(fd)
    finally:
        os.close(fd)


def checkpoint_file(path: str) -> int:
    """One PASSIVE checkpoint of `path` on a connection of its own (safe from a worker thread
    while the main connection keeps committing). Returns the WAL frames checkpointed.

    A passive checkpoint never waits, so under sustained writes it never catches up with the
    last frame and the WAL is never started over: it would grow without bound (~17 KB per
    proxied request). When more than `WAL_RESTART_FRAMES` remain after it, a RESTART checkpoint
    follows: it waits for the running write transaction, copies what was written meanwhile (a
    little, the passive pass did the bulk), and makes the next writer start the WAL from its
    beginning. Writers pause for that — a few ms, at most once per call.
    """
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    try:
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        done = int(row[2]) if row and row[2] is not None and row[2] >= 0 else 0
        if row and row[1] is not None and row[1] > WAL_RESTART_FRAMES:
            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        return done
    finally:
        conn.close()
