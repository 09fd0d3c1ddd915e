"""Peak memory of reading a large benchmark file: an HR-Bench-like Parquet (base64 images in a string column,
row groups of 100 rows as `datasets` writes them) through the samples stage (reader + images into the store),
against reading the same file whole with `pyarrow.parquet.read_table`. Each measurement runs in a fresh process
(resident size sampled every 5 ms, minus the size after imports).

    python benchmarks/read_memory.py [--quick]      # full: 800 rows x 1.5 MB (1.2 GB); quick: 200 x 0.5 MB

Ends with `RESULT file_mib=… stage_peak_mib=… whole_file_peak_mib=… peak_ratio=…` (stage / whole file).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._cli import parser  # noqa: E402

# the keys of the last line, `RESULT key=value …` (checked by tests/test_benchmark_scripts.py)
RESULT_KEYS = ("file_mib", "stage_peak_mib", "whole_file_peak_mib", "peak_ratio")

CHILD = r"""
import json, os, sys, threading, time
sys.path.insert(0, {root!r})
from stages.config import DatasetSpec
from stages.data import build_manifest
from storage.store import Store, StoreSettings
import pyarrow.parquet as pq

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

base, top, done = rss(), [0.0], threading.Event()

def sample():  # the import-time peak would hide ru_maxrss: sample the resident size instead
    while not done.is_set():
        top[0] = max(top[0], rss())
        time.sleep(0.005)

threading.Thread(target=sample, daemon=True).start()
mode, path, store_root = sys.argv[1:4]
if mode == "stage":
    spec = DatasetSpec(kind="benchmark", benchmark="hrbench4k", path=path)
    rows = build_manifest(spec, Store(StoreSettings(root=store_root))).rows
else:
    rows = pq.read_table(path).num_rows
done.set()
print(json.dumps({{"rows": rows, "peak_mib": max(top[0], rss()) - base}}))
"""


def make_file(path: Path, rows: int, image_bytes: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("index", pa.int64()), ("question", pa.string()), ("answer", pa.string()), ("category", pa.string())]
        + [(k, pa.string()) for k in "ABCD"]
        + [("cycle_category", pa.string()), ("image", pa.string())]
    )
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 100):
            batch = [
                {
                    "index": i,
                    "question": f"What colour is object {i}?",
                    "answer": "ABCD"[i % 4],
                    "category": "single" if i % 2 else "cross",
                    "A": "red",
                    "B": "blue",
                    "C": "green",
                    "D": "white",
                    "cycle_category": str(i // 4),
                    "image": base64.b64encode(os.urandom(image_bytes)).decode(),
                }
                for i in range(start, min(rows, start + 100))
            ]
            writer.write_table(pa.Table.from_pylist(batch, schema=schema), row_group_size=100)


def measure(mode: str, path: Path, store: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT)), mode, str(path), str(store)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__, "200 rows of 0.5 MB")
    args = p.parse_args()
    rows, size = (200, 512 * 1024) if args.quick else (20, 64 * 1024) if args.smoke else (800, 1536 * 1024)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hr_bench_4k.parquet"
        make_file(path, rows, size)
        file_mib = path.stat().st_size / 2**20
        stage = measure("stage", path, Path(tmp) / "store")
        whole = measure("whole", path, Path(tmp) / "store2")
    assert stage["rows"] == rows == whole["rows"]
    print(f"file: {rows} rows, {file_mib:.0f} MiB (row groups of 100)")
    print(f"samples stage (reader + images into the store): peak +{stage['peak_mib']:.0f} MiB")
    print(f"pyarrow.parquet.read_table of the whole file:   peak +{whole['peak_mib']:.0f} MiB")
    ratio = stage["peak_mib"] / whole["peak_mib"]
    print(
        f"RESULT file_mib={file_mib:.0f} stage_peak_mib={stage['peak_mib']:.0f} "
        f"whole_file_peak_mib={whole['peak_mib']:.0f} peak_ratio={ratio:.2f}"
    )


if __name__ == "__main__":
    main()
