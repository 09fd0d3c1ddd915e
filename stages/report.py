"""The run's results table, in the layout of the paper's Tables 1–2 (a column per benchmark, a row per method,
relative throughput), with the paper's published numbers for the same model beside ours when it reports it."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image, ImageDraw

from sdrpn_core.benchmarks import Benchmark, get_benchmark
from sdrpn_core.benchmarks.published import PAPER_PROTOCOL, PUBLISHED, paper_protocol, tokens_stated
from sdrpn_core.data import BadSample, load_image
from sdrpn_core.methods import METHODS
from sdrpn_core.visualize import roi_overlay
from stages.refs import DatasetRef, EvalRef
from storage.artifacts import ArtifactStore
from storage.fingerprint import hash_obj
from storage.store import Store

METHOD_NAMES = {**{m.name: m.label for m in METHODS.values()}, "s2": "+S²"}  # S²: the paper's rows only


def results_rows(results: list[EvalRef]) -> list[dict]:
    """One row per method: {method, <paper column>: score, …, Thru.: mean relative throughput}."""
    rows: dict[str, dict] = {}
    thru: dict[str, list[float]] = {}
    for ref in results:
        bench = get_benchmark(ref.benchmark)
        column = bench.paper_key or ref.benchmark
        for s in ref.scores:
            row = rows.setdefault(s["method"], {"method": s["method"]})
            row[column] = round(s["score"], 1)
            for sub, label in bench.columns.items():
                if sub in s:
                    row[label] = round(s[sub], 1)
            if s.get("relative_throughput"):
                thru.setdefault(s["method"], []).append(s["relative_throughput"])
    for method, values in thru.items():
        rows[method]["Thru."] = round(sum(values) / len(values), 2)
    return list(rows.values())


def protocol_differences(paper_model: str, column: str, ours: dict | None) -> list[str]:
    """How the paper's cell in `column` was measured where it is not how ours was (`ours`: our protocol.json)."""
    if not ours:
        return []
    theirs, out = paper_protocol(paper_model, column), []
    our_tokens = _tokens(ours)
    if theirs["tokens"] is not None and theirs["tokens"] != our_tokens:
        out.append(f"{theirs['tokens']} image tokens (ours {our_tokens})")
    if theirs["dtype"] and theirs["dtype"] != str(ours.get("dtype", "")).removeprefix("torch."):
        out.append(f"{theirs['dtype']} (ours {str(ours.get('dtype', '')).removeprefix('torch.')})")
    if theirs["kv_reuse"] is not None and theirs["kv_reuse"] != ours.get("kv_reuse"):
        out.append("pass 2 recomputed (ours: KV reuse)" if not theirs["kv_reuse"] else "KV reuse")
    return out


def _tokens(ours: dict) -> str:
    """Our image tokens as the paper states theirs: the pixel range where the adapter has one (Qwen), else the
    budget."""
    inputs = ours.get("inputs") or {}
    if "min_pixels" in inputs and "max_pixels" in inputs:
        return tokens_stated((inputs["min_pixels"], inputs["max_pixels"]))
    budget = ours.get("image_token_budget")
    return f"{budget:,}" if isinstance(budget, int) else str(budget)


def _paper_note(paper_model: str, differences: dict[str, list[str]]) -> list[str]:
    """The paper rows' protocol, and each column where it differs from ours (marked † in the table)."""
    p = PAPER_PROTOCOL[paper_model]
    other = ", ".join(f"{c} {p.tokens_of(c)}" for c in p.columns)
    lines = [
        f"Paper rows: arXiv 2509.16944 Tables 1–2 for {paper_model}, measured at {p.tokens_of('*')} image tokens"
        f"{' (' + other + ')' if other else ''}, {p.dtype} (trained in {p.train_dtype}), pass 2 recomputed."
    ]
    for c, differs in differences.items():
        if differs:
            lines.append(f"† {c}: the paper's cell is at {'; '.join(differs)}: not the same protocol as ours.")
    return lines


def results_markdown(rows: list[dict], paper_model: str | None, protocols: dict[str, dict] | None = None) -> str:
    """Our rows and, for a model the paper reports, its rows: a paper cell measured under another protocol than
    ours (`protocols`: our protocol.json per column) is marked †, with what differs below the table."""
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if c != "method"]
    columns = ["Thru.", *[c for c in columns if c != "Thru."]]
    published = PUBLISHED.get(paper_model or "", {})
    protocols = protocols or {}
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cells.append("–" if v is None else (f"{v:.2f}×" if c == "Thru." else f"{v:.1f}"))
        lines.append(f"| {METHOD_NAMES.get(r['method'], r['method'])} (ours) | " + " | ".join(cells) + " |")
    bases = list(dict.fromkeys(_base(c) for c in columns if c != "Thru."))
    differences = {b: protocol_differences(paper_model or "", b, protocols.get(b)) for b in bases}
    marks = {c: "†" if differences.get(_base(c)) else "" for c in columns}
    for method, values in published.items():
        cells = [
            ("–" if values.get(c) is None else (f"{values[c]:.2f}×" if c == "Thru." else f"{values[c]:.1f}{marks[c]}"))
            for c in columns
        ]
        lines.append(f"| {METHOD_NAMES.get(method, method)} (paper, {paper_model}) | " + " | ".join(cells) + " |")
    preset = _preset_line(protocols)
    if not published:
        return "\n".join(lines) + "\n\n" + preset + "The paper reports no numbers for this model.\n"
    note = _paper_note(paper_model or "", differences)
    return "\n".join(lines) + "\n\n" + preset + "\n\n".join(note) + "\n"


