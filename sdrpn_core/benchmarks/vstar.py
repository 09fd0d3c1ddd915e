"""V* Bench in the `lmms-lab/vstar-bench` Parquet layout: multiple choice with the options in the question text;
categories `direct_attributes` (Attr) and `relative_position` (Spatial)."""

from __future__ import annotations

import re

from sdrpn_core.benchmarks.base import LETTER_ANSWER, Benchmark, BenchmarkSample, collect, image_bytes, parquet_rows

_OPTION = re.compile(r"^\(?([A-D])[.)]\s*(.+)$", re.MULTILINE)


def read(url: str, **storage_options):
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
