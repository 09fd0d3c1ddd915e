from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail at once instead of retrying for 20 s
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # before any test module imports prefect
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one compute thread per xdist worker (and per process it starts): two workers on two cores, not four threads
    # that spin-wait on each other
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # torch may have started before this file
from PIL import Image

from sdrpn_core.models import LlavaAdapter
from sdrpn_core.models.tiny import TinyLlavaSpec, TinyQwenSpec, build_tiny_llava, build_tiny_qwen
from sdrpn_core.presets import get_preset

# The longest tests, in seconds on a 2-core machine (`pytest --durations`, 2026-12-04). xdist's worksteal hands each
# worker a contiguous share of the collection and steals from the end of a queue, so a long test placed late starts
# last and decides the suite's time: each worker's share starts with its part of these (longest first, to the least
# loaded share). A name that no longer matches only loses its place; it never changes what runs.
LONG_TESTS = {
    "test_code_change_reruns_what_each_edit_touches": 111,
    "test_three_weeks_of_retraining": 91,
    "test_the_nano_default_reads_small_details": 86,
    "test_deployment_run_sdrpn_full": 80,
    "test_two_gloo_ranks_train_as_one_process": 77,
    "test_evaluation_killed_mid_run_resumes": 51,
    "[scale]": 31,
    "test_shipped_nano_loads_from_the_artifact_store": 30,
    "[labels_memory]": 30,
    "test_full_flow_on_s3[qwen]": 30,
    "test_killed_cli_does_not_leave_its_temporary_prefect_server": 28,
    "[rerun]": 29,
    "test_dask_runner_gives_the_same_rows_as_threads": 25,
    "[nano_gain]": 25,
    "[calibrate]": 24,
    "test_changing_eval_or_label_params_reruns_only_what_depends_on_them": 23,
    "[teacher_memory]": 23,
    "test_worker_killed_mid_extraction_then_rerun": 18,
    "test_full_flow_on_s3[llava]": 20,
    "[read_memory]": 18,
}


def _cost(item: pytest.Item) -> int:
    return next((s for name, s in LONG_TESTS.items() if name in item.nodeid), 0)


