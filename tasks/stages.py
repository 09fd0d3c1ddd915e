"""One thin Prefect task per pipeline stage. Each calls its `stages.*` function and holds no method logic.

The store is the only cache. Each stage's output lives under its content fingerprint (model + data + parameters
+ code version) and is verified against its commit records before it is reused; a task whose output is found
ends in a `Cached` state without running its stage. Prefect persists no results: its result records are
pickles, and a store others can write to must never hold anything that is executed on read.

Retries are for transient failures only (connection resets, timeouts, S3 5xx): a bad config, a missing file or
a validation error fails at once. The model-bound tasks carry the `sdrpn-gpu` tag, so
`prefect concurrency-limit create sdrpn-gpu 1` serialises them on a one-GPU worker.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from sdrpn_core.presets import Preset
from sdrpn_core.pseudo_labels import LabelParams
from sdrpn_core.train import TrainConfig
from stages import data, evaluate, labels, model, release, teacher, train
from stages.common import get_store
from stages.config import DatasetSpec, ModelSpec
from stages.refs import DatasetRef, EvalRef, LabelsRef, ModelRef, PieceRef, RpnRef, ShardSummary
from storage.store import StoreSettings, is_transient

GPU_TAG = "sdrpn-gpu"
STORE_IS_THE_CACHE = {"cache_policy": NO_CACHE, "persist_result": False}


def _retry_if_transient(_task, _run, state) -> bool:
    return is_transient(state.data) if isinstance(state.data, BaseException) else False


IO_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.2,
    "retry_condition_fn": _retry_if_transient,
}


def cached(ref: Any, what: str) -> State:
    """The `Cached` state for a stage whose output was found (and verified) in the store."""
    get_run_logger().info("%s: found in the store and verified, not recomputed", what)
    return Completed(name="Cached", data=ref, message=f"{what} found in the store")


class _Progress:
    """A Prefect progress artifact (described), updated at most once a second, and at 100 % when the stage ends
    however it ended its work (resumed, partly cached)."""

    def __init__(self, key: str, what: str):
        self.artifact = create_progress_artifact(progress=0.0, key=key, description=what)
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= 1.0 or done >= total:
            self.last = now
            update_progress_artifact(artifact_id=self.artifact, progress=100.0 * done / max(total, 1))

    def finish(self) -> None:
        update_progress_artifact(artifact_id=self.artifact, progress=100.0)


def _named(template: str) -> Callable[..., str]:
    """A task-run name from the call's parameters, e.g. `samples[eval:textvqa]`, `teacher-shard 3/8`."""

    def name(parameters: dict[str, Any]) -> str:
        return template.format(**parameters, shard1=parameters.get("shard", 0) + 1)

    return name


@task(name="nano_base", task_run_name="nano-base", tags=[GPU_TAG], **STORE_IS_THE_CACHE)
def nano_base_task(overrides: dict, settings: StoreSettings, fp: str) -> str | State:
    store = get_store(settings)
    if model.nano_base_lookup(store, fp):
        return cached(fp, f"sdrpn-nano base model {fp}")
    progress = _Progress("nano-base", "training sdrpn-nano from scratch")
    out = model.nano_base(overrides, store, fp, progress)
    progress.finish()
    return out


@task(name="model", task_run_name="model", **STORE_IS_THE_CACHE, **IO_RETRIES)
def model_task(spec: ModelSpec, settings: StoreSettings) -> ModelRef:
    return model.resolve_model(spec, get_store(settings))


@task(name="samples", task_run_name=_named("samples[{role}]"), **STORE_IS_THE_CACHE, **IO_RETRIES)
def samples_task(spec: DatasetSpec, settings: StoreSettings, role: str = "data") -> DatasetRef:
    """`role` names the run in the UI: `train`, `train:<source>` or `eval:<benchmark>`."""
    return data.build_manifest(spec, get_store(settings))


