"""The `train` stage: the RPN on a label dataset's usable rows → a checkpoint artifact `<root>/rpn/<fp>/`.

Checkpoints go to a local scratch folder keyed by the fingerprint, so a crashed run resumes where it stopped."""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from sdrpn_core.train import CHECKPOINT_DIR, TrainConfig, latest_checkpoint, recipe_record, samples_from_rows, train_rpn
from stages.code import library_versions
from stages.common import Stage, cache_dir, load_model
from stages.refs import LabelsRef, ModelRef, RpnRef
from storage.artifacts import ArtifactStore
from storage.fingerprint import hash_obj, stage_fingerprint
from storage.labels import label_dataset
from storage.store import Store, StoreError

log = logging.getLogger(__name__)


def train_fingerprint(model: ModelRef, labels: LabelsRef, params: TrainConfig, preset: str) -> str:
    inputs = {"model": model.fingerprint, "labels": labels.fingerprint}
    return stage_fingerprint("train", inputs, {"train": params, "preset": preset}, code=TRAIN.code_version())


def rpn_ref(arts: ArtifactStore, fp: str, manifest: dict) -> RpnRef:
    """The reference to a committed RPN artifact, from its validated marker."""
    meta = manifest["meta"]
    steps, loss = meta.get("steps"), meta.get("final_loss")
    if not isinstance(steps, int) or not isinstance(loss, (int, float)):
        raise StoreError(f"{arts.url('rpn', fp)}: marker meta lacks steps / final_loss")
    return RpnRef(fp, arts.url("rpn", fp), steps, float(loss))


def train_scratch(store: Store, train_fp: str) -> Path:
    """The local checkpoint folder of one training on one store. Keyed by the store too: another store's run of the
    same fingerprint (a test, a colleague's bucket) must never be resumed from here."""
    return cache_dir("train", hash_obj(store.url(""))[:12], train_fp)


def lookup(store: Store, train_fp: str) -> RpnRef | None:
    """The trained RPN, if committed and every file matches its marker."""
    arts = ArtifactStore(store)
    manifest = arts.verify("rpn", train_fp)
    return None if manifest is None else rpn_ref(arts, train_fp, manifest)


def training_frame(store: Store, labels: LabelsRef, params: TrainConfig) -> pl.DataFrame:
    """The rows trained on, sorted by sample id: the training order must not depend on the order shards were
    committed in (threads, workers). Strict: a label shard that no longer matches its record is an error naming it
    (the next run relabels)."""
    parts = [label_dataset(store, fp).scan(strict=True) for fp in labels.label_fingerprints()]
    merged = pl.concat(parts).unique(subset=["sample_id"], keep="first", maintain_order=True)  # first source wins
    frame = (merged if params.keep_all_ignore else merged.filter(pl.col("valid"))).sort("sample_id").collect()
    if frame.filter(pl.col("valid")).height == 0:
        raise ValueError(
            f"no usable labels in {labels.url}: all {labels.rows} samples are all-ignore or were rejected "
            f"({labels.stats.get('ignored_because', {})}); loosen the label parameters or check the teacher heads"
        )
    return frame


def train_here(
    store: Store,
    model: ModelRef,
    labels: LabelsRef,
    params: TrainConfig,
    train_fp: str,
    preset: str,
    progress: Callable[[int, int], None] | None = None,
) -> TrainSummary:
    """Train in this process (one rank of a torchrun group, or alone); the main rank writes the artifact folder
    into the scratch and returns its summary."""
    from sdrpn_core.train import Ranks

    frame = training_frame(store, labels, params)
    adapter = load_model(model)
    if params.inputs:  # e.g. Qwen: the authors' training prompt (a literal "<image>" line, the question as given)
        adapter = adapter.with_inputs(**params.inputs)
    scratch = train_scratch(store, train_fp)
    result = train_rpn(
        adapter,
        samples_from_rows(frame.to_dicts()),
        params,
        out_dir=scratch,
        rpn_fields={
            "preset": preset,
            "base_model": model.path,
            "base_model_fingerprint": model.fingerprint,
            "base_model_dtype": model.dtype,
        },
        progress=progress,
    )
    summary = TrainSummary(
        result.steps, float(result.history[-1]["loss"]), result.skipped_all_ignore, len(result.rejected)
    )
    if Ranks.current().main:
        out = scratch / "artifact"
        shutil.rmtree(out, ignore_errors=True)
        result.rpn.save(out)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(result.history), buf)
        (out / "train_log.parquet").write_bytes(buf.getvalue())
        (out / "train_recipe.json").write_text(json.dumps(recipe_record(params), indent=2))
        (out / INFERENCE).write_text(json.dumps(training_inference_defaults(preset), indent=2))
        (scratch / "summary.json").write_text(json.dumps(asdict(summary)))
    return summary


INFERENCE = "inference.json"  # the settings `sdrpn predict` takes unless told otherwise


def training_inference_defaults(preset: str) -> dict:
    """Until an evaluation records what it ran with (the release), the preset's τ, the mask mode and the family's
    generation limit (None)."""
    from sdrpn_core.presets import get_preset

    return {
        "threshold": get_preset(preset).roi_threshold,
        "mode": "mask",
        "max_new_tokens": None,
        "reuse_kv": True,
        "source": f"training: preset {preset}",
    }


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    final_loss: float
    skipped_all_ignore: int
    rejected: int


def train(
    store: Store,
    model: ModelRef,
    labels: LabelsRef,
    params: TrainConfig,
    train_fp: str,
    preset: str,
    progress: Callable[[int, int], None] | None = None,
) -> RpnRef:
    """Train (in this process, or with `world_size` > 1 on a torchrun group), then commit the RPN artifact."""
    if (ref := lookup(store, train_fp)) is not None:
        return ref
    scratch = train_scratch(store, train_fp)
    if latest_checkpoint(scratch / CHECKPOINT_DIR) is not None:
        log.warning("%s holds a checkpoint of an interrupted run of this training on this store: resuming it", scratch)
    if params.world_size > 1:
        from stages.train_ranks import launch

        summary = launch(store, model, labels, params, train_fp, preset, progress)
    else:
        summary = train_here(store, model, labels, params, train_fp, preset, progress)
    arts = ArtifactStore(store)
    meta = {
        **asdict(summary),
        "model": model.fingerprint,
        "effective_batch": params.samples_per_step,
        "libraries": library_versions(),
    }
    arts.put_dir("rpn", train_fp, scratch / "artifact", meta=meta)
    arts.set_latest(model.fingerprint, "rpn", train_fp)
    # the scratch only serves a resume after a crash: once committed it goes, so a later run whose artifact is
    # gone (deleted, or failing verification) trains afresh instead of "resuming" at the last step
    shutil.rmtree(scratch, ignore_errors=True)
    return RpnRef(train_fp, arts.url("rpn", train_fp), summary.steps, summary.final_loss)


TRAIN = Stage(
    "train",
    run=train,
    lookup=lookup,
    progress="RPN training steps",
    model_bound=True,
    retries=False,
    code=("stages.train", "stages.train_ranks"),  # the ranks run `stages.train_ranks` in their own processes
)
