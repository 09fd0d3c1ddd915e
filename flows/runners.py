"""Where the mapped stages (teacher shards, evaluation pieces) run: threads in the flow's process, or Dask.

One Dask cluster serves a whole flow run, so a worker that loaded the model for a teacher shard keeps it for the
evaluation pieces (`stages.common.load_model` keeps one model per process). With `runner.gpus`, each worker is
pinned to one GPU (its own `CUDA_VISIBLE_DEVICES`, so "cuda" in it is that GPU) and offers one `GPU` resource;
the model-bound tasks ask for it, so two never share a device. An external scheduler (`runner.address`) is used
as it is: start its workers with `--resources GPU=1` and one `CUDA_VISIBLE_DEVICES` each (docs/scale-out.md)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from stages.config import RunnerSection

log = logging.getLogger(__name__)

RunnerFactory = Callable[[], TaskRunner]
GPU_RESOURCE = "GPU"


def visible_gpus(gpus: str | int | None) -> list[int]:
    """The device indices `runner.gpus` asks for: `all` (every visible GPU) or the first N."""
    if gpus is None:
        return []
    import torch

    count = torch.cuda.device_count()
    wanted = count if gpus == "all" else int(gpus)
    if wanted < 1 or wanted > count:
        raise ValueError(f"runner.gpus = {gpus!r}: {count} CUDA device(s) visible on this machine")
    return list(range(wanted))


def worker_specs(section: RunnerSection, devices: list[int]) -> dict:
    """Dask worker specs: one single-threaded process per device, pinned to it, or `n_workers` plain ones."""
    from distributed import Nanny, Worker

    cls = Nanny if section.processes else Worker
    if not devices:
        return {i: {"cls": cls, "options": {"nthreads": 1}} for i in range(section.n_workers)}
    return {
        f"gpu-{d}": {
            "cls": Nanny,  # a process of its own: the pinning must precede CUDA's initialisation
            "options": {"nthreads": 1, "resources": {GPU_RESOURCE: 1}, "env": {"CUDA_VISIBLE_DEVICES": str(d)}},
        }
        for d in devices
    }


@contextlib.contextmanager
def task_runners(section: RunnerSection, devices: list[int] | None = None) -> Iterator[RunnerFactory]:
    """A factory of task runners for the sub-flows of one flow run, all on the same threads or Dask cluster."""
    if section.kind != "dask":
        yield lambda: ThreadPoolTaskRunner(max_workers=section.n_workers)
        return
    from prefect_dask import DaskTaskRunner

    if section.address:
        yield lambda: DaskTaskRunner(address=section.address)
        return
    from distributed import Scheduler, SpecCluster

    devices = visible_gpus(section.gpus) if devices is None else devices
    specs = worker_specs(section, devices)
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    with SpecCluster(workers=specs, scheduler=scheduler, silence_logs=logging.WARNING) as cluster:
        log.info("Dask cluster %s: %d worker(s) %s", cluster.scheduler_address, len(specs), list(specs))
        yield lambda: DaskTaskRunner(address=cluster.scheduler_address)


def model_bound(section: RunnerSection):
    """The context model-bound tasks are submitted in: on GPU workers they ask for one `GPU` resource."""
    if section.kind == "dask" and section.gpus is not None:
        import dask

        return dask.annotate(resources={GPU_RESOURCE: 1})
    return contextlib.nullcontext()
