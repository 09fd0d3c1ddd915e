"""The `labels` stage: teacher rows of a dataset's samples → three-state labels and statistics (cheap; rerun
whenever label parameters change, reusing the stored teacher maps).

Teacher shards are streamed one at a time, each checked against its commit record, and matched to the manifest
with Arrow joins; what the stage remembers per sample is one byte (a mask over the manifest rows), so memory stays
flat in the number of rows (`benchmarks/labels_memory.py`). Every manifest sample ends as a label row or a
quarantine row with the teacher's reason; a sample with neither (a missing or corrupt teacher shard, an extraction
that did not finish) is an error naming the shards, never a silent gap.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sdrpn_core.progress import Progress
from sdrpn_core.pseudo_labels import LabelParams
from stages.common import Stage
from stages.refs import DatasetRef, LabelsRef
from stages.tables import label_table, teacher_records
from storage.artifacts import ArtifactStore
from storage.fingerprint import hash_obj, stage_fingerprint
from storage.labels import label_dataset, teacher_dataset
from storage.sharded import ShardedDataset
from storage.store import Store, StoreError

log = logging.getLogger(__name__)
DONE = "_DONE.json"
LABEL_SLICE = 256  # teacher rows turned into label rows at a time
_STAT_COLUMNS = ["sample_id", "valid", "num_fg", "num_bg", "num_sink", "reason"]


def labels_key(teacher_fp: str, dataset: DatasetRef, params: LabelParams) -> dict:
    """A label set depends on the teacher rows, the manifest it labels, and the label parameters."""
    return {"teacher": teacher_fp, "dataset": dataset.fingerprint, "params": params}


def merge(parts: list[tuple[str, LabelsRef]]) -> LabelsRef:
    """Several sources' label sets as one (nothing copied): the train stage reads each part, first source winning
    a sample id; the merged fingerprint changes when any part does, so only the changed source was recomputed."""
    if len(parts) == 1:
        return parts[0][1]
    fp = stage_fingerprint("labels-merge", {name: ref.fingerprint for name, ref in parts}, None, code="")
    stats = {"sources": {name: ref.stats for name, ref in parts}}
    return LabelsRef(
        fp,
        ", ".join(ref.url for _, ref in parts),
        sum(ref.rows for _, ref in parts),
        sum(ref.usable for _, ref in parts),
        stats,
        tuple((name, ref.fingerprint) for name, ref in parts),
    )


def lookup(store: Store, fp: str) -> LabelsRef | None:
    """The finished label set, if its done record is valid and every shard matches its commit record."""
    if not store.exists("labels", fp, DONE):
        return None
    ds = label_dataset(store, fp)
    try:
        stats = store.read_json("labels", fp, DONE).get("stats")
    except (ValueError, AttributeError):
        stats = None
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), int) for k in ("samples", "usable")):
        log.error("label set %s: malformed %s, relabelling", ds.url, DONE)
        return None
    bad = ds.bad_commits()
    if bad:
        log.error("label set %s has %d corrupt shards (%s): relabelling", ds.url, len(bad), bad[0].shard)
        store.rm("labels", fp, DONE)
        return None
    return LabelsRef(fp, ds.url, stats["samples"], stats["usable"], stats)


def _manifest_index(dataset_fp: str, store: Store) -> pa.Table:
    """sample_id, sample_key, image and row number of every manifest row (compact Arrow, not Python objects)."""
    data = ArtifactStore(store).read("datasets", dataset_fp, "manifest.parquet")
    table = pq.read_table(io.BytesIO(data), columns=["sample_id", "sample_key", "image"])
    return table.append_column("_mrow", pa.array(np.arange(table.num_rows, dtype=np.int64)))


def _isin(column: pa.ChunkedArray | pa.Array, values) -> pa.ChunkedArray:
    return pc.is_in(column, value_set=pa.array(sorted(values), type=pa.string()))


def _first_unseen(pairs: pa.Table, seen: np.ndarray) -> pa.Table:
    """Rows of `pairs` (with `_mrow`) whose manifest row is not yet in `seen`, each manifest row once; marks them."""
    mrows = pairs.column("_mrow").to_numpy()
    _, first = np.unique(mrows, return_index=True)
    keep = np.sort(first[~seen[mrows[first]]])
    seen[mrows[keep]] = True
    return pairs.take(pa.array(keep, type=pa.int64()))


def _rule(teacher_fp: str, params: LabelParams) -> str:
    """What a label row is a function of: its sample's teacher row, the label parameters and the label code. Label
    sets made by one rule share rows by sample content, so a grown dataset labels only its new samples."""
    return hash_obj({"teacher": teacher_fp, "params": params, "code": LABELS.code_version()})


def _earlier_sets(store: Store, fp: str, rule: str) -> list[dict]:
    """The finished label sets of other datasets made by the same rule (their done records)."""
    found = []
    for other in store.ls("labels"):
        if other == fp or not store.exists("labels", other, DONE):
            continue
        try:
            done = store.read_json("labels", other, DONE)
        except ValueError:
            continue
        if isinstance(done, dict) and done.get("rule") == rule and isinstance(done.get("dataset"), str):
            found.append({**done, "fp": other})
    return found


def _reuse_earlier(store: Store, fp: str, rule: str, manifest: pa.Table, covered: np.ndarray, meta) -> int:
    """Label rows of earlier label sets of the same rule, for this manifest's samples (matched by the sample key,
    the content hash) → copied into this set under this manifest's ids, not labelled again. Returns how many."""
    ds, before = label_dataset(store, fp), int(covered.sum())
    for done in _earlier_sets(store, fp, rule):
        ids = _manifest_index(done["dataset"], store).select(["sample_id", "sample_key"])
        for shard in label_dataset(store, done["fp"]).iter_shards(dedup=False):
            if covered.all():
                return int(covered.sum()) - before
            rows = pa.table({"sample_id": shard.column("sample_id"), "_row": pa.array(np.arange(shard.num_rows))})
            keyed = rows.join(ids, "sample_id", join_type="inner", use_threads=False).select(["sample_key", "_row"])
            pairs = _first_unseen(manifest.join(keyed, "sample_key", join_type="inner", use_threads=False), covered)
            if pairs.num_rows:
                copied = _renamed(shard.take(pairs.column("_row")), pairs)
                ds.write(copied.select(ds.schema.names), meta, skip_committed=False)
    return int(covered.sum()) - before


