"""Training stages through a real Prefect API: the nano base stage, data-parallel ranks and nodes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import train as train_stage
from tests.flowkit import _task_states, make_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api", "flow_cache")]

ROOT = Path(__file__).resolve().parents[1]


def test_nano_base_stage_trains_once_commits_to_the_store_and_is_cached(tmp_path, monkeypatch):
    """`model.retrain: true` trains sdrpn-nano from scratch in the `nano_base` task (a seeded, shortened recipe
    here), commits it to the store, and a rerun takes it from the cache without training."""
    from flows.pipeline import labels_flow
    from sdrpn_core.synthetic import nano as nano_mod
    from stages import model as model_stage
    from stages.common import get_store
    from storage.artifacts import ArtifactStore

    recipe = {"phase1_steps": 2, "phase2_steps": 1, "phase3_steps": 1, "batch_size": 4}
    cfg = make_config(
        "llava", str(tmp_path / "store"), **{"model": {"source": "nano", "retrain": True, "nano": recipe}}
    )
    trained = []
    real = nano_mod.train_nano
    monkeypatch.setattr(nano_mod, "train_nano", lambda *a, **k: trained.append(1) or real(*a, **k))
    # a 4-step model answers with EOS at once, so the labels stage (after nano_base) fails as it should, naming why
    t0 = time.time()
    with pytest.raises(ValueError, match="all were rejected"):
        labels_flow(cfg)
    fp = model_stage.nano_base_fingerprint(recipe)
    assert trained == [1] and ArtifactStore(get_store(cfg.store.settings())).is_committed("nano_base", fp)
    assert _task_states(t0)["nano-base"] == {"Completed"}
    t1 = time.time()
    with pytest.raises(ValueError, match="all were rejected"):
        labels_flow(cfg)
    assert trained == [1] and _task_states(t1)["nano-base"] == {"Cached"}
    assert fp != model_stage.nano_base_fingerprint({**recipe, "seed": 1})


def test_two_gloo_ranks_train_as_one_process_with_the_same_effective_batch(tmp_path, monkeypatch):
    """torchrun, 2 CPU processes (gloo), effective batch 8 = 2 per rank × 2 accumulated × 2 ranks, against one
    process accumulating 4 micro-batches of 2: the same loss history and final weights, within float32 summation
    order (rtol 1e-4). 11 micro-batches per epoch: the short last step gives one rank 2 micro-batches, the other 1.
    The same 2 ranks as two nodes of one rank (a c10d rendezvous, the second node started with the command the
    stage gives) train the same weights."""
    from dataclasses import replace

    import numpy as np
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file

    from flows.pipeline import labels_flow
    from stages.common import get_store
    from stages.model import resolve_model
    from stages.train_ranks import _job

    cfg = make_config("llava", str(tmp_path / "store"), **{"train_data.n": 22})
    labels = labels_flow(cfg)
    store = get_store(cfg.store.settings())
    model = resolve_model(cfg.model, store)
    preset = cfg.teacher.preset_obj()
    base = replace(cfg.train.params(preset), batch_size=2, effective_batch=8, epochs=2, checkpoint_every=2)
    assert labels.rows == 22 and base.keep_all_ignore  # every sample trains: 11 micro-batches of 2
    one = train_stage.train(store, model, labels, base, "one-process", preset.name)
    seen: list[tuple[int, int]] = []
    two = train_stage.train(
        store, model, labels, replace(base, world_size=2), "two-ranks", preset.name, lambda d, t: seen.append((d, t))
    )
    assert one.steps == two.steps == 6 and seen and seen[-1] == (6, 6)

    def logs(ref):
        return pq.read_table(Path(ref.url) / "train_log.parquet").to_pylist()

    for a, b in zip(logs(one), logs(two), strict=True):
        assert a["valid_tokens"] == b["valid_tokens"] and a["lr"] == b["lr"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    w1, w2 = (load_file(Path(r.url) / "rpn.safetensors") for r in (one, two))
    assert w1.keys() == w2.keys()
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    start = load_file(_initial(store, model, base))
    assert any(not np.allclose(w1[k], start[k]) for k in w1)  # training moved the weights

    nodes = _train_on_two_nodes(store, model, labels, replace(base, world_size=2), preset.name, monkeypatch)
    w4 = load_file(Path(nodes.url) / "rpn.safetensors")
    for k in w1:
        np.testing.assert_allclose(w4[k], w1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # a node started by hand with the wrong rank count: the group refuses to train (the effective batch would change)
    job = tmp_path / "job.json"
    job.write_text(json.dumps(_job(store, model, labels, replace(base, world_size=2), "wrong-size", preset.name)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    wrong = subprocess.run(
        [*cmd, "-m", "stages.train_ranks", str(job)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode != 0 and "the group has 1 ranks, train.world_size is 2" in wrong.stdout + wrong.stderr

    # one rank killed mid-training: the stage fails naming the rank log; the rerun resumes from the checkpoint
    killed = _train_killing_a_rank(store, model, labels, replace(base, world_size=2, checkpoint_every=1), preset.name)
    assert "torchrun training ended" in killed
    assert train_stage.latest_checkpoint(train_stage.train_scratch(store, "killed") / "checkpoints") is not None
    said = _Recorded()
    logging.getLogger("stages.train").addHandler(said)
    try:
        again = train_stage.train(
            store, model, labels, replace(base, world_size=2, checkpoint_every=1), "killed", preset.name
        )
    finally:
        logging.getLogger("stages.train").removeHandler(said)
    assert any("interrupted run of this training" in m for m in said.messages)  # the resume is said, not silent
    w3 = load_file(Path(again.url) / "rpn.safetensors")
    for k in w1:
        np.testing.assert_allclose(w3[k], w2[k], rtol=1e-5, atol=1e-7, err_msg=k)


def _train_on_two_nodes(store, model, labels, params, preset: str, monkeypatch):
    """The train stage as node 1 of 2 (one rank each, c10d rendezvous on this machine), in a thread; node 2 is
    started by hand with `node_command`, as the stage's log tells a user to."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rdzv = f"--nnodes 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{port} --rdzv-id sdrpn-test"
    with monkeypatch.context() as patch:
        patch.setenv("SDRPN_TORCHRUN_ARGS", rdzv)
        return _start_both_nodes(store, model, labels, params, preset)


