"""The pipeline configuration: one pydantic model, validated at the edge, loaded from YAML (`configs/`).

Every value is checked before any model work: sizes and counts are positive, τ lies in (0, 1) (or [-1, 0), the
authors' "fraction of the max" convention), benchmark and preset names are known, local paths exist, and a model
path is a folder or a hub id. Relative local paths in a YAML file are relative to that file's folder.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from sdrpn_core.calibrate import CalibrationParams
from sdrpn_core.methods import EvalParams
from sdrpn_core.presets import PRESETS, Preset, get_preset
from sdrpn_core.pseudo_labels import LabelParams
from sdrpn_core.train import TrainConfig
from storage.store import StoreSettings

if TYPE_CHECKING:
    from stages.promote import Gate


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the file, the field and what to change."""


Positive = Annotated[int, Field(gt=0)]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_local(path: str) -> bool:
    """A plain path or a file:// URL (as opposed to s3://, http://…)."""
    return "://" not in path or path.startswith("file://")


def _check_exists(path: str | None, what: str) -> str | None:
    """Local paths must exist now; remote ones (s3://…) are checked by the stages, with retries."""
    if (
        path
        and is_local(path)
        and not any(c in path for c in "*?[")
        and not Path(path.removeprefix("file://")).exists()
    ):
        raise ValueError(f"{what} does not exist: {path}")
    return path


def check_threshold(value: float | str | None) -> float | str | None:
    if value == "auto":
        return value
    if value is not None and not (0 < value < 1 or -1 <= value < 0):
        raise ValueError(f"τ must be in (0, 1), or in [-1, 0) for the fraction-of-max rule; got {value}")
    return value


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

    @model_validator(mode="after")
    def _path(self) -> ModelSpec:
        if self.source != "path":
            return self
        if not self.path:
            raise ValueError("model.path is required when model.source is 'path'")
        local = Path(self.path.removeprefix("file://"))
        if not local.is_dir() and (local.exists() or not HUB_ID.match(self.path)):
            raise ValueError(
                f"model.path {self.path!r} is neither a model folder nor a hub id (org/name)"
                + (" (it is a file)" if local.exists() else "")
            )
        return self


class DatasetSpec(_Section):
    """`kind: jsonl` reads a manifest of {id, image, question[, answers, box, domain]} lines (images relative to it);
    `kind: synthetic` generates the fine-grained digit scenes of `sdrpn_core.synthetic`; `kind: benchmark` reads
    a benchmark's files in their official / lmms-lab layout (`benchmark`: a name of `sdrpn_core.benchmarks`,
    `path`: the downloaded repository folder, a config folder, a file or a glob; `images`: the image folder where
    the layout keeps images apart; `split` / `config`: another split or config than the paper's)."""

    kind: Literal["jsonl", "synthetic", "benchmark"] = "jsonl"
    path: str | None = None
    benchmark: str | None = None  # scoring rules for jsonl / benchmark data (default: exact match)
    images: str | None = None
    split: str | None = None  # default: the split the paper evaluates (e.g. validation)
    config: str | None = None  # default: the benchmark's config (DocVQA vs InfographicVQA)
    # images are read only from the dataset's own folder, `images`, these roots and the store
    image_roots: list[str] = Field(default_factory=list)
    allow_http: bool = False  # http(s) images (under an image root) only when switched on
    n: Positive = 64
    seed: int = 0
    variant: Literal["select", "single"] = "select"
    canvas: Annotated[int, Field(ge=32)] = 256
    limit: Positive | None = None
    # a seeded share of the rows held out (for calibration): `part` says which side this spec reads; the two sides
    # are disjoint by construction (`stages.data.holdout_part`)
    holdout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    holdout_seed: int = 0
    part: Literal["all", "scored", "held-out"] = "all"
    # adapter input settings for this dataset's evaluation, over `eval.inputs` (the authors' high-resolution pixel
    # budgets: {min_pixels: 451584, max_pixels: 2408448} for Qwen-7B's V*); evaluation datasets only
    inputs: dict[str, Any] = Field(default_factory=dict)

    @property
    def scored_as(self) -> str:
        """The benchmark whose rules score this data, as its `DatasetRef.benchmark` names it."""
        return self.benchmark or "synthetic"

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        if (self.part == "all") != (self.holdout == 0):
            raise ValueError(f"part {self.part!r} with holdout {self.holdout}: a held-out share needs a part, and back")
        if self.kind in ("jsonl", "benchmark") and not self.path:
            raise ValueError(f"path is required for kind {self.kind!r}")
        if self.kind == "benchmark" and not self.benchmark:
            raise ValueError("benchmark is required for kind 'benchmark'")
        if self.benchmark is not None:
            from sdrpn_core.benchmarks import BENCHMARKS

            try:
                BENCHMARKS.find(self.benchmark)
            except KeyError as e:
                raise ValueError(e.args[0]) from None
        if self.kind != "synthetic":
            _check_exists(self.path, "dataset path")
        _check_exists(self.images, "dataset images folder")
        return self


