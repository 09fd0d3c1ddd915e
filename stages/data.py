"""The `samples` stage: a dataset spec → a verified manifest artifact `<root>/datasets/<fp>/` with per-row content
keys (`sample_key`: question + image bytes), which key the teacher rows.

Everything a dataset names is untrusted input (a manifest may sit in the shared store): each row is validated
(types, UTF-8, a unique id), its image must lie under one of the dataset's image roots (the manifest's or
benchmark's folder, the spec's `image_roots`, the store), and a row that fails is quarantined with its
`file:line` and the reason, never silently dropped. Only a failure to reach a file (S3 5xx, timeouts) fails the
stage, so a rerun gets the sample back.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from sdrpn_core.benchmarks import get_benchmark
from sdrpn_core.data import Rejection
from stages.code import BENCHMARK_CODE, code_fingerprint
from stages.common import Stage, cache_dir
from stages.config import DatasetSpec, is_local
from stages.refs import DatasetRef
from storage.artifacts import ArtifactStore
from storage.fingerprint import dataset_fingerprint, hash_obj, uri_sha256
from storage.records import ManifestLine
from storage.store import Store

log = logging.getLogger(__name__)

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
        ("meta", pa.string()),  # JSON {field: value} the benchmark's metric reads, else ""
    ]
)
REJECTION_SCHEMA = pa.schema([("sample_id", pa.string()), ("reason", pa.string())])


# -- image locations ---------------------------------------------------------------------------------------------


def _normal(uri: str) -> str:
    """A canonical form to compare locations: real local paths (symlinks and `..` resolved), normalised URLs."""
    if is_local(uri):
        return os.path.realpath(uri.removeprefix("file://"))
    scheme, rest = uri.split("://", 1)
    return f"{scheme.lower()}://{posixpath.normpath('/' + rest).lstrip('/')}"


def _folder_of(path: str, **storage_options) -> str:
    """The folder a dataset path stands for: itself if it is a folder, the part before any glob, else its parent."""
    for i, ch in enumerate(path):
        if ch in "*?[":
            return path[:i].rsplit("/", 1)[0] or "/"
    fs, p = fsspec.core.url_to_fs(path, **storage_options)
    return path if fs.isdir(p) else path.rstrip("/").rsplit("/", 1)[0] or "/"


def image_roots(spec: DatasetSpec, store: Store) -> list[str]:
    """Where this dataset's images may be read from: its own folder, the roots it names, and the store."""
    roots = [store.url()]
    if spec.path:
        roots.append(_folder_of(spec.path, **_options(spec.path, store)))
    roots += [r for r in (spec.images, *spec.image_roots) if r]
    return sorted({_normal(r) for r in roots})


def location_problem(uri: str, roots: list[str], allow_http: bool) -> str | None:
    """Why `uri` may not be read (None: it may): outside every root, or http(s) while that is off."""
    if uri.startswith(("http://", "https://")) and not allow_http:
        return (
            f"http(s) images are off for this dataset ({uri}); set allow_http: true and add the URL prefix to "
            "image_roots"
        )
    where = _normal(uri)
    sep = os.sep if is_local(uri) else "/"
    if any(where == r or where.startswith(r.rstrip(sep) + sep) for r in roots):
        return None
    return f"image {uri} is outside the dataset's image roots {roots}; add its folder to image_roots if it is trusted"


# -- JSONL manifests -----------------------------------------------------------------------------------------------


def _jsonl_row(raw: object, base: str) -> dict:
    """One manifest object → a manifest row (`storage.records.ManifestLine`); ValueError naming the bad field."""
    line = ManifestLine.parse(raw)
    image = line.image
    if is_local(image) and not Path(image.removeprefix("file://")).is_absolute():
        image = f"{base}/{image}"
    return {
        "image": image,
        "question": line.question,
        "answers": line.answers,
        "box": line.box,
        "domain": line.domain or "default",
        "category": line.category,
        "options": json.dumps(line.options) if line.options else "",
    }


def _row_id(raw: object, line: int, text: str) -> str:
    """The row's id; rows without one get `line<N>-<content hash>`, stable while the line's content is."""
    value = raw.get("id", raw.get("sample_id")) if isinstance(raw, dict) else None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        return f"line{line}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return str(value)


