"""One thin Prefect task per pipeline stage. Each calls its `stages.*` function and holds no method logic.

Cache keys are the stages' content fingerprints (model + data + parameters + code version), so "is it done?" has
the same answer in Prefect's cache and in the store. I/O-bound stages retry with exponential backoff; the
model-bound ones carry the `sdrpn-gpu` tag, so `prefect concurrency-limit create sdrpn-gpu 1` serialises them
on a one-GPU worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff

from sdrpn_core.presets import Preset
from sdrpn_core.pseudo_labels import LabelParams
from sdrpn_core.train import TrainConfig
from stages import data, evaluate, labels, model, teacher, train
from stages.common import get_store
from stages.config import DatasetSpec, ModelSpec
from stages.refs import DatasetRef, EvalRef, LabelsRef, ModelRef, RpnRef, ShardSummary
from storage.store import StoreSettings

GPU_TAG = "sdrpn-gpu"
IO_RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2), "retry_jitter_factor": 0.2}


def _fp_key(stage: str) -> Callable:
    return lambda _ctx, params: f"sdrpn-{stage}-{params['fp']}"


def _progress(key: str, what: str) -> Callable[[int, int], None]:
    """A Prefect progress artifact, updated at most once a second."""
    artifact = create_progress_artifact(progress=0.0, key=key, description=what)
    last = [0.0]

    def update(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or done >= total:
            last[0] = now
            update_progress_artifact(artifact_id=artifact, progress=100.0 * done / max(total, 1))

    return update


@task(name="nano_base", tags=[GPU_TAG], cache_key_fn=_fp_key("nano_base"))
def nano_base_task(overrides: dict, settings: StoreSettings, fp: str) -> str:
    progress = _progress("nano-base", "training sdrpn-nano from scratch")
    return model.nano_base(overrides, get_store(settings), fp, progress)


@task(name="model", **IO_RETRIES)
def model_task(spec: ModelSpec, settings: StoreSettings) -> ModelRef:
    return model.resolve_model(spec, get_store(settings))


@task(name="samples", **IO_RETRIES)
def samples_task(spec: DatasetSpec, settings: StoreSettings) -> DatasetRef:
    return data.build_manifest(spec, get_store(settings))


@task(
    name="teacher-shard",
    tags=[GPU_TAG],
    retries=1,
    cache_key_fn=lambda _ctx, p: f"sdrpn-teacher-{p['fp']}-{p['dataset'].fingerprint}-{p['shard']}of{p['n_shards']}",
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
) -> ShardSummary:
    progress = _progress(f"teacher-shard-{shard}", f"teacher extraction, shard {shard + 1}/{n_shards}")
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
    get_run_logger().info("shard %d: %s", shard, summary)
    return summary


@task(name="labels", cache_key_fn=_fp_key("labels"), **IO_RETRIES)
def labels_task(
    settings: StoreSettings, dataset: DatasetRef, teacher_fp: str, params: LabelParams, fp: str
) -> LabelsRef:
    ref = labels.denoise(get_store(settings), dataset, teacher_fp, params, fp)
    get_run_logger().info("labels: %s", ref.stats)
    return ref


@task(name="train", tags=[GPU_TAG], cache_key_fn=_fp_key("train"))
def train_task(
    settings: StoreSettings, model_ref: ModelRef, labels_ref: LabelsRef, params: TrainConfig, preset: str, fp: str
) -> RpnRef:
    progress = _progress("train-progress", "RPN training steps")
    return train.train(get_store(settings), model_ref, labels_ref, params, fp, preset, progress=progress)


@task(name="evaluate", tags=[GPU_TAG], cache_key_fn=_fp_key("eval"))
def eval_task(
    settings: StoreSettings,
    model_ref: ModelRef,
    rpn: RpnRef | None,
    dataset: DatasetRef,
    params: evaluate.EvalParams,
    fp: str,
) -> EvalRef:
    return evaluate.evaluate(get_store(settings), model_ref, rpn, dataset, params, fp)
