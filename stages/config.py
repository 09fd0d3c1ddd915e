"""The pipeline configuration: one pydantic model, validated at the edge, loaded from YAML (`configs/`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sdrpn_core.presets import Preset, get_preset
from sdrpn_core.pseudo_labels import LabelParams
from sdrpn_core.train import TrainConfig
from storage.store import StoreSettings


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Section):
    """`source: path` loads a folder or hub id; `source: nano` the shipped sdrpn-nano (`models/sdrpn-nano`), or trains
    it from scratch with `retrain: true` (recipe overrides in `nano`); `source: tiny` builds a seeded *random* tiny
    model (tests, smoke runs; `tiny: {family: qwen2_5_vl}` for a Qwen2.5-VL one). `inputs` overrides the adapter's
    input settings (Qwen: min_pixels, max_pixels, pad_square, prompt, literal_image_tag, system); they are part of
    the model's fingerprint and recorded with every result."""

    source: Literal["path", "nano", "tiny"] = "path"
    retrain: bool = False
    nano: dict[str, Any] = Field(default_factory=dict)
    path: str | None = None
    family: str = "auto"
    dtype: str = "auto"
    device: str = "cpu"
    tiny: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, Any] = Field(default_factory=dict)


class DatasetSpec(_Section):
    """`kind: jsonl` reads a manifest of {id, image, question[, answers, box, domain]} lines (images relative to it);
    `kind: synthetic` generates the fine-grained digit scenes of `sdrpn_core.synthetic`; `kind: benchmark` reads
    a benchmark's files in their official / lmms-lab layout (`benchmark`: a name of `sdrpn_core.benchmarks`,
    `path`: the file or folder, `images`: the image folder where the layout keeps images apart)."""

    kind: Literal["jsonl", "synthetic", "benchmark"] = "jsonl"
    path: str | None = None
    benchmark: str | None = None  # scoring rules for jsonl / benchmark data (default: exact match)
    images: str | None = None
    n: int = 64
    seed: int = 0
    variant: Literal["select", "single"] = "select"
    canvas: int = 256
    limit: int | None = None


class TeacherSection(_Section):
    preset: str = "llava-1.5-7b"
    overrides: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = 8
    max_new_tokens: int | None = None
    shards: int = 4
    chunk_size: int = 64
    # adapter input settings for the teacher alone, e.g. Qwen's natural-image label prompt: {prompt: grounding};
    # training and evaluation keep the model's own (the authors train the student on the original question)
    inputs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("overrides")
    @classmethod
    def _int_layers(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in ("grounding", "sink"):
            if key in v:  # YAML/JSON keys are strings; layers are ints; heads lists → tuples, null → all heads
                v[key] = {int(k): None if h is None else tuple(h) for k, h in v[key].items()}
        return v

    def preset_obj(self) -> Preset:
        return get_preset(self.preset, **self.overrides)


class LabelSection(_Section):
    fg_ratio: float = 0.2
    bg_ratio: float = 0.1
    max_box_frac: float = 0.5
    sink_thresh: float | None = None  # None: the preset's
    variant: Literal["llava", "qwen"] | None = None  # None: the preset's
    min_max_attn: float = 5e-3

    def params(self, preset: Preset) -> LabelParams:
        return LabelParams(
            sink_thresh=self.sink_thresh if self.sink_thresh is not None else preset.sink_thresh,
            fg_ratio=self.fg_ratio,
            bg_ratio=self.bg_ratio,
            max_box_frac=self.max_box_frac,
            variant=self.variant or preset.label_variant,
            min_max_attn=self.min_max_attn,
        )


class TrainSection(_Section):
    K: int | None = None  # None: the preset's
    T: int | None = None
    lr: float = 5e-5
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    max_grad_norm: float | None = None
    seed: int = 0
    checkpoint_every: int = 50

    def params(self, preset: Preset) -> TrainConfig:
        return TrainConfig(
            K=self.K if self.K is not None else preset.K,
            T=self.T if self.T is not None else preset.T,
            lr=self.lr,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            epochs=self.epochs,
            max_steps=self.max_steps,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
            checkpoint_every=self.checkpoint_every,
        )


class EvalSection(_Section):
    """Benchmarks and methods compared in one run. `threshold` / `max_new_tokens` left unset take each benchmark's
    authors' value for the model family; `vicrop_layer` defaults to the preset's first grounding layer (14 for
    LLaVA-1.5-7B, ViCrop's own choice); `paper_model` names the paper's rows to print beside ours."""

    datasets: list[DatasetSpec] = Field(default_factory=lambda: [DatasetSpec(kind="synthetic", n=32, seed=1000)])
    methods: list[Literal["baseline", "sdrpn", "vicrop", "oracle"]] = Field(
        default_factory=lambda: ["baseline", "sdrpn", "vicrop", "oracle"]
    )
    threshold: float | None = None
    mode: Literal["mask", "box"] = "mask"
    reuse_kv: bool = True
    max_new_tokens: int | None = None
    vicrop_layer: int | None = None
    paper_model: str | None = None
    gallery: int = 6
    # adapter input settings for evaluation alone, e.g. the authors' Qwen evaluation without square padding:
    # {pad_square: false}; recorded in protocol.json
    inputs: dict[str, Any] = Field(default_factory=dict)


class StoreSection(_Section):
    root: str = "data"
    endpoint_url: str | None = None
    result_storage: str | None = None  # Prefect results; default <root>/_prefect (local) — see flows/pipeline.py

    def settings(self) -> StoreSettings:
        return StoreSettings(root=self.root, endpoint_url=self.endpoint_url)


class RunnerSection(_Section):
    """Where the mapped teacher shards run: `threads` (default) or `dask` (prefect-dask; `address` of a running
    scheduler, or a temporary LocalCluster of `n_workers`)."""

    kind: Literal["threads", "dask"] = "threads"
    address: str | None = None
    n_workers: int = 2
    processes: bool = True


class PipelineConfig(_Section):
    name: str = "default"
    model: ModelSpec = Field(default_factory=ModelSpec)
    train_data: DatasetSpec = Field(default_factory=lambda: DatasetSpec(kind="synthetic"))
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    labels: LabelSection = Field(default_factory=LabelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    store: StoreSection = Field(default_factory=StoreSection)
    runner: RunnerSection = Field(default_factory=RunnerSection)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
        _resolve_paths(raw, path.parent)
        return cls.model_validate(raw)


def _resolve_paths(raw: dict, base: Path) -> None:
    """Relative local paths in a YAML file are relative to the file (URLs and hub ids are left alone)."""

    def fix(section: dict | None, key: str) -> None:
        if not section or not section.get(key):
            return
        value = str(section[key])
        if "://" not in value and not Path(value).is_absolute() and (base / value).exists():
            section[key] = str((base / value).resolve())

    fix(raw.get("model"), "path")
    fix(raw.get("train_data"), "path")
    fix((raw.get("eval") or {}).get("dataset"), "path")
