from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sdrpn_core.train import CHECKPOINT_DIR, TrainConfig, TrainSample, latest_checkpoint, lr_at, rpn_loss, train_rpn
from tests.conftest import QUESTIONS, random_image

ROOT = Path(__file__).resolve().parents[1]


def make_samples(folder: Path, n: int = 10) -> list[TrainSample]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        path = folder / f"img{i}.png"
        random_image(i).save(path)
        labels = np.full(16, -100)
        labels[rng.choice(16, 6, replace=False)] = 0
        labels[i % 16] = 1
        samples.append(TrainSample(f"s{i}", str(path), QUESTIONS[i % 4], labels))
    return samples


def test_loss_pools_valid_tokens_of_the_whole_batch():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], requires_grad=True)
    labels = torch.tensor([[1, -100, 0], [-100, -100, 1]])
    loss = rpn_loss(logits, labels)
    picked = torch.tensor([2.0, 0.5, -2.0])
    target = torch.tensor([1.0, 0.0, 1.0])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(picked, target)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad[0, 1] == 0 and logits.grad[1, 0] == 0 and logits.grad[0, 0] != 0


def test_batch_without_valid_tokens_is_zero_and_keeps_the_graph():
    logits = torch.randn(2, 4, requires_grad=True)
    loss = rpn_loss(logits, torch.full((2, 4), -100))
    assert loss.item() == 0.0
    loss.backward()  # no "does not require grad" error
    assert torch.equal(logits.grad, torch.zeros(2, 4))