def manifest_files(url: str, **storage_options) -> list[str]:
    """The JSONL manifests `url` names, in name order: one file, a folder (every `*.jsonl` in it) or a glob, local or
    on any fsspec store. New training data arrives as new files beside the old ones; a run takes all present."""
    fs, path = url_to_fs(url, **storage_options)
    if any(c in path for c in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = fs.glob(path.rstrip("/") + "/*.jsonl")
    else:
        return [url]
    files = sorted(p for p in found if not fs.isdir(p))
    if not files:
        raise FileNotFoundError(f"no JSONL manifest in {url} (a folder is read for *.jsonl files)")
    return files if is_local(url) else [fs.unstrip_protocol(p) for p in files]


def read_jsonl_manifests(url: str, **storage_options) -> tuple[list[dict], list[Rejection]]:
    """Every manifest `url` names (`manifest_files`), as one: an id repeated in a later file is a rejection naming
    where it was first (the first file, in name order, wins)."""
    rows, rejected, first = [], [], {}
    for file in manifest_files(url, **storage_options):
        some, bad = read_jsonl_manifest(file, **storage_options)
        rejected += bad
        for row in some:
            sid = row["sample_id"]
            if sid in first:
                rejected.append(Rejection(sid, f"{row['where']}: duplicate id {sid!r} (first at {first[sid]})"))
                continue
            first[sid] = row["where"]
            rows.append(row)
    return rows, rejected


def read_jsonl_manifest(url: str, **storage_options) -> tuple[list[dict], list[Rejection]]:
    """A JSONL manifest (any fsspec URL) → (rows, rejections). A bad line (not JSON, not UTF-8, a wrong-typed
    field, a repeated id) is a rejection with `file:line` and the reason; images resolve from the file's folder."""
    with fsspec.open(url, "rb", **storage_options) as f:
        data = f.read()
    base = url.rstrip("/").rsplit("/", 1)[0] if "/" in url else "."
    if is_local(base):
        base = os.path.abspath(base.removeprefix("file://"))
    name = url.rsplit("/", 1)[-1]
    rows, rejected, first_line = [], [], {}
    for n, raw_line in enumerate(data.split(b"\n"), 1):
        where = f"{name}:{n}"
        try:
            text = raw_line.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            rejected.append(Rejection(where, f"{where}: not UTF-8 text ({e.reason} at byte {e.start})"))
            continue
        if not text:
            continue
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            rejected.append(Rejection(where, f"{where}: not a JSON line ({e.msg})"))
            continue
        sid = _row_id(raw, n, text)
        if sid in first_line:
            rejected.append(Rejection(sid, f"{where}: duplicate id {sid!r} (first at line {first_line[sid]})"))
            continue
        try:
            row = _jsonl_row(raw, base)
        except ValueError as e:
            rejected.append(Rejection(sid, f"{where}: bad row: {e}"))
            continue
        first_line[sid] = n
        rows.append({"sample_id": sid, **row, "where": where})
    return rows, rejected


# -- sources ---------------------------------------------------------------------------------------------------


def _synthetic_folder(spec: DatasetSpec) -> str:
    held = {"holdout", "holdout_seed", "part"}  # one side or the other of the same scenes
    return f"datasets/synthetic/{hash_obj(spec.model_dump(exclude={'limit', 'path', 'kind', 'inputs', *held}))}"


def _synthetic_rows(spec: DatasetSpec, store: Store) -> list[dict]:
    """Generate the scenes once into the store (so any worker can read them), keyed by the spec."""
    from sdrpn_core.synthetic import make_split

    folder = _synthetic_folder(spec)
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


def _benchmark_rows(spec: DatasetSpec, store: Store) -> tuple[list[dict], list[Rejection], list[str]]:
    """A benchmark's samples, streamed from its files: embedded images are written once into the store,
    content-addressed; a repeated id is a rejection naming the first row that had it. Also returns warnings (a
    count that differs from the published size of the split)."""
    bench = get_benchmark(spec.benchmark or "")
    kwargs: dict = {"images": spec.images} if spec.images else {}
    kwargs.update({k: v for k, v in (("split", spec.split), ("config", spec.config)) if v is not None})
    if bench.seeded_subset:
        kwargs.update({"limit": spec.limit, "seed": spec.seed if spec.seed else 42})
    kwargs.update(_options(spec.path or "", store))
    samples, rejected = bench.reader(spec.path, **kwargs)
    rows, first = [], {}
    for n, s in enumerate(samples):
        if s.sample_id in first:
            rejected.append(Rejection(s.sample_id, f"row {n}: duplicate id (first at row {first[s.sample_id]})"))
            continue
        first[s.sample_id] = n
        rows.append(_benchmark_row(s, store))
    warnings = []
    expected = bench.published_rows if not (spec.split or spec.config) else None
    if expected and not spec.limit and len(rows) != expected:
        warnings.append(
            f"{bench.name}: read {len(rows)} rows ({len(rejected)} rejected) from {spec.path}, but the published "
            f"{bench.split} split has {expected}: the score is not comparable with the paper's"
        )
        log.warning("%s", warnings[-1])
    return rows, list(rejected), warnings


def _benchmark_row(s, store: Store) -> dict:
    image = s.image
    if isinstance(image, bytes):
        digest = hashlib.sha256(image).hexdigest()
        name = f"{digest[:2]}/{digest}.img"
        if not store.exists("datasets", "images", name):
            store.write_bytes(image, "datasets", "images", name)
        image = store.url("datasets", "images", name)
    return {
        "sample_id": s.sample_id,
        "image": image,
        "question": s.question,
        "answers": list(s.answers),
        "box": list(s.box) if s.box else None,
        "domain": "default",
        "category": s.category,
        "options": json.dumps([list(o) for o in s.options]) if s.options else "",
        "meta": json.dumps(dict(s.meta)) if s.meta else "",
    }


def _source_rows(spec: DatasetSpec, store: Store) -> tuple[list[dict], list[Rejection], str, list[str]]:
    if spec.kind == "jsonl":
        if not spec.path:
            raise ValueError("dataset.path is required for kind 'jsonl'")
        rows, rejected = read_jsonl_manifests(spec.path, **_options(spec.path, store))
        return rows, rejected, _name(spec.path), []
    if spec.kind == "benchmark":
        if not spec.path or not spec.benchmark:
            raise ValueError("dataset.benchmark and dataset.path are required for kind 'benchmark'")
        rows, rejected, warnings = _benchmark_rows(spec, store)
        return rows, rejected, spec.benchmark, warnings
    return _synthetic_rows(spec, store), [], f"synthetic-{spec.variant}-{spec.seed}", []


def _name(path: str) -> str:
    """A JSONL dataset's name: the folder holding its manifest (or manifests: a folder, a glob's folder)."""
    folder = path.rstrip("/")
    last = folder.rsplit("/", 1)[-1]
    if (last.endswith(".jsonl") or any(c in last for c in "*?[")) and "/" in folder:
        folder = folder.rsplit("/", 1)[0]
    return folder.rsplit("/", 1)[-1]


def _options(url: str, store: Store) -> dict:
    return store.options if url.startswith(("s3://", "s3a://")) else {}


def _keyed(rows: list[dict], spec: DatasetSpec, store: Store) -> tuple[list[tuple[dict, str]], list[Rejection]]:
    """Rows whose image may be read and exists get their content key (returned with the image's sha256); the
    others become rejections. Reading
    the image happens only after the location check (a manifest cannot make us open /etc/passwd)."""
    roots = image_roots(spec, store)
    kept, rejected = [], []
    for r in rows:
        where = r.pop("where", "")  # the source line, for reasons only: not part of the row's content
        problem = location_problem(r["image"], roots, spec.allow_http)
        if problem is None:
            try:
                image_hash = uri_sha256(r["image"], **_options(r["image"], store))
            except FileNotFoundError:
                problem = f"image not found: {r['image']}"
            except IsADirectoryError:
                problem = f"image is a folder, not a file: {r['image']}"
        if problem is not None:
            rejected.append(Rejection(r["sample_id"], f"{where}: {problem}" if where else problem))
            continue
        r["sample_key"] = hash_obj({"question": r["question"], "image": image_hash, "domain": r["domain"]})
        kept.append((r, image_hash))
    return kept, rejected


def _parquet(rows: list[dict], schema: pa.Schema) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()


def _synthetic_key(spec: DatasetSpec, store: Store) -> Path:
    """Where this machine remembers which manifest a synthetic spec built on a store: the scenes are a pure function
    of the spec and the code, so a rerun need not regenerate (and hash) them to find its fingerprint. Kept in the
    local cache, not the shared store, so nobody else's write can redirect a spec to other data."""
    code = code_fingerprint(("stages.data", "sdrpn_core.synthetic"), exclude=BENCHMARK_CODE)
    key = hash_obj({"spec": spec.model_dump(), "code": code, "store": store.url("")})
    return cache_dir("datasets-by-spec") / f"{key}.json"


def _known_synthetic(spec: DatasetSpec, store: Store) -> DatasetRef | None:
    try:
        fp = json.loads(_synthetic_key(spec, store).read_text())["dataset"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    arts = ArtifactStore(store)
    manifest = arts.verify("datasets", fp) if isinstance(fp, str) and fp.isalnum() else None
    meta = (manifest or {}).get("meta", {})
    if not isinstance(meta.get("rows"), int) or not isinstance(meta.get("rejected"), int):
        return None
    if len(store.ls(_synthetic_folder(spec), "images")) < meta["rows"]:  # scenes deleted since: build them again
        return None
    url = arts.url("datasets", fp, "manifest.parquet")
    return DatasetRef(fp, url, meta["rows"], str(meta.get("name", "")), spec.scored_as, meta["rejected"])


def build_manifest(spec: DatasetSpec, store: Store) -> DatasetRef:
    if spec.kind == "synthetic" and (known := _known_synthetic(spec, store)) is not None:
        return known
    ref = _build_manifest(spec, store)
    if spec.kind == "synthetic":
        _synthetic_key(spec, store).write_text(json.dumps({"dataset": ref.fingerprint}))
    return ref


def held_out(sample_id: str, share: float, seed: int) -> bool:
    """Whether a row is in the held-out share: a seeded hash of its id, so the split is the same on every machine,
    whatever the rows' order, and a row added later does not move the others."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def holdout_part(rows: list[dict], spec: DatasetSpec) -> list[dict]:
    """The side of the hold-out `spec.part` reads ("scored" or "held-out"); every row for "all"."""
    if spec.part == "all":
        return rows
    held = spec.part == "held-out"
    return [r for r in rows if held_out(str(r["sample_id"]), spec.holdout, spec.holdout_seed) == held]


def _build_manifest(spec: DatasetSpec, store: Store) -> DatasetRef:
    rows, rejected, name, warnings = _source_rows(spec, store)
    if spec.limit and not (spec.benchmark and get_benchmark(spec.benchmark).seeded_subset):
        rows = rows[: spec.limit]
    rows = holdout_part(rows, spec)
    keyed, unreadable = _keyed(rows, spec, store)
    rows = [r for r, _ in keyed]
    rejected += unreadable
    quarantine = _parquet([{"sample_id": r.sample_id, "reason": r.reason} for r in rejected], REJECTION_SCHEMA)
    if not rows:
        fp = hash_obj({"empty": spec.model_dump(), "rejected": [r.reason for r in rejected]})
        ArtifactStore(store).put_files("datasets-rejected", fp, {"quarantine.parquet": quarantine})
        first = "; ".join(r.reason for r in rejected[:3]) or "the source is empty"
        raise ValueError(
            f"dataset {name!r} has no usable rows ({len(rejected)} rejected, listed in "
            f"{store.url('datasets-rejected', fp, 'quarantine.parquet')}): {first}"
        )
    fp = dataset_fingerprint(
        [{k: v for k, v in r.items() if k != "image"} for r in rows], image_hashes=[h for _, h in keyed]
    )
    arts = ArtifactStore(store)
    if arts.verify("datasets", fp) is None:
        files = {"manifest.parquet": _parquet(rows, MANIFEST_SCHEMA), "quarantine.parquet": quarantine}
        arts.put_files("datasets", fp, files, meta={"rows": len(rows), "rejected": len(rejected), "name": name})
    return DatasetRef(
        fp,
        arts.url("datasets", fp, "manifest.parquet"),
        len(rows),
        name,
        spec.scored_as,
        len(rejected),
        tuple(warnings),
    )


SAMPLES = Stage("samples", run=build_manifest)  # the flow names each run: samples[train], samples[eval:<benchmark>]
