"""db.py: open settings, migrations, the transaction gateway, and what a commit costs here."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from routstr import db as dbmod
from routstr.db import MIGRATIONS, Database, split_statements


@pytest.fixture
def database(tmp_path: Path):
    d = Database(tmp_path / "node.sqlite3")
    yield d
    d.close()


def pragma(d: Database, name: str) -> object:
    return d.conn.execute(f"PRAGMA {name}").fetchone()[0]


def test_open_settings(database: Database) -> None:
    assert str(pragma(database, "journal_mode")).lower() == "wal"
    assert pragma(database, "foreign_keys") == 1
    assert pragma(database, "busy_timeout") == 5000
    assert pragma(database, "synchronous") == 1  # NORMAL
    assert pragma(database, "page_size") == dbmod.PAGE_SIZE_BYTES
    assert pragma(database, "journal_size_limit") == dbmod.WAL_SIZE_LIMIT_BYTES
    assert database.schema_version == len(MIGRATIONS)


def test_migrations_run_once_and_in_order(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    extra = (
        *MIGRATIONS,
        "CREATE TABLE extra (id INTEGER PRIMARY KEY, note TEXT DEFAULT 'a;b');",
        "INSERT INTO extra (note) VALUES ('second; migration');",
    )
    with Database(path) as d:
        assert d.schema_version == len(MIGRATIONS)
    with Database(path, migrations=extra) as d:
        assert d.schema_version == len(extra)
        assert d.conn.execute("SELECT note FROM extra").fetchall() == [("second; migration",)]
    with Database(path, migrations=extra) as d:  # nothing re-runs
        assert d.conn.execute("SELECT COUNT(*) FROM extra").fetchone()[0] == 1
    with pytest.raises(RuntimeError, match="newer"):
        Database(path)


def test_failed_migration_rolls_back_whole_step(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite3"
    broken = (*MIGRATIONS, "CREATE TABLE half (id INTEGER); INSERT INTO nowhere VALUES (1);")
    with pytest.raises(sqlite3.OperationalError):
        Database(path, migrations=broken)
    with Database(path) as d:
        assert d.schema_version == len(MIGRATIONS)
        names = {r[0] for r in d.conn.execute("SELECT name FROM sqlite_master")}
        assert "half" not in names


def test_concurrent_first_open_migrates_once(tmp_path: Path) -> None:
    path = tmp_path / "race.sqlite3"
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def open_it() -> None:
        try:
            barrier.wait()
            Database(path).close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with Database(path) as d:
        assert d.schema_version == len(MIGRATIONS)


def test_split_statements_keeps_trigger_bodies() -> None:
    script = """
    CREATE TABLE t (x TEXT);
    CREATE TRIGGER tr BEFORE DELETE ON t BEGIN SELECT RAISE(ABORT, 'no; really'); END;
    INSERT INTO t VALUES ('a;b');
    """
    parts = list(split_statements(script))
    assert len(parts) == 3
    assert parts[1].startswith("CREATE TRIGGER") and parts[1].endswith("END;")
    with pytest.raises(ValueError):
        list(split_statements("INSERT INTO t VALUES ('unterminated"))
    assert len(list(split_statements(MIGRATIONS[0]))) > 5


def test_transaction_commits_and_rolls_back(database: Database) -> None:
    database.transaction(lambda c: c.execute("CREATE TABLE t (x INTEGER)"))
    database.transaction(lambda c: c.execute("INSERT INTO t VALUES (1)"))

    def boom(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES (2)")
        raise KeyError("nope")

    with pytest.raises(KeyError):
        database.transaction(boom)
    assert database.read(lambda c: c.execute("SELECT x FROM t").fetchall()) == [(1,)]
    assert not database.conn.in_transaction


def test_transaction_refuses_nesting_and_coroutines(database: Database) -> None:
    with pytest.raises(RuntimeError, match="nested"):
        database.transaction(lambda c: database.transaction(lambda c2: None))

    async def not_allowed(c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE never (x)")

    with pytest.raises(TypeError, match="plain def"):
        database.transaction(not_allowed)  # type: ignore[arg-type]
    assert not database.conn.in_transaction


def test_durable_restores_synchronous(database: Database) -> None:
    seen: list[object] = []
    database.transaction(
        lambda c: seen.append(c.execute("PRAGMA synchronous").fetchone()[0]), durable=True
    )
    assert seen == [2]  # FULL inside
    assert pragma(database, "synchronous") == 1


def test_read_is_read_only(database: Database) -> None:
    with pytest.raises(sqlite3.OperationalError):
        database.read(lambda c: c.execute("CREATE TABLE t (x)"))
    assert database.read(lambda c: c.execute("SELECT 1").fetchone()[0]) == 1
    database.transaction(lambda c: c.execute("CREATE TABLE t (x)"))  # writable again


def test_txlog_is_append_only(database: Database) -> None:
    def setup(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO keys (key_hash, kind, created_at) VALUES (?, 'api', 0)", ("a" * 64,))
        c.execute("INSERT INTO txlog (time, kind, key_id, amount_msats) VALUES (0, 'create', 1, 0)")

    database.transaction(setup)
    for sql in ("UPDATE txlog SET amount_msats = 5", "DELETE FROM txlog"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            database.transaction(lambda c, sql=sql: c.execute(sql))
    assert database.read(lambda c: c.execute("SELECT COUNT(*) FROM txlog").fetchone()[0]) == 1


def test_schema_refuses_broken_books(database: Database) -> None:
    """The CHECK constraints are a second line behind the ledger's own checks."""
    database.transaction(
        lambda c: c.execute(
            "INSERT INTO keys (key_hash, kind, created_at) VALUES (?, 'api', 0)", ("b" * 64,)
        )
    )
    for sql in (
        "UPDATE keys SET balance_msats = 5",  # money from nowhere
        "UPDATE keys SET balance_msats = -1, deposited_msats = -1",  # negative
        "UPDATE keys SET kind = 'child'",  # a child without a parent
    ):
        with pytest.raises(sqlite3.IntegrityError):
            database.transaction(lambda c, sql=sql: c.execute(sql))


