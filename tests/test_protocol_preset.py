"""`protocol: paper`: what it sets for each model (against the authors' scripts, written out here), what the file's
own values keep, per-dataset pixel budgets reaching the adapter and the authors' τ, training's dtype, the names
in protocol.json's terms and the report's line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sdrpn_core.benchmarks import get_benchmark
from sdrpn_core.benchmarks.published import PAPER_PROTOCOL, PUBLISHED, paper_protocol
from stages.config import HUB_ID, ConfigError, PipelineConfig, dataset_params

PAPER_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "paper"

# the authors' scripts (LLaVA/lmms-eval/examples/A6000/reproduce.sh; Qwen2.5-VL/lmms-eval/examples/A6000/
# Qwen2_5vl-{3b,7b}.sh), written out: (min_pixels, max_pixels, τ) of each high-resolution run
AUTHORS_HIGH_RES = {
    "qwen2.5-vl-7b": {"vstar": (451584, 2408448, 0.05), "hrbench4k": (451584, 3211264, 0.03),
                      "hrbench8k": (451584, 3211264, 0.03)},
    "qwen2.5-vl-3b": {"vstar": (802816, 3211264, 0.075), "hrbench4k": (802816, 3211264, 0.05),
                      "hrbench8k": (802816, 3211264, 0.05)},
}  # fmt: skip
BENCHMARKS = ["textvqa", "docvqa", "chartqa", "ocrbench", "infovqa", "vstar", "pope", "hrbench4k", "hrbench8k"]


def _config(preset: str, protocol: str = "paper", **sections) -> PipelineConfig:
    datasets = [{"kind": "synthetic", "n": 4, "benchmark": b} for b in BENCHMARKS]
    raw = {"protocol": protocol, "model": {"source": "tiny"}, "teacher": {"preset": preset}}
    raw["eval"] = {"datasets": datasets, **sections.pop("eval", {})}
    return PipelineConfig.model_validate({**raw, **sections})


@pytest.mark.parametrize("model", ["llava-1.5-7b", "llava-1.5-13b"])
def test_paper_llava_is_fp16_teacher_and_evaluation_bf16_training_pass_2_recomputed(model):
    cfg = _config(model)
    params = cfg.eval.params(cfg.teacher.preset_obj())
    assert cfg.model.dtype == "float16"  # the model stage's dtype: the teacher's and the evaluation's
    assert cfg.train.params(cfg.teacher.preset_obj()).dtype == "bfloat16"
    assert (params.reuse_kv, cfg.protocol) == (False, "paper")
    assert all(not d.inputs for d in cfg.eval.datasets)  # LLaVA: one 336 px square for every table


@pytest.mark.parametrize("model", ["qwen2.5-vl-7b", "qwen2.5-vl-3b"])
def test_paper_qwen_runs_each_high_resolution_table_at_the_authors_budget_and_tau(model, tiny_qwen):
    cfg = _config(model)
    params = cfg.eval.params(cfg.teacher.preset_obj())
    assert cfg.model.dtype == "bfloat16" and cfg.train.params(cfg.teacher.preset_obj()).dtype == "bfloat16"
    assert not params.reuse_kv and params.threshold is None  # τ: the authors' per benchmark and budget
    for spec in cfg.eval.datasets:
        theirs = AUTHORS_HIGH_RES[model].get(spec.benchmark)
        inputs = dict(dataset_params(params, spec).inputs)
        if theirs is None:  # the 576-token table: the adapter's default budget, min = max = 451,584
            assert inputs == {}
            continue
        assert (inputs["min_pixels"], inputs["max_pixels"]) == theirs[:2]
        adapter = tiny_qwen.with_inputs(**inputs)
        tokens = adapter.image_token_budget
        bench = get_benchmark(spec.benchmark)
        assert tokens == theirs[1] // (28 * 28)
        assert bench.threshold(adapter.family, params.default_threshold, params.model_key, tokens) == theirs[2]


def test_the_files_own_values_win_and_fast_sets_nothing():
    cfg = _config(
        "qwen2.5-vl-7b",
        model={"source": "tiny", "dtype": "float32"},
        train={"dtype": "float32"},
        eval={
            "reuse_kv": True,
            "datasets": [{"kind": "synthetic", "benchmark": "vstar", "inputs": {"max_pixels": 802816}}],
        },
    )
    assert cfg.model.dtype == "float32" and cfg.train.params(cfg.teacher.preset_obj()).dtype == "float32"
    assert cfg.eval.reuse_kv is True
    assert cfg.eval.datasets[0].inputs == {"min_pixels": 451584, "max_pixels": 802816}  # theirs fills the rest
    fast = _config("qwen2.5-vl-7b", protocol="fast")
    params = fast.eval.params(fast.teacher.preset_obj())
    assert (fast.model.dtype, params.reuse_kv, fast.protocol) == ("auto", True, "fast")
    assert fast.train.params(fast.teacher.preset_obj()).dtype is None
    assert all(not d.inputs for d in fast.eval.datasets)


def test_paper_protocol_errors_name_what_to_change(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("protocol: paper\nmodel: {source: nano}\nteacher: {preset: sdrpn-nano}\n")
    with pytest.raises(ConfigError, match=r"no protocol for preset 'sdrpn-nano'.*protocol: fast"):
        PipelineConfig.from_yaml(path)
    path.write_text("model: {source: tiny}\neval: {protocol: paper}\n")  # the harness's name: not settable
    with pytest.raises(ConfigError, match=r"eval.protocol names the harness"):
        PipelineConfig.from_yaml(path)
    path.write_text("model: {source: tiny}\ntrain_data: {kind: synthetic, inputs: {max_pixels: 802816}}\n")
    with pytest.raises(ConfigError, match="train: `inputs` is for evaluation datasets"):
        PipelineConfig.from_yaml(path)
    path.write_text("protocol: papers\nmodel: {source: tiny}\n")
    with pytest.raises(ConfigError, match="protocol"):
        PipelineConfig.from_yaml(path)


def test_paper_protocol_table_states_tokens_as_the_paper_does():
    assert paper_protocol("qwen2.5-vl-7b", "V*")["tokens"] == "576–3,072"
    assert paper_protocol("qwen2.5-vl-3b", "HR8K")["tokens"] == "1,024–4,096"
    assert paper_protocol("qwen2.5-vl-7b", "TextVQA")["pixels"] == (451584, 451584)
    llava = {"tokens": "576", "pixels": None, "dtype": "float16", "kv_reuse": False}
    assert paper_protocol("llava-1.5-7b", "V*") == llava
    assert paper_protocol("someone-else", "V*")["tokens"] is None
    assert {p.train_dtype for p in PAPER_PROTOCOL.values()} == {"bfloat16"}


def test_training_refuses_a_model_loaded_in_another_dtype_than_train_dtype(tiny_llava):
    from sdrpn_core.train import TrainConfig, train_rpn

    with pytest.raises(ValueError, match=r"train.dtype bfloat16, but the model is loaded in torch.float32"):
        train_rpn(tiny_llava, [], TrainConfig(K=2, T=1, dtype="bfloat16"))
    with pytest.raises(ValueError, match=r"train.dtype"):
        TrainConfig(K=2, dtype="float8")
    assert tiny_llava.dtype == torch.float32


@pytest.mark.parametrize("path", sorted(PAPER_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_the_shipped_reproduction_configs_run_every_paper_column_under_the_paper_protocol(path, tmp_path):
    """configs/paper/<model>.yaml (the README's reproduction commands) load once their data exists, name the model
    they are for, evaluate every column the paper reports for it, and take the paper's settings."""
    text = path.read_text().replace("/data", str(tmp_path / "data"))
    for found in re.findall(r"(?:path|images): ([^,}\s]+)", text):
        target = Path(found)
        if not HUB_ID.match(found):  # the hub id of the model stays as it is
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch() if target.suffix == ".json" else target.mkdir(exist_ok=True)
    (tmp_path / path.name).write_text(text)
    cfg = PipelineConfig.from_yaml(tmp_path / path.name)
    paper = PAPER_PROTOCOL[path.stem]
    assert cfg.protocol == "paper" and cfg.teacher.preset.split("/")[0] == path.stem
    assert (cfg.model.dtype, cfg.train.params(cfg.teacher.preset_obj()).dtype) == (paper.dtype, paper.train_dtype)
    evaluated = {get_benchmark(d.benchmark).paper_key for d in cfg.eval.datasets}
    reported = {c.split(" ")[0] for c in PUBLISHED[path.stem]["sdrpn"] if c != "Thru."}
    assert reported <= evaluated
    assert {m for m in PUBLISHED[path.stem] if m != "s2"} == set(cfg.eval.methods or ())
    expected_sources = 2 if path.stem.startswith("qwen") else 1  # Qwen: natural and textual heads, as theirs
    assert len(cfg.sources()) == expected_sources
