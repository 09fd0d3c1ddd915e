"""V* Bench: the original release (`test_questions.jsonl` + `direct_attributes/`, `relative_position/` with a
`<image>.json` of target boxes beside each image, which gives an oracle row) or `lmms-lab/vstar-bench`
(`data/test-*.parquet`; columns text, label, category, question_id, image). 191 questions. lmms-eval's
`vstar_bench`: the `(A) x` options rewritten as `A. x` lines, the letter instruction appended, 16 new tokens,
its letter extraction; the headline is accuracy pooled over all questions, Attr and Spatial are sub-scores."""

from __future__ import annotations

import json
import re

import fsspec

from sdrpn_core import metrics
from sdrpn_core.benchmarks import register
from sdrpn_core.benchmarks.base import LETTER_ANSWER, Benchmark, BenchmarkSample
from sdrpn_core.benchmarks.layout import image_value, read_split

SPLIT = "test"
_OPTIONS = re.compile(r"\([A-D]\)\s*([^()]+?)(?=\s*\([A-D]\)|$)")


def question_text(sample: BenchmarkSample) -> str:
    """The harness's doc_to_text: the question before "(A)", then one "L. option" line per option. (When the
    dataset text ends with the letter instruction, it stays attached to the last option, as there.)"""
    text = sample.question
    found = _OPTIONS.findall(text)
    if not found:
        return text
    return (
        text.split("(A)")[0].strip()
        + "\n"
        + "\n".join(f"{k}. {o.strip()}" for k, o in zip("ABCD", found, strict=False))
    )


def _box(fs, image: str) -> tuple[int, int, int, int] | None:
    """The union of the targets' [x, y, w, h] boxes from `<image stem>.json`, if there is one."""
    meta = image.rsplit(".", 1)[0] + ".json"
    if not fs.exists(meta):
        return None
    with fs.open(meta, "r") as m:
        boxes = json.load(m).get("bbox") or []
    if not boxes:
        return None
    return (
        int(min(b[0] for b in boxes)),
        int(min(b[1] for b in boxes)),
        int(max(b[0] + b[2] for b in boxes)),
        int(max(b[1] + b[3] for b in boxes)),
    )


def read(url: str, split: str = SPLIT, config: str = "", **storage_options):
    fs, _ = fsspec.core.url_to_fs(url, **storage_options)

    def make(where: str, row: dict, file: str) -> BenchmarkSample:
        if "_error" in row:
            raise ValueError(row["_error"])
        label = str(row["label"]).strip().strip("()").upper()
        if len(label) != 1 or label not in "ABCD":
            raise ValueError(f"label {row['label']!r} is not an option letter")
        text = str(row["text"])
        found = _OPTIONS.findall(text)
        options = tuple((k, o.replace(LETTER_ANSWER.strip(), "").strip()) for k, o in zip("ABCD", found, strict=False))
        if isinstance(row["image"], str) and not row["image"].startswith(("/", "data:")) and file.endswith(".jsonl"):
            image: str | bytes = f"{file.rsplit('/', 1)[0]}/{row['image']}"
            box = _box(fs, fsspec.core.url_to_fs(image, **storage_options)[1])
        else:
            image, box = image_value(row["image"], file), None
        return BenchmarkSample(
            str(row.get("question_id", where)),
            image,
            text,
            (label,),
            category=str(row.get("category") or ""),
            options=options,
            box=box,
        )

    return read_split(url, make, split, config, (("test_questions.jsonl",),), **storage_options)


def letter_accuracy(prediction: str, sample: BenchmarkSample) -> float:
    return metrics.choice_accuracy(prediction, sample.answers[0])


BENCHMARK = register(
    Benchmark(
        "vstar",
        read,
        letter_accuracy,
        LETTER_ANSWER,
        16,
        {
            "llava": 0.1,
            "qwen2_5_vl": 0.075,
            "qwen2.5-vl-7b@3072": 0.05,
            "qwen2.5-vl-3b": 0.175,
            "qwen2.5-vl-3b@4096": 0.075,
        },
        "V*",
        question=question_text,
        split=SPLIT,
        published_rows=191,
        groups={"attr": "direct_attributes", "spatial": "relative_position"},
        columns={"attr": "V* Attr", "spatial": "V* Spatial"},
    )
)
