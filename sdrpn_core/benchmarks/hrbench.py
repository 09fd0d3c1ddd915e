"""HR-Bench 4K / 8K: `DreamMr/HR-Bench` (`hr_bench_4k.parquet`, `hr_bench_8k.parquet`, or their `.tsv` twins,
800 questions each; a folder is read for one resolution only) or VLMEvalKit's `HRBench4K.tsv` / `HRBench8K.tsv`.
Columns: index, question, answer (a letter), category (`single` = FSP, `cross` = FCP), A-D, cycle_category, and
the image as base64. lmms-eval's `hrbench`: "question\\nA. …\\n…Answer the option letter directly.", no generation
limit, its rule-based option matcher; the score averages the per-`cycle_category` accuracies (its FSP / FCP /
average). The harness asks a GPT judge when the rules find no single option: offline, such answers score 0."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from sdrpn_core import metrics
from sdrpn_core.benchmarks import register
from sdrpn_core.benchmarks.base import Benchmark, BenchmarkSample
from sdrpn_core.benchmarks.layout import image_value, read_split

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CONFIG = "hrbench_version_split"


def _present(value) -> bool:
    return value is not None and value == value and str(value) != ""  # NaN != NaN (pandas-written files)


def _make(where: str, row: dict, file: str) -> BenchmarkSample:
    options = tuple((k, str(row[k])) for k in LETTERS if k in row and _present(row[k]))
    answer = str(row["answer"]).strip()
    if answer not in dict(options):
        raise ValueError(f"answer {row['answer']!r} is not one of the options {[k for k, _ in options]}")
    return BenchmarkSample(
        str(row["index"]),
        image_value(row["image"], file),
        str(row["question"]),
        (answer,),
        category=str(row.get("category") or ""),
        options=options,
        meta=(("cycle_category", str(row.get("cycle_category") or "")),),
    )


def _reader(resolution: str):
    names = (
        (f"hr_bench_{resolution}.parquet",),
        (f"hr_bench_{resolution}.tsv",),
        (f"HRBench{resolution.upper()}.tsv",),
    )

    def read(url: str, split: str = f"hrbench_{resolution}", config: str = CONFIG, **storage_options):
        return read_split(url, _make, split, config, names, **storage_options)

    read.__doc__ = f"HR-Bench {resolution.upper()}: the repository folder, a config folder or one file."
    return read


def question_text(sample: BenchmarkSample) -> str:
    options = "".join(f"{k}. {v}\n" for k, v in sample.options)
    return f"{sample.question.strip()}\n{options}Answer the option letter directly."


def option_match(prediction: str, sample: BenchmarkSample) -> float:
    return float(metrics.hrbench_letter(prediction.strip(), dict(sample.options)) == sample.answers[0])


def cycle_average(samples: Sequence[BenchmarkSample], predictions: Sequence[str], scores: Sequence[float]) -> dict:
    """The harness's aggregate: mean over cycle_category groups of their mean score, overall and per category."""

    def average(pairs) -> float:
        groups: dict[str, list[float]] = defaultdict(list)
        for s, sc in pairs:
            groups[s.get("cycle_category")].append(sc)
        return 100.0 * sum(sum(v) / len(v) for v in groups.values()) / len(groups) if groups else float("nan")

    pairs = list(zip(samples, scores, strict=True))
    return {
        "score": average(pairs),
        "fsp": average(p for p in pairs if p[0].category == "single"),
        "fcp": average(p for p in pairs if p[0].category == "cross"),
    }


def _benchmark(resolution: str, key: str, thresholds: dict[str, float]) -> Benchmark:
    return register(
        Benchmark(
            f"hrbench{resolution}",
            _reader(resolution),
            option_match,
            "",
            None,
            thresholds,
            key,
            question=question_text,
            split=f"hrbench_{resolution}",
            config=CONFIG,
            published_rows=800,
            aggregate=cycle_average,
            notes="answers the harness would send to its GPT judge (no single option found) score 0 here",
        )
    )


_THRESHOLDS = {"llava": 0.1, "qwen2_5_vl": 0.03, "qwen2.5-vl-3b": 0.1, "qwen2.5-vl-3b@4096": 0.05}
HRBENCH_4K = _benchmark("4k", "HR4K", {**_THRESHOLDS, "qwen2.5-vl-3b@3072": 0.125})
HRBENCH_8K = _benchmark("8k", "HR8K", _THRESHOLDS)
