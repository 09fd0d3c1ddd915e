"""Calibration: SD-RPN's RoI threshold τ and crop mode chosen on a calibration split, not set by hand.

The authors hand-set τ per benchmark, model and token budget (0.03 to 0.175; docs/evaluation-protocol.md). Here
every candidate (τ, mode) of a grid answers the calibration samples and the benchmark's own metric picks one.

It costs little more than one SD-RPN pass: the RPN's map (pass 1: layers 0..K−1 and the RPN) is computed once
per sample and shared by every candidate, which only turns the map into an RoI plan (the adapter's rules); pass 2
runs once per *distinct* plan of a sample, so candidates that crop alike share one answer and one time. The
baseline answers each sample once, for the throughput floor.

`choose` keeps the candidates whose throughput relative to the baseline reaches the floor, takes the best score,
and breaks ties on what the clock does not decide: fewer inserted crop tokens, then the larger τ, then the grid's
mode order."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sdrpn_core.infer import Answer, answer_baseline_batch, answers_of, plan_for, run_pass1_batch, run_pass2_batch
from sdrpn_core.models.base import VLMAdapter
from sdrpn_core.roi import RoIPlan
from sdrpn_core.rpn import RoIPredictor

THRESHOLDS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)  # spans the authors' 0.03 to 0.175
MODES = ("box", "mask")


@dataclass(frozen=True)
class CalibrationParams:
    """`eval.calibration`: the grid (τ × mode), the throughput floor (a fraction of the baseline's samples/s, or
    None) and the calibration split: at most `n` samples, from a synthetic evaluation's generator under `seed`,
    else a `fraction` of the evaluation's rows held out under `seed` (and left out of its score)."""

    thresholds: tuple[float, ...] = THRESHOLDS
    modes: tuple[str, ...] = MODES
    min_relative_throughput: float | None = None
    n: int = 64
    fraction: float = 0.2
    seed: int = 777

    def __post_init__(self):
        checks = [
            ("thresholds", bool(self.thresholds) and all(0 < t < 1 for t in self.thresholds)),
            ("modes", bool(self.modes) and set(self.modes) <= set(MODES)),
            ("min_relative_throughput", self.min_relative_throughput is None or self.min_relative_throughput > 0),
            ("n", self.n >= 1),
            ("fraction", 0 < self.fraction < 1),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"eval.calibration.{name} = {getattr(self, name)!r} is out of range")


@dataclass(frozen=True)
class Candidate:
    threshold: float
    mode: str


def grid(thresholds: Sequence[float] = THRESHOLDS, modes: Sequence[str] = MODES) -> list[Candidate]:
    return [Candidate(float(t), m) for m in modes for t in sorted(thresholds)]


@dataclass
class Sweep:
    """Every candidate's answer to each calibration sample (text, crop tokens inserted) and what it cost (seconds
    per sample: pass 1's share + the pass 2 of its plan); the baseline's beside. Plain lists, stored as JSON."""

    candidates: list[Candidate]
    texts: dict[Candidate, list[str]]
    seconds: dict[Candidate, list[float]]
    crop_tokens: dict[Candidate, list[int]]
    baseline_texts: list[str] = field(default_factory=list)
    baseline_seconds: list[float] = field(default_factory=list)
    pass1_rows: int = 0  # rows through pass 1: the samples, whatever the grid
    pass2_rows: int = 0  # (sample, distinct plan) pairs answered

    def add(self, c: Candidate, answer: Answer, seconds: float) -> None:
        self.texts[c].append(answer.text)
        self.seconds[c].append(seconds)
        self.crop_tokens[c].append(max(0, answer.roi.n_crop_tokens) if answer.roi is not None else 0)

    def to_json(self) -> dict:
        per = [
            {
                "threshold": c.threshold,
                "mode": c.mode,
                "texts": self.texts[c],
                "seconds": self.seconds[c],
                "crop_tokens": self.crop_tokens[c],
            }
            for c in self.candidates
        ]
        base = {"texts": self.baseline_texts, "seconds": self.baseline_seconds}
        return {"candidates": per, "baseline": base, "pass1_rows": self.pass1_rows, "pass2_rows": self.pass2_rows}

    @classmethod
    def from_json(cls, doc: dict) -> Sweep:
        cands = [Candidate(float(d["threshold"]), str(d["mode"])) for d in doc["candidates"]]
        by = dict(zip(cands, doc["candidates"], strict=True))
        return cls(
            cands,
            {c: [str(t) for t in by[c]["texts"]] for c in cands},
            {c: [float(t) for t in by[c]["seconds"]] for c in cands},
            {c: [int(t) for t in by[c]["crop_tokens"]] for c in cands},
            [str(t) for t in doc["baseline"]["texts"]],
            [float(t) for t in doc["baseline"]["seconds"]],
            int(doc["pass1_rows"]),
            int(doc["pass2_rows"]),
        )


@dataclass(frozen=True)
class CurvePoint:
    """One candidate on the calibration split: the benchmark's score (percent), throughput relative to the
    baseline, mean crop tokens inserted per sample and the share of samples cropped."""

    threshold: float
    mode: str
    score: float
    relative_throughput: float
    crop_tokens: float
    cropped: float


