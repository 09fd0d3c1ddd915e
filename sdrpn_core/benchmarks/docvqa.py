"""DocVQA val and InfographicVQA val from `lmms-lab/DocVQA`, whose two configs lie side by side (`DocVQA/`,
`InfographicVQA/`): each benchmark reads only its own config's validation split (5,349 / 2,801 questions); test
rows have no answers and are never scored. ANLS, 32 new tokens, the question as given + the short-answer line."""

from __future__ import annotations

from functools import partial

from sdrpn_core import metrics
from sdrpn_core.benchmarks import register
from sdrpn_core.benchmarks.base import SHORT_ANSWER, Benchmark, BenchmarkSample, answers_of
from sdrpn_core.benchmarks.layout import image_value, read_split

SPLIT = "validation"


def _make(where: str, row: dict, file: str) -> BenchmarkSample:
    return BenchmarkSample(
        str(row["questionId"]),
        image_value(row["image"], file),
        str(row["question"]),
        answers_of(row["answers"]),
        category=",".join(row.get("question_types") or row.get("answer_type") or []),
    )


def read(url: str, split: str = SPLIT, config: str = "DocVQA", **storage_options):
    return read_split(url, _make, split, config, **storage_options)


def anls(prediction: str, sample: BenchmarkSample) -> float:
    return metrics.anls(prediction, sample.answers)


def _benchmark(name: str, config: str, rows: int, thresholds: dict[str, float], key: str) -> Benchmark:
    """One config of the repository: its reader defaults to that config."""
    return register(
        Benchmark(
            name,
            partial(read, config=config),
            anls,
            SHORT_ANSWER,
            32,
            thresholds,
            key,
            split=SPLIT,
            config=config,
            published_rows=rows,
        )
    )


DOCVQA = _benchmark("docvqa", "DocVQA", 5349, {"llava": 0.1, "qwen2_5_vl": 0.1}, "DocVQA")
INFOVQA = _benchmark("infovqa", "InfographicVQA", 2801, {"llava": 0.15, "qwen2_5_vl": 0.1}, "InfoVQA")
