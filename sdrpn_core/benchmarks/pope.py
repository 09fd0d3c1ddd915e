"""POPE (adversarial / popular / random) in the `lmms-lab/POPE` Parquet layout: yes/no, F1 and accuracy."""

from __future__ import annotations

from sdrpn_core.benchmarks.base import SHORT_ANSWER, Benchmark, BenchmarkSample, collect, image_bytes, parquet_rows


def read(url: str, **storage_options):
    def make(where, row):
        answer = str(row["answer"]).strip().lower()
        if answer not in ("yes", "no"):
            raise ValueError(f"answer {row['answer']!r} is not yes/no")
        return BenchmarkSample(
            str(row.get("question_id", where)),
            image_bytes(row["image"]) or b"",
            str(row["question"]),
            (answer,),
            category=str(row.get("category", "")),
        )

    return collect(parquet_rows(url, **storage_options), make)


BENCHMARK = Benchmark("pope", read, "pope", SHORT_ANSWER, 128, {"llava": 0.15, "qwen2_5_vl": 0.1}, "POPE")