def plan_key(plan: RoIPlan) -> str:
    """Equal for plans that make the same pass 2 (kind, boxes, kept cells); the reason and map do not count."""
    h = hashlib.sha256(f"{plan.kind if plan.boxes else 'none'}|{plan.boxes}".encode())
    if plan.region is not None:
        region = np.asarray(plan.region, dtype=bool)
        h.update(f"{region.shape}".encode() + np.packbits(region).tobytes())
    return h.hexdigest()


@torch.inference_mode()
def sweep(
    adapter: VLMAdapter,
    rpn: RoIPredictor,
    images: list,
    prompts: list[str],
    candidates: list[Candidate],
    *,
    max_new_tokens: int,
    reuse_kv: bool = True,
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Sweep:
    """Answer every sample with the baseline once and with every candidate, sharing pass 1 per sample and pass 2
    per distinct plan; `progress(rows)` after each batch."""
    n = len(images)
    out = Sweep(candidates, {c: [] for c in candidates}, {c: [] for c in candidates}, {c: [] for c in candidates})
    for start in range(0, n, batch_size):
        ims, qs = images[start : start + batch_size], prompts[start : start + batch_size]
        t0 = time.perf_counter()
        out.baseline_texts += [a.text for a in answer_baseline_batch(adapter, ims, qs, max_new_tokens)]
        out.baseline_seconds += [(time.perf_counter() - t0) / len(ims)] * len(ims)
        t0 = time.perf_counter()
        p1s = run_pass1_batch(adapter, rpn, ims, qs, reuse_kv=reuse_kv)
        pass1 = (time.perf_counter() - t0) / len(ims)
        out.pass1_rows += len(ims)
        answered: dict[tuple[int, str], tuple[Answer, float]] = {}  # (row, plan key) → answer, pass-2 seconds
        for c in candidates:
            plans = [plan_for(adapter, p1.logits_map, c.threshold, c.mode) for p1 in p1s]
            keys = [plan_key(p) for p in plans]
            todo = [j for j, k in enumerate(keys) if (j, k) not in answered]
            if todo:
                t0 = time.perf_counter()
                done = run_pass2_batch(adapter, [p1s[j] for j in todo], [plans[j] for j in todo], max_new_tokens)
                dt = (time.perf_counter() - t0) / len(todo)
                texts = answers_of(adapter, [t for t, _ in done], {}, [roi for _, roi in done])
                answered.update({(j, keys[j]): (a, dt) for j, a in zip(todo, texts, strict=True)})
                out.pass2_rows += len(todo)
            for j, k in enumerate(keys):
                answer, dt = answered[(j, k)]
                out.add(c, answer, pass1 + dt)
        if progress is not None:
            progress(len(ims))
    return out


def curve(result: Sweep, metric: Callable[[list[str]], float]) -> list[CurvePoint]:
    """Each candidate's score (`metric` of its predictions, in percent) and cost."""
    base = float(np.sum(result.baseline_seconds))
    points = []
    for c in result.candidates:
        tokens, spent = result.crop_tokens[c], float(np.sum(result.seconds[c]))
        points.append(
            CurvePoint(
                c.threshold,
                c.mode,
                float(metric(result.texts[c])),
                base / spent if spent else 0.0,
                float(np.mean(tokens)) if tokens else 0.0,
                float(np.mean([t > 0 for t in tokens])) if tokens else 0.0,
            )
        )
    return points


@dataclass(frozen=True)
class Choice:
    point: CurvePoint
    reason: str
    floor: float | None = None
    excluded: tuple[CurvePoint, ...] = field(default=())  # below the throughput floor


def choose(points: list[CurvePoint], min_relative_throughput: float | None = None) -> Choice:
    """The best-scoring candidate at or above the throughput floor; ties: fewer crop tokens, larger τ, then the
    grid's mode order. No candidate at the floor is an error naming the fastest."""
    modes = list(dict.fromkeys(p.mode for p in points))
    floor = min_relative_throughput
    ok = [p for p in points if floor is None or p.relative_throughput >= floor]
    if not ok:
        fastest = max(points, key=lambda p: p.relative_throughput)
        raise ValueError(
            f"calibration: no candidate reaches the throughput floor {floor}× of the baseline; the fastest is "
            f"τ {fastest.threshold} / {fastest.mode} at {fastest.relative_throughput:.2f}×"
        )
    best = min(ok, key=lambda p: (-round(p.score, 9), p.crop_tokens, -p.threshold, modes.index(p.mode)))
    ties = [p for p in ok if round(p.score, 9) == round(best.score, 9)]
    reason = f"best score {best.score:.2f} of {len(ok)} candidates" + (
        f" (tied with {len(ties) - 1}: fewest crop tokens, then larger τ)" if len(ties) > 1 else ""
    )
    if floor is not None:
        reason += f"; {len(points) - len(ok)} below the floor {floor}× of the baseline's throughput"
    return Choice(best, reason, floor, tuple(p for p in points if p not in ok))
