"""TextVQA val: the official JSON + image folder, or the `lmms-lab/textvqa` Parquet layout. No OCR tokens in the
prompt (lmms-eval's `ocr: false`, the protocol behind the paper's 46.1 baseline)."""

from __future__ import annotations

from sdrpn_core.benchmarks.base import SHORT_ANSWER, Benchmark, BenchmarkSample, collect, image_bytes, parquet_rows
from sdrpn_core.benchmarks.base import read_json as _read_json


def read(url: str, images: str | None = None, **storage_options):
    """`url`: `TextVQA_0.5.1_val.json` (then `images` is the folder of `<image_id>.jpg`, default `train_images`
    beside it) or a folder / file of Parquet."""
    if url.endswith(".json"):
        data = _read_json(url, **storage_options)["data"]
        folder = images or url.rsplit("/", 1)[0] + "/train_images"

        def make(where, row):
            answers = tuple(str(a) for a in row["answers"])
            if not answers:
                raise ValueError("no answers")
            return BenchmarkSample(
                str(row["question_id"]), f"{folder}/{row['image_id']}.jpg", str(row["question"]), answers
            )

        return collect(((f"data[{i}]", r) for i, r in enumerate(data)), make)

    def make_pq(where, row):
        answers = tuple(str(a) for a in row["answers"])
        if not answers:
            raise ValueError("no answers")
        return BenchmarkSample(str(row["question_id"]), image_bytes(row["image"]) or b"", str(row["question"]), answers)

    return collect(parquet_rows(url, **storage_options), make_pq)


BENCHMARK = Benchmark(
    "textvqa", read, "vqa_accuracy", SHORT_ANSWER, 16, {"llava": 0.15, "qwen2_5_vl": 0.075}, "TextVQA"
)
