from __future__ import annotations

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
    from stages.data import read_rejections

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
    from stages.data import read_manifest

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


def test_predict_prints_the_answer_and_writes_an_overlay(tmp_path, tiny_vlm, tiny_vlm_dir, capsys):
    samples = []
    for i in range(8):
        labels = np.full(16, -100)
        labels[[0, 1, 4, 5]] = 1  # the top-left quadrant, as if a teacher had looked there
        labels[[10, 11, 14, 15]] = 0
        samples.append(TrainSample(f"s{i}", random_image(i, (40, 40)), "what is the digit ?", labels))
    result = train_rpn(
        tiny_vlm,
        samples,
        TrainConfig(K=1, T=2, lr=5e-3, batch_size=4, epochs=3),
        rpn_fields={"base_model": tiny_vlm_dir},
    )
    result.rpn.save(tmp_path / "rpn")
    image = tmp_path / "img.png"
    random_image(0, (40, 40)).save(image)
    overlay = tmp_path / "overlay.png"
    assert (
        main(
            [
                "predict",
                str(image),
                "what is the digit ?",
                "--rpn",
                str(tmp_path / "rpn"),
                "--max-new-tokens",
                "3",
                "--overlay",
                str(overlay),
                "--compare",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "baseline:" in printed and f"wrote {overlay}" in printed
    img = Image.open(overlay)
    assert img.size == (40, 40) and img.mode == "RGB"
    # --no-kv-reuse recomputes pass 2 from scratch (the authors' way): the same answer
    answer = printed.splitlines()[0]
    args = ["predict", str(image), "what is the digit ?", "--rpn", str(tmp_path / "rpn"), "--max-new-tokens", "3",
            "--overlay", str(tmp_path / "o2.png")]  # fmt: skip
    assert main([*args, "--no-kv-reuse"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == answer


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
