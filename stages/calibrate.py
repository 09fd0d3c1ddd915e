"""The `calibrate` stage: SD-RPN's τ and crop mode for one benchmark, chosen on its calibration split
(`sdrpn_core.calibrate`), for `eval.threshold: auto` / `eval.mode: auto` and `sdrpn calibrate`.

The calibration split never overlaps the scored samples (`calibration_split`): a synthetic evaluation draws its
calibration scenes from its generator under another seed; any other evaluation holds a seeded share of its rows
out (`DatasetSpec.holdout`), scores the rest, and its protocol says so. `<root>/calibration/<fp>/` holds
calibration.json (the choice, the grid, the floor, the samples' ids hash, the curve: score and throughput per
candidate) and curve.png. Its key: the model, the RPN, the calibration samples, the grid and floor, what the
answers depend on (generation limit, inputs, KV reuse, batch) and the benchmark's prompts and scoring by value."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace

from PIL import Image, ImageDraw

from sdrpn_core.benchmarks import BenchmarkSample, get_benchmark
from sdrpn_core.benchmarks.scoring import aggregate, score
from sdrpn_core.calibrate import CalibrationParams, Choice, CurvePoint, Sweep, choose, curve, grid, sweep
from sdrpn_core.methods import EvalParams
from sdrpn_core.progress import Progress
from stages.answering import prepare_run, read_samples, sample_of, scoring_fingerprint
from stages.code import BENCHMARK_CODE
from stages.common import Stage, read_manifest
from stages.config import DatasetSpec
from stages.refs import CalibrationRef, DatasetRef, ModelRef, RpnRef
from stages.report import png
from storage.artifacts import ArtifactStore
from storage.fingerprint import hash_obj, stage_fingerprint
from storage.store import Store

log = logging.getLogger(__name__)

ANSWER_PARAMS = ("max_new_tokens", "inputs", "protocol", "batch_size", "reuse_kv", "model_key", "default_threshold")


def calibration_split(spec: DatasetSpec, calibration: CalibrationParams) -> tuple[DatasetSpec, DatasetSpec, str]:
    """(the spec scored, the calibration spec, what the split is, in words): another seed of a synthetic
    generator, else a held-out share of the evaluation's rows."""
    if spec.kind == "synthetic":
        if calibration.seed == spec.seed:
            raise ValueError(
                f"eval.calibration.seed {calibration.seed} is the evaluation's own seed: its scenes would be scored "
                "and calibrated on; pick another"
            )
        cal = spec.model_copy(update={"seed": calibration.seed, "n": calibration.n})
        return spec, cal, f"synthetic scenes of seed {calibration.seed} ({calibration.n}), not the evaluation's"
    held = {"holdout": calibration.fraction, "holdout_seed": calibration.seed}
    scored = spec.model_copy(update={**held, "part": "scored"})
    cal = spec.model_copy(update={**held, "part": "held-out"})
    words = (
        f"{calibration.fraction:.0%} of the evaluation's rows held out (seed {calibration.seed}; at most "
        f"{calibration.n} used), excluded from the reported score"
    )
    return scored, cal, words


def _answers_key(store: Store, model: ModelRef, rpn: RpnRef, dataset: DatasetRef, params: EvalParams, n: int) -> dict:
    """What the sweep's answers depend on (not the scoring, not the floor: a metric fix re-scores them)."""
    bench = get_benchmark(dataset.benchmark)
    rows = read_manifest(dataset, store)[:n]
    return {
        "model": model.fingerprint,
        "rpn": rpn.fingerprint,
        "samples": dataset.fingerprint,
        "n": n,
        "answers": {k: getattr(params, k) for k in ANSWER_PARAMS},
        "prompts": hash_obj([bench.prompt(sample_of(r)) for r in rows]),
        "max_new_tokens": bench.max_new_tokens,
    }


def calibration_key(
    store: Store, model: ModelRef, rpn: RpnRef, dataset: DatasetRef, params: EvalParams, calibration: CalibrationParams
) -> dict:
    return {
        "answers": _answers_key(store, model, rpn, dataset, params, calibration.n),
        "calibration": asdict(calibration),
        "scoring": scoring_fingerprint(get_benchmark(dataset.benchmark)),
    }


def lookup(store: Store, dataset: DatasetRef, fp: str) -> CalibrationRef | None:
    arts = ArtifactStore(store)
    if arts.verify("calibration", fp) is None:
        return None
    chosen = json.loads(arts.read("calibration", fp, "calibration.json"))["chosen"]
    return CalibrationRef(fp, arts.url("calibration", fp), dataset.benchmark, chosen["threshold"], chosen["mode"])


