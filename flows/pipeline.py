"""The Prefect flows: `sdrpn` (the whole pipeline) and its sub-flows, each usable alone.

sdrpn-labels:  model + samples → teacher shards (mapped, any task runner) → labels
sdrpn-train:   sdrpn-labels → train
sdrpn-eval:    model + RPN (trained here, or the store's latest for the model) + benchmark → evaluation pieces
               (one per method and shard, mapped) → merged scores
sdrpn:         sdrpn-train → sdrpn-eval → score table, report and links as Prefect artifacts

The mapped stages of one flow run share one task runner's workers (`flows.runners`): threads, or one Dask
cluster whose workers each load the model once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait

from flows.publish import publish_run, publish_scores, skipped
from flows.runners import RunnerFactory, model_bound, task_runners
from sdrpn_core.methods import EvalParams, get_method
from stages import data, evaluate, labels, model, release, score, teacher, train
from stages.config import DatasetSpec, PipelineConfig, TeacherSection
from stages.evaluate import EvalPiece, plan_pieces
from stages.labels import merge as merge_labels
from stages.refs import DatasetRef, EvalRef, LabelsRef, ModelRef, PieceRef, RpnRef, ShardSummary, TeacherRef
from storage.fingerprint import hash_obj
from tasks.stages import Found, stage_task

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def load_config(config: PipelineConfig | dict | None = None, config_path: str | None = None) -> PipelineConfig:
    if config is not None:
        return config if isinstance(config, PipelineConfig) else PipelineConfig.model_validate(config)
    return PipelineConfig.from_yaml(config_path or DEFAULT_CONFIG)


def _run_name() -> str:
    """Flow runs are named after the config and a short fingerprint of it (`default-3f9a21c0`)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    try:
        cfg = load_config(params.get("config"), params.get("config_path"))
    except Exception:  # a bad config is reported, naming the field, by the flow itself
        return f"{flow_run.flow_name}-invalid-config"
    return f"{cfg.name}-{hash_obj(cfg.model_dump(mode='json'))[:8]}"


def _call(task, *args, **kwargs):
    """Run a task in the current flow and return its value (a stage found in the store ends `Cached` by returning
    that state; its data is the stage's reference)."""
    return _run(task, *args, **kwargs)[0]


def _run(task, *args, **kwargs) -> tuple[Any, bool]:
    """(the task's value, whether it came from the cache)."""
    state = task(*args, return_state=True, **kwargs)
    return state.result(), state.name == "Cached"


@flow(name="sdrpn-teacher", flow_run_name="teacher[{dataset.name}]")
def teacher_flow(
    cfg: PipelineConfig, model: ModelRef, dataset: DatasetRef, t: TeacherSection | None = None
) -> list[ShardSummary]:
    """The teacher shards, mapped over the flow's task runner; each shard commits to the store independently."""
    t = t or cfg.teacher
    n = max(1, min(t.shards, dataset.rows))
    with model_bound(cfg.runner):
        futures = stage_task(teacher.SHARD).map(
            cfg.store.settings(),
            model,
            dataset,
            t.preset_obj(),
            list(range(n)),
            n,
            batch_size=t.batch_size,
            chunk_size=t.chunk_size,
            max_new_tokens=t.max_new_tokens,
            inputs=unmapped(t.label_inputs()),
        )
    wait(futures)  # every shard finishes (and commits) before one's failure is raised
    return [f.result() for f in futures]


def _model(cfg: PipelineConfig) -> ModelRef:
    """The model stage, after `nano_base` when the config retrains sdrpn-nano from scratch (a cached task)."""
    settings = cfg.store.settings()
    if cfg.model.source == "nano" and cfg.model.retrain:
        _call(stage_task(model.NANO_BASE), cfg.model.nano, settings)
    return stage_task(model.MODEL)(cfg.model, settings)


