"""The operator's command line: `python -m routstr <subcommand>` as real processes.

Every subcommand runs as ``sys.executable -m routstr ...`` in a temporary working directory,
against databases made by a real node (tests/support/node.py) where the answer matters.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from routstr.cli import DATABASE_SEARCH, SEARCH_ENV
from routstr.config import load_config
from routstr.db import Database
from routstr.ledger import Ledger
from tests.support.mint import MintProcess, free_port
from tests.support.minter import Minter
from tests.support.node import NodeProcess
from tests.support.upstream import ScriptedUpstream

# ---- boolean settings are switches -----------------------------------------------------------


def test_boolean_settings_are_switches() -> None:
    assert load_config(["--webhooks-allow-private"], {}).webhooks_allow_private is True
    assert load_config([], {}).webhooks_allow_private is False
    # --no-x turns off what the environment turned on: the flag wins
    env = {"LNURL_ALLOW_PRIVATE": "true", "PROVIDERS_ALLOW_PRIVATE": "1"}
    c = load_config(["--no-lnurl-allow-private"], env)
    assert c.lnurl_allow_private is False and c.providers_allow_private is True


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("1", True), ("yes", True),
                                            ("false", False), ("0", False), ("", False)])
def test_boolean_environment_forms_still_work(raw: str, value: bool) -> None:
    assert load_config([], {"WEBHOOKS_ALLOW_PRIVATE": raw}).webhooks_allow_private is value


def test_a_switch_takes_no_value() -> None:
    with pytest.raises(SystemExit):  # argparse: "unrecognized arguments: true"
        load_config(["--webhooks-allow-private", "true"], {})


# ---- helpers ---------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "adm-cli-test-token-0123456789abcdef"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
        search: str = "routstr.sqlite3") -> subprocess.CompletedProcess[str]:
    """`python -m routstr ARGS` in `cwd`, with the node's settings only from `env` and the
    database search list `search` (never /var/lib)."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("DATABASE", "ADMIN_TOKEN") and not k.startswith(("UPSTREAM_", "CASHU_"))}
    full = {**base, "PYTHONPATH": str(ROOT), SEARCH_ENV: search, **(env or {})}
    return subprocess.run([sys.executable, "-m", "routstr", *args], capture_output=True,
                          text=True, env=full, cwd=cwd, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """An expected failure: exit 2, one line on stderr, no traceback, nothing on stdout."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("routstr: database ")]
    assert len(lines) == 1 and lines[0].startswith("routstr: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    return lines[0]


def create_key(db: str, cwd: Path, msats: int = 100_000, *extra: str) -> dict[str, Any]:
    proc = cli("keys", "create", "--balance-msats", str(msats), "--database", db, *extra,
               cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def show(db: str, cwd: Path, key: str) -> dict[str, Any]:
    proc = cli("keys", "show", key, "--database", db, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def chat_status(node: NodeProcess, key: str) -> tuple[int, Any]:
    return node.json("POST", "/v1/chat/completions", CHAT, bearer(key))


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory that is not the node's."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


# ---- finding the node's database ---------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["keys", "create", "--balance-msats", "1000"], ["keys", "list"], ["keys", "show", "1"],
    ["keys", "disable", "1"], ["keys", "refund-to-token", "1"], ["admin-token", "show"],
    ["admin-token", "rotate"]])
def test_no_database_found_is_one_line_exit_2_and_creates_nothing(
        tmp_path: Path, args: list[str]) -> None:
    var_lib = tmp_path / "var-lib-routstr" / "routstr.sqlite3"
    proc = cli(*args, cwd=tmp_path, search=os.pathsep.join(["routstr.sqlite3", str(var_lib)]))
    line = one_line_error(proc)
    assert str(tmp_path / "routstr.sqlite3") in line and str(var_lib) in line
    assert "--database" in line and "DATABASE" in line
    assert list(tmp_path.iterdir()) == []  # no database, no -wal, no token file


def test_the_default_search_is_the_working_directory_then_var_lib() -> None:
    assert DATABASE_SEARCH == ("routstr.sqlite3", "/var/lib/routstr/routstr.sqlite3")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_named_database_that_does_not_exist_is_not_created(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "missing.sqlite3"
    args = ["keys", "list"] + (["--database", str(missing)] if how == "flag" else [])
    proc = cli(*args, cwd=tmp_path, env={"DATABASE": str(missing)} if how == "env" else None)
    line = one_line_error(proc)
    assert str(missing) in line and ("--database" if how == "flag" else "DATABASE") in line
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_routstr_database_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database at all" * 100)
    empty = tmp_path / "other.sqlite3"
    sqlite3.connect(empty).execute("CREATE TABLE t (x)").connection.close()
    before = {p.name: p.read_bytes() for p in (junk, empty)}
    for path in (junk, empty):
        line = one_line_error(cli("keys", "create", "--balance-msats", "1", "--database",
                                  str(path), cwd=tmp_path))
        assert str(path) in line
    assert "not a routstr database" in line
    assert {p.name: p.read_bytes() for p in (junk, empty)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.sqlite3", "other.sqlite3"]


def test_keys_made_by_the_command_line_are_accepted_by_the_running_node(
        node_factory: Any, upstream: ScriptedUpstream, tmp_path: Path, elsewhere: Path) -> None:
    """Found by --database, by DATABASE and in the working directory: the running node takes
    every key, and stderr says which database was used."""
    home = tmp_path / "srv"
    home.mkdir()
    node = node_factory("--upstream-base-url", upstream.url, workdir=home, start=False)
    node.database = str(home / "routstr.sqlite3")
    node.start()
    runs = [(elsewhere, ["--database", node.database], None, "from --database"),
            (elsewhere, [], {"DATABASE": node.database}, "from DATABASE"),
            (home, [], None, "found")]
    for cwd, extra, env, source in runs:
        proc = cli("keys", "create", "--balance-msats", "50000", *extra, cwd=cwd, env=env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == f"routstr: database {node.database} ({source})\n"
        doc = json.loads(proc.stdout)
        assert doc["balance_msats"] == 50_000 and doc["api_key"].startswith("sk-")
        status, body = chat_status(node, doc["api_key"])
        assert status == 200, body
    assert sorted(p.name for p in elsewhere.iterdir()) == []
    node.stop()


# ---- keys list / show / disable / enable -----------------------------------------------------


def test_list_show_disable_enable(node_factory: Any, upstream: ScriptedUpstream,
                                  elsewhere: Path) -> None:
    node = node_factory("--upstream-base-url", upstream.url)
    db = node.database
    first = create_key(db, elsewhere, 100_000)
    made = create_key(db, elsewhere, 250_000, "--balance-limit-msats", "90000",
                      "--balance-limit-reset", "daily", "--expires", "2100-01-01")
    table = cli("keys", "list", "--database", db, cwd=elsewhere)
    assert table.returncode == 0, table.stderr
    head, *rows = table.stdout.splitlines()
    assert head.split()[:5] == ["ID", "KIND", "KEY", "HASH", "BALANCE_MSATS"]
    assert [r.split()[0] for r in rows] == [str(made["id"]), str(first["id"])]  # newest first
    assert "250000" in rows[0] and made["api_key"][-4:] in rows[0] and "active" in rows[0]
    listed = json.loads(cli("keys", "list", "--json", "--database", db, cwd=elsewhere).stdout)
    assert listed["total"] == 2 and made["api_key"] not in json.dumps(listed)  # hashes only
    doc = listed["data"][0]
    assert (doc["id"], doc["balance_msats"], doc["balance_limit_msats"],
            doc["balance_limit_reset"], doc["validity_date"]) == (
                made["id"], 250_000, 90_000, "daily", 4102444800)
    # one key, by id, by #id, by its hash's first characters, by the key, as listed (sk-…abcd)
    for selector in (str(made["id"]), f"#{made['id']}", doc["key_hash"][:8], made["api_key"],
                     doc["key"]):
        assert show(db, elsewhere, selector)["key_hash"] == doc["key_hash"], selector
    assert doc["key_hash"][:12] in rows[0]
    # disabled: the running node refuses the key (401 key_disabled); enabled: it pays again
    assert chat_status(node, made["api_key"])[0] == 200
    proc = cli("keys", "disable", str(made["id"]), "--database", db, cwd=elsewhere)
    assert proc.returncode == 0 and "disabled" in proc.stdout, proc.stderr
    status, body = chat_status(node, made["api_key"])
    assert status == 401 and body["error"]["code"] == "key_disabled"
    assert show(db, elsewhere, str(made["id"]))["status"] == "disabled"
    proc = cli("keys", "enable", doc["key_hash"][:10], "--database", db, cwd=elsewhere)
    assert proc.returncode == 0 and "active" in proc.stdout, proc.stderr
    assert chat_status(node, made["api_key"])[0] == 200
    assert chat_status(node, first["api_key"])[0] == 200
    # unknown or malformed selectors: one line, exit 2
    for selector in ("999", "#999", "ffffffffffff", "nonsense"):
        one_line_error(cli("keys", "show", selector, "--database", db, cwd=elsewhere))
    node.stop()


# ---- keys refund-to-token ---------------------------------------------------------------------


def fund_with_cashu(node: NodeProcess, minter: Minter, mint_url: str, sats: int) -> str:
    status, doc = node.json("POST", "/v1/balance/create",
                            {"initial_balance_token": minter.token(mint_url, sats)})
    assert status == 200, doc
    return str(doc["api_key"])


def test_refund_to_token_is_redeemable_and_empties_the_key(
        node_factory: Any, minter: Minter, mint_url: str, wallet_tool: Any,
        elsewhere: Path) -> None:
    node = node_factory("--cashu-mints", mint_url)
    key = fund_with_cashu(node, minter, mint_url, 64)
    key_id = show(node.database, elsewhere, key)["id"]
    # refunds of this key go to a Lightning address (Refund-LNURL): the operator still gets a token
    with Database(node.database) as db:
        Ledger(db).set_refund_address(key_id, refund_address="nobody@127.0.0.1")
    proc = cli("keys", "refund-to-token", str(key_id), "--database", node.database,
               "--cashu-mints", mint_url, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["key_id"], doc["sats"], doc["msats"], doc["remaining_msats"]) == (
        key_id, "64", 64_000, 0)
    assert wallet_tool.receive(mint_url, doc["token"]) == 64
    assert show(node.database, elsewhere, key)["balance_msats"] == 0
    status, info = node.json("GET", "/v1/balance/info", headers=bearer(key))
    assert status == 200 and info["balance"] == 0  # the running node sees it too
    # nothing left: one line, exit 2
    line = one_line_error(cli("keys", "refund-to-token", str(key_id), "--database",
                              node.database, "--cashu-mints", mint_url, cwd=elsewhere))
    assert "no_balance" in line
    # the node's mints must be given, as the node has them
    line = one_line_error(cli("keys", "refund-to-token", str(key_id), "--database",
                              node.database, cwd=elsewhere))
    assert "CASHU_MINTS" in line
    node.stop()


def test_refund_with_the_mint_down_loses_nothing(
        node_factory: Any, own_mint: MintProcess, upstream: ScriptedUpstream,
        minter: Minter, wallet_tool: Any, elsewhere: Path) -> None:
    mint = own_mint.url
    node = node_factory("--cashu-mints", mint, "--upstream-base-url", upstream.url)
    key = fund_with_cashu(node, minter, mint, 100)
    assert chat_status(node, key)[0] == 200  # 99.x sats left: the refund needs a swap
    before = show(node.database, elsewhere, key)
    assert 99_000 < before["balance_msats"] < 100_000
    own_mint.stop()
    args = ("keys", "refund-to-token", str(before["id"]), "--database", node.database,
            "--cashu-mints", mint)
    line = one_line_error(cli(*args, cwd=elsewhere))
    assert f"refund of key #{before['id']} failed: the mint is unreachable" in line
    assert f"balance is {before['balance_msats']} msats" in line
    assert show(node.database, elsewhere, key)["balance_msats"] == before["balance_msats"]
    own_mint.start()
    proc = cli(*args, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["sats"] == "99" and doc["remaining_msats"] == before["balance_msats"] - 99_000
    assert wallet_tool.receive(mint, doc["token"]) == 99
    assert show(node.database, elsewhere, key)["balance_msats"] == doc["remaining_msats"]
    node.stop()


# ---- admin-token ------------------------------------------------------------------------------


def admin_status(node: NodeProcess, token: str) -> int:
    return node.json("GET", "/admin/api/overview", None, bearer(token))[0]


def test_admin_token_show_and_rotate_without_a_restart(node_factory: Any, elsewhere: Path) -> None:
    node = node_factory()  # no --admin-token: the node generates one
    db, token_file = node.database, Path(node.database + ".admin-token")
    proc = cli("admin-token", "show", "--database", db, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    where, old = proc.stdout.splitlines()
    assert where == f"file: {token_file} (mode 0600)" and old == token_file.read_text().strip()
    assert admin_status(node, old) == 200
    status, login = node.json("POST", "/admin/login", {"token": old})
    assert status == 200 and login["ok"] is True
    cookie = node.request("POST", "/admin/login", {"token": old})[1]["set-cookie"].split(";")[0]
    assert node.json("GET", "/admin/api/overview", None, {"Cookie": cookie})[0] == 200
    # rotate: printed once, in the 0600 file, and the running node takes it at once
    proc = cli("admin-token", "rotate", "--database", db, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    new = proc.stdout.strip()
    assert new.startswith("adm-") and len(new) == 4 + 32 and new != old  # 192 random bits
    assert token_file.read_text() == new + "\n" and token_file.stat().st_mode & 0o777 == 0o600
    assert new not in proc.stderr and "takes it now" in proc.stderr
    assert admin_status(node, new) == 200
    assert node.json("POST", "/admin/login", {"token": new})[0] == 200
    assert admin_status(node, old) == 401
    assert node.json("POST", "/admin/login", {"token": old})[0] == 401
    assert node.json("GET", "/admin/api/overview", None, {"Cookie": cookie})[0] == 401
    assert cli("admin-token", "show", "--database", db, cwd=elsewhere).stdout.splitlines()[1] == new
    # the explicit token wins: rotation refused, nothing changed
    line = one_line_error(cli("admin-token", "rotate", "--database", db, cwd=elsewhere,
                              env={"ADMIN_TOKEN": ADMIN}))
    assert "ADMIN_TOKEN" in line and "restart" in line
    assert token_file.read_text() == new + "\n" and admin_status(node, new) == 200
    node.stop()
    assert new not in node.log_text() and old not in node.log_text()


def test_admin_token_set_by_the_operator(node_factory: Any, elsewhere: Path) -> None:
    node = node_factory("--admin-token", ADMIN)
    for env in ({"ADMIN_TOKEN": ADMIN}, None):  # told here, or only the node was
        proc = cli("admin-token", "show", "--database", node.database, cwd=elsewhere, env=env)
        assert proc.returncode == 0 and "ADMIN_TOKEN" in proc.stdout, proc.stderr
        assert ADMIN not in proc.stdout + proc.stderr
        line = one_line_error(cli("admin-token", "rotate", "--database", node.database,
                                  cwd=elsewhere, env=env))
        assert "ADMIN_TOKEN" in line
    assert admin_status(node, ADMIN) == 200
    assert not Path(node.database + ".admin-token").exists()
    node.stop()


# ---- doctor -----------------------------------------------------------------------------------


def doctor_lines(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """{check: level} from doctor's one line per check."""
    out = {}
    for line in proc.stdout.splitlines():
        level, _, rest = line.partition(" ")
        assert level in ("OK", "WARN", "FAIL"), line
        out[rest.strip().split(": ", 1)[0]] = level
    return out


def test_doctor_against_a_live_upstream_and_mint(
        tmp_path: Path, upstream: ScriptedUpstream, mint_url: str) -> None:
    Database(tmp_path / "routstr.sqlite3").close()  # a routstr database, as the node makes it
    settings = {"UPSTREAM_BASE_URL": upstream.url, "CASHU_MINTS": mint_url,
                "HTTP_URL": "https://node.example", "ADMIN_TOKEN": ADMIN}
    proc = cli("doctor", cwd=tmp_path, env=settings)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert doctor_lines(proc) == {"config": "OK", "database": "OK", "upstream": "OK",
                                  f"mint {mint_url}": "OK", "public URL": "OK",
                                  "admin token": "OK"}
    assert f"GET {upstream.url}/models: 200 (6 models)" in proc.stdout
    assert "active units: sat" in proc.stdout and ADMIN not in proc.stdout + proc.stderr
    # relays but no public URL: a warning, not a failure (flags win over the environment)
    proc = cli("doctor", "--http-url", "", "--relays", "ws://127.0.0.1:9", cwd=tmp_path,
               env=settings)
    assert proc.returncode == 0, proc.stdout
    assert doctor_lines(proc)["relays"] == "WARN" and "nothing will be announced" in proc.stdout


def test_doctor_reports_what_fails(tmp_path: Path, mint_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    Database(tmp_path / "node.sqlite3").close()
    proc = cli("doctor", "--timeout", "2", "--upstream-base-url", dead + "/v1",
               "--cashu-mints", f"{mint_url},{dead}", "--database", "node.sqlite3",
               cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    levels = doctor_lines(proc)
    assert levels["upstream"] == "FAIL" and levels[f"mint {dead}"] == "FAIL"
    assert levels[f"mint {mint_url}"] == "OK" and levels["database"] == "OK"
    assert levels["public URL"] == "WARN" and levels["admin token"] == "FAIL"
    assert "Traceback" not in proc.stderr
    # no database, a bad setting: each one FAIL line
    proc = cli("doctor", "--upstream-base-url", dead, cwd=tmp_path / "..", search="nowhere.db")
    assert proc.returncode == 1 and doctor_lines(proc)["database"] == "FAIL"
    assert not (tmp_path.parent / "nowhere.db").exists()
    proc = cli("doctor", "--port", "70000", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout.startswith("FAIL config: --port")


# ---- help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    [], ["keys"], ["keys", "create"], ["keys", "list"], ["keys", "show"], ["keys", "disable"],
    ["keys", "enable"], ["keys", "refund-to-token"], ["admin-token"], ["admin-token", "show"],
    ["admin-token", "rotate"], ["doctor"]])
def test_every_command_has_help(tmp_path: Path, args: list[str]) -> None:
    proc = cli(*args, "--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m routstr")
    assert list(tmp_path.iterdir()) == []


def test_the_node_help_names_the_commands(tmp_path: Path) -> None:
    out = cli("--help", cwd=tmp_path).stdout
    for command in ("keys create|list|show|disable|enable|refund-to-token",
                    "admin-token show|rotate", "doctor", "--no-webhooks-allow-private"):
        assert command in out


def test_bad_arguments_are_refused_without_a_traceback(tmp_path: Path) -> None:
    for args in (["keys", "create", "--balance-msats", "-5"], ["keys", "create"],
                 ["keys", "frobnicate"], ["keys", "create", "--balance-msats", "1",
                                           "--expires", "someday"]):
        proc = cli(*args, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.splitlines()[-1].startswith("usage:") is False
    assert list(tmp_path.iterdir()) == []
