"""HR-Bench 4K / 8K in the `DreamMr/HR-Bench` Parquet layout: base64 images, options in columns A–D, category
`single` (FSP) or `cross` (FCP). Letters are parsed locally (no GPT judge)."""

from __future__ import annotations

from sdrpn_core.benchmarks.base import LETTER_ANSWER, Benchmark, BenchmarkSample, collect, image_bytes, parquet_rows


def read(url: str, **storage_options):
    def make(where, row):
        answer = str(row["answer"]).strip().upper()
        options = tuple((k, str(row[k])) for k in "ABCD" if row.get(k) is not None)
        if answer not in dict(options):
            raise ValueError(f"answer {row['answer']!r} is not one of the options")
        return BenchmarkSample(
            str(row.get("index", where)),
            image_bytes(row["image"]) or b"",
            str(row["question"]),
            (answer,),
            category=str(row.get("category", "")),
            options=options,
        )

    return collect(parquet_rows(url, **storage_options), make)


HRBENCH_4K = Benchmark(
    "hrbench4k", read, "choice_accuracy", LETTER_ANSWER, 16, {"llava": 0.1, "qwen2_5_vl": 0.03}, "HR4K"
)
HRBENCH_8K = Benchmark(
    "hrbench8k", read, "choice_accuracy", LETTER_ANSWER, 16, {"llava": 0.1, "qwen2_5_vl": 0.03}, "HR8K"
)
