"""Data-parallel training: the train stage launches `torchrun` over `stages.train.train_here`, one rank per device.

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

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from sdrpn_core.train import TrainConfig
from stages.refs import LabelsRef, ModelRef
from storage.store import Store, StoreSettings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


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
    from stages.train import TrainSummary, train_scratch

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

    from stages.common import get_store
    from stages.train import train_here

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
