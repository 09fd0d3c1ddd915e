"""Prompt, generation-limit, split and metric parity with the harness behind the paper, by running its own code.

The authors vendor lmms-eval; for these eight tasks their copy is byte-identical to lmms-eval 0.4.0 on PyPI,
which `make setup` installs without its dependency tree (`pip install --no-deps lmms-eval==0.4.0`). Its package
`__init__`s import torch, datasets and accelerate, so the task modules are loaded under a bare stand-in for
`lmms_eval.tasks` (and `pandas.isna`, the one pandas call HR-Bench's module makes, where pandas is absent).
Rows are written in each benchmark's published layout, read by our readers, and every document is compared:
our prompt against the task's `doc_to_text`, our score against its `process_results` on a set of awkward
outputs (the harness strips outputs first), our aggregates against its aggregation functions."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import yaml

from sdrpn_core.benchmarks import get_benchmark
from sdrpn_core.benchmarks.scoring import aggregate, score
from tests.test_benchmark_layouts import (
    TEXTVQA,
    docvqa_rows,
    hrbench_rows,
    infovqa_rows,
    png,
    pope_rows,
    textvqa_rows,
    write,
)

OUTPUTS = [
    "",
    " ",
    "Yes",
    "yes.",
    " no ",
    "No",
    "maybe",
    "A",
    "(B)",
    "b",
    "The answer is C.",
    "D. leather",
    "Blue",
    "answer: b",
    "leather",
    "Z",
    "B or C",
    "12",
    " 12 ",
    "12.5",
    "1,000",
    "50%",
    "0",
    "0.0",
    "1e1",
    "x ^ { 2 } + 1",
    "HELLO world",
    "Nike's",
    "two dogs",
    "U.S.A.",
    "brand 0",
    "Brand 0.",
    "the brand 0",
    "1 May",
    "may 1",
    "10",
    "20",
    "red",
    "kevlar",
    "green car",
    "C",
    "\n\nA\n",
]


def _package_dir() -> Path:
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("lmms-eval is not installed: run `make setup` (pip install --no-deps lmms-eval==0.4.0)")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def harness():
    """lmms-eval's task modules, imported under a light `lmms_eval.tasks` stand-in; sys.modules restored after."""
    root = _package_dir()
    saved = dict(sys.modules)
    tasks = types.ModuleType("lmms_eval.tasks")
    tasks.__path__ = [str(root / "tasks")]
    sys.modules["lmms_eval.tasks"] = tasks
    try:
        names = ["textvqa", "docvqa", "infovqa", "chartqa", "ocrbench", "vstar_bench", "pope"]
        modules = {n: importlib.import_module(f"lmms_eval.tasks.{n}.utils") for n in names}
        modules["hrbench"] = _import_with_pandas_isna("lmms_eval.tasks.hrbench.utils")
        yield types.SimpleNamespace(root=root, **modules)
    finally:
        for name in set(sys.modules) - set(saved):
            del sys.modules[name]
        sys.modules.update(saved)


def _import_with_pandas_isna(name: str):
    """Import `name`; where pandas is absent, under a stand-in that has only `isna` (removed again right after, so
    that pyarrow does not take it for pandas)."""
    if importlib.util.find_spec("pandas") is not None:
        return importlib.import_module(name)
    sys.modules["pandas"] = types.SimpleNamespace(isna=lambda v: v is None or v != v)  # type: ignore[assignment]
    try:
        return importlib.import_module(name)
    finally:
        del sys.modules["pandas"]


def task_config(root: Path, task: str, name: str) -> dict:
    """A task's YAML with its `include`s merged (lines with `!function` tags dropped, as lmms-eval's own loaders do)."""
    path = root / "tasks" / task / name
    cfg = yaml.safe_load("".join(line for line in path.read_text().splitlines(True) if "!function" not in line))
    if "include" in cfg:
        cfg = {**task_config(root, task, cfg.pop("include")), **cfg}
    return cfg


def harness_anls(root: Path):
    """`anls` and its Levenshtein from lmms_eval/api/metrics.py, compiled alone (the module imports torch)."""
    source = (root / "api" / "metrics.py").read_text()
    tree = ast.parse(source)
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("anls", "levenshtein_distance")]
    for node in wanted:
        node.decorator_list = []
    namespace: dict = {}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "lmms_eval/api/metrics.py", "exec"), namespace)
    return namespace["anls"]


