"""The `score` stage: the answers of an evaluation's pieces, scored. No model is loaded here: a metric or
aggregation fix re-scores the stored predictions and answers nothing again.

The scores are keyed on the pieces (which hold the model, data, RPN, parameters and answering code), the scoring
code and, of the benchmark, exactly what scores: its metric and aggregate functions with what they call
(`stages.code.function_fingerprint`) and its data fields (sub-score groups, columns). A metric change in one
benchmark therefore re-scores that benchmark alone.

The evaluation `<root>/eval/<fp>/` holds predictions.parquet (in manifest order, whatever order the pieces
finished in, with each row's score), scores.json (per method: the benchmark's headline score in percent,
sub-scores, samples/s and throughput relative to this run's baseline), protocol.json (everything a score depends
on), report.md and gallery.png (largest SD-RPN wins and losses)."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from sdrpn_core.benchmarks import Benchmark, BenchmarkSample, get_benchmark
from sdrpn_core.benchmarks.scoring import aggregate, score
from sdrpn_core.methods import EvalParams
from stages.answering import sample_of, scoring_fingerprint
from stages.code import BENCHMARK_CODE
from stages.common import Stage, read_manifest
from stages.evaluate import PIECE_COLUMNS, PIECES, EvalPiece, _parquet, by_shard, plan_pieces
from stages.refs import DatasetRef, EvalRef, ModelRef, RpnRef
from stages.report import eval_report_markdown, gallery, png
from storage.artifacts import ArtifactStore
from storage.fingerprint import hash_obj
from storage.store import Store, StoreError

log = logging.getLogger(__name__)


def score_key(dataset: DatasetRef, params: EvalParams, pieces: list[EvalPiece], preset: str = "fast") -> dict:
    """The scored evaluation of `pieces`: their answers, the benchmark's scoring, the gallery's size, and the
    protocol preset the run names (`protocol:` in the config)."""
    scoring = scoring_fingerprint(get_benchmark(dataset.benchmark))
    pieces_fp = hash_obj([p.fingerprint for p in pieces])
    key = {"dataset": dataset.fingerprint, "pieces": pieces_fp, "benchmark": scoring, "gallery": params.gallery}
    if preset != "fast":  # `fast` runs keep the keys they had before presets
        key["preset"] = preset
    return {**key, "calibration": params.calibrated_by} if params.calibrated_by else key


def lookup(store: Store, dataset: DatasetRef, fp: str) -> EvalRef | None:
    """The scored evaluation, if committed and every file (predictions, scores…) matches its marker."""
    arts = ArtifactStore(store)
    manifest = arts.verify("eval", fp)
    if manifest is None:
        return None
    try:
        scores = json.loads(arts.read("eval", fp, "scores.json", manifest))
    except (ValueError, FileNotFoundError):
        scores = None
    if not isinstance(scores, list) or not all(isinstance(s, dict) for s in scores):
        log.error("%s: scores.json is not a list of score rows; scoring again", arts.url("eval", fp))
        return None
    return EvalRef(fp, arts.url("eval", fp), tuple(scores), dataset.benchmark)


def _read_piece(arts: ArtifactStore, piece: EvalPiece) -> tuple[list[dict], dict]:
    """A committed piece's prediction rows and protocol (verified against its marker; Parquet and JSON only)."""
    table = pq.read_table(io.BytesIO(arts.read("eval-piece", piece.fingerprint, "predictions.parquet")))
    missing = [c for c in PIECE_COLUMNS if c not in table.column_names]
    if missing and table.num_rows:
        raise StoreError(f"{arts.url('eval-piece', piece.fingerprint)}: predictions lack columns {missing}")
    protocol = json.loads(arts.read("eval-piece", piece.fingerprint, "protocol.json"))
    return table.to_pylist(), protocol