class TeacherSection(_Section):
    preset: str = "llava-1.5-7b"
    overrides: dict[str, Any] = Field(default_factory=dict)
    batch_size: Positive = 8
    max_new_tokens: Positive | None = None
    shards: Positive = 4
    chunk_size: Positive = 64
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

    @model_validator(mode="after")
    def _known_preset(self) -> TeacherSection:
        try:
            self.preset_obj()
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"teacher preset: {e}") from None
        return self

    def preset_obj(self) -> Preset:
        return get_preset(self.preset, **self.overrides)

    def label_inputs(self) -> dict[str, Any]:
        """The adapter input settings the teacher runs with: the preset's (the authors' label prompt), then ours."""
        return {**self.preset_obj().teacher_inputs, **self.inputs}


class SourceSpec(_Section):
    """One training source of several (`train_sources`): its data, and the teacher that labels it where it differs
    from the `teacher:` section (the authors label GQA with Qwen's natural heads and the grounding prompt, OCR-VQA
    with the textual heads). Each source has its own teacher and label fingerprints: changing one source re-runs
    only its rows. The RPN trains on the sources' labels merged, at the `teacher:` preset's K, T and recipe."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    data: DatasetSpec
    preset: str | None = None
    overrides: dict[str, Any] | None = None
    inputs: dict[str, Any] | None = None
    max_new_tokens: Positive | None = None

    def teacher(self, default: TeacherSection) -> TeacherSection:
        keys = ("preset", "overrides", "inputs", "max_new_tokens")
        changes = {k: getattr(self, k) for k in keys if k in self.model_fields_set}
        if "preset" in changes and "overrides" not in changes:
            changes["overrides"] = {}  # another preset's heads, not the default's overrides
        return TeacherSection.model_validate({**default.model_dump(), **changes})


class _DataclassSection(_Section):
    """A section whose fields are a core dataclass's own (same names, same types), each optional: what the YAML file
    leaves out comes from the preset, then from the dataclass's default. The dataclass validates the result."""

    def chosen(self) -> dict[str, Any]:
        """The fields the file set; `null` is "not set" (so a dumped and re-read section means the same)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def section_of(cls: type, doc: str, base: type[_DataclassSection] = _DataclassSection) -> type[_DataclassSection]:
    """The config section for dataclass `cls`: one optional field per dataclass field (but those `base` declares
    itself), unknown keys an error."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {
        f.name: (hints[f.name] | None, None) for f in dataclasses.fields(cls) if f.name not in base.model_fields
    }
    return create_model(
        cls.__name__.replace("Params", "").replace("Config", "") + "Section", __base__=base, __doc__=doc, **fields
    )


