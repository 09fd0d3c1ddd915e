"""What a benchmark is to the evaluation stage. Each benchmark module declares one `Benchmark` and registers it:
its reader (the published layouts), the split and config the paper evaluates and their published size, the
prompt, the metric (a callable on the raw output), sub-score groups, the paper's column names and the authors'
RoI threshold per model family. Nothing outside the module spells the benchmark's name."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from sdrpn_core.data import Rejection


@dataclass(frozen=True)
class BenchmarkSample:
    sample_id: str
    image: str | bytes  # a path / URL, or the encoded image embedded in the benchmark's file
    question: str  # as the benchmark states it (options included where the benchmark puts them there)
    answers: tuple[str, ...]
    category: str = ""  # the benchmark's sub-score group (V* attr/spatial, HR-Bench single/cross, …)
    options: tuple[tuple[str, str], ...] = ()  # (letter, text) for multiple choice
    box: tuple[int, int, int, int] | None = None  # ground-truth region (x0, y0, x1, y1), pixels
    meta: tuple[tuple[str, str], ...] = ()  # other fields the metric or the aggregate reads (OCRBench's source set)

    def get(self, key: str, default: str = "") -> str:
        return dict(self.meta).get(key, default)


Reader = Callable[..., tuple[Sequence[BenchmarkSample], list[Rejection]]]
Metric = Callable[[str, BenchmarkSample], float]
Aggregate = Callable[[Sequence[BenchmarkSample], Sequence[str], Sequence[float]], dict[str, float]]


def _question(sample: BenchmarkSample) -> str:
    return sample.question


@dataclass(frozen=True)
class Benchmark:
    """A benchmark as the harness behind the paper runs it (lmms-eval as vendored by the authors).

    `question`: the prompt body from a sample (the harness's doc_to_text), `post_prompt` appended to it;
    `max_new_tokens`: the task's generation limit, None where the task sets none (the model's default then);
    `split` / `config`: what the reader picks from a repository by default; `published_rows`: the split's size,
    compared with what was read; `groups`: sub-score key -> sample category; `columns`: score key -> the paper's
    column name; `aggregate`: extra aggregates beyond the mean (POPE's F1); `notes`: where we deliberately
    differ from the harness, printed next to the score. `thresholds` are keyed by model family, or more
    precisely by preset model ("qwen2.5-vl-3b") and image-token budget ("qwen2.5-vl-7b@3072")."""

    name: str
    reader: Reader
    metric: Metric
    post_prompt: str = ""
    max_new_tokens: int | None = 16
    thresholds: dict[str, float] = field(default_factory=dict)
    paper_key: str = ""
    question: Callable[[BenchmarkSample], str] = _question
    split: str = ""
    config: str = ""
    published_rows: int | None = None
    groups: dict[str, str] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    aggregate: Aggregate | None = None
    notes: str = ""
    answer_format: str = "free text scored by the benchmark's metric"
    seeded_subset: bool = False  # the reader draws `limit` rows itself, seeded (the authors' training subsets)

    def prompt(self, sample: BenchmarkSample) -> str:
        return self.question(sample) + self.post_prompt

    def threshold(self, family: str, default: float = 0.15, model: str = "", tokens: int | None = None) -> float:
        """The authors' τ: for this model at this image-token budget, else this model, else the family."""
        for key in (f"{model}@{tokens}" if model and tokens else "", model, family):
            if key and key in self.thresholds:
                return self.thresholds[key]
        return default

    @property
    def metric_name(self) -> str:
        return getattr(self.metric, "__name__", repr(self.metric))


SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."


class SampleSet(Sequence[BenchmarkSample]):
    """The accepted samples of a source, read again from the source on every pass, so that at most a batch of
    embedded images is held in memory (HR-Bench 8K is 2.8 GB of images). Indexing walks the source."""

    def __init__(self, rows: Callable[[], Iterator[tuple[str, dict]]], make, accepted: list[str]):
        self._rows, self._make, self._accepted = rows, make, set(accepted)
        self._n = len(accepted)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[BenchmarkSample]:
        for where, row in self._rows():
            if where in self._accepted:
                yield self._make(where, row)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return list(self)[i]
        i = i + self._n if i < 0 else i
        if not 0 <= i < self._n:
            raise IndexError(i)
        for k, sample in enumerate(self):
            if k == i:
                return sample
        raise IndexError(i)


def _rejection_id(row, where: str) -> str:
    if isinstance(row, dict):
        for key in ("question_id", "questionId", "index", "id"):
            if row.get(key) is not None:
                return str(row[key])
    return where


def collect(
    rows: Callable[[], Iterator[tuple[str, dict]]], make: Callable[[str, dict], BenchmarkSample]
) -> tuple[SampleSet, list[Rejection]]:
    """Validate every row once (a failing row is quarantined with its location and reason); the samples are a
    `SampleSet` that reads the accepted rows again when iterated."""
    accepted, rejected = [], []
    for where, row in rows():
        try:
            sample = make(where, row)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            rejected.append(Rejection(_rejection_id(row, where), f"{where}: bad row ({type(e).__name__}: {e})"))
            continue
        if not sample.question.strip():
            rejected.append(Rejection(sample.sample_id, f"{where}: empty question"))
        elif not sample.image:
            rejected.append(Rejection(sample.sample_id, f"{where}: no image"))
        else:
            accepted.append(where)
    return SampleSet(rows, make, accepted), rejected


def answers_of(value) -> tuple[str, ...]:
    """A non-empty tuple of reference answers, or ValueError (test splits have none: never scored)."""
    if value is None:
        raise ValueError("no answers (a test split without ground truth?)")
    answers = tuple(str(a) for a in (value if isinstance(value, list | tuple) else [value]))
    if not answers or not any(a.strip() for a in answers):
        raise ValueError("no answers (a test split without ground truth?)")
    return answers
