"""The release stage's functions called directly, without Prefect (the flow tests run it through the flows): the
defaults `predict` takes, the model card, the folder it commits, and every way `fetch_release` finds one."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from stages import release as stage
from stages.config import ModelSpec
from stages.model import resolve_model
from stages.refs import EvalRef, LabelsRef
from storage.artifacts import ArtifactStore
from storage.store import Store, StoreSettings
from tests.test_calibrate import _random_rpn


def _protocol(benchmark: str, tau: float, mode: str, calibration: str = "", **more) -> dict:
    p = {
        "benchmark": benchmark,
        "harness": "lmms-eval",
        "metric": "accuracy",
        "roi_threshold": tau,
        "roi_mode": mode,
        "max_new_tokens": 8,
        "kv_reuse": True,
        "rows": 4,
        "params": {"inputs": [["max_pixels", 1000]]},
        **more,
    }
    return {**p, "calibration": {"fingerprint": calibration}} if calibration else p


def test_predict_takes_the_first_evaluations_settings_and_each_benchmarks_tau_mode_and_inputs():
    vstar = _protocol("vstar", 0.05, "box", calibration="cal1", kv_reuse=False, params={"inputs": [["max_pixels", 9]]})
    protocols = [_protocol("textvqa", 0.15, "mask"), vstar]
    d = stage.inference_defaults(protocols)
    assert (d["threshold"], d["mode"], d["max_new_tokens"], d["reuse_kv"]) == (0.15, "mask", 8, True)
    assert d["inputs"] == [["max_pixels", 1000]]
    assert d["per_benchmark_threshold"] == {"textvqa": 0.15, "vstar": 0.05}
    assert d["per_benchmark"] == {
        "textvqa": {"threshold": 0.15, "mode": "mask", "inputs": [["max_pixels", 1000]]},
        "vstar": {"threshold": 0.05, "mode": "box", "inputs": [["max_pixels", 9]], "calibration": "cal1"},
    }
    assert d["source"] == "evaluation: textvqa, vstar; τ and mode calibrated on vstar"
    plain = stage.inference_defaults([{**_protocol("docvqa", 0.2, "box"), "params": {}}])
    assert plain["source"] == "evaluation: docvqa" and plain["inputs"] == [] and plain["mode"] == "box"
    assert plain["per_benchmark"] == {"docvqa": {"threshold": 0.2, "mode": "box", "inputs": []}}


@pytest.fixture
def committed(tmp_path, flow_cache):
    """A store holding a random RPN (with its recipe) and two evaluations of it, as the stages commit them."""
    store = Store(StoreSettings(root=str(tmp_path / "store")))
    model = resolve_model(ModelSpec(source="tiny", tiny={"image_size": 32, "patch_size": 8}), store)
    (tmp_path / "rpn").mkdir()
    (tmp_path / "rpn" / "train_recipe.json").write_text(json.dumps({"lr": 0.001, "epochs": 2}))
    rpn = _random_rpn(store, model, tmp_path)
    arts, evals = ArtifactStore(store), []
    for i, (bench, tau) in enumerate([("synthetic", 0.3), ("textvqa", 0.15)]):
        fp = f"{i:016x}"
        files = {"protocol.json": json.dumps(_protocol(bench, tau, "mask", batch_size=2)).encode()}
        scores = ({"method": "baseline", "score": 40.0 + i}, {"method": "sdrpn", "score": 60.0 + i})
        evals.append(EvalRef(fp, arts.put_files("eval", fp, files), scores, bench))
    labels = LabelsRef("labels0123456789", "", 12, 9, parts=(("synthetic", "part0123"),))
    return store, model, rpn, labels, evals


def test_a_release_holds_the_predictor_its_defaults_scores_and_card(committed):
    store, model, rpn, labels, evals = committed
    fp = "release012345678"
    assert stage.lookup(store, fp) is None
    url = stage.release(store, model, rpn, labels, evals, fp)
    assert stage.lookup(store, fp) == url == ArtifactStore(store).url("release", fp)
    arts = ArtifactStore(store)
    names = set(arts.manifest("release", fp)["files"])
    assert {
        "rpn.safetensors",
        "rpn_config.json",
        "train_recipe.json",
        "inference.json",
        "scores.json",
        "README.md",
    } <= names
    assert arts.manifest("release", fp)["meta"] == {"rpn": rpn.fingerprint, "model": model.fingerprint,
                                                  "evals": [e.fingerprint for e in evals]}  # fmt: skip
    inference = json.loads(arts.read("release", fp, "inference.json"))
    assert inference["threshold"] == 0.3 and inference["per_benchmark_threshold"] == {"synthetic": 0.3, "textvqa": 0.15}
    scores = json.loads(arts.read("release", fp, "scores.json"))
    assert [s["protocol"]["benchmark"] for s in scores] == ["synthetic", "textvqa"]
    assert scores[1]["scores"] == [{"method": "baseline", "score": 41.0}, {"method": "sdrpn", "score": 61.0}]
    card = arts.read("release", fp, "README.md").decode()
    assert card.startswith(f"---\nbase_model: {model.path}\nlibrary_name: sdrpn\n")
    assert f"- fingerprint: `{model.fingerprint}` (checked when the predictor is loaded)" in card
    assert "- label set `labels0123456789`: 12 samples, 9 with a labelled token" in card
    assert "- source `synthetic`: label set `part0123`" in card
    assert '"lr": 0.001' in card and f"{rpn.steps} optimizer steps, final loss {rpn.final_loss:.4f}." in card
    assert "| textvqa | lmms-eval | accuracy | 0.15 | mask | 8 | 2 | 4 |" in card
    assert "| +SD-RPN (ours) | – | 60.0 | 61.0 |" in card  # the scores table
    assert f"--rpn <this folder> --model {model.path}" in card and "τ 0.3, mode mask, 8 new tokens." in card
    assert stage.release_key(rpn, evals) == {"release": rpn.fingerprint, "evals": [e.fingerprint for e in evals]}


def test_a_release_without_a_recipe_says_so_in_an_empty_block(committed):
    _, model, rpn, labels, evals = committed
    one = LabelsRef(labels.fingerprint, "", 12, 9)  # a single source: no parts listed
    card = stage.model_card(model, rpn, one, {}, evals, [_protocol("synthetic", 0.3, "mask")])
    assert "```json\n{}\n```" in card and "| synthetic | lmms-eval | accuracy | 0.3 | mask | 8 | 1 | 4 |" in card
    assert "- source `" not in card


def test_a_release_is_found_as_a_folder_a_store_url_or_not_at_all(committed, tmp_path):
    store, model, rpn, labels, evals = committed
    folder = stage.release(store, model, rpn, labels, evals, "release012345678")
    assert stage.fetch_release(folder) == Path(folder)  # a folder is itself
    url = "file://" + folder  # a store URL: fetched into the cache and verified
    fetched = stage.fetch_release(url)
    assert fetched != Path(folder) and (fetched / "README.md").read_bytes() == (Path(folder) / "README.md").read_bytes()
    assert (stage.fetch_release(url + "/") / "README.md").read_bytes() == (fetched / "README.md").read_bytes()
    assert str(fetched).startswith(str(tmp_path / "cache"))
    assert (
        stage.fetch_release("file://" + ArtifactStore(store).url("rpn", rpn.fingerprint)) / "rpn.safetensors"
    ).exists()
    with pytest.raises(FileNotFoundError, match="not an RPN folder"):
        stage.fetch_release(str(tmp_path))
    with pytest.raises(ValueError, match="ending in /release/<fp> or /rpn/<fp>"):
        stage.fetch_release("file://" + ArtifactStore(store).url("eval", evals[0].fingerprint))
    with pytest.raises(FileNotFoundError, match="huggingface-cli download nobody/nothing"):
        stage.fetch_release("nobody/nothing")


CARD = """---
base_model: /models/llava-tiny
library_name: sdrpn
tags: [sd-rpn, roi-prediction, multimodal]
---

