"""The Prefect layer against a real (temporary) Prefect API: end to end, caching, retries, crashes, Dask, S3."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from datetime import UTC

from prefect.testing.utilities import prefect_test_harness

from stages import data as data_stage
from stages import evaluate as eval_stage
from stages import labels as labels_stage
from stages import teacher as teacher_stage
from stages import train as train_stage
from stages import train_ranks
from stages.common import Stage
from stages.config import PipelineConfig
from storage.fingerprint import hash_obj

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def prefect_api(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    storage = tmp_path_factory.mktemp("prefect-storage")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}), prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDRPN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module", params=["llava", "qwen"])
def family(request) -> str:
    """Every flow test runs on a tiny random LLaVA and on a tiny random Qwen2.5-VL."""
    return request.param


TINY = {  # model, teacher preset, teacher input settings (Qwen: the authors' natural-image label prompt)
    "llava": ({"image_size": 32, "patch_size": 8}, "llava-1.5-7b", {}),
    "qwen": ({"family": "qwen2_5_vl", "side": 112}, "qwen2.5-vl-7b/natural", {"prompt": "grounding"}),
}
EVAL_INPUTS = {"llava": {}, "qwen": {"pad_square": False}}  # the authors evaluate Qwen without square padding


def make_config(family: str, root: str, **changes) -> PipelineConfig:
    tiny, preset, teacher_inputs = TINY[family]
    raw = {
        "name": "test",
        "model": {"source": "tiny", "tiny": tiny},
        "train_data": {"kind": "synthetic", "n": 12, "seed": 0, "canvas": 96},
        "teacher": {
            "preset": preset,
            "inputs": teacher_inputs,
            "overrides": {"grounding": {2: [0, 3]}, "sink": {}, "K": 2, "T": 2},
            "batch_size": 4,
            "max_new_tokens": 3,
            "shards": 2,
            "chunk_size": 4,
        },
        "labels": {"max_box_frac": 1.01, "fg_ratio": 0.9},
        "train": {"lr": 1e-3, "batch_size": 4, "epochs": 1},
        "eval": {
            "datasets": [{"kind": "synthetic", "n": 4, "seed": 99, "canvas": 96}],
            "max_new_tokens": 3,
            "gallery": 2,
            "inputs": EVAL_INPUTS[family],
        },
        "store": {"root": root},
    }
    for dotted, value in changes.items():
        node = raw
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return PipelineConfig.model_validate(raw)


class Calls:
    """Counts calls of stage functions (real ones run underneath)."""

    def __init__(self, monkeypatch):
        self.n: dict[str, int] = {}
        self.samples_extracted = 0
        self.pieces_answered = 0
        for name, module, attr in [
            ("teacher", teacher_stage, "extract_teacher_maps"),
            ("labels", labels_stage, "denoise"),
            ("train", train_ranks, "train_rpn"),
            ("eval", eval_stage, "answer_pieces"),  # a shard's missing pieces, answered together
        ]:
            real = getattr(module, attr)
            wrapped = self._wrap(name, real)
            monkeypatch.setattr(module, attr, wrapped)
            for key, value in list(vars(module).items()):  # the stage declarations that run it
                if isinstance(value, Stage) and value.run is real:
                    monkeypatch.setattr(module, key, dataclasses.replace(value, run=wrapped))

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            self.n[name] = self.n.get(name, 0) + 1
            if name == "teacher":
                self.samples_extracted += len(args[1])
            if name == "eval":
                self.pieces_answered += len(args[5])
            if name == "train":
                self.train_samples = [s.sample_id for s in args[1]]
                self.train_prompt = args[0].prompt("q ?")
            return fn(*args, **kwargs)

        return wrapped


def _artifacts(progress: bool = False, key: str | None = None):
    """Every artifact of the server (or of one key), read page by page: one read returns at most the API's default
    limit (200), and the module's server holds more than that by the end."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    where = ArtifactFilter(key=ArtifactFilterKey(any_=[key])) if key else None

    async def read():
        out: list = []
        async with get_client() as client:
            while page := await client.read_artifacts(
                artifact_filter=where, sort=ArtifactSort.ID_DESC, offset=len(out), limit=200
            ):  # a stable order, so the pages neither overlap nor skip
                out += page
                if len(page) < 200:
                    break
        return out

    arts = sorted(asyncio.run(read()), key=lambda a: a.created)
    if progress:
        return arts
    return {a.key: a for a in arts if a.key}  # the newest of each key


def _stage_of(run_name: str) -> str:
    """ "samples[train]" → "samples", "teacher-shard 2/2" → "teacher-shard", "train" → "train", and a Prefect
    default name "x-16c" → "x"."""
    import re

    return re.sub(r"-[0-9a-f]{3}$", "", run_name.split("[", 1)[0].split(" ", 1)[0])


def _run_names(since: float) -> tuple[list[str], list[str]]:
    """(flow run names, task run names) started after `since`."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterStartTime,
        TaskRunFilter,
        TaskRunFilterStartTime,
    )
    from prefect.types import DateTime

    after = DateTime.fromtimestamp(since, tz=UTC)

    async def read():
        async with get_client() as client:
            flows = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=after))
            )
            tasks = await client.read_task_runs(
                task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=after))
            )
        return [f.name for f in flows], [t.name for t in tasks]

    return asyncio.run(read())


def _flow_run_tags(name: str) -> set[str]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))

    (run,) = asyncio.run(read())
    return set(run.tags)


def _events(name: str, since: float) -> list[dict]:
    """The events of this name the server holds, newest last (the client sends them in the background: wait)."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            for _ in range(40):
                body = {"filter": {"event": {"name": [name]}, "occurred": {"since": _iso(since)}}, "limit": 50}
                found = (await client._client.post("/events/filter", json=body)).json()["events"]
                if found:
                    return sorted(found, key=lambda e: e["occurred"])
                await asyncio.sleep(0.25)
        return []

    return asyncio.run(read())


