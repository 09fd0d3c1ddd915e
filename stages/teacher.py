"""The `teacher` stage: run the frozen MLLM over a manifest shard and commit raw maps, chunk by chunk.

Rows are keyed by content (`sample_key`), under a fingerprint of (model, teacher parameters, code): any dataset
holding a sample reuses its row, and a rerun after a crash redoes only the chunks that were not committed. A
committed shard that no longer matches its commit record does not count as done: its rows are extracted again
and the bad record is retired.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from sdrpn_core.data import Sample
from sdrpn_core.presets import Preset
from sdrpn_core.teacher import extract_teacher_maps
from stages.code import library_versions
from stages.common import Stage, load_model, read_manifest
from stages.refs import DatasetRef, ModelRef, ShardSummary, TeacherRef
from stages.tables import teacher_table
from storage.labels import teacher_dataset
from storage.store import Store

log = logging.getLogger(__name__)


def teacher_key(model: ModelRef, preset: Preset, max_new_tokens: int | None = None, inputs: dict | None = None) -> dict:
    """The teacher rows depend on the model, the preset's heads and layers, the generation limit and the inputs."""
    teacher_part = preset.override(recipe={})  # the training recipe does not change what the teacher sees
    params = {"preset": teacher_part, "max_new": max_new_tokens, **({"inputs": inputs} if inputs else {})}
    return {"model": model.fingerprint, **params}


def teacher_fingerprint(model: ModelRef, preset: Preset, max_new_tokens: int | None, inputs: dict | None = None) -> str:
    return SHARD.fingerprint(model=model, preset=preset, max_new_tokens=max_new_tokens, inputs=inputs)


def shard_rows(rows: list[dict], shard: int, n_shards: int) -> list[dict]:
    return rows[shard::n_shards]


def extract_shard(
    store: Store,
    model: ModelRef,
    dataset: DatasetRef,
    preset: Preset,
    fp: str,
    shard: int,
    n_shards: int,
    *,
    batch_size: int = 8,
    chunk_size: int = 64,
    max_new_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    inputs: dict | None = None,
) -> ShardSummary:
    ds = teacher_dataset(store, fp)
    rows = shard_rows(read_manifest(dataset, store), shard, n_shards)
    keys = {r["sample_key"] for r in rows}
    done = ds.committed_ids(among=keys)  # verified commits only: a corrupt shard's keys are redone
    todo, seen = [], set(done)
    for r in rows:
        if r["sample_key"] not in seen:
            todo.append(r)
            seen.add(r["sample_key"])
    extracted = rejected = 0
    if todo:
        adapter = load_model(model)
        if inputs:
            adapter = adapter.with_inputs(**inputs)
        meta = {"dataset": dataset.fingerprint, "shard": shard, "libraries": library_versions()}
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            # samples are named by their content key, so a record can only ever land on its own row
            samples = [Sample(r["sample_key"], r["image"], r["question"], r["domain"]) for r in chunk]
            out = extract_teacher_maps(adapter, samples, preset, batch_size=batch_size, max_new_tokens=max_new_tokens)
            id_of = {r["sample_key"]: r["sample_id"] for r in chunk}
            records = [dataclasses.replace(rec, sample_id=id_of[rec.sample_id]) for rec in out.records]
            ds.write(teacher_table(records, [rec.sample_id for rec in out.records]), meta, skip_committed=False)
            ds.quarantine(((r.sample_id, r.reason) for r in out.rejected), meta)
            extracted += len(out.records)
            rejected += len(out.rejected)
            if progress is not None:
                progress(start + len(chunk), len(todo))
        ds.retire_replaced(keys)
    log.info(
        "teacher shard %d/%d: %d rows, %d extracted, %d already done, %d rejected",
        shard,
        n_shards,
        len(rows),
        extracted,
        len(rows) - len(todo),
        rejected,
    )
    return ShardSummary(shard, len(rows), extracted, len(rows) - len(todo), rejected, fp, ds.url)


def finished(
    store: Store,
    model: ModelRef,
    dataset: DatasetRef,
    preset: Preset,
    max_new_tokens: int | None = None,
    inputs: dict | None = None,
) -> TeacherRef | None:
    """The teacher's rows for every sample of `dataset`, when verified commits hold them all (as rows or as
    rejections): the flow then starts no shard. None when a sample is missing; the shards extract just those."""
    fp = teacher_fingerprint(model, preset, max_new_tokens, inputs)
    ds = teacher_dataset(store, fp)
    keys = {r["sample_key"] for r in read_manifest(dataset, store)}
    if not keys <= ds.committed_ids(among=keys):
        return None
    rows = ds.committed_ids(include_quarantine=False, among=keys)
    return TeacherRef(fp, ds.url, len(rows), len(keys) - len(rows))


SHARD = Stage(
    "teacher-shard",
    run=extract_shard,
    run_name="teacher-shard {shard1}/{n_shards}",
    progress="teacher extraction, shard {shard1}/{n_shards}",
    model_bound=True,
    cached_if=lambda summary: summary.already_done == summary.rows,  # only verified rows there: nothing extracted
    summary=str,
    key=teacher_key,
)
