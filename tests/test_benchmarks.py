"""Every reader on small fixture files in the real layouts (made here), bad rows quarantined; scoring."""

from __future__ import annotations

import base64
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


def test_textvqa_official_json_and_lmms_parquet(tmp_path):
    (tmp_path / "train_images").mkdir()
    random_image(0).save(tmp_path / "train_images" / "abc.jpg")
    data = {
        "data": [
            {"question_id": 1, "image_id": "abc", "question": "what brand?", "answers": ["nike"] * 10},
            {"question_id": 2, "image_id": "abc", "question": "empty answers", "answers": []},
            {"question_id": 3, "image_id": "abc", "question": "  ", "answers": ["x"] * 10},
        ]
    }
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    samples, rejected = get_benchmark("textvqa").reader(str(tmp_path / "TextVQA_0.5.1_val.json"))
    assert [s.sample_id for s in samples] == ["1"] and samples[0].image.endswith("train_images/abc.jpg")
    assert load_image(samples[0].image).size == (40, 28)
    assert {r.reason.split(":")[0] for r in rejected} == {"data[1]", "data[2]"}
    assert "no answers" in rejected[0].reason and "empty question" in rejected[1].reason

    folder = tmp_path / "lmms"
    write_parquet(
        folder / "validation-00000-of-00001.parquet",
        [
            {
                "image_id": "x",
                "question_id": 7,
                "question": "what is written?",
                "question_tokens": ["what"],
                "image": img_struct(1),
                "image_width": 20,
                "image_height": 16,
                "answers": ["stop"] * 10,
                "image_classes": ["sign"],
                "set_name": "val",
                "ocr_tokens": ["STOP"],
            }
        ],
    )
    samples, rejected = get_benchmark("textvqa").reader(str(folder))
    assert samples[0].answers == ("stop",) * 10 and load_image(samples[0].image).size == (20, 16) and not rejected
    assert get_benchmark("textvqa").prompt(samples[0]) == (
        "what is written?\nAnswer the question using a single word or phrase."
    )  # no OCR tokens in the prompt


def test_docvqa_and_infovqa_parquet(tmp_path):
    path = write_parquet(
        tmp_path / "DocVQA" / "validation-0.parquet",
        [
            {
                "questionId": "q1",
                "question": "What is the date?",
                "question_types": ["layout"],
                "image": img_struct(),
                "docId": 1,
                "ucsf_document_id": "u",
                "ucsf_document_page_no": "1",
                "answers": ["1 May", "May 1"],
            },
            {
                "questionId": "q2",
                "question": "no image",
                "question_types": [],
                "image": {"bytes": b"", "path": None},
                "docId": 2,
                "ucsf_document_id": "u",
                "ucsf_document_page_no": "1",
                "answers": ["x"],
            },
        ],
    )
    for name in ("docvqa", "infovqa"):
        samples, rejected = get_benchmark(name).reader(path)
        assert [s.sample_id for s in samples] == ["q1"] and samples[0].answers == ("1 May", "May 1")
        assert rejected[0].sample_id == "q2" and "no image" in rejected[0].reason
    assert get_benchmark("docvqa").max_new_tokens == 32 and get_benchmark("docvqa").metric == "anls"


def test_chartqa_ocrbench_pope(tmp_path):
    chart = write_parquet(
        tmp_path / "chartqa.parquet",
        [{"type": "human_test", "question": "How many?", "answer": "12", "image": img_struct()}],
    )
    s, _ = get_benchmark("chartqa").reader(chart)
    assert s[0].answers == ("12",) and get_benchmark("chartqa").prompt(s[0]).endswith("with a single word.")
    ocr = write_parquet(
        tmp_path / "ocrbench.parquet",
        [
            {
                "dataset": "IIIT5K",
                "question": "what is written?",
                "question_type": "Regular Text Recognition",
                "answer": ["CAFE"],
                "image": img_struct(),
            }
        ],
    )
    s, _ = get_benchmark("ocrbench").reader(ocr)
    assert s[0].category == "Regular Text Recognition" and s[0].answers == ("CAFE",)
    write_parquet(
        tmp_path / "pope" / "test-0.parquet",
        [
            {
                "id": "0",
                "question_id": "p1",
                "question": "Is there a dog in the image?",
                "answer": "yes",
                "image_source": "coco",
                "image": img_struct(),
                "category": "adversarial",
            },
            {
                "id": "1",
                "question_id": "p2",
                "question": "Is there a cat?",
                "answer": "maybe",
                "image_source": "coco",
                "image": img_struct(),
                "category": "random",
            },
        ],
    )
    s, rejected = get_benchmark("pope").reader(str(tmp_path / "pope"))
    assert [x.sample_id for x in s] == ["p1"] and "not yes/no" in rejected[0].reason


def test_vstar_and_hrbench(tmp_path):
    vstar = write_parquet(
        tmp_path / "vstar.parquet",
        [
            {
                "question_id": "v1",
                "question": "What is the colour of the cup?\n(A) red\n(B) blue",
                "answer": "B",
                "category": "direct_attributes",
                "image": img_struct(),
            },
            {
                "question_id": "v2",
                "question": "Where?\n(A) left\n(B) right",
                "answer": "Z",
                "category": "relative_position",
                "image": img_struct(),
            },
        ],
    )
    s, rejected = get_benchmark("vstar").reader(vstar)
    assert s[0].options == (("A", "red"), ("B", "blue")) and s[0].answers == ("B",) and len(rejected) == 1
    assert get_benchmark("vstar").prompt(s[0]).endswith("from the given choices directly.")
    hr = write_parquet(
        tmp_path / "hr_bench_4k.parquet",
        [
            {
                "index": 3,
                "question": "What colour is the car?",
                "answer": "C",
                "category": "single",
                "A": "red",
                "B": "blue",
                "C": "green",
                "D": "white",
                "image": base64.b64encode(png()).decode(),
                "cycle_category": "0",
            }
        ],
    )
    s, _ = get_benchmark("hrbench4k").reader(hr)
    assert load_image(s[0].image).size == (20, 16)
    prompt = get_benchmark("hrbench4k").prompt(s[0])
    assert "A. red\nB. blue\nC. green\nD. white" in prompt


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


def test_vstar_original_jsonl_layout_with_target_boxes(tmp_path):
    (tmp_path / "direct_attributes").mkdir()
    random_image(0, (60, 40)).save(tmp_path / "direct_attributes" / "sa_1.jpg")
    (tmp_path / "direct_attributes" / "sa_1.json").write_text(
        json.dumps({"target_object": ["cup", "glove"], "bbox": [[10, 5, 8, 6], [30, 20, 4, 4]]})
    )
    line = {
        "question_id": 0,
        "image": "direct_attributes/sa_1.jpg",
        "category": "direct_attributes",
        "label": "A",
        "text": "What is the colour of the cup?\n(A) red\n(B) blue\n"
        "Answer with the option's letter from the given choices directly.",
    }
    (tmp_path / "test_questions.jsonl").write_text(json.dumps(line) + "\n")
    (s,), rejected = get_benchmark("vstar").reader(str(tmp_path / "test_questions.jsonl"))
    assert not rejected and s.box == (10, 5, 34, 24) and s.options == (("A", "red"), ("B", "blue"))
    assert get_benchmark("vstar").prompt(s).count("Answer with the option's letter") == 1


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
