"""The method's teacher records and labels as rows of the label store's schemas (`storage/labels.py`), and back."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from sdrpn_core.teacher import TeacherRecord
from storage.labels import LABEL_SCHEMA, SCHEMA_VERSION, TEACHER_SCHEMA

if TYPE_CHECKING:  # the teacher's rows are written here too; its code version must not follow the label rules
    from sdrpn_core.pseudo_labels import LabelParams


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