def _samples(spec: DatasetSpec, settings, role: str) -> DatasetRef:
    """The samples stage, its run named for the role: `samples[train]`, `samples[eval:<benchmark>]`."""
    return stage_task(data.SAMPLES).with_options(task_run_name=f"samples[{role}]")(spec, settings)


def _source_labels(
    cfg: PipelineConfig, model_ref: ModelRef, name: str, spec: DatasetSpec, t: TeacherSection, runners: RunnerFactory
) -> LabelsRef:
    """One training source: its samples, its teacher (own preset and inputs) and its labels, each cached alone."""
    settings = cfg.store.settings()
    dataset = _samples(spec, settings, "train" if name == "train" else f"train:{name}")
    rows = _teacher(cfg, model_ref, dataset, t, runners)
    params = labels.LABELS.config(cfg, t.preset_obj())
    ref = _call(stage_task(labels.LABELS), settings, dataset, rows.fingerprint, params)
    get_run_logger().info("%s: teacher rows at %s; labels %s", name, rows.url, ref.stats)
    return ref


def _teacher(
    cfg: PipelineConfig, model_ref: ModelRef, dataset: DatasetRef, t: TeacherSection, runners: RunnerFactory
) -> TeacherRef:
    """The teacher's rows for the dataset: its shards (a sub-flow) when a sample lacks one; none started when the
    store holds them all (a sub-flow costs its start and its heartbeat, about two seconds, for nothing)."""
    found = teacher.finished(_store(cfg), model_ref, dataset, t.preset_obj(), t.max_new_tokens, t.label_inputs())
    if found is not None:
        get_run_logger().info("teacher[%s]: every sample's rows found in the store, no shard started", dataset.name)
        return found
    shards = teacher_flow.with_options(task_runner=runners())(cfg, model_ref, dataset, t)
    rejected = sum(s.rejected for s in shards)
    return TeacherRef(shards[0].teacher, shards[0].url, sum(s.rows for s in shards) - rejected, rejected)


def _labels(cfg: PipelineConfig, runners: RunnerFactory) -> tuple[ModelRef, LabelsRef]:
    model_ref = _model(cfg)
    parts = [(name, _source_labels(cfg, model_ref, name, spec, t, runners)) for name, spec, t in cfg.sources()]
    return model_ref, merge_labels(parts)


def _train(cfg: PipelineConfig, model_ref: ModelRef, labels_ref: LabelsRef) -> RpnRef:
    preset = cfg.teacher.preset_obj()
    params = train.TRAIN.config(cfg, preset)
    return _call(stage_task(train.TRAIN), cfg.store.settings(), model_ref, labels_ref, params, preset.name)


def _eval_params(cfg: PipelineConfig) -> EvalParams:
    return evaluate.PIECE.config(cfg, cfg.teacher.preset_obj())


@flow(name="sdrpn-evaluate", flow_run_name="evaluate[{dataset.benchmark}] pieces")
def evaluate_flow(
    cfg: PipelineConfig, model: ModelRef, rpn: RpnRef | None, dataset: DatasetRef, pieces: list[EvalPiece]
) -> list[PieceRef]:
    """The evaluation pieces, mapped over the flow's task runner; each commits to the store when it finishes."""
    with model_bound(cfg.runner):
        futures = stage_task(evaluate.PIECE).map(
            unmapped(cfg.store.settings()),
            unmapped(model),
            unmapped(rpn),
            unmapped(dataset),
            unmapped(_eval_params(cfg)),
            pieces,
        )
    wait(futures)  # every piece finishes (and commits) before one's failure is raised
    return [f.result() for f in futures]


