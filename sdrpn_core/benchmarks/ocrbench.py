"""OCRBench in the `echo840/OCRBench` Parquet layout (containment score, reported as %)."""

from __future__ import annotations

from sdrpn_core.benchmarks.base import Benchmark, BenchmarkSample, collect, image_bytes, parquet_rows


def read(url: str, **storage_options):
    def make(where, row):
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        if not answers:
            raise ValueError("no answers")
        return BenchmarkSample(
            where,
            image_bytes(row["image"]) or b"",
            str(row["question"]),
            tuple(str(a) for a in answers),
            category=str(row.get("question_type", "")),
        )

    return collect(parquet_rows(url, **storage_options), make)


BENCHMARK = Benchmark("ocrbench", read, "ocrbench_score", "", 128, {"llava": 0.05, "qwen2_5_vl": 0.05}, "OCRBench")
