"""Evaluation as cached pieces through a real Prefect API: a killed evaluation resumes only its missing
pieces, a new method (with its own setting) answers only its pieces, batches, `sdrpn predict` on a release."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stages import evaluate as eval_stage
from tests.flowkit import Calls, _artifacts, make_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api", "flow_cache")]

ROOT = Path(__file__).resolve().parents[1]


PIPELINE_WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from flows.pipeline import sdrpn
    from stages.config import PipelineConfig
    sdrpn(PipelineConfig.model_validate_json({cfg!r}))
    """
)


def _committed_pieces(root: Path) -> int:
    return len(list((root / "eval-piece").glob("*/_COMMITTED.json")))


def _predictions(url: str) -> list[tuple]:
    import pyarrow.parquet as pq

    table = pq.read_table(Path(url) / "predictions.parquet", columns=["sample_id", "method", "prediction", "score"])
    return [tuple(r.values()) for r in table.to_pylist()]


def test_evaluation_killed_mid_run_resumes_only_missing_pieces_and_equals_a_dask_run(tmp_path, monkeypatch):
    """A pipeline killed (SIGKILL) while evaluating keeps the pieces it committed; the rerun answers only the rest.
    Its scores and predictions equal those of an uninterrupted evaluation on two Dask worker *processes*."""
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import sdrpn

    root = tmp_path / "store"
    cfg = make_config(
        "llava", str(root), **{"eval.shards": 4, "eval.datasets": [{"kind": "synthetic", "n": 16, "seed": 99}]}
    )
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", PIPELINE_WORKER.format(root=str(ROOT), cfg=cfg.model_dump_json())],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _committed_pieces(root) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    kept = _committed_pieces(root)
    assert 3 <= kept < 16, f"not killed mid-evaluation ({kept} pieces): {proc.stderr.read().decode()[-2000:]}"
    assert not list((root / "eval").glob("*/_COMMITTED.json"))  # nothing merged yet

    calls = Calls(monkeypatch)
    resumed = sdrpn(cfg)
    assert calls.pieces_answered == 16 - kept  # the teacher, labels and RPN were cached; only missing pieces ran

    for folder in ("eval", "eval-piece"):  # an uninterrupted evaluation, on Dask, with the same RPN
        for marker in (root / folder).glob("*/_COMMITTED.json"):
            marker.unlink()
    dask_cfg = cfg.model_copy(update={"runner": cfg.runner.model_copy(update={"kind": "dask", "n_workers": 2})})
    calls.n.clear()
    on_dask = sdrpn(dask_cfg)
    assert calls.n == {}  # every piece was answered on the Dask workers, none in this process
    assert _committed_pieces(root) == 16

    def measured(summary):
        return [(s["method"], s["score"], s["samples"]) for s in summary["scores"]]

    assert measured(on_dask) == measured(resumed)
    assert _predictions(on_dask["eval"][0]) == _predictions(resumed["eval"][0])
    assert len(_predictions(resumed["eval"][0])) == 16 * 4


def test_adding_a_method_evaluates_only_its_pieces(tmp_path, monkeypatch):
    from flows.pipeline import sdrpn

    root = str(tmp_path / "store")
    first = sdrpn(make_config("llava", root, **{"eval.methods": ["baseline", "sdrpn"], "eval.shards": 2}))
    calls = Calls(monkeypatch)
    more = sdrpn(make_config("llava", root, **{"eval.methods": ["baseline", "sdrpn", "oracle"], "eval.shards": 2}))
    assert calls.n == {"eval": 2}  # the oracle's two shards
    old = {s["method"]: s["score"] for s in first["scores"]}
    new = {s["method"]: s["score"] for s in more["scores"]}
    assert set(new) == {"baseline", "sdrpn", "oracle"} and {m: new[m] for m in old} == old


@dataclasses.dataclass(frozen=True)
class CentreOptions:
    fraction: float = 0.5  # the crop's side, as a fraction of the image's


