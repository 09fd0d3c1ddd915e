"""The shard store's contract, field by field, on a small generic schema (local disk; `test_storage.py` runs the
label datasets on local disk and S3). Written against the mutation survivors listed in
`benchmarks/results/mutation.md`: each test pins a rule a one-token change to `storage/sharded.py` would break."""

from __future__ import annotations

import hashlib
import io
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.sharded import SchemaError, ShardedDataset, parse_commit
from storage.store import Store, StoreError, StoreSettings

SCHEMA = pa.schema([("id", pa.string()), ("v", pa.int64())])
SHA = "ab" * 32
GOOD = {"shard": "part-" + "0" * 20 + "-" + "a" * 12 + ".parquet", "rows": 2, "ids": ["x", "y"], "sha256": SHA}
QUARANTINE = "quarantine-" + "1" * 20 + "-" + "b" * 12 + ".parquet"


@pytest.fixture
def local(tmp_path) -> Store:
    return Store(StoreSettings(root=str(tmp_path / "store"), retries=1, backoff_s=0.01))


def dataset(store: Store, version: int = 1) -> ShardedDataset:
    return ShardedDataset(store, "t", "fp", SCHEMA, version, key="id")


def rows(ids, start: int = 0) -> pa.Table:
    return pa.table({"id": list(ids), "v": list(range(start, start + len(ids)))}, schema=SCHEMA)


def corrupt(store: Store, ds: ShardedDataset, shard: str) -> None:
    data = store.read_bytes(ds.prefix, shard)
    store.write_bytes(data[: len(data) // 2], ds.prefix, shard)


# -- parse_commit ----------------------------------------------------------------------------------------------------


def test_parse_commit_defaults_and_boundaries():
    c = parse_commit("r.json", {**GOOD, "size": 0})
    assert (c.record, c.shard, c.kind, c.rows, c.ids) == ("r.json", GOOD["shard"], "data", 2, ("x", "y"))
    assert (c.schema_version, c.meta, c.sha256, c.size) == (0, {}, SHA, 0)
    full = parse_commit("r.json", {**GOOD, "size": 5, "schema_version": 3, "meta": {"by": "w1"}})
    assert (full.schema_version, full.meta, full.size) == (3, {"by": "w1"}, 5)
    assert parse_commit("r.json", {**GOOD, "size": 1, "meta": ["not", "a", "dict"]}).meta == {}
    empty = parse_commit("r.json", {**GOOD, "rows": 0, "ids": [], "size": 0})
    assert empty.rows == 0 and empty.ids == ()
    q = parse_commit("r.json", {**GOOD, "shard": QUARANTINE, "kind": "quarantine", "size": 1})
    assert q.kind == "quarantine"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shard": 7}, "bad shard name 7"),
        ({"shard": "../escape.parquet"}, "bad shard name '../escape.parquet'"),
        ({"kind": "other", "shard": QUARANTINE}, "bad kind 'other'"),
        ({"kind": "other"}, "bad kind 'other'"),
        ({"kind": "quarantine"}, "bad kind 'quarantine' for shard part-"),
        ({"shard": QUARANTINE}, "bad kind 'data' for shard quarantine-"),
        ({"rows": True}, "bad row count True"),
        ({"rows": -1, "ids": []}, "bad row count -1"),
        ({"rows": "2"}, "bad row count '2'"),
        ({"ids": "xy"}, "ids must be a list of strings"),
        ({"ids": ["x"]}, "ids must be a list of strings"),
        ({"ids": ["x", 2]}, "ids must be a list of strings"),
        ({"sha256": 5}, "no sha256"),
        ({"sha256": "AB" * 32}, "no sha256"),
        ({"size": -1}, "bad size or schema version"),
        ({"size": "1"}, "bad size or schema version"),
        ({"schema_version": "1"}, "bad size or schema version"),
    ],
)
def test_parse_commit_rejects_each_bad_field(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
        parse_commit("r.json", {**GOOD, "size": 1, **change})


# -- writing ----------------------------------------------------------------------------------------------------------


def test_commit_record_and_shard_as_written(local):
    ds = dataset(local, version=2)
    before = time.time()
    commit = ds.write(rows(["a", "b"]), meta={"worker": "w1"})
    raw = local.read_json(ds.prefix, "_commits", commit.record)
    data = local.read_bytes(ds.prefix, commit.shard)
    assert raw["shard"] == commit.shard and raw["kind"] == "data" and raw["rows"] == 2 and raw["ids"] == ["a", "b"]
    assert raw["sha256"] == hashlib.sha256(data).hexdigest() and raw["size"] == len(data)
    assert raw["schema_version"] == 2 and raw["meta"] == {"worker": "w1"} and before <= raw["created"] <= time.time()
    assert parse_commit(commit.record, raw) == commit  # what the writer returns is what a reader will parse
    assert pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0).column(0).compression == "ZSTD"
    q = ds.quarantine([("c", "bad image")], meta={"worker": "w1"})
    q_raw = local.read_json(ds.prefix, "_commits", q.record)
    assert q.kind == q_raw["kind"] == "quarantine" and q.meta == q_raw["meta"] == {"worker": "w1"}
    assert parse_commit(q.record, q_raw) == q
    assert (
        ds.write(rows(["d"])).meta == {}
        and local.read_json(ds.prefix, "_commits", ds.commits()[-1].record)["meta"] == {}
    )
    assert repr(ds) == f"ShardedDataset({local.url('t/fp')!r})"