def _start_both_nodes(store, model, labels, params, preset: str):
    import threading

    from stages.train_ranks import node_command

    out: dict = {}

    def run():
        try:
            out["ref"] = train_stage.train(store, model, labels, params, "two-nodes", preset)
        except Exception as e:  # reported by the assertion below
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    job = train_stage.train_scratch(store, "two-nodes") / "job.json"
    deadline = time.time() + 60
    while time.time() < deadline and not job.exists():
        time.sleep(0.05)
    cmd, n = node_command(job, params.world_size)
    assert n == 2 and cmd[cmd.index("--nproc-per-node") + 1] == "1"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    other = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    thread.join(timeout=300)
    assert other.returncode == 0, other.stderr[-3000:]
    assert "ref" in out, out.get("error")
    return out["ref"]


class _Recorded(logging.Handler):
    """Records messages of one logger (Prefect's logging set-up replaces the root handlers pytest's caplog uses)."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _train_killing_a_rank(store, model, labels, params, preset: str) -> str:
    """Train as "killed" in a thread; SIGKILL one rank once a checkpoint past step 1 exists → the stage's error."""
    import threading

    import psutil

    errors: list[str] = []

    def run():
        try:
            train_stage.train(store, model, labels, params, "killed", preset)
        except RuntimeError as e:
            errors.append(str(e))

    thread = threading.Thread(target=run)
    thread.start()
    checkpoints = train_stage.train_scratch(store, "killed") / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(checkpoints.glob("step-00000000[2-5]")):
        time.sleep(0.05)
    ranks = [p for p in psutil.process_iter(["cmdline"]) if "stages.train_ranks" in " ".join(p.info["cmdline"] or [])]
    ranks = [p for p in ranks if "torch.distributed.run" not in " ".join(p.info["cmdline"])]
    assert len(ranks) == 2, [p.info["cmdline"] for p in ranks]
    ranks[-1].kill()
    thread.join(timeout=120)
    assert errors, "the training finished although a rank was killed"
    return errors[0]


def _initial(store, model, params) -> Path:
    """The untrained RPN's weights (what training starts from), to show training moved them."""
    import torch

    from sdrpn_core.rpn import RoIPredictor
    from stages.common import cache_dir, load_model

    torch.manual_seed(params.seed)
    out = cache_dir("initial-rpn")
    RoIPredictor.from_adapter(load_model(model), params.K, params.T).save(out)
    return out / "rpn.safetensors"
