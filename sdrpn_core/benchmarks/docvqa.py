"""DocVQA val and InfographicVQA val from `lmms-lab/DocVQA`, whose two configs lie side by side (`DocVQA/`,
`InfographicVQA/`): each benchmark reads only its own config's validation split (5,349 / 2,801 questions); test
rows have no answers and are never scored. ANLS, 32 new tokens, the question as given + the short-answer line."""

from __future__ import annotations

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


def read_docvqa(url: str, split: str = SPLIT, config: str = "DocVQA", **storage_options):
    return read_split(url, _make, split, config, **storage_options)


def read_infovqa(url: str, split: str = SPLIT, config: str = "InfographicVQA", **storage_options):
    return read_split(url, _make, split, config, **storage_options)


def anls(prediction: str, sample: BenchmarkSample) -> float:
    return metrics.anls(prediction, sample.answers)


DOCVQA = register(
    Benchmark(
        "docvqa",
        read_docvqa,
        anls,
        SHORT_ANSWER,
        32,
        {"llava": 0.1, "qwen2_5_vl": 0.1},
        "DocVQA",
        split=SPLIT,
        config="DocVQA",
        published_rows=5349,
    )
)
INFOVQA = register(
    Benchmark(
        "infovqa",
        read_infovqa,
        anls,
        SHORT_ANSWER,
        32,
        {"llava": 0.15, "qwen2_5_vl": 0.1},
        "InfoVQA",
        split=SPLIT,
        config="InfographicVQA",
        published_rows=2801,
    )
)
