"""The pipeline through a real (temporary) Prefect API: end to end on both families, what a rerun or a change
recomputes, retries, Dask, S3, the CLI, growing data, stage logs in the UI, a new stage."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from datetime import UTC
from pathlib import Path

import pytest

from stages import data as data_stage
from stages import evaluate as eval_stage
from stages import labels as labels_stage
from stages.common import Stage
from stages.config import PipelineConfig
from storage.fingerprint import hash_obj
from tests.flowkit import Calls, _artifacts, _task_states, make_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api", "flow_cache")]

ROOT = Path(__file__).resolve().parents[1]


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
    raw["eval"]["calibration"]["n"] = 4
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
