"""Failures the pipeline survives, through a real Prefect API: a killed worker, a planted pickle, tampered,
missing or corrupt shards, a stage that produced nothing."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stages import labels as labels_stage
from stages import teacher as teacher_stage
from tests.flowkit import Calls, _task_states, make_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api", "flow_cache")]

ROOT = Path(__file__).resolve().parents[1]


WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from flows.pipeline import labels_flow
    from stages.config import PipelineConfig
    labels_flow(PipelineConfig.model_validate_json({cfg!r}))
    """
)


def test_worker_killed_mid_extraction_then_rerun_has_one_row_per_sample(family, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import labels_flow
    from stages.common import get_store
    from storage.labels import label_dataset, teacher_dataset

    cfg = make_config(
        family,
        str(tmp_path / "store"),
        **{"train_data.n": 80, "teacher.chunk_size": 2, "teacher.max_new_tokens": 8, "teacher.shards": 1},
    )
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER.format(root=str(ROOT), cfg=cfg.model_dump_json())],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    commits_dir = tmp_path / "store" / "teacher"
    deadline = time.time() + 120
    killed_at = 0
    while time.time() < deadline and proc.poll() is None:
        commits = list(commits_dir.glob("*/_commits/*.json"))
        if len(commits) >= 3:
            proc.send_signal(signal.SIGKILL)
            killed_at = len(commits)
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert killed_at, f"worker ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    (teacher_fp,) = [p.name for p in commits_dir.iterdir()]
    store = get_store(cfg.store.settings())
    assert 0 < len(teacher_dataset(store, teacher_fp).committed_ids()) < 80  # a crash mid-way

    ref = labels_flow(cfg)
    keys = teacher_dataset(store, teacher_fp).read(columns=["sample_key"]).column("sample_key").to_pylist()
    assert len(keys) == len(set(keys)) == 80
    ids = label_dataset(store, ref.fingerprint).read(columns=["sample_id"]).column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == 80 == ref.rows


class _Payload:
    """What an attacker plants: unpickling it creates a file (standing in for arbitrary code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _prefect_record(marker: Path) -> bytes:
    """A Prefect result record that names the pickle serializer and carries the payload: the format Prefect reads
    back (and unpickles) for a cached task."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    meta = ResultRecordMetadata(storage_key="planted", serializer=PickleSerializer(picklelib="pickle"))
    return ResultRecord(metadata=meta, result=_Payload(str(marker))).serialize()


def test_planted_prefect_cache_payload_does_not_run(tmp_path, monkeypatch):
    from prefect._internal.result_records import ResultRecord
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    from flows.pipeline import sdrpn

    cfg = make_config("llava", str(tmp_path / "store"))
    first = sdrpn(cfg)
    store_dir = tmp_path / "store"
    assert not (store_dir / "_prefect").exists()
    armed = tmp_path / "armed"
    ResultRecord.deserialize(_prefect_record(armed))  # the planted record is live: Prefect's reader runs it
    assert armed.exists()

    marker = tmp_path / "pwned"
    record = _prefect_record(marker)
    # every place and key a Prefect result could be read from: the store's old cache folder (each stage key of
    # this run) and Prefect's local result storage
    keys = [
        f"sdrpn-{stage}-{fp}"
        for stage, fp in [("eval", Path(first["eval"][0]).name), ("train", Path(first["rpn"]).name)]
    ]
    keys.append(f"sdrpn-labels-{Path(first['labels']).name}")
    for folder in (store_dir / "_prefect", Path(PREFECT_LOCAL_STORAGE_PATH.value())):
        folder.mkdir(parents=True, exist_ok=True)
        for key in keys:
            (folder / key).write_bytes(record)
    calls = Calls(monkeypatch)
    t0 = time.time()
    again = sdrpn(cfg)
    assert not marker.exists()  # nothing was unpickled
    assert again["scores"] == first["scores"] and calls.n == {}
    assert _task_states(t0)["train"] == {"Cached"}  # cached from the store's verified artifacts


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_shards_and_results_are_detected_and_repaired_on_rerun(tmp_path, monkeypatch):
    from flows.pipeline import sdrpn
    from stages.common import get_store
    from storage.labels import teacher_dataset

    cfg = make_config("llava", str(tmp_path / "store"))
    first = sdrpn(cfg)
    store_dir = tmp_path / "store"
    (teacher_dir,) = (store_dir / "teacher").iterdir()
    shard = sorted(teacher_dir.glob("part-*.parquet"))[0]
    _flip_a_bit(shard)
    scores = Path(first["eval"][0]) / "scores.json"
    scores.write_text(scores.read_text().replace('"score": ', '"score": 1'))  # a doctored score

    calls = Calls(monkeypatch)
    again = sdrpn(cfg)
    assert calls.samples_extracted == pq_rows(shard)  # the corrupt shard's rows were extracted again
    assert calls.n.get("labels") is None and calls.n.get("train") is None  # their own outputs still verify

    def measured(scores):  # scores without the timing
        return [(s["method"], s["score"], s["samples"]) for s in scores]

    # the merged scores were rebuilt from the evaluation pieces, which still verify: nothing answered again
    assert calls.n.get("eval") is None and measured(again["scores"]) == measured(first["scores"])
    piece = sorted((store_dir / "eval-piece").glob("*/predictions.parquet"))[0]
    _flip_a_bit(piece)
    (Path(first["eval"][0]) / "_COMMITTED.json").unlink()  # the merge must read the pieces again
    calls.n.clear()
    third = sdrpn(cfg)
    assert calls.n == {"eval": 1} and measured(third["scores"]) == measured(first["scores"])  # that piece alone
    ds = teacher_dataset(get_store(cfg.store.settings()), teacher_dir.name)
    assert len(ds.read().column("sample_key")) == 12 and not ds.problems  # the bad record was retired
    assert list((teacher_dir / "_retired").iterdir())


