"""Write and read throughput of the label store (sharded Parquet + commit log) for label rows on local disk and
on an S3-compatible server (moto's, over HTTP on 127.0.0.1).

Rows are LLaVA-sized: 24×24 grid → grounding and sink maps (576 float32 each), labels (576 int8) and statistics.

    python benchmarks/label_store.py [--quick] [--rows 100000] [--shard-rows 10000]
"""

from __future__ import annotations

import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import parser

# the keys of the last line, `RESULT key=value …` (checked by tests/test_benchmark_scripts.py)
RESULT_KEYS = (
    "rows",
    "local_write_rows_s",
    "local_read_rows_s",
    "local_write_mb_s",
    "local_read_mb_s",
    "s3_write_rows_s",
    "s3_read_rows_s",
    "s3_write_mb_s",
    "s3_read_mb_s",
)


def label_rows(n: int, seed: int = 0):
    import numpy as np
    import pyarrow as pa

    from storage.labels import LABEL_SCHEMA

    rng = np.random.default_rng(seed)
    cells = 576

    def lists(values: np.ndarray, typ) -> pa.Array:
        offsets = pa.array(np.arange(0, n * cells + 1, cells, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=typ))

    labels = rng.choice(np.array([-100, 0, 1], dtype=np.int8), size=(n, cells), p=[0.5, 0.45, 0.05])
    cols = {
        "sample_id": pa.array([f"gqa-{i:08d}" for i in range(n)]),
        "image": pa.array([f"s3://data/gqa/images/{i:08d}.jpg" for i in range(n)]),
        "question": pa.array(["Is the man to the left or to the right of the bus?"] * n),
        "answer": pa.array(["left"] * n),
        "grid_h": pa.array(np.full(n, 24, np.int16)),
        "grid_w": pa.array(np.full(n, 24, np.int16)),
        "image_w": pa.array(rng.integers(300, 1000, n).astype(np.int32)),
        "image_h": pa.array(rng.integers(300, 1000, n).astype(np.int32)),
        "n_steps": pa.array(rng.integers(1, 8, n).astype(np.int16)),
        "grounding": lists((rng.random((n, cells)) ** 6 * 0.01).astype(np.float32), pa.float32()),
        "sink": lists((rng.random((n, cells)) * 2e-3).astype(np.float32), pa.float32()),
        "labels": lists(labels, pa.int8()),
        "num_fg": pa.array((labels == 1).sum(1).astype(np.int32)),
        "num_bg": pa.array((labels == 0).sum(1).astype(np.int32)),
        "num_ignore": pa.array((labels == -100).sum(1).astype(np.int32)),
        "num_sink": pa.array(rng.integers(0, 20, n).astype(np.int32)),
        "box": pa.ListArray.from_arrays(
            pa.array(np.arange(0, 4 * n + 1, 4, dtype=np.int32)), pa.array(rng.integers(0, 24, 4 * n).astype(np.int16))
        ),
        "valid": pa.array(rng.random(n) < 0.8),
        "reason": pa.array([""] * n),
    }
    return pa.Table.from_pydict(cols, schema=LABEL_SCHEMA)


def measure(store, table, shard_rows: int) -> dict:
    import polars as pl

    from storage.labels import label_dataset

    ds = label_dataset(store, "bench")
    mb = table.nbytes / 2**20
    t0 = time.perf_counter()
    for start in range(0, table.num_rows, shard_rows):
        ds.write(table.slice(start, shard_rows), skip_committed=False)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = label_dataset(store, "bench").read()
    read_s = time.perf_counter() - t0
    assert back.num_rows == table.num_rows
    t0 = time.perf_counter()
    valid = label_dataset(store, "bench").scan().filter(pl.col("valid")).select("sample_id", "labels").collect()
    scan_s = time.perf_counter() - t0
    return {
        "write_rows_s": table.num_rows / write_s,
        "write_mb_s": mb / write_s,
        "read_rows_s": table.num_rows / read_s,
        "read_mb_s": mb / read_s,
        "scan_valid_rows_s": table.num_rows / scan_s,
        "valid": valid.height,
        "mb": mb,
    }


def main() -> None:
    p = parser(__doc__, "10k rows")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--shard-rows", type=int, default=10_000)
    args = p.parse_args()
    if args.quick:
        args.rows, args.shard_rows = 10_000, 2_000
    if args.smoke:
        args.rows, args.shard_rows = 500, 250

    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log

    from storage.store import Store, StoreSettings

    table = label_rows(args.rows)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        results["local"] = measure(Store(StoreSettings(root=d)), table, args.shard_rows)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3fs.S3FileSystem(key="x", secret="x", client_kwargs={"endpoint_url": endpoint}).mkdir("bench")
        settings = StoreSettings(root="s3://bench/sdrpn", endpoint_url=endpoint, key="x", secret="x")
        results["moto_s3"] = measure(Store(settings), table, args.shard_rows)
    finally:
        server.stop()

    print(f"{args.rows} label rows ({results['local']['mb']:.0f} MB in memory), shards of {args.shard_rows}")
    for where, r in results.items():
        print(
            f"  {where:8s} write {r['write_rows_s']:9.0f} rows/s {r['write_mb_s']:7.1f} MB/s | "
            f"read {r['read_rows_s']:9.0f} rows/s {r['read_mb_s']:7.1f} MB/s | "
            f"lazy scan valid-only {r['scan_valid_rows_s']:9.0f} rows/s ({r['valid']} rows)"
        )
    loc, s3 = results["local"], results["moto_s3"]
    print(
        f"RESULT rows={args.rows} local_write_rows_s={loc['write_rows_s']:.0f} "
        f"local_read_rows_s={loc['read_rows_s']:.0f} "
        f"local_write_mb_s={loc['write_mb_s']:.1f} local_read_mb_s={loc['read_mb_s']:.1f} "
        f"s3_write_rows_s={s3['write_rows_s']:.0f} s3_read_rows_s={s3['read_rows_s']:.0f} "
        f"s3_write_mb_s={s3['write_mb_s']:.1f} s3_read_mb_s={s3['read_mb_s']:.1f}"
    )


if __name__ == "__main__":
    main()
