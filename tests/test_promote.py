"""The promotion gate's rule and its record in the store, and the schedule command's checks (no model, no flow)."""

from __future__ import annotations

import pytest

from stages.promote import Candidate, Gate, compare, decide, summary
from stages.refs import EvalRef, ModelRef
from storage.champion import Champions
from storage.store import StoreError

MODEL = ModelRef("m0del", "models/base", "llava", "float32", "cpu")


def _results(**scores: float) -> list[EvalRef]:
    """One evaluation per benchmark: SD-RPN's score (and an F1 sub-score 10 points lower)."""
    return [
        EvalRef(f"e-{b}", "", ({"method": "sdrpn", "score": v, "f1": v - 10}, {"method": "baseline", "score": 1.0}), b)
        for b, v in scores.items()
    ]


def test_a_challenger_passes_unless_worse_beyond_the_tolerance_on_a_gate_benchmark():
    champion = _results(textvqa=60.0, pope=80.0)
    assert all(r["passes"] for r in compare(_results(textvqa=60.0, pope=80.0), champion, Gate()))  # a tie passes
    rows = compare(_results(textvqa=59.5, pope=85.0), champion, Gate(tolerance=0.5))
    assert [r["passes"] for r in rows] == [True, True] and rows[0]["delta"] == pytest.approx(-0.5)
    rows = compare(_results(textvqa=59.4, pope=85.0), champion, Gate(tolerance=0.5))
    assert [r["passes"] for r in rows] == [False, True]
    only = compare(_results(textvqa=10.0, pope=85.0), champion, Gate(benchmarks=("pope",)))
    assert [r["benchmark"] for r in only] == ["pope"]  # a benchmark outside the gate does not count
    f1 = compare(_results(textvqa=60.0, pope=80.0), champion, Gate(metrics=(("pope", "f1"),)))
    assert [r["metric"] for r in f1] == ["score", "f1"] and f1[1]["challenger"] == 70.0
    with pytest.raises(ValueError, match="no sdrpn 'recall' score on pope"):
        compare(_results(pope=80.0), champion, Gate(metrics=(("pope", "recall"),)))


def test_the_decision_names_its_reason_and_the_same_comparison_has_the_same_id():
    new, old = Candidate("r2", "rpn2", "s3://b/release/r2"), Candidate("r1", "rpn1", "s3://b/release/r1")
    first = decide(MODEL, old, None, [], Gate())
    assert first["promoted"] and first["reason"] == "the first RPN of this base model"
    rows = compare(_results(textvqa=50.0), _results(textvqa=60.0), Gate())
    rejected = decide(MODEL, new, old, rows, Gate())
    assert not rejected["promoted"] and "textvqa score 50.00 < champion's 60.00" in rejected["reason"]
    assert "REJECTED" in summary(rejected) and rejected["base_model"] == "models/base"
    assert decide(MODEL, new, old, rows, Gate())["id"] == rejected["id"]
    assert decide(MODEL, new, old, rows, Gate(tolerance=10))["id"] != rejected["id"]  # another gate decides anew
    assert decide(MODEL, new, old, rows, Gate(enabled=False))["promoted"]
    gone = decide(MODEL, new, old, [], Gate(), why="the champion's RPN is gone")
    assert gone["promoted"] and gone["reason"] == "the champion's RPN is gone"


def test_the_champion_pointer_and_history_in_the_store(store):
    champions = Champions(store)
    assert champions.current("m0del") is None and champions.all() == []
    one = decide(MODEL, Candidate("r1", "rpn1", "u1"), None, [], Gate())
    champions.record(one)
    two = decide(MODEL, Candidate("r2", "rpn2", "u2"), Candidate("r1", "rpn1", "u1"), [], Gate())
    two = {**two, "promoted": False, "decided": one["decided"] + 1}
    champions.record(two)
    current = champions.current("m0del")
    assert (current.release, current.rpn, current.decision) == ("r1", "rpn1", one["id"])
    assert current.base_model == "models/base"
    assert [d["id"] for d in champions.history("m0del")] == [one["id"], two["id"]]
    assert champions.decided("m0del", two["id"])["promoted"] is False
    assert [c.release for c in champions.all()] == ["r1"]
    store.write_json(
        {"id": two["id"], "promoted": "yes"}, "release", "current", "m0del", "decisions", f"{two['id']}.json"
    )
    assert champions.decided("m0del", two["id"]) is None  # a malformed record is decided again, not trusted
    store.write_json({"release": "../../etc"}, "release", "current", "m0del", "champion.json")
    with pytest.raises(StoreError, match=r"champion\.json is malformed"):
        champions.current("m0del")
    with pytest.raises(ValueError, match="bad model fingerprint"):
        champions.current("../x")


def test_schedule_status_names_a_missing_variable_and_a_ui_toggle_that_disagrees():
    from flows.cli import schedule_report

    missing = "\n".join(schedule_report("sdrpn/full", None, None))
    assert "sdrpn_weekly_retrain is not set" in missing and "sdrpn schedule off" in missing
    assert "not deployed yet" in missing
    agree = "\n".join(schedule_report("sdrpn/full", True, [("0 3 * * 1", True)]))
    assert "0 3 * * 1 on" in agree and "UI" not in agree
    toggled = "\n".join(schedule_report("sdrpn/full", True, [("0 3 * * 1", False)]))
    assert "switched in the UI?" in toggled and "`sdrpn schedule off` keeps it off" in toggled


@pytest.mark.parametrize("argv", [["schedule", "on"], ["schedule", "status"], ["deploy"]])
def test_schedule_and_deploy_refuse_a_temporary_api(argv, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(SystemExit, match="PREFECT_API_URL"):
        main(argv)
