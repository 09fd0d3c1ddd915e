"""Finding one split's files in the folders people download, and reading their rows a batch at a time.

A benchmark `path` may be: the repository folder from `snapshot_download` (several configs side by side, e.g.
`DocVQA/` and `InfographicVQA/`), a config folder, the auto-converted Parquet layout (`<config>/<split>/0000.parquet`),
one file, or a glob of a split's shards. The split and config come from the benchmark (the ones the paper
evaluates) unless the reader is given `split=` / `config=`."""

from __future__ import annotations

import base64
import binascii
import csv
import json
import sys
from collections.abc import Iterator, Sequence

import fsspec
import pyarrow.parquet as pq

PARQUET_BATCH = 32  # rows per batch: images held at once while reading (a file's row group is read whole)
KNOWN_FORMATS = (".parquet", ".tsv", ".jsonl", ".json")


def _patterns(split: str, config: str) -> list[tuple[str, ...]]:
    """Relative globs tried in order under a folder; the first that matches anything is the split."""
    out: list[tuple[str, ...]] = []
    if config:
        out += [
            (f"{config}/{split}-*.parquet",),
            (f"{config}/{split}/*.parquet",),
            (f"{config}/partial-{split}/*.parquet",),
        ]
    out += [
        (f"data/{split}-*.parquet",),
        (f"{split}-*.parquet",),
        (f"{split}/*.parquet",),
        (f"default/{split}/*.parquet",),
        (f"partial-{split}/*.parquet",),
    ]
    return out


def split_files(
    url: str, split: str, config: str = "", names: Sequence[tuple[str, ...]] = (), **storage_options
) -> list[str]:
    """The files of `split` (of `config`) under `url`, as fsspec URLs, sorted; `names` are the benchmark's own
    file layouts (e.g. `hr_bench_4k.parquet`), tried first. Nothing found is an error saying what is there."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    proto = url.split("://", 1)[0] + "://" if "://" in url else ""
    if any(c in path for c in "*?["):
        files = sorted(fs.glob(path))
        if not files:
            raise FileNotFoundError(f"{url}: the pattern matches no file")
        return [proto + f if proto else f for f in files]
    if fs.isfile(path):
        return [url]
    if not fs.isdir(path):
        raise FileNotFoundError(f"{url}: no such file or folder")
    root = path.rstrip("/")
    for layout in [*names, *_patterns(split, config)]:
        found = sorted({f for pattern in layout for f in fs.glob(f"{root}/{pattern}")})
        if found:
            return [proto + f if proto else f for f in found]
    present = sorted(f[len(root) + 1 :] for f in fs.find(root) if f.endswith(KNOWN_FORMATS))[:12]
    which = f"split {split!r}" + (f" of config {config!r}" if config else "")
    raise FileNotFoundError(
        f"{url}: no files for {which}; found {present or 'no data files'}. Point `path` at the split's files or "
        "set the reader's `split` / `config` options"
    )


def rows_of(files: Sequence[str], **storage_options) -> Iterator[tuple[str, dict]]:
    """(location 'file:row', row) over the files, by format; a file of another format is an error naming it."""
    for url in files:
        name = label(url, files)
        if name.endswith(".parquet"):
            yield from _parquet_rows(url, name, **storage_options)
        elif name.endswith(".tsv"):
            yield from _tsv_rows(url, name, **storage_options)
        elif name.endswith(".jsonl"):
            yield from _jsonl_rows(url, name, **storage_options)
        else:
            raise ValueError(f"{url}: unknown format (expected one of {', '.join(KNOWN_FORMATS)})")


def _parquet_rows(url: str, name: str, **storage_options) -> Iterator[tuple[str, dict]]:
    with fsspec.open(url, "rb", **storage_options) as handle:
        try:
            pf = pq.ParquetFile(handle)
        except Exception as e:  # pyarrow raises ArrowInvalid for a file that is not Parquet
            raise ValueError(f"{url}: not a Parquet file ({e})") from None
        n = 0
        # one row group per call: over a whole file, iter_batches keeps memory in proportion to the file
        for group in range(pf.num_row_groups):
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=[group], use_threads=False):
                for row in batch.to_pylist():
                    yield f"{name}:{n}", row
                    n += 1


def _tsv_rows(url: str, name: str, **storage_options) -> Iterator[tuple[str, dict]]:
    """VLMEvalKit's TSV (a header row, base64 images in a column), one line at a time."""
    csv.field_size_limit(sys.maxsize)
    with fsspec.open(url, "r", encoding="utf-8", newline="", **storage_options) as f:
        for i, row in enumerate(csv.DictReader(f, delimiter="\t")):
            yield f"{name}:{i + 2}", dict(row)


def _jsonl_rows(url: str, name: str, **storage_options) -> Iterator[tuple[str, dict]]:
    with fsspec.open(url, "r", encoding="utf-8", **storage_options) as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    row = {"_error": f"not JSON: {e}"}
                yield f"{name}:{i + 1}", row


def read_json(url: str, **storage_options):
    with fsspec.open(url, "r", encoding="utf-8", **storage_options) as f:
        return json.load(f)


def image_value(value, source: str) -> str | bytes:
    """An image cell as bytes, or a path: the `datasets` Image struct ({bytes, path}; a path alone is resolved
    beside the file `source`), raw bytes, or a base64 string (HR-Bench, VLMEvalKit). Empty when there is none."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        path = value.get("path") or ""
        if not path:
            return b""
        return path if "://" in path or path.startswith("/") else f"{source.rsplit('/', 1)[0]}/{path}"
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value:
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the image is neither base64 nor an Image struct") from None
    return b""


def label(url: str, files: Sequence[str]) -> str:
    """A file's name in row locations: its base name, with its folder where two files share one."""
    name = url.rsplit("/", 1)[-1]
    if sum(f.rsplit("/", 1)[-1] == name for f in files) > 1:
        return "/".join(url.rsplit("/", 2)[-2:])
    return name


def file_of(where: str, files: Sequence[str]) -> str:
    """The file a 'name:row' location came from (for resolving relative image paths)."""
    name = where.rsplit(":", 1)[0]
    return next((f for f in files if label(f, files) == name), files[0])


def read_split(
    url: str,
    make,
    split: str,
    config: str = "",
    names: Sequence[tuple[str, ...]] = (),
    **storage_options,
):
    """`collect` over the split's files: `make(where, row, file)` builds a sample from one row."""
    from sdrpn_core.benchmarks.base import collect

    files = split_files(url, split, config, names, **storage_options)
    return collect(lambda: rows_of(files, **storage_options), lambda w, r: make(w, r, file_of(w, files)))
