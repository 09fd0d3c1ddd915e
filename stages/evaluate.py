"""The `evaluate` stage: answer a benchmark manifest with each method; predictions, scores, report, gallery.

Throughput is samples/s of each method measured in the same run, and reported relative to the baseline."""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from sdrpn_core.data import BadSample, load_image
from sdrpn_core.infer import answer_baseline, answer_sdrpn
from sdrpn_core.metrics import exact_match
from sdrpn_core.visualize import roi_overlay
from stages.common import load_model
from stages.data import read_manifest
from stages.refs import DatasetRef, EvalRef, ModelRef, RpnRef
from stages.train import load_rpn
from storage.artifacts import ArtifactStore
from storage.fingerprint import stage_fingerprint
from storage.store import Store


@dataclass(frozen=True)
class EvalParams:
    methods: tuple[str, ...] = ("baseline", "sdrpn")
    threshold: float = 0.15
    mode: str = "mask"
    reuse_kv: bool = True
    max_new_tokens: int = 16
    gallery: int = 6


def eval_fingerprint(model: ModelRef, rpn: RpnRef | None, dataset: DatasetRef, params: EvalParams) -> str:
    inputs = {"model": model.fingerprint, "dataset": dataset.fingerprint, "rpn": rpn.fingerprint if rpn else ""}
    return stage_fingerprint("eval", inputs, params)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def evaluate(
    store: Store, model: ModelRef, rpn_ref: RpnRef | None, dataset: DatasetRef, params: EvalParams, eval_fp: str
) -> EvalRef:
    arts = ArtifactStore(store)
    if arts.is_committed("eval", eval_fp):
        scores = json.loads(arts.read("eval", eval_fp, "scores.json"))
        return EvalRef(eval_fp, arts.url("eval", eval_fp), tuple(scores))
    adapter = load_model(model)
    rpn = load_rpn(store, rpn_ref, model) if rpn_ref is not None and "sdrpn" in params.methods else None
    rows = read_manifest(dataset, store)
    predictions, seconds = [], dict.fromkeys(params.methods, 0.0)
    gallery = []
    for row in rows:
        try:
            image = load_image(row["image"])
        except BadSample as e:
            predictions.append(
                {
                    "sample_id": row["sample_id"],
                    "method": "-",
                    "prediction": "",
                    "score": None,
                    "error": e.reason,
                    "roi": "",
                }
            )
            continue
        for method in params.methods:
            t0 = time.perf_counter()
            if method == "baseline":
                ans = answer_baseline(adapter, image, row["question"], params.max_new_tokens)
            else:
                ans = answer_sdrpn(
                    adapter,
                    rpn,
                    image,
                    row["question"],
                    threshold=params.threshold,
                    mode=params.mode,
                    reuse_kv=params.reuse_kv,
                    max_new_tokens=params.max_new_tokens,
                )
                if len(gallery) < params.gallery:
                    gallery.append((row, image, ans))
            seconds[method] += time.perf_counter() - t0
            roi = json.dumps(ans.roi.pixel_boxes) if ans.roi else ""
            predictions.append(
                {
                    "sample_id": row["sample_id"],
                    "method": method,
                    "prediction": ans.text,
                    "score": exact_match(ans.text, row["answers"]),
                    "error": "",
                    "roi": roi,
                }
            )
    scores = []
    for method in params.methods:
        got = [p["score"] for p in predictions if p["method"] == method and p["score"] is not None]
        rate = len(got) / seconds[method] if seconds[method] else 0.0
        scores.append(
            {
                "method": method,
                "accuracy": sum(got) / len(got) if got else 0.0,
                "samples": len(got),
                "samples_per_s": rate,
            }
        )
    base_rate = next((s["samples_per_s"] for s in scores if s["method"] == "baseline"), None)
    for s in scores:
        s["relative_throughput"] = s["samples_per_s"] / base_rate if base_rate else None
    files = {
        "predictions.parquet": _parquet(predictions),
        "scores.json": json.dumps(scores, indent=1).encode(),
        "protocol.json": json.dumps(
            {
                "model": model.fingerprint,
                "dtype": model.dtype,
                "rpn": rpn_ref.fingerprint if rpn_ref else None,
                "dataset": dataset.fingerprint,
                "params": params.__dict__,
                "metric": "exact match (last word)",
                "prompt": "vicuna_v1",
            },
            indent=1,
            default=str,
        ).encode(),
    }
    for i, (row, image, ans) in enumerate(gallery):
        files[f"gallery/{i:02d}-{row['sample_id']}.png"] = _png(
            roi_overlay(image, ans.roi.plan.prob, ans.roi.pixel_boxes)
        )
    files["report.md"] = report_markdown(dataset, scores, gallery).encode()
    arts.put_files("eval", eval_fp, files, meta={"dataset": dataset.name})
    return EvalRef(eval_fp, arts.url("eval", eval_fp), tuple(scores))


def _parquet(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def report_markdown(dataset: DatasetRef, scores: list[dict], gallery: list, inline_images: bool = True) -> str:
    lines = [
        f"# Evaluation on {dataset.name} ({dataset.rows} samples)",
        "",
        "| method | accuracy | samples/s | relative throughput |",
        "|---|---|---|---|",
    ]
    for s in scores:
        rel = f"{s['relative_throughput']:.2f}×" if s["relative_throughput"] else "–"
        lines.append(f"| {s['method']} | {s['accuracy']:.3f} | {s['samples_per_s']:.2f} | {rel} |")
    if gallery:
        lines += ["", "## RoI overlays (SD-RPN)", ""]
        for row, image, ans in gallery:
            caption = f"{row['question']} → {ans.text!r} (truth {row['answers']})"
            if inline_images:
                data = base64.b64encode(
                    _png(
                        roi_overlay(image, ans.roi.plan.prob, ans.roi.pixel_boxes).resize(
                            (192, round(192 * image.height / image.width))
                        )
                    )
                ).decode()
                lines.append(f"![{row['sample_id']}](data:image/png;base64,{data})")
            lines.append(f"*{caption}*")
            lines.append("")
    return "\n".join(lines)
