"""The `labels` stage: teacher rows of a dataset's samples → three-state labels and statistics (cheap; rerun
whenever label parameters change, reusing the stored teacher maps).

Teacher shards are streamed one at a time (memory stays flat in the number of rows), each checked against its
commit record. Every manifest sample ends as a label row or a quarantine row with the teacher's reason; a sample
with neither (a missing or corrupt teacher shard, an extraction that did not finish) is an error naming the
shards, never a silent gap.
"""

from __future__ import annotations

import dataclasses
import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sdrpn_core.pseudo_labels import LabelParams
from stages.refs import DatasetRef, LabelsRef
from storage.artifacts import ArtifactStore
from storage.fingerprint import stage_fingerprint
from storage.labels import label_dataset, label_table, teacher_dataset, teacher_records
from storage.store import Store, StoreError

log = logging.getLogger(__name__)
DONE = "_DONE.json"


def labels_fingerprint(teacher_fp: str, dataset: DatasetRef, params: LabelParams) -> str:
    return stage_fingerprint("labels", {"teacher": teacher_fp, "dataset": dataset.fingerprint}, params)


def _ref(store: Store, labels_fp: str) -> LabelsRef:
    ds = label_dataset(store, labels_fp)
    table = ds.read(columns=["sample_id", "valid", "num_fg", "num_bg", "num_ignore", "num_sink", "reason"])
    valid = np.asarray(table.column("valid").to_pylist(), dtype=bool)
    reasons = table.column("reason").to_pylist()
    stats = {
        "samples": table.num_rows,
        "usable": int(valid.sum()),
        "all_ignore": int((~valid).sum()),
        "quarantined": ds.quarantined().num_rows,
        "mean_fg": float(np.mean(table.column("num_fg").to_numpy())) if table.num_rows else 0.0,
        "mean_bg": float(np.mean(table.column("num_bg").to_numpy())) if table.num_rows else 0.0,
        "mean_sink": float(np.mean(table.column("num_sink").to_numpy())) if table.num_rows else 0.0,
        "ignored_because": {r: reasons.count(r) for r in sorted(set(reasons)) if r},
    }
    return LabelsRef(labels_fp, ds.url, table.num_rows, int(valid.sum()), stats)


def lookup(store: Store, labels_fp: str) -> LabelsRef | None:
    """The finished label set, if its done marker is there and every shard matches its commit record."""
    if not store.exists("labels", labels_fp, DONE):
        return None
    ds = label_dataset(store, labels_fp)
    bad = ds.bad_commits()
    if bad:
        log.error("label set %s has %d corrupt shards (%s): relabelling", ds.url, len(bad), bad[0].shard)
        store.rm("labels", labels_fp, DONE)
        return None
    return _ref(store, labels_fp)


def _manifest_index(dataset: DatasetRef, store: Store) -> pa.Table:
    """sample_id, sample_key, image of every manifest row (a compact Arrow table, not Python dicts)."""
    data = ArtifactStore(store).read("datasets", dataset.fingerprint, "manifest.parquet")
    return pq.read_table(io.BytesIO(data), columns=["sample_id", "sample_key", "image"])


def _isin(column: pa.ChunkedArray, values) -> pa.ChunkedArray:
    return pc.is_in(column, value_set=pa.array(sorted(values), type=pa.string()))


def _label_shard(
    ds, shard: pa.Table, manifest: pa.Table, params: LabelParams, meta: dict, done: set[str]
) -> set[str]:
    """Label one teacher shard's rows for every manifest row that holds them (but those in `done`, labelled by an
    earlier, interrupted run); returns the keys covered."""
    rows = pa.table({"sample_key": shard.column("sample_key"), "_row": pa.array(range(shard.num_rows))})
    pairs = rows.join(manifest, "sample_key", join_type="inner")  # Arrow joins no list columns: join row numbers
    joined = shard.take(pairs.column("_row")).drop_columns(["sample_id", "image"])
    joined = joined.append_column("sample_id", pairs.column("sample_id")).append_column("image", pairs.column("image"))
    if done:
        joined = joined.filter(pc.invert(_isin(joined.column("sample_id"), done)))
    if joined.num_rows:
        ds.write(label_table(teacher_records(joined), params), meta, skip_committed=False)
    return set(shard.column("sample_key").to_pylist())


def denoise(store: Store, dataset: DatasetRef, teacher_fp: str, params: LabelParams, labels_fp: str) -> LabelsRef:
    """Idempotent: a done marker is written last; a crashed run is completed (committed ids are skipped)."""
    if (ref := lookup(store, labels_fp)) is not None:
        return ref
    ds = label_dataset(store, labels_fp)
    manifest = _manifest_index(dataset, store)
    keys = set(manifest.column("sample_key").to_pylist())
    teacher = teacher_dataset(store, teacher_fp)
    meta = {"teacher": teacher_fp, "dataset": dataset.fingerprint}
    done, covered = ds.committed_ids(), set()
    for shard in teacher.iter_shards(among=keys):
        covered |= _label_shard(ds, shard, manifest, params, meta, done)
    problems = list(teacher.problems)
    rejected = teacher.quarantined(among=keys - covered)
    reasons = dict(zip(rejected.column("sample_key").to_pylist(), rejected.column("reason").to_pylist(), strict=True))
    missing = keys - covered - reasons.keys()
    if missing:
        raise StoreError(
            f"{len(missing)} of {len(keys)} samples of dataset {dataset.fingerprint} have no teacher row and no "
            f"rejection in {teacher.url}: "
            + ("; ".join(problems[:3]) if problems else "the teacher stage has not finished")
            + ". Rerun the teacher stage: missing and corrupt shards are re-extracted."
        )
    quarantine = manifest.filter(_isin(manifest.column("sample_key"), reasons.keys()))
    ids, qkeys = quarantine.column("sample_id").to_pylist(), quarantine.column("sample_key").to_pylist()
    ds.quarantine([(sid, reasons[k]) for sid, k in zip(ids, qkeys, strict=True) if sid not in done], meta)
    if not covered:  # an empty label set is a failure, never a finished (and so reused) stage
        first = "; ".join(sorted(set(reasons.values()))[:3])
        raise ValueError(f"no sample of dataset {dataset.fingerprint} got a teacher row: all were rejected ({first})")
    store.write_json(
        {"teacher": teacher_fp, "dataset": dataset.fingerprint, "params": dataclasses.asdict(params)},
        "labels",
        labels_fp,
        DONE,
    )
    return _ref(store, labels_fp)