class _LabelBase(_DataclassSection):
    def params(self, preset: Preset) -> LabelParams:
        return LabelParams(**{"sink_thresh": preset.sink_thresh, "variant": preset.label_variant, **self.chosen()})


class _TrainBase(_DataclassSection):
    def params(self, preset: Preset) -> TrainConfig:
        """The preset's recipe under the chosen fields; `world_size: 0` is every visible GPU (1 without one)."""
        chosen = self.chosen()
        if chosen.get("world_size") == 0:
            import torch

            chosen["world_size"] = max(1, torch.cuda.device_count())
        base = {"K": preset.K, "T": preset.T, **preset.recipe}
        if "grad_accum" in chosen and "effective_batch" not in chosen:
            base.pop("effective_batch", None)  # an explicit accumulation replaces the recipe's effective batch
        return TrainConfig(**{**base, **chosen})


LabelSection = section_of(
    LabelParams, "`sdrpn_core.pseudo_labels.LabelParams`; sink_thresh and variant default to the preset's.", _LabelBase
)
TrainSection = section_of(
    TrainConfig,
    "`sdrpn_core.train.TrainConfig`; K, T and the recipe (lr, betas, batch, effective batch…) default to the "
    "preset's, which are the authors' for the family.",
    _TrainBase,
)


class _CalibrationBase(_DataclassSection):
    def params(self) -> CalibrationParams:
        return CalibrationParams(**self.chosen())


CalibrationSection = section_of(CalibrationParams, CalibrationParams.__doc__ or "", _CalibrationBase)


