"""The Node.js test tree: tests/js/package.json installed (npm) once into .cache/node-sdk.

Installed again only when package.json changes (or a dependency is missing); the scripts in
tests/js/*.mjs are copied next to node_modules and run there with `node`. No lock file is
written and nothing under .cache is committed.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JS_SRC = ROOT / "tests" / "js"
SDK_DIR = ROOT / ".cache" / "node-sdk"
NPM_INSTALL_TIMEOUT_S = 300


def _installed(package: str) -> bool:
    installed = SDK_DIR / "package.json"
    if not installed.exists() or installed.read_text() != package:
        return False
    deps = json.loads(package).get("dependencies", {})
    return all((SDK_DIR / "node_modules" / name / "package.json").is_file() for name in deps)


def js_tree(what: str) -> Path:
    """The installed tree (its directory), or a loud failure when node or npm is missing:
    these tests are never skipped, in CI or not."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail(f"Node.js and npm are required for {what}")
    SDK_DIR.mkdir(parents=True, exist_ok=True)
    package = (JS_SRC / "package.json").read_text()
    with open(SDK_DIR / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install, even with two sessions at once
        if not _installed(package):
            (SDK_DIR / "package.json").write_text(package)
            out = subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "--no-package-lock"],
                cwd=SDK_DIR, timeout=NPM_INSTALL_TIMEOUT_S, capture_output=True, text=True,
                check=False)
            if out.returncode != 0:
                (SDK_DIR / "package.json").unlink()
                pytest.fail(f"npm install failed ({out.returncode}): {out.stderr[-3000:]}")
        for script in JS_SRC.glob("*.mjs"):
            shutil.copy(script, SDK_DIR / script.name)
    return SDK_DIR
