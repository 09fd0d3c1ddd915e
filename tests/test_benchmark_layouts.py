"""Every benchmark read from the folders users download, built here from the published schemas (column names and
types, file names, configs and splits; small generated images): the evaluation split and nothing else, each row
once, the fields right, and the gold answer scoring 1 under the benchmark's metric."""

from __future__ import annotations

import base64
import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdrpn_core.benchmarks import BENCHMARKS, get_benchmark
from sdrpn_core.benchmarks.scoring import score
from sdrpn_core.data import load_image
from tests.conftest import random_image

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the `datasets` Image feature


def png(seed: int = 0, size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    random_image(seed, size).save(buf, format="PNG")
    return buf.getvalue()


def write(path, rows: list[dict], schema: pa.Schema | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=2)
    return str(path)


def gold_scores_one(name: str, samples, gold=lambda s: s.answers[0]) -> None:
    bench = get_benchmark(name)
    assert all(score(bench, s, gold(s)) == 1.0 for s in samples), name


# -- TextVQA --------------------------------------------------------------------------------------------------

TEXTVQA = pa.schema(
    [
        ("image_id", pa.string()),
        ("question_id", pa.int32()),
        ("question", pa.string()),
        ("question_tokens", pa.list_(pa.string())),
        ("image", IMAGE),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("flickr_original_url", pa.string()),
        ("flickr_300k_url", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("image_classes", pa.list_(pa.string())),
        ("set_name", pa.string()),
        ("ocr_tokens", pa.list_(pa.string())),
    ]
)


def textvqa_rows(split: str, ids, answers=True) -> list[dict]:
    return [
        {
            "image_id": f"img{i}",
            "question_id": i,
            "question": f"what BRAND is item {i}?",
            "question_tokens": ["what"],
            "image": {"bytes": png(i), "path": None},
            "image_width": 20,
            "image_height": 16,
            "flickr_original_url": "",
            "flickr_300k_url": "",
            "answers": [f"brand {i}"] * 10 if answers else None,
            "image_classes": [],
            "set_name": split,
            "ocr_tokens": ["BRAND"],
        }
        for i in ids
    ]


@pytest.fixture
def textvqa_repo(tmp_path):
    repo = tmp_path / "lmms-lab--textvqa"
    write(repo / "data" / "train-00000-of-00001.parquet", textvqa_rows("train", range(100, 104)), TEXTVQA)
    write(repo / "data" / "validation-00000-of-00002.parquet", textvqa_rows("val", range(0, 3)), TEXTVQA)
    write(repo / "data" / "validation-00001-of-00002.parquet", textvqa_rows("val", range(3, 5)), TEXTVQA)
    write(repo / "data" / "test-00000-of-00001.parquet", textvqa_rows("test", range(200, 203), False), TEXTVQA)
    (repo / "README.md").write_text("---\nconfigs: ...\n---\n")
    return repo


def test_textvqa_repository_reads_the_validation_split_only(textvqa_repo):
    bench = get_benchmark("textvqa")
    samples, rejected = bench.reader(str(textvqa_repo))
    assert [s.sample_id for s in samples] == [str(i) for i in range(5)] and not rejected
    assert samples[0].answers == ("brand 0",) * 10 and load_image(samples[0].image).size == (20, 16)
    assert bench.prompt(samples[0]) == "What brand is item 0?\nAnswer the question using a single word or phrase."
    gold_scores_one("textvqa", samples)
    # one split's files, a glob of its shards, the auto-converted layout: the same rows
    one, _ = bench.reader(str(textvqa_repo / "data" / "validation-00001-of-00002.parquet"))
    assert [s.sample_id for s in one] == ["3", "4"]
    glob, _ = bench.reader(str(textvqa_repo / "data" / "validation-*.parquet"))
    assert len(glob) == 5
    test_split, rejected = bench.reader(str(textvqa_repo), split="test")
    assert len(test_split) == 0 and len(rejected) == 3 and "no answers" in rejected[0].reason  # never scored


def test_auto_converted_parquet_and_image_paths_beside_the_file(tmp_path):
    folder = tmp_path / "refs-convert" / "default" / "validation"
    folder.mkdir(parents=True)
    random_image(7, (30, 10)).save(folder / "img7.png")
    rows = textvqa_rows("val", [7])
    rows[0]["image"] = {"bytes": None, "path": "img7.png"}  # a path alone, relative to the Parquet file
    write(folder / "0000.parquet", rows, TEXTVQA)
    (s,), rejected = get_benchmark("textvqa").reader(str(tmp_path / "refs-convert"))
    assert not rejected and load_image(s.image).size == (30, 10)


def test_textvqa_official_json_layout(tmp_path):
    (tmp_path / "train_images").mkdir()
    random_image(0).save(tmp_path / "train_images" / "abc.jpg")
    data = {"data": [{"question_id": 1, "image_id": "abc", "question": "what brand?", "answers": ["nike"] * 10}]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    (s,), rejected = get_benchmark("textvqa").reader(str(tmp_path / "TextVQA_0.5.1_val.json"))
    assert not rejected and s.image.endswith("train_images/abc.jpg") and load_image(s.image).size == (40, 28)


# -- DocVQA / InfographicVQA ---------------------------------------------------------------------------------------


def docvqa_rows(ids, answers=True) -> list[dict]:
    return [
        {
            "questionId": str(i),
            "question": f"What is the date on page {i}?",
            "question_types": ["layout"],
            "image": {"bytes": png(i), "path": None},
            "docId": i,
            "ucsf_document_id": "u",
            "ucsf_document_page_no": "1",
            "answers": [f"{i} May", f"May {i}"] if answers else None,
            "data_split": "val",
        }
        for i in ids
    ]


def infovqa_rows(ids, answers=True) -> list[dict]:
    return [
        {
            "questionId": str(i),
            "question": f"How many people in chart {i}?",
            "answers": [str(i * 10)] if answers else None,
            "answer_type": ["single span"],
            "image": {"bytes": png(i), "path": None},
            "image_url": "",
            "operation/reasoning": ["counting"],
            "ocr": "",
            "data_split": "val",
        }
        for i in ids
    ]


def test_docvqa_and_infovqa_side_by_side_in_one_repository(tmp_path):
    repo = tmp_path / "lmms-lab--DocVQA"
    write(repo / "DocVQA" / "validation-00000-of-00001.parquet", docvqa_rows(range(3)))
    write(repo / "DocVQA" / "test-00000-of-00001.parquet", docvqa_rows(range(50, 52), answers=False))
    write(repo / "DocVQA" / "train-00000-of-00001.parquet", docvqa_rows(range(90, 95)))
    write(repo / "InfographicVQA" / "validation-00000-of-00001.parquet", infovqa_rows(range(10, 12)))
    write(repo / "InfographicVQA" / "test-00000-of-00001.parquet", infovqa_rows(range(60, 61), answers=False))
    docs, rejected = get_benchmark("docvqa").reader(str(repo))
    assert [s.sample_id for s in docs] == ["0", "1", "2"] and not rejected
    infos, rejected = get_benchmark("infovqa").reader(str(repo))
    assert [s.sample_id for s in infos] == ["10", "11"] and not rejected
    assert get_benchmark("docvqa").max_new_tokens == 32
    gold_scores_one("docvqa", docs)
    gold_scores_one("infovqa", infos)
    assert [s.sample_id for s in get_benchmark("docvqa").reader(str(repo / "DocVQA"))[0]] == ["0", "1", "2"]
    tests, rejected = get_benchmark("docvqa").reader(str(repo), split="test")
    assert len(tests) == 0 and len(rejected) == 2  # answers null: never scored
    with pytest.raises(FileNotFoundError, match="config 'Nope'"):
        get_benchmark("docvqa").reader(str(repo), config="Nope")


# -- ChartQA, OCRBench ---------------------------------------------------------------------------------------------


def test_chartqa_and_ocrbench_repositories(tmp_path):
    chart = tmp_path / "ChartQA"
    rows = [
        {"type": kind, "question": f"How many in {i}?", "answer": str(12 + i), "image": {"bytes": png(i), "path": ""}}
        for i, kind in enumerate(["human_test", "augmented_test", "human_test"])
    ]
    write(chart / "data" / "test-00000-of-00001.parquet", rows)
    samples, rejected = get_benchmark("chartqa").reader(str(chart))
    assert len(samples) == 3 and not rejected and samples[1].category == "augmented_test"
    assert get_benchmark("chartqa").prompt(samples[0]) == "How many in 0?\nAnswer the question with a single word."
    gold_scores_one("chartqa", samples)

    ocr = tmp_path / "OCRBench"
    rows = [
        {
            "dataset": "HME100k" if i == 1 else "IIIT5K",
            "question": " what is written? ",
            "question_type": "Handwritten Mathematical Expression Recognition"
            if i == 1
            else "Regular Text Recognition",
            "answer": ["x^{2}+1"] if i == 1 else ["CAFE", "Café"],
            "image": {"bytes": png(i), "path": ""},
        }
        for i in range(3)
    ]
    write(ocr / "data" / "test-00000-of-00001.parquet", rows)
    samples, _ = get_benchmark("ocrbench").reader(str(ocr))
    assert [s.get("dataset") for s in samples] == ["IIIT5K", "HME100k", "IIIT5K"]
    assert get_benchmark("ocrbench").prompt(samples[0]) == "what is written?"
    gold_scores_one("ocrbench", samples)
    assert score(get_benchmark("ocrbench"), samples[1], "x ^ { 2 } + 1") == 1.0


# -- POPE ----------------------------------------------------------------------------------------------------------


def pope_rows(category: str) -> list[dict]:
    return [
        {
            "id": f"{category}{i}",
            "question_id": str(i),  # repeats across the three categories
            "question": f" Is there a {category} dog {i}? ",
            "answer": "yes" if i % 2 else "no",
            "image_source": f"COCO_val2014_{i}.jpg",
            "image": {"bytes": png(i), "path": None},
            "category": category,
        }
        for i in range(3)
    ]


def test_pope_reads_the_evaluation_files_once_and_keeps_categories_apart(tmp_path):
    repo = tmp_path / "POPE"
    every = [r for c in ("adversarial", "popular", "random") for r in pope_rows(c)]
    write(repo / "data" / "test-00000-of-00001.parquet", every)
    for c in ("adversarial", "popular", "random"):  # the same questions again, as the `Full` config
        write(repo / "Full" / f"{c}-00000-of-00001.parquet", pope_rows(c))
    samples, rejected = get_benchmark("pope").reader(str(repo))
    assert len(samples) == 9 and not rejected
    assert len({s.sample_id for s in samples}) == 9 and samples[0].sample_id == "adversarial/0"
    assert get_benchmark("pope").prompt(samples[0]).startswith("Is there a adversarial dog 0?\nAnswer")
    gold_scores_one("pope", samples)
    full, _ = get_benchmark("pope").reader(str(repo / "Full"))
    assert sorted(s.sample_id for s in full) == sorted(s.sample_id for s in samples)


# -- V* ------------------------------------------------------------------------------------------------------------

VSTAR_TEXT = "What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) kevlar\n(D) leather"
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def test_vstar_original_release_with_target_boxes(tmp_path):
    for folder, stem in (("direct_attributes", "sa_1"), ("relative_position", "sa_2")):
        (tmp_path / folder).mkdir()
        random_image(0, (60, 40)).save(tmp_path / folder / f"{stem}.jpg")
    (tmp_path / "direct_attributes" / "sa_1.json").write_text(
        json.dumps({"target_object": ["glove"], "bbox": [[10, 5, 8, 6], [30, 20, 4, 4]], "options": ["rubber"]})
    )
    lines = [
        {"image": "direct_attributes/sa_1.jpg", "text": f"{VSTAR_TEXT}\n{INSTRUCTION}", "category": "direct_attributes",
         "question_id": "0", "label": "A"},
        {"image": "relative_position/sa_2.jpg", "text": f"Is the cup left of the dog?\n(A) yes\n(B) no\n{INSTRUCTION}",
         "category": "relative_position", "question_id": "1", "label": "B"},
    ]  # fmt: skip
    (tmp_path / "test_questions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "OCR").mkdir()  # not part of the benchmark
    samples, rejected = get_benchmark("vstar").reader(str(tmp_path))
    assert not rejected and [s.sample_id for s in samples] == ["0", "1"]
    assert samples[0].box == (10, 5, 34, 24) and samples[1].box is None
    assert samples[0].options[3] == ("D", "leather") and load_image(samples[0].image).size == (60, 40)
    # the harness's prompt: options as "L. text" lines; the dataset's own instruction stays with the last option
    assert get_benchmark("vstar").prompt(samples[0]) == (
        f"What is the material of the glove?\nA. rubber\nB. cotton\nC. kevlar\nD. leather\n{INSTRUCTION}\n{INSTRUCTION}"
    )
    gold_scores_one("vstar", samples)


def test_vstar_lmms_lab_parquet(tmp_path):
    rows = [
        {"image": {"bytes": png(i), "path": None}, "text": VSTAR_TEXT, "label": "ABCD"[i], "category": c,
         "question_id": str(i)}
        for i, c in enumerate(["direct_attributes", "relative_position"])
    ]  # fmt: skip
    write(tmp_path / "vstar-bench" / "data" / "test-00000-of-00001.parquet", rows)
    samples, _ = get_benchmark("vstar").reader(str(tmp_path / "vstar-bench"))
    assert [s.answers for s in samples] == [("A",), ("B",)] and samples[1].category == "relative_position"
    assert get_benchmark("vstar").prompt(samples[0]).endswith(f"D. leather\n{INSTRUCTION}")
    gold_scores_one("vstar", samples)


# -- HR-Bench ------------------------------------------------------------------------------------------------------


def hrbench_rows(k: str, n: int = 3) -> list[dict]:
    return [
        {
            "index": i,
            "question": f"What colour is car {i} ({k})?",
            "answer": "ABCD"[i % 4],
            "category": "single" if i % 2 == 0 else "cross",
            "A": "red",
            "B": "blue",
            "C": "green",
            "D": "white",
            "cycle_category": str(i // 2),
            "image": base64.b64encode(png(i)).decode(),
        }
        for i in range(n)
    ]


def write_tsv(path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_hrbench_folder_reads_one_resolution_and_the_vlmevalkit_tsv(tmp_path):
    repo = tmp_path / "HR-Bench"
    write(repo / "hr_bench_4k.parquet", hrbench_rows("4k", 3))
    write(repo / "hr_bench_8k.parquet", hrbench_rows("8k", 2))
    four, rejected = get_benchmark("hrbench4k").reader(str(repo))
    eight, _ = get_benchmark("hrbench8k").reader(str(repo))
    assert len(four) == 3 and len(eight) == 2 and not rejected
    assert all("(4k)" in s.question for s in four) and all("(8k)" in s.question for s in eight)
    assert load_image(four[0].image).size == (20, 16) and four[1].get("cycle_category") == "0"
    assert get_benchmark("hrbench4k").prompt(four[0]) == (
        "What colour is car 0 (4k)?\nA. red\nB. blue\nC. green\nD. white\nAnswer the option letter directly."
    )
    gold_scores_one("hrbench4k", four)
    gold_scores_one("hrbench4k", four, gold=lambda s: dict(s.options)[s.answers[0]])  # the option's text too
    tsv = write_tsv(tmp_path / "HRBench4K.tsv", hrbench_rows("4k", 3))
    from_tsv, _ = get_benchmark("hrbench4k").reader(tsv)
    assert [s.sample_id for s in from_tsv] == [s.sample_id for s in four]
    assert [s.image for s in from_tsv] == [s.image for s in four]
    (tmp_path / "HRBench4K.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match=r"unknown format \(expected one of .parquet"):
        get_benchmark("hrbench4k").reader(str(tmp_path / "HRBench4K.xlsx"))


def test_a_folder_without_the_split_names_what_is_there(tmp_path):
    write(tmp_path / "data" / "train-00000-of-00001.parquet", textvqa_rows("train", [1]), TEXTVQA)
    with pytest.raises(FileNotFoundError, match=r"no files for split 'validation'.*train-00000"):
        get_benchmark("textvqa").reader(str(tmp_path))


def test_every_benchmark_declares_what_the_paper_evaluates():
    for name, bench in BENCHMARKS.items():
        if name in ("mix665k", "synthetic"):
            continue
        assert bench.split and bench.published_rows and bench.paper_key, name
        assert bench.thresholds.get("llava") and bench.thresholds.get("qwen2_5_vl"), name
    assert get_benchmark("vstar").threshold("qwen2_5_vl", model="qwen2.5-vl-7b", tokens=3072) == 0.05
    assert get_benchmark("vstar").threshold("qwen2_5_vl", model="qwen2.5-vl-7b", tokens=576) == 0.075
    assert get_benchmark("vstar").threshold("qwen2_5_vl", model="qwen2.5-vl-3b", tokens=576) == 0.175
    assert get_benchmark("hrbench8k").threshold("qwen2_5_vl", model="qwen2.5-vl-3b", tokens=4096) == 0.05


# -- the samples stage on a benchmark ------------------------------------------------------------------------------


def test_samples_stage_warns_when_the_count_is_not_the_published_size(tmp_path, store):
    from stages.common import read_manifest
    from stages.config import DatasetSpec
    from stages.data import build_manifest

    repo = tmp_path / "textvqa"
    write(repo / "data" / "validation-00000-of-00001.parquet", textvqa_rows("val", range(4)), TEXTVQA)
    ref = build_manifest(DatasetSpec(kind="benchmark", benchmark="textvqa", path=str(repo)), store)
    assert ref.rows == 4 and len(ref.warnings) == 1
    assert "read 4 rows" in ref.warnings[0] and "published validation split has 5000" in ref.warnings[0]
    rows = read_manifest(ref, store)
    assert rows[0]["image"].startswith(store.url("datasets", "images")) and rows[0]["answers"] == ["brand 0"] * 10
    limited = build_manifest(DatasetSpec(kind="benchmark", benchmark="textvqa", path=str(repo), limit=2), store)
    assert limited.rows == 2 and not limited.warnings  # a slice on purpose is not a mismatch


def test_a_benchmark_with_every_row_rejected_writes_its_quarantine(tmp_path, store):
    from stages.config import DatasetSpec
    from stages.data import build_manifest

    repo = tmp_path / "textvqa"
    write(repo / "data" / "test-00000-of-00001.parquet", textvqa_rows("test", range(3), answers=False), TEXTVQA)
    spec = DatasetSpec(kind="benchmark", benchmark="textvqa", path=str(repo), split="test")
    with pytest.raises(ValueError, match=r"no usable rows \(3 rejected.*no answers"):
        build_manifest(spec, store)
    assert store.fs.glob(store.url("datasets-rejected", "*", "quarantine.parquet").split("://", 1)[-1])


def test_the_eval_report_carries_the_size_warning_and_the_harness_difference():
    from stages.refs import DatasetRef
    from stages.report import eval_report_markdown as report_markdown

    dataset = DatasetRef("fp", "u", 3, "hrbench4k", "hrbench4k", 1, ("hrbench4k: read 3 rows … published 800",))
    scores = [{"benchmark": "hrbench4k", "method": "baseline", "score": 50.0, "fsp": 40.0, "fcp": 60.0,
               "samples": 3.0, "samples_per_s": 2.0, "relative_throughput": 1.0}]  # fmt: skip
    md = report_markdown(get_benchmark("hrbench4k"), dataset, scores)
    assert "> **Warning:** hrbench4k: read 3 rows … published 800" in md
    assert "GPT judge" in md and "| baseline | 50.0 | 40.0 | 60.0 | 2.00 | 1.00× |" in md