def test_a_method_with_its_own_setting_is_its_module_and_a_line_in_the_config(tmp_path, monkeypatch):
    """A centre crop with a setting of its own: an options dataclass and one `register_method` (here, in the test);
    the config names the method and sets `eval.options.centre`. The answerer receives the setting, the pieces are
    keyed on it, so changing it answers the centre crop's pieces and nothing else."""
    from flows.pipeline import eval_flow
    from sdrpn_core.infer import answer_with_boxes_batch
    from sdrpn_core.methods import METHODS, EvalMethod
    from stages.config import ConfigError

    seen = []

    def centre(settings, images, prompts, boxes):
        f = settings.options.fraction
        seen.append(f)
        sizes = [im.image.size for im in images]
        crops = [
            [(int(w * (1 - f) / 2), int(h * (1 - f) / 2), int(w * (1 + f) / 2), int(h * (1 + f) / 2))] for w, h in sizes
        ]
        return answer_with_boxes_batch(settings.adapter, images, prompts, crops, settings.max_new_tokens)

    monkeypatch.setitem(METHODS, "centre", EvalMethod("centre", centre, "+centre crop", options=CentreOptions))
    root = str(tmp_path / "store")

    def config(**options):
        changes = {"eval.methods": ["baseline", "centre"], "eval.shards": 2, "eval.options": {"centre": options}}
        return make_config("llava", root, **changes)

    first = eval_flow(config())
    assert set(seen) == {0.5} and {s["method"] for r in first for s in r.scores} == {"baseline", "centre"}
    calls = Calls(monkeypatch)
    eval_flow(config(fraction=0.25))
    assert calls.n == {"eval": 2} and seen[-1] == 0.25  # the centre crop's two shards; the baseline's are cached
    calls.n.clear()
    eval_flow(config(fraction=0.25))
    assert calls.n == {}
    with pytest.raises((ValueError, ConfigError), match=r"eval.options.centre: unknown \['size'\]"):
        config(size=3)


def test_batched_evaluation_gives_the_batch_1_predictions(family, tmp_path, monkeypatch):
    """eval.batch_size 3 over 2 shards re-answers every piece (throughput changes) with the same predictions and
    scores as batch 1; protocol.json records the batch size. The batches are read ahead in a thread, as on a GPU."""
    from flows.pipeline import sdrpn

    root = str(tmp_path / "store")
    one = sdrpn(make_config(family, root, **{"eval.datasets": [{"kind": "synthetic", "n": 7, "seed": 99}]}))
    calls = Calls(monkeypatch)
    monkeypatch.setattr(eval_stage, "_reads_ahead", lambda adapter: True)
    changes = {"eval.batch_size": 3, "eval.shards": 2, "eval.datasets": [{"kind": "synthetic", "n": 7, "seed": 99}]}
    three = sdrpn(make_config(family, root, **changes))
    assert calls.n == {"eval": 2} and calls.pieces_answered == 4 * 2  # a task per shard, its methods together
    assert _predictions(three["eval"][0]) == _predictions(one["eval"][0])
    assert [(s["method"], s["score"]) for s in three["scores"]] == [(s["method"], s["score"]) for s in one["scores"]]
    protocol = json.loads((Path(three["eval"][0]) / "protocol.json").read_text())
    assert protocol["batch_size"] == 3 and protocol["shards"] == 2


def test_predict_on_the_runs_release_uses_what_the_evaluation_used(tmp_path):
    """τ, mode and answer length come from the release the run wrote, not predict's built-in defaults."""
    from flows.cli import main
    from flows.pipeline import sdrpn
    from tests.conftest import random_image

    summary = sdrpn(make_config("llava", str(tmp_path / "store"), **{"eval.mode": "box", "eval.threshold": 0.07}))
    protocol = json.loads((Path(summary["eval"][0]) / "protocol.json").read_text())
    image = tmp_path / "img.png"
    random_image(3, (96, 96)).save(image)
    args = ["predict", str(image), "what is the digit in the red box ?", "--rpn", summary["release"]]
    assert main([*args, "--out", str(tmp_path / "p")]) == 0
    settings = json.loads((tmp_path / "p" / "answer.json").read_text())["settings"]
    assert settings["source"] == "evaluation: synthetic"
    assert (settings["threshold"], settings["mode"], settings["max_new_tokens"]) == (0.07, "box", 3)
    assert protocol["roi_threshold"] == 0.07 and protocol["roi_mode"] == "box"
    current = ["predict", str(image), "what?", "--rpn", "current", "--store", str(tmp_path / "store")]
    assert main([*current, "--out", str(tmp_path / "c")]) == 0  # the store's champion: this run's release
    assert json.loads((tmp_path / "c" / "answer.json").read_text())["settings"] == settings
    with pytest.raises(SystemExit, match="0 champions"):
        main([*current, "--model", str(tmp_path / "elsewhere")])


