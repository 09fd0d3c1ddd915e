"""Calibration (`sdrpn calibrate`, `eval.threshold: auto`): pass 1 once per sample whatever the grid, one pass 2
per distinct plan with the answers SD-RPN gives at that τ, deterministic ties, the throughput floor, a split that
never touches a scored sample, and a stage that re-scores a stored sweep instead of answering again."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import sdrpn_core.calibrate as core
from sdrpn_core.calibrate import CalibrationParams, Candidate, CurvePoint, Sweep, choose, curve, grid, plan_key, sweep
from sdrpn_core.infer import answer_sdrpn_batch, plan_for, run_pass1_batch
from sdrpn_core.methods import EvalParams
from sdrpn_core.roi import RoIPlan
from sdrpn_core.rpn import RoIPredictor
from stages import calibrate as stage
from stages.common import load_model, read_manifest
from stages.config import DatasetSpec, ModelSpec
from stages.data import build_manifest
from stages.model import resolve_model
from stages.refs import RpnRef
from storage.artifacts import ArtifactStore
from storage.fingerprint import hash_obj
from storage.store import Store, StoreSettings
from tests.conftest import random_image

GRID = grid((0.05, 0.2, 0.5, 0.9), ("box", "mask"))


def _counting_pass1(monkeypatch) -> list[int]:
    rows: list[int] = []

    def counted(adapter, rpn, images, questions, **kw):
        rows.append(len(images))
        return run_pass1_batch(adapter, rpn, images, questions, **kw)

    monkeypatch.setattr(core, "run_pass1_batch", counted)
    return rows


@pytest.mark.parametrize("batch_size", [1, 3])
def test_pass1_once_per_sample_whatever_the_grid_and_answers_as_sdrpn_at_each_tau(nano, monkeypatch, batch_size):
    adapter, rpn = nano
    images = [random_image(s, (64, 48)) for s in range(3)]
    prompts = ["what is written here?"] * 3
    seen = _counting_pass1(monkeypatch)
    result = sweep(adapter, rpn, images, prompts, GRID, max_new_tokens=3, batch_size=batch_size)
    assert sum(seen) == result.pass1_rows == 3  # 8 candidates, each sample through pass 1 once
    p1s = run_pass1_batch(adapter, rpn, images, prompts)
    distinct = {
        (i, plan_key(plan_for(adapter, p.logits_map, c.threshold, c.mode))) for c in GRID for i, p in enumerate(p1s)
    }
    assert result.pass2_rows == len(distinct) < 3 * len(GRID)  # candidates that crop alike share one answer
    for c in GRID:
        direct = answer_sdrpn_batch(adapter, rpn, images, prompts, threshold=c.threshold, mode=c.mode, max_new_tokens=3)
        assert result.texts[c] == [a.text for a in direct], c
        assert result.crop_tokens[c] == [max(0, a.roi.n_crop_tokens) for a in direct], c
    assert len(result.baseline_texts) == 3 and all(s > 0 for s in result.baseline_seconds)
    assert core.Sweep.from_json(json.loads(json.dumps(result.to_json()))) == result


def test_plans_that_crop_alike_share_a_key_and_others_do_not():
    box = RoIPlan("box", ((1, 1, 3, 3),), prob=np.ones((4, 4)), reason="a")
    assert plan_key(box) == plan_key(RoIPlan("box", ((1, 1, 3, 3),), reason="other words"))
    assert plan_key(box) != plan_key(RoIPlan("box", ((1, 1, 3, 4),)))
    region = np.array([[True, False], [True, True]])
    mask = RoIPlan("mask", ((0, 0, 2, 2),), region=region)
    assert plan_key(mask) != plan_key(RoIPlan("mask", ((0, 0, 2, 2),), region=~region))
    assert plan_key(RoIPlan("none", reason="below τ")) == plan_key(RoIPlan("none", reason="too large"))


def _point(tau, mode, score, speed, tokens):
    return CurvePoint(tau, mode, score, speed, tokens, 1.0 if tokens else 0.0)


def test_the_best_score_wins_and_ties_go_to_fewer_tokens_then_larger_tau_then_grid_order():
    points = [
        _point(0.1, "box", 50.0, 0.7, 100),
        _point(0.2, "box", 60.0, 0.6, 200),
        _point(0.3, "box", 60.0, 0.8, 150),  # tied on score, fewer tokens: wins
        _point(0.1, "mask", 60.0, 0.9, 150),  # tied on score and tokens, smaller τ
    ]
    assert choose(points).point == points[2]
    assert choose(list(reversed(points))).point == points[2]  # order-free
    same = [_point(0.3, "box", 60.0, 0.5, 150), _point(0.3, "mask", 60.0, 0.9, 150)]
    assert choose(same).point.mode == "box"  # the grid's mode order, never the clock
    assert "tied with 1" in choose(same).reason


def test_the_throughput_floor_excludes_slow_candidates_and_names_the_fastest_when_none_is_left():
    points = [
        _point(0.05, "box", 70.0, 0.4, 500),
        _point(0.2, "box", 60.0, 0.65, 100),
        _point(0.9, "box", 10.0, 0.95, 0),
    ]
    chosen = choose(points, min_relative_throughput=0.6)
    assert chosen.point == points[1] and chosen.excluded == (points[0],)
    assert "1 below the floor 0.6" in chosen.reason
    assert choose(points).point == points[0]
    with pytest.raises(ValueError, match=r"floor 0.99× .* fastest is τ 0.9 / box at 0.95×"):
        choose(points, min_relative_throughput=0.99)


def test_a_candidate_exactly_at_the_floor_passes_and_an_empty_candidate_costs_nothing():
    """The floor is inclusive; a candidate that answered nothing has zero throughput, tokens and cropped share; a
    one-token crop counts as cropped (mutation survivors)."""
    points = [_point(0.05, "box", 70.0, 0.5, 500), _point(0.2, "box", 60.0, 0.8, 100)]
    assert choose(points, min_relative_throughput=0.5).point == points[0]
    close = [_point(0.05, "box", 60.4, 0.5, 500), _point(0.2, "box", 60.2, 0.8, 100)]
    assert choose(close).point == close[0]  # a better score by a fraction of a point is better, not a tie
    c, empty = Candidate(0.1, "box"), Candidate(0.2, "box")
    sweep = Sweep([c, empty], {c: ["1"], empty: []}, {c: [2.0], empty: []}, {c: [1], empty: []}, ["0"], [1.0])
    one, none = curve(sweep, lambda texts: 100.0 * len(texts))
    assert (one.relative_throughput, one.crop_tokens, one.cropped) == (0.5, 1.0, 1.0)
    assert (none.relative_throughput, none.crop_tokens, none.cropped) == (0.0, 0.0, 0.0)


def test_calibration_params_are_checked():
    with pytest.raises(ValueError, match=r"eval\.calibration\.modes"):
        CalibrationParams(modes=("boxes",))
    with pytest.raises(ValueError, match=r"eval\.calibration\.thresholds"):
        CalibrationParams(thresholds=(0.1, 1.5))
    with pytest.raises(ValueError, match=r"eval\.calibration\.fraction"):
        CalibrationParams(fraction=1.0)


def _jsonl(tmp_path, n: int) -> str:
    (tmp_path / "data").mkdir()
    lines = []
    for i in range(n):
        random_image(i, (40, 30)).save(tmp_path / "data" / f"{i}.png")
        lines.append(json.dumps({"id": f"q{i}", "image": f"{i}.png", "question": "what?", "answers": ["7"]}))
    (tmp_path / "data" / "m.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "data" / "m.jsonl")


def test_a_held_out_share_is_calibrated_on_and_never_scored(tmp_path):
    store = Store(StoreSettings(root=str(tmp_path / "store")))
    spec = DatasetSpec(kind="jsonl", path=_jsonl(tmp_path, 40))
    scored, held, words = stage.calibration_split(spec, CalibrationParams(fraction=0.25, seed=3))
    ids = [{r["sample_id"] for r in read_manifest(build_manifest(s, store), store)} for s in (spec, scored, held)]
    everything, scored_ids, held_ids = ids
    assert scored_ids.isdisjoint(held_ids) and scored_ids | held_ids == everything
    assert 4 <= len(held_ids) <= 16  # about a quarter of 40
    assert "excluded from the reported score" in words
    again = stage.calibration_split(spec, CalibrationParams(fraction=0.25, seed=4))[1]
    assert {r["sample_id"] for r in read_manifest(build_manifest(again, store), store)} != held_ids  # seeded
    with pytest.raises(ValueError, match="a held-out share needs a part"):
        DatasetSpec(kind="jsonl", path=spec.path, holdout=0.2)


def test_a_synthetic_evaluation_calibrates_on_another_seed_and_refuses_its_own():
    spec = DatasetSpec(kind="synthetic", n=30, seed=1000)
    scored, held, words = stage.calibration_split(spec, CalibrationParams(n=12, seed=777))
    assert scored == spec and (held.seed, held.n) == (777, 12) and "not the evaluation's" in words
    with pytest.raises(ValueError, match="the evaluation's own seed"):
        stage.calibration_split(spec, CalibrationParams(seed=1000))


def _random_rpn(store: Store, model, tmp_path) -> RpnRef:
    """A random RPN committed as the train stage commits one (the calibration does not care how it learnt)."""
    rpn = RoIPredictor.from_adapter(load_model(model), K=1, T=1, base_model_fingerprint=model.fingerprint)
    rpn.save(tmp_path / "rpn")
    files = {p.name: p.read_bytes() for p in (tmp_path / "rpn").iterdir()}
    fp = hash_obj({"random rpn": model.fingerprint})
    url = ArtifactStore(store).put_files("rpn", fp, files, meta={"steps": 0, "final_loss": 0.0})
    return RpnRef(fp, url, 0, 0.0)


def test_the_stage_chooses_commits_and_re_scores_its_stored_sweep_without_answering(tmp_path, monkeypatch):
    store = Store(StoreSettings(root=str(tmp_path / "store")))
    model = resolve_model(ModelSpec(source="tiny", tiny={"image_size": 64, "patch_size": 8}), store)
    rpn = _random_rpn(store, model, tmp_path)
    data = build_manifest(DatasetSpec(kind="synthetic", n=4, seed=777, canvas=96), store)
    params = EvalParams(methods=("baseline", "sdrpn"), threshold="auto", mode="auto", max_new_tokens=3)
    cal = CalibrationParams(thresholds=(0.1, 0.5, 0.9), n=3)
    seen = _counting_pass1(monkeypatch)
    args = {"store": store, "model": model, "rpn": rpn, "dataset": data, "params": params, "split": "seed 777"}
    ref = stage.CALIBRATE.ensure(**args, calibration=cal)
    assert sum(seen) == 3 and ref.threshold in cal.thresholds and ref.mode in cal.modes
    doc = stage.read(store, ref)
    assert doc["samples"] == 3 and doc["candidates"] == 6 and len(doc["curve"]) == 6 and doc["split"] == "seed 777"
    assert {(p["threshold"], p["mode"]) for p in doc["curve"]} == {(c.threshold, c.mode) for c in grid(cal.thresholds)}
    assert ArtifactStore(store).read("calibration", ref.fingerprint, "curve.png")[:4] == b"\x89PNG"
    assert stage.CALIBRATE.ensure(**args, calibration=cal) == ref and sum(seen) == 3  # found, not recomputed
    floor = stage.CALIBRATE.ensure(
        **args, calibration=CalibrationParams(thresholds=(0.1, 0.5, 0.9), n=3, min_relative_throughput=0.01)
    )
    assert floor.fingerprint != ref.fingerprint and sum(seen) == 3  # a new choice from the stored answers
    resolved = stage.resolve(params, ref)
    assert (resolved.threshold, resolved.mode, resolved.calibrated_by) == (ref.threshold, ref.mode, ref.fingerprint)
    hand = stage.resolve(EvalParams(threshold=0.3, mode="auto"), ref)
    assert hand.threshold == 0.3 and hand.mode == ref.mode  # a hand-set value wins
    other = stage.CALIBRATE.ensure(**args, calibration=CalibrationParams(thresholds=(0.2, 0.5), n=3))
    assert other.fingerprint != ref.fingerprint and sum(seen) == 6  # another grid answers again
    assert Candidate(0.2, "box") in grid((0.2, 0.5))


def test_the_curve_scores_each_candidate_and_prices_it_against_the_baseline():
    a, b = Candidate(0.1, "box"), Candidate(0.5, "mask")
    result = core.Sweep(
        [a, b],
        texts={a: ["7", "x", "7", "7"], b: ["x", "x", "7", "x"]},
        seconds={a: [2.0, 2.0, 2.0, 2.0], b: [1.0, 1.0, 1.5, 0.5]},
        crop_tokens={a: [64, 64, 0, 32], b: [0, 0, 16, 0]},
        baseline_texts=["x"] * 4,
        baseline_seconds=[0.5, 0.5, 0.5, 0.5],
    )
    points = core.curve(result, lambda texts: 100 * sum(t == "7" for t in texts) / len(texts))
    assert points == [
        CurvePoint(0.1, "box", 75.0, 0.25, 40.0, 0.75),  # 2 s of baseline over 8 s; mean 40 crop tokens; 3 of 4 cropped
        CurvePoint(0.5, "mask", 25.0, 0.5, 4.0, 0.25),
    ]
    assert choose(points).point == points[0] and choose(points, 0.3).point == points[1]
    assert choose(points).reason == "best score 75.00 of 2 candidates"


def test_scores_a_billionth_apart_tie_and_the_reason_says_so():
    """Scores equal to nine decimals are a tie (float noise from averaging); the tie goes to fewer crop tokens."""
    a = CurvePoint(0.1, "box", 50.4 + 4e-10, 1.0, 20.0, 1.0)
    b = CurvePoint(0.5, "box", 50.4, 1.0, 40.0, 1.0)
    c = CurvePoint(0.9, "box", 10.0, 0.2, 0.0, 0.0)
    choice = choose([b, a, c], 0.5)
    assert choice.point == a and choice.floor == 0.5 and choice.excluded == (c,)
    assert choice.reason == (
        "best score 50.40 of 2 candidates (tied with 1: fewest crop tokens, then larger τ); "
        "1 below the floor 0.5× of the baseline's throughput"
    )


@pytest.mark.parametrize(
    ("field", "bad", "good"),
    [
        ("thresholds", (0.0,), (0.01, 0.99)),
        ("thresholds", (1.0,), (0.5,)),
        ("n", 0, 1),
        ("fraction", 0.0, 0.01),
        ("fraction", 1.0, 0.99),
        ("min_relative_throughput", 0.0, 0.01),
    ],
)
def test_calibration_settings_take_their_open_ranges(field, bad, good):
    assert getattr(CalibrationParams(**{field: good}), field) == good
    with pytest.raises(ValueError, match=rf"^eval\.calibration\.{field} = {re.escape(repr(bad))} is out of range$"):
        CalibrationParams(**{field: bad})


def test_an_answer_without_a_roi_inserts_no_crop_tokens():
    from sdrpn_core.infer import Answer

    c = Candidate(0.5, "box")
    result = Sweep([c], {c: []}, {c: []}, {c: []})
    result.add(c, Answer("7", [1]), 0.5)
    assert (result.texts[c], result.seconds[c], result.crop_tokens[c]) == (["7"], [0.5], [0])
