"""Each stage is keyed on the code it really runs: its import closure inside the project, without comments or
docstrings, less what its key holds by value (a benchmark's prompts in an evaluation piece, its metric in the
scores); model-bound stages also on torch / transformers. A dependency left out of a key fails here."""

from __future__ import annotations

import dataclasses
import importlib
import sys

import pytest

from sdrpn_core.benchmarks import BENCHMARKS, get_benchmark
from sdrpn_core.methods import EvalParams
from stages import code as code_mod
from stages.calibrate import CALIBRATE
from stages.code import code_fingerprint, direct_imports, function_fingerprint, import_closure, normalized
from stages.config import DatasetSpec
from stages.data import build_manifest
from stages.evaluate import PIECES, plan_pieces
from stages.labels import LABELS
from stages.model import NANO_BASE
from stages.refs import ModelRef
from stages.release import RELEASE
from stages.score import SCORE, scoring_fingerprint
from stages.teacher import SHARD
from stages.train import TRAIN
from storage.store import Store, StoreSettings


def closure(stage) -> set[str]:
    return set(import_closure(stage.code or (stage.run.__module__,), stage.exclude))


def test_comments_docstrings_and_layout_do_not_change_the_code_only_code_does():
    base = normalized('"""Module."""\ndef f(x):\n    """Doc."""\n    return x + 1\n')
    assert base == normalized(
        '"""Other words."""\n# a comment\ndef f(x):\n    """More."""\n\n    return (x + 1)  # why\n'
    )
    assert base != normalized("def f(x):\n    return x + 2\n")
    assert base != normalized("def f(y):\n    return y + 1\n")


def test_each_stage_runs_what_it_imports_and_nothing_of_the_stages_after_it():
    teacher, labels, train = closure(SHARD), closure(LABELS), closure(TRAIN)
    assert "sdrpn_core.teacher" in teacher and "sdrpn_core.presets" in teacher and "storage.sharded" in teacher
    assert "sdrpn_core.pseudo_labels" not in teacher  # a label rule change never re-runs the GPU teacher
    assert "sdrpn_core.pseudo_labels" in labels and "stages.tables" in labels
    assert {"sdrpn_core.train", "sdrpn_core.rpn", "stages.train_ranks"} <= train
    for stage in (SHARD, LABELS, TRAIN, CALIBRATE, PIECES, SCORE, RELEASE):  # benchmarks: by value, or not at all
        found = closure(stage)
        assert not {m for m in found if m.startswith(("sdrpn_core.benchmarks.", "sdrpn_core.metrics"))} - {
            "sdrpn_core.benchmarks.published"
        }, stage.name
        assert not {m for m in found if m.startswith(("flows", "tasks"))}, stage.name
    assert {"sdrpn_core.infer", "sdrpn_core.methods", "sdrpn_core.batched", "sdrpn_core.roi"} <= closure(PIECES)
    assert "sdrpn_core.train" not in closure(PIECES)  # answering does not run the training loop
    assert {"stages.report", "stages.score"} <= closure(SCORE)
    calibrating = closure(CALIBRATE)  # runs before the evaluation: none of its stages' code
    assert {"sdrpn_core.calibrate", "sdrpn_core.infer"} <= calibrating
    assert not {"stages.evaluate", "stages.score"} & calibrating
    assert "sdrpn_core.train" not in calibrating  # nor the trainer (the config that imports it is keyed by value)
    assert "sdrpn_core.benchmarks.published" in closure(RELEASE)  # the model card prints the paper's rows
    assert "sdrpn_core.infer" not in closure(NANO_BASE) and "sdrpn_core.synthetic.nano" in closure(NANO_BASE)


def test_imports_are_read_from_source_including_registries_and_skipping_type_checking():
    assert {f"sdrpn_core.benchmarks.{m}" for m in ("textvqa", "vstar", "pope")} <= direct_imports(
        "sdrpn_core.benchmarks"
    )  # the registry imports its modules dynamically
    assert "sdrpn_core.pseudo_labels" not in direct_imports("stages.tables")  # a type hint only
    assert "sdrpn_core.teacher" in direct_imports("sdrpn_core.infer")  # imported inside a function: still run
    assert "sdrpn_core.models" in direct_imports("sdrpn_core.teacher")  # a parent package's __init__ runs too


def test_model_bound_stages_key_on_the_numeric_libraries(monkeypatch):
    before = SHARD.code_version(), LABELS.code_version()
    monkeypatch.setattr(code_mod, "library_versions", lambda: {"torch": "9.9", "transformers": "9.9"})
    import stages.common

    monkeypatch.setattr(stages.common, "library_versions", code_mod.library_versions)
    assert SHARD.code_version() != before[0]  # another torch may compute other attention maps
    assert LABELS.code_version() == before[1]  # numpy label rules: no model


