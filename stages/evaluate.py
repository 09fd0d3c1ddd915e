"""The `evaluate` stage: one benchmark, every method (baseline, SD-RPN, ViCrop, oracle crop) in the same run.

Per sample and method: the prediction, its score under the benchmark's official metric, and the seconds spent.
Per method: the benchmark's headline score (percent) and sub-scores, samples/s and throughput relative to the
baseline measured in this run. Written as an artifact `<root>/eval/<fp>/`: predictions.parquet, scores.json,
protocol.json (everything a score depends on), report.md and gallery.png (largest SD-RPN wins and losses)."""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from sdrpn_core.benchmarks import Benchmark, BenchmarkSample, get_benchmark
from sdrpn_core.benchmarks.scoring import aggregate, score
from sdrpn_core.data import BadSample, load_image
from sdrpn_core.methods import EvalMethod, MethodSettings, get_method
from sdrpn_core.visualize import roi_overlay
from stages.common import load_model
from stages.data import read_manifest
from stages.refs import DatasetRef, EvalRef, ModelRef, RpnRef
from stages.train import load_rpn
from storage.artifacts import ArtifactStore
from storage.fingerprint import stage_fingerprint
from storage.store import Store

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
    inputs: tuple[tuple[str, Any], ...] = ()  # adapter input overrides for evaluation (sorted items)
    model_key: str = ""  # the preset's model ("qwen2.5-vl-3b"): selects the authors' per-model τ
    protocol: str = "lmms-eval 0.4.0 (the authors' vendored copy)"  # prompts and metrics scored as by this harness


def eval_fingerprint(model: ModelRef, rpn: RpnRef | None, dataset: DatasetRef, params: EvalParams) -> str:
    inputs = {"model": model.fingerprint, "dataset": dataset.fingerprint, "rpn": rpn.fingerprint if rpn else ""}
    return stage_fingerprint("eval", inputs, params)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


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


@dataclass
class _Results:
    """Per sample and method: the prediction rows, and per method what the scores aggregate."""

    predictions: list[dict] = field(default_factory=list)
    per_method: dict[str, list[tuple[BenchmarkSample, str, float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, dict] = field(default_factory=dict)  # sample id → image, sample, method → (answer, score)

    def add(self, sample: BenchmarkSample, method: str, answer, score_: float | None, dt: float, error: str = ""):
        self.predictions.append(
            {
                "sample_id": sample.sample_id,
                "method": method,
                "prediction": answer.text if answer else "",
                "score": score_,
                "seconds": dt,
                "roi": json.dumps(answer.roi.pixel_boxes) if answer and answer.roi else "",
                "error": error,
            }
        )


def _answer_all(run: _Run, rows: list[dict]) -> _Results:
    """Every method on every readable sample; an unreadable image is a recorded error row, never a crash."""
    out = _Results(
        per_method={m.name: [] for m in run.methods}, seconds=dict.fromkeys((m.name for m in run.methods), 0.0)
    )
    for row in rows:
        sample = _sample(row)
        try:
            image = load_image(row["image"])
        except BadSample as e:
            out.add(sample, "-", None, None, 0.0, e.reason)
            continue
        prompt = run.bench.prompt(sample)
        for method in run.methods:
            if method.needs_box and sample.box is None:
                continue
            t0 = time.perf_counter()
            answer = method.answer(run.settings, image, prompt, sample.box)
            dt = time.perf_counter() - t0
            out.seconds[method.name] += dt
            sc = score(run.bench, sample, answer.text)
            out.per_method[method.name].append((sample, answer.text, sc))
            out.outcomes.setdefault(sample.sample_id, {"image": image, "sample": sample})[method.name] = (answer, sc)
            out.add(sample, method.name, answer, sc, dt)
    return out


def _scores(run: _Run, results: _Results) -> list[dict]:
    """Per method: the benchmark's aggregate, samples/s, and throughput relative to this run's baseline."""
    scores = []
    for name, done in results.per_method.items():
        agg = aggregate(run.bench, [d[0] for d in done], [d[1] for d in done], [d[2] for d in done])
        rate = len(done) / results.seconds[name] if results.seconds[name] else 0.0
        scores.append({"benchmark": run.bench.name, "method": name, **agg, "samples_per_s": rate})
    base_rate = next((s["samples_per_s"] for s in scores if s["method"] == "baseline"), None)
    for s in scores:
        s["relative_throughput"] = s["samples_per_s"] / base_rate if base_rate else None
    return scores


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
        "rpn": rpn_ref.fingerprint if rpn_ref else None,
        "roi_threshold": run.settings.threshold,
        "roi_mode": params.mode,
        "kv_reuse": params.reuse_kv,
        "vicrop_layer": params.vicrop_layer,
        "answer_format": bench.answer_format,
        "params": asdict(params),
    }


def evaluate(
    store: Store, model: ModelRef, rpn_ref: RpnRef | None, dataset: DatasetRef, params: EvalParams, eval_fp: str
) -> EvalRef:
    if (ref := lookup(store, eval_fp, dataset.benchmark)) is not None:
        return ref
    run = _prepare(store, model, rpn_ref, dataset, params)
    results = _answer_all(run, read_manifest(dataset, store))
    if not results.outcomes:  # nothing evaluated: a failure, never a committed (and so reused) result
        errors = [p["error"] for p in results.predictions if p["error"]][:3]
        raise ValueError(f"no sample of {dataset.name or dataset.benchmark} could be evaluated: {'; '.join(errors)}")
    scores = _scores(run, results)
    protocol = _protocol(run, model, rpn_ref, dataset, params)
    files = {
        "predictions.parquet": _parquet(results.predictions, {"sdrpn.protocol": json.dumps(protocol, default=str)}),
        "scores.json": json.dumps(scores, indent=1).encode(),
        "protocol.json": json.dumps(protocol, indent=1, default=str).encode(),
        "report.md": report_markdown(run.bench, dataset, scores).encode(),
    }
    names = {m.name for m in run.methods}
    if "sdrpn" in names and "baseline" in names and params.gallery:
        files["gallery.png"] = _png(gallery(results.outcomes, params.gallery, run.settings.adapter))
    arts = ArtifactStore(store)
    arts.put_files("eval", eval_fp, files, meta={"benchmark": run.bench.name, "dataset": dataset.name})
    return EvalRef(eval_fp, arts.url("eval", eval_fp), tuple(scores), run.bench.name)


def _parquet(rows: list[dict], metadata: dict[str, str] | None = None) -> bytes:
    """Predictions with the protocol in the file's metadata, so a score can be traced from the file alone."""
    buf = io.BytesIO()
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.replace_schema_metadata(metadata) if metadata else table, buf)
    return buf.getvalue()


