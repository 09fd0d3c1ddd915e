"""POPE from `lmms-lab/POPE`: the repository holds the same 9,000 questions twice (`data/test-*` with a `category`
column, and `Full/{adversarial,popular,random}-*` as three splits); the evaluation files are read once, `data/`
first. `question_id` repeats across the three categories, so a sample's id is `<category>/<question_id>`.
lmms-eval's `pope`: the stripped question + the short-answer line, 128 new tokens, the whole lower-cased answer
must be "yes" or "no"; the paper reports F1 (the headline) and accuracy."""

from __future__ import annotations

from collections.abc import Sequence

from sdrpn_core import metrics
from sdrpn_core.benchmarks import register
from sdrpn_core.benchmarks.base import SHORT_ANSWER, Benchmark, BenchmarkSample
from sdrpn_core.benchmarks.layout import image_value, read_split

SPLIT = "test"
CATEGORIES = ("adversarial", "popular", "random")
# the `Full` config (three splits), when `data/` is absent: the repository, the `Full` folder, auto-converted
FULL = (
    tuple(f"Full/{c}-*.parquet" for c in CATEGORIES),
    tuple(f"{c}-*.parquet" for c in CATEGORIES),
    tuple(f"Full/{c}/*.parquet" for c in CATEGORIES),
)


def read(url: str, split: str = SPLIT, config: str = "", **storage_options):
    def make(where: str, row: dict, file: str) -> BenchmarkSample:
        answer = str(row["answer"]).strip().lower()
        if answer not in ("yes", "no"):
            raise ValueError(f"answer {row['answer']!r} is not yes/no")
        name = file.rsplit("/", 1)[-1]
        category = str(row.get("category") or next((c for c in CATEGORIES if name.startswith(c)), ""))
        return BenchmarkSample(
            f"{category}/{row['question_id']}" if category else str(row["question_id"]),
            image_value(row["image"], file),
            str(row["question"]),
            (answer,),
            category=category,
        )

    names = () if config else ((f"data/{split}-*.parquet",), *FULL)
    return read_split(url, make, split, config, names, **storage_options)


def exact_yes_no(prediction: str, sample: BenchmarkSample) -> float:
    return float(prediction.lower().strip() == sample.answers[0])


def pope_aggregate(
    samples: Sequence[BenchmarkSample], predictions: Sequence[str], scores: Sequence[float]
) -> dict[str, float]:
    m = metrics.pope_metrics(predictions, [s.answers[0] for s in samples])
    return {"score": 100 * m["f1"], **{k: 100 * v for k, v in m.items()}}


BENCHMARK = register(
    Benchmark(
        "pope",
        read,
        exact_yes_no,
        SHORT_ANSWER,
        128,
        {"llava": 0.15, "qwen2_5_vl": 0.1},
        "POPE",
        question=lambda s: s.question.strip(),
        split=SPLIT,
        published_rows=9000,
        groups={c: c for c in CATEGORIES},
        columns={"accuracy": "POPE Acc"},
        aggregate=pope_aggregate,
    )
)
