"""Calibrated τ and crop mode against the hand-set ones on the embedded default, and what calibrating costs.

    python benchmarks/calibrate.py [--quick] [CONFIG]     # default: configs/default.yaml, a fresh temp store

Trains the default's RPN (teacher → labels → RPN), calibrates τ × mode on the calibration split (the synthetic
generator under `eval.calibration.seed`, never the held-out seed), then scores SD-RPN on the held-out split twice:
with the calibrated values and with the hand-set ones the default used before (τ 0.03, box). Calibration's cost is
compared with one SD-RPN evaluation pass over the same calibration samples: pass 1 runs once per sample and pass 2
once per distinct crop, so calibrating costs fewer passes than it has candidates. Ends with
`RESULT calibrated_acc=… handset_acc=… calibration_over_eval_time=… candidates=…`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import parser, size

# the keys of the last line, `RESULT key=value …` (checked by tests/test_benchmark_scripts.py)
RESULT_KEYS = ("calibrated_acc", "handset_acc", "calibration_over_eval_time", "candidates")

HANDSET = {"threshold": 0.03, "mode": "box"}  # the default's values, chosen by hand before calibration existed
SIZES = {
    "full": {},
    "quick": {"train_n": 200, "eval_n": 100},
    "smoke": {"train_n": 16, "eval_n": 6},
}


def sdrpn_score(store, model, rpn, dataset, params) -> tuple[float, float]:
    """(SD-RPN's score in [0, 1], seconds) of one evaluation pass with these parameters."""
    from stages.score import evaluate

    t0 = time.perf_counter()
    ref = evaluate(store, model, rpn, dataset, replace(params, methods=("sdrpn",)))
    return ref.scores[0]["score"] / 100, time.perf_counter() - t0


def main() -> None:
    p = parser(__doc__, "smaller training, held-out and calibration splits")
    p.add_argument("config", nargs="?")
    args = p.parse_args()
    from benchmarks._pipeline import pipeline_config, start_prefect
    from flows.pipeline import train_flow
    from stages import calibrate, data, model
    from stages.common import get_store

    start_prefect()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = pipeline_config(args.config, tmp, **SIZES[size(args)])  # a smaller held-out split: calibration too
        calibration = cfg.eval.calibration_params()
        rpn = train_flow(cfg)
        store = get_store(cfg.store.settings())
        model_ref = model.resolve_model(cfg.model, store)
        params = replace(cfg.eval.params(cfg.teacher.preset_obj()), threshold="auto", mode="auto")
        scored, held, split = calibrate.calibration_split(cfg.eval.datasets[0], calibration)
        cal_data, eval_data = data.build_manifest(held, store), data.build_manifest(scored, store)
        t0 = time.perf_counter()
        ref = calibrate.CALIBRATE.ensure(
            store=store, model=model_ref, rpn=rpn, dataset=cal_data, params=params, calibration=calibration, split=split
        )
        calibration_s = time.perf_counter() - t0
        doc = calibrate.read(store, ref)
        handset = replace(params, **HANDSET)
        _, one_pass_s = sdrpn_score(store, model_ref, rpn, cal_data, handset)  # the same samples, one candidate
        calibrated_acc, _ = sdrpn_score(store, model_ref, rpn, eval_data, calibrate.resolve(params, ref))
        handset_acc, _ = sdrpn_score(store, model_ref, rpn, eval_data, handset)
    print(f"calibration split: {split}; held-out: {eval_data.rows} samples")
    for point in doc["curve"]:
        print(
            f"  τ {point['threshold']:<6g} {point['mode']:4s} score {point['score']:5.1f}  "
            f"{point['relative_throughput']:.2f}× baseline  crop tokens {point['crop_tokens']:.0f}"
        )
    print(f"chosen: τ {ref.threshold} / {ref.mode} ({doc['chosen']['reason']}); hand-set: {HANDSET}")
    print(
        f"calibration {calibration_s:.1f}s for {doc['candidates']} candidates ({doc['pass1_rows']} pass-1 rows, "
        f"{doc['pass2_rows']} pass-2 rows); one SD-RPN pass over the same samples {one_pass_s:.1f}s"
    )
    print(
        f"RESULT calibrated_acc={calibrated_acc:.3f} handset_acc={handset_acc:.3f} "
        f"calibration_over_eval_time={calibration_s / one_pass_s:.2f} candidates={doc['candidates']}"
    )


if __name__ == "__main__":
    main()
