"""The authors' training recipes: resolved from the preset (the family's `train_recipe`), overridable field by field
from YAML (the config section *is* `TrainConfig`), and the effective batch kept on one device by accumulation."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from sdrpn_core.models import LlavaAdapter, QwenAdapter
from sdrpn_core.train import TrainConfig, TrainSample, train_rpn
from stages.config import ConfigError, PipelineConfig
from tests.conftest import QUESTIONS, random_image


def config(preset: str, **sections) -> PipelineConfig:
    return PipelineConfig.model_validate({"model": {"source": "tiny"}, "teacher": {"preset": preset}, **sections})


def recipe_of(cfg: PipelineConfig) -> TrainConfig:
    return cfg.train.params(cfg.teacher.preset_obj())


def test_a_plain_config_trains_the_authors_recipe_per_family():
    llava = recipe_of(config("llava-1.5-7b"))
    assert (llava.K, llava.T, llava.lr, llava.betas, llava.weight_decay, llava.warmup_ratio) == (
        15,
        3,
        5e-5,
        (0.9, 0.98),
        0.0,
        0.03,
    )
    assert (llava.epochs, llava.batch_size, llava.accumulation, llava.samples_per_step) == (1, 8, 64, 512)
    assert llava.max_grad_norm == 1.0  # HF's default: the authors' script does not pass it
    for name in ("qwen2.5-vl-7b/natural", "qwen2.5-vl-7b/textual", "qwen2.5-vl-3b"):
        qwen = recipe_of(config(name))
        assert (qwen.lr, qwen.betas, qwen.max_grad_norm, qwen.weight_decay) == (1e-4, (0.9, 0.999), 1.0, 0.0)
        assert (qwen.batch_size, qwen.accumulation, qwen.samples_per_step) == (16, 8, 128)
    assert LlavaAdapter.train_recipe["effective_batch"] == 512 and QwenAdapter.train_recipe["effective_batch"] == 128
    nano = recipe_of(config("sdrpn-nano"))
    assert (nano.lr, nano.batch_size, nano.epochs, nano.accumulation) == (1e-3, 16, 6, 1)


def test_every_training_field_is_settable_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {source: tiny}\nteacher: {preset: qwen2.5-vl-7b}\n"
        "train: {betas: [0.9, 0.95], weight_decay: 0.1, warmup_ratio: 0.1, max_grad_norm: 0, "
        "metric_threshold: 0.3, batch_size: 4, seed: 3, T: 2}\n"
        "labels: {fg_ratio: 0.3, min_max_attn: 0.0}\n"
    )
    cfg = PipelineConfig.from_yaml(path)
    t = recipe_of(cfg)
    assert (t.betas, t.weight_decay, t.warmup_ratio, t.max_grad_norm, t.metric_threshold) == (
        (0.9, 0.95),
        0.1,
        0.1,
        0,  # 0 switches the recipe's clipping off
        0.3,
    )
    assert (t.batch_size, t.accumulation, t.samples_per_step, t.lr, t.K, t.T, t.seed) == (4, 32, 128, 1e-4, 16, 2, 3)
    labels = cfg.labels.params(cfg.teacher.preset_obj())
    assert (labels.fg_ratio, labels.min_max_attn, labels.sink_thresh, labels.variant) == (0.3, 0.0, 1e-2, "qwen")
    accum = recipe_of(config("llava-1.5-7b", train={"grad_accum": 16}))  # the script's own 8 × 16 per device
    assert (accum.effective_batch, accum.accumulation, accum.samples_per_step) == (None, 16, 128)
    four = recipe_of(config("llava-1.5-7b", train={"world_size": 4}))
    assert (four.accumulation, four.samples_per_step) == (16, 512)  # the authors' 8 × 16 × 4 GPUs


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"effective_batch": 100}, "effective_batch 100 is not a multiple of batch_size 8"),
        ({"effective_batch": 64, "grad_accum": 2}, "set train.effective_batch or train.grad_accum, not both"),
        ({"warmup_ratio": 1.0}, "train.warmup_ratio = 1.0 is out of range"),
        ({"betas": [0.9, 1.0]}, "train.betas"),
        ({"batch_size": 0}, "train.batch_size must be a positive integer"),
        ({"max_grad_norm": -1}, "train.max_grad_norm = -1"),
        ({"beta1": 0.9}, "Extra inputs are not permitted"),
    ],
)
def test_bad_training_fields_fail_at_load_naming_them(tmp_path, train, message):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"model": {"source": "tiny"}, "train": train}))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        PipelineConfig.from_yaml(path)


def samples(tmp_path, n: int) -> list[TrainSample]:
    """n samples with exactly 5 labelled tokens each, so a pooled batch mean equals the mean of micro-batch means."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        path = tmp_path / f"i{i}.png"
        random_image(40 + i).save(path)
        labels = np.full(16, -100)
        cells = rng.choice(16, 5, replace=False)
        labels[cells] = 0
        labels[cells[:2]] = 1
        out.append(TrainSample(f"s{i}", str(path), QUESTIONS[i % 4], labels))
    return out


