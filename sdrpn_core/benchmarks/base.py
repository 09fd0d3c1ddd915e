"""What a benchmark is to the evaluation stage: samples, a prompt rule, a metric, limits and RoI thresholds."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import fsspec
import pyarrow.parquet as pq

from sdrpn_core.data import Rejection


@dataclass(frozen=True)
class BenchmarkSample:
    sample_id: str
    image: str | bytes  # a path / URL, or the encoded image embedded in a Parquet file
    question: str  # as the benchmark states it (options included where the benchmark puts them there)
    answers: tuple[str, ...]
    category: str = ""
    options: tuple[tuple[str, str], ...] = ()  # (letter, text) for multiple choice
    box: tuple[int, int, int, int] | None = None  # ground-truth region (x0, y0, x1, y1), pixels


@dataclass(frozen=True)
class Benchmark:
    """`metric` names a function of `sdrpn_core.metrics`; `post_prompt` is appended to the question as lmms-eval
    does; `thresholds` are the authors' per-task RoI thresholds by model family."""

    name: str
    reader: Callable[..., tuple[list[BenchmarkSample], list[Rejection]]]
    metric: str
    post_prompt: str = ""
    max_new_tokens: int = 16
    thresholds: dict[str, float] = field(default_factory=dict)
    paper_key: str = ""  # column name in the paper's tables

    def prompt(self, sample: BenchmarkSample) -> str:
        text = sample.question
        if sample.options and not all(f"{k}." in text for k, _ in sample.options):
            text += "\n" + "\n".join(f"{k}. {v}" for k, v in sample.options)
        return text + self.post_prompt

    def threshold(self, family: str, default: float = 0.15) -> float:
        return self.thresholds.get(family, default)


SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."


def parquet_rows(url: str, **storage_options) -> Iterator[tuple[str, dict]]:
    """Rows of one Parquet file, or of every *.parquet under a folder, with a 'file:row' location."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    files = sorted(fs.glob(path.rstrip("/") + "/**/*.parquet")) if fs.isdir(path) else [path]
    if not files:
        raise FileNotFoundError(f"no Parquet files under {url}")
    for f in files:
        with fs.open(f, "rb") as handle:
            table = pq.read_table(io.BytesIO(handle.read()))
        for i, row in enumerate(table.to_pylist()):
            yield f"{f.rsplit('/', 1)[-1]}:{i}", row


def read_json(url: str, **storage_options):
    with fsspec.open(url, "r", **storage_options) as f:
        return json.load(f)


def image_bytes(value) -> bytes | None:
    """HF datasets store images as {'bytes': …, 'path': …}; some sets as base64 strings."""
    if isinstance(value, dict):
        return value.get("bytes")
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and len(value) > 100:
        import base64
        import binascii

        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            return None
    return None


def collect(
    rows: Iterator[tuple[str, dict]], make: Callable[[str, dict], BenchmarkSample]
) -> tuple[list[BenchmarkSample], list[Rejection]]:
    """Build samples row by row; a row that fails validation is quarantined with its location and reason."""
    samples, rejected = [], []
    for where, row in rows:
        try:
            sample = make(where, row)
        except (KeyError, TypeError, ValueError) as e:
            rejected.append(
                Rejection(
                    str(row.get("question_id", row.get("questionId", where))) if isinstance(row, dict) else where,
                    f"{where}: bad row ({type(e).__name__}: {e})",
                )
            )
            continue
        if not sample.question.strip():
            rejected.append(Rejection(sample.sample_id, f"{where}: empty question"))
        elif not isinstance(sample.image, str) and not sample.image:
            rejected.append(Rejection(sample.sample_id, f"{where}: no image"))
        else:
            samples.append(sample)
    return samples, rejected