def check(bench_name: str, samples, docs, to_text, process, kwargs, cfg, split: str, config: str = "") -> None:
    bench = get_benchmark(bench_name)
    assert bench.split == split == cfg["test_split"] and bench.config == config == cfg.get("dataset_name", "")
    assert bench.max_new_tokens == cfg.get("generation_kwargs", {}).get("max_new_tokens")
    assert len(samples) == len(docs)
    for sample, doc in zip(samples, docs, strict=True):
        assert bench.prompt(sample) == to_text(dict(doc), kwargs), sample.sample_id
        for out in [*OUTPUTS, *sample.answers]:
            assert score(bench, sample, out) == pytest.approx(process(dict(doc), out.strip())), (sample.sample_id, out)


def test_textvqa_parity(harness, tmp_path):
    docs = textvqa_rows("val", range(3))
    docs[1]["answers"] = ["Nike's"] * 3 + ["two dogs"] * 4 + ["U.S.A."] * 3
    docs[2]["question"] = "WHAT is the BRAND?"
    samples, _ = get_benchmark("textvqa").reader(write(tmp_path / "validation-00000-of-00001.parquet", docs, TEXTVQA))
    cfg = task_config(harness.root, "textvqa", "textvqa_val.yaml")
    kwargs = cfg["lmms_eval_specific_kwargs"]["default"]
    process = lambda doc, out: harness.textvqa.textvqa_process_results(doc, [out])["exact_match"]  # noqa: E731
    check("textvqa", samples, docs, harness.textvqa.textvqa_doc_to_text, process, kwargs, cfg, "validation")


def test_docvqa_and_infovqa_parity(harness, tmp_path):
    anls = harness_anls(harness.root)
    process = lambda doc, out: anls(doc["answers"], [out])["anls"]  # noqa: E731
    for name, task, rows, config in (
        ("docvqa", "docvqa", docvqa_rows(range(3)), "DocVQA"),
        ("infovqa", "infovqa", infovqa_rows(range(10, 13)), "InfographicVQA"),
    ):
        rows[0]["answers"] = ["Hello  World", "abcd"]
        samples, _ = get_benchmark(name).reader(write(tmp_path / config / "validation-00000-of-00001.parquet", rows))
        cfg = task_config(harness.root, task, f"{task}_val.yaml")
        kwargs = cfg["lmms_eval_specific_kwargs"]["default"]
        to_text = getattr(harness, task).__dict__[f"{task}_doc_to_text"]
        check(name, samples, rows, to_text, process, kwargs, cfg, "validation", config)


def test_chartqa_and_ocrbench_parity(harness, tmp_path):
    cases = [("human_test", "12"), ("augmented_test", "0"), ("human_test", "50%"), ("human_test", "Yes")]
    rows = [
        {"type": t, "question": f"How many {i}?", "answer": a, "image": {"bytes": png(i), "path": ""}}
        for i, (t, a) in enumerate(cases)
    ]
    samples, _ = get_benchmark("chartqa").reader(write(tmp_path / "chart" / "test-00000-of-00001.parquet", rows))
    cfg = task_config(harness.root, "chartqa", "chartqa.yaml")
    process = lambda doc, out: harness.chartqa.chartqa_process_results(doc, [out])["relaxed_overall"]  # noqa: E731
    kwargs = cfg["lmms_eval_specific_kwargs"]["default"]
    check("chartqa", samples, rows, harness.chartqa.chartqa_doc_to_text, process, kwargs, cfg, "test")

    cases = [("IIIT5K", ["HELLO"]), ("HME100k", ["x^{2}+1"]), ("HME100k", ["\\frac{A}{2}"]), ("SROIE", ["1 May", "12"])]
    rows = [
        {"dataset": d, "question": " What is written? ", "question_type": "t", "answer": a, "image": {"bytes": png(i)}}
        for i, (d, a) in enumerate(cases)
    ]
    samples, _ = get_benchmark("ocrbench").reader(write(tmp_path / "ocr" / "test-00000-of-00001.parquet", rows))
    cfg = task_config(harness.root, "ocrbench", "ocrbench.yaml")
    process = lambda doc, out: harness.ocrbench.ocrbench_process_results(doc, [out])["ocrbench_accuracy"]["score"]  # noqa: E731
    kwargs = cfg["lmms_eval_specific_kwargs"]["default"]
    check("ocrbench", samples, rows, harness.ocrbench.ocrbench_doc_to_text, process, kwargs, cfg, "test")