def test_cosine_schedule_with_warmup():
    cfg = TrainConfig(K=1, lr=1e-3, warmup_ratio=0.03)
    total = 100  # warm-up ceil(3) steps
    assert lr_at(0, total, cfg) == 0.0
    assert lr_at(1, total, cfg) == pytest.approx(1e-3 / 3)
    assert lr_at(3, total, cfg) == pytest.approx(1e-3)
    assert lr_at(3 + 97 // 2, total, cfg) == pytest.approx(0.5e-3, rel=0.02)
    assert lr_at(99, total, cfg) < 1e-5


def test_training_lowers_the_loss_and_skips_all_ignore_and_bad_images(tiny_vlm, tmp_path):
    samples = make_samples(tmp_path)
    samples.append(TrainSample("ignored", samples[0].image, "q", np.full(16, -100)))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    samples.append(TrainSample("bad", str(bad), "q", samples[1].labels))
    cfg = TrainConfig(K=1, T=2, lr=2e-3, batch_size=4, epochs=6, checkpoint_every=100)
    before = {k: v.clone() for k, v in tiny_vlm.model.state_dict().items()}
    result = train_rpn(tiny_vlm, samples, cfg)
    assert result.skipped_all_ignore == 1
    assert [r.sample_id for r in result.rejected] == ["bad"] and "not an image" in result.rejected[0].reason
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05
    assert result.steps == math.ceil(6 * math.ceil(11 / 4))
    after = tiny_vlm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the backbone never moves
    assert all(0 <= h["precision"] <= 1 or math.isnan(h["precision"]) for h in result.history)


def test_only_the_predictor_gets_gradients(tiny_vlm, tmp_path):
    samples = make_samples(tmp_path, 4)
    seen = {}

    def grab(step, record):
        seen.update({n: p.grad is not None for n, p in result_rpn[0].named_parameters()})

    from sdrpn_core.rpn import RoIPredictor

    rpn = RoIPredictor.from_adapter(tiny_vlm, K=1, T=2)
    result_rpn = [rpn]
    train_rpn(tiny_vlm, samples, TrainConfig(K=1, T=2, batch_size=4, max_steps=1), rpn=rpn, on_step=grab)
    assert seen["twig_layers.0.mlp.down_proj.weight"]
    assert seen.get("twig_norm.weight", tiny_vlm.family != "llava")  # only LLaVA's RPN has the extra norm
    assert seen["twig_layers.1.self_attn.q_proj.weight"] and seen["twig_layers.1.input_layernorm.weight"]
    assert not seen["twig_layers.1.self_attn.v_proj.weight"] and not seen["twig_layers.1.mlp.up_proj.weight"]
    assert not any(p.requires_grad for p in tiny_vlm.model.parameters())


WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    import numpy as np
    import torch
    torch.set_num_threads({threads})  # as the straight run in the test process: reductions split alike
    sys.path.insert(0, {root!r})
    from sdrpn_core.models.tiny import build_tiny
    from sdrpn_core.train import TrainConfig, TrainSample, train_rpn

    spec = json.loads({samples!r})
    samples = [TrainSample(s["id"], s["image"], s["q"], np.array(s["labels"])) for s in spec]
    adapter = build_tiny({family!r})
    cfg = TrainConfig(**json.loads({cfg!r}))

    def die(step, record):
        if step == {die_at}:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash mid-run: no cleanup, no final checkpoint

    train_rpn(adapter, samples, cfg, out_dir={out!r}, on_step=die)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_killed_run_resumes_bit_for_bit(tmp_path, family):
    from sdrpn_core.models.tiny import build_tiny

    samples = make_samples(tmp_path, 10)
    cfg = {"K": 1, "T": 2, "lr": 1e-3, "batch_size": 3, "grad_accum": 2, "epochs": 3, "checkpoint_every": 2}
    spec = json.dumps(
        [{"id": s.sample_id, "image": s.image, "q": s.question, "labels": s.labels.tolist()} for s in samples]
    )
    out = tmp_path / "run"
    threads = 1  # both runs under the same explicit thread count, whatever earlier tests left in the environment
    script = WORKER.format(
        root=str(ROOT), samples=spec, cfg=json.dumps(cfg), die_at=5, out=str(out), family=family, threads=threads
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = json.loads((latest_checkpoint(out / CHECKPOINT_DIR) / "state.json").read_text())
    assert state["step"] == 4  # the checkpoint of step 4 survived; step 5 was lost with the process
    assert [p.name for p in (out / CHECKPOINT_DIR).iterdir()] == ["step-000000004"]  # nothing half-written

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        resumed = train_rpn(build_tiny(family), samples, TrainConfig(**cfg), out_dir=out)
        straight = train_rpn(build_tiny(family), samples, TrainConfig(**cfg))
    finally:
        torch.set_num_threads(before)
    assert resumed.steps == straight.steps == 6
    for (name, a), (_, b) in zip(resumed.rpn.state_dict().items(), straight.rpn.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]


class _Killed(BaseException):
    """Stands for SIGKILL inside the checkpoint swap: nothing after the injection point runs."""


@pytest.mark.parametrize("kill_at", ["rename", "cleanup"])
def test_kill_at_each_checkpoint_swap_step_leaves_a_resumable_run(tmp_path, tiny_llava, monkeypatch, kill_at):
    """A kill after the new checkpoint is written but before it is renamed into place, or after the rename but
    before the old one is removed: the next run resumes from a complete checkpoint and its saves still work (the
    old design failed every rerun with "Directory not empty" after the second case)."""
    import shutil

    import sdrpn_core.train as train_mod

    samples = make_samples(tmp_path, 8)
    cfg = TrainConfig(K=1, T=2, lr=1e-3, batch_size=4, epochs=3, checkpoint_every=2)
    out = tmp_path / "run"
    real = {"rename": Path.rename, "cleanup": shutil.rmtree}
    calls = {"n": 0}
    # the save of step 2 renames (call 1) and has nothing to clean up; the save of step 4 renames (call 2), then
    # removes step 2 (the first cleanup call): the kill hits the save of step 4 either way
    kill_call = {"rename": 2, "cleanup": 1}[kill_at]

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == kill_call:
            raise _Killed
        return real[kill_at](*args, **kwargs)

    target = (Path, "rename") if kill_at == "rename" else (train_mod.shutil, "rmtree")
    monkeypatch.setattr(*target, dying)
    with pytest.raises(_Killed):
        train_rpn(tiny_llava, samples, cfg, out_dir=out)
    monkeypatch.undo()
    names = sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir())
    expected_step = 2 if kill_at == "rename" else 4  # before the rename the new one is a hidden temporary
    assert latest_checkpoint(out / CHECKPOINT_DIR).name == f"step-{expected_step:09d}", names
    resumed = train_rpn(tiny_llava, samples, cfg, out_dir=out)
    straight = train_rpn(tiny_llava, samples, cfg)
    assert resumed.steps == straight.steps == 6
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert [p.name for p in (out / CHECKPOINT_DIR).iterdir()] == ["step-000000006"]  # leftovers cleaned up


def test_a_finished_checkpoint_resumes_at_100_percent_and_scratch_is_per_store(tiny_llava, tmp_path, monkeypatch):
    from stages.train_ranks import train_scratch
    from storage.store import Store, StoreSettings

    samples = make_samples(tmp_path, 4)
    cfg = TrainConfig(K=1, T=2, batch_size=2, max_steps=2, checkpoint_every=1)
    train_rpn(tiny_llava, samples, cfg, out_dir=tmp_path / "run")
    seen: list[tuple[int, int]] = []
    again = train_rpn(tiny_llava, samples, cfg, out_dir=tmp_path / "run", progress=lambda d, t: seen.append((d, t)))
    assert again.steps == 2 and seen == [(2, 2)]  # nothing left to train, and the bar says so
    monkeypatch.setenv("SDRPN_CACHE_DIR", str(tmp_path / "cache"))
    a = Store(StoreSettings(root=str(tmp_path / "a")))
    b = Store(StoreSettings(root=str(tmp_path / "b")))
    assert train_scratch(a, "fp") != train_scratch(b, "fp") and train_scratch(a, "fp") == train_scratch(a, "fp")
    assert train_scratch(a, "fp").is_relative_to(tmp_path / "cache")
