"""The `evaluate` stage: answering. One benchmark, every method (baseline, SD-RPN, ViCrop, oracle crop), as
cached pieces; scoring the answers is the `score` stage (`stages/score.py`), so a metric fix never calls the model.

An evaluation is split into pieces, one per (method, shard of the benchmark's rows). Each piece is keyed on what
its answers depend on: the model, the data, its shard, the parameters its method reads, the RPN for SD-RPN alone,
the code it runs (the model's and the method's, not the benchmarks' or the metrics') and, from its benchmark, the
prompts of its rows and the generation limit and τ, by value. So a benchmark's prompt change re-answers that
benchmark alone, and its metric change re-answers nothing. A piece is committed to the store as an artifact
`<root>/eval-piece/<fp>/` (predictions.parquet without scores, protocol.json) when it finishes, so a crash loses
only the pieces in flight, and adding a method or changing τ answers only the pieces it changes. Pieces run on
the flow's task runner (threads or Dask workers, one model per worker)."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdrpn_core.benchmarks import BenchmarkSample, get_benchmark
from sdrpn_core.benchmarks.scoring import score
from sdrpn_core.data import read_ahead
from sdrpn_core.infer import Preprocessed
from sdrpn_core.methods import EvalParams, get_method
from sdrpn_core.models.base import VLMAdapter
from sdrpn_core.progress import Progress
from stages.answering import AnswerRun, prepare_run, read_samples, sample_of
from stages.code import BENCHMARK_CODE, function_fingerprint, library_versions
from stages.common import Stage, read_manifest
from stages.refs import DatasetRef, ModelRef, PieceRef, RpnRef
from storage.artifacts import ArtifactStore
from storage.fingerprint import hash_obj, stage_fingerprint
from storage.store import Store

log = logging.getLogger(__name__)


SHARED_PARAMS = ("max_new_tokens", "inputs", "protocol", "batch_size")  # what every method's answers depend on


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


@dataclass(frozen=True)
class EvalShard:
    """The pieces of one shard (one per method): answered together, so each image is read and preprocessed once
    whichever methods answer it; each piece is still committed and found on its own."""

    pieces: tuple[EvalPiece, ...]

    @property
    def name(self) -> str:
        first = self.pieces[0]
        return f"{first.benchmark} {first.shard + 1}/{first.n_shards}: {', '.join(p.method for p in self.pieces)}"


def by_shard(pieces: list[EvalPiece]) -> list[EvalShard]:
    """The pieces grouped by shard, shards and methods in the plan's order."""
    shards: dict[int, list[EvalPiece]] = {}
    for piece in pieces:
        shards.setdefault(piece.shard, []).append(piece)
    return [EvalShard(tuple(group)) for _, group in sorted(shards.items())]


def plan_pieces(
    store: Store, model: ModelRef, rpn: RpnRef | None, dataset: DatasetRef, params: EvalParams, shards: int = 1
) -> list[EvalPiece]:
    """The pieces of one evaluation, methods in the config's order (an RPN method is left out without an RPN)."""
    bench = get_benchmark(dataset.benchmark)
    rows = read_manifest(dataset, store)
    n = max(1, min(shards, len(rows)))
    prompts = [hash_obj([bench.prompt(sample_of(r)) for r in shard_of(rows, shard, n)]) for shard in range(n)]
    code = PIECES.code_version()
    pieces = []
    for method in map(get_method, params.methods):
        if method.needs_rpn and rpn is None:
            continue
        used = {k: getattr(params, k) for k in (*SHARED_PARAMS, *method.depends_on)}
        used["options"] = method.options_of(params)  # its own settings, defaults included
        used["answer"] = function_fingerprint(method.answer)  # a method defined outside the project: its code
        # what the benchmark gives the answers, by value (its module is not part of the piece's code version)
        used["benchmark"] = {"max_new_tokens": bench.max_new_tokens}
        if "threshold" in method.depends_on:
            used["benchmark"]["thresholds"] = bench.thresholds
        inputs = {
            "model": model.fingerprint,
            "dataset": dataset.fingerprint,
            "rpn": rpn.fingerprint if method.needs_rpn and rpn else "",
        }
        for shard in range(n):
            where = {"method": method.name, "shard": shard, "of": n, "prompts": prompts[shard], **used}
            fp = stage_fingerprint("eval-piece", inputs, where, code=code)
            pieces.append(EvalPiece(dataset.benchmark, method.name, shard, n, fp))
    return pieces


