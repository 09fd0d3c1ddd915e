"""Where mapped stages run: GPU-pinned Dask workers (one process per device, one `GPU` resource each), checked on
CPU with the same code path (the pinning is an environment variable set before the worker starts)."""

from __future__ import annotations

import os

import pytest

from flows.runners import GPU_RESOURCE, model_bound, task_runners, visible_gpus
from stages.config import RunnerSection


@pytest.mark.slow
def test_gpu_workers_are_pinned_one_per_device_and_offer_one_gpu_each():
    import dask
    from distributed import Client

    section = RunnerSection(kind="dask", gpus=2)
    with task_runners(section, devices=[0, 1]) as runners, Client(runners().address) as client:
        env = client.run(os.getenv, "CUDA_VISIBLE_DEVICES")
        assert sorted(env.values()) == ["0", "1"]  # each worker process sees its own device alone
        workers = client.scheduler_info()["workers"].values()
        assert [w["resources"] for w in workers] == [{GPU_RESOURCE: 1}] * 2
        assert all(w["nthreads"] == 1 for w in workers)
        with model_bound(section):
            futures = [client.submit(os.getenv, "CUDA_VISIBLE_DEVICES", pure=False) for _ in range(4)]
        assert set(client.gather(futures)) <= {"0", "1"}
        with dask.annotate(resources={GPU_RESOURCE: 2}):  # more than any worker has: never scheduled
            blocked = client.submit(os.getenv, "X", pure=False)
        with pytest.raises(TimeoutError):
            blocked.result(timeout=1)


@pytest.mark.slow
def test_cpu_workers_and_threads_take_n_workers():
    from distributed import Client

    with task_runners(RunnerSection(kind="dask", n_workers=2)) as runners, Client(runners().address) as client:
        workers = client.scheduler_info()["workers"].values()
        assert len(workers) == 2 and all(not w["resources"] for w in workers)
    with task_runners(RunnerSection(n_workers=3)) as runners:
        assert runners()._max_workers == 3


def test_gpu_settings_are_checked():
    with pytest.raises(ValueError, match=r"runner\.gpus needs runner\.kind: dask"):
        RunnerSection(gpus=2)
    import torch

    if torch.cuda.device_count() == 0:
        with pytest.raises(ValueError, match=r"runner.gpus = 'all': 0 CUDA device\(s\) visible"):
            visible_gpus("all")
    assert visible_gpus(None) == []
