"""contrib/: the systemd unit and the torrc are checked by the real tools.

`systemd-analyze verify` and `tor --verify-config` run when installed; in CI (``CI=true``)
they must be installed (`.ci/run` does it), so a missing tool fails instead of skipping.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from routstr.config import Config, env_name

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "contrib" / "routstr.service"
TORRC = ROOT / "contrib" / "torrc.example"
README = ROOT / "README.md"
UNIT_PYTHON = "/opt/routstr/bin/python"
MAX_EXPOSURE = 2.0  # systemd-analyze security: 0 = locked down, 10 = exposed


def tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} is not installed (CI installs it in .ci/run)")
        pytest.skip(f"{name} not installed (apt-get install {'tor' if name == 'tor' else 'systemd'})")
    return path


def unit_entries() -> list[tuple[str, str, str]]:
    """(section, key, value) for every line of the unit, in order (keys may repeat)."""
    section, out = "", []
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def service(key: str) -> list[str]:
    return [v for s, k, v in unit_entries() if s == "Service" and k == key]


def runnable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart's interpreter pointed at this python (verify checks it exists)."""
    text = UNIT.read_text()
    assert UNIT_PYTHON in text
    path = tmp_path / "routstr.service"
    path.write_text(text.replace(UNIT_PYTHON, sys.executable))
    return path


# ---- systemd ---------------------------------------------------------------------------------
def test_unit_is_hardened() -> None:
    want = {
        "DynamicUser": "yes", "StateDirectory": "routstr", "ProtectSystem": "strict",
        "NoNewPrivileges": "yes", "PrivateTmp": "yes", "MemoryDenyWriteExecute": "yes",
        "ProtectHome": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
        "RestrictNamespaces": "yes", "LockPersonality": "yes", "KillMode": "mixed",
    }
    for key, value in want.items():
        assert service(key) == [value], key
    assert service("RestrictAddressFamilies") == ["AF_INET AF_INET6 AF_UNIX"]
    assert service("ExecStart") == [f"{UNIT_PYTHON} -m routstr"]
    assert service("EnvironmentFile") == ["-/etc/routstr/routstr.env"]


def test_unit_environment_names_are_settings() -> None:
    known = {env_name(f.name) for f in dataclasses.fields(Config)}
    env: dict[str, str] = {}
    for line in service("Environment"):
        env.update(pair.split("=", 1) for pair in line.split())  # type: ignore[misc]
    assert {k for k in env if not k.startswith("PYTHON")} <= known
    assert env["DATABASE"].startswith("/var/lib/routstr/")  # inside StateDirectory
    assert env["HOST"] == "127.0.0.1"
    stop = int(service("TimeoutStopSec")[0])
    assert stop > Config.shutdown_grace + 5  # the drain finishes before systemd kills


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = tool("systemd-analyze")
    out = subprocess.run([exe, "verify", str(runnable_unit(tmp_path))], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    # the tool is really checking: an unknown directive is reported
    broken = tmp_path / "broken" / "routstr.service"
    broken.parent.mkdir()
    broken.write_text(runnable_unit(tmp_path).read_text().replace("[Service]",
                                                                    "[Service]\nProtectSytem=yes"))
    out = subprocess.run([exe, "verify", str(broken)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert "ProtectSytem" in out.stderr


def test_systemd_security_exposure(tmp_path: Path) -> None:
    exe = tool("systemd-analyze")
    out = subprocess.run([exe, "security", "--offline=yes", str(runnable_unit(tmp_path))],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout)
    if match is None and "--offline" in out.stderr:  # systemd < 250 cannot rate a unit file
        pytest.skip("systemd-analyze security --offline not supported")
    assert match is not None, out.stdout[-2000:] + out.stderr[-2000:]
    assert float(match.group(1)) <= MAX_EXPOSURE, out.stdout


# ---- Tor ---------------------------------------------------------------------------------------
def torrc_options() -> dict[str, list[str]]:
    opts: dict[str, list[str]] = {}
    for raw in TORRC.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            opts.setdefault(key, []).append(value.strip())
    return opts


def tor_verify(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("tor"), "--verify-config", "-f", str(path),
                           "--defaults-torrc", os.devnull], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_tor_verify_config(tmp_path: Path) -> None:
    out = tor_verify(TORRC, tmp_path)
    assert out.returncode == 0 and "Configuration was valid" in out.stdout, out.stdout + out.stderr
    bad = tmp_path / "bad.torrc"  # the tool really checks: a port out of range is refused
    bad.write_text(TORRC.read_text().replace("127.0.0.1:8000", "127.0.0.1:80000"))
    assert tor_verify(bad, tmp_path).returncode != 0


def test_onion_service_forwards_to_the_node() -> None:
    opts = torrc_options()
    assert opts["HiddenServiceVersion"] == ["3"]
    assert opts["HiddenServicePort"] == [f"80 {Config.host}:{Config.port}"]
    assert opts["HiddenServiceDir"][0].startswith("/var/lib/tor/")
    socks = opts["SocksPort"][0]
    assert socks.startswith("127.0.0.1:")  # never offered to the network
    assert f"socks5h://{socks}" in README.read_text()  # the README's UPSTREAM_PROXY


def test_node_shows_its_onion_address(node_factory: Any) -> None:
    onion = "http://" + "a" * 56 + ".onion"
    node = node_factory("--onion-url", onion, "--http-url", "https://node.example")
    status, info = node.json("GET", "/v1/info")
    assert status == 200 and info["onion_url"] == onion and info["http_url"] == "https://node.example"
    node.stop()


# ---- README -------------------------------------------------------------------------------------
def test_readme_sections_and_setup_commands() -> None:
    text = README.read_text()
    for title in ("## Run on a Tor node", "## Small devices", "## Performance"):
        assert title in text, title
    # the test command is CI's script, which ends by running the suite
    blocks = re.findall(r"```sh\n(.*?)\n```", text, re.S)
    assert blocks[1] == "bash .ci/run"
    # the run command serves at once (the demo upstream), and the walkthrough follows the order
    # a new operator meets things in
    assert blocks[0].split(" && ")[-1].startswith(".venv/bin/python -m routstr --demo ")
    steps = ["**First start**", "**First key**", "**First payment in ecash**",
             "**The dashboard**", "**A real upstream**"]
    assert [text.index(step) for step in steps] == sorted(text.index(step) for step in steps)
    last = (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1]
    assert last.endswith(".venv/bin/python -m pytest"), last
    assert "routstr.service" in text and "torrc.example" in text
