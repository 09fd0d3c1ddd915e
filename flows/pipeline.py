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

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, tags, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait
from prefect.states import Completed, State

from flows.publish import key, publish_decision, publish_run, publish_scores, skipped
from flows.runners import RunnerFactory, model_bound, task_runners
from sdrpn_core.methods import EvalParams, get_method
from stages import calibrate, data, evaluate, labels, model, promote, release, score, teacher, train
from stages.config import DatasetSpec, PipelineConfig, TeacherSection, dataset_params
from stages.evaluate import EvalPiece, by_shard, plan_pieces
from stages.labels import merge as merge_labels
from stages.refs import (
    CalibrationRef,
    DatasetRef,
    EvalRef,
    LabelsRef,
    ModelRef,
    PieceRef,
    RpnRef,
    ShardSummary,
    TeacherRef,
)
from storage.champion import Champions
from storage.fingerprint import hash_obj
from tasks.stages import CONFIG_TAG, Found, stage_task

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def load_config(config: PipelineConfig | dict | None = None, config_path: str | None = None) -> PipelineConfig:
    if config is not None:
        return config if isinstance(config, PipelineConfig) else PipelineConfig.model_validate(config)
    return PipelineConfig.from_yaml(config_path or DEFAULT_CONFIG)


def _run_name() -> str:
    """Flow runs are named after the config and the run's (scheduled) start, UTC, to the second
    (`default-2026-12-07T03-00-00`); the config's fingerprint is a tag (`config-fp:3f9a21c0`)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    try:
        cfg = load_config(params.get("config"), params.get("config_path"))
    except Exception:  # a bad config is reported, naming the field, by the flow itself
        return f"{flow_run.flow_name}-invalid-config"
    start = flow_run.scheduled_start_time or datetime.now(UTC)
    return f"{cfg.name}-{start.astimezone(UTC):%Y-%m-%dT%H-%M-%S}"


@contextmanager
def _labelled(cfg: PipelineConfig) -> Iterator[None]:
    """Tags the flow run with its config's name and fingerprint (the UI filters on them), and every task run in it
    with the name (progress artifacts are keyed under it)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    labels = [f"{CONFIG_TAG}{cfg.name}", f"config-fp:{hash_obj(cfg.model_dump(mode='json'))[:8]}"]
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=sorted({*flow_run.tags, *labels}))
    with tags(labels[0]):
        yield


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
    return evaluate.PIECES.config(cfg, cfg.teacher.preset_obj())


@flow(name="sdrpn-evaluate", flow_run_name="evaluate[{dataset.benchmark}] pieces")
def evaluate_flow(
    cfg: PipelineConfig,
    model: ModelRef,
    rpn: RpnRef | None,
    dataset: DatasetRef,
    params: EvalParams,
    pieces: list[EvalPiece],
) -> list[PieceRef]:
    """The evaluation pieces, a task per shard (its methods read each image once), mapped over the flow's task
    runner; each piece commits to the store when its shard finishes."""
    with model_bound(cfg.runner):
        futures = stage_task(evaluate.PIECES).map(
            unmapped(cfg.store.settings()),
            unmapped(model),
            unmapped(rpn),
            unmapped(dataset),
            unmapped(params),
            by_shard(pieces),
        )
    wait(futures)  # every shard finishes (and commits) before one's failure is raised
    return [ref for f in futures for ref in f.result()]


def _calibrated(
    cfg: PipelineConfig, model: ModelRef, rpn: RpnRef, spec: DatasetSpec, params: EvalParams
) -> tuple[DatasetSpec, EvalParams, CalibrationRef]:
    """`auto` τ / mode for one benchmark: its calibration split's samples, the calibrate stage → (the spec to
    score, a held-out share left out; the parameters with the chosen values; the calibration)."""
    settings, calibration = cfg.store.settings(), cfg.eval.calibration_params()
    scored, held, split = calibrate.calibration_split(spec, calibration)
    data = _samples(held, settings, f"calibrate:{spec.benchmark or spec.kind}")
    ref = _call(stage_task(calibrate.CALIBRATE), settings, model, rpn, data, params, calibration, split)
    return scored, calibrate.resolve(params, ref), ref


