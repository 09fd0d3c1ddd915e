"""The `evaluate` stage: one benchmark, every method (baseline, SD-RPN, ViCrop, oracle crop), as cached pieces.

An evaluation is split into pieces, one per (method, shard of the benchmark's rows). Each piece is fingerprinted
on what its answers depend on (the model, the data, its shard, the parameters its method reads, the RPN for
SD-RPN alone) and committed to the store as an artifact `<root>/eval-piece/<fp>/` when it finishes, so a crash
loses only the pieces in flight, and adding a method or changing τ evaluates only the pieces it changes. Pieces
run on the flow's task runner (threads or Dask workers, one model per worker).

`merge` reads the pieces back and writes the evaluation `<root>/eval/<fp>/`: predictions.parquet (in manifest
order, whatever order the pieces finished in), scores.json (per method: the benchmark's headline score in
percent, sub-scores, samples/s and throughput relative to this run's baseline), protocol.json (everything a score
depends on), report.md and gallery.png (largest SD-RPN wins and losses). `evaluate` is both, in one process."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdrpn_core.benchmarks import Benchmark, BenchmarkSample, get_benchmark
from sdrpn_core.benchmarks.scoring import aggregate, score
from sdrpn_core.data import BadSample, read_ahead
from sdrpn_core.infer import Preprocessed, preprocess
from sdrpn_core.methods import EvalMethod, MethodSettings, get_method
from sdrpn_core.models.base import VLMAdapter
from sdrpn_core.progress import Progress
from stages.common import Stage, load_model
from stages.data import read_manifest
from stages.refs import DatasetRef, EvalRef, ModelRef, PieceRef, RpnRef
from stages.report import eval_report_markdown, gallery, png
from stages.train import load_rpn
from storage.artifacts import ArtifactStore
from storage.fingerprint import stage_fingerprint
from storage.store import Store, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalParams:
    methods: tuple[str, ...] = ("baseline", "sdrpn", "vicrop", "oracle")
    threshold: float | None = None  # None: the benchmark's per-family value, else `default_threshold`
    default_threshold: float = 0.15
    mode: str = "mask"
    reuse_kv: bool = True
    max_new_tokens: int | None = None  # None: the benchmark's
    vicrop_layer: int = 14
    gallery: int = 6
    batch_size: int = 1  # rows answered together (answers equal batch 1's; throughput is what changes)
    inputs: tuple[tuple[str, Any], ...] = ()  # adapter input overrides for evaluation (sorted items)
    model_key: str = ""  # the preset's model ("qwen2.5-vl-3b"): selects the authors' per-model τ
    protocol: str = "lmms-eval 0.4.0 (the authors' vendored copy)"  # prompts and metrics scored as by this harness


SHARED_PARAMS = ("max_new_tokens", "inputs", "protocol", "batch_size")  # what every method's answers depend on


def eval_fingerprint(model: ModelRef, rpn: RpnRef | None, dataset: DatasetRef, params: EvalParams) -> str:
    inputs = {"model": model.fingerprint, "dataset": dataset.fingerprint, "rpn": rpn.fingerprint if rpn else ""}
    return stage_fingerprint("eval", inputs, params)


@dataclass(frozen=True)
class EvalPiece:
    """One method on one shard of a benchmark's rows (contiguous: rows [shard·n/of, (shard+1)·n/of))."""

    benchmark: str
    method: str
    shard: int
    n_shards: int
    fingerprint: str

    @property
    def name(self) -> str:
        return f"{self.benchmark}/{self.method} {self.shard + 1}/{self.n_shards}"


def plan_pieces(
    model: ModelRef, rpn: RpnRef | None, dataset: DatasetRef, params: EvalParams, shards: int = 1
) -> list[EvalPiece]:
    """The pieces of one evaluation, methods in the config's order (an RPN method is left out without an RPN)."""
    n = max(1, min(shards, dataset.rows))
    pieces = []
    for method in map(get_method, params.methods):
        if method.needs_rpn and rpn is None:
            continue
        used = {k: getattr(params, k) for k in (*SHARED_PARAMS, *method.depends_on)}
        inputs = {
            "model": model.fingerprint,
            "dataset": dataset.fingerprint,
            "rpn": rpn.fingerprint if method.needs_rpn and rpn else "",
        }
        for shard in range(n):
            where = {"method": method.name, "shard": shard, "of": n, **used}
            fp = stage_fingerprint("eval-piece", inputs, where)
            pieces.append(EvalPiece(dataset.benchmark, method.name, shard, n, fp))
    return pieces


