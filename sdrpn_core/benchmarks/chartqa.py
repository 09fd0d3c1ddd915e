"""ChartQA test in the `lmms-lab/ChartQA` Parquet layout (relaxed accuracy)."""

from __future__ import annotations

from sdrpn_core.benchmarks.base import Benchmark, BenchmarkSample, collect, image_bytes, parquet_rows


def read(url: str, **storage_options):
    def make(where, row):
        return BenchmarkSample(
            where,
            image_bytes(row["image"]) or b"",
            str(row["question"]),
            (str(row["answer"]),),
            category=str(row.get("type", "")),
        )

    return collect(parquet_rows(url, **storage_options), make)


BENCHMARK = Benchmark(
    "chartqa",
    read,
    "relaxed_accuracy",
    "\nAnswer the question with a single word.",
    16,
    {"llava": 0.15, "qwen2_5_vl": 0.1},
    "ChartQA",
)