# SD-RPN region predictor for `llava-tiny`

A self-distilled RoI predictor (arXiv 2509.16944): decoder layers copied from the base model, trained on
pseudo-labels from the model's own attention, that tells the model where to look closer before it answers.

## Base model

- path or id: `/models/llava-tiny` (llava, float32)
- fingerprint: `fp-model` (checked when the predictor is loaded)

## Training data

- label set `fp-labels`: 12 samples, 9 with a labelled token
- source `a`: label set `fp-a`
- source `b`: label set `fp-b`

## Recipe

```json
{
 "lr": 0.001
}
```

12 optimizer steps, final loss 0.2500.

## Scores

| method | Thru. | synthetic |
|---|---|---|
| baseline (ours) | – | 40.0 |
| +SD-RPN (ours) | 0.50× | 60.0 |

The paper reports no numbers for this model.

## Protocol

| benchmark | harness | metric | τ | RoI mode | max new tokens | batch | rows |
|---|---|---|---|---|---|---|---|
| synthetic | h | m | 0.3 | mask | 8 | 1 | 4 |

## Use

```bash
sdrpn predict photo.jpg "What is written on the sign?" --rpn <this folder> --model /models/llava-tiny
```

Defaults `predict` takes from `inference.json`: τ 0.3, mode mask, 8 new tokens.
"""


def test_the_model_card_line_for_line():
    """The card is what a hub page shows: its front matter, sections and tables exactly."""
    from stages.refs import ModelRef, RpnRef

    model = ModelRef("fp-model", "/models/llava-tiny", "llava", "float32", "cpu")
    labels = LabelsRef("fp-labels", "", 12, 9, parts=(("a", "fp-a"), ("b", "fp-b")))
    scores = ({"method": "baseline", "score": 40.0}, {"method": "sdrpn", "score": 60.0, "relative_throughput": 0.5})
    protocol = {"harness": "h", "metric": "m", "kv_reuse": True, "rows": 4}
    protocol |= {"benchmark": "synthetic", "roi_threshold": 0.3, "roi_mode": "mask", "max_new_tokens": 8}
    card = stage.model_card(
        model,
        RpnRef("fp-rpn", "u", 12, 0.25),
        labels,
        {"lr": 0.001},
        [EvalRef("e", "u", scores, "synthetic")],
        [protocol],
    )
    assert card == CARD


def test_defaults_without_recorded_parameters_and_with_two_calibrations():
    bare = {k: v for k, v in _protocol("vstar", 0.05, "box", calibration="c1").items() if k != "params"}
    d = stage.inference_defaults([bare, _protocol("hrbench", 0.1, "mask", calibration="c2")])
    assert d["inputs"] == [] and d["per_benchmark"]["vstar"]["inputs"] == []
    assert d["source"] == "evaluation: vstar, hrbench; τ and mode calibrated on vstar, hrbench"


def test_a_release_caches_the_rpn_once_writes_readable_json_and_any_score_type(committed, tmp_path):
    """The RPN is fetched into the cache folder the evaluation's loader uses; the JSON files are indented for a
    store browser; a score that is a numpy number is written as text rather than failing the stage; an RPN
    trained without a recipe file gets an empty recipe block."""
    import numpy as np

    store, model, rpn, labels, evals = committed
    evals = [replace(evals[0], scores=({"method": "sdrpn", "score": 50.0, "rate": np.float32(0.5)},))]
    arts = ArtifactStore(store)
    stage.release(store, model, rpn, labels, evals, "release0000000001")
    assert (tmp_path / "cache" / "rpn" / rpn.fingerprint / "rpn.safetensors").exists()
    inference = arts.read("release", "release0000000001", "inference.json").decode()
    scores = arts.read("release", "release0000000001", "scores.json").decode()
    assert inference.startswith('{\n "threshold": 0.3,\n') and scores.startswith('[\n {\n  "protocol": {\n')
    assert json.loads(scores)[0]["scores"] == [{"method": "sdrpn", "score": 50.0, "rate": "0.5"}]
    files = {p.name: p.read_bytes() for p in (tmp_path / "cache" / "rpn" / rpn.fingerprint).iterdir()}
    files.pop("train_recipe.json")
    bare = replace(rpn, fingerprint="norecipe00000000")
    bare = replace(bare, url=arts.put_files("rpn", bare.fingerprint, files, meta={"steps": 0, "final_loss": 0.0}))
    stage.release(store, model, bare, labels, evals, "release0000000002")
    assert "```json\n{}\n```" in arts.read("release", "release0000000002", "README.md").decode()
    assert "train_recipe.json" not in arts.manifest("release", "release0000000002")["files"]


def test_each_store_url_gets_its_own_cache_folder(committed, tmp_path):
    store, model, rpn, labels, evals = committed
    folder = stage.release(store, model, rpn, labels, evals, "release012345678")
    one = stage.fetch_release("file://" + folder)
    other = stage.fetch_release("file://" + ArtifactStore(store).url("rpn", rpn.fingerprint))
    assert one.parent == other.parent == tmp_path / "cache" / "release" and one != other
    assert len(one.name) == len(other.name) == 16


def test_a_hub_id_is_looked_up_in_the_local_cache_only(monkeypatch, tmp_path):
    """Stands in for the hub call (there is no hub here): fetch_release must ask for the local copy only."""
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append((repo, kw)) or tmp_path)
    assert stage.fetch_release("team/rpn") == tmp_path and asked == [("team/rpn", {"local_files_only": True})]