def _iso(t: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(t, tz=UTC).isoformat()


def _task_states(since: float) -> dict[str, set[str]]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime
    from prefect.types import DateTime

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(
                task_run_filter=TaskRunFilter(
                    start_time=TaskRunFilterStartTime(after_=DateTime.fromtimestamp(since, tz=UTC))
                )
            )
        out: dict[str, set[str]] = {}
        for r in runs:
            out.setdefault(_stage_of(r.name), set()).add(r.state.name)
        return out

    return asyncio.run(read())


def test_full_flow_end_to_end_then_everything_cached(family, tmp_path, monkeypatch):
    from flows.pipeline import sdrpn

    cfg = make_config(family, str(tmp_path / "store"))
    read, real_read = [], eval_stage._read
    monkeypatch.setattr(eval_stage, "_read", lambda adapter, rows: read.extend(rows) or real_read(adapter, rows))
    started = time.time()
    summary = sdrpn(cfg)
    assert len(read) == 4  # each evaluation image read once, for the four methods that answer it
    flow_names, task_names = _run_names(started)
    assert {"samples[train]", "samples[eval:synthetic]", "teacher-shard 1/2", "teacher-shard 2/2"} <= set(task_names)
    assert {"model", "train", "release", "evaluate[synthetic 1/1: baseline, sdrpn, vicrop, oracle]"} <= set(task_names)
    assert any(n.startswith("labels[synthetic") for n in task_names), task_names
    assert "score[synthetic]" in task_names and any(n.startswith("teacher[synthetic") for n in flow_names)
    (ours,) = [n for n in flow_names if n.startswith("test-")]  # the config and the start, UTC, to the second
    assert re.fullmatch(r"test-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d", ours), ours
    assert {"config:test", f"config-fp:{hash_obj(cfg.model_dump(mode='json'))[:8]}"} <= _flow_run_tags(ours)
    assert summary["promotion"]["promoted"] and summary["promotion"]["reason"] == "the first RPN of this base model"
    methods = {s["method"]: s for s in summary["scores"]}
    assert set(methods) == {"baseline", "sdrpn", "vicrop", "oracle"}
    assert methods["oracle"]["samples"] == 4
    for m in methods.values():  # throughput relative to the baseline's, from the measured rates
        assert m["relative_throughput"] == pytest.approx(m["samples_per_s"] / methods["baseline"]["samples_per_s"])
    assert methods["sdrpn"]["relative_throughput"] != 1.0
    (eval_url,) = summary["eval"]
    eval_dir = Path(eval_url)
    assert {"predictions.parquet", "scores.json", "protocol.json", "report.md", "gallery.png", "_COMMITTED.json"} <= {
        p.name for p in eval_dir.iterdir()
    }
    protocol = json.loads((eval_dir / "protocol.json").read_text())
    import pyarrow.parquet as pq

    preds = pq.read_table(eval_dir / "predictions.parquet")
    assert json.loads(preds.schema.metadata[b"sdrpn.protocol"]) == protocol  # traceable from the file alone
    assert preds.num_rows == 4 * 4 and set(preds.column("method").to_pylist()) == set(methods)
    assert protocol["benchmark"] == "synthetic" and protocol["inputs"]["family"] == protocol["family"]
    if family == "llava":
        assert protocol["prompt_template"] == "vicuna_v1" and protocol["family"] == "llava"
    else:  # the pixel budget is recorded with every result
        assert protocol["family"] == "qwen2_5_vl" and protocol["inputs"]["max_pixels"] == 112 * 112
        assert protocol["inputs"]["pad_square"] is False  # eval.inputs applied to evaluation and recorded
    assert protocol["ocr_tokens_in_prompt"] is False and protocol["dtype"] == "float32"
    assert (Path(summary["rpn"]) / "rpn.safetensors").exists()
    artifacts = _artifacts()
    published = {"sdrpn-test-scores", "sdrpn-test-report", "sdrpn-test-outputs", "sdrpn-test-promotion"}
    assert published <= set(artifacts)
    assert all(artifacts[k].description and cfg.name in artifacts[k].description for k in published)
    assert artifacts["sdrpn-test-scores"].type == "table" and "baseline" in str(artifacts["sdrpn-test-scores"].data)
    assert "Promoted: the first RPN" in artifacts["sdrpn-test-promotion"].data
    report = artifacts["sdrpn-test-report"].data
    assert "Pseudo-labels" in report and "base64" not in report  # pictures are files (a local store: their paths)
    assert "gallery.png" in report and "scores.png" in report and "loss.png" in report
    outputs = artifacts["sdrpn-test-outputs"].data
    assert "file://" not in outputs and str(tmp_path / "store" / "release") in outputs
    progress = [a for a in _artifacts(progress=True) if a.type == "progress" and a.created.timestamp() >= started]
    assert progress and all(a.data == 100.0 for a in progress), [(a.key, a.data) for a in progress]
    assert all(a.key.startswith("sdrpn-test-") for a in progress), [a.key for a in progress]  # keyed per config
    release = Path(summary["release"])
    card = (release / "README.md").read_text()
    assert "base_model:" in card and "## Scores" in card and "## Protocol" in card and "## Recipe" in card
    inference = json.loads((release / "inference.json").read_text())
    assert inference["threshold"] == protocol["roi_threshold"] and inference["max_new_tokens"] == 3
    versions = len([a for a in _artifacts(progress=True) if (a.key or "").startswith("sdrpn-test-")])

    calls = Calls(monkeypatch)
    t0 = time.time()
    again = sdrpn(cfg)
    assert again["scores"] == summary["scores"]
    assert calls.n == {}  # no teacher, label, training or evaluation work: every stage came from the cache
    states = _task_states(t0)
    for stage in ("labels", "train", "score", "release"):
        assert states.get(stage) == {"Cached"}, (stage, states)
    assert "teacher-shard" not in states  # every sample's teacher rows were found: no shard started
    (rerun,) = [n for n in _run_names(t0)[0] if n.startswith("test-")]
    assert rerun != ours  # runs of one config are told apart by their start
    # nothing re-published, no progress artifact, no second decision: not one new artifact version
    assert len([a for a in _artifacts(progress=True) if (a.key or "").startswith("sdrpn-test-")]) == versions
    assert again["promotion"] is None


def test_changing_eval_or_label_params_reruns_only_what_depends_on_them(family, tmp_path, monkeypatch):
    from flows.pipeline import sdrpn

    root = str(tmp_path / "store")
    sdrpn(make_config(family, root))
    calls = Calls(monkeypatch)
    sdrpn(make_config(family, root, **{"eval.threshold": 0.3}))
    assert calls.n == {"eval": 1}
    calls.n.clear()
    sdrpn(make_config(family, root, **{"eval.threshold": 0.3, "labels.fg_ratio": 0.8}))
    assert calls.n == {"labels": 1, "train": 1, "eval": 1}  # teacher maps reused: no extraction


def test_added_samples_go_through_the_teacher_alone(family, tmp_path, monkeypatch):
    from flows.pipeline import sdrpn

    root = str(tmp_path / "store")
    sdrpn(make_config(family, root))
    calls = Calls(monkeypatch)
    sdrpn(make_config(family, root, **{"train_data.n": 16}))  # the same 12 scenes + 4 new ones
    assert calls.samples_extracted == 4
    assert calls.n["train"] == 1 and calls.n["eval"] == 1


def test_two_qwen_sources_natural_and_textual_merge_and_rerun_alone(tmp_path, monkeypatch):
    """The authors' Qwen recipe: GQA labelled with the natural heads and the grounding prompt, OCR-VQA with the
    textual heads, merged into one label set; a change to one source re-runs that source alone."""
    from flows.pipeline import labels_flow, train_flow

    def sources(ocr_n: int) -> list[dict]:
        natural = {"grounding": {2: [0, 3]}, "sink": {1: [1]}, "K": 2, "T": 2}
        textual = {"grounding": {1: [1, 2]}, "sink": {}, "K": 2, "T": 2}
        return [
            {
                "name": "gqa",
                "data": {"kind": "synthetic", "n": 6, "seed": 0, "canvas": 96},
                "preset": "qwen2.5-vl-7b/natural",
                "overrides": natural,
                "inputs": {"prompt": "grounding"},
            },
            {
                "name": "ocr_vqa",
                "data": {"kind": "synthetic", "n": ocr_n, "seed": 50, "canvas": 96},
                "preset": "qwen2.5-vl-7b/textual",
                "overrides": textual,
                "inputs": {},
            },
        ]

    root = str(tmp_path / "store")
    base = make_config("qwen", root).model_dump(exclude={"train_data"})
    cfg = PipelineConfig.model_validate({**base, "train_sources": sources(6)})
    calls = Calls(monkeypatch)
    first = labels_flow(cfg)
    assert [name for name, _ in first.parts] == ["gqa", "ocr_vqa"] and first.rows == 12
    assert calls.samples_extracted == 12 and calls.n["labels"] == 2
    assert set(first.stats["sources"]) == {"gqa", "ocr_vqa"}
    calls.n.clear()
    calls.samples_extracted = 0
    changed = PipelineConfig.model_validate({**base, "train_sources": sources(8)})  # 2 more OCR-VQA samples
    second = labels_flow(changed)
    assert calls.samples_extracted == 2 and calls.n["labels"] == 1  # the new OCR-VQA rows, in its shards
    assert second.parts[0] == first.parts[0] and second.parts[1] != first.parts[1]
    assert second.fingerprint != first.fingerprint and second.rows == 14
    train_flow(changed)
    assert len(calls.train_samples) == second.rows and second.usable > 0  # the Qwen recipe keeps all-ignore rows
    assert "user\n<image><|vision_start|><|image_pad|><|vision_end|>\nq ?<|im_end|>" in calls.train_prompt
    with pytest.raises(ValueError, match=r"preset qwen2\.5-vl-7b/textual has K=16, T=3"):
        PipelineConfig.model_validate({**base, "train_sources": [{**sources(6)[1], "overrides": {}}]})


def test_io_task_fails_once_then_succeeds_on_retry(family, tmp_path, monkeypatch):
    """Fault injection: the manifest stage hits one transient I/O error (as a flaky bucket would)."""
    from flows.pipeline import labels_flow

    real, failures = data_stage.build_manifest, []

    def flaky(spec, store):
        if not failures:
            failures.append(1)
            raise ConnectionError("connection reset by peer")
        return real(spec, store)

    monkeypatch.setattr(data_stage, "SAMPLES", dataclasses.replace(data_stage.SAMPLES, run=flaky))
    t0 = time.time()
    ref = labels_flow(make_config(family, str(tmp_path / "store")))
    assert failures == [1] and ref.rows == 12
    assert "Completed" in _task_states(t0)["samples"]


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


def test_dask_runner_gives_the_same_rows_as_threads(family, tmp_path):
    """Two Dask worker *processes* (a LocalCluster with processes=True): the shards cross process boundaries."""
    import numpy as np

    from flows.pipeline import labels_flow
    from stages.common import get_store
    from storage.labels import label_dataset

    def rows(root, **changes):
        cfg = make_config(family, root, **changes)
        ref = labels_flow(cfg)
        table = label_dataset(get_store(cfg.store.settings()), ref.fingerprint).read()
        return {r["sample_id"]: (r["answer"], np.asarray(r["grounding"])) for r in table.to_pylist()}

    threads = rows(str(tmp_path / "a"))
    dask = rows(str(tmp_path / "b"), **{"runner.kind": "dask", "runner.n_workers": 2, "runner.processes": True})
    assert threads.keys() == dask.keys() and len(threads) == 12
    for sid, (answer, grounding) in threads.items():
        assert dask[sid][0] == answer
        np.testing.assert_allclose(dask[sid][1], grounding, rtol=1e-5)


def test_full_flow_on_s3(family, moto_server, s3_settings, tmp_path, monkeypatch):
    from flows.pipeline import sdrpn
    from storage.store import Store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    cfg = make_config(family, s3_settings.root, **{"store.endpoint_url": moto_server["endpoint"]})
    summary = sdrpn(cfg)
    assert summary["rpn"].startswith("s3://") and summary["eval"][0].startswith("s3://")
    store = Store(cfg.store.settings())
    assert not store.ls("_prefect")  # no Prefect result records (pickles) in the shared bucket: the store is the cache
    import requests

    artifacts = _artifacts()
    for key in ("sdrpn-test-gallery-synthetic", "sdrpn-test-score-bars", "sdrpn-test-loss-curve"):  # pictures
        assert artifacts[key].type == "image" and artifacts[key].description, key
        got = requests.get(artifacts[key].data, timeout=10)
        assert got.status_code == 200 and got.content[:8] == b"\x89PNG\r\n\x1a\n", key
        assert got.headers["Content-Type"] == "image/png"  # a browser shows it
    outputs = artifacts["sdrpn-test-outputs"].data
    assert f"]({moto_server['endpoint']}/" in outputs and "s3://" in outputs  # presigned links, and the URL as text
    assert "![" in artifacts["sdrpn-test-report"].data and "base64" not in artifacts["sdrpn-test-report"].data
    _every_object_has_its_content_type(store)

    from stages.release import fetch_release

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server["endpoint"])
    shared = fetch_release(summary["release"])  # an s3:// release, fetched and verified
    assert {"rpn.safetensors", "rpn_config.json", "inference.json", "README.md"} <= {p.name for p in shared.iterdir()}
    calls = Calls(monkeypatch)
    versions = len([a for a in _artifacts(progress=True) if (a.key or "").startswith("sdrpn-test-")])
    time.sleep(1.1)  # a presigned URL is signed to the second
    assert sdrpn(cfg)["scores"] == summary["scores"] and calls.n == {}
    fresh = _artifacts()
    assert len([a for a in _artifacts(progress=True) if (a.key or "").startswith("sdrpn-test-")]) == versions
    for key in ("sdrpn-test-outputs", "sdrpn-test-report", "sdrpn-test-score-bars"):  # re-signed in place
        assert fresh[key].id == artifacts[key].id and fresh[key].data != artifacts[key].data, key
        links = re.findall(r"https?://[^\s)\"'<>`]+", fresh[key].data)
        assert links and all(requests.get(u, timeout=10).status_code == 200 for u in links), key


