"""The `labels` stage: teacher rows of a dataset's samples → three-state labels and statistics (cheap; rerun
whenever label parameters change, reusing the stored teacher maps)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.compute as pc

from sdrpn_core.pseudo_labels import LabelParams
from stages.data import read_manifest
from stages.refs import DatasetRef, LabelsRef
from storage.fingerprint import stage_fingerprint
from storage.labels import label_dataset, label_table, teacher_dataset, teacher_records
from storage.store import Store


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


def denoise(store: Store, dataset: DatasetRef, teacher_fp: str, params: LabelParams, labels_fp: str) -> LabelsRef:
    """Idempotent: a `_DONE.json` marker is written last; a crashed run is completed (committed ids are skipped)."""
    ds = label_dataset(store, labels_fp)
    if store.exists("labels", labels_fp, "_DONE.json"):
        return _ref(store, labels_fp)
    manifest = read_manifest(dataset, store)
    teacher = teacher_dataset(store, teacher_fp)
    keys = {r["sample_key"] for r in manifest}
    table = teacher.read()
    table = table.filter(pc.is_in(table.column("sample_key"), value_set=pa_array(keys)))
    by_key = {
        rec_key: rec
        for rec_key, rec in zip(table.column("sample_key").to_pylist(), teacher_records(table), strict=True)
    }
    rejected = dict(zip(*[teacher.quarantined().column(c).to_pylist() for c in ("sample_key", "reason")], strict=True))
    records, missing = [], []
    for r in manifest:
        rec = by_key.get(r["sample_key"])
        if rec is None:
            missing.append((r["sample_id"], rejected.get(r["sample_key"], "no teacher row (extraction not run)")))
            continue
        records.append(dataclasses.replace(rec, sample_id=r["sample_id"], image=r["image"]))
    for start in range(0, len(records), 10_000):
        part = records[start : start + 10_000]
        ds.write(label_table(part, params), {"teacher": teacher_fp, "dataset": dataset.fingerprint})
    done = ds.committed_ids()
    ds.quarantine([m for m in missing if m[0] not in done], {"teacher": teacher_fp})
    store.write_json(
        {"teacher": teacher_fp, "dataset": dataset.fingerprint, "params": dataclasses.asdict(params)},
        "labels",
        labels_fp,
        "_DONE.json",
    )
    return _ref(store, labels_fp)


def pa_array(values):
    import pyarrow as pa

    return pa.array(sorted(values), type=pa.string())