@pytest.fixture
def project_package(tmp_path, monkeypatch):
    """A two-module package counted as project code, to edit on disk."""
    root = tmp_path / "fpdemo"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "helpers.py").write_text('"""Helpers."""\n\ndef norm(x):\n    return x.strip().lower()\n')
    (root / "metric.py").write_text(
        "from fpdemo import helpers\n\ndef exact(p, a):\n    return float(helpers.norm(p) == helpers.norm(a))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(code_mod, "PROJECT", (*code_mod.PROJECT, "fpdemo"))
    yield root
    for name in [m for m in sys.modules if m.startswith("fpdemo")]:
        del sys.modules[name]


def _fresh():
    for cached in (
        code_mod._spec,
        code_mod._module_hash,
        code_mod.direct_imports,
        code_mod.import_closure,
        code_mod.function_fingerprint,
    ):
        cached.cache_clear()
    importlib.invalidate_caches()
    for name in [m for m in sys.modules if m.startswith("fpdemo")]:
        del sys.modules[name]
    return importlib.import_module("fpdemo.metric")


def test_a_change_in_a_called_function_changes_the_key_a_docstring_does_not(project_package):
    metric = _fresh()
    module_fp, function_fp = code_fingerprint(["fpdemo.metric"]), function_fingerprint(metric.exact)
    helpers = project_package / "helpers.py"
    helpers.write_text(helpers.read_text().replace('"""Helpers."""', '"""Helpers, documented."""\n# why'))
    metric = _fresh()
    assert (code_fingerprint(["fpdemo.metric"]), function_fingerprint(metric.exact)) == (module_fp, function_fp)
    helpers.write_text(helpers.read_text().replace("x.strip().lower()", "x.strip().casefold()"))
    metric = _fresh()
    assert code_fingerprint(["fpdemo.metric"]) != module_fp  # the module imports the helper's module
    assert function_fingerprint(metric.exact) != function_fp  # the metric calls the changed helper
    _fresh()


def test_a_benchmarks_prompt_keys_its_pieces_by_value_and_its_metric_only_its_scores(tmp_path, monkeypatch):
    store = Store(StoreSettings(root=str(tmp_path / "store")))
    dataset = build_manifest(DatasetSpec(kind="synthetic", n=4, seed=3, canvas=96, benchmark="textvqa"), store)
    model = ModelRef("m" * 16, "/nowhere", "llava", "float32", "cpu")
    params = EvalParams(methods=("baseline", "vicrop"), max_new_tokens=4)
    pieces = plan_pieces(store, model, None, dataset, params, shards=2)
    scoring = scoring_fingerprint(get_benchmark("textvqa"))
    textvqa = get_benchmark("textvqa")

    monkeypatch.setitem(BENCHMARKS, "textvqa", dataclasses.replace(textvqa, metric=lambda p, s: float(p == "x")))
    assert [p.fingerprint for p in plan_pieces(store, model, None, dataset, params, 2)] == [
        p.fingerprint for p in pieces
    ]  # a metric fix answers nothing again
    assert scoring_fingerprint(get_benchmark("textvqa")) != scoring
    assert scoring_fingerprint(get_benchmark("synthetic")) != scoring

    prompt = dataclasses.replace(textvqa, question=lambda s: "Question: " + s.question)
    monkeypatch.setitem(BENCHMARKS, "textvqa", prompt)
    changed = plan_pieces(store, model, None, dataset, params, 2)
    assert all(a.fingerprint != b.fingerprint for a, b in zip(changed, pieces, strict=True))
    assert scoring_fingerprint(prompt) == scoring  # the prompt reaches the scores through the answers


def test_a_benchmarks_metric_key_follows_it_into_the_metrics_module(monkeypatch):
    import sdrpn_core.metrics as metrics

    textvqa, synthetic = get_benchmark("textvqa"), get_benchmark("synthetic")
    before = function_fingerprint(textvqa.metric), function_fingerprint(synthetic.metric)
    assert function_fingerprint(textvqa.metric) != function_fingerprint(get_benchmark("docvqa").metric)
    monkeypatch.setattr(metrics, "vqa_accuracy", lambda prediction, answers: 1.0)  # TextVQA's metric calls it
    function_fingerprint.cache_clear()  # a process's code does not change under it; this test changes it
    assert function_fingerprint(textvqa.metric) != before[0]
    assert function_fingerprint(synthetic.metric) == before[1]  # exact match: untouched
    monkeypatch.undo()
    function_fingerprint.cache_clear()


def test_stages_key_themselves_from_many_threads_at_once():
    """Mapped teacher shards compute their key concurrently: parsing must not race (CPython 3.11's AST state)."""
    from concurrent.futures import ThreadPoolExecutor

    for cached in (code_mod._spec, code_mod._module_hash, code_mod.direct_imports, code_mod.import_closure):
        cached.cache_clear()
    with ThreadPoolExecutor(4) as pool:
        keys = list(pool.map(lambda roots: code_fingerprint(roots), [["stages.teacher"], ["stages.labels"]] * 4))
    assert len(set(keys[0::2])) == 1 and len(set(keys[1::2])) == 1 and keys[0] != keys[1]