def test_slow_transaction_is_logged(database: Database, caplog, monkeypatch) -> None:
    monkeypatch.setattr(dbmod, "SLOW_TRANSACTION_S", 0.0)
    with caplog.at_level("WARNING", logger="routstr.db"):
        database.transaction(lambda c: None)
    assert "slow transaction" in caplog.text


def _median_commit_us(d: Database, *, durable: bool, n: int) -> float:
    def bump(c: sqlite3.Connection) -> None:
        c.execute("UPDATE keys SET total_requests = total_requests + 1 WHERE id = 1")

    samples = []
    for _ in range(n):
        t = time.perf_counter()
        d.transaction(bump, durable=durable)
        samples.append(time.perf_counter() - t)
    samples.sort()
    return samples[len(samples) // 2] * 1e6


def test_measure_commit_cost(database: Database, capsys) -> None:
    """Not a benchmark gate: records what NORMAL and FULL commits cost on this disk."""
    database.transaction(
        lambda c: c.execute(
            "INSERT INTO keys (key_hash, kind, created_at) VALUES (?, 'api', 0)", ("c" * 64,)
        )
    )
    normal = _median_commit_us(database, durable=False, n=200)
    full = _median_commit_us(database, durable=True, n=50)
    with capsys.disabled():
        print(f"\n[db] median commit: NORMAL {normal:.1f} µs, FULL {full:.1f} µs")
    assert normal < 50_000 and full < 1_000_000


def test_wal_stays_bounded_under_sustained_writes(tmp_path: Path) -> None:
    """A writer that keeps going, with the periodic checkpoint running beside it: the WAL is
    started over again and again instead of growing for as long as the load lasts (a passive
    checkpoint alone never catches up with such a writer)."""
    path = tmp_path / "node.sqlite3"
    writer = Database(path)
    writer.move_checkpoints_off_this_connection()
    writer.transaction(lambda c: c.execute(
        "INSERT INTO keys (key_hash, kind, created_at) VALUES (?, 'api', 0)", ("d" * 64,)))
    stop = threading.Event()
    checkpoints = 0

    def checkpointer() -> None:
        nonlocal checkpoints
        while not stop.wait(0.2):
            dbmod.checkpoint_file(str(path))
            checkpoints += 1

    thread = threading.Thread(target=checkpointer)
    thread.start()
    sizes: list[int] = []
    try:
        deadline = time.monotonic() + 3.0
        i = 0
        while time.monotonic() < deadline:  # bounded: stops by itself
            i += 1
            writer.transaction(lambda c, n=i: c.execute(
                "INSERT INTO txlog (time, kind, key_id, amount_msats, memo) VALUES (?, 'grant', 1,"
                " 1, ?)", (n, "x" * 200)))
            if i % 100 == 0:
                sizes.append((tmp_path / "node.sqlite3-wal").stat().st_size)
            time.sleep(0.0002)  # what a proxied request spends between its two transactions
    finally:
        stop.set()
        thread.join()
        writer.close()
    assert checkpoints >= 5 and len(sizes) >= 30
    third = len(sizes) // 3
    early, late = max(sizes[:third]), max(sizes[-third:])
    # growing without restarts, the late WAL is about three times the early one
    assert late < 2 * early, f"WAL grew from {early} to {late} bytes"
