"""The label store: teacher rows (raw maps) and label rows (three-state labels + statistics) as sharded Parquet.

Teacher and labels are separate stages on purpose: extraction is the expensive GPU step, thresholds are cheap to
change, so new label parameters reuse the stored teacher rows.

Schemas (version 1), one row per sample:

* teacher: sample_key (content hash; the row key), sample_id, image, question, answer, grid_h, grid_w, image_w,
  image_h, n_steps, grounding (list<float32>, row-major over the grid), sink (list<float32>),
  image_hidden_norms (list<float32>, null unless recorded).
* labels: the teacher columns but image_hidden_norms, plus labels (list<int8>: 1 / 0 / −100), num_fg, num_bg,
  num_ignore, num_sink, box (list<int16>, inclusive row0, col0, row1, col1), valid, reason.

Readers refuse data of a newer schema version with a message saying to upgrade.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from sdrpn_core.pseudo_labels import LabelParams
from sdrpn_core.teacher import TeacherRecord
from storage.sharded import ShardedDataset
from storage.store import Store

SCHEMA_VERSION = 1

_TEACHER_FIELDS = [
    ("sample_id", pa.string()),
    ("image", pa.string()),
    ("question", pa.string()),
    ("answer", pa.string()),
    ("grid_h", pa.int16()),
    ("grid_w", pa.int16()),
    ("image_w", pa.int32()),
    ("image_h", pa.int32()),
    ("n_steps", pa.int16()),
    ("grounding", pa.list_(pa.float32())),
    ("sink", pa.list_(pa.float32())),
]
TEACHER_SCHEMA = pa.schema(
    [("sample_key", pa.string()), *_TEACHER_FIELDS, ("image_hidden_norms", pa.list_(pa.float32()))]
)
LABEL_SCHEMA = pa.schema(
    [
        *_TEACHER_FIELDS,
        ("labels", pa.list_(pa.int8())),
        ("num_fg", pa.int32()),
        ("num_bg", pa.int32()),
        ("num_ignore", pa.int32()),
        ("num_sink", pa.int32()),
        ("box", pa.list_(pa.int16())),
        ("valid", pa.bool_()),
        ("reason", pa.string()),
    ]
)


def teacher_dataset(store: Store, fingerprint: str) -> ShardedDataset:
    """Teacher rows are keyed by `sample_key`, a hash of the sample's content (question + image bytes), so rows are
    shared by every dataset that holds the sample: adding samples sends only the new ones through the teacher."""
    return ShardedDataset(store, "teacher", fingerprint, TEACHER_SCHEMA, SCHEMA_VERSION, key="sample_key")


def label_dataset(store: Store, fingerprint: str) -> ShardedDataset:
    return ShardedDataset(store, "labels", fingerprint, LABEL_SCHEMA, SCHEMA_VERSION)


def _teacher_columns(records: Sequence[TeacherRecord]) -> dict[str, list]:
    return {
        "sample_id": [r.sample_id for r in records],
        "image": [r.image for r in records],
        "question": [r.question for r in records],
        "answer": [r.answer for r in records],
        "grid_h": [r.grid[0] for r in records],
        "grid_w": [r.grid[1] for r in records],
        "image_w": [r.image_size[0] for r in records],
        "image_h": [r.image_size[1] for r in records],
        "n_steps": [r.n_steps for r in records],
        "grounding": [np.asarray(r.grounding, dtype=np.float32) for r in records],
        "sink": [np.asarray(r.sink, dtype=np.float32) for r in records],
    }


def teacher_table(records: Sequence[TeacherRecord], keys: Sequence[str] | None = None) -> pa.Table:
    """`keys`: each record's content key (default: its sample id)."""
    cols = {"sample_key": list(keys) if keys is not None else [r.sample_id for r in records]}
    cols.update(_teacher_columns(records))
    cols["image_hidden_norms"] = [
        None if r.image_hidden_norms is None else np.asarray(r.image_hidden_norms, dtype=np.float32) for r in records
    ]
    return pa.Table.from_pydict(cols, schema=TEACHER_SCHEMA)


def _float_lists(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    """A list<float32> column → one float32 array per row, sliced from one flat buffer (no Python floats)."""
    array = column.combine_chunks()
    values = array.flatten()
    # a view on Arrow's buffer where possible: no multi-MB malloc per shard for the allocator to fragment
    flat = values.to_numpy(zero_copy_only=values.null_count == 0)
    offsets = np.asarray(array.offsets) - array.offsets[0].as_py()
    valid = np.asarray(array.is_valid())
    return [flat[offsets[i] : offsets[i + 1]] if valid[i] else None for i in range(len(array))]


def teacher_records(table: pa.Table) -> list[TeacherRecord]:
    scalars = table.select(
        ["sample_id", "image", "question", "answer", "grid_h", "grid_w", "n_steps", "image_w", "image_h"]
    ).to_pylist()
    grounding, sink = _float_lists(table.column("grounding")), _float_lists(table.column("sink"))
    norms = (
        _float_lists(table.column("image_hidden_norms"))
        if "image_hidden_norms" in table.column_names
        else [None] * table.num_rows
    )
    return [
        TeacherRecord(
            sample_id=r["sample_id"],
            image=r["image"],
            question=r["question"],
            answer=r["answer"],
            grid=(r["grid_h"], r["grid_w"]),
            grounding=g,
            sink=k,
            n_steps=r["n_steps"],
            image_size=(r["image_w"], r["image_h"]),
            image_hidden_norms=n,
        )
        for r, g, k, n in zip(scalars, grounding, sink, norms, strict=True)
    ]


def label_table(records: Sequence[TeacherRecord], params: LabelParams, meta: dict | None = None) -> pa.Table:
    """Denoise every teacher record with `params` and lay the rows out in the label schema."""
    cols = _teacher_columns(records)
    extra: dict[str, list] = {
        k: [] for k in ("labels", "num_fg", "num_bg", "num_ignore", "num_sink", "box", "valid", "reason")
    }
    for r in records:
        labels, st = params.apply(r.grounding, r.sink, r.grid, image_size=r.image_size)
        extra["labels"].append(labels.astype(np.int8))
        extra["num_fg"].append(st.num_fg)
        extra["num_bg"].append(st.num_bg)
        extra["num_ignore"].append(st.num_ignore)
        extra["num_sink"].append(st.num_sink)
        extra["box"].append(list(st.box))
        extra["valid"].append(st.valid)
        extra["reason"].append(st.reason)
    metadata = {"sdrpn.schema_version": str(SCHEMA_VERSION), "sdrpn.params": json.dumps(meta or {}, default=str)}
    return pa.Table.from_pydict({**cols, **extra}, schema=LABEL_SCHEMA).replace_schema_metadata(metadata)


class LabelTorchDataset(torch.utils.data.Dataset):
    """Label rows as a torch Dataset: {sample_id, image, question, labels (int64 tensor), grid}."""

    def __init__(self, table: pa.Table, *, valid_only: bool = True):
        if valid_only:
            table = table.filter(pc.field("valid"))
        self._rows = table.select(["sample_id", "image", "question", "labels", "grid_h", "grid_w"]).to_pylist()

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict:
        r = self._rows[i]
        return {
            "sample_id": r["sample_id"],
            "image": r["image"],
            "question": r["question"],
            "labels": torch.tensor(r["labels"], dtype=torch.long),
            "grid": (r["grid_h"], r["grid_w"]),
        }
