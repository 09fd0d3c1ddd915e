"""A model family is its adapter, its tiny builder and its preset: a third family registered here (a LLaVA-like
model with other rules) runs the method end to end without a line changed elsewhere; an unknown family fails."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

from sdrpn_core.data import Sample
from sdrpn_core.models import FAMILIES, AdapterError, Family, LlavaAdapter, get_family, load_adapter
from sdrpn_core.models.tiny import TinyLlavaSpec, build_tiny, build_tiny_llava
from sdrpn_core.presets import PRESETS, Preset, get_preset
from sdrpn_core.rpn import RoIPredictor
from sdrpn_core.teacher import extract_teacher_maps
from tests.conftest import QUESTIONS, random_image


class DemoAdapter(LlavaAdapter):
    """A third family: LLaVA's model class, its own rules (no extra RPN norm, RoPE in the head, own recipe)."""

    family = "demo_vlm"
    rpn_twig_norm = False
    rpn_rope_in_head = True
    train_recipe: ClassVar[dict] = {"lr": 2e-4, "batch_size": 2, "effective_batch": 8}


def tiny_demo(**spec) -> DemoAdapter:
    return DemoAdapter(*build_tiny_llava(TinyLlavaSpec(**spec)))


@pytest.fixture
def demo(monkeypatch):
    family = Family("demo_vlm", DemoAdapter, tiny=f"{__name__}:tiny_demo", aliases=("demo",))
    monkeypatch.setitem(FAMILIES, "demo_vlm", family)
    monkeypatch.setitem(FAMILIES, "demo", family)
    preset = Preset(
        "demo-7b", grounding={2: (0, 1)}, sink={}, sink_thresh=1e-3, K=1, T=2, recipe=DemoAdapter.train_recipe
    )
    monkeypatch.setitem(PRESETS, "demo-7b", preset)
    return family


def test_a_third_family_runs_the_method_through_its_own_rules(demo, tmp_path):
    adapter = build_tiny("demo")
    assert type(adapter) is DemoAdapter and get_family("demo").name == "demo_vlm"
    rpn = RoIPredictor.from_adapter(adapter, K=1, T=2)
    assert rpn.twig_norm is None and rpn.config.rope_in_head and rpn.config.family == "demo_vlm"
    images = [random_image(i) for i in range(2)]
    out = extract_teacher_maps(
        adapter,
        [Sample(f"s{i}", im, q) for i, (im, q) in enumerate(zip(images, QUESTIONS[:2], strict=True))],
        get_preset("demo-7b"),
        max_new_tokens=3,
    )
    assert len(out.records) == 2 and all(np.isfinite(r.grounding).all() for r in out.records)
    adapter.save_pretrained(tmp_path / "m")
    loaded = load_adapter(tmp_path / "m", family="demo_vlm")  # the checkpoint says llava; the family says demo
    assert type(loaded) is DemoAdapter
    rpn.save(tmp_path / "rpn")
    assert RoIPredictor.load(tmp_path / "rpn", loaded).config.family == "demo_vlm"
    with pytest.raises(AdapterError, match="trained for a demo_vlm model"):
        RoIPredictor.load(tmp_path / "rpn", build_tiny("llava"))


def test_a_third_family_config_resolves_its_recipe(demo):
    from stages.config import PipelineConfig

    cfg = PipelineConfig.model_validate(
        {"model": {"source": "tiny", "tiny": {"family": "demo"}}, "teacher": {"preset": "demo-7b"}}
    )
    recipe = cfg.train.params(cfg.teacher.preset_obj())
    assert (recipe.lr, recipe.batch_size, recipe.accumulation) == (2e-4, 2, 4)


def test_an_unknown_family_fails_loudly_instead_of_borrowing_llavas_rules(tmp_path):
    build_tiny("llava").save_pretrained(tmp_path / "m")
    with pytest.raises(AdapterError, match=r"no adapter for model family 'internvl' \(known: .*llava.*qwen2_5_vl"):
        load_adapter(tmp_path / "m", family="internvl")
    with pytest.raises(AdapterError, match="no adapter for model family 'internvl'"):
        build_tiny("internvl")
    with pytest.raises(AdapterError, match="is taken by LlavaAdapter"):
        from sdrpn_core.models import register_family

        register_family(Family("llava", DemoAdapter))
    assert torch.is_tensor(next(iter(build_tiny("llava").model.parameters())))