def test_accumulation_reproduces_the_effective_batch_on_one_device(tiny_llava, tmp_path, caplog):
    """2 per micro-batch × 3 accumulated = one batch of 6: the same samples, loss and gradient in each step."""
    from sdrpn_core.rpn import RoIPredictor

    data = samples(tmp_path, 6)
    common = {"K": 1, "T": 2, "lr": 1e-3, "warmup_ratio": 0.0, "epochs": 2}
    runs = {}
    for name, cfg in [
        ("small", TrainConfig(batch_size=2, effective_batch=6, **common)),
        ("big", TrainConfig(batch_size=6, **common)),
    ]:
        torch.manual_seed(0)
        rpn = RoIPredictor.from_adapter(tiny_llava, K=1, T=2)
        grads: list[dict] = []

        def keep(step, record, rpn=rpn, grads=grads):
            grads.append({n: p.grad.clone() for n, p in rpn.named_parameters() if p.grad is not None})

        with caplog.at_level(logging.INFO, logger="sdrpn_core.train"):
            out = tmp_path / name
            runs[name] = (train_rpn(tiny_llava, data, cfg, rpn=rpn, on_step=keep, out_dir=out), grads)
    (small, small_grads), (big, big_grads) = runs["small"], runs["big"]
    assert small.steps == big.steps == 2
    assert "effective batch 6 = 2 per device × 3 accumulated × 1 device(s); 2 optimizer steps" in caplog.text
    assert set(small_grads[0]) == set(big_grads[0]) and small_grads[0]
    for name, g in small_grads[0].items():
        torch.testing.assert_close(g, big_grads[0][name], atol=1e-6, rtol=1e-4, msg=name)
    np.testing.assert_allclose([h["loss"] for h in small.history], [h["loss"] for h in big.history], rtol=1e-4)
    state = json.loads(next((tmp_path / "small" / "checkpoints").glob("step-*/state.json")).read_text())
    assert (state["effective_batch"], state["accumulation"], state["recipe"]["effective_batch"]) == (6, 3, 6)


def test_a_set_smaller_than_the_effective_batch_is_seen_once_per_epoch(tiny_llava, tmp_path):
    data = samples(tmp_path, 5)  # 3 micro-batches of 2 per epoch, 4 wanted per step: one short step each epoch
    result = train_rpn(tiny_llava, data, TrainConfig(K=1, T=2, batch_size=2, effective_batch=8, epochs=2))
    assert result.steps == 2 and [h["valid_tokens"] for h in result.history] == [25, 25]


def test_world_size_above_one_is_refused_by_the_single_process_trainer(tiny_llava, tmp_path):
    with pytest.raises(ValueError, match=r"train\.world_size 2"):
        train_rpn(tiny_llava, samples(tmp_path, 2), TrainConfig(K=1, T=2, batch_size=2, world_size=2))


def test_qwen_labels_and_training_use_the_authors_prompts_by_default_and_switchably():
    from sdrpn_core.models.qwen import GROUNDING_INSTRUCTION

    natural = config("qwen2.5-vl-7b/natural")
    assert natural.teacher.label_inputs() == {"prompt": "grounding", "literal_image_tag": True}
    assert config("qwen2.5-vl-3b/textual").teacher.label_inputs() == {"prompt": "plain", "literal_image_tag": True}
    assert config("llava-1.5-7b").teacher.label_inputs() == {}
    off = config(
        "qwen2.5-vl-7b/natural", teacher={"preset": "qwen2.5-vl-7b/natural", "inputs": {"literal_image_tag": False}}
    )
    assert off.teacher.label_inputs() == {"prompt": "grounding", "literal_image_tag": False}
    assert recipe_of(natural).inputs == {"prompt": "plain", "literal_image_tag": True}
    assert recipe_of(config("qwen2.5-vl-7b", train={"inputs": {"prompt": "short"}})).inputs == {"prompt": "short"}
    assert recipe_of(config("llava-1.5-7b")).inputs == {}
    assert GROUNDING_INSTRUCTION.startswith("Output the grounding bounding box of Region of Interest")


