"""Champion and challenger: a retrained RPN replaces the base model's current one only when it is not worse.

After the challenger is evaluated, the champion is evaluated on the same samples of the gate benchmarks (its
pieces are content-keyed: what an earlier run answered is read, only new samples are answered), and the
challenger is promoted when, on every gate benchmark, its metric is at least the champion's minus the tolerance
(points). The first RPN of a model is promoted; so is any RPN when the gate is off. The decision, promoted or
rejected, is recorded with the side-by-side scores (`storage.champion`); a rejection is a result, not a failure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from stages.refs import EvalRef, ModelRef
from storage.fingerprint import hash_obj


@dataclass(frozen=True)
class Gate:
    """What a challenger must not lose: `method`'s `metrics[benchmark]` (default `score`) on each of
    `benchmarks` (default: every evaluated one), by more than `tolerance` points."""

    enabled: bool = True
    benchmarks: tuple[str, ...] = ()
    metrics: tuple[tuple[str, str], ...] = ()
    method: str = "sdrpn"
    tolerance: float = 0.0

    def metric(self, benchmark: str) -> str:
        return dict(self.metrics).get(benchmark, "score")

    def gated(self, benchmark: str) -> bool:
        return not self.benchmarks or benchmark in self.benchmarks


@dataclass(frozen=True)
class Candidate:
    """An RPN as the gate sees it: its release (what is promoted), its checkpoint, where the release is."""

    release: str
    rpn: str
    url: str


def _value(results: list[EvalRef], benchmark: str, method: str, metric: str) -> float | None:
    for ref in results:
        if ref.benchmark == benchmark:
            row = next((s for s in ref.scores if s["method"] == method), None)
            value = row.get(metric) if row else None
            return float(value) if isinstance(value, (int, float)) else None
    return None


def compare(challenger: list[EvalRef], champion: list[EvalRef], gate: Gate) -> list[dict[str, Any]]:
    """Per gate benchmark: the metric, both values, the difference, and whether the challenger passes."""
    rows = []
    for ref in challenger:
        if not gate.gated(ref.benchmark):
            continue
        metric = gate.metric(ref.benchmark)
        new = _value(challenger, ref.benchmark, gate.method, metric)
        old = _value(champion, ref.benchmark, gate.method, metric)
        if new is None:
            raise ValueError(f"promotion gate: no {gate.method} {metric!r} score on {ref.benchmark} for the challenger")
        delta = None if old is None else new - old
        ok = delta is None or delta >= -gate.tolerance
        rows.append(
            {
                "benchmark": ref.benchmark,
                "metric": metric,
                "champion": old,
                "challenger": new,
                "delta": delta,
                "passes": ok,
            }
        )
    return rows


def decision_id(challenger: Candidate, champion: Candidate | None, gate: Gate) -> str:
    """What a decision is about: the challenger, the champion it is compared with, the gate. The same three → the
    same id, so a rerun finds the decision before evaluating anything for it."""
    return hash_obj({"challenger": challenger.release, "champion": champion and champion.release, "gate": gate})[:24]


def decide(
    model: ModelRef, challenger: Candidate, champion: Candidate | None, rows: list[dict], gate: Gate, why: str = ""
) -> dict[str, Any]:
    """The decision record: promoted or not, why, the side-by-side rows, and its id (the same comparison → the
    same id)."""
    failed = [r for r in rows if not r["passes"]]
    if champion is None:
        promoted, reason = True, why or "the first RPN of this base model"
    elif not gate.enabled:
        promoted, reason = True, "the promotion gate is off"
    elif why:
        promoted, reason = True, why
    elif failed:
        promoted = False
        reason = "; ".join(
            f"{r['benchmark']} {r['metric']} {r['challenger']:.2f} < champion's {r['champion']:.2f} - "
            f"{gate.tolerance:g}"
            for r in failed
        )
    else:
        promoted, reason = (
            True,
            f"not worse than the champion by more than {gate.tolerance:g} points on any gate benchmark",
        )
    return {
        "id": decision_id(challenger, champion, gate),
        "model": model.fingerprint,
        "base_model": model.path,
        "promoted": promoted,
        "reason": reason,
        "challenger": vars(challenger),
        "champion": vars(champion) if champion else None,
        "rows": rows,
        "gate": {"method": gate.method, "tolerance": gate.tolerance, "enabled": gate.enabled},
        "decided": time.time(),
    }


def summary(decision: dict[str, Any]) -> str:
    """One line for the log and the run's state."""
    verb = "promoted" if decision["promoted"] else "REJECTED (the champion stays)"
    return f"RPN release {decision['challenger']['release'][:12]} {verb}: {decision['reason']}"
