"""Evaluation methods come from one registry: the four built in, a fifth added with one call and evaluated by the
unchanged stage, unknown names refused by the config."""

from __future__ import annotations

import pytest

from sdrpn_core.infer import answer_with_boxes_batch
from sdrpn_core.methods import METHODS, EvalMethod, EvalParams, get_method
from stages.config import ConfigError, DatasetSpec, ModelSpec, PipelineConfig
from stages.data import build_manifest
from stages.model import resolve_model
from stages.report import METHOD_NAMES
from stages.score import evaluate
from storage.store import Store, StoreSettings


def test_the_built_in_methods_and_what_they_need():
    assert list(METHODS) == ["baseline", "sdrpn", "vicrop", "oracle"]
    assert [m for m in METHODS if get_method(m).needs_rpn] == ["sdrpn"]
    assert [m for m in METHODS if get_method(m).needs_box] == ["oracle"]
    assert METHOD_NAMES["sdrpn"] == "+SD-RPN" and METHOD_NAMES["s2"] == "+S²"
    with pytest.raises(KeyError, match="unknown evaluation method 'sdrnp'"):
        get_method("sdrnp")


def test_a_new_method_is_one_registry_entry(tmp_path, monkeypatch):
    """A centre crop of half the image, registered here, runs through the evaluate stage next to the baseline."""

    def centre(settings, images, prompts, boxes):
        halves = [[(w // 4, h // 4, 3 * w // 4, 3 * h // 4)] for w, h in (im.image.size for im in images)]
        return answer_with_boxes_batch(settings.adapter, images, prompts, halves, 4)

    monkeypatch.setitem(METHODS, "centre", EvalMethod("centre", centre, "+centre crop"))
    store = Store(StoreSettings(root=str(tmp_path / "store")))
    model = resolve_model(ModelSpec(source="tiny", tiny={"image_size": 32, "patch_size": 8}), store)
    dataset = build_manifest(DatasetSpec(kind="synthetic", n=3, seed=5, canvas=96), store)
    params = EvalParams(methods=("baseline", "centre", "oracle", "sdrpn"), max_new_tokens=4, vicrop_layer=1)
    ref = evaluate(store, model, None, dataset, params)
    rows = {s["method"]: s for s in ref.scores}
    assert list(rows) == ["baseline", "centre", "oracle"]  # SD-RPN needs an RPN: none here, so left out
    assert rows["centre"]["relative_throughput"] > 0 and 0 <= rows["centre"]["score"] <= 100
    cfg = {"model": {"source": "tiny"}, "eval": {"methods": ["baseline", "centre"]}}
    assert PipelineConfig.model_validate(cfg).eval.methods == ("baseline", "centre")


def test_an_unknown_method_fails_at_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {source: tiny}\neval: {methods: [baseline, s2]}\n")
    with pytest.raises(ConfigError, match=r"unknown evaluation methods \['s2'\]"):
        PipelineConfig.from_yaml(path)