def _every_object_has_its_content_type(store) -> None:
    """Every object the run wrote carries its type (S3's default, `binary/octet-stream`, makes a browser download a
    model card instead of showing it)."""
    from storage.files import content_type

    store.fs.invalidate_cache()
    paths = store.fs.find(store.root_path)
    assert len(paths) > 20
    for path in paths:
        head = store.fs.info(path, refresh=True)
        assert head.get("ContentType") == content_type(path), (path, head.get("ContentType"))


def test_cli_run_then_eval(family, tmp_path, capsys):
    from flows.cli import main

    cfg = make_config(family, str(tmp_path / "store"))
    path = tmp_path / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "synthetic  baseline  score" in out and "synthetic  sdrpn     score" in out and "report:" in out
    assert main(["eval", str(path)]) == 0  # the newest RPN for the model is found in the store
    assert "synthetic  sdrpn     score" in capsys.readouterr().out


def test_shipped_nano_loads_from_the_artifact_store_and_runs_a_short_pipeline(
    tmp_path, s3_settings, moto_server, monkeypatch
):
    """The embedded default: the shipped sdrpn-nano goes into the store (here S3), loads back with
    `from_pretrained`, and a shortened pipeline on it produces every row of the table."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from flows.pipeline import sdrpn
    from stages.common import get_store
    from stages.model import SHIPPED_NANO, resolve_model
    from storage.artifacts import ArtifactStore

    cfg = PipelineConfig.from_yaml(ROOT / "configs" / "default.yaml").model_copy(deep=True)
    raw = cfg.model_dump(mode="json")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    raw["store"] = {**raw["store"], "root": s3_settings.root, "endpoint_url": moto_server["endpoint"]}
    raw["train_data"]["n"] = 16
    raw["eval"]["datasets"][0]["n"] = 6
    raw["train"]["epochs"] = 1
    cfg = PipelineConfig.model_validate(raw)
    store = get_store(cfg.store.settings())
    ref = resolve_model(cfg.model, store)
    assert ref.path == str(SHIPPED_NANO)
    local = ArtifactStore(store).fetch_dir("models", ref.fingerprint, tmp_path / "fetched")
    model = LlavaForConditionalGeneration.from_pretrained(local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    assert model.config.vision_config.image_size == 64 and model.num_parameters() > 1_000_000
    assert tokenizer.tokenize("what is the digit in the red box ?")[-3:] == ["red", "box", "?"]
    summary = sdrpn(cfg)
    assert {s["method"] for s in summary["scores"]} == {"baseline", "sdrpn", "vicrop", "oracle"}
    assert all(s["samples"] == 6 for s in summary["scores"])


def test_nano_base_stage_trains_once_commits_to_the_store_and_is_cached(tmp_path, monkeypatch):
    """`model.retrain: true` trains sdrpn-nano from scratch in the `nano_base` task (a seeded, shortened recipe
    here), commits it to the store, and a rerun takes it from the cache without training."""
    from flows.pipeline import labels_flow
    from sdrpn_core.synthetic import nano as nano_mod
    from stages import model as model_stage
    from stages.common import get_store
    from storage.artifacts import ArtifactStore

    recipe = {"phase1_steps": 2, "phase2_steps": 1, "phase3_steps": 1, "batch_size": 4}
    cfg = make_config(
        "llava", str(tmp_path / "store"), **{"model": {"source": "nano", "retrain": True, "nano": recipe}}
    )
    trained = []
    real = nano_mod.train_nano
    monkeypatch.setattr(nano_mod, "train_nano", lambda *a, **k: trained.append(1) or real(*a, **k))
    # a 4-step model answers with EOS at once, so the labels stage (after nano_base) fails as it should, naming why
    t0 = time.time()
    with pytest.raises(ValueError, match="all were rejected"):
        labels_flow(cfg)
    fp = model_stage.nano_base_fingerprint(recipe)
    assert trained == [1] and ArtifactStore(get_store(cfg.store.settings())).is_committed("nano_base", fp)
    assert _task_states(t0)["nano-base"] == {"Completed"}
    t1 = time.time()
    with pytest.raises(ValueError, match="all were rejected"):
        labels_flow(cfg)
    assert trained == [1] and _task_states(t1)["nano-base"] == {"Cached"}
    assert fp != model_stage.nano_base_fingerprint({**recipe, "seed": 1})


# -- issue #12: a store others can write to ---------------------------------------------------------------------


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
    from stages import labels as labels_stage
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
    from stages import teacher as teacher_stage

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


def _nano_config(root: str, **train) -> PipelineConfig:
    raw = PipelineConfig.from_yaml(ROOT / "configs" / "default.yaml").model_dump(mode="json")
    raw["train_data"]["n"] = 300
    raw["eval"]["datasets"][0]["n"] = 60
    raw["eval"]["methods"] = ["baseline", "sdrpn", "oracle"]
    raw["store"]["root"] = root
    raw["train"] = {**(raw.get("train") or {}), **train}
    return PipelineConfig.model_validate(raw)


def test_the_nano_default_reads_small_details_with_sd_rpn_and_a_worse_rpn_is_not_promoted(tmp_path, monkeypatch):
    """The headline claim, loosely, within the CI budget: on a held-out slice of the default task (seed 1000,
    never trained on) with the shipped sdrpn-nano and an RPN trained here on 300 scenes, SD-RPN beats the baseline
    by a wide margin and the oracle crop beats both (full figures: `python benchmarks/nano_gain.py`).

    Then the promotion gate: that RPN is the first, so it is promoted; a retrained one that learned nothing (a
    learning rate a million times too small) is evaluated, compared on the same samples, rejected: the run ends
    Completed with the reason, the pointer is unchanged, the challenger's release is kept, the event carries the
    scores, and `sdrpn eval` keeps evaluating the champion. A rerun does not decide (or announce) again."""
    from flows.pipeline import current_rpn, sdrpn
    from stages.common import get_store
    from storage.champion import Champions

    root = str(tmp_path / "store")
    first = sdrpn(_nano_config(root))
    scores = {s["method"]: s["score"] for s in first["scores"]}
    assert scores["sdrpn"] >= scores["baseline"] + 25, scores
    assert scores["oracle"] > scores["sdrpn"], scores
    assert first["promotion"]["promoted"]
    champions = Champions(get_store(_nano_config(root).store.settings()))
    champion = champions.current(first["model"])
    assert champion is not None and first["release"].endswith(champion.release)

    t0 = time.time()
    state = sdrpn(_nano_config(root, lr=1e-9), return_state=True)
    assert state.name == "Completed" and "REJECTED" in state.message, state.message
    worse = state.result()
    decision = worse["promotion"]
    assert not decision["promoted"] and worse["rpn"] != first["rpn"]
    (row,) = decision["rows"]
    assert row["champion"] == scores["sdrpn"] and row["challenger"] < row["champion"] and not row["passes"]
    assert champions.current(first["model"]) == champion  # the champion stays
    assert (Path(worse["release"]) / "rpn.safetensors").exists()  # the challenger's release kept for inspection
    assert [d["promoted"] for d in champions.history(first["model"])] == [True, False]
    (event,) = _events("sdrpn.rpn.rejected", t0)
    assert event["payload"]["rows"][0]["challenger"] == row["challenger"]
    assert event["resource"]["prefect.resource.id"] == f"sdrpn.model.{first['model']}"
    assert "Rejected" in _artifacts()["sdrpn-default-promotion"].data

    calls = Calls(monkeypatch)
    again = sdrpn(_nano_config(root, lr=1e-9))
    assert calls.n == {} and again["promotion"]["id"] == decision["id"]  # the recorded decision, not a new one
    assert len(champions.history(first["model"])) == 2 and len(_events("sdrpn.rpn.rejected", t0)) == 1

    from prefect import flow

    from flows.pipeline import _model

    @flow
    def which() -> str:
        return current_rpn(get_store(_nano_config(root).store.settings()), _model(_nano_config(root))).url

    assert which() == first["rpn"]  # what `sdrpn eval` evaluates: the champion, not the newest trained


def test_cli_labels_then_train(tmp_path, capsys, monkeypatch):
    """`sdrpn labels` and `sdrpn train`: the sub-flows from the command line; train reuses the labels it finds."""
    import yaml

    from flows.cli import main

    cfg = make_config("llava", str(tmp_path / "store"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["labels", str(path)]) == 0
    out = capsys.readouterr().out
    assert "labels: " in out and "(12 samples, 12 usable)" in out
    labels_url = out.split("labels: ")[1].split(" ")[0]
    calls = Calls(monkeypatch)
    assert main(["train", str(path)]) == 0
    assert calls.n == {"train": 1}  # no teacher or label work: found in the store
    out = capsys.readouterr().out
    rpn_url = out.split("RPN: ")[1].split(" ")[0]
    assert (Path(rpn_url) / "rpn.safetensors").exists() and Path(labels_url).is_dir() and "steps, final loss" in out


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


PIPELINE_WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from flows.pipeline import sdrpn
    from stages.config import PipelineConfig
    sdrpn(PipelineConfig.model_validate_json({cfg!r}))
    """
)


