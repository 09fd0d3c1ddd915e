"""The training questions: LLaVA's `llava_v1_5_mix665k.json`, GQA + OCR-VQA entries, first human turn only, the
`<image>` tag stripped (the authors' "152k" set); `limit` keeps a seeded subset like their `roi_samples`
(`random.seed(42)`, shuffle, first N — the 10K setting is limit=10000). `config: gqa` or `config: ocr_vqa` reads one
source alone: the authors label the two with different teacher heads (Qwen's natural and textual presets). The
subset is drawn from both sources before one is taken, so `config: gqa, limit: 10000` is the GQA share of their
10K set and the two configs together are exactly that set."""

from __future__ import annotations

import random

from sdrpn_core import metrics
from sdrpn_core.benchmarks import register
from sdrpn_core.benchmarks.base import Benchmark, BenchmarkSample, collect
from sdrpn_core.benchmarks.layout import read_json

SOURCES = ("gqa", "ocr_vqa")


def read(
    url: str,
    images: str | None = None,
    config: str | None = None,
    limit: int | None = None,
    seed: int = 42,
    **storage_options,
):
    """`images`: the folder that holds `gqa/images/…` and `ocr_vqa/images/…` (default: beside the JSON)."""
    if config not in (None, *SOURCES):
        raise ValueError(f"mix665k config {config!r}: choose one of {', '.join(SOURCES)} (or none for both)")
    entries = read_json(url, **storage_options)
    root = images or url.rsplit("/", 1)[0]
    kept = [e for e in entries if e.get("image") and any(s in e["image"] for s in SOURCES)]
    if limit is not None:  # of the merged list, as theirs: a source's share of the subset, not `limit` of its own
        random.Random(seed).shuffle(kept)
        kept = kept[:limit]
    if config:
        kept = [e for e in kept if config in e["image"]]

    def make(where, row):
        first = next(t for t in row["conversations"] if t["from"] == "human")
        answer = next((t["value"] for t in row["conversations"] if t["from"] == "gpt"), "")
        question = first["value"].replace("<image>", "").strip()
        return BenchmarkSample(
            str(row["id"]), f"{root}/{row['image']}", question, (answer,), category=row["image"].split("/")[0]
        )

    return collect(lambda: ((f"[{i}]", r) for i, r in enumerate(kept)), make)


def exact_match(prediction: str, sample: BenchmarkSample) -> float:
    return metrics.exact_match(prediction, list(sample.answers))


BENCHMARK = register(Benchmark("mix665k", read, exact_match, max_new_tokens=None, seeded_subset=True))
