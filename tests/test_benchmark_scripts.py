"""The benchmark scripts run, and say what they measure: each ends with a complete `RESULT` line. Every script
runs here in its `--smoke` mode (tiny sizes, seconds), so none can rot unseen; two also check what they measure."""

from __future__ import annotations

import ast
import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
CHECKED_BELOW = {"code_change", "retrain"}  # their smoke runs are the tests of what they measure, below


def declared_keys(script: str) -> list[str]:
    """The script's `RESULT_KEYS` (read from its source: importing a script may start work)."""
    tree = ast.parse((ROOT / "benchmarks" / f"{script}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "RESULT_KEYS":
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"benchmarks/{script}.py declares no RESULT_KEYS")


@pytest.fixture
def api_url(prefect_api) -> str:
    """The session's Prefect API, for the scripts that run flows (each would otherwise start its own server)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def result_line(script: str, *args: str, api: str | None = None, timeout: int = 900) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # without `api`, a script that runs flows starts its own API
    if api:
        env["PREFECT_API_URL"] = api
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), done.stdout[-2000:]
    pairs = [pair.split("=", 1) for pair in last.removeprefix("RESULT ").split()]
    assert all(len(p) == 2 and p[1] for p in pairs), f"a RESULT entry without a value: {last}"
    keys, patterns = [k for k, _ in pairs], declared_keys(script.removesuffix(".py"))
    assert len(keys) == len(patterns) and all(map(fnmatch.fnmatchcase, keys, patterns)), (
        f"{script}: RESULT keys {keys} are not the declared {patterns}"
    )
    return dict(pairs)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - CHECKED_BELOW))
def test_every_script_runs_in_its_smoke_mode_and_prints_its_whole_result_line(script, api_url):
    result_line(f"{script}.py", "--smoke", api=api_url, timeout=300)


def test_every_script_declares_its_result_keys_and_takes_quick_and_smoke():
    for script in SCRIPTS:
        assert declared_keys(script), script
        source = (ROOT / "benchmarks" / f"{script}.py").read_text()
        assert "parser(__doc__" in source, f"{script} does not use benchmarks._cli.parser (--quick, --smoke)"


@pytest.mark.slow
def test_code_change_reruns_what_each_edit_touches_through_the_real_pipeline(api_url):
    """Five edits on a copy of the project, each rerun from the first run's store: a docstring reruns nothing, a
    metric fix only the scores without a model call, a prompt change one benchmark's answers, a label-rule change
    the labels onward with the teacher cached, a teacher change the teacher."""
    result = result_line("code_change.py", "--smoke", api=api_url)
    assert result["docstring_stages"] == "0"
    assert result["metric_stages"] == "1" and result["metric_model_calls"] == "0"
    assert result["prompt_benchmarks_reanswered"] == "1"
    assert result["labels_edit_teacher_cached"] == "1"
    assert result["teacher_edit_teacher_rerun"] == "1"


@pytest.mark.slow
def test_three_weeks_of_retraining_do_only_the_new_work_and_reject_a_worse_rpn(api_url):
    """Week 2's new manifest alone goes through the teacher; week 3's challenger, made worse on purpose, is rejected
    and the champion stays."""
    result = result_line("retrain.py", "--smoke", api=api_url)
    assert result["week2_teacher_rows"] == result["week2_new_rows"] != "0"
    assert result["week3_promoted"] == "0" and result["champion_unchanged"] == "1"
    assert float(result["week2_over_week1_time"]) > 0


def test_mutation_runs_order_each_mutants_tests_fastest_first(tmp_path, monkeypatch):
    """The mutmut config loads the ordering plugin; it sorts by mutmut's timings (an untimed test last) and leaves
    the order alone before mutmut has timed anything or when its file is unreadable."""
    import json
    from types import SimpleNamespace

    from benchmarks import _mutation_order as order
    from benchmarks.mutation import MODULES, write_config

    write_config(tmp_path, list(MODULES))
    assert "pytest_add_cli_args=-p\n    benchmarks._mutation_order\n" in (tmp_path / "setup.cfg").read_text()
    monkeypatch.chdir(tmp_path)
    names = ["t.py::slow", "t.py::untimed", "t.py::fast", "t.py::mid"]
    items = [SimpleNamespace(nodeid=n) for n in names]
    order.pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == names
    stats = {"duration_by_test": {"t.py::slow": 13.0, "t.py::fast": 0.1, "t.py::mid": 1.0}}
    (tmp_path / "mutmut-stats.json").write_text(json.dumps(stats))
    order.pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == ["t.py::fast", "t.py::mid", "t.py::slow", "t.py::untimed"]
    (tmp_path / "mutmut-stats.json").write_text("{not json")
    assert order.durations() == {}


def test_mutation_runs_hash_the_stages_code_once_before_forking():
    """The fork server computes the code version of every imported stage (cached), so mutant processes inherit
    them instead of hashing mutmut's large mutated files again."""
    import stages.evaluate  # a stage module the collected tests import
    from benchmarks._mutation_order import warm_code_versions
    from stages.code import _module_hash

    assert warm_code_versions() >= 1
    assert _module_hash.cache_info().currsize >= 1
    before = _module_hash.cache_info().misses
    stages.evaluate.PIECES.code_version()
    assert _module_hash.cache_info().misses == before  # nothing hashed again
