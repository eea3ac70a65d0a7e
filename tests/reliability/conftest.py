"""The reliability suite's log audit reads the logs of every node the session started, so it
runs after every other test of the session, wherever it was collected."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.node import NodeProcess

LAST = "test_no_secret_in_any_log_line"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    last = [item for item in items if item.name.startswith(LAST)]
    if last:
        items[:] = [item for item in items if not item.name.startswith(LAST)] + last


@pytest.fixture
def spawn() -> Iterator[Callable[[Path, list[str]], NodeProcess]]:
    """Start a node (`NodeProcess(workdir, args).start()`); whatever still runs when the test
    ends — it failed midway — is killed (a `--workers` supervisor's workers follow it)."""
    started: list[NodeProcess] = []

    def start(workdir: Path, args: list[str]) -> NodeProcess:
        node = NodeProcess(workdir, args)
        started.append(node)  # also keeps it alive: its log file is named after its id()
        return node.start()

    yield start
    for node in started:
        node.kill()
        if node.proc is not None:
            node.log.close()
