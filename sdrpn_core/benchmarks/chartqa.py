"""ChartQA test from `lmms-lab/ChartQA` (`data/test-*.parquet`, 2,500 questions, half `human_test`, half
`augmented_test`). lmms-eval's `chartqa`: "Answer the question with a single word.", 16 new tokens, relaxed
accuracy, with the human / augmented splits as sub-scores. Rows have no id: the id is the row's position."""

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
            category=str(row.get("type") or ""),
        )

    return read_split(url, make, split, config, **storage_options)


def relaxed_accuracy(prediction: str, sample: BenchmarkSample) -> float:
    return metrics.relaxed_accuracy(prediction, sample.answers)


BENCHMARK = register(
    Benchmark(
        "chartqa",
        read,
        relaxed_accuracy,
        "\nAnswer the question with a single word.",
        16,
        {"llava": 0.15, "qwen2_5_vl": 0.1},
        "ChartQA",
        split=SPLIT,
        published_rows=2500,
        groups={"human": "human_test", "augmented": "augmented_test"},
    )
)
