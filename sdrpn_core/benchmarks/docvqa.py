"""DocVQA val and InfographicVQA val in the `lmms-lab/DocVQA` Parquet layout (ANLS)."""

from __future__ import annotations

from sdrpn_core.benchmarks.base import SHORT_ANSWER, Benchmark, BenchmarkSample, collect, image_bytes, parquet_rows


def read(url: str, **storage_options):
    def make(where, row):
        answers = tuple(str(a) for a in row["answers"])
        if not answers:
            raise ValueError("no answers")
        return BenchmarkSample(
            str(row["questionId"]),
            image_bytes(row["image"]) or b"",
            str(row["question"]),
            answers,
            category=",".join(row.get("question_types") or []),
        )

    return collect(parquet_rows(url, **storage_options), make)


DOCVQA = Benchmark("docvqa", read, "anls", SHORT_ANSWER, 32, {"llava": 0.1, "qwen2_5_vl": 0.1}, "DocVQA")
INFOVQA = Benchmark("infovqa", read, "anls", SHORT_ANSWER, 32, {"llava": 0.15, "qwen2_5_vl": 0.1}, "InfoVQA")
