"""A pytest plugin for mutation runs only (`benchmarks/mutation.py` loads it with `-p`): each mutant's tests run
fastest first.

mutmut runs a mutant's tests with `-x`, in no particular order, so one slow test early (a calibration stage test
takes 13 s where most take a tenth of a second) is paid by every mutant that a fast test would have killed. mutmut
records each test's duration in `mutmut-stats.json` (in the folder the tests run from); sorting by it makes a
killed mutant cost about its quickest killing test. Survivors still run every test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

STATS = Path("mutmut-stats.json")


def durations(path: Path = STATS) -> dict[str, float]:
    """Test node id -> seconds, as mutmut measured it; empty before its first run or if unreadable."""
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text())["duration_by_test"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


@pytest.hookimpl(trylast=True)  # after any other plugin's ordering: this one decides
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seconds = durations()
    if seconds:
        # a test mutmut has not timed goes last: it may be slow; the sort is stable, so ties keep their order
        items.sort(key=lambda item: seconds.get(item.nodeid, float("inf")))
