"""Training the RPN where it runs: in this process (`train_here`, one rank or alone) or on a torchrun group that
`launch` starts, one rank per device; the train stage (`stages.train`) calls one of them and commits the result.

`launch` writes the job (store settings, references, recipe: JSON, never a pickle) into the training's scratch
folder, runs `python -m torch.distributed.run --standalone --nproc-per-node <world_size> -m stages.train_ranks
<job>`, and follows rank 0's progress. Each rank trains on every world_size-th micro-batch (gloo on CPU, NCCL on
GPUs); rank 0 writes the checkpoints and the artifact folder, which the stage then commits. A killed rank ends the
group; the next run resumes from the last checkpoint in the scratch.

Several nodes: `SDRPN_TORCHRUN_ARGS` replaces `--standalone` with a rendezvous (`--nnodes 2 --rdzv-backend c10d
--rdzv-endpoint host:29400`). `train.world_size` stays the whole group's size, so each node runs world_size /
nnodes ranks; the stage logs the command every other node runs (the same torchrun on the same job file). The
scratch (`SDRPN_CACHE_DIR`) must be one filesystem the nodes share, at the same path: the job, the checkpoints
every rank resumes from, and rank 0's artifact (wherever rank 0 lands) are read there."""

from __future__ import annotations

import io
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from sdrpn_core.train import TrainConfig, recipe_record, samples_from_rows, train_rpn
from stages.common import cache_dir, get_store, load_model
from stages.refs import LabelsRef, ModelRef
from storage.fingerprint import hash_obj
from storage.labels import label_dataset
from storage.store import Store, StoreSettings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


def train_scratch(store: Store, train_fp: str) -> Path:
    """The local checkpoint folder of one training on one store. Keyed by the store too: another store's run of the
    same fingerprint (a test, a colleague's bucket) must never be resumed from here."""
    return cache_dir("train", hash_obj(store.url(""))[:12], train_fp)


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    final_loss: float
    skipped_all_ignore: int
    rejected: int


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


def training_model(model: ModelRef, dtype: str | None):
    """The model to train on: the evaluation's (loaded once per process), or a copy of it in training's own dtype
    (`train.dtype`: the authors train LLaVA's RPN in bf16 and evaluate it in fp16; the checkpoint's recipe says
    which, its base model stays the one it is evaluated with)."""
    if dtype in (None, model.dtype):
        return load_model(model)
    from sdrpn_core.models import load_adapter

    # not kept in the process's cache: freed once trained (the evaluation that follows loads the model's own dtype)
    inputs = json.loads(model.inputs)
    return load_adapter(model.path, family=model.family, dtype=dtype, device=model.device, inputs=inputs)


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
    adapter = training_model(model, params.dtype)
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


def _job(store: Store, model: ModelRef, labels: LabelsRef, params: TrainConfig, fp: str, preset: str) -> dict:
    return {
        "store": asdict(store.settings),
        "model": asdict(model),
        "labels": asdict(labels),
        "params": asdict(params),
        "fp": fp,
        "preset": preset,
    }


def launch(
    store: Store,
    model: ModelRef,
    labels: LabelsRef,
    params: TrainConfig,
    fp: str,
    preset: str,
    progress: Callable[[int, int], None] | None = None,
):
    """Train on `params.world_size` ranks and wait; returns rank 0's summary (a failure names the rank log)."""
    scratch = train_scratch(store, fp)
    job = scratch / "job.json"
    job.write_text(json.dumps(_job(store, model, labels, params, fp, preset)))
    job.chmod(0o600)  # it may carry the store's credentials
    (scratch / "summary.json").unlink(missing_ok=True)
    cmd, nodes = node_command(job, params.world_size)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log.info("training on %d ranks: %s", params.world_size, shlex.join(cmd))
    if nodes > 1:
        log.warning(
            "training on %d nodes: start this on each of the other %d (same checkout, same shared scratch):\n"
            "cd %s && PYTHONPATH=%s %s",
            nodes,
            nodes - 1,
            shlex.quote(str(ROOT)),
            shlex.quote(str(ROOT)),
            shlex.join(["python", *cmd[1:]]),
        )
    rank_log = scratch / "ranks.log"
    with rank_log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _follow(proc, scratch / "progress.json", progress)
    if proc.returncode != 0 or not (scratch / "summary.json").exists():
        tail = rank_log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"torchrun training ended with exit code {proc.returncode} (log {rank_log}):\n{tail}")
    return TrainSummary(**json.loads((scratch / "summary.json").read_text()))


def rendezvous() -> tuple[list[str], int]:
    """torchrun's rendezvous arguments (`SDRPN_TORCHRUN_ARGS`; one node by default) and the number of nodes."""
    args = shlex.split(os.environ.get("SDRPN_TORCHRUN_ARGS", "--standalone"))
    nodes = 1
    for i, arg in enumerate(args):
        if arg == "--nnodes" or arg.startswith("--nnodes="):
            value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            if not value.isdigit() or int(value) < 1:
                raise ValueError(
                    f"SDRPN_TORCHRUN_ARGS: --nnodes {value!r}: give a fixed number of nodes (an elastic range would "
                    "change the world size, and with it the effective batch)"
                )
            nodes = int(value)
    return args, nodes


def node_command(job: Path, world_size: int) -> tuple[list[str], int]:
    """The torchrun command of one node for `job` (every node runs the same one) and the number of nodes."""
    args, nodes = rendezvous()
    if world_size % nodes:
        raise ValueError(f"train.world_size {world_size} is not a multiple of the {nodes} nodes in SDRPN_TORCHRUN_ARGS")
    per_node = world_size // nodes
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, "--nproc-per-node", str(per_node)]
    return [*cmd, "-m", "stages.train_ranks", str(job)], nodes


def _follow(proc: subprocess.Popen, progress_file: Path, progress: Callable[[int, int], None] | None) -> None:
    """Wait for the ranks, passing rank 0's progress on about once a second."""
    last = None
    while proc.poll() is None:
        time.sleep(1.0)
        try:
            done = json.loads(progress_file.read_text())
        except (OSError, ValueError):
            continue
        if progress is not None and done != last:
            progress(int(done["done"]), int(done["total"]))
            last = done


def _report_to(path: Path) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"done": done, "total": total}))
        tmp.replace(path)  # atomic: the launcher never reads half a file

    return report


def main(job_path: str) -> None:
    """One rank (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous)."""
    import torch
    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '?')}] %(message)s")
    job = json.loads(Path(job_path).read_text())
    cuda = job["model"]["device"].startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        raw = job["params"]
        params = TrainConfig(**{**raw, "betas": tuple(raw["betas"])})
        if dist.get_world_size() != params.world_size:  # a node started with another --nproc-per-node
            raise RuntimeError(
                f"the group has {dist.get_world_size()} ranks, train.world_size is {params.world_size}: every node "
                "must run world_size / nnodes ranks (the command the train stage logs)"
            )
        store = get_store(StoreSettings(**job["store"]))
        report = _report_to(Path(job_path).parent / "progress.json")
        train_here(store, ModelRef(**job["model"]), _labels(job["labels"]), params, job["fp"], job["preset"], report)
    finally:
        dist.destroy_process_group()


def _labels(raw: dict) -> LabelsRef:
    return LabelsRef(**{**raw, "parts": tuple(tuple(p) for p in raw["parts"])})


if __name__ == "__main__":
    main(sys.argv[1])
