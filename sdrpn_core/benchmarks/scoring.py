"""Per-sample scores and per-benchmark aggregates in the units the paper reports (percent)."""

from __future__ import annotations

from collections.abc import Sequence

from sdrpn_core.benchmarks.base import Benchmark, BenchmarkSample


def score(benchmark: Benchmark, sample: BenchmarkSample, prediction: str) -> float:
    """The benchmark's metric on the model output, in [0, 1]. The harness strips every output before its
    metrics see it; so do we."""
    return float(benchmark.metric(prediction.strip(), sample))


def aggregate(
    benchmark: Benchmark, samples: Sequence[BenchmarkSample], predictions: Sequence[str], scores: Sequence[float]
) -> dict[str, float]:
    """The headline number as `score` (percent: the mean unless the benchmark aggregates otherwise), the number
    of samples, the mean per sub-score group and the benchmark's own aggregates."""
    out = {"score": 100.0 * sum(scores) / max(len(scores), 1), "samples": float(len(scores))}
    for key, category in benchmark.groups.items():
        picked = [sc for s, sc in zip(samples, scores, strict=True) if s.category == category]
        out[key] = 100.0 * sum(picked) / len(picked) if picked else float("nan")
    if benchmark.aggregate is not None:
        out.update(benchmark.aggregate(samples, predictions, scores))
    return out
