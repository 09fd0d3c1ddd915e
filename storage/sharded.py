"""A dataset of Parquet shards with an append-only commit log: the unit of crash safety and resume.

Layout under `<root>/<kind>/<fingerprint>/`:

    part-<time>-<uuid>.parquet      shards (rows of one schema)
    quarantine-<time>-<uuid>.parquet  rejected samples: sample_id, reason
    _commits/<time>-<uuid>.json     one record per committed shard: shard name, kind, row count, sample ids,
                                    schema version, writer metadata

A shard becomes visible only when its commit record exists, and the record is written after the shard, so a
crashed writer leaves nothing readers see. Commit records never overwrite each other (unique names), so two
writers on one dataset cannot lose each other's rows; a writer skips ids already committed, and readers keep the
first committed row of an id, so no reader ever sees a duplicate. A shard that is missing or unreadable is
reported by name and skipped (or raises, with `strict=True`) while the others stay readable.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from storage.store import Store, StoreError

log = logging.getLogger(__name__)

COMMITS = "_commits"


class SchemaError(ValueError):
    """Data written by a newer (or different) schema than this code reads."""


@dataclass(frozen=True)
class Commit:
    record: str
    shard: str
    kind: str  # "data" or "quarantine"
    rows: int
    ids: tuple[str, ...]
    schema_version: int
    meta: dict


def _stamp() -> str:
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


class ShardedDataset:
    def __init__(
        self, store: Store, kind: str, fingerprint: str, schema: pa.Schema, schema_version: int, key: str = "sample_id"
    ):
        """`key` is the column that identifies a row (resume skips committed keys; first commit of a key wins)."""
        self.store = store
        self.key = key
        self.quarantine_schema = pa.schema([(key, pa.string()), ("reason", pa.string())])
        self.prefix = f"{kind}/{fingerprint}"
        self.schema = schema
        self.schema_version = schema_version
        self.problems: list[str] = []
        self._strict = False

    def __repr__(self) -> str:
        return f"ShardedDataset({self.store.url(self.prefix)!r})"

    @property
    def url(self) -> str:
        return self.store.url(self.prefix)

    # -- the commit log ----------------------------------------------------------------------------------------
    def commits(self) -> list[Commit]:
        out = []
        for name in self.store.ls(self.prefix, COMMITS):
            if not name.endswith(".json"):
                continue
            raw = self.store.read_json(self.prefix, COMMITS, name)
            version = int(raw.get("schema_version", 0))
            if version > self.schema_version:
                raise SchemaError(
                    f"{self.url}: commit {name} was written with schema v{version}; this sdrpn reads up to "
                    f"v{self.schema_version} — upgrade sdrpn"
                )
            out.append(
                Commit(
                    name,
                    raw["shard"],
                    raw.get("kind", "data"),
                    raw["rows"],
                    tuple(raw["ids"]),
                    version,
                    raw.get("meta", {}),
                )
            )
        return out

    def committed_ids(self, include_quarantine: bool = True) -> set[str]:
        return {i for c in self.commits() if include_quarantine or c.kind == "data" for i in c.ids}

    def is_empty(self) -> bool:
        return not self.commits()

    # -- writing -----------------------------------------------------------------------------------------------
    def _commit(self, table: pa.Table, kind: str, meta: dict | None) -> Commit:
        stamp = _stamp()
        shard = f"{'part' if kind == 'data' else 'quarantine'}-{stamp}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.store.write_bytes(buf.getvalue(), self.prefix, shard)
        ids = tuple(table.column(self.key).to_pylist())
        record = {
            "shard": shard,
            "kind": kind,
            "rows": table.num_rows,
            "ids": list(ids),
            "schema_version": self.schema_version,
            "meta": meta or {},
            "created": time.time(),
        }
        self.store.write_json(record, self.prefix, COMMITS, f"{stamp}.json")
        return Commit(f"{stamp}.json", shard, kind, table.num_rows, ids, self.schema_version, meta or {})

    def write(self, table: pa.Table, meta: dict | None = None, *, skip_committed: bool = True) -> Commit | None:
        """Commit one shard. Rows whose key is already committed (or repeated in `table`) are dropped."""
        table = table.cast(self.schema) if table.schema != self.schema else table
        seen = self.committed_ids() if skip_committed else set()
        keep, fresh = [], set()
        for i, sid in enumerate(table.column(self.key).to_pylist()):
            if sid not in seen and sid not in fresh:
                keep.append(i)
                fresh.add(sid)
        if not keep:
            return None
        if len(keep) < table.num_rows:
            log.info(
                "%s: %d of %d rows already committed, skipped", self.url, table.num_rows - len(keep), table.num_rows
            )
            table = table.take(pa.array(keep, type=pa.int64()))
        return self._commit(table, "data", meta)

    def quarantine(self, rejected: Iterable[tuple[str, str]], meta: dict | None = None) -> Commit | None:
        """Record rejected rows as (key, reason) pairs."""
        rows = list(rejected)
        if not rows:
            return None
        table = pa.Table.from_pydict(
            {self.key: [r[0] for r in rows], "reason": [r[1] for r in rows]}, schema=self.quarantine_schema
        )
        return self._commit(table, "quarantine", meta)

    # -- reading -----------------------------------------------------------------------------------------------
    def _read_shard(self, commit: Commit, columns: Sequence[str] | None) -> pa.Table | None:
        try:
            data = self.store.read_bytes(self.prefix, commit.shard)
        except FileNotFoundError:
            self._problem(f"shard {commit.shard} is named by commit {commit.record} but missing")
            return None
        try:
            table = pq.read_table(io.BytesIO(data), columns=list(columns) if columns else None)
        except (pa.ArrowInvalid, OSError) as e:
            self._problem(f"shard {commit.shard} is corrupt or truncated: {e}")
            return None
        if table.num_rows != commit.rows:
            self._problem(f"shard {commit.shard} has {table.num_rows} rows, its commit says {commit.rows}")
            return None
        return table

    def _problem(self, message: str) -> None:
        full = f"{self.url}: {message}"
        self.problems.append(full)
        log.error(full)
        if self._strict:
            raise StoreError(full)

    def read(self, columns: Sequence[str] | None = None, *, strict: bool = False) -> pa.Table:
        """Every committed data row, first commit wins per sample id; bad shards reported in `.problems`."""
        self._strict = strict
        self.problems = []
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        tables, seen = [], set()
        for commit in self.commits():
            if commit.kind != "data":
                continue
            table = self._read_shard(
                commit, columns if columns is None or self.key in columns else [*columns, self.key]
            )
            if table is None:
                continue
            ids = table.column(self.key).to_pylist()
            keep = [i for i, sid in enumerate(ids) if sid not in seen]
            seen.update(ids)
            table = table.take(pa.array(keep, type=pa.int64())) if len(keep) < len(ids) else table
            tables.append(table.select(schema.names).cast(schema))
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def valid_shards(self, *, strict: bool = False) -> list[Commit]:
        """Data commits whose shard exists and has a readable footer with the committed row count."""
        self._strict = strict
        self.problems = []
        good = []
        for commit in self.commits():
            if commit.kind != "data":
                continue
            path = self.store.path(self.prefix, commit.shard)
            try:
                with self.store.fs.open(path, "rb") as f:
                    rows = pq.read_metadata(f).num_rows
            except FileNotFoundError:
                self._problem(f"shard {commit.shard} is named by commit {commit.record} but missing")
                continue
            except (pa.ArrowInvalid, OSError) as e:
                self._problem(f"shard {commit.shard} is corrupt or truncated: {e}")
                continue
            if rows != commit.rows:
                self._problem(f"shard {commit.shard} has {rows} rows, its commit says {commit.rows}")
                continue
            good.append(commit)
        return good

    def scan(self, *, strict: bool = False) -> pl.LazyFrame:
        """A lazy polars scan over the valid committed shards; filters and projections are pushed down to the
        Parquet reader, and the first committed row of each sample id wins."""
        paths = [self.store.path(self.prefix, c.shard) for c in self.valid_shards(strict=strict)]
        if not paths:
            return pl.from_arrow(self.schema.empty_table()).lazy()  # type: ignore[union-attr]
        dataset = pads.dataset(paths, schema=self.schema, format="parquet", filesystem=self.store.fs)
        return pl.scan_pyarrow_dataset(dataset).unique(subset=[self.key], keep="first", maintain_order=True)

    def quarantined(self) -> pa.Table:
        self._strict = False
        tables = [t for c in self.commits() if c.kind == "quarantine" if (t := self._read_shard(c, None)) is not None]
        return pa.concat_tables(tables) if tables else self.quarantine_schema.empty_table()

    def stats(self) -> dict:
        commits = self.commits()
        return {
            "shards": sum(c.kind == "data" for c in commits),
            "rows": sum(c.rows for c in commits if c.kind == "data"),
            "quarantined": sum(c.rows for c in commits if c.kind == "quarantine"),
        }
