"""Per-sample scores and per-benchmark aggregates in the units the paper reports (percent)."""

from __future__ import annotations

from collections.abc import Sequence

from sdrpn_core import metrics
from sdrpn_core.benchmarks.base import Benchmark, BenchmarkSample


def score(benchmark: Benchmark, sample: BenchmarkSample, prediction: str) -> float:
    answers = list(sample.answers)
    match benchmark.metric:
        case "vqa_accuracy":
            return metrics.vqa_accuracy(prediction, answers)
        case "anls":
            return metrics.anls(prediction, answers)
        case "relaxed_accuracy":
            return metrics.relaxed_accuracy(prediction, answers)
        case "ocrbench_score":
            return metrics.ocrbench_score(prediction, answers, sample.category)
        case "choice_accuracy":
            return metrics.choice_accuracy(prediction, answers[0], dict(sample.options) or None)
        case "pope":
            return float((metrics.yes_no(prediction) or "no") == answers[0])
        case "exact_match":
            return metrics.exact_match(prediction, answers)
    raise ValueError(f"benchmark {benchmark.name}: unknown metric {benchmark.metric!r}")


def aggregate(
    benchmark: Benchmark, samples: Sequence[BenchmarkSample], predictions: Sequence[str], scores: Sequence[float]
) -> dict[str, float]:
    """The headline number as `score` (percent), plus the paper's sub-scores where it reports them."""
    n = max(len(scores), 1)
    out = {"score": 100.0 * sum(scores) / n, "samples": float(len(scores))}
    if benchmark.metric == "pope":
        m = metrics.pope_metrics(predictions, [s.answers[0] for s in samples])
        out.update(
            {
                "score": 100 * m["f1"],
                "f1": 100 * m["f1"],
                "accuracy": 100 * m["accuracy"],
                "precision": 100 * m["precision"],
                "recall": 100 * m["recall"],
                "yes_ratio": 100 * m["yes_ratio"],
            }
        )
    groups = {
        "vstar": {"attr": "direct_attributes", "spatial": "relative_position"},
        "hrbench4k": {"fsp": "single", "fcp": "cross"},
        "hrbench8k": {"fsp": "single", "fcp": "cross"},
    }
    for key, category in groups.get(benchmark.name, {}).items():
        picked = [sc for s, sc in zip(samples, scores, strict=True) if s.category == category]
        out[key] = 100.0 * sum(picked) / len(picked) if picked else float("nan")
    return out
