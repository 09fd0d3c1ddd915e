"""Peak memory of the labels stage as the number of teacher rows grows: it must stream the teacher shards, so
the peak should stay flat (goal: the larger run within 1.5× the smaller).

For each size, synthetic teacher rows of a 24×24 grid (LLaVA-1.5's 576 image tokens: grounding and sink maps)
are committed to a temporary local store in shards of 2,000 rows (`--shard-rows`), with a manifest of the same
samples; then a fresh process runs `stages.labels.denoise` over them and reports its peak RSS above the RSS it
had just before (imports done). Each size runs three times in fresh processes (median reported: single peaks move
by tens of MiB with the allocators' arenas). `--warm-up-shards N` first runs the stage over N other shards in the
same process, to see the working set without the allocators' ramp-up.

    python benchmarks/labels_memory.py [--quick] [--sizes 10000,100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._cli import parser  # noqa: E402

# the keys of the last line, `RESULT key=value …` (checked by tests/test_benchmark_scripts.py)
RESULT_KEYS = ("labels_peak_mib_*", "labels_peak_mib_*", "peak_ratio")

SHARD_ROWS = 2_000
CELLS = 576


def _teacher_shard(start: int, n: int, rng):
    import numpy as np
    import pyarrow as pa

    from storage.labels import TEACHER_SCHEMA

    def lists(values):
        offsets = pa.array(np.arange(0, n * CELLS + 1, CELLS, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.float32()))

    grounding = rng.random((n, CELLS)) ** 6 * 0.01
    grounding[np.arange(n), rng.integers(0, CELLS, n)] += 0.05  # one clear peak per map
    cols = {
        "sample_key": pa.array([f"{i:016x}" for i in range(start, start + n)]),
        "sample_id": pa.array([f"gqa-{i:08d}" for i in range(start, start + n)]),
        "image": pa.array([f"/data/gqa/images/{i:08d}.jpg" for i in range(start, start + n)]),
        "question": pa.array(["Is the man to the left or to the right of the bus?"] * n),
        "answer": pa.array(["left"] * n),
        "grid_h": pa.array(np.full(n, 24, np.int16)),
        "grid_w": pa.array(np.full(n, 24, np.int16)),
        "image_w": pa.array(np.full(n, 640, np.int32)),
        "image_h": pa.array(np.full(n, 480, np.int32)),
        "n_steps": pa.array(np.full(n, 2, np.int16)),
        "grounding": lists(grounding.astype(np.float32)),
        "sink": lists((rng.random((n, CELLS)) * 2e-3).astype(np.float32)),
        "image_hidden_norms": pa.nulls(n, pa.list_(pa.float32())),
    }
    return pa.Table.from_pydict(cols, schema=TEACHER_SCHEMA)


def prepare(root: str, rows: int, teacher_fp: str = "teacherfp0000000", shard_rows: int = SHARD_ROWS) -> dict:
    """Teacher rows + manifest in a store at `root`; returns what the measuring process needs."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.data import MANIFEST_SCHEMA
    from storage.artifacts import ArtifactStore
    from storage.labels import teacher_dataset
    from storage.store import Store

    store = Store(root)
    rng = np.random.default_rng(0)
    ds = teacher_dataset(store, teacher_fp)
    for start in range(0, rows, shard_rows):
        ds.write(_teacher_shard(start, min(shard_rows, rows - start), rng), skip_committed=False)
    given = {
        "sample_id": [f"gqa-{i:08d}" for i in range(rows)],
        "sample_key": [f"{i:016x}" for i in range(rows)],
        "image": [f"/data/gqa/images/{i:08d}.jpg" for i in range(rows)],
        "question": ["Is the man to the left or to the right of the bus?"] * rows,
        "answers": [["left"]] * rows,
        "domain": ["default"] * rows,
    }
    # every other manifest field as the samples stage writes it when unused ("" or null), so a field added to the
    # schema does not break this script
    empty = {f.name: [""] * rows if pa.types.is_string(f.type) else pa.nulls(rows, f.type) for f in MANIFEST_SCHEMA}
    manifest = pa.table({**empty, **given}, schema=MANIFEST_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(manifest, buf)
    ArtifactStore(store).put_files("datasets", f"bench{rows:011d}", {"manifest.parquet": buf.getvalue()})
    return {"root": root, "dataset": f"bench{rows:011d}", "rows": rows, "teacher": teacher_fp}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(job: dict) -> dict:
    """Run in a fresh process: the labels stage over the prepared store; peak RSS above the start. A warm-up run
    over other shards first (`warm_up`, optional) pays the one-off costs (lazy imports, allocator arenas)."""
    import resource

    from sdrpn_core.pseudo_labels import LabelParams
    from stages.labels import denoise
    from stages.refs import DatasetRef
    from storage.store import Store

    store = Store(job["root"])
    run = job["run"]  # each repeat labels into its own fingerprint: a finished label set would be a cache hit
    if warm := job.get("warm_up"):
        denoise(store, DatasetRef(warm["dataset"], "", warm["rows"]), warm["teacher"], LabelParams(), f"warm{run:012d}")
    dataset = DatasetRef(job["dataset"], "", job["rows"])
    start = _rss_mib()
    t0 = time.perf_counter()
    ref = denoise(store, dataset, job["teacher"], LabelParams(), f"labels{run:010d}")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    assert ref.rows == job["rows"], (ref.rows, job["rows"])
    return {"rows": job["rows"], "peak_above_start_mib": peak - start, "start_mib": start, "seconds": seconds}


def main() -> None:
    p = parser(__doc__, "2K and 20K rows in shards of 500 (under a minute)")
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--shard-rows", type=int, default=SHARD_ROWS, help="teacher rows per committed shard")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per size; the median is reported")
    p.add_argument("--warm-up-shards", type=int, default=0, help="shards labelled first, outside the measurement")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the child process's job (JSON)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    sizes = [2_000, 20_000] if args.quick else [200, 400] if args.smoke else [int(v) for v in args.sizes.split(",")]
    shard_rows = 500 if args.quick else 100 if args.smoke else args.shard_rows
    if args.smoke:
        args.repeats = 1
    results = []
    for rows in sizes:
        with tempfile.TemporaryDirectory() as d:
            job = prepare(d, rows, shard_rows=shard_rows)
            if args.warm_up_shards:
                job["warm_up"] = prepare(d, args.warm_up_shards * shard_rows, "teacherwarm00000", shard_rows)
            runs = []
            for run in range(args.repeats):  # RSS peaks move by ±20 MiB run to run (allocator arenas): the median
                out = subprocess.run(
                    [sys.executable, __file__, "--measure", json.dumps({**job, "run": run})],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        runs.sort(key=lambda r: r["peak_above_start_mib"])
        r = runs[len(runs) // 2]
        results.append(r)
        each = ", ".join(f"{x['peak_above_start_mib']:.0f}" for x in runs)
        print(
            f"{rows:>7} teacher rows: labels stage peak {r['peak_above_start_mib']:7.1f} MiB above start (median of "
            f"{len(runs)}: {each}; {r['start_mib']:.0f} MiB at start), {r['seconds']:.1f} s "
            f"({rows / r['seconds']:.0f} rows/s)"
        )
    small, large = results[0], results[-1]
    ratio = large["peak_above_start_mib"] / max(small["peak_above_start_mib"], 1e-9)
    print(f"{large['rows'] // small['rows']}× the rows → {ratio:.2f}× the peak (goal ≤ 1.5×)")
    tag = {2_000: "2k", 20_000: "20k", 10_000: "10k", 100_000: "100k"}
    keys = [f"labels_peak_mib_{tag.get(r['rows'], str(r['rows']))}={r['peak_above_start_mib']:.1f}" for r in results]
    print(f"RESULT {' '.join(keys)} peak_ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