def test_write_casts_to_the_schema_and_skips_known_and_repeated_keys(local):
    ds = dataset(local)
    narrow = pa.table({"id": ["a", "b"], "v": pa.array([1, 2], pa.int32())})
    ds.write(narrow)
    assert pq.read_schema(io.BytesIO(local.read_bytes(ds.prefix, ds.commits()[0].shard))).field("v").type == pa.int64()
    commit = ds.write(rows(["a", "c", "c", "x", "d"]), skip={"x"})
    assert commit.ids == ("c", "d") and ds.read().column("v").to_pylist() == [1, 2, 1, 4]
    assert ds.write(rows(["a", "b"]), skip_committed=False).ids == ("a", "b")  # on purpose: readers dedup
    assert ds.write(rows(["a", "x"]), skip={"x"}) is None


# -- reading the log ---------------------------------------------------------------------------------------------


def test_the_log_skips_foreign_unparsable_and_malformed_records_and_reads_on(local):
    ds = dataset(local, version=0)
    local.write_bytes(b"notes", ds.prefix, "_commits", "0-readme.txt")
    local.write_bytes(b"{not json", ds.prefix, "_commits", "1-broken.json")
    local.write_json(["a", "list"], ds.prefix, "_commits", "2-list.json")
    local.write_json({**GOOD, "size": 1, "rows": 3}, ds.prefix, "_commits", "3-rows.json")  # no schema_version: v0
    commit = ds.write(rows(["a"]))
    assert [c.record for c in ds.commits()] == [commit.record]
    assert any("1-broken.json is not valid JSON" in p for p in ds.problems)
    assert any("2-list.json is malformed: not a JSON object" in p for p in ds.problems)
    assert any("3-rows.json is malformed: ids must be" in p for p in ds.problems)
    assert not ds.is_empty() and dataset(Store(StoreSettings(root=local.settings.root + "-other"))).is_empty()
    newer = dataset(local, version=0)
    local.write_json({**GOOD, "size": 1, "schema_version": 1}, ds.prefix, "_commits", "4-newer.json")
    with pytest.raises(SchemaError, match=r"4-newer\.json was written with schema v1; this sdrpn reads up to v0"):
        newer.commits()


def test_committed_ids_by_kind_and_among(local):
    ds = dataset(local)
    ds.quarantine([("q1", "bad")])
    ds.write(rows(["a", "b"]))
    ds.write(rows(["c"]))
    assert ds.committed_ids() == {"q1", "a", "b", "c"}
    assert ds.committed_ids(include_quarantine=False) == {"a", "b", "c"}
    assert ds.committed_ids(among={"c", "zz"}) == {"c"}
    assert ds.committed_ids(among=["b"]) == {"b"}


# -- reading shards ----------------------------------------------------------------------------------------------