def _preset_line(protocols: dict[str, dict]) -> str:
    """Which protocol preset our rows ran under (`protocol:` in the config), as each protocol.json records it."""
    presets = sorted({str(p.get("protocol_preset", "fast")) for p in protocols.values()})
    if not presets:
        return ""
    says = {
        "paper": "`paper` (the authors' precision, pass 2 recomputed, their pixel budgets)",
        "fast": "`fast` (sdrpn's defaults, faster; a paper cell measured otherwise is marked; `protocol: paper` "
        "runs the authors' settings)",
    }
    return "Our rows: protocol preset " + "; ".join(says.get(p, f"`{p}`") for p in presets) + ".\n\n"


def _base(column: str) -> str:
    """A sub-score's column belongs to its benchmark's ("V* Attr" → "V*", "POPE Acc" → "POPE")."""
    return column.split(" ")[0]


def write_results(
    store: Store, results: list[EvalRef], paper_model: str | None, model_fp: str, history: list[dict] | None = None
) -> tuple[str, str]:
    """results.json, results.md and scores.png (and, given the training log, loss.png) under
    `<root>/reports/<fp>/`; returns (URL, markdown)."""
    rows = results_rows(results)
    arts = ArtifactStore(store)
    protocols = {
        get_benchmark(r.benchmark).paper_key or r.benchmark: json.loads(
            arts.read("eval", r.fingerprint, "protocol.json")
        )
        for r in results
    }
    markdown = results_markdown(rows, paper_model, protocols)
    fp = hash_obj({"evals": [r.fingerprint for r in results], "paper": paper_model, "history": history})
    if not arts.is_committed("reports", fp):
        files = {
            "results.json": json.dumps(rows, indent=1).encode(),
            "results.md": markdown.encode(),
            "scores.png": png(score_bars(results)),
        }
        if history:
            files["loss.png"] = png(loss_curve(history))
        arts.put_files("reports", fp, files, meta={"model": model_fp})
    arts.set_latest(model_fp, "reports", fp)
    return arts.url("reports", fp), markdown


COLOURS = {"baseline": (120, 120, 120), "sdrpn": (30, 140, 60), "vicrop": (60, 90, 200), "oracle": (200, 140, 30)}


def score_bars(results: list[EvalRef], height: int = 220) -> Image.Image:
    """Per benchmark, a bar per method (score in %, labelled), methods in the evaluation's order."""
    font = None
    groups = [(r.benchmark, [(s["method"], float(s["score"])) for s in r.scores]) for r in results]
    bar, gap = 26, 30
    width = 20 + sum(len(g) * bar + gap for _, g in groups)
    canvas = Image.new("RGB", (max(width, 260), height + 60), "white")
    draw = ImageDraw.Draw(canvas)
    x, base = 20, height + 10
    for bench, bars in groups:
        for method, score_ in bars:
            top = base - round(height * max(0.0, min(score_, 100.0)) / 100)
            draw.rectangle([x, top, x + bar - 4, base], fill=COLOURS.get(method, (150, 80, 150)))
            draw.text((x, top - 12), f"{score_:.0f}", fill="black", font=font)
            draw.text((x, base + 4), method[:4], fill="black", font=font)
            x += bar
        draw.text((x - len(bars) * bar, base + 20), bench, fill="black", font=font)
        x += gap
    draw.line([(14, base), (canvas.width - 6, base)], fill="black")
    return canvas


def loss_curve(history: list[dict], size: tuple[int, int] = (480, 240)) -> Image.Image:
    """Training loss per optimizer step (a line, min and max labelled)."""
    losses = [float(h["loss"]) for h in history]
    w, h = size
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    lo, hi = min(losses), max(losses)
    span = hi - lo or 1.0
    pad = 30
    points = [
        (pad + (w - 2 * pad) * i / max(1, len(losses) - 1), h - pad - (h - 2 * pad) * (v - lo) / span)
        for i, v in enumerate(losses)
    ]
    draw.line([(pad, h - pad), (w - pad, h - pad)], fill="black")
    draw.line([(pad, pad), (pad, h - pad)], fill="black")
    if len(points) > 1:
        draw.line(points, fill=(30, 140, 60), width=2)
    draw.text((pad + 4, 6), f"loss per step: {losses[0]:.4f} -> {losses[-1]:.4f} ({len(losses)} steps)", fill="black")
    draw.text((2, pad - 6), f"{hi:.3f}", fill="black")
    draw.text((2, h - pad - 6), f"{lo:.3f}", fill="black")
    return canvas


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _pairs(predictions: list[dict]) -> list[tuple[dict, dict]]:
    """(SD-RPN row, baseline row) per sample evaluated by both, in prediction order."""
    by_sample: dict[str, dict[str, dict]] = {}
    for r in predictions:
        if not r["error"]:
            by_sample.setdefault(r["sample_id"], {})[r["method"]] = r
    return [(m["sdrpn"], m["baseline"]) for m in by_sample.values() if "sdrpn" in m and "baseline" in m]