@dataclass
class _Merged:
    """The pieces' rows in manifest order, with what the scores aggregate."""

    predictions: list[dict]
    protocol: dict
    per_method: dict[str, list[tuple[BenchmarkSample, str, float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _gather(store: Store, bench: Benchmark, manifest: dict[str, dict], pieces: list[EvalPiece]) -> _Merged:
    """Every piece's answers, each scored by the benchmark's metric, in manifest order."""
    arts = ArtifactStore(store)
    samples = {sid: sample_of(r) for sid, r in manifest.items()}
    order = {sid: i for i, sid in enumerate(samples)}
    methods = list(dict.fromkeys(p.method for p in pieces))
    by_method: dict[str, list[dict]] = {m: [] for m in methods}
    errors: dict[str, dict] = {}
    protocol: dict = {}
    for piece in pieces:
        rows, protocol = _read_piece(arts, piece)
        for r in rows:
            if r["error"]:
                errors.setdefault(r["sample_id"], {**r, "score": None})  # every method's piece records it: once
            else:
                r["score"] = score(bench, samples[r["sample_id"]], r["prediction"])
                by_method[piece.method].append(r)
    rank = {m: i for i, m in enumerate(methods)}
    predictions = sorted(
        [*errors.values(), *(r for rows in by_method.values() for r in rows)],
        key=lambda r: (order.get(r["sample_id"], len(order)), rank.get(r["method"], -1)),
    )
    merged = _Merged(predictions, {**protocol, "shards": pieces[0].n_shards if pieces else 1})
    for m, rows in by_method.items():
        rows.sort(key=lambda r: order.get(r["sample_id"], len(order)))
        merged.per_method[m] = [(samples[r["sample_id"]], r["prediction"], r["score"]) for r in rows]
        merged.seconds[m] = sum(r["seconds"] for r in rows)
    return merged


def _scores(bench: Benchmark, merged: _Merged) -> list[dict]:
    """Per method: the benchmark's aggregate, samples/s, and throughput relative to this run's baseline."""
    scores = []
    for name, done in merged.per_method.items():
        agg = aggregate(bench, [d[0] for d in done], [d[1] for d in done], [d[2] for d in done])
        rate = len(done) / merged.seconds[name] if merged.seconds[name] else 0.0
        scores.append({"benchmark": bench.name, "method": name, **agg, "samples_per_s": rate})
    base_rate = next((s["samples_per_s"] for s in scores if s["method"] == "baseline"), None)
    for s in scores:
        s["relative_throughput"] = s["samples_per_s"] / base_rate if base_rate else None
    return scores


def _calibration(store: Store, fp: str) -> tuple[dict, bytes]:
    """What protocol.json says of the calibration that chose τ / mode (all but its answers), and its curve."""
    arts = ArtifactStore(store)
    doc = json.loads(arts.read("calibration", fp, "calibration.json"))
    keep = ("split", "samples", "sample_ids_hash", "grid", "min_relative_throughput", "chosen", "curve")
    summary = {"fingerprint": fp, "url": arts.url("calibration", fp), **{k: doc.get(k) for k in keep}}
    return summary, arts.read("calibration", fp, "curve.png")


def merge(
    store: Store, dataset: DatasetRef, params: EvalParams, fp: str, pieces: list[EvalPiece], preset: str = "fast"
) -> EvalRef:
    """The committed pieces → the evaluation's scored predictions, scores, protocol (naming the run's protocol
    `preset`), report and gallery."""
    bench = get_benchmark(dataset.benchmark)
    manifest = {r["sample_id"]: r for r in read_manifest(dataset, store)}  # read (and verified) once
    gathered = _gather(store, bench, manifest, pieces)
    if not any(gathered.per_method.values()):  # nothing evaluated: a failure, never a committed (reused) result
        errors = [p["error"] for p in gathered.predictions if p["error"]][:3]
        raise ValueError(f"no sample of {dataset.name or dataset.benchmark} could be evaluated: {'; '.join(errors)}")
    scores = _scores(bench, gathered)
    # the preset is the run's, not the pieces' (the same answers serve a run that set the paper's values by hand)
    protocol = {**gathered.protocol, "scoring": scoring_fingerprint(bench), "protocol_preset": preset}
    calibration = _calibration(store, params.calibrated_by) if params.calibrated_by else None
    if calibration is not None:
        protocol["calibration"] = calibration[0]
    rows = [{k: v for k, v in r.items() if k not in ("roi_map", "roi_grid")} for r in gathered.predictions]
    files = {
        "predictions.parquet": _parquet(rows, {"sdrpn.protocol": json.dumps(protocol, default=str)}),
        "scores.json": json.dumps(scores, indent=1).encode(),
        "protocol.json": json.dumps(protocol, indent=1, default=str).encode(),
        "report.md": eval_report_markdown(bench, dataset, scores, protocol.get("calibration")).encode(),
    }
    if calibration is not None:
        files["calibration.png"] = calibration[1]
    if {"sdrpn", "baseline"} <= set(gathered.per_method) and params.gallery:
        picture = gallery(gathered.predictions, manifest, params.gallery, protocol.get("pads_to_square", True))
        if picture is not None:
            files["gallery.png"] = png(picture)
    arts = ArtifactStore(store)
    arts.put_files("eval", fp, files, meta={"benchmark": bench.name, "dataset": dataset.name})
    return EvalRef(fp, arts.url("eval", fp), tuple(scores), bench.name)


def evaluate(
    store: Store,
    model: ModelRef,
    rpn_ref: RpnRef | None,
    dataset: DatasetRef,
    params: EvalParams,
    shards: int = 1,
) -> EvalRef:
    """Every piece in this process, then the scores (the flows map the pieces over their task runner instead)."""
    pieces = plan_pieces(store, model, rpn_ref, dataset, params, shards)
    fp = SCORE.fingerprint(dataset=dataset, params=params, pieces=pieces)
    if (ref := lookup(store, dataset, fp)) is not None:
        return ref
    for shard in by_shard(pieces):
        PIECES.ensure(store=store, model=model, rpn_ref=rpn_ref, dataset=dataset, params=params, shard=shard)
    return merge(store, dataset, params, fp, pieces)


SCORE = Stage(
    "score",
    run=merge,
    lookup=lookup,
    run_name="score[{dataset.benchmark}]",
    # the benchmark's part is `scoring_fingerprint` (its metric and aggregate, not every benchmark's module)
    exclude=BENCHMARK_CODE,
    key=score_key,
)