def test_a_shard_that_does_not_hold_its_records_keys_is_refused(local):
    ds = dataset(local)
    commit = ds.write(rows(["a", "b"]))
    raw = local.read_json(ds.prefix, "_commits", commit.record)
    local.write_json({**raw, "ids": ["a", "z"]}, ds.prefix, "_commits", commit.record)  # hash intact, keys forged
    garbage = b"PAR1 not parquet"
    name = "part-" + "9" * 20 + "-" + "c" * 12 + ".parquet"
    local.write_bytes(garbage, ds.prefix, name)
    forged = {**raw, "shard": name, "ids": ["g"], "rows": 1, "size": len(garbage)}
    local.write_json({**forged, "sha256": hashlib.sha256(garbage).hexdigest()}, ds.prefix, "_commits", "9.json")
    fresh = dataset(local)
    assert fresh.read().num_rows == 0 and fresh.committed_ids() == set()
    assert any(f"shard {commit.shard} does not hold the 2 keys its commit names" in p for p in fresh.problems)
    assert any(f"shard {name} is unreadable Parquet" in p for p in fresh.problems)
    assert [c.record for c in fresh.bad_commits()] == [commit.record, "9.json"]


def test_readers_skip_a_corrupt_shard_unless_strict(local):
    ds = dataset(local)
    bad = ds.write(rows(["a"]))
    ds.write(rows(["b"], start=5))
    corrupt(local, ds, bad.shard)
    fresh = dataset(local)
    assert [c.ids for c in fresh.bad_commits()] == [("a",)]  # a fresh reader is not strict
    assert [t.num_rows for t in fresh.iter_shards()] == [1] and len(fresh.problems) == 1
    assert [c.ids for c in fresh.valid_shards()] == [("b",)] and len(fresh.problems) == 1
    assert bad.shard in fresh.problems[0] and "does not match its commit record" in fresh.problems[0]
    assert fresh.scan().collect()["id"].to_list() == ["b"]
    with pytest.raises(StoreError, match=bad.shard):
        fresh.valid_shards(strict=True)
    with pytest.raises(StoreError, match=bad.shard):
        list(fresh.iter_shards(strict=True))


def test_column_projections_and_filters(local):
    ds = dataset(local)
    assert ds.read(columns=["v"]).column_names == ["v"] and ds.read(columns=["v"]).num_rows == 0
    assert ds.scan().collect().columns == ["id", "v"] and ds.scan().collect().height == 0
    ds.write(rows(["a", "b", "c"]))
    ds.write(rows(["b", "d"], start=10), skip_committed=False)
    assert ds.read(columns=["v"]).column_names == ["v"] and ds.read(columns=["v"]).column("v").to_pylist() == [
        0,
        1,
        2,
        11,
    ]
    assert [t.column_names for t in ds.iter_shards(columns=["v"])] == [["v"], ["v"]]
    undeduped = pa.concat_tables(ds.iter_shards(among={"b", "d"}, dedup=False))
    assert undeduped.column("id").to_pylist() == ["b", "b", "d"]
    assert ds.scan().collect()["v"].to_list() == [0, 1, 2, 11]


def test_quarantined_by_key_and_despite_a_corrupt_shard(local):
    ds = dataset(local)
    assert ds.quarantined().num_rows == 0 and ds.quarantined().column_names == ["id", "reason"]
    first = ds.quarantine([("x", "no image")])
    ds.quarantine([("y", "empty question"), ("z", "bad row")])
    assert ds.quarantined(among={"y"}).column("id").to_pylist() == ["y", "z"]
    assert ds.quarantined().schema == pa.schema([("id", pa.string()), ("reason", pa.string())])
    corrupt(local, ds, first.shard)
    fresh = dataset(local)
    assert fresh.quarantined().column("id").to_pylist() == ["y", "z"]


def test_a_commit_retired_between_listing_and_reading_is_skipped_not_the_rest(local, monkeypatch):
    """Another process may retire a record after this one listed them: it is passed over, the later ones read."""
    ds = dataset(local)
    ds.write(rows(["a"]))
    ds.write(rows(["b"]))
    real = local.ls
    monkeypatch.setattr(local, "ls", lambda *parts: ["0-retired-meanwhile.json", *real(*parts)])
    assert sorted(i for c in ds.iter_commits() for i in c.ids) == ["a", "b"]