def _eval(
    cfg: PipelineConfig, model: ModelRef, rpn: RpnRef | None, runners: RunnerFactory
) -> tuple[list[EvalRef], bool]:
    """Per benchmark: its samples, the pieces not yet in the store (mapped), then the scores → (results, whether
    every one came from the cache)."""
    settings, params, results, all_cached = cfg.store.settings(), _eval_params(cfg), [], True
    for spec in cfg.eval.datasets:
        dataset = _samples(spec, settings, f"eval:{spec.benchmark or spec.kind}")
        pieces = plan_pieces(_store(cfg), model, rpn, dataset, params, cfg.eval.shards)
        found = score.SCORE.find({"store": _store(cfg), "dataset": dataset, "params": params, "pieces": pieces})
        if found is None:  # the answers first; a scored evaluation found needs none of them
            evaluate_flow.with_options(task_runner=runners())(cfg, model, rpn, dataset, pieces)
        ref, was_cached = _run(stage_task(score.SCORE), settings, dataset, params, pieces, found=Found(found))
        results.append(ref)
        all_cached &= was_cached
    return results, all_cached


def _store(cfg: PipelineConfig):
    from stages.common import get_store

    return get_store(cfg.store.settings())


@flow(name="sdrpn-labels", flow_run_name=_run_name)
def labels_flow(config: PipelineConfig | None = None, config_path: str | None = None) -> LabelsRef:
    """Teacher extraction and pseudo-labels for the training data."""
    cfg = load_config(config, config_path)
    with task_runners(cfg.runner) as runners:
        return _labels(cfg, runners)[1]


@flow(name="sdrpn-train", flow_run_name=_run_name)
def train_flow(config: PipelineConfig | None = None, config_path: str | None = None) -> RpnRef:
    """Labels, then the RPN."""
    cfg = load_config(config, config_path)
    with task_runners(cfg.runner) as runners:
        return _train(cfg, *_labels(cfg, runners))


@flow(name="sdrpn-eval", flow_run_name=_run_name)
def eval_flow(config: PipelineConfig | None = None, config_path: str | None = None) -> list[EvalRef]:
    """Evaluation with the newest RPN trained for the model in this store."""
    cfg = load_config(config, config_path)
    model_ref = _model(cfg)
    methods = _eval_params(cfg).methods
    rpn = _latest_rpn(cfg, model_ref) if any(get_method(m).needs_rpn for m in methods) else None
    with task_runners(cfg.runner) as runners:
        results, all_cached = _eval(cfg, model_ref, rpn, runners)
    if all_cached:
        skipped("every evaluation")
    else:
        markdown = publish_scores(cfg, _store(cfg), model_ref, results)
        create_markdown_artifact(key="sdrpn-eval-report", markdown=markdown, description=f"{cfg.name}: scores")
    return results


def _latest_rpn(cfg: PipelineConfig, model: ModelRef) -> RpnRef:
    from storage.artifacts import ArtifactStore

    fp = ArtifactStore(_store(cfg)).latest(model.fingerprint, "rpn")
    ref = train.lookup(_store(cfg), fp) if fp is not None else None
    if ref is None:
        raise ValueError(f"no trained RPN for model {model.fingerprint} in {cfg.store.root}: run `sdrpn train` first")
    return ref


@flow(name="sdrpn", flow_run_name=_run_name, log_prints=True)
def sdrpn(config: PipelineConfig | None = None, config_path: str | None = None) -> dict:
    """The whole pipeline: teacher → labels → RPN → evaluation, every stage cached on its fingerprint."""
    cfg = load_config(config, config_path)
    with task_runners(cfg.runner) as runners:
        model_ref, labels_ref = _labels(cfg, runners)
        rpn = _train(cfg, model_ref, labels_ref)
        results, _ = _eval(cfg, model_ref, rpn, runners)
    shared, was_cached = _run(stage_task(release.RELEASE), cfg.store.settings(), model_ref, rpn, labels_ref, results)
    if was_cached:  # the same RPN and evaluations as a run that published them
        skipped("the RPN and every evaluation")
    else:
        publish_run(cfg, _store(cfg), model_ref, labels_ref, rpn, results, shared)
    summary = {
        "model": model_ref.fingerprint,
        "labels": labels_ref.url,
        "rpn": rpn.url,
        "release": shared,
        "eval": [r.url for r in results],
        "scores": [s for r in results for s in r.scores],
    }
    print(summary)
    return summary
