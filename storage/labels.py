"""The label store: teacher rows (raw maps) and label rows (three-state labels + statistics) as sharded Parquet.

Teacher and labels are separate stages on purpose: extraction is the expensive GPU step, thresholds are cheap to
change, so new label parameters reuse the stored teacher rows.

Schemas (version 1), one row per sample:

* teacher: sample_key (content hash; the row key), sample_id, image, question, answer, grid_h, grid_w, image_w,
  image_h, n_steps, grounding (list<float32>, row-major over the grid), sink (list<float32>),
  image_hidden_norms (list<float32>, null unless recorded).
* labels: the teacher columns but image_hidden_norms, plus labels (list<int8>: 1 / 0 / −100), num_fg, num_bg,
  num_ignore, num_sink, box (list<int16>, inclusive row0, col0, row1, col1), valid, reason.

Readers refuse data of a newer schema version with a message saying to upgrade. Converting the method's records
to and from these rows is `stages/tables.py`'s (storage knows tables, not the method).
"""

from __future__ import annotations

import pyarrow as pa

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
