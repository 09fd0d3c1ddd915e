"""The run's results table, in the layout of the paper's Tables 1–2 (a column per benchmark, a row per method,
relative throughput), with the paper's published numbers for the same model beside ours when it reports it."""

from __future__ import annotations

import json

from sdrpn_core.benchmarks import get_benchmark
from sdrpn_core.benchmarks.published import PUBLISHED
from sdrpn_core.methods import METHODS
from stages.refs import EvalRef
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


def results_markdown(rows: list[dict], paper_model: str | None) -> str:
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if c != "method"]
    columns = ["Thru.", *[c for c in columns if c != "Thru."]]
    published = PUBLISHED.get(paper_model or "", {})
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cells.append("–" if v is None else (f"{v:.2f}×" if c == "Thru." else f"{v:.1f}"))
        lines.append(f"| {METHOD_NAMES.get(r['method'], r['method'])} (ours) | " + " | ".join(cells) + " |")
    for method, values in published.items():
        cells = [
            ("–" if values.get(c) is None else (f"{values[c]:.2f}×" if c == "Thru." else f"{values[c]:.1f}"))
            for c in columns
        ]
        lines.append(f"| {METHOD_NAMES.get(method, method)} (paper, {paper_model}) | " + " | ".join(cells) + " |")
    note = (
        f"Paper rows: arXiv 2509.16944 Tables 1–2 for {paper_model}."
        if published
        else "The paper reports no numbers for this model."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


def write_results(store: Store, results: list[EvalRef], paper_model: str | None, model_fp: str) -> tuple[str, str]:
    """results.json + results.md under `<root>/reports/<fp>/`; returns (URL, markdown)."""
    rows = results_rows(results)
    markdown = results_markdown(rows, paper_model)
    fp = hash_obj({"evals": [r.fingerprint for r in results], "paper": paper_model})
    arts = ArtifactStore(store)
    if not arts.is_committed("reports", fp):
        arts.put_files(
            "reports",
            fp,
            {"results.json": json.dumps(rows, indent=1).encode(), "results.md": markdown.encode()},
            meta={"model": model_fp},
        )
    arts.set_latest(model_fp, "reports", fp)
    return arts.url("reports", fp), markdown
