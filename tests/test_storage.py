"""The label and artifact stores, each test on local disk and on a real S3-compatible server (moto over HTTP)."""

from __future__ import annotations

import threading

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from sdrpn_core.data import Rejection
from sdrpn_core.pseudo_labels import LabelParams
from sdrpn_core.teacher import TeacherRecord
from stages.tables import LabelTorchDataset, label_table, teacher_records, teacher_table
from storage.artifacts import ArtifactStore
from storage.labels import label_dataset, teacher_dataset
from storage.sharded import SchemaError
from storage.store import Store, StoreError, StoreSettings
from tests.conftest import teacher_rows


def records(ids, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for sid in ids:
        g = rng.random(16) * 0.01
        g[rng.integers(16)] = 1.0
        out.append(TeacherRecord(str(sid), f"img/{sid}.png", "what is it ?", "7", (4, 4), g, np.zeros(16), 2, (40, 30)))
    return out


def test_teacher_rows_round_trip(store):
    ds = teacher_dataset(store, "fp1")
    recs = records(range(5))
    ds.write(teacher_table(recs))
    back = teacher_records(ds.read())
    assert [r.sample_id for r in back] == [r.sample_id for r in recs]
    np.testing.assert_array_equal(back[2].grounding, recs[2].grounding.astype(np.float32))
    assert back[0].grid == (4, 4) and back[0].image_size == (40, 30) and back[0].image_hidden_norms is None


def test_resume_skips_committed_ids_and_duplicates_are_impossible(store):
    ds = teacher_dataset(store, "fp2")
    ds.write(teacher_table(records(range(0, 6))))
    reopened = teacher_dataset(store, "fp2")
    assert reopened.committed_ids() == {str(i) for i in range(6)}
    commit = reopened.write(teacher_table(records([4, 5, 6, 7, 7])))
    assert commit.rows == 2 and set(commit.ids) == {"6", "7"}
    assert reopened.write(teacher_table(records([1, 2]))) is None  # nothing new: no empty shard
    ids = reopened.read(columns=["sample_key"]).column("sample_key").to_pylist()
    assert sorted(ids, key=int) == [str(i) for i in range(8)]


def test_uncommitted_shard_is_invisible(store):
    ds = teacher_dataset(store, "fp3")
    ds.write(teacher_table(records([1])))
    # a writer that died after uploading its shard but before its commit record
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(teacher_table(records([2, 3])), buf)
    store.write_bytes(buf.getvalue(), "teacher/fp3", "part-99999999999999999999-dead.parquet")
    assert ds.read().column("sample_id").to_pylist() == ["1"]
    assert ds.committed_ids() == {"1"}  # so a rerun redoes 2 and 3


def test_lazy_scan_with_filters_and_label_rows(store):
    ds = label_dataset(store, "lab1")
    recs = records(range(6))
    recs[2] = TeacherRecord("2", "img/2.png", "q", "a", (4, 4), np.ones(16), np.zeros(16), 1, (40, 30))  # box too big
    ds.write(label_table(recs[:3], LabelParams()))
    ds.write(label_table(recs[3:], LabelParams()))
    lazy = ds.scan().filter(pl.col("valid")).select("sample_id", "num_fg")
    assert isinstance(lazy, pl.LazyFrame)
    frame = lazy.collect()
    assert sorted(frame["sample_id"].to_list()) == ["0", "1", "3", "4", "5"]
    assert (frame["num_fg"] >= 1).all()
    torch_ds = LabelTorchDataset(ds.read())
    assert len(torch_ds) == 5 and torch_ds[0]["labels"].shape == (16,) and torch_ds[0]["grid"] == (4, 4)


def test_corrupt_and_missing_shards_are_named_and_skipped(store):
    ds = teacher_dataset(store, "fp4")
    c1 = ds.write(teacher_table(records([1, 2])))
    c2 = ds.write(teacher_table(records([3, 4])))
    c3 = ds.write(teacher_table(records([5])))
    data = store.read_bytes("teacher/fp4", c2.shard)
    store.write_bytes(data[: len(data) // 2], "teacher/fp4", c2.shard)  # truncated
    store.rm("teacher/fp4", c3.shard)  # the commit names a shard that is gone
    table = ds.read()
    assert sorted(table.column("sample_id").to_pylist()) == ["1", "2"]
    assert any(c2.shard in p and "corrupt" in p for p in ds.problems)
    assert any(c3.shard in p and "missing" in p for p in ds.problems)
    assert ds.scan().collect().height == 2
    with pytest.raises(StoreError, match=c2.shard):
        ds.read(strict=True)
    assert c1.shard not in " ".join(ds.problems)


def test_newer_schema_is_refused(store):
    ds = teacher_dataset(store, "fp5")
    c = ds.write(teacher_table(records([1])))
    raw = store.read_json("teacher/fp5/_commits", c.record)
    raw["schema_version"] = 99
    store.write_json(raw, "teacher/fp5/_commits", c.record)
    with pytest.raises(SchemaError, match=r"v99.*upgrade sdrpn"):
        ds.read()


def test_two_writers_lose_and_duplicate_nothing(store):
    ds_a, ds_b = teacher_dataset(store, "fp6"), teacher_dataset(store, "fp6")
    errors = []

    def writer(ds, ids):
        try:
            for chunk in range(0, len(ids), 5):
                ds.write(teacher_table(records(ids[chunk : chunk + 5])))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [
        threading.Thread(target=writer, args=(ds_a, list(range(0, 30)))),
        threading.Thread(target=writer, args=(ds_b, list(range(20, 50)))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ids = teacher_dataset(store, "fp6").read(columns=["sample_key"]).column("sample_key").to_pylist()
    assert sorted(map(int, ids)) == list(range(50))  # every id once: none lost, none duplicated


def test_quarantine_table(store):
    ds = label_dataset(store, "lab2")
    rejected = [Rejection("x", "image not found: x.png"), Rejection("y", "empty question")]
    ds.quarantine((r.sample_id, r.reason) for r in rejected)
    q = ds.quarantined()
    assert q.num_rows == 2 and "empty question" in q.column("reason").to_pylist()
    assert ds.read().num_rows == 0 and ds.committed_ids() == {"x", "y"}
    assert ds.committed_ids(include_quarantine=False) == set()


def test_artifacts_commit_marker_fetch_and_latest(store, tmp_path):
    arts = ArtifactStore(store)
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "rpn.safetensors").write_bytes(b"\x00weights" * 100)
    (src / "sub" / "rpn_config.json").write_text('{"K": 15}')
    assert not arts.is_committed("rpn", "t1")
    arts.put_dir("rpn", "t1", src, meta={"steps": 3})
    assert arts.is_committed("rpn", "t1") and arts.manifest("rpn", "t1")["meta"] == {"steps": 3}
    out = arts.fetch_dir("rpn", "t1", tmp_path / "fetched")
    assert (out / "rpn.safetensors").read_bytes() == (src / "rpn.safetensors").read_bytes()
    assert (out / "sub" / "rpn_config.json").read_text() == '{"K": 15}'
    # files uploaded without a marker (a crashed upload) are not an artifact
    store.write_bytes(b"partial", "rpn", "t2", "rpn.safetensors")
    assert not arts.is_committed("rpn", "t2")
    with pytest.raises(FileNotFoundError, match="no committed artifact"):
        arts.fetch_dir("rpn", "t2", tmp_path / "nope")
    # a file changed behind the marker's back is caught
    store.write_bytes(b"tampered", "rpn", "t1", "rpn.safetensors")
    with pytest.raises(StoreError, match="corrupt"):
        arts.read("rpn", "t1", "rpn.safetensors")
    assert arts.latest("model-a", "rpn") is None
    arts.set_latest("model-a", "rpn", "t1")
    assert arts.latest("model-a", "rpn") == "t1"


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(StoreError, match="nosuchfs://bucket"):
        Store("nosuchfs://bucket/x")


def test_credentials_never_show(s3_settings):
    store = Store(s3_settings)
    assert "testing" not in repr(store) and "testing" not in repr(s3_settings)


def test_server_gone_mid_run_retries_then_fails_cleanly(moto_server, s3_settings):
    store = Store(s3_settings)
    ds = teacher_dataset(store, "fp7")
    ds.write(teacher_table(records([1])))
    moto_server["server"].stop()
    try:
        with pytest.raises(StoreError, match="failed after 3 attempts"):
            ds.write(teacher_table(records([2])))
    finally:
        moto_server["server"].start()
    assert teacher_dataset(Store(s3_settings), "fp7").read().column("sample_id").to_pylist() == ["1"]


def test_env_credentials_are_used(moto_server, s3_settings, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server["endpoint"])
    store = Store(StoreSettings(root=s3_settings.root))
    store.write_json({"ok": 1}, "probe.json")
    assert store.read_json("probe.json") == {"ok": 1}


def test_every_reader_keeps_the_first_commit_of_a_key(store):
    """Duplicates written on purpose (two writers that both skipped the check): read, scan, iter_shards and the
    labels stage's view all see the first committed row of a key, once."""
    ds = teacher_dataset(store, "dups")
    ds.write(teacher_rows([("a", "first a"), ("b", "first b")]))
    ds.write(teacher_rows([("b", "second b"), ("c", "first c")]), skip_committed=False)
    ds.write(teacher_rows([("a", "third a")]), skip_committed=False)
    expected = {"a": "first a", "b": "first b", "c": "first c"}

    def as_dict(table):
        keys, questions = table.column("sample_key").to_pylist(), table.column("question").to_pylist()
        assert len(keys) == len(set(keys)), keys
        return dict(zip(keys, questions, strict=True))

    assert as_dict(ds.read()) == expected
    assert as_dict(ds.scan().collect().to_arrow()) == expected
    assert as_dict(pa.concat_tables(ds.iter_shards())) == expected
    assert as_dict(pa.concat_tables(ds.iter_shards(among={"a", "b"}))) == {"a": "first a", "b": "first b"}
    assert ds.committed_ids() == {"a", "b", "c"}


class _Killed(BaseException):
    """Stands for the writer being killed between two writes."""


def test_a_writer_killed_between_shard_and_record_leaves_nothing_visible(store, monkeypatch):
    """The shard is written first and its commit record second: a kill between the two leaves an orphan shard no
    reader sees, never a record that points at a missing or partial shard."""
    ds = teacher_dataset(store, "kill")
    ds.write(teacher_rows([("a", "q")]))
    real, writes = store.write_bytes, []

    def dying(data, *parts):
        writes.append(parts[-1])
        if len(writes) == 2:  # the second write of the commit
            raise _Killed
        return real(data, *parts)

    monkeypatch.setattr(store, "write_bytes", dying)
    with pytest.raises(_Killed):
        ds.write(teacher_rows([("b", "q")]))
    monkeypatch.undo()
    assert writes[0].startswith("part-") and writes[1].endswith(".json")  # shard, then record
    fresh = teacher_dataset(store, "kill")
    assert fresh.committed_ids() == {"a"} and fresh.read().num_rows == 1 and not fresh.problems
    assert all(store.exists(fresh.prefix, c.shard) for c in fresh.commits())


def test_stats_count_shards_rows_and_quarantine_and_retire_moves_only_replaced_bad_records(store):
    """Written against mutation survivors: `stats` and `retire_replaced` were not called by any fast test."""
    ds = teacher_dataset(store, "retire")
    good = ds.write(teacher_rows([("a", "qa"), ("b", "qb")]))
    bad = ds.write(teacher_rows([("c", "qc"), ("d", "qd")]))
    ds.quarantine([("x", "image not found"), ("y", "empty question"), ("z", "bad row")])
    assert ds.stats() == {"shards": 2, "rows": 4, "quarantined": 3}
    data = store.read_bytes("teacher/retire", bad.shard)
    store.write_bytes(data[: len(data) // 2], "teacher/retire", bad.shard)  # the shard rots
    ds = teacher_dataset(store, "retire")  # another process (a writer trusts its own shards once written)
    ds.retire_replaced({"c", "d"})
    assert store.exists("teacher/retire", "_commits", bad.record)  # c, d not committed again: kept, still reported
    ds.write(teacher_rows([("c", "qc again")]), skip_committed=False)
    ds.retire_replaced({"c", "d"})
    assert store.exists("teacher/retire", "_commits", bad.record)  # d is still only in the bad shard
    ds.write(teacher_rows([("d", "qd again")]), skip_committed=False)
    ds.retire_replaced({"a", "b"})  # keys disjoint from the bad shard's: nothing moves
    assert store.exists("teacher/retire", "_commits", bad.record)
    ds.retire_replaced({"c"})
    assert not store.exists("teacher/retire", "_commits", bad.record)
    assert store.exists("teacher/retire", "_retired", bad.record)
    assert store.exists("teacher/retire", "_commits", good.record)  # a good record is never retired
    assert ds.stats() == {"shards": 3, "rows": 4, "quarantined": 3}
    assert sorted(ds.read().column("question").to_pylist()) == ["qa", "qb", "qc again", "qd again"]


@pytest.mark.slow
def test_storage_imports_nothing_of_the_method():
    """The store is a library of its own: its modules load without `sdrpn_core` (or torch)."""
    import subprocess
    import sys

    code = (
        "import sys, storage.store, storage.sharded, storage.labels, storage.artifacts, storage.fingerprint, "
        "storage.files; bad = [m for m in sys.modules if m.split('.')[0] in ('sdrpn_core', 'torch', 'stages')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
