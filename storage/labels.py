"""The label table: one row per sample with the teacher's raw maps and the three-state labels.

Schema version 1. Columns: sample_id, image, question, answer, grid_h, grid_w, image_w, image_h, n_steps,
grounding (list<float32>), sink (list<float32>), labels (list<int8>), num_fg, num_bg, num_ignore, num_sink,
box (list<int16>, inclusive row0,col0,row1,col1), valid, reason. The file's metadata carries the schema version
and the parameters that produced it (JSON).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from sdrpn_core.data import Rejection
from sdrpn_core.pseudo_labels import LabelParams
from sdrpn_core.teacher import TeacherRecord
from storage.files import write_atomic

SCHEMA_VERSION = 1

LABEL_SCHEMA = pa.schema(
    [
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

QUARANTINE_SCHEMA = pa.schema([("sample_id", pa.string()), ("reason", pa.string())])


class SchemaError(ValueError):
    pass


def label_table(records: Sequence[TeacherRecord], params: LabelParams, meta: dict | None = None) -> pa.Table:
    """Denoise every record with `params` and lay the rows out in the label schema."""
    rows: dict[str, list] = {f.name: [] for f in LABEL_SCHEMA}
    for r in records:
        labels, st = params.apply(r.grounding, r.sink, r.grid, image_size=r.image_size)
        for key, value in (
            ("sample_id", r.sample_id),
            ("image", r.image),
            ("question", r.question),
            ("answer", r.answer),
            ("grid_h", r.grid[0]),
            ("grid_w", r.grid[1]),
            ("image_w", r.image_size[0]),
            ("image_h", r.image_size[1]),
            ("n_steps", r.n_steps),
            ("grounding", r.grounding.astype("float32")),
            ("sink", r.sink.astype("float32")),
            ("labels", labels.astype("int8")),
            ("num_fg", st.num_fg),
            ("num_bg", st.num_bg),
            ("num_ignore", st.num_ignore),
            ("num_sink", st.num_sink),
            ("box", list(st.box)),
            ("valid", st.valid),
            ("reason", st.reason),
        ):
            rows[key].append(value)
    metadata = {"sdrpn.schema_version": str(SCHEMA_VERSION), "sdrpn.params": json.dumps(meta or {}, default=str)}
    return pa.Table.from_pydict(rows, schema=LABEL_SCHEMA).replace_schema_metadata(metadata)


def quarantine_table(rejected: Sequence[Rejection]) -> pa.Table:
    return pa.Table.from_pydict(
        {"sample_id": [r.sample_id for r in rejected], "reason": [r.reason for r in rejected]},
        schema=QUARANTINE_SCHEMA,
    )


def write_table(table: pa.Table, url: str, **storage_options) -> None:
    write_atomic(url, lambda f: pq.write_table(table, f), **storage_options)


def read_label_table(url: str, **storage_options) -> pa.Table:
    """Read a label file, refusing one written by a newer schema than this code knows."""
    from storage.files import open_input

    with open_input(url, **storage_options) as f:
        table = pq.read_table(f)
    version = int((table.schema.metadata or {}).get(b"sdrpn.schema_version", b"0"))
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{url} was written with label schema v{version}; this sdrpn reads up to v{SCHEMA_VERSION} — upgrade sdrpn"
        )
    return table
