"""Shared pytest configuration: fixture plugins live in tests/support/."""

from __future__ import annotations

import pytest

pytest_plugins: list[str] = ["tests.support.node", "tests.support.mint", "tests.support.upstream",
                             "tests.support.minter"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="run heavier variants")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The heavier variants (marker `slow`) are a different run, not skipped cases: without
    `--run-slow` they are deselected (counted as such in the summary)."""
    if config.getoption("--run-slow"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]