def _sample(row: dict) -> BenchmarkSample:
    options = tuple(tuple(o) for o in json.loads(row["options"])) if row.get("options") else ()
    return BenchmarkSample(
        row["sample_id"],
        row["image"],
        row["question"],
        tuple(row["answers"] or ()),
        row.get("category") or "",
        options,
        tuple(row["box"]) if row.get("box") else None,
        tuple(json.loads(row["meta"]).items()) if row.get("meta") else (),
    )


def lookup(store: Store, eval_fp: str, benchmark: str) -> EvalRef | None:
    """The finished evaluation, if committed and every file (predictions, scores…) matches its marker."""
    arts = ArtifactStore(store)
    manifest = arts.verify("eval", eval_fp)
    if manifest is None:
        return None
    try:
        scores = json.loads(arts.read("eval", eval_fp, "scores.json", manifest))
    except (ValueError, FileNotFoundError):
        scores = None
    if not isinstance(scores, list) or not all(isinstance(s, dict) for s in scores):
        log.error("%s: scores.json is not a list of score rows; re-evaluating", arts.url("eval", eval_fp))
        return None
    return EvalRef(eval_fp, arts.url("eval", eval_fp), tuple(scores), benchmark)


def piece_lookup(store: Store, piece: EvalPiece) -> PieceRef | None:
    """The committed piece, if every file matches its marker."""
    arts = ArtifactStore(store)
    manifest = arts.verify("eval-piece", piece.fingerprint)
    if manifest is None:
        return None
    rows = manifest["meta"].get("rows")
    if not isinstance(rows, int):
        log.error("%s: marker lacks a row count; re-evaluating", arts.url("eval-piece", piece.fingerprint))
        return None
    return PieceRef(piece.fingerprint, arts.url("eval-piece", piece.fingerprint), piece.method, piece.shard, rows)


@dataclass
class _Run:
    """One evaluation's settings, resolved once (model, benchmark, methods, τ, generation limit)."""

    bench: Benchmark
    methods: list[EvalMethod]
    settings: MethodSettings
    tokens: int | None


def _prepare(store: Store, model: ModelRef, rpn_ref: RpnRef | None, dataset: DatasetRef, params: EvalParams) -> _Run:
    bench = get_benchmark(dataset.benchmark)
    adapter = load_model(model)
    inputs = {**adapter.evaluation_inputs, **dict(params.inputs)}
    if inputs:
        adapter = adapter.with_inputs(**inputs)
    methods = [get_method(m) for m in params.methods]
    methods = [m for m in methods if not m.needs_rpn or rpn_ref is not None]
    rpn = load_rpn(store, rpn_ref, model) if any(m.needs_rpn for m in methods) else None
    tokens = adapter.image_token_budget
    threshold = (
        params.threshold
        if params.threshold is not None
        else bench.threshold(model.family, params.default_threshold, params.model_key, tokens)
    )
    max_new = params.max_new_tokens or bench.max_new_tokens or adapter.default_max_new_tokens
    settings = MethodSettings(adapter, rpn, threshold, params.mode, params.reuse_kv, max_new, params.vicrop_layer)
    return _Run(bench, methods, settings, tokens)


def _row(sample: BenchmarkSample, method: str, answer, score_: float | None, dt: float, error: str = "") -> dict:
    """One prediction row; the RoI map is kept (float32, flattened) so the merge can draw the gallery."""
    roi = answer.roi if answer else None
    prob = roi.plan.prob if roi is not None and roi.plan.prob is not None else None
    return {
        "sample_id": sample.sample_id,
        "method": method,
        "prediction": answer.text if answer else "",
        "score": score_,
        "seconds": dt,
        "roi": json.dumps(roi.pixel_boxes) if roi else "",
        "roi_map": np.asarray(prob, dtype=np.float32).ravel().tolist() if prob is not None else None,
        "roi_grid": list(np.shape(prob)) if prob is not None else None,
        "error": error,
    }


def _read(adapter: VLMAdapter, rows: list[dict]) -> tuple[list[tuple[BenchmarkSample, Preprocessed]], list[dict]]:
    """(sample, decoded and processed image) of the rows whose image reads, and an error row (method "-") for each
    one that does not."""
    ready, errors = [], []
    for row in rows:
        sample = _sample(row)
        try:
            ready.append((sample, preprocess(adapter, row["image"])))
        except BadSample as e:
            errors.append(_row(sample, "-", None, None, 0.0, e.reason))
    return ready, errors


