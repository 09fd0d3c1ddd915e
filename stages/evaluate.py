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
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from sdrpn_core.benchmarks import Benchmark, BenchmarkSample, get_benchmark
from sdrpn_core.benchmarks.scoring import aggregate, score
from sdrpn_core.data import BadSample, load_image
from sdrpn_core.infer import answer_baseline, answer_sdrpn, answer_vicrop, answer_with_boxes
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


def evaluate(
    store: Store, model: ModelRef, rpn_ref: RpnRef | None, dataset: DatasetRef, params: EvalParams, eval_fp: str
) -> EvalRef:
    if (ref := lookup(store, eval_fp, dataset.benchmark)) is not None:
        return ref
    arts = ArtifactStore(store)
    bench = get_benchmark(dataset.benchmark)
    adapter = load_model(model)
    inputs = {**adapter.evaluation_inputs, **dict(params.inputs)}
    if inputs:
        adapter = adapter.with_inputs(**inputs)
    methods = [m for m in params.methods if m != "sdrpn" or rpn_ref is not None]
    rpn = load_rpn(store, rpn_ref, model) if "sdrpn" in methods else None
    tokens = adapter.image_token_budget
    threshold = (
        params.threshold
        if params.threshold is not None
        else bench.threshold(model.family, params.default_threshold, params.model_key, tokens)
    )
    max_new = params.max_new_tokens or bench.max_new_tokens or adapter.default_max_new_tokens
    rows = read_manifest(dataset, store)
    predictions: list[dict] = []
    seconds = dict.fromkeys(methods, 0.0)
    per_method: dict[str, list[tuple[BenchmarkSample, str, float]]] = {m: [] for m in methods}
    outcomes: dict[str, dict] = {}
    for row in rows:
        sample = _sample(row)
        try:
            image = load_image(row["image"])
        except BadSample as e:
            predictions.append(
                {
                    "sample_id": sample.sample_id,
                    "method": "-",
                    "prediction": "",
                    "score": None,
                    "seconds": 0.0,
                    "roi": "",
                    "error": e.reason,
                }
            )
            continue
        prompt = bench.prompt(sample)
        for method in methods:
            if method == "oracle" and sample.box is None:
                continue
            t0 = time.perf_counter()
            if method == "baseline":
                ans = answer_baseline(adapter, image, prompt, max_new)
            elif method == "sdrpn":
                ans = answer_sdrpn(
                    adapter,
                    rpn,
                    image,
                    prompt,
                    threshold=threshold,
                    mode=params.mode,
                    reuse_kv=params.reuse_kv,
                    max_new_tokens=max_new,
                )
            elif method == "vicrop":
                ans = answer_vicrop(adapter, image, prompt, layer=params.vicrop_layer, max_new_tokens=max_new)
            else:
                ans = answer_with_boxes(adapter, image, prompt, [sample.box], max_new)
            dt = time.perf_counter() - t0
            seconds[method] += dt
            sc = score(bench, sample, ans.text)
            per_method[method].append((sample, ans.text, sc))
            outcomes.setdefault(sample.sample_id, {"image": image, "sample": sample})[method] = (ans, sc)
            predictions.append(
                {
                    "sample_id": sample.sample_id,
                    "method": method,
                    "prediction": ans.text,
                    "score": sc,
                    "seconds": dt,
                    "roi": json.dumps(ans.roi.pixel_boxes) if ans.roi else "",
                    "error": "",
                }
            )
    if not outcomes:  # nothing evaluated: a failure, never a committed (and so reused) result
        errors = [p["error"] for p in predictions if p["error"]][:3]
        raise ValueError(f"no sample of {dataset.name or dataset.benchmark} could be evaluated: {'; '.join(errors)}")
    scores = []
    for method in methods:
        done = per_method[method]
        agg = aggregate(bench, [d[0] for d in done], [d[1] for d in done], [d[2] for d in done])
        rate = len(done) / seconds[method] if seconds[method] else 0.0
        scores.append({"benchmark": bench.name, "method": method, **agg, "samples_per_s": rate})
    base_rate = next((s["samples_per_s"] for s in scores if s["method"] == "baseline"), None)
    for s in scores:
        s["relative_throughput"] = s["samples_per_s"] / base_rate if base_rate else None
    protocol = {
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
        "max_new_tokens": max_new,
        "decoding": "greedy",
        "repetition_penalty": getattr(adapter.model.generation_config, "repetition_penalty", None),
        "image_token_budget": tokens,
        "model": model.fingerprint,
        "model_path": model.path,
        "family": model.family,
        "dtype": model.dtype,
        "device": model.device,
        "prompt_template": adapter.prompt_template,
        "attn_implementation": adapter.model.config.text_config._attn_implementation,
        "inputs": adapter.describe(),
        "rpn": rpn_ref.fingerprint if rpn_ref else None,
        "roi_threshold": threshold,
        "roi_mode": params.mode,
        "kv_reuse": params.reuse_kv,
        "vicrop_layer": params.vicrop_layer,
        "answer_format": bench.answer_format,
        "params": asdict(params),
    }
    files = {
        "predictions.parquet": _parquet(predictions, {"sdrpn.protocol": json.dumps(protocol, default=str)}),
        "scores.json": json.dumps(scores, indent=1).encode(),
        "protocol.json": json.dumps(protocol, indent=1, default=str).encode(),
        "report.md": report_markdown(bench, dataset, scores).encode(),
    }
    if "sdrpn" in methods and "baseline" in methods and params.gallery:
        files["gallery.png"] = _png(gallery(outcomes, params.gallery, adapter))
    arts.put_files("eval", eval_fp, files, meta={"benchmark": bench.name, "dataset": dataset.name})
    return EvalRef(eval_fp, arts.url("eval", eval_fp), tuple(scores), bench.name)


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