class _EvalBase(_DataclassSection):
    """Benchmarks and methods compared in one run: the fields of `sdrpn_core.methods.EvalParams` (generated), and
    what the run itself sets here. `threshold` / `max_new_tokens` left unset take each benchmark's authors' value
    for the model family; `default_threshold`, `vicrop_layer` (ViCrop's layer: the preset's first grounding layer,
    14 for LLaVA-1.5-7B) and `model_key` default to the preset's; `paper_model` names the paper's rows to print
    beside ours; `options.<method>` sets a method's own settings."""

    datasets: list[DatasetSpec] = Field(default_factory=lambda: [DatasetSpec(kind="synthetic", n=32, seed=1000)])
    paper_model: str | None = None
    # pieces per (benchmark, method): each is cached and committed on its own, and they run in parallel on the
    # runner's workers; a crash loses only the pieces in flight
    shards: Positive = 1
    # adapter input settings for evaluation alone, e.g. the authors' Qwen evaluation without square padding:
    # {pad_square: false}; recorded in protocol.json
    inputs: dict[str, Any] | None = None
    options: dict[str, dict[str, Any]] | None = None  # per method, its own settings (`EvalMethod.options`)
    # how `threshold: auto` / `mode: auto` are chosen (`sdrpn_core.calibrate`); its defaults when left out
    calibration: CalibrationSection | None = None  # type: ignore[valid-type]

    @field_validator("threshold", check_fields=False)
    @classmethod
    def _tau(cls, v: float | None) -> float | None:
        return check_threshold(v)

    @field_validator("methods", check_fields=False)
    @classmethod
    def _known_methods(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        from sdrpn_core.methods import METHODS

        unknown = [m for m in v or () if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown evaluation methods {unknown}; known: {', '.join(METHODS)}")
        return v

    @field_validator("datasets")
    @classmethod
    def _some(cls, v: list[DatasetSpec]) -> list[DatasetSpec]:
        if not v:
            raise ValueError("eval.datasets is empty: name at least one dataset")
        return v

    @field_validator("protocol", check_fields=False)
    @classmethod
    def _harness(cls, v: str | None) -> None:
        if v is not None:  # the harness behind the prompts and metrics, not a setting
            raise ValueError("eval.protocol names the harness; a protocol preset goes at the top: `protocol: paper`")

    def params(self, preset: Preset) -> EvalParams:
        """The run's evaluation parameters: the preset's τ, ViCrop layer and model under the chosen fields."""
        skip = ("datasets", "paper_model", "shards", "calibration")
        chosen = {k: v for k, v in self.chosen().items() if k not in skip}
        chosen["inputs"] = tuple(sorted((self.inputs or {}).items()))
        chosen["options"] = tuple(sorted((m, tuple(sorted(o.items()))) for m, o in (self.options or {}).items()))
        base = {
            "default_threshold": preset.roi_threshold,
            "vicrop_layer": min(preset.grounding),
            "model_key": preset.name.split("/")[0],
        }
        return EvalParams(**{**base, **chosen})

    def calibration_params(self) -> CalibrationParams:
        return self.calibration.params() if self.calibration is not None else CalibrationParams()


EvalSection = section_of(EvalParams, _EvalBase.__doc__ or "", _EvalBase)


class StoreSection(_Section):
    root: str = "data"
    endpoint_url: str | None = None

    def settings(self) -> StoreSettings:
        return StoreSettings(root=self.root, endpoint_url=self.endpoint_url)


class RunnerSection(_Section):
    """Where the mapped stages (teacher shards, evaluation pieces) run: `threads` (default, `n_workers` threads) or
    `dask` (prefect-dask): the `address` of a running scheduler, or a cluster started for the flow run with
    `n_workers` single-threaded workers, or with `gpus: all | N` one worker process per GPU, pinned to it."""

    kind: Literal["threads", "dask"] = "threads"
    address: str | None = None
    n_workers: Positive = 2
    processes: bool = True
    gpus: Literal["all"] | Positive | None = None

    @model_validator(mode="after")
    def _gpus_need_dask(self) -> RunnerSection:
        if self.gpus is not None and self.kind != "dask":
            raise ValueError("runner.gpus needs runner.kind: dask (one worker process per GPU)")
        return self


class PromotionSection(_Section):
    """The champion/challenger gate (`stages.promote`): a retrained RPN is promoted to the model's current one only
    if `method`'s metric (`metrics.<benchmark>`, default `score`) on each gate benchmark (`benchmarks`, default:
    every evaluated one) is not below the champion's by more than `tolerance` points. `enabled: false` promotes
    every RPN (the gate's comparison is skipped)."""

    enabled: bool = True
    benchmarks: list[str] = Field(default_factory=list)
    metrics: dict[str, str] = Field(default_factory=dict)
    method: str = "sdrpn"
    tolerance: Annotated[float, Field(ge=0)] = 0.0

    def gate(self) -> Gate:
        from stages.promote import Gate  # here: the stages that read config sections do not run the gate

        return Gate(
            enabled=self.enabled,
            benchmarks=tuple(self.benchmarks),
            metrics=tuple(sorted(self.metrics.items())),
            method=self.method,
            tolerance=self.tolerance,
        )

    def check(self, evaluated: list[str], methods: tuple[str, ...]) -> None:
        """The gate names benchmarks the run evaluates and an RPN method it runs (checked before any work)."""
        from sdrpn_core.methods import get_method

        for name in [*self.benchmarks, *self.metrics]:
            if name not in evaluated:
                raise ValueError(f"promotion: benchmark {name!r} is not evaluated (eval.datasets: {evaluated})")
        if "method" in self.model_fields_set and (self.method not in methods or not get_method(self.method).needs_rpn):
            raise ValueError(f"promotion.method {self.method!r} must be an RPN method of eval.methods {list(methods)}")


class PipelineConfig(_Section):
    name: str = "default"
    # `paper`: every setting the file leaves out as the authors ran the model (`paper_settings`); `fast`: sdrpn's
    # defaults (KV reuse, the family's auto dtype); protocol.json and the report name which
    protocol: Literal["fast", "paper"] = "fast"
    model: ModelSpec  # required: which MLLM (a folder, a hub id, the shipped nano or a tiny random one)
    train_data: DatasetSpec = Field(default_factory=lambda: DatasetSpec(kind="synthetic"))
    train_sources: list[SourceSpec] = Field(default_factory=list)  # several sources instead of train_data
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    labels: LabelSection = Field(default_factory=LabelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    store: StoreSection = Field(default_factory=StoreSection)
    runner: RunnerSection = Field(default_factory=RunnerSection)
    promotion: PromotionSection = Field(default_factory=PromotionSection)

    @model_validator(mode="before")
    @classmethod
    def _protocol(cls, raw: Any) -> Any:
        return paper_settings(raw) if isinstance(raw, dict) and raw.get("protocol") == "paper" else raw

    @model_validator(mode="after")
    def _resolvable(self) -> PipelineConfig:
        """The label and training parameters, resolved against the preset, are valid (checked before any work)."""
        preset = self.teacher.preset_obj()
        self.labels.params(preset)
        self.train.params(preset)
        methods = self.eval.params(preset).methods
        self.promotion.check([_benchmark_of(d) for d in self.eval.datasets], methods)
        if self.train_sources and "train_data" in self.model_fields_set:
            raise ValueError("set train_data (one source) or train_sources (several), not both")
        for name, data, _ in self.sources():
            if data.inputs:
                raise ValueError(f"{name}: `inputs` is for evaluation datasets; the teacher's are teacher.inputs")
        names = [s.name for s in self.train_sources]
        if len(set(names)) != len(names):
            raise ValueError(f"train_sources names must be unique, got {names}")
        for name, _, teacher in self.sources():
            other = teacher.preset_obj()
            if (other.K, other.T) != (preset.K, preset.T):
                raise ValueError(
                    f"train_sources.{name}: preset {other.name} has K={other.K}, T={other.T}, but the RPN is trained "
                    f"at {preset.name}'s K={preset.K}, T={preset.T}"
                )
        return self

    def sources(self) -> list[tuple[str, DatasetSpec, TeacherSection]]:
        """(name, data, teacher) per training source: `train_sources`, or the one `train_data` with `teacher` (split
        by source where the authors split it: `by_source`)."""
        if not self.train_sources:
            return self.by_source() or [("train", self.train_data, self.teacher)]
        return [(s.name, s.data, s.teacher(self.teacher)) for s in self.train_sources]

    def by_source(self) -> list[tuple[str, DatasetSpec, TeacherSection]]:
        """A single mix665k `train_data` (both sources) under a model whose presets have natural and textual heads
        (Qwen2.5-VL) is labelled as the authors label it: GQA rows with the natural heads and prompt, OCR-VQA rows
        with the textual ones, as two sources (`limit` stays the merged list's). Empty where that does not apply."""
        data = self.train_data
        if data.kind != "benchmark" or data.benchmark != "mix665k" or data.config is not None:
            return []
        model = self.teacher.preset.split("/")[0]
        presets = {"gqa": f"{model}/natural", "ocr_vqa": f"{model}/textual"}
        if not all(p in PRESETS for p in presets.values()):
            return []
        configured = get_preset(self.teacher.preset)
        out = []
        for source, name in presets.items():
            same = PRESETS[name] is configured  # the configured heads' overrides stay with them
            changes = {"preset": name, **({} if same else {"overrides": {}})}
            out.append((source, data.model_copy(update={"config": source}), self.teacher.model_copy(update=changes)))
        return out

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        """Load, resolve relative paths from the file's folder, validate; ConfigError naming the file otherwise."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a YAML mapping of sections, not a {type(raw).__name__}")
        resolve_paths(raw, path.resolve().parent)
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}" for err in e.errors())
            raise ConfigError(f"{path}: {problems}") from None


def paper_settings(raw: dict) -> dict:
    """`protocol: paper`: the authors' settings for the model (`PAPER_PROTOCOL`, by the teacher preset's model) in
    every place the file leaves them out: the model's dtype (the teacher's and the evaluation's), training's, pass 2
    recomputed, and each evaluation dataset's pixel range where its paper column was measured at another (Qwen's
    V* and HR-Bench). The file's own values win; the report marks the paper cells they make differ."""
    from sdrpn_core.benchmarks import get_benchmark
    from sdrpn_core.benchmarks.published import PAPER_PROTOCOL

    raw = copy.deepcopy(raw)
    teacher = raw.get("teacher") if isinstance(raw.get("teacher"), dict) else {}
    preset = str(teacher.get("preset", TeacherSection.model_fields["preset"].default))
    paper = PAPER_PROTOCOL.get(preset.split("/")[0])
    if paper is None:
        raise ValueError(f"protocol paper: the paper reports no protocol for preset {preset!r} (known: "
                         f"{', '.join(PAPER_PROTOCOL)}); use protocol: fast")  # fmt: skip
    for section, key, value in [("model", "dtype", paper.dtype), ("train", "dtype", paper.train_dtype)]:
        if isinstance(raw.setdefault(section, {}), dict):
            raw[section].setdefault(key, value)
    evaluation = raw.setdefault("eval", {})
    if not isinstance(evaluation, dict):
        return raw
    evaluation.setdefault("reuse_kv", paper.kv_reuse)
    for spec in evaluation.get("datasets") or []:
        if not isinstance(spec, dict) or not isinstance(spec.get("benchmark"), str):
            continue
        try:
            column = get_benchmark(spec["benchmark"]).paper_key
        except KeyError:
            continue  # an unknown name: the dataset's own validation says so
        if column in paper.columns and isinstance(spec.setdefault("inputs", {}), dict):
            low, high = paper.columns[column]
            spec["inputs"].setdefault("min_pixels", low)
            spec["inputs"].setdefault("max_pixels", high)
    return raw


def dataset_params(params: EvalParams, spec: DatasetSpec) -> EvalParams:
    """One evaluation dataset's parameters: its own `inputs` over the run's (`eval.inputs`)."""
    if not spec.inputs:
        return params
    return dataclasses.replace(params, inputs=tuple(sorted({**dict(params.inputs), **spec.inputs}.items())))


def _benchmark_of(spec: DatasetSpec) -> str:
    from sdrpn_core.benchmarks import get_benchmark

    return get_benchmark(spec.scored_as).name


def _fix(section: object, key: str, base: Path, *, hub_ok: bool = False) -> None:
    if not isinstance(section, dict) or not isinstance(section.get(key), str) or not section[key]:
        return
    value = section[key]
    if not is_local(value) or Path(value).is_absolute():
        return
    if hub_ok and not (base / value).exists() and HUB_ID.match(value):
        return  # a hub id such as llava-hf/llava-1.5-7b-hf, not a folder next to the config
    section[key] = str((base / value).resolve())


def _fix_dataset(spec: object, base: Path) -> None:
    _fix(spec, "path", base)
    _fix(spec, "images", base)
    if isinstance(spec, dict) and isinstance(spec.get("image_roots"), list):
        holder = {"v": None}
        for i, root in enumerate(spec["image_roots"]):
            holder["v"] = root
            _fix(holder, "v", base)
            spec["image_roots"][i] = holder["v"]


def resolve_paths(raw: dict, base: Path) -> None:
    """Relative local paths in a YAML file are relative to the file's folder (URLs and hub ids are left alone)."""
    _fix(raw.get("model"), "path", base, hub_ok=True)
    _fix(raw.get("store"), "root", base)
    _fix_dataset(raw.get("train_data"), base)
    sources = raw.get("train_sources")
    for source in sources if isinstance(sources, list) else []:
        if isinstance(source, dict):
            _fix_dataset(source.get("data"), base)
    datasets = (raw.get("eval") or {}).get("datasets") if isinstance(raw.get("eval"), dict) else None
    for spec in datasets if isinstance(datasets, list) else []:
        _fix_dataset(spec, base)