def _committed_pieces(root: Path) -> int:
    return len(list((root / "eval-piece").glob("*/_COMMITTED.json")))


def _predictions(url: str) -> list[tuple]:
    import pyarrow.parquet as pq

    table = pq.read_table(Path(url) / "predictions.parquet", columns=["sample_id", "method", "prediction", "score"])
    return [tuple(r.values()) for r in table.to_pylist()]


def test_evaluation_killed_mid_run_resumes_only_missing_pieces_and_equals_a_dask_run(tmp_path, monkeypatch):
    """A pipeline killed (SIGKILL) while evaluating keeps the pieces it committed; the rerun answers only the rest.
    Its scores and predictions equal those of an uninterrupted evaluation on two Dask worker *processes*."""
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import sdrpn

    root = tmp_path / "store"
    cfg = make_config(
        "llava", str(root), **{"eval.shards": 4, "eval.datasets": [{"kind": "synthetic", "n": 16, "seed": 99}]}
    )
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", PIPELINE_WORKER.format(root=str(ROOT), cfg=cfg.model_dump_json())],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _committed_pieces(root) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    kept = _committed_pieces(root)
    assert 3 <= kept < 16, f"not killed mid-evaluation ({kept} pieces): {proc.stderr.read().decode()[-2000:]}"
    assert not list((root / "eval").glob("*/_COMMITTED.json"))  # nothing merged yet

    calls = Calls(monkeypatch)
    resumed = sdrpn(cfg)
    assert calls.pieces_answered == 16 - kept  # the teacher, labels and RPN were cached; only missing pieces ran

    for folder in ("eval", "eval-piece"):  # an uninterrupted evaluation, on Dask, with the same RPN
        for marker in (root / folder).glob("*/_COMMITTED.json"):
            marker.unlink()
    dask_cfg = cfg.model_copy(update={"runner": cfg.runner.model_copy(update={"kind": "dask", "n_workers": 2})})
    calls.n.clear()
    on_dask = sdrpn(dask_cfg)
    assert calls.n == {}  # every piece was answered on the Dask workers, none in this process
    assert _committed_pieces(root) == 16

    def measured(summary):
        return [(s["method"], s["score"], s["samples"]) for s in summary["scores"]]

    assert measured(on_dask) == measured(resumed)
    assert _predictions(on_dask["eval"][0]) == _predictions(resumed["eval"][0])
    assert len(_predictions(resumed["eval"][0])) == 16 * 4