@pytest.hookimpl(trylast=True)  # after `-m` / `-k` deselection: the shares are of what runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))  # every worker orders the same way
    if workers < 2 or len(items) < 2 * workers:
        return
    shares: list[list[pytest.Item]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for item in sorted((i for i in items if _cost(i)), key=_cost, reverse=True):
        k = loads.index(min(loads))
        shares[k].append(item)
        loads[k] += _cost(item)
    rest, left, ordered = iter([i for i in items if not _cost(i)]), len(items), []
    for k, share in enumerate(shares):  # the scheduler's split: what is left over the workers still to serve
        size, left = left // (workers - k), left - left // (workers - k)
        ordered += share + [next(rest) for _ in range(max(0, size - len(share)))]
    ordered += list(rest)
    items[:] = ordered


@pytest.fixture(autouse=True)
def _process_state_left_as_found():
    """A test may not leave torch's thread count or default dtype changed: later tests that compare runs bit for
    bit would then depend on the order the suite ran in."""
    before = torch.get_num_threads(), torch.get_default_dtype()
    yield
    after = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(before[0])
    torch.set_default_dtype(before[1])
    assert after == before, f"the test changed torch's (threads, default dtype) from {before} to {after}"


@pytest.fixture(autouse=True)
def _log_handlers_on_live_streams():
    """Prefect binds its console handler (and its rich console) to the sys.stderr of the test that first set up
    logging, and pytest closes that capture after the test; a later test's log line then fails in the handler.
    Handlers left on a closed stream are pointed at the current one, so tests pass in any order or alone."""
    loggers = [logging.getLogger()]
    loggers += [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if getattr(getattr(handler, "stream", None), "closed", False):
                handler.stream = sys.stderr  # not setStream: it flushes the closed one first
                if hasattr(handler, "console"):
                    handler.console.file = sys.stderr
    yield


@pytest.fixture(scope="session")
def tiny_llava() -> LlavaAdapter:
    model, processor = build_tiny_llava(TinyLlavaSpec())
    return LlavaAdapter(model, processor)


@pytest.fixture(scope="session")
def tiny_qwen():
    return build_tiny_qwen(TinyQwenSpec())


FAMILIES = ["llava", "qwen"]


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_vlm(request):
    """Each model family's tiny random model in turn: the method's tests run on both (4×4 grids, 4 layers)."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory, tiny_vlm) -> str:
    d = tmp_path_factory.mktemp(f"tiny-{tiny_vlm.family}")
    tiny_vlm.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, tiny_llava) -> str:
    d = tmp_path_factory.mktemp("tiny-llava")
    tiny_llava.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_preset(tiny_vlm):
    """The family's 7B preset re-pointed at the tiny model's 4 layers × 4 heads."""
    base = "llava-1.5-7b" if tiny_vlm.family == "llava" else "qwen2.5-vl-7b/natural"
    return get_preset(base, grounding={2: (0, 3), 1: (2,)}, sink={0: None}, K=1, T=2)


def random_image(seed: int, size: tuple[int, int] = (40, 28)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def teacher_rows(pairs: list[tuple[str, str]], grounding=(0.5, 0.5), grid=(1, 2)):
    """Teacher rows keyed and questioned as given ([(key, question)]), with one small map for all."""
    import pyarrow as pa

    from storage.labels import TEACHER_SCHEMA

    n = len(pairs)
    cols = {f.name: [None] * n for f in TEACHER_SCHEMA}
    cols.update(
        sample_key=[k for k, _ in pairs],
        sample_id=[k for k, _ in pairs],
        image=["i"] * n,
        question=[q for _, q in pairs],
        answer=["a"] * n,
        grid_h=[grid[0]] * n,
        grid_w=[grid[1]] * n,
        image_w=[8] * n,
        image_h=[8] * n,
        n_steps=[1] * n,
        grounding=[list(grounding)] * n,
        sink=[[0.0] * len(grounding)] * n,
    )
    return pa.Table.from_pydict(cols, schema=TEACHER_SCHEMA)


@pytest.fixture
def images() -> list[Image.Image]:
    return [random_image(i, (24 + 9 * i, 40 - 5 * i)) for i in range(4)]


QUESTIONS = [
    "what is the digit in the red box ?",
    "what colour is the car on the left side of the image ?",
    "yes ?",
    "Who wrote this book ? Answer the question using a single word or phrase.",
]


# -- stores: a temp dir and a real S3-compatible server over HTTP (moto's server on 127.0.0.1) -----------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield {"endpoint": f"http://127.0.0.1:{port}", "server": server, "port": port}
    server.stop()


@pytest.fixture
def s3_settings(moto_server):
    import uuid

    import s3fs

    from storage.store import StoreSettings

    bucket = f"sdrpn-test-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": moto_server["endpoint"]}).mkdir(
        bucket
    )
    return StoreSettings(
        root=f"s3://{bucket}/sdrpn",
        endpoint_url=moto_server["endpoint"],
        key="testing",
        secret="testing",
        retries=3,
        backoff_s=0.05,
        backoff_max_s=0.2,
    )


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    from storage.store import Store, StoreSettings

    if request.param == "local":
        return Store(StoreSettings(root=str(tmp_path / "store"), retries=2, backoff_s=0.01))
    return Store(request.getfixturevalue("s3_settings"))


@pytest.fixture(scope="module", params=["llava", "qwen"])
def nano(request):
    """A tiny model of each family with an 8×8 RoI grid, and a random RPN on it (K = 2, T = 2)."""
    from sdrpn_core.rpn import RoIPredictor

    if request.param == "llava":
        model, processor = build_tiny_llava(TinyLlavaSpec(image_size=64, patch_size=8, seed=3))
        adapter = LlavaAdapter(model, processor)
    else:
        adapter = build_tiny_qwen(TinyQwenSpec(side=224, seed=3))
    assert adapter.grid == (8, 8)
    torch.manual_seed(0)
    return adapter, RoIPredictor.from_adapter(adapter, K=2, T=2)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One temporary Prefect API (a real server) for every flow test of the session (of each xdist worker)."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-storage")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}), prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def flow_cache(tmp_path, monkeypatch):
    """The flow tests' local scratch (downloads, checkpoints) per test, as a fresh machine's."""
    monkeypatch.setenv("SDRPN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module", params=["llava", "qwen"])
def family(request) -> str:
    """Every flow test that takes it runs on a tiny random LLaVA and on a tiny random Qwen2.5-VL."""
    return request.param
