"""A dataset of Parquet shards with an append-only commit log: the unit of crash safety, resume and integrity.

Layout under `<root>/<kind>/<fingerprint>/`:

    part-<time>-<uuid>.parquet        shards (rows of one schema)
    quarantine-<time>-<uuid>.parquet  rejected samples: key, reason
    _commits/<time>-<uuid>.json       one record per committed shard: shard name, kind, row count, keys, size and
                                      sha256 of the shard's bytes, schema version, writer metadata
    _retired/<record>.json            records of shards found corrupt and since replaced (kept for the audit trail)

A shard becomes visible only when its commit record exists, and the record is written after the shard, so a
crashed writer leaves nothing readers see. Every shard is checked against its record's sha256 before its rows are
used: a missing, truncated or modified shard is reported by name (and raises with `strict=True`), and its keys
count as *not* committed, so the writer's next run re-extracts them. Commit records never overwrite each other
(unique names), so two writers on one dataset cannot lose each other's rows; a writer skips keys already
committed, and readers keep the first committed row of a key, so no reader ever sees a duplicate. Commit records
are JSON validated field by field: a record that does not parse, or names a file outside the dataset, is a
reported problem, never followed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from storage.files import matches
from storage.records import CommitRecord
from storage.store import Store, StoreError

log = logging.getLogger(__name__)

COMMITS = "_commits"
RETIRED = "_retired"


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
    sha256: str
    size: int


def _stamp() -> str:
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


def parse_commit(record: str, raw: object) -> Commit:
    """A commit record read from the store → Commit; ValueError naming the first bad field."""
    c = CommitRecord.parse(raw)
    return Commit(record, c.shard, c.kind, c.rows, tuple(c.ids), c.schema_version, c.meta, c.sha256, c.size)


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
        self._verified: dict[str, bool] = {}  # commit record → its shard matched the record (checked once)
        self._why: dict[str, str] = {}  # commit record → why its shard was refused

    def __repr__(self) -> str:
        return f"ShardedDataset({self.store.url(self.prefix)!r})"

    @property
    def url(self) -> str:
        return self.store.url(self.prefix)

    # -- the commit log ----------------------------------------------------------------------------------------
    def commits(self) -> list[Commit]:
        """Every well-formed commit record, oldest first; malformed ones are reported problems."""
        return list(self.iter_commits())

    def iter_commits(self) -> Iterator[Commit]:
        """The commit records one at a time (a reader of a large dataset never holds every record's keys)."""
        for name in self.store.ls(self.prefix, COMMITS):
            if not name.endswith(".json"):
                continue
            try:
                raw = self.store.read_json(self.prefix, COMMITS, name)
            except FileNotFoundError:  # retired by another process since the listing
                continue
            except ValueError as e:
                self._problem(f"commit record {name} is not valid JSON: {e}")
                continue
            version = raw.get("schema_version", 0) if isinstance(raw, dict) else 0
            if isinstance(version, int) and version > self.schema_version:
                raise SchemaError(
                    f"{self.url}: commit {name} was written with schema v{version}; this sdrpn reads up to "
                    f"v{self.schema_version} — upgrade sdrpn"
                )
            try:
                yield parse_commit(name, raw)
            except ValueError as e:
                self._problem(f"commit record {name} is malformed: {e}")

    def verified(self, commit: Commit) -> bool:
        """Whether the shard matches its commit record: its bytes (size, sha256) and the keys it holds (checked
        once per instance)."""
        if commit.record not in self._verified:
            self._read_shard(commit, [self.key])
        elif not self._verified[commit.record]:  # known bad: reported again, so every read names what it skipped
            self._problem(self._why[commit.record], commit)
        return self._verified[commit.record]

    def committed_ids(self, include_quarantine: bool = True, among: Iterable[str] | None = None) -> set[str]:
        """Keys held by verified commits. With `among`, only commits holding one of those keys are checked (a
        writer asks about its own keys without hashing the whole dataset)."""
        self._strict = False  # a strict read before must not make this bookkeeping raise
        wanted = set(among) if among is not None else None
        out: set[str] = set()
        for c in self.commits():
            if not include_quarantine and c.kind != "data":
                continue
            if wanted is not None and wanted.isdisjoint(c.ids):
                continue
            if self.verified(c):
                out.update(c.ids)
        return out if wanted is None else out & wanted

    def is_empty(self) -> bool:
        return not self.commits()

    def retire(self, commit: Commit) -> None:
        """Move a bad shard's record out of the log once its rows are committed again (its keys stay readable)."""
        data = self.store.read_bytes(self.prefix, COMMITS, commit.record)
        self.store.write_bytes(data, self.prefix, RETIRED, commit.record)
        self.store.rm(self.prefix, COMMITS, commit.record)
        log.warning(
            "%s: retired commit %s (shard %s was corrupt; its rows were re-committed)",
            self.url,
            commit.record,
            commit.shard,
        )

    def retire_replaced(self, among: set[str]) -> None:
        """Retire the records of bad shards holding keys of `among` once every one of their keys is committed by
        a good shard again (so later reads stop reporting them, and a label set stops looking corrupt)."""
        for commit in self.commits():
            if among.isdisjoint(commit.ids) or self.verified(commit):
                continue
            if set(commit.ids) <= self.committed_ids(among=commit.ids):
                self.retire(commit)

    # -- writing -----------------------------------------------------------------------------------------------
    def _commit(self, table: pa.Table, kind: str, meta: dict | None) -> Commit:
        stamp = _stamp()
        shard = f"{'part' if kind == 'data' else 'quarantine'}-{stamp}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        self.store.write_bytes(data, self.prefix, shard)
        ids = tuple(table.column(self.key).to_pylist())
        sha = hashlib.sha256(data).hexdigest()
        record = {
            "shard": shard,
            "kind": kind,
            "rows": table.num_rows,
            "ids": list(ids),
            "sha256": sha,
            "size": len(data),
            "schema_version": self.schema_version,
            "meta": meta or {},
            "created": time.time(),
        }
        self.store.write_json(record, self.prefix, COMMITS, f"{stamp}.json")  # after the shard: never dangling
        commit = Commit(
            f"{stamp}.json", shard, kind, table.num_rows, ids, self.schema_version, meta or {}, sha, len(data)
        )
        self._verified[commit.record] = True
        return commit

    def write(
        self, table: pa.Table, meta: dict | None = None, *, skip_committed: bool = True, skip: set[str] | None = None
    ) -> Commit | None:
        """Commit one shard. Rows whose key is already committed (verified), in `skip`, or repeated in `table`
        are dropped."""
        table = table.cast(self.schema) if table.schema != self.schema else table
        keys = table.column(self.key).to_pylist()
        seen = set(skip or ())
        if skip_committed:
            seen |= self.committed_ids(among=keys)
        keep, fresh = [], set()
        for i, sid in enumerate(keys):
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
    def _shard_bytes(self, commit: Commit) -> bytes | None:
        try:
            data = self.store.read_bytes(self.prefix, commit.shard)
        except FileNotFoundError:
            self._problem(f"shard {commit.shard} is named by commit {commit.record} but missing", commit)
            return None
        if not matches(data, commit.size, commit.sha256):
            self._problem(
                f"shard {commit.shard} does not match its commit record {commit.record} ({len(data)} bytes, "
                f"record says {commit.size}; sha256 differs): truncated, corrupt or modified",
                commit,
            )
            return None
        return data

    def _read_shard(self, commit: Commit, columns: Sequence[str] | None) -> pa.Table | None:
        """The shard's table, or None (a reported problem) when it does not match its commit record in any way;
        the outcome is remembered for `verified`."""
        self._verified[commit.record] = False
        data = self._shard_bytes(commit)
        if data is None:
            return None
        try:
            table = pq.read_table(io.BytesIO(data), columns=list(columns) if columns else None)
        except (pa.ArrowInvalid, OSError) as e:
            self._problem(f"shard {commit.shard} is unreadable Parquet: {e}", commit)
            return None
        if table.num_rows != commit.rows or table.column(self.key).to_pylist() != list(commit.ids):
            self._problem(f"shard {commit.shard} does not hold the {commit.rows} keys its commit names", commit)
            return None
        self._verified[commit.record] = True
        return table

    def _problem(self, message: str, commit: Commit | None = None) -> None:
        """Report a bad record or shard (once per read: `problems` is reset by each reader call)."""
        if commit is not None:
            self._why[commit.record] = message
        full = f"{self.url}: {message}"
        if full not in self.problems:
            self.problems.append(full)
            log.error(full)
        if self._strict:
            raise StoreError(full)

    def iter_shards(
        self,
        columns: Sequence[str] | None = None,
        *,
        strict: bool = False,
        among: set[str] | None = None,
        dedup: bool = True,
    ) -> Iterator[pa.Table]:
        """Verified data shards one at a time (bounded memory), in commit order, first commit winning per key;
        with `among`, only shards holding those keys, filtered to them. `dedup=False` leaves repeated keys to the
        caller (who then holds no set of every key seen). Bad shards are skipped and reported in `.problems`."""
        self._strict = strict
        self.problems = []
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        wanted = columns if columns is None or self.key in columns else [*columns, self.key]
        seen: set[str] = set()
        for commit in self.iter_commits():
            if commit.kind != "data" or (among is not None and among.isdisjoint(commit.ids)):
                continue
            table = self._read_shard(commit, wanted)
            if table is None:
                continue
            if dedup or among is not None:
                ids = table.column(self.key).to_pylist()
                keep = [i for i, k in enumerate(ids) if (not dedup or k not in seen) and (among is None or k in among)]
                if dedup:
                    seen.update(ids)
                if len(keep) < len(ids):
                    table = table.take(pa.array(keep, type=pa.int64()))
            if table.num_rows:
                yield table.select(schema.names).cast(schema)

    def read(self, columns: Sequence[str] | None = None, *, strict: bool = False) -> pa.Table:
        """Every committed data row, first commit wins per key; bad shards reported in `.problems`."""
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        tables = list(self.iter_shards(columns, strict=strict))
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def valid_shards(self, *, strict: bool = False) -> list[Commit]:
        """Data commits whose shard matches its record (content hash)."""
        self._strict = strict
        self.problems = []
        return [c for c in self.commits() if c.kind == "data" and self.verified(c)]

    def scan(self, *, strict: bool = False) -> pl.LazyFrame:
        """A lazy polars scan over the verified committed shards; filters and projections are pushed down to the
        Parquet reader, and the first committed row of each key wins."""
        paths = [self.store.path(self.prefix, c.shard) for c in self.valid_shards(strict=strict)]
        if not paths:
            return pl.from_arrow(self.schema.empty_table()).lazy()  # type: ignore[union-attr]
        dataset = pads.dataset(paths, schema=self.schema, format="parquet", filesystem=self.store.fs)
        return pl.scan_pyarrow_dataset(dataset).unique(subset=[self.key], keep="first", maintain_order=True)

    def quarantined(self, among: set[str] | None = None) -> pa.Table:
        self._strict = False
        tables = [
            t
            for c in self.commits()
            if c.kind == "quarantine" and (among is None or not among.isdisjoint(c.ids))
            if (t := self._read_shard(c, None)) is not None
        ]
        return pa.concat_tables(tables) if tables else self.quarantine_schema.empty_table()

    def bad_commits(self) -> list[Commit]:
        """Commits whose shard is missing or does not match the record."""
        self._strict = False
        return [c for c in self.commits() if not self.verified(c)]

    def stats(self) -> dict:
        commits = self.commits()
        return {
            "shards": sum(c.kind == "data" for c in commits),
            "rows": sum(c.rows for c in commits if c.kind == "data"),
            "quarantined": sum(c.rows for c in commits if c.kind == "quarantine"),
        }
