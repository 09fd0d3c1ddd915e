"""V* Bench: the original `test_questions.jsonl` + image folders (with per-image JSON of target boxes, which give
an oracle row), or the `lmms-lab/vstar-bench` Parquet layout. Multiple choice with the options in the question
text; categories `direct_attributes` (Attr) and `relative_position` (Spatial)."""

from __future__ import annotations

import re

from sdrpn_core.benchmarks.base import LETTER_ANSWER, Benchmark, BenchmarkSample, collect, image_bytes, parquet_rows

_OPTION = re.compile(r"^\(?([A-D])[.)]\s*(.+)$", re.MULTILINE)


def _read_jsonl(url: str, **storage_options):
    """Lines {question_id, image (relative), text (question + options + the letter instruction), category, label};
    `<image stem>.json` beside an image may hold its targets' boxes as [x, y, w, h] under "bbox"."""
    import json

    import fsspec

    base = url.rsplit("/", 1)[0]
    with fsspec.open(url, "r", **storage_options) as f:
        lines = [json.loads(line) for line in f.read().splitlines() if line.strip()]
    fs, _ = fsspec.core.url_to_fs(base, **storage_options)

    def make(where, row):
        text = str(row["text"]).replace(LETTER_ANSWER.strip(), "").strip()
        answer = str(row["label"]).strip().strip("()").upper()
        if len(answer) != 1 or answer not in "ABCD":
            raise ValueError(f"label {row['label']!r} is not an option letter")
        image = f"{base}/{row['image']}"
        box = None
        meta_path = image.rsplit(".", 1)[0] + ".json"
        if fs.exists(meta_path):
            with fs.open(meta_path, "r") as m:
                boxes = json.load(m).get("bbox") or []
            if boxes:
                box = (
                    min(b[0] for b in boxes),
                    min(b[1] for b in boxes),
                    max(b[0] + b[2] for b in boxes),
                    max(b[1] + b[3] for b in boxes),
                )
        options = tuple((m.group(1), m.group(2).strip()) for m in _OPTION.finditer(text))
        return BenchmarkSample(
            str(row.get("question_id", where)),
            image,
            text,
            (answer,),
            category=str(row.get("category", "")),
            options=options,
            box=tuple(int(v) for v in box) if box else None,
        )

    return collect(((f"line {i + 1}", r) for i, r in enumerate(lines)), make)


def read(url: str, **storage_options):
    if url.endswith(".jsonl"):
        return _read_jsonl(url, **storage_options)

    def make(where, row):
        question = str(row["question"])
        answer = str(row["answer"]).strip().strip("()").upper()
        if answer not in "ABCD" or len(answer) != 1:
            raise ValueError(f"answer {row['answer']!r} is not an option letter")
        options = tuple((m.group(1), m.group(2).strip()) for m in _OPTION.finditer(question))
        return BenchmarkSample(
            str(row.get("question_id", where)),
            image_bytes(row["image"]) or b"",
            question,
            (answer,),
            category=str(row.get("category", "")),
            options=options,
        )

    return collect(parquet_rows(url, **storage_options), make)


BENCHMARK = Benchmark("vstar", read, "choice_accuracy", LETTER_ANSWER, 16, {"llava": 0.1, "qwen2_5_vl": 0.075}, "V*")
