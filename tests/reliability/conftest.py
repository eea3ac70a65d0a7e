"""The reliability suite's log audit reads the logs of every node the session started, so it
runs after every other test of the session, wherever it was collected."""

from __future__ import annotations

import pytest

LAST = "test_no_secret_in_any_log_line"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    last = [item for item in items if item.name.startswith(LAST)]
    if last:
        items[:] = [item for item in items if not item.name.startswith(LAST)] + last