def _sweep(
    store: Store,
    model: ModelRef,
    rpn: RpnRef,
    dataset: DatasetRef,
    params: EvalParams,
    calibration: CalibrationParams,
    progress=None,
) -> tuple[Sweep, list[BenchmarkSample], dict]:
    """The grid's answers on (at most n of) the calibration rows: from the store when this sweep ran before
    (`calibration-sweep/<fp>/`, keyed without the scoring), else answered and committed."""
    candidates = grid(calibration.thresholds, calibration.modes)
    key = {**_answers_key(store, model, rpn, dataset, params, calibration.n), "grid": [asdict(c) for c in candidates]}
    fp = stage_fingerprint("calibration-sweep", {}, key, code=CALIBRATE.code_version())
    arts = ArtifactStore(store)
    rows = read_manifest(dataset, store)[: calibration.n]
    if arts.verify("calibration-sweep", fp) is not None:  # answered before: re-scored, no model loaded
        doc = json.loads(arts.read("calibration-sweep", fp, "sweep.json"))
        by_id = {r["sample_id"]: r for r in rows}
        return Sweep.from_json(doc["sweep"]), [sample_of(by_id[i]) for i in doc["sample_ids"]], doc["cost"]
    settled = replace(params, threshold=None, mode="mask", methods=("sdrpn",))  # τ and mode are what is swept
    run = prepare_run(store, model, rpn, dataset, settled)
    ready, bad = read_samples(run.settings.adapter, rows)
    if not ready:
        raise ValueError(f"calibration of {dataset.benchmark}: no readable sample among {len(rows)} rows")
    samples = [s for s, _ in ready]
    bar = Progress(len(ready), f"calibrate[{dataset.benchmark}] ({len(candidates)} candidates)", log, progress)
    t0 = time.perf_counter()
    result = sweep(
        run.settings.adapter,
        run.settings.rpn,
        [im for _, im in ready],
        [run.bench.prompt(s) for s in samples],
        candidates,
        max_new_tokens=run.settings.max_new_tokens,
        reuse_kv=params.reuse_kv,
        batch_size=params.batch_size,
        progress=bar.update,
    )
    cost = {"seconds": time.perf_counter() - t0, "unreadable": [reason for _, reason in bad]}
    doc = {"sweep": result.to_json(), "sample_ids": [s.sample_id for s in samples], "cost": cost}
    arts.put_files("calibration-sweep", fp, {"sweep.json": json.dumps(doc).encode()}, meta={"rows": len(samples)})
    return result, samples, cost


def calibrate(
    store: Store,
    model: ModelRef,
    rpn: RpnRef,
    dataset: DatasetRef,
    params: EvalParams,
    calibration: CalibrationParams,
    split: str,
    fp: str,
    progress=None,
) -> CalibrationRef:
    """Sweep the grid (or read its stored sweep), score each candidate, choose; commit calibration.json and
    curve.png."""
    bench = get_benchmark(dataset.benchmark)
    result, samples, cost = _sweep(store, model, rpn, dataset, params, calibration, progress)

    def metric(predictions: list[str]) -> float:
        scores = [score(bench, s, p) for s, p in zip(samples, predictions, strict=True)]
        return float(aggregate(bench, samples, predictions, scores)["score"])

    points = curve(result, metric)
    choice = choose(points, calibration.min_relative_throughput)
    baseline = metric(result.baseline_texts)
    doc = {
        "benchmark": dataset.benchmark,
        "split": split,
        "dataset": {"fingerprint": dataset.fingerprint, "name": dataset.name, "rows": dataset.rows},
        "samples": len(samples),
        "sample_ids_hash": hash_obj(sorted(s.sample_id for s in samples)),
        "grid": {"thresholds": list(calibration.thresholds), "modes": list(calibration.modes)},
        "min_relative_throughput": calibration.min_relative_throughput,
        "chosen": {"threshold": choice.point.threshold, "mode": choice.point.mode, "reason": choice.reason},
        "chosen_point": asdict(choice.point),
        "baseline_score": baseline,
        "curve": [asdict(p) for p in points],
        "candidates": len(result.candidates),
        "pass1_rows": result.pass1_rows,
        "pass2_rows": result.pass2_rows,
        **cost,
    }
    picture = curve_picture(points, choice, baseline, dataset.benchmark)
    files = {"calibration.json": json.dumps(doc, indent=1).encode(), "curve.png": png(picture)}
    log.info("calibrate[%s]: τ %s, %s (%s)", bench.name, choice.point.threshold, choice.point.mode, choice.reason)
    url = ArtifactStore(store).put_files("calibration", fp, files, meta={"benchmark": dataset.benchmark})
    return CalibrationRef(fp, url, dataset.benchmark, choice.point.threshold, choice.point.mode)


