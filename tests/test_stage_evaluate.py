"""The evaluate stage's functions called directly, without Prefect (the flow tests run them through the flows):
what a piece's key reads, how rows split into shards, what a piece holds, and that a shard answers only the pieces
the store lacks. Tiny LLaVA, a random RPN, four synthetic scenes."""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, replace
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sdrpn_core.methods import EvalParams
from stages import evaluate as stage
from stages.answering import prepare_run, sample_of
from stages.code import library_versions
from stages.common import read_manifest
from stages.config import DatasetSpec, ModelSpec
from stages.data import build_manifest
from stages.evaluate import EvalPiece, by_shard, piece_lookup, plan_pieces, shard_of
from stages.model import resolve_model
from storage.artifacts import ArtifactStore
from storage.store import Store, StoreSettings
from tests.test_calibrate import _random_rpn

PARAMS = EvalParams(methods=("baseline", "sdrpn", "oracle"), threshold=0.3, max_new_tokens=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(store, model, rpn, dataset): committed as the flows commit them."""
    tmp = tmp_path_factory.mktemp("evaluate")
    store = Store(StoreSettings(root=str(tmp / "store")))
    model = resolve_model(ModelSpec(source="tiny", tiny={"image_size": 32, "patch_size": 8}), store)
    rpn = _random_rpn(store, model, tmp)
    data = build_manifest(DatasetSpec(kind="synthetic", n=4, seed=5, canvas=96), store)
    return SimpleNamespace(store=store, model=model, rpn=rpn, data=data)


def _fps(pieces: list[EvalPiece]) -> dict[tuple[str, int], str]:
    return {(p.method, p.shard): p.fingerprint for p in pieces}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7])
def test_shards_are_contiguous_cover_every_row_once_and_differ_by_at_most_one(n):
    rows = [{"i": i} for i in range(5)]
    shards = [shard_of(rows, k, n) for k in range(n)]
    assert [r for s in shards for r in s] == rows
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shard_of(rows, 0, 2) == rows[:2] and shard_of(rows, 1, 2) == rows[2:]


def test_pieces_come_in_the_configs_method_order_one_per_shard_and_leave_sdrpn_out_without_an_rpn(world):
    pieces = plan_pieces(world.store, world.model, world.rpn, world.data, PARAMS, shards=2)
    assert [(p.method, p.shard, p.n_shards) for p in pieces] == [
        (m, k, 2) for m in ("baseline", "sdrpn", "oracle") for k in (0, 1)
    ]
    assert len({p.fingerprint for p in pieces}) == 6 and {p.benchmark for p in pieces} == {"synthetic"}
    assert pieces[3].name == "synthetic/sdrpn 2/2"
    without = plan_pieces(world.store, world.model, None, world.data, PARAMS, shards=2)
    assert [p.method for p in without] == ["baseline", "baseline", "oracle", "oracle"]
    # the RPN is in the SD-RPN pieces' keys only
    assert {k: v for k, v in _fps(pieces).items() if k[0] != "sdrpn"} == _fps(without)


@pytest.mark.parametrize(("asked", "made"), [(0, 1), (1, 1), (3, 3), (4, 4), (9, 4)])
def test_a_benchmark_splits_into_at_least_one_and_at_most_one_shard_per_row(world, asked, made):
    pieces = plan_pieces(world.store, world.model, None, world.data, replace(PARAMS, methods=("baseline",)), asked)
    assert [p.shard for p in pieces] == list(range(made)) and {p.n_shards for p in pieces} == {made}


@pytest.mark.parametrize(
    ("change", "moved"),
    [
        ({"threshold": 0.6}, {"sdrpn"}),
        ({"mode": "box"}, {"sdrpn"}),
        ({"reuse_kv": False}, {"sdrpn"}),
        ({"default_threshold": 0.2}, {"sdrpn"}),
        ({"model_key": "llava-1.5-13b"}, {"sdrpn"}),
        ({"max_new_tokens": 3}, {"baseline", "sdrpn", "oracle"}),
        ({"batch_size": 2}, {"baseline", "sdrpn", "oracle"}),
        ({"inputs": (("pad_square", False),)}, {"baseline", "sdrpn", "oracle"}),
        ({"protocol": "another harness"}, {"baseline", "sdrpn", "oracle"}),
        ({"gallery": 1}, set()),
        ({"vicrop_layer": 2}, set()),
    ],
)
def test_a_piece_is_keyed_on_what_its_method_reads(world, change, moved):
    before = _fps(plan_pieces(world.store, world.model, world.rpn, world.data, PARAMS, shards=2))
    after = _fps(plan_pieces(world.store, world.model, world.rpn, world.data, replace(PARAMS, **change), shards=2))
    assert {k[0] for k in before if before[k] != after[k]} == moved


def test_vicrop_pieces_key_on_their_layer(world):
    params = replace(PARAMS, methods=("vicrop", "baseline"))
    base = _fps(plan_pieces(world.store, world.model, None, world.data, params))
    other = _fps(plan_pieces(world.store, world.model, None, world.data, replace(params, vicrop_layer=2)))
    assert other[("vicrop", 0)] != base[("vicrop", 0)] and other[("baseline", 0)] == base[("baseline", 0)]


def test_shards_group_each_shards_pieces_in_plan_order(world):
    pieces = plan_pieces(world.store, world.model, world.rpn, world.data, PARAMS, shards=2)
    shards = by_shard(pieces)
    assert [[(p.method, p.shard) for p in s.pieces] for s in shards] == [
        [("baseline", k), ("sdrpn", k), ("oracle", k)] for k in (0, 1)
    ]
    assert shards[1].name == "synthetic 2/2: baseline, sdrpn, oracle"


def _predictions(store: Store, fp: str) -> list[dict]:
    return pq.read_table(io.BytesIO(ArtifactStore(store).read("eval-piece", fp, "predictions.parquet"))).to_pylist()


def test_a_shard_answers_once_and_commits_one_piece_per_method(world, monkeypatch, caplog):
    # batch 2 (the shard's two rows together); keys of their own: the other tests' commits are not found here
    params = replace(PARAMS, max_new_tokens=3, batch_size=2)
    shard = by_shard(plan_pieces(world.store, world.model, world.rpn, world.data, params, shards=2))[1]
    assert stage.shard_lookup(world.store, shard) is None
    answered: list[list[str]] = []
    real, real_prepare = stage.answer_pieces, stage.prepare_run
    monkeypatch.setattr(stage, "answer_pieces", lambda *a: answered.append([p.method for p in a[5]]) or real(*a))
    prepared: list[tuple[str, ...]] = []
    monkeypatch.setattr(stage, "prepare_run", lambda *a: prepared.append(a[4].methods) or real_prepare(*a))
    seen: list[tuple[int, int]] = []
    caplog.set_level("INFO", logger=stage.log.name)
    args = (world.store, world.model, world.rpn, world.data, params)
    refs = stage.evaluate_shard(*args, shard, lambda done, total: seen.append((done, total)))
    assert answered == [["baseline", "sdrpn", "oracle"]] and seen == [(2, 2)]
    assert "evaluate[synthetic 2/2: baseline, sdrpn, oracle]: 2/2" in caplog.text
    assert "pieces in the store" not in caplog.text  # none was: nothing to say
    assert [(r.method, r.shard, r.rows) for r in refs] == [(m, 1, 2) for m in ("baseline", "sdrpn", "oracle")]
    assert stage.shard_lookup(world.store, shard) == refs
    mine = [r["sample_id"] for r in shard_of(read_manifest(world.data, world.store), 1, 2)]
    arts = ArtifactStore(world.store)
    for ref in refs:
        rows = _predictions(world.store, ref.fingerprint)
        assert [(r["sample_id"], r["method"]) for r in rows] == [(s, ref.method) for s in mine]
        assert list(rows[0]) == list(stage.PIECE_COLUMNS)
        assert all(r["error"] == "" for r in rows) and rows[0]["seconds"] == rows[1]["seconds"] > 0  # one batch
        assert arts.manifest("eval-piece", ref.fingerprint)["meta"] == {
            "method": ref.method, "shard": 1, "of": 2, "rows": 2
        }  # fmt: skip
    protocols = {arts.read("eval-piece", r.fingerprint, "protocol.json") for r in refs}
    assert len(protocols) == 1  # one protocol, written beside every piece
    protocol = json.loads(protocols.pop())
    assert (protocol["rpn"], protocol["benchmark"], protocol["batch_size"]) == (world.rpn.fingerprint, "synthetic", 2)
    sdrpn_rows = _predictions(world.store, refs[1].fingerprint)
    assert all(len(r["roi_map"]) == int(np.prod(r["roi_grid"])) for r in sdrpn_rows)
    assert all(r["roi_map"] is None and r["roi"] == "" for r in _predictions(world.store, refs[0].fingerprint))
    # again: everything is found; with one piece gone, that piece alone is answered, its method alone run
    assert stage.evaluate_shard(*args, shard) == refs and len(answered) == 1
    world.store.rm("eval-piece", refs[2].fingerprint, recursive=True)
    caplog.clear()
    assert stage.evaluate_shard(*args, shard)[:2] == refs[:2]
    assert answered[1:] == [["oracle"]] and prepared[1:] == [("oracle",)]
    assert "evaluate[synthetic 2/2: baseline, sdrpn, oracle]: 2 of 3 pieces in the store" in caplog.text
    assert stage.evaluate_piece(*args, shard.pieces[0]) == refs[0]
    world.store.rm("eval-piece", refs[1].fingerprint, recursive=True)
    again = stage.evaluate_piece(*args, shard.pieces[1])  # a missing piece: answered with the RPN
    assert (again.method, again.fingerprint) == ("sdrpn", refs[1].fingerprint) and prepared[2:] == [("sdrpn",)]
    assert _predictions(world.store, again.fingerprint)[0]["roi_grid"] is not None


def test_an_unreadable_images_error_row_goes_to_every_piece(world, tmp_path):
    data = build_manifest(DatasetSpec(kind="synthetic", n=2, seed=6, canvas=96), world.store)
    rows = read_manifest(data, world.store)
    with open(rows[0]["image"], "wb") as f:  # the image breaks after the manifest was made
        f.write(b"not an image")
    params = replace(PARAMS, methods=("baseline", "oracle"))
    pieces = plan_pieces(world.store, world.model, None, data, params)
    refs = stage.answer_pieces(world.store, world.model, None, data, params, pieces)
    for ref in refs:
        got = [(r["sample_id"], r["method"], bool(r["error"])) for r in _predictions(world.store, ref.fingerprint)]
        assert got == [(rows[0]["sample_id"], "-", True), (rows[1]["sample_id"], ref.method, False)]


def test_a_piece_whose_marker_lacks_a_row_count_is_answered_again(world, caplog):
    piece = EvalPiece("synthetic", "baseline", 0, 1, "0123456789abcdef")
    assert piece_lookup(world.store, piece) is None
    ArtifactStore(world.store).put_files("eval-piece", piece.fingerprint, {"predictions.parquet": b"x"}, meta={})
    assert piece_lookup(world.store, piece) is None
    assert "marker lacks a row count" in caplog.text
    ArtifactStore(world.store).put_files("eval-piece", "fedcba9876543210", {"a": b"x"}, meta={"rows": 3})
    found = piece_lookup(world.store, replace(piece, fingerprint="fedcba9876543210", shard=0))
    assert (found.rows, found.method, found.shard) == (3, "baseline", 0)
    assert found.url == ArtifactStore(world.store).url("eval-piece", "fedcba9876543210")


def test_an_unreadable_image_is_an_error_row_and_the_others_are_answered(world, tmp_path):
    rows = read_manifest(world.data, world.store)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    rows[1] = {**rows[1], "image": str(tmp_path / "bad.jpg")}
    rows[2] = {**rows[2], "box": None}  # the oracle crop needs a box: it skips this row
    run = prepare_run(world.store, world.model, world.rpn, world.data, PARAMS)
    seen: list[tuple[int, int]] = []
    out = stage._answer_all(run, rows, "t", lambda done, total: seen.append((done, total)), batch_size=2)
    errors = [r for r in out if r["method"] == "-"]
    assert [r["sample_id"] for r in errors] == [rows[1]["sample_id"]] and errors[0]["error"]
    assert errors[0]["prediction"] == "" and errors[0]["seconds"] == 0.0
    ids = {m: [r["sample_id"] for r in out if r["method"] == m] for m in ("baseline", "sdrpn", "oracle")}
    good = [rows[i]["sample_id"] for i in (0, 2, 3)]
    assert ids == {"baseline": good, "sdrpn": good, "oracle": [good[0], good[2]]}
    # a batch's seconds are shared equally by its answered rows: (0, bad) then (2, 3)
    base = {r["sample_id"]: r["seconds"] for r in out if r["method"] == "baseline"}
    assert base[good[1]] == base[good[2]] != base[good[0]] and min(base.values()) > 0
    assert seen == [(2, 4), (4, 4)]


def test_rows_keep_the_answer_its_roi_and_map_and_an_empty_answer_keeps_the_error():
    sample = sample_of({"sample_id": "s1", "image": "x", "question": "q", "answers": ["a"]})
    assert stage._row(sample, "-", None, 0.0, "bad image") == {
        "sample_id": "s1",
        "method": "-",
        "prediction": "",
        "seconds": 0.0,
        "roi": "",
        "roi_map": None,
        "roi_grid": None,
        "error": "bad image",
    }
    plan = SimpleNamespace(prob=np.arange(6, dtype=np.float64).reshape(2, 3) / 10)
    roi = SimpleNamespace(plan=plan, pixel_boxes=[(1, 2, 3, 4)])
    row = stage._row(sample, "sdrpn", SimpleNamespace(text="42", roi=roi), 0.5)
    assert (row["prediction"], row["seconds"], row["roi"], row["error"]) == ("42", 0.5, "[[1, 2, 3, 4]]", "")
    assert row["roi_grid"] == [2, 3] and row["roi_map"] == np.float32([0, 0.1, 0.2, 0.3, 0.4, 0.5]).tolist()  # float32
    blank = SimpleNamespace(plan=SimpleNamespace(prob=None), pixel_boxes=[])
    no_map = stage._row(sample, "sdrpn", SimpleNamespace(text="", roi=blank), 1.0)
    assert (no_map["roi"], no_map["roi_map"], no_map["roi_grid"]) == ("[]", None, None)


def test_the_protocol_says_what_the_answers_were_made_with(world, monkeypatch):
    params = replace(PARAMS, mode="box", reuse_kv=False, batch_size=2, vicrop_layer=3)
    run = prepare_run(world.store, world.model, world.rpn, world.data, params)
    adapter, bench = run.settings.adapter, run.bench
    monkeypatch.setattr(adapter.model.generation_config, "repetition_penalty", 1.05)
    p = stage._protocol(run, world.model, world.rpn, world.data, params)
    assert (p["benchmark"], p["dataset"], p["rows"]) == ("synthetic", world.data.fingerprint, 4)
    assert p["rpn"] == world.rpn.fingerprint and p["vicrop_layer"] == 3
    assert (p["roi_threshold"], p["roi_mode"], p["kv_reuse"], p["batch_size"]) == (0.3, "box", False, 2)
    assert (p["max_new_tokens"], p["decoding"], p["harness"]) == (2, "greedy", params.protocol)
    assert (p["model"], p["model_path"], p["family"]) == (world.model.fingerprint, world.model.path, "llava")
    assert (
        p["params"] == asdict(params)
        and p["image_token_budget"] == run.tokens
        and p["ocr_tokens_in_prompt"] is False
        and p["published_rows"] == run.bench.published_rows
    )
    assert p["inputs"] == adapter.describe() and p["prompt_template"] == adapter.prompt_template
    assert (p["repetition_penalty"], p["pads_to_square"], p["libraries"]) == (1.05, True, library_versions())
    assert (p["dtype"], p["device"]) == (world.model.dtype, world.model.device) == ("float32", "cpu")
    assert p["attn_implementation"] == adapter.model.config.text_config._attn_implementation
    assert (p["rejected"], p["warnings"]) == (world.data.rejected, list(world.data.warnings))
    assert (p["metric"], p["post_prompt"], p["answer_format"]) == (
        bench.metric_name,
        bench.post_prompt,
        bench.answer_format,
    )
    assert p["differences_from_harness"] == bench.notes
    assert stage._protocol(run, world.model, None, world.data, params)["rpn"] is None


def test_an_empty_piece_is_a_parquet_with_the_columns_and_the_metadata_is_kept():
    empty = pq.read_table(io.BytesIO(stage._parquet([])))
    assert empty.num_rows == 0 and empty.column_names == list(stage.PIECE_COLUMNS)
    table = pq.read_table(io.BytesIO(stage._parquet([{"sample_id": "a", "seconds": 1.0}], {"protocol": "{}"})))
    assert table.to_pylist() == [{"sample_id": "a", "seconds": 1.0}] and table.schema.metadata == {b"protocol": b"{}"}
    assert pq.read_table(io.BytesIO(stage._parquet([{"sample_id": "a"}]))).schema.metadata is None


def test_images_are_read_ahead_on_an_accelerator_only():
    assert stage._reads_ahead(SimpleNamespace(device=torch.device("cpu"))) is False
    assert stage._reads_ahead(SimpleNamespace(device=torch.device("cuda"))) is True
    assert json.loads(json.dumps(stage.SHARED_PARAMS)) == ["max_new_tokens", "inputs", "protocol", "batch_size"]


def test_a_pieces_key_is_exactly_its_inputs_settings_prompts_and_code(world):
    """The key's layout is a promise to every store: changing it re-answers every user's evaluations. Restated
    here, so that a change to it is a decision, not an accident."""
    from sdrpn_core.benchmarks import get_benchmark
    from sdrpn_core.methods import get_method
    from stages.code import function_fingerprint
    from storage.fingerprint import hash_obj, stage_fingerprint

    bench, rows = get_benchmark("synthetic"), read_manifest(world.data, world.store)
    pieces = plan_pieces(world.store, world.model, world.rpn, world.data, PARAMS, shards=2)
    assert [p.n_shards for p in plan_pieces(world.store, world.model, None, world.data, PARAMS)] == [1, 1]  # default
    for piece in pieces:
        method = get_method(piece.method)
        used = {k: getattr(PARAMS, k) for k in (*stage.SHARED_PARAMS, *method.depends_on)}
        used |= {"options": method.options_of(PARAMS), "answer": function_fingerprint(method.answer)}
        used["benchmark"] = {"max_new_tokens": bench.max_new_tokens}
        if method.needs_rpn:
            used["benchmark"]["thresholds"] = bench.thresholds
        prompts = hash_obj([bench.prompt(sample_of(r)) for r in shard_of(rows, piece.shard, 2)])
        rpn = world.rpn.fingerprint if method.needs_rpn else ""
        inputs = {"model": world.model.fingerprint, "dataset": world.data.fingerprint, "rpn": rpn}
        where = {"method": piece.method, "shard": piece.shard, "of": 2, "prompts": prompts, **used}
        assert piece.fingerprint == stage_fingerprint("eval-piece", inputs, where, code=stage.PIECES.code_version())


def test_answering_logs_each_methods_running_score_times_each_row_and_reads_inline_on_the_cpu(
    world, caplog, monkeypatch
):
    rows = read_manifest(world.data, world.store)[:2]
    run = prepare_run(world.store, world.model, None, world.data, replace(PARAMS, methods=("baseline",)))
    first = stage._answer_all(run, rows, "t", None)  # batch 1 by default: each row timed alone
    assert first[0]["seconds"] != first[1]["seconds"]
    right = [{**rows[0], "answers": [first[0]["prediction"]]}, {**rows[1], "answers": ["not what it says"]}]
    backgrounds = []
    real = stage.read_ahead
    monkeypatch.setattr(stage, "read_ahead", lambda *a, **k: backgrounds.append(k["background"]) or real(*a, **k))
    caplog.set_level("INFO", logger=stage.log.name)
    t0 = time.perf_counter()
    out = stage._answer_all(run, right, "answering", None, batch_size=2)
    elapsed = time.perf_counter() - t0
    assert "answering: 2/2" in caplog.text and " baseline=50.0" in caplog.text and backgrounds == [False]
    assert 0 < sum(r["seconds"] for r in out) <= elapsed  # each row its share of its batch, no more


def test_a_method_with_nothing_to_answer_does_not_stop_the_others(world):
    rows = [{**r, "box": None} for r in read_manifest(world.data, world.store)[:2]]  # the oracle needs a box
    run = prepare_run(world.store, world.model, None, world.data, replace(PARAMS, methods=("oracle", "baseline")))
    out = stage._answer_all(run, rows, "t", None)
    assert [r["method"] for r in out] == ["baseline", "baseline"]


def test_a_method_that_loses_an_answer_is_an_error_not_a_shorter_piece(world, monkeypatch):
    """A plugin method must give one answer per image: fewer would silently drop rows from the scores."""
    from sdrpn_core.methods import METHODS, EvalMethod

    monkeypatch.setitem(METHODS, "short", EvalMethod("short", lambda settings, images, *_: [], "+short"))
    run = prepare_run(world.store, world.model, None, world.data, replace(PARAMS, methods=("short",)))
    with pytest.raises(ValueError, match="zip"):
        stage._answer_all(run, read_manifest(world.data, world.store)[:2], "t", None)