def _reads_ahead(adapter: VLMAdapter) -> bool:
    """Read the next batch in a thread when the model runs on an accelerator; on the CPU it has every core, and a
    reading thread beside its kernels made batch 8 slower on the nano (`benchmarks/scale.py`)."""
    return adapter.device.type != "cpu"


def _answer_all(
    run: _Run, rows: list[dict], what: str, progress: Callable[[int, int], None] | None, batch_size: int = 1
) -> list[dict]:
    """Every method on every readable row, `batch_size` rows at a time → prediction rows (each row charged an
    equal share of its batch's seconds); an unreadable image is a recorded error row, never a crash. On an
    accelerator the next batch's images are read while this one is answered. Logs counts, rate, ETA and the
    running mean score per method."""
    out: list[dict] = []
    done: dict[str, list[float]] = {m.name: [] for m in run.methods}
    bar = Progress(len(rows), what, log, callback=progress)
    chunks = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    adapter = run.settings.adapter
    for chunk, (ready, errors) in read_ahead(partial(_read, adapter), chunks, background=_reads_ahead(adapter)):
        out.extend(errors)
        for method in run.methods:
            todo = [(s, im) for s, im in ready if not (method.needs_box and s.box is None)]
            if not todo:
                continue
            prompts = [run.bench.prompt(s) for s, _ in todo]
            t0 = time.perf_counter()
            answers = method.answer(run.settings, [im for _, im in todo], prompts, [s.box for s, _ in todo])
            dt = (time.perf_counter() - t0) / len(todo)
            for (sample, _), answer in zip(todo, answers, strict=True):
                sc = score(run.bench, sample, answer.text)
                done[method.name].append(sc)
                out.append(_row(sample, method.name, answer, sc, dt))
        bar.update(len(chunk), **{m: f"{100 * np.mean(s):.1f}" for m, s in done.items() if s})
    return out


def _protocol(run: _Run, model: ModelRef, rpn_ref: RpnRef | None, dataset: DatasetRef, params: EvalParams) -> dict:
    """Everything a score depends on, written beside it."""
    bench, adapter = run.bench, run.settings.adapter
    return {
        "benchmark": bench.name,
        "harness": params.protocol,
        "dataset": dataset.fingerprint,
        "rows": dataset.rows,
        "published_rows": bench.published_rows,
        "rejected": dataset.rejected,
        "warnings": list(dataset.warnings),
        "differences_from_harness": bench.notes,
        "metric": bench.metric_name,
        "post_prompt": bench.post_prompt,
        "ocr_tokens_in_prompt": False,
        "max_new_tokens": run.settings.max_new_tokens,
        "decoding": "greedy",
        "repetition_penalty": getattr(adapter.model.generation_config, "repetition_penalty", None),
        "image_token_budget": run.tokens,
        "model": model.fingerprint,
        "model_path": model.path,
        "family": model.family,
        "dtype": model.dtype,
        "device": model.device,
        "prompt_template": adapter.prompt_template,
        "attn_implementation": adapter.model.config.text_config._attn_implementation,
        "inputs": adapter.describe(),
        "pads_to_square": adapter.pads_to_square,
        "rpn": rpn_ref.fingerprint if rpn_ref else None,
        "roi_threshold": run.settings.threshold,
        "roi_mode": params.mode,
        "kv_reuse": params.reuse_kv,
        "vicrop_layer": params.vicrop_layer,
        "batch_size": params.batch_size,
        "answer_format": bench.answer_format,
        "params": asdict(params),
    }


