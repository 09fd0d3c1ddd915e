"""A pytest plugin for mutation runs only (`benchmarks/mutation.py` loads it with `-p`): each mutant's tests run
fastest first, and the stages' code versions are computed once, before mutmut forks a process per mutant.

mutmut runs a mutant's tests with `-x`, in no particular order, so one slow test early (a calibration stage test
takes 13 s where most take a tenth of a second) is paid by every mutant that a fast test would have killed. mutmut
records each test's duration in `mutmut-stats.json` (in the folder the tests run from); sorting by it makes a
killed mutant cost about its quickest killing test. Survivors still run every test.

A stage's code version hashes the source of its import closure. In mutmut's copy every mutated module holds all
its mutants (`infer.py` is ~12,000 lines there), so the first hash in a process takes ~12 s, and every forked
mutant process would pay it again. The hashes do not depend on which mutant runs (the file is the same; mutmut
picks the mutant at call time), so they are computed at collection, in the fork server, and inherited.
"""

from __future__ import annotations

import json
import os
import sys
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


def warm_code_versions() -> int:
    """The code version of every stage the collected tests imported, and the code fingerprint of every registered
    evaluation method (cached per process); returns how many stages were hashed."""
    if "stages.code" not in sys.modules:
        return 0
    from sdrpn_core.methods import METHODS
    from stages.code import function_fingerprint
    from stages.common import Stage

    stages = {
        id(v): v
        for name, module in list(sys.modules.items())
        if name.startswith("stages.") and module is not None
        for v in vars(module).values()
        if isinstance(v, Stage)
    }
    for stage in stages.values():
        stage.code_version()
    for method in METHODS.values():
        function_fingerprint(method.answer)
    return len(stages)


def pytest_collection_finish(session: pytest.Session) -> None:
    if not os.environ.get("MUTANT_UNDER_TEST"):  # the fork server (and mutmut's own runs): warm what children inherit
        warm_code_versions()