def _picked(predictions: list[dict], n: int) -> list[tuple[str, dict, dict]]:
    """The samples where SD-RPN beat the baseline most, then those where it lost most (ties when neither)."""
    pairs = sorted(_pairs(predictions), key=lambda p: p[0]["score"] - p[1]["score"])
    wins = [p for p in reversed(pairs) if p[0]["score"] > p[1]["score"]][: max(1, n // 2)]
    losses = [p for p in pairs if p[0]["score"] < p[1]["score"]][: max(1, n - len(wins))]
    picked = [("win", *p) for p in wins] + [("loss", *p) for p in losses]
    return picked or [("tie", *p) for p in _pairs(predictions)[:n]]


def gallery(
    predictions: list[dict], manifest: dict[str, dict], n: int, padded: bool, tile: int = 224
) -> Image.Image | None:
    """RoI overlays (the RPN's map, the crop boxes) with the question and both answers, for the largest SD-RPN wins
    then losses; None when no sample was answered by both. An image that no longer reads is left out."""
    tiles = []
    for kind, sd, base in _picked(predictions, n):
        try:
            image = load_image(manifest[sd["sample_id"]]["image"])
        except (BadSample, KeyError):
            continue
        prob = np.asarray(sd["roi_map"], dtype=np.float32).reshape(sd["roi_grid"]) if sd.get("roi_map") else None
        boxes = [tuple(b) for b in json.loads(sd["roi"])] if sd["roi"] else []
        tiles.append((kind, sd, base, roi_overlay(image, prob, boxes, padded=padded)))
    if not tiles:
        return None
    cols = max(1, min(3, len(tiles)))
    canvas = Image.new("RGB", (cols * tile, -(-len(tiles) // cols) * (tile + 44)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (kind, sd, base, img) in enumerate(tiles):
        img.thumbnail((tile, tile))
        x, y = (i % cols) * tile, (i // cols) * (tile + 44)
        canvas.paste(img, (x, y))
        draw.text((x + 2, y + tile + 2), f"{kind}: {manifest[sd['sample_id']]['question'][:34]}", fill="black")
        draw.text((x + 2, y + tile + 15), f"sdrpn {sd['prediction'][:16]!r} ({sd['score']:.2f})", fill="darkgreen")
        draw.text((x + 2, y + tile + 28), f"base {base['prediction'][:16]!r} ({base['score']:.2f})", fill="darkred")
    return canvas


CALIBRATION_PICTURE = "![calibration curve](calibration.png)"  # beside report.md in the store


def calibration_markdown(calibration: dict) -> list[str]:
    """The lines saying how τ and the mode were chosen (`eval.threshold: auto`), with the curve's picture."""
    chosen = calibration["chosen"]
    return [
        f"SD-RPN's τ {chosen['threshold']} and mode {chosen['mode']} were chosen by calibration on "
        f"{calibration['samples']} samples: {calibration['split']} ({chosen['reason']}; "
        f"ids hash {calibration['sample_ids_hash'][:12]}). Score and throughput per τ:",
        "",
        CALIBRATION_PICTURE,
        "",
    ]


def eval_report_markdown(
    bench: Benchmark, dataset: DatasetRef, scores: list[dict], calibration: dict | None = None
) -> str:
    """One benchmark's score table: a row per method with sub-scores, samples/s and relative throughput (and how
    SD-RPN's τ was calibrated, when it was)."""
    subs = [k for k in dict.fromkeys(k for s in scores for k in s) if k not in _NOT_SUBSCORES]
    head = "| method | score | " + " | ".join(subs) + (" | " if subs else "") + "samples/s | relative throughput |"
    lines = [f"## {bench.name} ({dataset.rows} samples, {dataset.rejected} rejected rows)", ""]
    notes = [f"> **Warning:** {w}" for w in dataset.warnings]
    if bench.notes:
        notes.append(f"> Differs from the harness: {bench.notes}")
    lines += [*notes, *([""] if notes else []), *(calibration_markdown(calibration) if calibration else [])]
    lines += [head, "|" + "---|" * (4 + len(subs))]
    for s in scores:
        rel = f"{s['relative_throughput']:.2f}×" if s.get("relative_throughput") else "–"
        cells = " | ".join(f"{s.get(k, float('nan')):.1f}" for k in subs)
        lines.append(
            f"| {s['method']} | {s['score']:.1f} | {cells}{' | ' if subs else ''}{s['samples_per_s']:.2f} | {rel} |"
        )
    return "\n".join(lines) + "\n"


_NOT_SUBSCORES = {"benchmark", "method", "score", "samples", "samples_per_s", "relative_throughput"}