def test_adding_a_method_evaluates_only_its_pieces(tmp_path, monkeypatch):
    from flows.pipeline import sdrpn

    root = str(tmp_path / "store")
    first = sdrpn(make_config("llava", root, **{"eval.methods": ["baseline", "sdrpn"], "eval.shards": 2}))
    calls = Calls(monkeypatch)
    more = sdrpn(make_config("llava", root, **{"eval.methods": ["baseline", "sdrpn", "oracle"], "eval.shards": 2}))
    assert calls.n == {"eval": 2}  # the oracle's two shards
    old = {s["method"]: s["score"] for s in first["scores"]}
    new = {s["method"]: s["score"] for s in more["scores"]}
    assert set(new) == {"baseline", "sdrpn", "oracle"} and {m: new[m] for m in old} == old


@dataclasses.dataclass(frozen=True)
class CentreOptions:
    fraction: float = 0.5  # the crop's side, as a fraction of the image's


def test_a_method_with_its_own_setting_is_its_module_and_a_line_in_the_config(tmp_path, monkeypatch):
    """A centre crop with a setting of its own: an options dataclass and one `register_method` (here, in the test);
    the config names the method and sets `eval.options.centre`. The answerer receives the setting, the pieces are
    keyed on it, so changing it answers the centre crop's pieces and nothing else."""
    from flows.pipeline import eval_flow
    from sdrpn_core.infer import answer_with_boxes_batch
    from sdrpn_core.methods import METHODS, EvalMethod
    from stages.config import ConfigError

    seen = []

    def centre(settings, images, prompts, boxes):
        f = settings.options.fraction
        seen.append(f)
        sizes = [im.image.size for im in images]
        crops = [
            [(int(w * (1 - f) / 2), int(h * (1 - f) / 2), int(w * (1 + f) / 2), int(h * (1 + f) / 2))] for w, h in sizes
        ]
        return answer_with_boxes_batch(settings.adapter, images, prompts, crops, settings.max_new_tokens)

    monkeypatch.setitem(METHODS, "centre", EvalMethod("centre", centre, "+centre crop", options=CentreOptions))
    root = str(tmp_path / "store")

    def config(**options):
        changes = {"eval.methods": ["baseline", "centre"], "eval.shards": 2, "eval.options": {"centre": options}}
        return make_config("llava", root, **changes)

    first = eval_flow(config())
    assert set(seen) == {0.5} and {s["method"] for r in first for s in r.scores} == {"baseline", "centre"}
    calls = Calls(monkeypatch)
    eval_flow(config(fraction=0.25))
    assert calls.n == {"eval": 2} and seen[-1] == 0.25  # the centre crop's two shards; the baseline's are cached
    calls.n.clear()
    eval_flow(config(fraction=0.25))
    assert calls.n == {}
    with pytest.raises((ValueError, ConfigError), match=r"eval.options.centre: unknown \['size'\]"):
        config(size=3)


