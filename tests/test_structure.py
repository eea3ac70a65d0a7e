"""Holds the layering of ARCHITECTURE.md with the stdlib `ast` module.

- `h11` is imported only by the server and the upstream client;
- `sqlite3` only by `db`, `ledger` and the wallet store;
- `routstr/cashu/` imports nothing from the rest of the node;
- there is exactly one broad `except Exception` that swallows (the server's barrier);
  cleanup handlers that end in a bare `raise` are fine;
- importing a module does no work: no module reads `os.environ`;
- runtime dependencies are h11 and anyio only;
- every data file of the package (templates, the OpenAPI source, prices) ships in the wheel.
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "routstr"


def modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text()) for p in sorted(PKG.rglob("*.py"))}


def imported(tree: ast.Module, rel: str) -> set[str]:
    names: set[str] = set()
    package = rel.replace("/", ".").removesuffix(".py").rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
                names.add(mod)
                if not node.module:
                    names.update(f"{base}.{a.name}" for a in node.names)
            elif node.module:
                names.add(node.module)
    return names


def test_h11_only_in_server_and_client() -> None:
    for rel, tree in modules().items():
        if any(n == "h11" or n.startswith("h11.") for n in imported(tree, rel)):
            assert rel in ("routstr/server.py", "routstr/client.py"), rel


def test_sqlite_only_in_storage_modules() -> None:
    allowed = {"routstr/db.py", "routstr/ledger.py", "routstr/walletstore.py"}
    for rel, tree in modules().items():
        if "sqlite3" in imported(tree, rel):
            assert rel in allowed, rel


def test_cashu_is_standalone() -> None:
    for rel, tree in modules().items():
        if not rel.startswith("routstr/cashu/"):
            continue
        for name in imported(tree, rel):
            if name.startswith("routstr"):
                assert name.startswith("routstr.cashu"), f"{rel} imports {name}"


def _reraises(handler: ast.ExceptHandler) -> bool:
    """A cleanup handler (rollback, close) that ends in a bare `raise` swallows nothing."""
    return bool(handler.body) and isinstance(handler.body[-1], ast.Raise) and handler.body[-1].exc is None


def test_exactly_one_broad_except() -> None:
    broad = []
    for rel, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler) and not _reraises(node):
                t = node.type
                if t is None or (isinstance(t, ast.Name) and t.id in ("Exception", "BaseException")):
                    broad.append(f"{rel}:{node.lineno}")
    assert len(broad) == 1 and broad[0].startswith("routstr/server.py"), broad


def test_no_module_reads_environ_except_main() -> None:
    for rel, tree in modules().items():
        if rel == "routstr/__main__.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                raise AssertionError(f"{rel}:{node.lineno} reads the environment")


def test_runtime_dependencies_are_h11_and_anyio_only() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip()]
    assert sorted(r.split(">")[0].split("=")[0] for r in reqs) == ["anyio", "h11"]
    stdlib_or_ours = {"h11", "anyio", "routstr"}
    import sys
    for rel, tree in modules().items():
        for name in imported(tree, rel):
            top = name.split(".")[0]
            assert top in stdlib_or_ours or top in sys.stdlib_module_names, f"{rel}: {name}"


def test_package_data_is_declared() -> None:
    """A file the node reads with importlib.resources must be in setup.cfg's package_data, or
    an installed node fails at import."""
    from fnmatch import fnmatch
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["routstr"].split(",")]
    data = [str(p.relative_to(PKG)) for p in PKG.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert "openapi.json" in data and "templates/admin.css" in data
    assert [f for f in data if not any(fnmatch(f, pat) for pat in patterns)] == []
