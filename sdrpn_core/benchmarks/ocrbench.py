"""OCRBench from `echo840/OCRBench` (`data/test-*.parquet`, 1,000 questions; `answer` a list; no id column, so the
id is the row's position). lmms-eval's `ocrbench`: the stripped question alone, 128 new tokens, containment
scoring with the handwritten-maths rule for the `HME100k` source; the total out of 1,000, shown as a percent."""

from __future__ import annotations

from sdrpn_core import metrics
from sdrpn_core.benchmarks import register
from sdrpn_core.benchmarks.base import Benchmark, BenchmarkSample, answers_of
from sdrpn_core.benchmarks.layout import image_value, read_split

SPLIT = "test"


def read(url: str, split: str = SPLIT, config: str = "", **storage_options):
    def make(where: str, row: dict, file: str) -> BenchmarkSample:
        return BenchmarkSample(
            where,
            image_value(row["image"], file),
            str(row["question"]),
            answers_of(row["answer"]),
            category=str(row.get("question_type") or ""),
            meta=(("dataset", str(row.get("dataset") or "")),),
        )

    return read_split(url, make, split, config, **storage_options)


def ocrbench_score(prediction: str, sample: BenchmarkSample) -> float:
    return metrics.ocrbench_score(prediction, sample.answers, sample.get("dataset"))


BENCHMARK = register(
    Benchmark(
        "ocrbench",
        read,
        ocrbench_score,
        "",
        128,
        {"llava": 0.05, "qwen2_5_vl": 0.05, "qwen2.5-vl-3b": 0.03},
        "OCRBench",
        question=lambda s: s.question.strip(),
        split=SPLIT,
        published_rows=1000,
    )
)