def read(store: Store, ref: CalibrationRef) -> dict:
    """A committed calibration's calibration.json."""
    return json.loads(ArtifactStore(store).read("calibration", ref.fingerprint, "calibration.json"))


def markdown(calibrations: list[tuple[CalibrationRef, dict]]) -> str:
    """A table of the choices (the UI's calibration artifact): per benchmark τ, mode, score and throughput."""
    lines = [
        "| benchmark | τ | mode | score | baseline | × baseline throughput | samples | candidates | curve |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ref, doc in calibrations:
        p = doc["chosen_point"]
        lines.append(
            f"| {ref.benchmark} | {ref.threshold} | {ref.mode} | {p['score']:.1f} | {doc['baseline_score']:.1f} | "
            f"{p['relative_throughput']:.2f} | {doc['samples']} | {doc['candidates']} | {ref.url}/curve.png |"
        )
    return "\n".join(lines) + "\n"


def resolve(params: EvalParams, ref: CalibrationRef) -> EvalParams:
    """The evaluation's parameters with `auto` replaced by the calibration's choice (a hand-set value wins)."""
    return replace(
        params,
        threshold=ref.threshold if params.threshold == "auto" else params.threshold,
        mode=ref.mode if params.mode == "auto" else params.mode,
        calibrated_by=ref.fingerprint,
    )


MODE_COLOURS = {"box": (30, 140, 60), "mask": (60, 90, 200)}


def curve_picture(points: list[CurvePoint], choice: Choice, baseline: float, benchmark: str) -> Image.Image:
    """Score per τ (one line per mode, the choice ringed, the baseline dashed) above throughput per τ."""
    w, h, pad = 520, 360, 40
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    taus = sorted({p.threshold for p in points})
    x = {t: pad + (w - 2 * pad) * i / max(1, len(taus) - 1) for i, t in enumerate(taus)}
    panels = [
        ("score %", lambda p: p.score, pad, 190),
        ("x baseline throughput", lambda p: p.relative_throughput, 220, 330),
    ]
    for title, value, top, bottom in panels:
        values = [value(p) for p in points] + ([baseline] if title.startswith("score") else [])
        lo, hi = min(values), max(values)
        span = hi - lo or 1.0

        def y(v: float, top: int = top, bottom: int = bottom, lo: float = lo, span: float = span) -> float:
            return bottom - (bottom - top) * (v - lo) / span

        draw.line([(pad, bottom), (w - pad, bottom)], fill="black")
        draw.text((pad, top - 14), f"{title}: {lo:.2f} .. {hi:.2f}", fill="black")
        if title.startswith("score"):
            for x0 in range(pad, w - pad, 12):
                draw.line([(x0, y(baseline)), (x0 + 6, y(baseline))], fill=(120, 120, 120))
        for mode, colour in MODE_COLOURS.items():
            line = [(x[p.threshold], y(value(p))) for p in points if p.mode == mode]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
            for px, py in line:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        c = choice.point
        cx, cy = x[c.threshold], y(value(c))
        draw.ellipse([cx - 6, cy - 6, cx + 6, cy + 6], outline="red", width=2)
    for t in taus:
        draw.text((x[t] - 8, h - 26), f"{t:g}", fill="black")
    legend = f"{benchmark}: tau {choice.point.threshold:g} / {choice.point.mode}  (green box, blue mask, grey baseline)"
    draw.text((pad, 4), legend, fill="black")
    return canvas


CALIBRATE = Stage(
    "calibrate",
    run=calibrate,
    lookup=lookup,
    run_name="calibrate[{dataset.benchmark}]",
    progress="calibration of {dataset.benchmark}",
    model_bound=True,
    # the benchmark's part is by value in the key (its prompts, generation limit and scoring); the config's (the
    # split, the parameters) too; the report module only encodes the curve's picture
    exclude=(*BENCHMARK_CODE, "stages.config", "stages.report"),
    key=calibration_key,
)