def _renamed(rows: pa.Table, pairs: pa.Table) -> pa.Table:
    """Rows of another dataset (or the teacher's) under this manifest's sample ids and image paths."""
    rows = rows.drop_columns(["sample_id", "image"])
    return rows.append_column("sample_id", pairs.column("sample_id")).append_column("image", pairs.column("image"))


def _label_shard(ds: ShardedDataset, shard: pa.Table, manifest: pa.Table, covered: np.ndarray, params, meta) -> None:
    """Label one teacher shard's rows for every manifest row they hold that has no label yet (first commit wins)."""
    rows = pa.table({"sample_key": shard.column("sample_key"), "_row": pa.array(np.arange(shard.num_rows))})
    # Arrow joins no list columns (so row numbers are joined), and builds its hash table on the right side: the
    # shard, so each join costs memory in the shard's size, not the manifest's
    pairs = _first_unseen(manifest.join(rows, "sample_key", join_type="inner", use_threads=False), covered)
    if not pairs.num_rows:
        return
    joined = _renamed(shard.take(pairs.column("_row")), pairs)
    slices = range(0, joined.num_rows, LABEL_SLICE)  # the Python-side working set stays small whatever the shard
    parts = [label_table(teacher_records(joined.slice(i, LABEL_SLICE)), params) for i in slices]
    ds.write(pa.concat_tables(parts), meta, skip_committed=False)


def _stats(ds: ShardedDataset, manifest: pa.Table) -> dict:
    """Label statistics over the committed label rows (each manifest sample counted once), streamed."""
    counted = np.zeros(manifest.num_rows, dtype=bool)
    sums: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    ids = manifest.select(["sample_id", "_mrow"])
    for shard in ds.iter_shards(_STAT_COLUMNS, dedup=False):
        rows = _first_unseen(ids.join(shard, "sample_id", join_type="inner", use_threads=False), counted)
        sums["samples"] += rows.num_rows
        for column in ("valid", "num_fg", "num_bg", "num_sink"):
            sums[column] += int(pc.sum(rows.column(column).cast(pa.int64())).as_py() or 0)
        reasons.update(r for r in rows.column("reason").to_pylist() if r)
    n = sums["samples"]
    return {
        "samples": n,
        "usable": sums["valid"],
        "all_ignore": n - sums["valid"],
        **{f"mean_{k}": sums[f"num_{k}"] / n if n else 0.0 for k in ("fg", "bg", "sink")},
        "ignored_because": dict(sorted(reasons.items())),
    }