def evaluate_piece(
    store: Store,
    model: ModelRef,
    rpn_ref: RpnRef | None,
    dataset: DatasetRef,
    params: EvalParams,
    piece: EvalPiece,
    progress: Callable[[int, int], None] | None = None,
) -> PieceRef:
    """One method on one shard, committed to the store when done (found there: returned as it is)."""
    if (ref := piece_lookup(store, piece)) is not None:
        return ref
    run = _prepare(store, model, rpn_ref, dataset, replace(params, methods=(piece.method,)))
    rows = read_manifest(dataset, store)
    mine = rows[piece.shard * len(rows) // piece.n_shards : (piece.shard + 1) * len(rows) // piece.n_shards]
    predictions = _answer_all(run, mine, f"evaluate[{piece.name}]", progress, params.batch_size)
    protocol = _protocol(run, model, rpn_ref, dataset, params)
    arts = ArtifactStore(store)
    meta = {"method": piece.method, "shard": piece.shard, "of": piece.n_shards, "rows": len(mine)}
    arts.put_files(
        "eval-piece",
        piece.fingerprint,
        {"predictions.parquet": _parquet(predictions), "protocol.json": json.dumps(protocol, default=str).encode()},
        meta=meta,
    )
    return PieceRef(piece.fingerprint, arts.url("eval-piece", piece.fingerprint), piece.method, piece.shard, len(mine))


PIECE_COLUMNS = ("sample_id", "method", "prediction", "score", "seconds", "roi", "roi_map", "roi_grid", "error")


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


def _gather(store: Store, manifest: dict[str, dict], pieces: list[EvalPiece]) -> _Merged:
    arts = ArtifactStore(store)
    samples = {sid: _sample(r) for sid, r in manifest.items()}
    order = {sid: i for i, sid in enumerate(samples)}
    methods = list(dict.fromkeys(p.method for p in pieces))
    by_method: dict[str, list[dict]] = {m: [] for m in methods}
    errors: dict[str, dict] = {}
    protocol: dict = {}
    for piece in pieces:
        rows, protocol = _read_piece(arts, piece)
        for r in rows:
            if r["error"]:
                errors.setdefault(r["sample_id"], r)  # every method's piece records an unreadable image: once
            else:
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


def merged(store: Store, dataset: DatasetRef, eval_fp: str) -> EvalRef | None:
    """The benchmark's merged evaluation, committed and verified, or None."""
    return lookup(store, eval_fp, dataset.benchmark)


def merge(store: Store, dataset: DatasetRef, params: EvalParams, eval_fp: str, pieces: list[EvalPiece]) -> EvalRef:
    """The committed pieces → the evaluation's predictions, scores, protocol, report and gallery."""
    if (ref := merged(store, dataset, eval_fp)) is not None:
        return ref
    bench = get_benchmark(dataset.benchmark)
    manifest = {r["sample_id"]: r for r in read_manifest(dataset, store)}  # read (and verified) once
    gathered = _gather(store, manifest, pieces)
    if not any(gathered.per_method.values()):  # nothing evaluated: a failure, never a committed (reused) result
        errors = [p["error"] for p in gathered.predictions if p["error"]][:3]
        raise ValueError(f"no sample of {dataset.name or dataset.benchmark} could be evaluated: {'; '.join(errors)}")
    scores = _scores(bench, gathered)
    protocol = gathered.protocol
    rows = [{k: v for k, v in r.items() if k not in ("roi_map", "roi_grid")} for r in gathered.predictions]
    files = {
        "predictions.parquet": _parquet(rows, {"sdrpn.protocol": json.dumps(protocol, default=str)}),
        "scores.json": json.dumps(scores, indent=1).encode(),
        "protocol.json": json.dumps(protocol, indent=1, default=str).encode(),
        "report.md": eval_report_markdown(bench, dataset, scores).encode(),
    }
    if {"sdrpn", "baseline"} <= set(gathered.per_method) and params.gallery:
        picture = gallery(gathered.predictions, manifest, params.gallery, protocol.get("pads_to_square", True))
        if picture is not None:
            files["gallery.png"] = png(picture)
    arts = ArtifactStore(store)
    arts.put_files("eval", eval_fp, files, meta={"benchmark": bench.name, "dataset": dataset.name})
    return EvalRef(eval_fp, arts.url("eval", eval_fp), tuple(scores), bench.name)


def evaluate(
    store: Store,
    model: ModelRef,
    rpn_ref: RpnRef | None,
    dataset: DatasetRef,
    params: EvalParams,
    eval_fp: str,
    shards: int = 1,
) -> EvalRef:
    """Every piece in this process, then the merge (the flows map the pieces over their task runner instead)."""
    if (ref := lookup(store, eval_fp, dataset.benchmark)) is not None:
        return ref
    pieces = plan_pieces(model, rpn_ref, dataset, params, shards)
    for piece in pieces:
        evaluate_piece(store, model, rpn_ref, dataset, params, piece)
    return merge(store, dataset, params, eval_fp, pieces)


def _parquet(rows: list[dict], metadata: dict[str, str] | None = None) -> bytes:
    """Predictions with the protocol in the file's metadata, so a score can be traced from the file alone."""
    buf = io.BytesIO()
    schema = None if rows else pa.schema([(c, pa.string()) for c in PIECE_COLUMNS])
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table.replace_schema_metadata(metadata) if metadata else table, buf)
    return buf.getvalue()


PIECE = Stage(
    "evaluate-piece",
    run=evaluate_piece,
    lookup=piece_lookup,
    run_name="evaluate[{piece.name}]",
    progress="evaluating {piece.name}: samples done",
    model_bound=True,
)
MERGE = Stage("evaluate", run=merge, lookup=merged, run_name="evaluate[{dataset.benchmark}]")