def shard_of(rows: list[dict], shard: int, n_shards: int) -> list[dict]:
    """A piece's rows: contiguous, [shard·n/of, (shard+1)·n/of)."""
    return rows[shard * len(rows) // n_shards : (shard + 1) * len(rows) // n_shards]


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


def _row(sample: BenchmarkSample, method: str, answer, dt: float, error: str = "") -> dict:
    """One prediction row; the RoI map is kept (float32, flattened) so the merge can draw the gallery."""
    roi = answer.roi if answer else None
    prob = roi.plan.prob if roi is not None and roi.plan.prob is not None else None
    return {
        "sample_id": sample.sample_id,
        "method": method,
        "prediction": answer.text if answer else "",
        "seconds": dt,
        "roi": json.dumps(roi.pixel_boxes) if roi else "",
        "roi_map": np.asarray(prob, dtype=np.float32).ravel().tolist() if prob is not None else None,
        "roi_grid": list(np.shape(prob)) if prob is not None else None,
        "error": error,
    }


def _read(adapter: VLMAdapter, rows: list[dict]) -> tuple[list[tuple[BenchmarkSample, Preprocessed]], list[dict]]:
    """(sample, decoded and processed image) of the rows whose image reads, and an error row (method "-") for each
    one that does not."""
    ready, bad = read_samples(adapter, rows)
    return ready, [_row(sample, "-", None, 0.0, reason) for sample, reason in bad]


def _reads_ahead(adapter: VLMAdapter) -> bool:
    """Read the next batch in a thread when the model runs on an accelerator; on the CPU it has every core, and a
    reading thread beside its kernels made batch 8 slower on the nano (`benchmarks/scale.py`)."""
    return adapter.device.type != "cpu"


def _answer_all(
    run: AnswerRun, rows: list[dict], what: str, progress: Callable[[int, int], None] | None, batch_size: int = 1
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
            answers = method.answer(run.settings_for(method), [im for _, im in todo], prompts, [s.box for s, _ in todo])
            dt = (time.perf_counter() - t0) / len(todo)
            for (sample, _), answer in zip(todo, answers, strict=True):
                done[method.name].append(score(run.bench, sample, answer.text))  # for the log; the score stage scores
                out.append(_row(sample, method.name, answer, dt))
        bar.update(len(chunk), **{m: f"{100 * np.mean(s):.1f}" for m, s in done.items() if s})
    return out


def _protocol(run: AnswerRun, model: ModelRef, rpn_ref: RpnRef | None, dataset: DatasetRef, params: EvalParams) -> dict:
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
        "libraries": library_versions(),
        "params": asdict(params),
    }


def answer_pieces(
    store: Store,
    model: ModelRef,
    rpn_ref: RpnRef | None,
    dataset: DatasetRef,
    params: EvalParams,
    pieces: list[EvalPiece],
    progress: Callable[[int, int], None] | None = None,
) -> list[PieceRef]:
    """Several methods on one shard, reading each image once; each method's piece committed when the shard is done
    (an unreadable image's error row goes to every piece)."""
    first = pieces[0]
    run = prepare_run(store, model, rpn_ref, dataset, replace(params, methods=tuple(p.method for p in pieces)))
    mine = shard_of(read_manifest(dataset, store), first.shard, first.n_shards)
    what = f"evaluate[{EvalShard(tuple(pieces)).name}]"
    predictions = _answer_all(run, mine, what, progress, params.batch_size)
    protocol = json.dumps(_protocol(run, model, rpn_ref, dataset, params), default=str).encode()
    arts, refs = ArtifactStore(store), []
    for piece in pieces:
        rows = [r for r in predictions if r["method"] in (piece.method, "-")]
        meta = {"method": piece.method, "shard": piece.shard, "of": piece.n_shards, "rows": len(mine)}
        files = {"predictions.parquet": _parquet(rows), "protocol.json": protocol}
        url = arts.put_files("eval-piece", piece.fingerprint, files, meta=meta)
        refs.append(PieceRef(piece.fingerprint, url, piece.method, piece.shard, len(mine)))
    return refs


def evaluate_shard(
    store: Store,
    model: ModelRef,
    rpn_ref: RpnRef | None,
    dataset: DatasetRef,
    params: EvalParams,
    shard: EvalShard,
    progress: Callable[[int, int], None] | None = None,
) -> list[PieceRef]:
    """The shard's pieces: those in the store as they are, the others answered together (`answer_pieces`)."""
    found = {p: piece_lookup(store, p) for p in shard.pieces}
    missing = [p for p, ref in found.items() if ref is None]
    if missing and len(missing) < len(shard.pieces):
        log.info("evaluate[%s]: %d of %d pieces in the store", shard.name, len(shard.pieces) - len(missing), len(found))
    answered = iter(answer_pieces(store, model, rpn_ref, dataset, params, missing, progress) if missing else [])
    return [ref if ref is not None else next(answered) for ref in found.values()]


def shard_lookup(store: Store, shard: EvalShard) -> list[PieceRef] | None:
    """Every piece of the shard, when all are committed and verified."""
    refs = [piece_lookup(store, p) for p in shard.pieces]
    return None if any(r is None for r in refs) else refs  # type: ignore[return-value]


def evaluate_piece(
    store: Store, model: ModelRef, rpn_ref: RpnRef | None, dataset: DatasetRef, params: EvalParams, piece: EvalPiece
) -> PieceRef:
    """One method on one shard (a shard of one piece)."""
    return evaluate_shard(store, model, rpn_ref, dataset, params, EvalShard((piece,)))[0]


PIECE_COLUMNS = ("sample_id", "method", "prediction", "seconds", "roi", "roi_map", "roi_grid", "error")


def _parquet(rows: list[dict], metadata: dict[str, str] | None = None) -> bytes:
    """Predictions with the protocol in the file's metadata, so a score can be traced from the file alone."""
    buf = io.BytesIO()
    schema = None if rows else pa.schema([(c, pa.string()) for c in PIECE_COLUMNS])
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table.replace_schema_metadata(metadata) if metadata else table, buf)
    return buf.getvalue()


PIECES = Stage(
    "evaluate-piece",
    run=evaluate_shard,
    lookup=shard_lookup,
    run_name="evaluate[{shard.name}]",
    progress="evaluating {shard.name}: samples done",
    model_bound=True,
    # a benchmark enters a piece's key by value (its rows' prompts, its generation limit and τ); its metric never
    exclude=BENCHMARK_CODE,
    config=lambda cfg, preset: cfg.eval.params(preset),
)
