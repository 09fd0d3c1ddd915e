"""The `samples` stage: a dataset spec → a manifest Parquet under `<root>/datasets/<fp>/` with per-row content
keys (`sample_key`: question + image bytes), which key the teacher rows."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.config import DatasetSpec
from stages.refs import DatasetRef
from storage.fingerprint import dataset_fingerprint, hash_obj, uri_sha256
from storage.store import Store

MANIFEST_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("sample_key", pa.string()),
        ("image", pa.string()),
        ("question", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("box", pa.list_(pa.int32())),
        ("domain", pa.string()),
        ("category", pa.string()),
        ("options", pa.string()),  # JSON [[letter, text], …] for multiple choice, else ""
    ]
)


def read_jsonl_manifest(path: str) -> list[dict]:
    base = Path(path).parent
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            image = str(raw["image"])
            if "://" not in image and not Path(image).is_absolute():
                image = str((base / image).resolve())
            rows.append(
                {
                    "sample_id": str(raw.get("id", raw.get("sample_id"))),
                    "image": image,
                    "question": str(raw["question"]),
                    "answers": [str(a) for a in raw.get("answers", [])],
                    "box": [int(v) for v in raw["box"]] if raw.get("box") else None,
                    "domain": str(raw.get("domain", "default")),
                    "category": str(raw.get("category", "")),
                    "options": json.dumps(raw["options"]) if raw.get("options") else "",
                }
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: bad manifest line ({type(e).__name__}: {e})") from None
    return rows


def _synthetic_rows(spec: DatasetSpec, store: Store) -> list[dict]:
    """Generate the scenes once into the store (so any worker can read them), keyed by the spec."""
    from sdrpn_core.synthetic import make_split

    folder = f"datasets/synthetic/{hash_obj(spec.model_dump(exclude={'limit', 'path', 'kind'}))}"
    samples = make_split(spec.n, spec.seed, canvas=spec.canvas, variant=spec.variant)
    rows = []
    for s in samples:
        name = f"images/{s.sample_id}.png"
        if not store.exists(folder, name):
            buf = io.BytesIO()
            s.image.save(buf, format="PNG")
            store.write_bytes(buf.getvalue(), folder, name)
        rows.append(
            {
                "sample_id": s.sample_id,
                "image": store.url(folder, name),
                "question": s.question,
                "answers": [s.answer],
                "box": list(s.box),
                "domain": "default",
                "category": spec.variant,
                "options": "",
            }
        )
    return rows


def _benchmark_rows(spec: DatasetSpec, store: Store) -> tuple[list[dict], list]:
    """A benchmark's samples; embedded images are written once into the store, content-addressed."""
    import hashlib

    from sdrpn_core.benchmarks import get_benchmark

    bench = get_benchmark(spec.benchmark or "")
    kwargs = {"images": spec.images} if spec.images else {}
    if bench.name == "mix665k":
        kwargs.update({"limit": spec.limit, "seed": spec.seed if spec.seed else 42})
    samples, rejected = bench.reader(spec.path, **kwargs)
    rows = []
    for s in samples:
        image = s.image
        if isinstance(image, bytes):
            digest = hashlib.sha256(image).hexdigest()
            name = f"{digest[:2]}/{digest}.img"
            if not store.exists("datasets", "images", name):
                store.write_bytes(image, "datasets", "images", name)
            image = store.url("datasets", "images", name)
        rows.append(
            {
                "sample_id": s.sample_id,
                "image": image,
                "question": s.question,
                "answers": list(s.answers),
                "box": list(s.box) if s.box else None,
                "domain": "default",
                "category": s.category,
                "options": json.dumps([list(o) for o in s.options]) if s.options else "",
            }
        )
    return rows, rejected


def build_manifest(spec: DatasetSpec, store: Store) -> DatasetRef:
    rejected: list = []
    benchmark = spec.benchmark or "synthetic"
    if spec.kind == "jsonl":
        if not spec.path:
            raise ValueError("dataset.path is required for kind 'jsonl'")
        rows, name = read_jsonl_manifest(spec.path), Path(spec.path).parent.name
    elif spec.kind == "benchmark":
        if not spec.path or not spec.benchmark:
            raise ValueError("dataset.benchmark and dataset.path are required for kind 'benchmark'")
        rows, rejected = _benchmark_rows(spec, store)
        name = spec.benchmark
    else:
        rows, name = _synthetic_rows(spec, store), f"synthetic-{spec.variant}-{spec.seed}"
    if spec.limit and spec.benchmark != "mix665k":
        rows = rows[: spec.limit]
    if not rows:
        raise ValueError(f"dataset {name!r} has no rows")
    opts = store.options
    for r in rows:
        try:
            image_hash = uri_sha256(r["image"], **opts)
        except FileNotFoundError:
            image_hash = f"missing:{r['image']}"  # the teacher will reject it with a reason
        r["sample_key"] = hash_obj({"question": r["question"], "image": image_hash, "domain": r["domain"]})
    fp = dataset_fingerprint([{k: v for k, v in r.items() if k not in ("image",)} for r in rows], image_key="image")
    if not store.exists("datasets", fp, "manifest.parquet"):
        if rejected:
            buf = io.BytesIO()
            pq.write_table(
                pa.Table.from_pylist([{"sample_id": r.sample_id, "reason": r.reason} for r in rejected]), buf
            )
            store.write_bytes(buf.getvalue(), "datasets", fp, "quarantine.parquet")
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), buf)
        store.write_bytes(buf.getvalue(), "datasets", fp, "manifest.parquet")
    return DatasetRef(fp, store.url("datasets", fp, "manifest.parquet"), len(rows), name, benchmark, len(rejected))


def read_manifest(ref: DatasetRef, store: Store) -> list[dict]:
    fp = ref.fingerprint
    return pq.read_table(io.BytesIO(store.read_bytes("datasets", fp, "manifest.parquet"))).to_pylist()
