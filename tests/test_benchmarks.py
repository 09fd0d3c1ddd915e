"""Bad rows quarantined with their location; the training-set reader; scoring and aggregates; the results table.
(The published layouts of every benchmark: test_benchmark_layouts.py.)"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdrpn_core.benchmarks import BENCHMARKS, get_benchmark
from sdrpn_core.benchmarks.scoring import aggregate, score
from sdrpn_core.data import load_image
from tests.conftest import random_image


def png(seed=0, size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    random_image(seed, size).save(buf, format="PNG")
    return buf.getvalue()


def img_struct(seed=0):
    return {"bytes": png(seed), "path": f"{seed}.png"}


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_bad_rows_are_quarantined_with_their_location(tmp_path):
    good = {"questionId": "q1", "question": "What is the date?", "image": img_struct(), "answers": ["1 May"]}
    rows = [
        good,
        {**good, "questionId": "q2", "image": {"bytes": b"", "path": None}},
        {**good, "questionId": "q3", "answers": None},
        {**good, "questionId": "q4", "question": "  "},
    ]
    path = write_parquet(tmp_path / "DocVQA" / "validation-00000-of-00001.parquet", rows)
    samples, rejected = get_benchmark("docvqa").reader(path)
    assert [s.sample_id for s in samples] == ["q1"]
    assert [(r.sample_id, r.reason.split(": ", 1)[1].split(" (")[0]) for r in rejected] == [
        ("q2", "no image"),
        ("q3", "bad row"),
        ("q4", "empty question"),
    ]
    assert rejected[0].reason.startswith("validation-00000-of-00001.parquet:1") and "no answers" in rejected[1].reason


def test_mix665k_first_turns_and_seeded_subset(tmp_path):
    entries = [
        {
            "id": f"g{i}",
            "image": f"gqa/images/{i}.jpg",
            "conversations": [
                {
                    "from": "human",
                    "value": "<image>\nIs the man left? Answer the question using a single word or phrase.",
                },
                {"from": "gpt", "value": "Yes"},
                {"from": "human", "value": "second turn"},
                {"from": "gpt", "value": "x"},
            ],
        }
        for i in range(30)
    ]
    entries += [
        {
            "id": "coco1",
            "image": "coco/train2017/1.jpg",
            "conversations": [{"from": "human", "value": "<image>\nDescribe"}, {"from": "gpt", "value": "..."}],
        },
        {"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {
            "id": "o1",
            "image": "ocr_vqa/images/1.jpg",
            "conversations": [
                {"from": "human", "value": "Who wrote this book?\n<image>"},
                {"from": "gpt", "value": "Ann"},
            ],
        },
    ]
    (tmp_path / "llava_v1_5_mix665k.json").write_text(json.dumps(entries))
    url = str(tmp_path / "llava_v1_5_mix665k.json")
    samples, _ = get_benchmark("mix665k").reader(url)
    assert len(samples) == 31  # GQA + OCR-VQA with images only
    assert samples[0].question == "Is the man left? Answer the question using a single word or phrase."
    assert samples[-1].question == "Who wrote this book?" and samples[-1].category == "ocr_vqa"
    sub1, _ = get_benchmark("mix665k").reader(url, limit=10)
    sub2, _ = get_benchmark("mix665k").reader(url, limit=10)
    assert [s.sample_id for s in sub1] == [s.sample_id for s in sub2] and len(sub1) == 10
    assert [s.sample_id for s in sub1] != [s.sample_id for s in samples[:10]]  # shuffled, seed 42
    gqa, _ = get_benchmark("mix665k").reader(url, config="gqa")
    ocr, _ = get_benchmark("mix665k").reader(url, config="ocr_vqa")
    assert len(gqa) == 30 and {s.category for s in gqa} == {"gqa"} and [s.sample_id for s in ocr] == ["o1"]
    with pytest.raises(ValueError, match="mix665k config 'coco'"):
        get_benchmark("mix665k").reader(url, config="coco")
    # `limit` is of the merged list, as the authors' subset: a source's share of it, the two shares that subset
    parts = [get_benchmark("mix665k").reader(url, config=c, limit=10)[0] for c in ("gqa", "ocr_vqa")]
    assert sorted(s.sample_id for p in parts for s in p) == sorted(s.sample_id for s in sub1)
    assert len(parts[0]) == sum(s.category == "gqa" for s in sub1)


def test_a_single_qwen_mix665k_source_is_labelled_by_source_as_the_authors_do(tmp_path):
    from stages.config import PipelineConfig

    (tmp_path / "mix.json").write_text("[]")
    raw = {
        "model": {"source": "tiny", "tiny": {"family": "qwen2_5_vl"}},
        "teacher": {"preset": "qwen2.5-vl-7b/natural", "overrides": {"grounding": {16: [1]}}},
        "train_data": {"kind": "benchmark", "benchmark": "mix665k", "path": str(tmp_path / "mix.json"), "limit": 10},
    }
    sources = PipelineConfig.model_validate(raw).sources()
    assert [(n, d.config, d.limit, t.preset) for n, d, t in sources] == [
        ("gqa", "gqa", 10, "qwen2.5-vl-7b/natural"),
        ("ocr_vqa", "ocr_vqa", 10, "qwen2.5-vl-7b/textual"),
    ]
    assert sources[0][2].overrides == {"grounding": {16: (1,)}} and sources[1][2].overrides == {}  # their own heads
    one = {**raw, "train_data": {**raw["train_data"], "config": "gqa"}}
    assert [n for n, _, _ in PipelineConfig.model_validate(one).sources()] == ["train"]  # a chosen source: as given
    llava = {**raw, "model": {"source": "tiny"}, "teacher": {"preset": "llava-1.5-7b"}}
    assert [n for n, _, _ in PipelineConfig.model_validate(llava).sources()] == ["train"]  # one head set: one source


def test_synthetic_split_reads_with_boxes(tmp_path):
    from sdrpn_core.synthetic import make_split, write_split

    manifest = write_split(tmp_path / "heldout", make_split(3, 5, canvas=96))
    samples, rejected = get_benchmark("synthetic").reader(str(manifest))
    assert len(samples) == 3 and not rejected and samples[0].box is not None
    assert load_image(samples[0].image).size == (96, 96)


def test_scoring_and_aggregates():
    from sdrpn_core.benchmarks.base import BenchmarkSample

    vstar = get_benchmark("vstar")
    samples = [
        BenchmarkSample("1", "x", "q", ("A",), "direct_attributes"),
        BenchmarkSample("2", "x", "q", ("B",), "relative_position"),
        BenchmarkSample("3", "x", "q", ("C",), "relative_position"),
    ]
    preds = ["A", "(B)", "D"]
    scores = [score(vstar, s, p) for s, p in zip(samples, preds, strict=True)]
    agg = aggregate(vstar, samples, preds, scores)
    assert scores == [1.0, 1.0, 0.0] and agg["attr"] == 100.0 and agg["spatial"] == 50.0
    assert agg["score"] == pytest.approx(200 / 3)
    pope = get_benchmark("pope")
    ps = [BenchmarkSample(str(i), "x", "q", (a,)) for i, a in enumerate(["yes", "no", "yes", "no"])]
    preds = ["Yes", "No", "no", "yes"]
    agg = aggregate(pope, ps, preds, [score(pope, s, p) for s, p in zip(ps, preds, strict=True)])
    assert agg["accuracy"] == 50.0 and agg["f1"] == pytest.approx(50.0) and agg["score"] == agg["f1"]
    assert set(BENCHMARKS) >= {
        "textvqa",
        "docvqa",
        "infovqa",
        "chartqa",
        "ocrbench",
        "vstar",
        "pope",
        "hrbench4k",
        "hrbench8k",
        "mix665k",
    }
    assert np.isclose(get_benchmark("ocrbench").threshold("llava"), 0.05)
    with pytest.raises(KeyError, match="unknown benchmark"):
        get_benchmark("mmmu")


def test_results_table_has_the_papers_rows_beside_ours():
    from stages.refs import EvalRef
    from stages.report import results_markdown, results_rows

    refs = [
        EvalRef(
            "a",
            "u",
            (
                {"benchmark": "textvqa", "method": "baseline", "score": 45.0, "relative_throughput": 1.0},
                {"benchmark": "textvqa", "method": "sdrpn", "score": 57.5, "relative_throughput": 0.6},
            ),
            "textvqa",
        ),
        EvalRef(
            "b",
            "u",
            (
                {
                    "benchmark": "vstar",
                    "method": "baseline",
                    "score": 50.0,
                    "attr": 48.0,
                    "spatial": 53.0,
                    "relative_throughput": 1.0,
                },
                {
                    "benchmark": "vstar",
                    "method": "sdrpn",
                    "score": 66.0,
                    "attr": 66.0,
                    "spatial": 66.0,
                    "relative_throughput": 0.7,
                },
            ),
            "vstar",
        ),
    ]
    rows = results_rows(refs)
    assert rows[1] == {
        "method": "sdrpn",
        "TextVQA": 57.5,
        "V*": 66.0,
        "V* Attr": 66.0,
        "V* Spatial": 66.0,
        "Thru.": 0.65,
    }
    md = results_markdown(rows, "llava-1.5-7b")
    assert "| +SD-RPN (ours) | 0.65× | 57.5 | 66.0 | 66.0 | 66.0 |" in md
    assert "| +SD-RPN (paper, llava-1.5-7b) | 0.62× | 58.7 | 67.5 | 67.8 | 67.1 |" in md
    assert "no numbers for this model" in results_markdown(rows, None)
    as_theirs = {"image_token_budget": 576, "dtype": "torch.float16", "kv_reuse": False}
    md = results_markdown(rows, "llava-1.5-7b", {"TextVQA": as_theirs, "V*": as_theirs})
    assert "†" not in md and "576 image tokens" in md  # the same protocol: nothing marked
    ours = {"image_token_budget": 576, "dtype": "torch.bfloat16", "kv_reuse": True}
    md = results_markdown(rows, "qwen2.5-vl-7b", {"TextVQA": {**ours}, "V*": {**ours}})
    assert "| +SD-RPN (paper, qwen2.5-vl-7b) | 0.57× | 83.5† | 89.5† | – | – |" in md
    assert "† V*: the paper's cell is at 576–3,072 image tokens (ours 576); pass 2 recomputed (ours: KV reuse)" in md
    assert "† TextVQA: the paper's cell is at pass 2 recomputed (ours: KV reuse)" in md
    assert "protocol preset `fast`" in md  # a protocol.json without the key: a run from before presets
    qwen = {"image_token_budget": 3072, "dtype": "bfloat16", "kv_reuse": False, "protocol_preset": "paper"}
    md = results_markdown(
        rows, "qwen2.5-vl-7b", {"V*": {**qwen, "inputs": {"min_pixels": 451584, "max_pixels": 2408448}}}
    )
    assert "89.5 |" in md and "89.5†" not in md and "protocol preset `paper`" in md  # V* at their pixel range
    md = results_markdown(
        rows, "qwen2.5-vl-7b", {"V*": {**qwen, "inputs": {"min_pixels": 1003520, "max_pixels": 2408448}}}
    )
    assert "† V*: the paper's cell is at 576–3,072 image tokens (ours 1,280–3,072)" in md
