"""TextVQA val: `lmms-lab/textvqa` (`data/validation-*.parquet`, 5,000 questions) or the official
`TextVQA_0.5.1_val.json` + image folder. lmms-eval's `textvqa_val`: the question `str.capitalize()`d (the first
letter upper-cased, the rest lower-cased), no OCR tokens, VQA accuracy; the task sets no generation limit."""

from __future__ import annotations

from sdrpn_core import metrics
from sdrpn_core.benchmarks import register
from sdrpn_core.benchmarks.base import SHORT_ANSWER, Benchmark, BenchmarkSample, answers_of, collect
from sdrpn_core.benchmarks.layout import image_value, read_json, read_split

SPLIT = "validation"


def read(url: str, images: str | None = None, split: str = SPLIT, config: str = "", **storage_options):
    """`url`: the repository / a split's Parquet files, or `TextVQA_0.5.1_val.json` (then `images` is the folder
    of `<image_id>.jpg`, default `train_images` beside it)."""
    if url.endswith(".json"):
        data = read_json(url, **storage_options)["data"]
        folder = images or url.rsplit("/", 1)[0] + "/train_images"

        def make_json(where: str, row: dict) -> BenchmarkSample:
            image = f"{folder}/{row['image_id']}.jpg"
            return BenchmarkSample(str(row["question_id"]), image, str(row["question"]), answers_of(row["answers"]))

        return collect(lambda: ((f"data[{i}]", r) for i, r in enumerate(data)), make_json)

    def make(where: str, row: dict, file: str) -> BenchmarkSample:
        image = image_value(row["image"], file)
        return BenchmarkSample(str(row["question_id"]), image, str(row["question"]), answers_of(row["answers"]))

    return read_split(url, make, split, config, **storage_options)


def vqa_accuracy(prediction: str, sample: BenchmarkSample) -> float:
    return metrics.vqa_accuracy(prediction, sample.answers)


BENCHMARK = register(
    Benchmark(
        "textvqa",
        read,
        vqa_accuracy,
        SHORT_ANSWER,
        max_new_tokens=None,
        thresholds={"llava": 0.15, "qwen2_5_vl": 0.075, "qwen2.5-vl-3b": 0.15},
        paper_key="TextVQA",
        question=lambda s: s.question.capitalize(),
        split=SPLIT,
        published_rows=5000,
    )
)
