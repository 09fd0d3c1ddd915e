"""What stages hand each other: small, picklable references to outputs in the store (never the data itself)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelRef:
    fingerprint: str
    path: str  # a local folder `from_pretrained` reads
    family: str
    dtype: str
    device: str
    inputs: str = "{}"  # JSON of the adapter input settings overridden by the config (pixel budget, prompt)


@dataclass(frozen=True)
class DatasetRef:
    fingerprint: str
    manifest_url: str
    rows: int
    name: str = ""
    benchmark: str = "synthetic"  # the scoring rules (a name of sdrpn_core.benchmarks)
    rejected: int = 0
    warnings: tuple[str, ...] = ()  # e.g. a row count that is not the split's published size


@dataclass(frozen=True)
class ShardSummary:
    shard: int
    rows: int
    extracted: int
    already_done: int
    rejected: int
    teacher: str = ""  # the teacher rows' fingerprint, shared by every shard: what the labels read
    url: str = ""


@dataclass(frozen=True)
class TeacherRef:
    fingerprint: str
    url: str
    rows: int
    rejected: int


@dataclass(frozen=True)
class LabelsRef:
    """A label set; a merged one (several training sources) names its sources' label sets in `parts`."""

    fingerprint: str
    url: str
    rows: int
    usable: int
    stats: dict = field(default_factory=dict, hash=False, compare=False)
    parts: tuple[tuple[str, str], ...] = ()  # (source name, label fingerprint), in the config's order

    def label_fingerprints(self) -> list[str]:
        return [fp for _, fp in self.parts] or [self.fingerprint]


@dataclass(frozen=True)
class RpnRef:
    fingerprint: str
    url: str
    steps: int
    final_loss: float


@dataclass(frozen=True)
class CalibrationRef:
    """τ and the crop mode chosen for one benchmark (`stages.calibrate`), with the calibration's artifact."""

    fingerprint: str
    url: str
    benchmark: str
    threshold: float
    mode: str


@dataclass(frozen=True)
class EvalRef:
    fingerprint: str
    url: str
    scores: tuple[dict, ...] = ()
    benchmark: str = ""


@dataclass(frozen=True)
class PieceRef:
    """One committed evaluation piece: a method's predictions on one shard of a benchmark's rows."""

    fingerprint: str
    url: str
    method: str
    shard: int
    rows: int