def test_llava_runs_in_float16_when_asked(tmp_path):
    """The authors evaluate LLaVA in fp16: `model.dtype: float16` loads it so, and the method runs on it."""
    from sdrpn_core.data import Sample
    from sdrpn_core.infer import answer_sdrpn
    from sdrpn_core.models import load_adapter
    from sdrpn_core.models.tiny import build_tiny
    from sdrpn_core.presets import get_preset
    from sdrpn_core.rpn import RoIPredictor
    from sdrpn_core.teacher import extract_teacher_maps

    build_tiny("llava").save_pretrained(tmp_path / "m")
    adapter = load_adapter(tmp_path / "m", dtype="float16")
    assert adapter.dtype == torch.float16
    rpn = RoIPredictor.from_adapter(adapter, K=1, T=2)
    assert next(rpn.parameters()).dtype == torch.float16
    answer = answer_sdrpn(adapter, rpn, random_image(3), "what is it ?", threshold=0.5, max_new_tokens=3)
    assert len(answer.token_ids) == 3 and np.isfinite(answer.roi.logits).all()
    preset = get_preset("llava-1.5-7b", grounding={2: (0,)}, sink={}, K=1, T=2)
    out = extract_teacher_maps(adapter, [Sample("a", random_image(4), "what is it ?")], preset, max_new_tokens=3)
    assert out.records[0].grounding.dtype == np.float32 and np.isfinite(out.records[0].grounding).all()


def test_the_authors_recipes_keep_all_ignore_samples_in_their_batches(tiny_llava, tmp_path):
    """As their ROITrainingDataset: an all-ignore sample adds no loss but fills a batch slot and counts in the steps."""
    data = samples(tmp_path, 4) + [
        TrainSample(f"empty{i}", str(tmp_path / "i0.png"), "q ?", np.full(16, -100)) for i in range(2)
    ]
    kept = train_rpn(tiny_llava, data, TrainConfig(K=1, T=2, batch_size=2, keep_all_ignore=True))
    skipped = train_rpn(tiny_llava, data, TrainConfig(K=1, T=2, batch_size=2))
    assert (kept.steps, skipped.steps) == (3, 2) and kept.skipped_all_ignore == skipped.skipped_all_ignore == 2
    assert sum(h["valid_tokens"] for h in kept.history) == sum(h["valid_tokens"] for h in skipped.history) == 20
    assert recipe_of(config("llava-1.5-7b")).keep_all_ignore and recipe_of(config("qwen2.5-vl-7b")).keep_all_ignore
    assert not recipe_of(config("sdrpn-nano")).keep_all_ignore


def test_world_size_0_is_every_visible_gpu(monkeypatch):
    """`train.world_size: 0` resolves to the visible GPUs (here: faked 4, then none → 1), keeping the effective
    batch: the accumulation shrinks with the devices."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    four = recipe_of(config("llava-1.5-7b", train={"world_size": 0}))
    assert (four.world_size, four.samples_per_step, four.accumulation) == (4, 512, 16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert recipe_of(config("llava-1.5-7b", train={"world_size": 0})).world_size == 1


def test_several_nodes_split_the_world_size_and_refuse_what_would_change_the_batch(monkeypatch, tmp_path):
    """`train.world_size` is the whole group: with `--nnodes 2` in SDRPN_TORCHRUN_ARGS each node runs half the
    ranks. An elastic node range, or a world size the nodes cannot split, is an error naming the setting."""
    from stages.train_ranks import node_command

    job = tmp_path / "job.json"
    cmd, nodes = node_command(job, 4)
    assert nodes == 1 and "--standalone" in cmd and cmd[cmd.index("--nproc-per-node") + 1] == "4"
    monkeypatch.setenv("SDRPN_TORCHRUN_ARGS", "--nnodes=2 --rdzv-backend c10d --rdzv-endpoint a:29400")
    cmd, nodes = node_command(job, 4)
    assert nodes == 2 and "--standalone" not in cmd and cmd[cmd.index("--nproc-per-node") + 1] == "2"
    with pytest.raises(ValueError, match="world_size 3 is not a multiple of the 2 nodes"):
        node_command(job, 3)
    monkeypatch.setenv("SDRPN_TORCHRUN_ARGS", "--nnodes 1:4 --rdzv-endpoint a:29400")
    with pytest.raises(ValueError, match="SDRPN_TORCHRUN_ARGS: --nnodes '1:4'"):
        node_command(job, 4)
