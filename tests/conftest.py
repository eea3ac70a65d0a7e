"""Shared pytest configuration: fixture plugins live in tests/support/."""

from __future__ import annotations

import pytest

pytest_plugins: list[str] = ["tests.support.node", "tests.support.mint"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="run heavier variants")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="heavier variant: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