def _quarantine_rejected(ds, teacher, manifest: pa.Table, covered: np.ndarray, meta: dict) -> np.ndarray:
    """Manifest rows the teacher rejected (and that have no label row) → label quarantine with its reason."""
    rejected = np.zeros(manifest.num_rows, dtype=bool)
    reasons = teacher.quarantined()
    pairs = reasons.join(manifest.select(["sample_key", "sample_id", "_mrow"]), "sample_key", join_type="inner")
    pairs = pairs.filter(pa.array(~covered[pairs.column("_mrow").to_numpy()]))
    pairs = _first_unseen(pairs, rejected)
    already = ds.committed_ids(among=pairs.column("sample_id").to_pylist())
    ds.quarantine(
        [
            (i, r)
            for i, r in zip(pairs.column("sample_id").to_pylist(), pairs.column("reason").to_pylist(), strict=True)
            if i not in already
        ],
        meta,
    )
    return rejected


def denoise(
    store: Store,
    dataset: DatasetRef,
    teacher_fp: str,
    params: LabelParams,
    fp: str,
    progress: Callable[[int, int], None] | None = None,
) -> LabelsRef:
    """Resumable: a done record is written last; a crashed run is completed (labelled samples are skipped).
    Samples an earlier label set of the same rule holds are copied from it; only the others are labelled. Logs
    (and reports to `progress`) the samples done, with rate and ETA."""
    ds, rule = label_dataset(store, fp), _rule(teacher_fp, params)
    manifest = _manifest_index(dataset.fingerprint, store)
    covered = np.asarray(_isin(manifest.column("sample_id"), ds.committed_ids(include_quarantine=False)))
    teacher = teacher_dataset(store, teacher_fp)
    meta = {"teacher": teacher_fp, "dataset": dataset.fingerprint}
    bar = Progress(manifest.num_rows, f"labels {fp}", log, callback=progress)
    reused = _reuse_earlier(store, fp, rule, manifest, covered, meta)
    bar.update(int(covered.sum()))
    if reused:
        log.info("labels %s: %d samples' label rows reused from earlier label sets of the same rule", fp, reused)
    todo = set(manifest.column("sample_key").filter(pa.array(~covered)).to_pylist())
    for shard in teacher.iter_shards(dedup=False, among=todo) if todo else ():
        before = int(covered.sum())
        _label_shard(ds, shard, manifest, covered, params, meta)
        bar.update(min(int(covered.sum()) - before, bar.total - bar.done))
    problems = list(teacher.problems)
    rejected = _quarantine_rejected(ds, teacher, manifest, covered, meta)
    missing = ~covered & ~rejected
    if missing.any():
        examples = manifest.column("sample_id").take(pa.array(np.flatnonzero(missing)[:3])).to_pylist()
        raise StoreError(
            f"{int(missing.sum())} of {manifest.num_rows} samples of dataset {dataset.fingerprint} (e.g. {examples}) "
            f"have no teacher row and no rejection in {teacher.url}: "
            + ("; ".join(problems[:3]) if problems else "the teacher stage has not finished")
            + ". Rerun the teacher stage: missing and corrupt shards are re-extracted."
        )
    if not covered.any():  # an empty label set is a failure, never a finished (and so reused) stage
        first = "; ".join(sorted(set(teacher.quarantined().column("reason").to_pylist()))[:3])
        raise ValueError(f"no sample of dataset {dataset.fingerprint} got a teacher row: all were rejected ({first})")
    if ds.bad_commits():  # corrupt label shards of an earlier run, relabelled above: retire their records
        ds.retire_replaced(set(manifest.column("sample_id").to_pylist()))
    stats = {**_stats(ds, manifest), "quarantined": int(rejected.sum())}
    done = {
        "teacher": teacher_fp,
        "dataset": dataset.fingerprint,
        "params": dataclasses.asdict(params),
        "rule": rule,
        "stats": stats,
    }
    store.write_json(done, "labels", fp, DONE)
    return LabelsRef(fp, ds.url, stats["samples"], stats["usable"], stats)


LABELS = Stage(
    "labels",
    run=denoise,
    lookup=lookup,
    run_name="labels[{dataset.name}]",
    progress="pseudo-labels of {dataset.name}: teacher rows read",
    summary=lambda ref: str(ref.stats),
    key=labels_key,
    config=lambda cfg, preset: cfg.labels.params(preset),
)