def _eval(
    cfg: PipelineConfig, model: ModelRef, rpn: RpnRef | None, runners: RunnerFactory, only: tuple[str, ...] = ()
) -> tuple[list[EvalRef], bool]:
    """Per benchmark (`only` these, if named): its τ and mode calibrated when `auto`, its samples, the pieces not
    yet in the store (mapped), then the scores → (results, whether every one came from the cache)."""
    settings, configured, results, all_cached = cfg.store.settings(), _eval_params(cfg), [], True
    for spec in cfg.eval.datasets:
        if only and spec.scored_as not in only:
            continue
        params = dataset_params(configured, spec)
        if params.calibrated and rpn is not None:
            spec, params, _ = _calibrated(cfg, model, rpn, spec, params)
        dataset = _samples(spec, settings, f"eval:{spec.benchmark or spec.kind}")
        pieces = plan_pieces(_store(cfg), model, rpn, dataset, params, cfg.eval.shards)
        scoring = {"dataset": dataset, "params": params, "pieces": pieces, "preset": cfg.protocol}
        found = score.SCORE.find({"store": _store(cfg), **scoring})
        if found is None:  # the answers first; a scored evaluation found needs none of them
            evaluate_flow.with_options(task_runner=runners())(cfg, model, rpn, dataset, params, pieces)
        ref, was_cached = _run(stage_task(score.SCORE), settings, **scoring, found=Found(found))
        results.append(ref)
        all_cached &= was_cached
    return results, all_cached


def _promote(
    cfg: PipelineConfig, model: ModelRef, rpn: RpnRef, results: list[EvalRef], release_url: str, runners: RunnerFactory
) -> dict | None:
    """Champion and challenger (`stages.promote`): the decision on the run's release, recorded, announced and
    published once; None when there is nothing to decide (the release is the champion already, or the gate's
    method was not evaluated)."""
    logger, gate, champions = get_run_logger(), cfg.promotion.gate(), Champions(_store(cfg))
    if gate.method not in _eval_params(cfg).methods:
        logger.info("promotion: %s is not evaluated in this run; the champion is left as it is", gate.method)
        return None
    challenger = promote.Candidate(release_url.rstrip("/").rsplit("/", 1)[-1], rpn.fingerprint, release_url)
    current = champions.current(model.fingerprint)
    if current is not None and current.release == challenger.release:
        logger.info("promotion: release %s is the champion already", challenger.release[:12])
        return None
    champion = promote.Candidate(current.release, current.rpn, current.url) if current else None
    earlier = champions.decided(model.fingerprint, promote.decision_id(challenger, champion, gate))
    if earlier is not None:  # found before the champion is evaluated again for it
        logger.info("promotion decided before (not announced again): %s", promote.summary(earlier))
        if earlier["promoted"]:
            champions.promote(earlier)  # completes a promotion a crash interrupted
        return earlier
    rows, why = [], ""
    if champion is not None and gate.enabled:
        rows, why = _against(cfg, model, results, champion, gate, runners)
    decision = promote.decide(model, challenger, champion, rows, gate, why)
    champions.record(decision)
    publish_decision(cfg, _store(cfg), decision)
    return decision


def _against(
    cfg: PipelineConfig,
    model: ModelRef,
    results: list[EvalRef],
    champion: promote.Candidate,
    gate: promote.Gate,
    runners: RunnerFactory,
) -> tuple[list[dict], str]:
    """The champion evaluated on the same samples of the gate benchmarks (pieces an earlier run answered are
    read, not answered again) → (side-by-side rows, or a reason to promote without them)."""
    theirs = train.lookup(_store(cfg), champion.rpn)
    if theirs is None:
        return [], f"the champion's RPN {champion.rpn[:12]} is gone from the store (or fails verification)"
    get_run_logger().info("promotion: evaluating the champion %s on the gate benchmarks", champion.release[:12])
    benchmarks = gate.benchmarks or tuple(r.benchmark for r in results)
    champion_results, _ = _eval(cfg, model, theirs, runners, only=benchmarks)
    return promote.compare(results, champion_results, gate), ""


def _store(cfg: PipelineConfig):
    from stages.common import get_store

    return get_store(cfg.store.settings())


@flow(name="sdrpn-labels", flow_run_name=_run_name)
def labels_flow(config: PipelineConfig | None = None, config_path: str | None = None) -> LabelsRef:
    """Teacher extraction and pseudo-labels for the training data."""
    cfg = load_config(config, config_path)
    with _labelled(cfg), task_runners(cfg.runner) as runners:
        return _labels(cfg, runners)[1]