def test_two_gloo_ranks_train_as_one_process_with_the_same_effective_batch(tmp_path, monkeypatch):
    """torchrun, 2 CPU processes (gloo), effective batch 8 = 2 per rank × 2 accumulated × 2 ranks, against one
    process accumulating 4 micro-batches of 2: the same loss history and final weights, within float32 summation
    order (rtol 1e-4). 11 micro-batches per epoch: the short last step gives one rank 2 micro-batches, the other 1.
    The same 2 ranks as two nodes of one rank (a c10d rendezvous, the second node started with the command the
    stage gives) train the same weights."""
    from dataclasses import replace

    import numpy as np
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file

    from flows.pipeline import labels_flow
    from stages.common import get_store
    from stages.model import resolve_model
    from stages.train_ranks import _job

    cfg = make_config("llava", str(tmp_path / "store"), **{"train_data.n": 22})
    labels = labels_flow(cfg)
    store = get_store(cfg.store.settings())
    model = resolve_model(cfg.model, store)
    preset = cfg.teacher.preset_obj()
    base = replace(cfg.train.params(preset), batch_size=2, effective_batch=8, epochs=2, checkpoint_every=2)
    assert labels.rows == 22 and base.keep_all_ignore  # every sample trains: 11 micro-batches of 2
    one = train_stage.train(store, model, labels, base, "one-process", preset.name)
    seen: list[tuple[int, int]] = []
    two = train_stage.train(
        store, model, labels, replace(base, world_size=2), "two-ranks", preset.name, lambda d, t: seen.append((d, t))
    )
    assert one.steps == two.steps == 6 and seen and seen[-1] == (6, 6)

    def logs(ref):
        return pq.read_table(Path(ref.url) / "train_log.parquet").to_pylist()

    for a, b in zip(logs(one), logs(two), strict=True):
        assert a["valid_tokens"] == b["valid_tokens"] and a["lr"] == b["lr"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    w1, w2 = (load_file(Path(r.url) / "rpn.safetensors") for r in (one, two))
    assert w1.keys() == w2.keys()
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    start = load_file(_initial(store, model, base))
    assert any(not np.allclose(w1[k], start[k]) for k in w1)  # training moved the weights

    nodes = _train_on_two_nodes(store, model, labels, replace(base, world_size=2), preset.name, monkeypatch)
    w4 = load_file(Path(nodes.url) / "rpn.safetensors")
    for k in w1:
        np.testing.assert_allclose(w4[k], w1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # a node started by hand with the wrong rank count: the group refuses to train (the effective batch would change)
    job = tmp_path / "job.json"
    job.write_text(json.dumps(_job(store, model, labels, replace(base, world_size=2), "wrong-size", preset.name)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    wrong = subprocess.run(
        [*cmd, "-m", "stages.train_ranks", str(job)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode != 0 and "the group has 1 ranks, train.world_size is 2" in wrong.stdout + wrong.stderr

    # one rank killed mid-training: the stage fails naming the rank log; the rerun resumes from the checkpoint
    killed = _train_killing_a_rank(store, model, labels, replace(base, world_size=2, checkpoint_every=1), preset.name)
    assert "torchrun training ended" in killed
    assert train_stage.latest_checkpoint(train_stage.train_scratch(store, "killed") / "checkpoints") is not None
    said = _Recorded()
    logging.getLogger("stages.train").addHandler(said)
    try:
        again = train_stage.train(
            store, model, labels, replace(base, world_size=2, checkpoint_every=1), "killed", preset.name
        )
    finally:
        logging.getLogger("stages.train").removeHandler(said)
    assert any("interrupted run of this training" in m for m in said.messages)  # the resume is said, not silent
    w3 = load_file(Path(again.url) / "rpn.safetensors")
    for k in w1:
        np.testing.assert_allclose(w3[k], w2[k], rtol=1e-5, atol=1e-7, err_msg=k)


def _train_on_two_nodes(store, model, labels, params, preset: str, monkeypatch):
    """The train stage as node 1 of 2 (one rank each, c10d rendezvous on this machine), in a thread; node 2 is
    started by hand with `node_command`, as the stage's log tells a user to."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rdzv = f"--nnodes 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{port} --rdzv-id sdrpn-test"
    with monkeypatch.context() as patch:
        patch.setenv("SDRPN_TORCHRUN_ARGS", rdzv)
        return _start_both_nodes(store, model, labels, params, preset)


def _start_both_nodes(store, model, labels, params, preset: str):
    import threading

    from stages.train_ranks import node_command

    out: dict = {}

    def run():
        try:
            out["ref"] = train_stage.train(store, model, labels, params, "two-nodes", preset)
        except Exception as e:  # reported by the assertion below
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    job = train_stage.train_scratch(store, "two-nodes") / "job.json"
    deadline = time.time() + 60
    while time.time() < deadline and not job.exists():
        time.sleep(0.05)
    cmd, n = node_command(job, params.world_size)
    assert n == 2 and cmd[cmd.index("--nproc-per-node") + 1] == "1"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    other = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    thread.join(timeout=300)
    assert other.returncode == 0, other.stderr[-3000:]
    assert "ref" in out, out.get("error")
    return out["ref"]


class _Recorded(logging.Handler):
    """Records messages of one logger (Prefect's logging set-up replaces the root handlers pytest's caplog uses)."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _train_killing_a_rank(store, model, labels, params, preset: str) -> str:
    """Train as "killed" in a thread; SIGKILL one rank once a checkpoint past step 1 exists → the stage's error."""
    import threading

    import psutil

    errors: list[str] = []

    def run():
        try:
            train_stage.train(store, model, labels, params, "killed", preset)
        except RuntimeError as e:
            errors.append(str(e))

    thread = threading.Thread(target=run)
    thread.start()
    checkpoints = train_stage.train_scratch(store, "killed") / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(checkpoints.glob("step-00000000[2-5]")):
        time.sleep(0.05)
    ranks = [p for p in psutil.process_iter(["cmdline"]) if "stages.train_ranks" in " ".join(p.info["cmdline"] or [])]
    ranks = [p for p in ranks if "torch.distributed.run" not in " ".join(p.info["cmdline"])]
    assert len(ranks) == 2, [p.info["cmdline"] for p in ranks]
    ranks[-1].kill()
    thread.join(timeout=120)
    assert errors, "the training finished although a rank was killed"
    return errors[0]


def _initial(store, model, params) -> Path:
    """The untrained RPN's weights (what training starts from), to show training moved them."""
    import torch

    from sdrpn_core.rpn import RoIPredictor
    from stages.common import cache_dir, load_model

    torch.manual_seed(params.seed)
    out = cache_dir("initial-rpn")
    RoIPredictor.from_adapter(load_model(model), params.K, params.T).save(out)
    return out / "rpn.safetensors"


def test_batched_evaluation_gives_the_batch_1_predictions(family, tmp_path, monkeypatch):
    """eval.batch_size 3 over 2 shards re-answers every piece (throughput changes) with the same predictions and
    scores as batch 1; protocol.json records the batch size. The batches are read ahead in a thread, as on a GPU."""
    from flows.pipeline import sdrpn

    root = str(tmp_path / "store")
    one = sdrpn(make_config(family, root, **{"eval.datasets": [{"kind": "synthetic", "n": 7, "seed": 99}]}))
    calls = Calls(monkeypatch)
    monkeypatch.setattr(eval_stage, "_reads_ahead", lambda adapter: True)
    changes = {"eval.batch_size": 3, "eval.shards": 2, "eval.datasets": [{"kind": "synthetic", "n": 7, "seed": 99}]}
    three = sdrpn(make_config(family, root, **changes))
    assert calls.n == {"eval": 2} and calls.pieces_answered == 4 * 2  # a task per shard, its methods together
    assert _predictions(three["eval"][0]) == _predictions(one["eval"][0])
    assert [(s["method"], s["score"]) for s in three["scores"]] == [(s["method"], s["score"]) for s in one["scores"]]
    protocol = json.loads((Path(three["eval"][0]) / "protocol.json").read_text())
    assert protocol["batch_size"] == 3 and protocol["shards"] == 2


def test_predict_on_the_runs_release_uses_what_the_evaluation_used(tmp_path):
    """τ, mode and answer length come from the release the run wrote, not predict's built-in defaults."""
    from flows.cli import main
    from flows.pipeline import sdrpn
    from tests.conftest import random_image

    summary = sdrpn(make_config("llava", str(tmp_path / "store"), **{"eval.mode": "box", "eval.threshold": 0.07}))
    protocol = json.loads((Path(summary["eval"][0]) / "protocol.json").read_text())
    image = tmp_path / "img.png"
    random_image(3, (96, 96)).save(image)
    args = ["predict", str(image), "what is the digit in the red box ?", "--rpn", summary["release"]]
    assert main([*args, "--out", str(tmp_path / "p")]) == 0
    settings = json.loads((tmp_path / "p" / "answer.json").read_text())["settings"]
    assert settings["source"] == "evaluation: synthetic"
    assert (settings["threshold"], settings["mode"], settings["max_new_tokens"]) == (0.07, "box", 3)
    assert protocol["roi_threshold"] == 0.07 and protocol["roi_mode"] == "box"
    current = ["predict", str(image), "what?", "--rpn", "current", "--store", str(tmp_path / "store")]
    assert main([*current, "--out", str(tmp_path / "c")]) == 0  # the store's champion: this run's release
    assert json.loads((tmp_path / "c" / "answer.json").read_text())["settings"] == settings
    with pytest.raises(SystemExit, match="0 champions"):
        main([*current, "--model", str(tmp_path / "elsewhere")])


def test_a_new_stage_is_its_declaration_and_a_line_in_the_flow(tmp_path):
    """A stage module declares `Stage(name, run, lookup, key, …)`; the flow calls `stage_task(STAGE)` with the
    stage's inputs. Nothing else is written for it: the task computes the output's fingerprint from the key (and
    the stage's code), is named from its arguments, shows progress, commits through the stage, looks its output
    up once per call and is `Cached` when found, and retries a transient failure."""
    from prefect import flow

    from flows.pipeline import _run
    from storage.store import Store, StoreSettings
    from tasks.stages import stage_task

    ran, failures, looked = [], [], []

    def tally(store: Store, label: str, words: list[str], fp: str, progress=None) -> dict:
        if not failures:
            failures.append(1)
            raise ConnectionResetError("connection reset by peer")
        ran.append(fp)
        for k in range(len(words)):
            progress(k + 1, len(words))
        store.write_json({"n": len(words)}, "tally", fp, "result.json")
        return {"n": len(words)}

    def found(store: Store, fp: str) -> dict | None:
        looked.append(fp)
        return store.read_json("tally", fp, "result.json") if store.exists("tally", fp, "result.json") else None

    TALLY = Stage(
        "tally",
        run=tally,
        lookup=found,
        key=lambda words: {"words": sorted(words)},
        run_name="tally[{label}]",
        progress="tallying {label}: words",
    )

    @flow
    def words_flow(root: str) -> list:
        settings = StoreSettings(root=root)
        return [_run(stage_task(TALLY), settings, "abc", ["a", "b", "c"]) for _ in range(2)]

    t0 = time.time()
    (first, first_cached), (second, second_cached) = words_flow(str(tmp_path / "store"))
    assert first == second == {"n": 3} and (first_cached, second_cached) == (False, True)
    assert ran == [TALLY.fingerprint(words=["c", "b", "a"])] and failures == [1]  # retried once; the key is sorted
    assert looked == [ran[0]] * 3  # one lookup per call (the failed attempt's, its retry's, the second call's)
    assert _run_names(t0)[1].count("tally[abc]") == 2
    progress = _artifacts(progress=True, key="sdrpn-tally-abc")  # outside a config's flow: no config in it
    assert progress and progress[-1].data == 100.0 and progress[-1].description == "tallying abc: words"


def _count_labelled(monkeypatch) -> list[int]:
    """Rows handed to the labeller (`stages.labels.label_table`), per call."""
    counts: list[int] = []
    real = labels_stage.label_table

    def counting(records, params):
        counts.append(len(records))
        return real(records, params)

    monkeypatch.setattr(labels_stage, "label_table", counting)
    return counts


def _label_rows(url: str) -> list[dict]:
    import pyarrow.parquet as pq

    rows = [r for f in sorted(Path(url).rglob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return sorted(rows, key=lambda r: r["sample_id"])


def _week(folder: Path, name: str, seed: int, n: int) -> None:
    """A week's new training rows: synthetic scenes saved as files, one JSONL manifest beside them."""
    from sdrpn_core.synthetic import make_split

    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for s in make_split(n, seed, canvas=96):
        image = f"images/{name}-{s.sample_id}.png"
        s.image.save(folder / image)
        lines.append(
            json.dumps(
                {
                    "id": f"{name}-{s.sample_id}",
                    "image": image,
                    "question": s.question,
                    "answers": [s.answer],
                    "box": list(s.box),
                }
            )
        )
    (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def test_training_data_that_grows_by_manifests_sends_only_the_new_rows_through_the_teacher(tmp_path, monkeypatch):
    """`train_data.path` names a folder of JSONL manifests: each run takes every manifest present; a new week's file
    sends its rows (and only those) through the teacher, and a run with nothing new is cached throughout."""
    from flows.pipeline import sdrpn

    incoming, root = tmp_path / "incoming", str(tmp_path / "store")
    _week(incoming, "week1", 11, 8)
    config = make_config("llava", root, **{"train_data": {"kind": "jsonl", "path": str(incoming)}})
    first = sdrpn(config)
    _week(incoming, "week2", 12, 4)
    calls = Calls(monkeypatch)
    labelled = _count_labelled(monkeypatch)
    second = sdrpn(config)
    assert calls.samples_extracted == 4 and calls.n["train"] == 1  # the new rows alone, then a new RPN
    assert sum(labelled) == 4  # the labeller too: the 8 earlier samples' label rows are copied, not made again
    assert second["rpn"] != first["rpn"]
    earlier, grown = _label_rows(first["labels"]), _label_rows(second["labels"])
    assert len(grown) == 12 and all(row in grown for row in earlier)  # copied exactly, under the same ids
    calls.n.clear()
    calls.samples_extracted = 0
    third = sdrpn(config)
    assert calls.n == {} and third["rpn"] == second["rpn"]  # nothing arrived: every stage cached


def _task_logs(task_name: str, since: float) -> list:
    """The log lines the API holds for the task runs of this name started after `since`."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId, TaskRunFilter, TaskRunFilterName

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[task_name])))
            ids = [r.id for r in runs if r.start_time and r.start_time.timestamp() >= since]
            return await client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=ids)))

    return asyncio.run(read())


def test_stage_lines_reach_the_task_runs_logs_in_the_ui(tmp_path):
    """The stage modules log through their own loggers (counts, rate, ETA, running scores); a run sends those lines
    to the task run that wrote them, where the UI (and the API) shows them."""
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import sdrpn

    t0 = time.time()
    sdrpn(make_config("llava", str(tmp_path / "store")))
    APILogHandler().flush()  # the batch the log worker still holds
    train = _task_logs("train", t0)
    assert any(r.name.startswith("sdrpn_core") and "/s, ETA" in r.message for r in train), [r.message for r in train]
    piece = _task_logs("evaluate[synthetic 1/1: baseline, sdrpn, vicrop, oracle]", t0)
    assert any(r.name == "stages.evaluate" and "baseline=" in r.message for r in piece), [r.message for r in piece]


def test_the_documented_rejection_automation_is_accepted_by_the_server():
    """`configs/automations/notify-on-rejection.yaml`, with a real notification block's id put in as the README
    says, is an automation the server stores, triggered by `sdrpn.rpn.rejected` on any model."""
    import asyncio

    import yaml
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    block = CustomWebhookNotificationBlock(name="hook", url="http://127.0.0.1:9/hook")
    block_id = block.save("sdrpn-test-hook", overwrite=True)
    (raw,) = yaml.safe_load((ROOT / "configs" / "automations" / "notify-on-rejection.yaml").read_text())["automations"]
    raw["actions"][0]["block_document_id"] = str(block_id)

    async def create_and_read():
        async with get_client() as client:
            made = await client.create_automation(AutomationCore.model_validate(raw))
            return await client.read_automation(made)

    stored = asyncio.run(create_and_read())
    assert stored.trigger.expect == {"sdrpn.rpn.rejected"} and stored.actions[0].block_document_id == block_id
