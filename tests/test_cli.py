from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flows.cli import main
from sdrpn_core.train import TrainConfig, TrainSample, train_rpn
from stages.config import DatasetSpec, PipelineConfig
from stages.data import build_manifest
from storage.store import Store
from tests.conftest import random_image


def test_bad_manifest_line_is_quarantined_with_its_location(tmp_path):
    from stages.common import read_rejections

    manifest = tmp_path / "samples.jsonl"
    random_image(0).save(tmp_path / "x.png")
    manifest.write_text('{"id": "a", "image": "x.png", "question": "q"}\n{"id": "b", "question": "q"}\n')
    store = Store(str(tmp_path / "store"))
    ref = build_manifest(DatasetSpec(kind="jsonl", path=str(manifest)), store)
    assert ref.rows == 1 and ref.rejected == 1
    (rejection,) = read_rejections(ref, store)
    assert rejection["sample_id"] == "b" and rejection["reason"].startswith("samples.jsonl:2: bad row: 'image'")


def test_jsonl_manifest_resolves_relative_images_and_is_stable(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        random_image(i).save(tmp_path / "imgs" / f"{i}.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(f'{{"id": "s{i}", "image": "imgs/{i}.png", "question": "q{i}", "answers": ["7"]}}\n' for i in range(3))
    )
    store = Store(str(tmp_path / "store"))
    ref = build_manifest(DatasetSpec(kind="jsonl", path=str(manifest)), store)
    assert ref.rows == 3 and ref == build_manifest(DatasetSpec(kind="jsonl", path=str(manifest)), store)
    from stages.common import read_manifest

    rows = read_manifest(ref, store)
    assert rows[0]["image"] == str(tmp_path / "imgs" / "0.png") and rows[0]["answers"] == ["7"]
    assert len({r["sample_key"] for r in rows}) == 3


def test_config_yaml_validation(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("model: {source: tiny}\nteacher: {overrides: {grounding: {2: [0, 3]}, sink: {0: null}}}\n")
    cfg = PipelineConfig.from_yaml(good)
    assert cfg.teacher.preset_obj().grounding == {2: (0, 3)} and cfg.teacher.preset_obj().sink == {0: None}
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {source: tiny}\ntrian: {lr: 1}\n")  # a typo'd section is an error, not ignored
    with pytest.raises(ValueError, match="trian"):
        PipelineConfig.from_yaml(bad)
    with pytest.raises(ValueError, match=r"config file not found: .*nope\.yaml"):
        PipelineConfig.from_yaml(tmp_path / "nope.yaml")


@pytest.fixture(scope="module")
def trained_rpn(tmp_path_factory, tiny_vlm, tiny_vlm_dir):
    """A small RPN trained on the top-left quadrant, saved with its base model's fingerprint."""
    from storage.fingerprint import model_fingerprint

    samples = []
    for i in range(8):
        labels = np.full(16, -100)
        labels[[0, 1, 4, 5]] = 1  # the top-left quadrant, as if a teacher had looked there
        labels[[10, 11, 14, 15]] = 0
        samples.append(TrainSample(f"s{i}", random_image(i, (40, 40)), "what is the digit ?", labels))
    fp = model_fingerprint(tiny_vlm_dir, adapter=tiny_vlm.family, dtype="float32")
    fields = {"base_model": tiny_vlm_dir, "base_model_fingerprint": fp, "base_model_dtype": "float32"}
    result = train_rpn(tiny_vlm, samples, TrainConfig(K=1, T=2, lr=5e-3, batch_size=4, epochs=3), rpn_fields=fields)
    folder = tmp_path_factory.mktemp("rpn")
    result.rpn.save(folder)
    image = folder.parent / f"img-{tiny_vlm.family}.png"
    random_image(0, (40, 40)).save(image)
    return folder, image


def test_predict_prints_the_answer_and_writes_overlay_comparison_and_record(trained_rpn, tmp_path, capsys):
    folder, image = trained_rpn
    out = tmp_path / "out"
    args = ["predict", str(image), "what is the digit ?", "--rpn", str(folder), "--max-new-tokens", "3"]
    assert main([*args, "--out", str(out), "--compare"]) == 0
    printed = capsys.readouterr().out
    assert "baseline:" in printed and f"wrote {out}/overlay.png, compare.png" in printed
    record = json.loads((out / "answer.json").read_text())
    assert record["question"] == "what is the digit ?" and record["answer"] == printed.splitlines()[0]
    assert record["settings"]["max_new_tokens"] == 3 and record["settings"]["source"] == "built-in defaults"
    card, both = Image.open(out / "overlay.png"), Image.open(out / "compare.png")
    assert card.mode == "RGB" and card.width == 480 and card.height > 480  # the image, then question, answer, legend
    assert both.width == 2 * 480 + 8
    # --no-kv-reuse recomputes pass 2 from scratch (the authors' way): the same answer
    assert main([*args, "--no-kv-reuse", "--out", str(tmp_path / "o2")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == record["answer"]


def test_predict_takes_its_defaults_from_the_rpn_and_shows_them_in_help(trained_rpn, tmp_path, capsys):
    import shutil

    folder, image = trained_rpn
    rpn = tmp_path / "rpn"
    shutil.copytree(folder, rpn)
    recorded = {"threshold": 0.99, "mode": "box", "max_new_tokens": 2, "source": "evaluation: synthetic"}
    (rpn / "inference.json").write_text(json.dumps(recorded))
    assert main(["predict", str(image), "what is the digit ?", "--rpn", str(rpn), "--out", str(tmp_path / "a")]) == 0
    settings = json.loads((tmp_path / "a" / "answer.json").read_text())["settings"]
    assert settings == {**recorded, "threshold": 0.99, "inputs": [], "reuse_kv": True}
    args = ["predict", str(image), "q ?", "--rpn", str(rpn), "--out", str(tmp_path / "b"), "--mode", "mask"]
    assert main(args) == 0
    assert json.loads((tmp_path / "b" / "answer.json").read_text())["settings"]["mode"] == "mask"  # the flag wins
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "inference.json, else 0.15" in text and "(default: sdrpn-predict)" in text


def test_predict_answers_with_the_inputs_and_kv_reuse_the_release_was_evaluated_with(
    trained_rpn, tmp_path, monkeypatch
):
    """The family's evaluation inputs (Qwen: no square padding, fetch resize), then the release's, and with
    `--benchmark` that benchmark's (its pixel budget): a τ holds at the budget it was chosen at."""
    import shutil

    import sdrpn_core.infer as infer

    folder, image = trained_rpn
    rpn = tmp_path / "rpn"
    shutil.copytree(folder, rpn)
    qwen = json.loads((rpn / "rpn_config.json").read_text())["family"] != "llava"
    budget = [["max_pixels", 25088]] if qwen else []  # LLaVA's input is fixed: it has no settings to give
    per = {"vstar": {"threshold": 0.05, "mode": "box", "inputs": budget}}
    recorded = {"threshold": 0.5, "max_new_tokens": 2, "reuse_kv": False, "inputs": [], "per_benchmark": per}
    (rpn / "inference.json").write_text(json.dumps(recorded))
    seen, real = [], infer.answer_sdrpn
    monkeypatch.setattr(infer, "answer_sdrpn", lambda a, *x, **kw: seen.append((a.describe(), kw)) or real(a, *x, **kw))
    args = ["predict", str(image), "q ?", "--rpn", str(rpn)]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--benchmark", "vstar", "--out", str(tmp_path / "b")]) == 0
    assert main([*args, "--benchmark", "vstar", "--no-kv-reuse", "--out", str(tmp_path / "c")]) == 0
    (plain, kw), (vstar, kw_vstar), _ = seen
    assert (kw["threshold"], kw["reuse_kv"], kw_vstar["threshold"], kw_vstar["mode"]) == (0.5, False, 0.05, "box")
    if qwen:
        assert (plain["pad_square"], plain["fetch_resize"], plain["max_pixels"]) == (False, True, 12544)
        assert (vstar["pad_square"], vstar["max_pixels"]) == (False, 25088)
    else:
        assert plain == vstar
    settings = json.loads((tmp_path / "b" / "answer.json").read_text())["settings"]
    assert settings["inputs"] == budget and settings["reuse_kv"] is False
    (rpn / "inference.json").write_text(json.dumps({**recorded, "reuse_kv": True}))
    assert main([*args, "--no-kv-reuse", "--out", str(tmp_path / "d")]) == 0
    assert main([*args, "--out", str(tmp_path / "e")]) == 0
    assert [kw["reuse_kv"] for _, kw in seen[3:]] == [False, True]  # the flag wins over the release


def test_predict_refuses_another_base_model(trained_rpn, tmp_path):
    import shutil

    from sdrpn_core.models.base import AdapterError

    folder, image = trained_rpn
    rpn = tmp_path / "rpn"
    shutil.copytree(folder, rpn)
    config = json.loads((rpn / "rpn_config.json").read_text())
    (rpn / "rpn_config.json").write_text(json.dumps({**config, "base_model_fingerprint": "0" * 16}))
    args = ["predict", str(image), "q ?", "--rpn", str(rpn), "--out", str(tmp_path / "o"), "--max-new-tokens", "2"]
    with pytest.raises(AdapterError, match="is not the model this RPN was trained on"):
        main(args)
    assert main([*args, "--no-fingerprint-check"]) == 0


def test_heads_ranks_every_head_on_a_calibration_split(tiny_llava_dir, capsys):
    assert main(["heads", "--model", tiny_llava_dir, "--n", "6", "--canvas", "64", "--max-new-tokens", "2",
                 "--top", "5"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("6 calibration samples")
    rows = [line for line in lines[1:] if line.strip().startswith("layer")]
    hits = [float(r.split("hit")[1].split()[0]) for r in rows]
    assert len(rows) == 5 and hits == sorted(hits, reverse=True) and all(0 <= h <= 1 for h in hits)


def test_nano_train_runs_the_recipe_and_goes_on_from_a_saved_model(tmp_path, capsys):
    from sdrpn_core.models.llava import LlavaAdapter

    first, second = tmp_path / "a", tmp_path / "b"
    short = ["--phase1-steps", "2", "--phase2-steps", "2", "--phase3-steps", "2", "--probe", "0"]
    assert main(["nano-train", "--out", str(first), *short]) == 0
    assert "phase3_steps=2" in capsys.readouterr().out
    assert main(["nano-train", "--out", str(second), "--init", str(first), "--phase1-steps", "0", "--phase2-steps",
                 "0", "--phase3-steps", "1", "--probe", "0"]) == 0  # fmt: skip
    a, b = LlavaAdapter.from_pretrained(first), LlavaAdapter.from_pretrained(second)
    moved = [not torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True)]
    assert any(moved)  # one more step changed the weights it started from


def test_an_rpn_is_found_by_hub_id_in_the_local_cache(trained_rpn, tmp_path, monkeypatch):
    """A hub-style id resolves through the Hugging Face cache layout on disk (no download: the cache is built here,
    as `huggingface-cli download` would leave it); an id not in the cache is an error saying how to get it."""
    import shutil

    from stages.release import fetch_release

    folder, image = trained_rpn
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--team--sdrpn-tiny" / "snapshots" / revision
    shutil.copytree(folder, snapshot)
    (cache / "models--team--sdrpn-tiny" / "refs").mkdir()
    (cache / "models--team--sdrpn-tiny" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    assert fetch_release("team/sdrpn-tiny") == snapshot
    args = ["predict", str(image), "q ?", "--rpn", "team/sdrpn-tiny", "--out", str(tmp_path / "o"), "--max-new-tokens"]
    assert main([*args, "2"]) == 0
    with pytest.raises(FileNotFoundError, match="huggingface-cli download team/other"):
        fetch_release("team/other")