def test_vstar_parity(harness, tmp_path):
    texts = [
        "What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) kevlar\n(D) leather\n"
        "Answer with the option's letter from the given choices directly.",
        "What is the colour of the car?\n(A) green\n(B) red",
        "Is the cup on the left or right of the dog? (A) left (B) right",
    ]
    categories = ["direct_attributes", "direct_attributes", "relative_position"]
    rows = [
        {"image": {"bytes": png(i), "path": None}, "text": t, "label": "ABA"[i], "category": c, "question_id": str(i)}
        for i, (t, c) in enumerate(zip(texts, categories, strict=True))
    ]
    samples, _ = get_benchmark("vstar").reader(write(tmp_path / "data" / "test-00000-of-00001.parquet", rows))
    cfg = task_config(harness.root, "vstar_bench", "vstar_bench.yaml")
    process = lambda doc, out: harness.vstar_bench.vstar_process_results(doc, [out])["vstar_overall_acc"]["score"]  # noqa: E731
    kwargs = cfg["lmms_eval_specific_kwargs"]["default"]
    check("vstar", samples, rows, harness.vstar_bench.vstar_doc_to_text, process, kwargs, cfg, "test")
    outs = ["A", "B", "C"]
    results = [
        harness.vstar_bench.vstar_process_results(d, [o])["vstar_overall_acc"] for d, o in zip(rows, outs, strict=True)
    ]
    ours = aggregate(
        get_benchmark("vstar"),
        list(samples),
        outs,
        [score(get_benchmark("vstar"), s, o) for s, o in zip(samples, outs, strict=True)],
    )
    assert ours["score"] == pytest.approx(harness.vstar_bench.vstar_aggregate_results(results))


def test_pope_parity(harness, tmp_path):
    rows = [r for c in ("adversarial", "random") for r in pope_rows(c)]
    samples, _ = get_benchmark("pope").reader(write(tmp_path / "data" / "test-00000-of-00001.parquet", rows))
    cfg = task_config(harness.root, "pope", "pope.yaml")
    process = lambda doc, out: harness.pope.pope_process_results(doc, [out])["pope_accuracy"]["score"]  # noqa: E731
    kwargs = cfg["lmms_eval_specific_kwargs"]["default"]
    check("pope", samples, rows, harness.pope.pope_doc_to_text, process, kwargs, cfg, "test")
    outs = ["Yes", "yes", "No", "maybe", "yes.", "no"]
    results = [
        harness.pope.pope_process_results(d, [o.strip()])["pope_f1_score"] for d, o in zip(rows, outs, strict=True)
    ]
    bench = get_benchmark("pope")
    ours = aggregate(bench, list(samples), outs, [score(bench, s, o) for s, o in zip(samples, outs, strict=True)])
    for key, fn in [
        ("f1", "f1_score"),
        ("accuracy", "accuracy"),
        ("precision", "precision"),
        ("recall", "recall"),
        ("yes_ratio", "yes_ratio"),
    ]:
        expected = getattr(harness.pope, f"pope_aggregate_{fn}")(results)
        assert ours[key] == pytest.approx(100 * expected), key
    assert ours["score"] == ours["f1"]


def test_hrbench_parity(harness, tmp_path):
    rows = hrbench_rows("4k", 6)
    rows[5]["D"] = None  # a question with three options
    rows[5]["answer"] = "C"
    samples, _ = get_benchmark("hrbench4k").reader(write(tmp_path / "hr_bench_4k.parquet", rows))
    cfg = task_config(harness.root, "hrbench", "hrbench4k.yaml")
    evaluator = harness.hrbench.hrbench_evaluator

    def process(doc, out):  # the harness's rule-based path; where it would call its GPT judge we score 0
        found = evaluator.can_infer(out, harness.hrbench.hrbench_doc_to_options(doc))
        return float(bool(found) and doc["answer"].lower() == found.lower())

    check(
        "hrbench4k",
        samples,
        rows,
        harness.hrbench.hrbench_doc_to_text,
        process,
        {},
        cfg,
        "hrbench_4k",
        cfg["dataset_name"],
    )
    bench = get_benchmark("hrbench4k")
    outs = ["A", "B", "C", "A", "red", "C"]
    scores = [score(bench, s, o) for s, o in zip(samples, outs, strict=True)]
    items = [
        {"index": d["index"], "cycle_category": d["cycle_category"], "gpt_score": sc}
        for d, sc in zip(rows, scores, strict=True)
    ]
    ours = aggregate(bench, list(samples), outs, scores)
    assert ours["score"] == pytest.approx(100 * harness.hrbench.hrbench_aggregate_results(items, None))
    single = [it for it, d in zip(items, rows, strict=True) if d["category"] == "single"]
    assert ours["fsp"] == pytest.approx(100 * harness.hrbench.hrbench_aggregate_results(single, None))