@flow(name="sdrpn-train", flow_run_name=_run_name)
def train_flow(config: PipelineConfig | None = None, config_path: str | None = None) -> RpnRef:
    """Labels, then the RPN."""
    cfg = load_config(config, config_path)
    with _labelled(cfg), task_runners(cfg.runner) as runners:
        return _train(cfg, *_labels(cfg, runners))


@flow(name="sdrpn-eval", flow_run_name=_run_name)
def eval_flow(config: PipelineConfig | None = None, config_path: str | None = None) -> list[EvalRef]:
    """Evaluation with the model's champion RPN in this store (else its newest trained one)."""
    cfg = load_config(config, config_path)
    with _labelled(cfg):
        model_ref = _model(cfg)
        methods = _eval_params(cfg).methods
        rpn = current_rpn(_store(cfg), model_ref) if any(get_method(m).needs_rpn for m in methods) else None
        with task_runners(cfg.runner) as runners:
            results, all_cached = _eval(cfg, model_ref, rpn, runners)
        if all_cached:
            skipped("every evaluation", cfg, _store(cfg))
        else:
            markdown = publish_scores(cfg, _store(cfg), model_ref, results)
            create_markdown_artifact(key=key(cfg, "eval-report"), markdown=markdown, description=f"{cfg.name}: scores")
    return results


@flow(name="sdrpn-calibrate", flow_run_name=_run_name)
def calibrate_flow(
    config: PipelineConfig | None = None, config_path: str | None = None
) -> list[tuple[CalibrationRef, dict]]:
    """τ and the crop mode per benchmark of `eval.datasets`, chosen for the model's champion RPN (else its newest)
    on each one's calibration split → (the calibration, its calibration.json) per benchmark."""
    cfg = load_config(config, config_path)
    out = []
    with _labelled(cfg):
        model_ref = _model(cfg)
        rpn, params = current_rpn(_store(cfg), model_ref), _eval_params(cfg)
        for spec in cfg.eval.datasets:
            ref = _calibrated(cfg, model_ref, rpn, spec, dataset_params(params, spec))[2]
            out.append((ref, calibrate.read(_store(cfg), ref)))
        create_markdown_artifact(
            key=key(cfg, "calibration"), markdown=calibrate.markdown(out), description=f"{cfg.name}: calibration"
        )
    return out


def current_rpn(store, model: ModelRef) -> RpnRef:
    """The RPN `sdrpn eval` uses: the model's champion (`storage.champion`), else the newest trained for it."""
    from storage.artifacts import ArtifactStore

    champion = Champions(store).current(model.fingerprint)
    fp = champion.rpn if champion else ArtifactStore(store).latest(model.fingerprint, "rpn")
    ref = train.lookup(store, fp) if fp is not None else None
    if ref is None:
        raise ValueError(f"no trained RPN for model {model.fingerprint} in {store.url()}: run `sdrpn train` first")
    what = f"the champion (release {champion.release[:12]})" if champion else "the newest trained (no champion yet)"
    get_run_logger().info("evaluating RPN %s: %s", fp[:12], what)
    return ref


@flow(name="sdrpn", flow_run_name=_run_name, log_prints=True)
def sdrpn(config: PipelineConfig | None = None, config_path: str | None = None) -> dict | State:
    """The whole pipeline: teacher → labels → RPN → evaluation → release → promotion, every stage cached on its
    fingerprint. A promotion decision is the run's state message (a rejection ends `Completed`: it is a result)."""
    cfg = load_config(config, config_path)
    with _labelled(cfg), task_runners(cfg.runner) as runners:
        model_ref, labels_ref = _labels(cfg, runners)
        rpn = _train(cfg, model_ref, labels_ref)
        results, _ = _eval(cfg, model_ref, rpn, runners)
        settings = cfg.store.settings()
        shared, was_cached = _run(stage_task(release.RELEASE), settings, model_ref, rpn, labels_ref, results)
        if was_cached:  # the same RPN and evaluations as a run that published them
            skipped("the RPN and every evaluation", cfg, _store(cfg))
        else:
            publish_run(cfg, _store(cfg), model_ref, labels_ref, rpn, results, shared)
        decision = _promote(cfg, model_ref, rpn, results, shared, runners)
    summary = {
        "model": model_ref.fingerprint,
        "labels": labels_ref.url,
        "rpn": rpn.url,
        "release": shared,
        "eval": [r.url for r in results],
        "scores": [s for r in results for s in r.scores],
        "promotion": decision,
    }
    print(summary)
    return Completed(message=promote.summary(decision), data=summary) if decision else summary
