"""The `train` stage: the RPN on a label dataset's usable rows → a checkpoint artifact `<root>/rpn/<fp>/`.

Checkpoints go to a local scratch folder keyed by the fingerprint, so a crashed run resumes where it stopped."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict

from sdrpn_core.train import CHECKPOINT_DIR, TrainConfig, latest_checkpoint
from stages.code import library_versions
from stages.common import Stage
from stages.refs import LabelsRef, ModelRef, RpnRef
from stages.train_ranks import launch, train_here, train_scratch
from storage.artifacts import ArtifactStore
from storage.store import Store, StoreError

log = logging.getLogger(__name__)


def train_key(model: ModelRef, labels: LabelsRef, params: TrainConfig, preset: str) -> dict:
    """An RPN depends on the model, the label set, the recipe and the preset it was trained at."""
    return {"model": model.fingerprint, "labels": labels.fingerprint, "train": params, "preset": preset}


def rpn_ref(arts: ArtifactStore, fp: str, manifest: dict) -> RpnRef:
    """The reference to a committed RPN artifact, from its validated marker."""
    meta = manifest["meta"]
    steps, loss = meta.get("steps"), meta.get("final_loss")
    if not isinstance(steps, int) or not isinstance(loss, (int, float)):
        raise StoreError(f"{arts.url('rpn', fp)}: marker meta lacks steps / final_loss")
    return RpnRef(fp, arts.url("rpn", fp), steps, float(loss))


def lookup(store: Store, fp: str) -> RpnRef | None:
    """The trained RPN, if committed and every file matches its marker."""
    arts = ArtifactStore(store)
    manifest = arts.verify("rpn", fp)
    return None if manifest is None else rpn_ref(arts, fp, manifest)


def train(
    store: Store,
    model: ModelRef,
    labels: LabelsRef,
    params: TrainConfig,
    fp: str,
    preset: str,
    progress: Callable[[int, int], None] | None = None,
) -> RpnRef:
    """Train (in this process, or with `world_size` > 1 on a torchrun group), then commit the RPN artifact."""
    train_fp = fp
    scratch = train_scratch(store, train_fp)
    if latest_checkpoint(scratch / CHECKPOINT_DIR) is not None:
        log.warning("%s holds a checkpoint of an interrupted run of this training on this store: resuming it", scratch)
    if params.world_size > 1:
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
    key=train_key,
    config=lambda cfg, preset: cfg.train.params(preset),
)
