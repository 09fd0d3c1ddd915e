"""A store others can write to, and data that is never silently lost (issue #12): each test plants the fault an
adversarial or unlucky user would meet and checks the new behaviour."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from sdrpn_core.data import BadSample, ImageReadError, load_image, read_ahead
from stages.common import read_manifest, read_rejections
from stages.config import ConfigError, DatasetSpec, PipelineConfig
from stages.data import build_manifest
from storage.artifacts import MARKER, ArtifactStore
from storage.labels import teacher_dataset
from storage.sharded import ShardedDataset
from storage.store import Store, StoreError
from tests.conftest import random_image, teacher_rows

ROOT = Path(__file__).resolve().parents[1]


# -- the store holds nothing executable; everything read from it is verified -------------------------------------


def test_fetch_dir_refuses_names_that_escape_the_destination(store, tmp_path):
    arts = ArtifactStore(store)
    arts.put_files("rpn", "fp0", {"rpn.safetensors": b"weights", "sub/config.json": b"{}"})
    raw = store.read_json("rpn", "fp0", MARKER)
    for bad in ("../escaped.txt", "/tmp/abs.txt", "sub/../../x", ""):
        planted = {**raw, "files": {**raw["files"], bad: {"size": 1, "sha256": "0" * 64}}}
        store.write_json(planted, "rpn", "fp0", MARKER)
        dest = tmp_path / "dest" / "inner"
        with pytest.raises(StoreError, match=r"refused: bad artifact file name"):
            arts.fetch_dir("rpn", "fp0", dest)
        assert not dest.exists()  # refused as a whole: nothing written, inside or out
        assert not (tmp_path / "dest" / "escaped.txt").exists()


def test_tampered_artifact_file_is_detected(store):
    arts = ArtifactStore(store)
    arts.put_files("eval", "fp1", {"scores.json": b"[1]", "report.md": b"# ok"})
    assert arts.verify("eval", "fp1") is not None
    store.write_bytes(b"[2]", "eval", "fp1", "scores.json")  # same size, other content
    assert arts.verify("eval", "fp1") is None
    with pytest.raises(StoreError, match="does not match its committed size/hash"):
        arts.read("eval", "fp1", "scores.json")


def _shards(store: Store) -> ShardedDataset:
    return teacher_dataset(store, "fp-shards")


def _rows(keys: list[str]) -> pa.Table:
    return teacher_rows([(k, "q") for k in keys], grounding=(0.1, 0.2, 0.3, 0.4), grid=(2, 2))


def test_a_single_bit_flip_in_a_shard_is_detected_and_its_keys_count_as_not_committed(store):
    ds = _shards(store)
    good = ds.write(_rows(["a", "b"]))
    bad = ds.write(_rows(["c", "d"]))
    data = bytearray(store.read_bytes(ds.prefix, bad.shard))
    data[len(data) // 2] ^= 0x01
    store.write_bytes(bytes(data), ds.prefix, bad.shard)
    fresh = _shards(store)
    assert fresh.committed_ids() == {"a", "b"}  # c and d will be extracted again
    assert fresh.read().column("sample_key").to_pylist() == ["a", "b"]
    assert any(bad.shard in p and "does not match its commit record" in p for p in fresh.problems)
    with pytest.raises(StoreError, match=bad.shard):
        fresh.read(strict=True)
    assert [c.shard for c in fresh.bad_commits()] == [bad.shard] and good.shard not in fresh.problems[0]


def test_commit_records_are_validated_not_followed(store):
    ds = _shards(store)
    ds.write(_rows(["a"]))
    store.write_json(
        {"shard": "../../etc/passwd", "kind": "data", "rows": 1, "ids": ["x"], "sha256": "0" * 64, "size": 1},
        ds.prefix,
        "_commits",
        "00000000000000000001-planted.json",
    )
    store.write_bytes(b"\x80\x04not json", ds.prefix, "_commits", "00000000000000000002-junk.json")
    fresh = _shards(store)
    assert fresh.read().column("sample_key").to_pylist() == ["a"]
    assert any("bad shard name '../../etc/passwd'" in p for p in fresh.problems)
    assert any("not valid JSON" in p for p in fresh.problems)


# -- samples: validation, duplicates, image roots ---------------------------------------------------------------


def test_manifest_rows_are_validated_with_their_file_and_line(tmp_path):
    random_image(0).save(tmp_path / "x.png")
    random_image(1).save(tmp_path / "y.png")
    (tmp_path / "folder.png").mkdir()
    lines = [
        b'{"id": "a", "image": "x.png", "question": "first?"}',
        b'{"id": "a", "image": "y.png", "question": "second row, same id?"}',  # line 2: duplicate of line 1
        b'{"image": "y.png", "question": "no id?"}',  # line 3: gets a derived id
        b'{"id": "c", "image": "x.png", "question": 7}',  # wrong type
        b"{not json",
        b'{"id": "d", "image": "x.png", "question": "caf\xe9?"}',  # Latin-1, not UTF-8
        b'{"id": "e", "image": "folder.png", "question": "a folder?"}',
        b'{"id": "f", "image": "x.png", "question": "box?", "box": [1, 2, "3", 4]}',
    ]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    store = Store(str(tmp_path / "store"))
    ref = build_manifest(DatasetSpec(kind="jsonl", path=str(tmp_path / "m.jsonl")), store)
    rows = read_manifest(ref, store)
    assert [r["question"] for r in rows] == ["first?", "no id?"]  # the first "a" kept, its content unswapped
    assert rows[1]["sample_id"].startswith("line3-")
    reasons = {r["sample_id"]: r["reason"] for r in read_rejections(ref, store)}
    assert reasons["a"] == "m.jsonl:2: duplicate id 'a' (first at line 1)"
    assert reasons["c"] == "m.jsonl:4: bad row: 'question' must be a non-empty string"
    assert reasons["m.jsonl:5"].startswith("m.jsonl:5: not a JSON line")
    assert reasons["m.jsonl:6"].startswith("m.jsonl:6: not UTF-8 text")
    assert reasons["e"] == f"m.jsonl:7: image is a folder, not a file: {tmp_path / 'folder.png'}"
    assert reasons["f"].startswith("m.jsonl:8: bad row: 'box' must be four")
    assert ref.rows == 2 and ref.rejected == 6


def test_images_are_read_only_from_the_dataset_roots(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    random_image(0).save(data / "in.png")
    random_image(1).save(outside / "secret.png")
    rows = [
        {"id": "ok", "image": "in.png", "question": "q?"},
        {"id": "passwd", "image": "/etc/passwd", "question": "q?"},
        {"id": "dotdot", "image": "../outside/secret.png", "question": "q?"},
        {"id": "metadata", "image": "http://169.254.169.254/latest/meta-data", "question": "q?"},
    ]
    (data / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = Store(str(tmp_path / "store"))
    ref = build_manifest(DatasetSpec(kind="jsonl", path=str(data / "m.jsonl")), store)
    assert [r["sample_id"] for r in read_manifest(ref, store)] == ["ok"]
    reasons = {r["sample_id"]: r["reason"] for r in read_rejections(ref, store)}
    assert (
        "outside the dataset's image roots" in reasons["passwd"]
        and "add its folder to image_roots" in reasons["passwd"]
    )
    assert str(data) in reasons["dotdot"] and "outside" in reasons["dotdot"]
    assert "http(s) images are off" in reasons["metadata"]
    # a root the user names is trusted
    spec = DatasetSpec(kind="jsonl", path=str(data / "m.jsonl"), image_roots=[str(outside)])
    trusted = build_manifest(spec, store)
    assert sorted(r["sample_id"] for r in read_manifest(trusted, store)) == ["dotdot", "ok"]


def test_all_rows_rejected_still_writes_the_quarantine_and_names_the_reasons(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "image": "/etc/passwd", "question": "q?"}\n')
    store = Store(str(tmp_path / "store"))
    with pytest.raises(ValueError, match=r"no usable rows \(1 rejected, listed in .*quarantine.parquet\): .*passwd"):
        build_manifest(DatasetSpec(kind="jsonl", path=str(tmp_path / "m.jsonl")), store)
    assert list((tmp_path / "store" / "datasets-rejected").glob("*/quarantine.parquet"))


# -- transient failures are retried and never quarantined ----------------------------------------------------------

FLAKY = {"failures_left": 0, "opens": 0}


def _flaky_fs():
    from fsspec.implementations.local import LocalFileSystem

    class FlakyFileSystem(LocalFileSystem):
        """A local folder behind a flaky link: the next `failures_left` opens fail like an S3 503 / reset."""

        protocol = "flaky"

        def _open(self, path, *args, **kwargs):
            FLAKY["opens"] += 1
            if FLAKY["failures_left"] > 0:
                FLAKY["failures_left"] -= 1
                raise ConnectionResetError("503 Slow Down (injected)")
            return super()._open(self._strip_protocol(path), *args, **kwargs)

    return FlakyFileSystem


@pytest.fixture
def flaky(monkeypatch):
    import fsspec

    import sdrpn_core.data as data_mod

    fsspec.register_implementation("flaky", _flaky_fs(), clobber=True)
    monkeypatch.setattr(data_mod, "READ_BACKOFF_S", 0.001)
    FLAKY.update(failures_left=0, opens=0)
    return FLAKY


def test_image_reads_are_retried_and_a_lasting_outage_is_not_a_bad_sample(tmp_path, flaky):
    random_image(0).save(tmp_path / "x.png")
    flaky["failures_left"] = 2
    assert load_image(f"flaky://{tmp_path}/x.png").size == (40, 28)  # two 503s, then the read succeeds
    flaky["failures_left"] = 100
    with pytest.raises(ImageReadError, match="not quarantined: rerun"):
        load_image(f"flaky://{tmp_path}/x.png")
    assert not issubclass(ImageReadError, BadSample)
    flaky["failures_left"] = 0
    with pytest.raises(BadSample, match="image not found"):
        load_image(f"flaky://{tmp_path}/missing.png")


def test_read_ahead_keeps_order_overlaps_the_next_read_and_raises_at_the_failing_item():
    """Evaluation reads the next batch in a thread while answering this one; an unreachable image still fails
    the piece, at its own batch, after the batches before it were answered."""
    started = {k: threading.Event() for k in range(4)}

    def read(k: int) -> int:
        started[k].set()
        if k == 2:
            raise ImageReadError("s3://b/2.png unreachable")
        return k * 10

    seen = []
    with pytest.raises(ImageReadError, match=r"2\.png"):
        for k, value in read_ahead(read, [0, 1, 2, 3]):
            seen.append((k, value))
            if k == 0:  # while item 0 is being worked on, item 1 is already being read
                assert started[1].wait(timeout=10)
    assert seen == [(0, 0), (1, 10)] and not started[3].is_set()
    assert list(read_ahead(read, [])) == []
    started[1].clear()
    inline = read_ahead(read, [0, 1], background=False)  # a model on the CPU: no reading thread beside it
    assert next(inline) == (0, 0) and not started[1].is_set() and next(inline) == (1, 10)


def test_a_503_during_extraction_fails_the_shard_and_the_rerun_processes_the_sample(tmp_path, flaky, tiny_llava):
    from sdrpn_core.presets import get_preset
    from stages import teacher as teacher_stage
    from stages.config import ModelSpec
    from stages.model import _ref
    from tasks.stages import _retry_if_transient

    for i in range(3):
        random_image(i).save(tmp_path / f"{i}.png")
    lines = [json.dumps({"id": f"s{i}", "image": f"flaky://{tmp_path}/{i}.png", "question": "q?"}) for i in range(3)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    store = Store(str(tmp_path / "store"))
    spec = DatasetSpec(kind="jsonl", path=str(tmp_path / "m.jsonl"), image_roots=[f"flaky://{tmp_path}"])
    dataset = build_manifest(spec, store)
    model_dir = tmp_path / "model"
    tiny_llava.save_pretrained(model_dir)
    model = _ref(model_dir, "llava", "float32", ModelSpec(path=str(model_dir)))
    preset = get_preset("llava-1.5-7b", grounding={2: (0,)}, sink={}, K=1, T=2)
    flaky["failures_left"] = 10**6  # the bucket is down for the whole first run

    def extract():
        return teacher_stage.extract_shard(
            store, model, dataset, preset, "tfp", 0, 1, batch_size=2, chunk_size=2, max_new_tokens=2
        )

    with pytest.raises(ImageReadError) as failure:
        extract()
    from prefect.states import Failed

    assert _retry_if_transient(None, None, Failed(data=failure.value))  # Prefect retries the task
    ds = teacher_dataset(store, "tfp")
    assert ds.quarantined().num_rows == 0  # nothing recorded as a bad sample
    flaky["failures_left"] = 0
    summary = extract()
    assert summary.extracted == 3 and summary.rejected == 0
    assert len(teacher_dataset(store, "tfp").committed_ids()) == 3


# -- configs fail fast, before any model work, without retries ---------------------------------------------------


TINY = "model: {source: tiny}\n"


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("name: x\n", "model: Field required"),
        (TINY + "teacher: {batch_size: 0}\n", "teacher.batch_size: Input should be greater than 0"),
        (TINY + "eval: {threshold: 1.5}\n", "eval.threshold: Value error, τ must be in (0, 1)"),
        (TINY + "train: {lr: -1}\n", "train.lr = -1.0 is out of range"),
        (TINY + "train: {learning_rate: 1}\n", "train.learning_rate: Extra inputs are not permitted"),
        (TINY + "labels: {fg_ratio: 2}\n", "labels.fg_ratio = 2.0 is out of range"),
        (TINY + "eval: {datasets: [{kind: benchmark, benchmark: textvqaa, path: .}]}\n", "unknown benchmark"),
        (TINY + "train_data: {kind: jsonl, path: nowhere.jsonl}\n", "dataset path does not exist"),
        ("model: {path: ./not/a/folder}\n", "neither a model folder nor a hub id"),  # a relative path, not an id
        (TINY + "teacher: {preset: llava-9b}\n", "unknown preset 'llava-9b'"),
        (TINY + "eval: {datasets: []}\n", "eval.datasets is empty"),
    ],
)
def test_bad_configs_fail_in_one_line_naming_the_field(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        PipelineConfig.from_yaml(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_relative_paths_resolve_from_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "cfg" / "data").mkdir(parents=True)
    (tmp_path / "cfg" / "data" / "m.jsonl").write_text("")
    (tmp_path / "cfg" / "c.yaml").write_text(
        "train_data: {kind: jsonl, path: data/m.jsonl, image_roots: [data]}\n"
        "eval: {datasets: [{kind: jsonl, path: data/m.jsonl}]}\nstore: {root: ../store}\n"
        "model: {path: llava-hf/llava-1.5-7b-hf}\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = PipelineConfig.from_yaml("cfg/c.yaml")
    here = tmp_path / "cfg"
    assert cfg.train_data.path == str(here / "data" / "m.jsonl") == cfg.eval.datasets[0].path
    assert cfg.train_data.image_roots == [str(here / "data")] and cfg.store.root == str(tmp_path / "store")
    assert cfg.model.path == "llava-hf/llava-1.5-7b-hf"  # a hub id is left alone


def test_a_bad_config_fails_before_the_model_loads_and_is_not_retried(tmp_path, monkeypatch):
    from flows.cli import main
    from stages import common

    loads = []
    monkeypatch.setattr(common, "load_model", lambda ref: loads.append(ref))
    (tmp_path / "c.yaml").write_text(TINY + "teacher: {shards: -2}\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"teacher\.shards"):
        main(["run", str(tmp_path / "c.yaml")])
    assert not loads and time.perf_counter() - t0 < 5  # no server, no model, no retry backoff


def test_deterministic_errors_are_not_retried_transient_ones_are():
    from prefect.states import Failed

    from tasks.stages import _retry_if_transient

    def retried(exc: BaseException) -> bool:
        return _retry_if_transient(None, None, Failed(data=exc))

    assert not retried(ValueError("bad config")) and not retried(FileNotFoundError("x"))
    assert not retried(StoreError("shard x does not match its commit record"))
    assert retried(ConnectionResetError("reset")) and retried(TimeoutError()) and retried(ImageReadError("503"))
    try:
        raise StoreError("read s3://b/x failed after 5 attempts") from ConnectionError("refused")
    except StoreError as e:
        assert retried(e)


# -- the command line cleans up after itself -----------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for whoever adopted it to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_cli_does_not_leave_its_temporary_prefect_server(tmp_path, sig):
    import yaml

    from tests.flowkit import make_config

    cfg = make_config("llava", str(tmp_path / "store"), **{"train_data.n": 400, "teacher.max_new_tokens": 8})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PYTHONPATH=str(ROOT), SDRPN_CACHE_DIR=str(tmp_path / "cache"), PREFECT_HOME=str(tmp_path / "home"))
    cli = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(tmp_path / "c.yaml")],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    server_pid = None
    deadline = time.time() + 120
    for line in cli.stderr:
        if "temporary Prefect API at" in line:
            server_pid = int(line.split("(pid ")[1].split(";")[0])
        if server_pid and "teacher" in line.lower():
            break
        assert time.time() < deadline, "the run did not start"
    assert server_pid is not None
    cli.send_signal(sig)
    cli.wait(timeout=60)
    for _ in range(100):
        if not _alive(server_pid):
            break
        time.sleep(0.1)
    else:
        os.kill(server_pid, signal.SIGKILL)
        pytest.fail(f"the temporary Prefect server (pid {server_pid}) outlived the killed CLI")


def test_a_manifest_and_its_images_on_s3(s3_settings, tmp_path):
    """`train_data.path` may be any fsspec URL: a JSONL manifest in a bucket, its images beside it."""
    import io

    store = Store(s3_settings)
    for i in range(2):
        buf = io.BytesIO()
        random_image(i).save(buf, format="PNG")
        store.write_bytes(buf.getvalue(), "incoming", "imgs", f"{i}.png")
    lines = [json.dumps({"id": f"s{i}", "image": f"imgs/{i}.png", "question": f"q{i}?"}) for i in range(2)]
    store.write_bytes("\n".join([*lines, "{broken"]).encode(), "incoming", "m.jsonl")
    ref = build_manifest(DatasetSpec(kind="jsonl", path=store.url("incoming", "m.jsonl")), store)
    rows = read_manifest(ref, store)
    assert [r["image"] for r in rows] == [store.url("incoming", "imgs", f"{i}.png") for i in range(2)]
    assert [r["reason"] for r in read_rejections(ref, store)] == [
        "m.jsonl:3: not a JSON line (Expecting property name enclosed in double quotes)"
    ]


def test_a_stale_local_copy_of_an_artifact_is_replaced_not_used(store, tmp_path):
    """A local cache left by another run (same fingerprint, other bytes) must not stand in for the artifact; what
    is reused from a verified local copy is logged as reused."""
    arts = ArtifactStore(store)
    arts.put_files("rpn", "fp2", {"rpn.safetensors": b"fresh weights", "rpn_config.json": b"{}"})
    local = tmp_path / "cache"
    local.mkdir()
    (local / "rpn.safetensors").write_bytes(b"stale weights")  # same size, other content
    (local / "rpn_config.json").write_bytes(b"{}")
    said: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())  # Prefect's set-up may own the root handlers
    logger = logging.getLogger("storage.artifacts")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        arts.fetch_dir("rpn", "fp2", local)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert (local / "rpn.safetensors").read_bytes() == b"fresh weights"
    assert any("differs" in m and "rpn.safetensors" in m for m in said)
    assert any("1 of 2 files reused from the verified local copy" in m for m in said)
