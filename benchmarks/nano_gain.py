"""The embedded default end to end — base model → teacher labels → RPN → baseline / ViCrop / SD-RPN / oracle on
the held-out synthetic split — with the accuracies, the pipeline time, and the teacher's attention hit rate on the
asked box beside the rate of hitting another box.

    python benchmarks/nano_gain.py [--quick] [CONFIG]     # default: configs/default.yaml, a fresh temp store
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import parser, size

# the keys of the last line, `RESULT key=value …` (checked by tests/test_benchmark_scripts.py)
RESULT_KEYS = (
    "variant",
    "baseline_acc",
    "vicrop_acc",
    "sdrpn_acc",
    "oracle_acc",
    "sdrpn_relative_throughput",
    "vicrop_relative_throughput",
    "pipeline_s",
    "attention_hit",
    "random_box_rate",
)

SIZES = {
    "full": {},
    "quick": {"train_n": 64, "eval_n": 24},
    "smoke": {"train_n": 16, "eval_n": 8},
}  # the default config's split sizes


def attention_hits(cfg, store, model_ref, dataset_ref, limit: int = 60) -> dict[str, float]:
    """Share of held-out samples whose teacher map (the preset's heads) peaks in the asked box."""
    import numpy as np

    from sdrpn_core.data import Sample
    from sdrpn_core.teacher import extract_teacher_maps
    from stages.common import load_model, read_manifest

    adapter = load_model(model_ref)
    rows = [r for r in read_manifest(dataset_ref, store) if r.get("box")][:limit]
    preset = cfg.teacher.preset_obj()
    out = extract_teacher_maps(
        adapter,
        [Sample(r["sample_id"], r["image"], r["question"]) for r in rows],
        preset,
        max_new_tokens=cfg.teacher.max_new_tokens,
    )
    by_id = {r["sample_id"]: r for r in rows}
    asked = 0
    for rec in out.records:
        row = by_id[rec.sample_id]
        y, x = np.unravel_index(int(np.argmax(rec.grounding)), rec.grid)
        x0, y0, x1, y1 = adapter.pixels_to_box(tuple(row["box"]), rec.image_size, rec.grid)
        asked += x0 <= x < x1 and y0 <= y < y1
    n = max(len(out.records), 1)
    # chance of landing in one given box: its share of the grid (what a random peak would hit)
    cell_share = np.mean(
        [
            (lambda b: (b[2] - b[0]) * (b[3] - b[1]))(
                adapter.pixels_to_box(tuple(by_id[r.sample_id]["box"]), r.image_size, r.grid)
            )
            / (r.grid[0] * r.grid[1])
            for r in out.records
        ]
    )
    return {"hit_asked": asked / n, "random_box_rate": float(cell_share)}


def main() -> None:
    p = parser(__doc__, "smaller train / eval splits")
    p.add_argument("config", nargs="?")
    args = p.parse_args()
    from benchmarks._pipeline import pipeline_config, start_prefect
    from flows.pipeline import sdrpn
    from stages import data, model
    from stages.common import get_store

    start_prefect()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = pipeline_config(args.config, tmp, **SIZES[size(args)])
        t0 = time.perf_counter()
        summary = sdrpn(cfg)
        pipeline_s = time.perf_counter() - t0
        store = get_store(cfg.store.settings())
        hits = attention_hits(
            cfg, store, model.resolve_model(cfg.model, store), data.build_manifest(cfg.eval.datasets[0], store)
        )
    acc = {s["method"]: s["score"] / 100 for s in summary["scores"]}
    speed = {s["method"]: s.get("relative_throughput") or float("nan") for s in summary["scores"]}
    variant = cfg.eval.datasets[0].variant
    print(f"model={cfg.model.source} variant={variant} train={cfg.train_data.n} heldout={cfg.eval.datasets[0].n}")
    for method, value in acc.items():
        print(f"  {method:9s} accuracy {value:.3f}  throughput {speed[method]:.2f}× the baseline's")
    print(
        f"  teacher attention peak in the asked box: {hits['hit_asked']:.2f} "
        f"(a random peak would land in it {hits['random_box_rate']:.2f} of the time)"
    )
    print(
        f"RESULT variant={variant} baseline_acc={acc.get('baseline', float('nan')):.3f} "
        f"vicrop_acc={acc.get('vicrop', float('nan')):.3f} sdrpn_acc={acc.get('sdrpn', float('nan')):.3f} "
        f"oracle_acc={acc.get('oracle', float('nan')):.3f} "
        f"sdrpn_relative_throughput={speed.get('sdrpn', float('nan')):.2f} "
        f"vicrop_relative_throughput={speed.get('vicrop', float('nan')):.2f} pipeline_s={pipeline_s:.1f} "
        f"attention_hit={hits['hit_asked']:.3f} random_box_rate={hits['random_box_rate']:.3f}"
    )


if __name__ == "__main__":
    main()