def pq_rows(path: Path) -> int:
    import json as _json

    for record in path.parent.glob("_commits/*.json"):
        raw = _json.loads(record.read_text())
        if raw["shard"] == path.name:
            return raw["rows"]
    for record in path.parent.glob("_retired/*.json"):
        raw = _json.loads(record.read_text())
        if raw["shard"] == path.name:
            return raw["rows"]
    raise AssertionError(f"no record for {path}")


def test_a_missing_teacher_shard_is_an_error_naming_it_then_the_rerun_repairs_it(tmp_path):
    from flows.pipeline import labels_flow
    from stages.common import get_store
    from stages.data import build_manifest
    from storage.store import StoreError

    cfg = make_config("llava", str(tmp_path / "store"))
    ref = labels_flow(cfg)
    store = get_store(cfg.store.settings())
    (teacher_dir,) = (tmp_path / "store" / "teacher").iterdir()
    shard = sorted(teacher_dir.glob("part-*.parquet"))[0]
    shard.unlink()
    dataset = build_manifest(cfg.train_data, store)
    # other label parameters: no earlier label set of this rule to copy rows from, so every row needs the teacher
    params = dataclasses.replace(cfg.labels.params(cfg.teacher.preset_obj()), fg_ratio=0.8)
    with pytest.raises(StoreError, match=rf"have no teacher row.*{shard.name}.*missing"):
        labels_stage.denoise(store, dataset, teacher_dir.name, params, "relabel000000000")
    assert not store.exists("labels", "relabel000000000", "_DONE.json")  # not marked done with rows missing
    assert labels_flow(cfg).rows == ref.rows == 12  # the teacher stage re-extracts the missing rows


def test_a_stage_that_produced_nothing_is_not_stored_as_done(tmp_path, monkeypatch):
    """Every teacher answer rejected (simulated: each sample rejected as an empty answer, as a bad answer budget
    would give): the labels stage fails instead of storing an empty label set; with the parameter changed the
    run goes through."""
    from flows.pipeline import labels_flow
    from sdrpn_core.teacher import TeacherOutput

    real = teacher_stage.extract_teacher_maps

    def reject_all(adapter, samples, *args, **kwargs):
        from sdrpn_core.data import Rejection

        return TeacherOutput([], [Rejection(s.sample_id, "empty answer: the model emitted EOS first") for s in samples])

    cfg = make_config("llava", str(tmp_path / "store"))
    monkeypatch.setattr(teacher_stage, "extract_teacher_maps", reject_all)
    with pytest.raises(ValueError, match="all were rejected"):
        labels_flow(cfg)
    assert not list((tmp_path / "store" / "labels").glob("*/_DONE.json"))
    monkeypatch.setattr(teacher_stage, "extract_teacher_maps", real)
    fixed = make_config("llava", str(tmp_path / "store"), **{"teacher.max_new_tokens": 4})
    assert labels_flow(fixed).rows == 12


def test_a_corrupt_label_shard_is_relabelled_once_then_cached(tmp_path, monkeypatch):
    from flows.pipeline import labels_flow

    cfg = make_config("llava", str(tmp_path / "store"))
    first = labels_flow(cfg)
    (label_shard,) = sorted((tmp_path / "store" / "labels").glob("*/part-*.parquet"))[:1]
    _flip_a_bit(label_shard)
    calls = Calls(monkeypatch)
    again = labels_flow(cfg)
    assert calls.n == {"labels": 1} and again.rows == first.rows == 12  # relabelled from the stored teacher rows
    assert list(label_shard.parent.glob("_retired/*.json"))  # the bad record retired …
    calls.n.clear()
    assert labels_flow(cfg).rows == 12 and calls.n == {}  # … so the next run is cached again
