"""The synthetic fine-grained split (`sdrpn_core.synthetic.write_split`): a manifest.jsonl with ground-truth boxes,
read like any benchmark, so the evaluation adds an oracle row."""

from __future__ import annotations

import json

import fsspec

from sdrpn_core import metrics
from sdrpn_core.benchmarks import register
from sdrpn_core.benchmarks.base import Benchmark, BenchmarkSample, collect


def read(url: str, **storage_options):
    base = url.rsplit("/", 1)[0]
    with fsspec.open(url, "r", **storage_options) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]

    def make(where, line):
        row = json.loads(line)
        image = row["image"] if "://" in row["image"] or row["image"].startswith("/") else f"{base}/{row['image']}"
        return BenchmarkSample(
            str(row["id"]),
            image,
            str(row["question"]),
            tuple(row["answers"]),
            box=tuple(row["box"]) if row.get("box") else None,
        )

    def rows():
        for i, line in enumerate(lines):
            yield f"line {i + 1}", line

    def safe(where, line):
        try:
            return make(where, line)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e}") from None

    return collect(rows, safe)


def exact_match(prediction: str, sample: BenchmarkSample) -> float:
    return metrics.exact_match(prediction, list(sample.answers))


BENCHMARK = register(
    Benchmark(
        "synthetic",
        read,
        exact_match,
        "",
        8,
        {"llava": 0.15},
        answer_format="free text; the model may echo the colour before the digit: the last word is scored",
    )
)