@task(
    name="teacher-shard",
    task_run_name=_named("teacher-shard {shard1}/{n_shards}"),
    tags=[GPU_TAG],
    **STORE_IS_THE_CACHE,
    **IO_RETRIES,
)
def teacher_shard_task(
    settings: StoreSettings,
    model_ref: ModelRef,
    dataset: DatasetRef,
    preset: Preset,
    fp: str,
    shard: int,
    n_shards: int,
    batch_size: int,
    chunk_size: int,
    max_new_tokens: int | None,
    inputs: dict | None = None,
) -> ShardSummary | State:
    """Extracts only the shard's samples that have no verified row yet; `Cached` when there were none."""
    progress = _Progress(f"teacher-shard-{shard}", f"teacher extraction, shard {shard + 1}/{n_shards}")
    summary = teacher.extract_shard(
        get_store(settings),
        model_ref,
        dataset,
        preset,
        fp,
        shard,
        n_shards,
        batch_size=batch_size,
        chunk_size=chunk_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
        inputs=inputs,
    )
    progress.finish()
    if summary.already_done == summary.rows:
        return cached(summary, f"teacher shard {shard + 1}/{n_shards}")
    get_run_logger().info("shard %d: %s", shard, summary)
    return summary


@task(name="labels", task_run_name=_named("labels[{dataset.name}]"), **STORE_IS_THE_CACHE, **IO_RETRIES)
def labels_task(
    settings: StoreSettings, dataset: DatasetRef, teacher_fp: str, params: LabelParams, fp: str
) -> LabelsRef | State:
    store = get_store(settings)
    if (ref := labels.lookup(store, fp)) is not None:
        return cached(ref, f"label set {fp}")
    progress = _Progress("labels-progress", f"pseudo-labels of {dataset.name or dataset.benchmark}: teacher rows read")
    ref = labels.denoise(store, dataset, teacher_fp, params, fp, progress)
    progress.finish()
    get_run_logger().info("labels: %s", ref.stats)
    return ref


@task(name="train", task_run_name="train", tags=[GPU_TAG], **STORE_IS_THE_CACHE)
def train_task(
    settings: StoreSettings, model_ref: ModelRef, labels_ref: LabelsRef, params: TrainConfig, preset: str, fp: str
) -> RpnRef | State:
    store = get_store(settings)
    if (ref := train.lookup(store, fp)) is not None:
        return cached(ref, f"RPN {fp}")
    progress = _Progress("train-progress", "RPN training steps")
    ref = train.train(store, model_ref, labels_ref, params, fp, preset, progress=progress)
    progress.finish()
    return ref


@task(
    name="evaluate-piece",
    task_run_name=_named("evaluate[{piece.name}]"),
    tags=[GPU_TAG],
    **STORE_IS_THE_CACHE,
    **IO_RETRIES,
)
def eval_piece_task(
    settings: StoreSettings,
    model_ref: ModelRef,
    rpn: RpnRef | None,
    dataset: DatasetRef,
    params: evaluate.EvalParams,
    piece: evaluate.EvalPiece,
) -> PieceRef | State:
    """One method on one shard of a benchmark; `Cached` when its committed predictions verify."""
    store = get_store(settings)
    if (ref := evaluate.piece_lookup(store, piece)) is not None:
        return cached(ref, f"evaluation piece {piece.name}")
    key = re.sub(r"[^a-z0-9-]+", "-", f"evaluate-{piece.benchmark}-{piece.method}-{piece.shard}".lower())
    progress = _Progress(key, f"evaluating {piece.name}: samples done")
    ref = evaluate.evaluate_piece(store, model_ref, rpn, dataset, params, piece, progress)
    progress.finish()
    return ref


@task(name="evaluate", task_run_name=_named("evaluate[{dataset.benchmark}]"), **STORE_IS_THE_CACHE, **IO_RETRIES)
def eval_task(
    settings: StoreSettings,
    dataset: DatasetRef,
    params: evaluate.EvalParams,
    fp: str,
    pieces: list[evaluate.EvalPiece],
) -> EvalRef | State:
    """The committed pieces merged into the benchmark's predictions, scores, report and gallery."""
    store = get_store(settings)
    if (ref := evaluate.lookup(store, fp, dataset.benchmark)) is not None:
        return cached(ref, f"evaluation of {dataset.name or dataset.benchmark} {fp}")
    return evaluate.merge(store, dataset, params, fp, pieces)


@task(name="release", task_run_name="release", **STORE_IS_THE_CACHE, **IO_RETRIES)
def release_task(
    settings: StoreSettings,
    model_ref: ModelRef,
    rpn: RpnRef,
    labels_ref: LabelsRef,
    evals: list[EvalRef],
    fp: str,
) -> str | State:
    """The trained RPN as a shareable folder with its model card; `Cached` when committed."""
    store = get_store(settings)
    if (url := release.lookup(store, fp)) is not None:
        return cached(url, f"release {fp}")
    return release.release(store, model_ref, rpn, labels_ref, evals, fp)