def test_auto_tau_and_mode_are_calibrated_recorded_released_and_taken_by_predict(tmp_path, capsys, monkeypatch):
    """`eval.threshold: auto` / `mode: auto`: the calibrate stage chooses on other scenes, the evaluation records
    the choice and its curve, the release carries it per benchmark, predict and `sdrpn calibrate` take it."""
    from flows.cli import main
    from flows.pipeline import sdrpn
    from tests.conftest import random_image

    store = tmp_path / "store"
    cal = {"thresholds": [0.05, 0.3], "n": 3, "seed": 7}
    cfg = make_config("llava", str(store), **{"eval.threshold": "auto", "eval.mode": "auto", "eval.calibration": cal})
    calls = Calls(monkeypatch)
    summary = sdrpn(cfg)
    assert calls.n["calibrate"] == 1
    folder = Path(summary["eval"][0])
    protocol = json.loads((folder / "protocol.json").read_text())
    chosen = protocol["calibration"]["chosen"]
    assert (protocol["roi_threshold"], protocol["roi_mode"]) == (chosen["threshold"], chosen["mode"])
    assert chosen["threshold"] in (0.05, 0.3) and len(protocol["calibration"]["curve"]) == 4
    assert "seed 7" in protocol["calibration"]["split"] and protocol["rows"] == 4  # nothing scored was held out
    assert (folder / "calibration.png").exists() and "calibration.png" in (folder / "report.md").read_text()
    report = _artifacts()["sdrpn-test-report"].data  # the store's relative link, made one the UI can follow
    assert "](calibration.png)" not in report and str(folder / "calibration.png") in report
    inference = json.loads((Path(summary["release"]) / "inference.json").read_text())
    assert inference["per_benchmark"]["synthetic"]["calibration"] == protocol["calibration"]["fingerprint"]
    assert "calibrated on synthetic" in inference["source"]

    image = tmp_path / "img.png"
    random_image(3, (96, 96)).save(image)
    args = ["predict", str(image), "what is the digit?", "--rpn", summary["release"], "--benchmark", "synthetic"]
    assert main([*args, "--threshold", "auto", "--out", str(tmp_path / "p")]) == 0
    settings = json.loads((tmp_path / "p" / "answer.json").read_text())["settings"]
    assert (settings["threshold"], settings["mode"]) == (chosen["threshold"], chosen["mode"])
    with pytest.raises(SystemExit, match="no settings for it"):
        main([*args[:-1], "textvqa", "--out", str(tmp_path / "q")])

    again = sdrpn(cfg)  # everything found: the calibration too
    assert again["scores"] == summary["scores"] and (calls.n["calibrate"], calls.n["eval"]) == (1, 1)
    hand = make_config("llava", str(store), **{"eval.threshold": 0.3, "eval.mode": "auto", "eval.calibration": cal})
    protocol_hand = json.loads((Path(sdrpn(hand)["eval"][0]) / "protocol.json").read_text())
    assert protocol_hand["roi_threshold"] == 0.3 and protocol_hand["roi_mode"] == chosen["mode"]  # the hand wins

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert main(["calibrate", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"synthetic: τ {chosen['threshold']} / {chosen['mode']}" in out and "curve.png" in out


def test_paper_protocol_runs_fp16_with_a_bf16_trained_rpn_and_says_so(tmp_path):
    """`protocol: paper` on LLaVA: the teacher and the evaluation in fp16, the RPN trained on a bf16 copy of the
    same model (its checkpoint says both), pass 2 recomputed; protocol.json and the report name the preset."""
    from flows.pipeline import sdrpn

    root = tmp_path / "store"
    summary = sdrpn(make_config("llava", str(root), protocol="paper", **{"eval.methods": ["baseline", "sdrpn"]}))
    protocol = json.loads((Path(summary["eval"][0]) / "protocol.json").read_text())
    assert (protocol["protocol_preset"], protocol["dtype"], protocol["kv_reuse"]) == ("paper", "float16", False)
    rpn = json.loads(next((root / "rpn").glob("*/rpn_config.json")).read_text())
    recipe = json.loads(next((root / "rpn").glob("*/train_recipe.json")).read_text())["recipe"]
    assert (rpn["base_model_dtype"], recipe["dtype"]) == ("float16", "bfloat16")
    assert rpn["base_model_fingerprint"] == summary["model"]  # the fp16 model it is evaluated with
    report = next((root / "reports").glob("*/results.md")).read_text()
    assert "protocol preset `paper`" in report