def gallery(outcomes: dict[str, dict], n: int, adapter, tile: int = 224) -> Image.Image:
    """The samples where SD-RPN beat the baseline most, then those where it lost most: RoI overlays + captions."""
    both = [o for o in outcomes.values() if "sdrpn" in o and "baseline" in o]
    deltas = sorted(both, key=lambda o: o["sdrpn"][1] - o["baseline"][1])
    wins = [o for o in reversed(deltas) if o["sdrpn"][1] > o["baseline"][1]][: max(1, n // 2)]
    losses = [o for o in deltas if o["sdrpn"][1] < o["baseline"][1]][: max(1, n - len(wins))]
    picked = [("win", o) for o in wins] + [("loss", o) for o in losses] or [("tie", o) for o in both[:n]]
    cols = max(1, min(3, len(picked)))
    rows_n = max(1, -(-len(picked) // cols))
    canvas = Image.new("RGB", (cols * tile, rows_n * (tile + 44)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (kind, o) in enumerate(picked):
        ans = o["sdrpn"][0]
        img = roi_overlay(o["image"], ans.roi.plan.prob, ans.roi.pixel_boxes, padded=adapter.pads_to_square)
        img.thumbnail((tile, tile))
        x, y = (i % cols) * tile, (i // cols) * (tile + 44)
        canvas.paste(img, (x, y))
        s = o["sample"]
        draw.text((x + 2, y + tile + 2), f"{kind}: {s.question[:34]}", fill="black")
        draw.text((x + 2, y + tile + 15), f"sdrpn {ans.text[:16]!r} ({o['sdrpn'][1]:.2f})", fill="darkgreen")
        draw.text(
            (x + 2, y + tile + 28), f"base {o['baseline'][0].text[:16]!r} ({o['baseline'][1]:.2f})", fill="darkred"
        )
    return canvas


def report_markdown(bench: Benchmark, dataset: DatasetRef, scores: list[dict]) -> str:
    subs = [k for k in dict.fromkeys(k for s in scores for k in s) if k not in _NOT_SUBSCORES]
    head = "| method | score | " + " | ".join(subs) + (" | " if subs else "") + "samples/s | relative throughput |"
    lines = [f"## {bench.name} ({dataset.rows} samples, {dataset.rejected} rejected rows)", ""]
    notes = [f"> **Warning:** {w}" for w in dataset.warnings]
    if bench.notes:
        notes.append(f"> Differs from the harness: {bench.notes}")
    lines += [*notes, *([""] if notes else []), head, "|" + "---|" * (4 + len(subs))]
    for s in scores:
        rel = f"{s['relative_throughput']:.2f}×" if s.get("relative_throughput") else "–"
        cells = " | ".join(f"{s.get(k, float('nan')):.1f}" for k in subs)
        lines.append(
            f"| {s['method']} | {s['score']:.1f} | {cells}{' | ' if subs else ''}{s['samples_per_s']:.2f} | {rel} |"
        )
    return "\n".join(lines) + "\n"


_NOT_SUBSCORES = {"benchmark", "method", "score", "samples", "samples_per_s", "relative_throughput"}
