from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.cli import main
from sdrpn_core.pseudo_labels import LabelParams
from sdrpn_core.teacher import TeacherRecord
from storage.labels import SCHEMA_VERSION, SchemaError, label_table, read_label_table, write_table
from tests.conftest import random_image


def test_labels_demo_writes_label_and_quarantine_tables(tmp_path, capsys):
    assert main(["labels", "--demo", "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    table = read_label_table(str(tmp_path / "labels.parquet"))
    assert table.num_rows == 12
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["grounding"]) == len(row["labels"]) == row["grid_h"] * row["grid_w"] == 64
    assert row["num_fg"] + row["num_bg"] + row["num_ignore"] == 64
    assert pq.read_table(tmp_path / "quarantine.parquet").num_rows == 0
    assert "labelled 12 samples" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_manifest_line_is_named(tmp_path):
    manifest = tmp_path / "samples.jsonl"
    manifest.write_text('{"id": "a", "image": "x.png", "question": "q"}\n{"id": "b", "question": "q"}\n')
    with pytest.raises(SystemExit, match=r"samples.jsonl:2: bad manifest line"):
        main(["labels", "--model", "unused", "--samples", str(manifest)])


def test_newer_label_schema_is_refused(tmp_path):
    rec = TeacherRecord("s", "img.png", "q", "a", (2, 2), np.array([1, 0, 0, 0.0]), np.zeros(4), 1, (2, 2))
    table = label_table([rec], LabelParams(max_box_frac=0.9))
    meta = dict(table.schema.metadata)
    meta[b"sdrpn.schema_version"] = str(SCHEMA_VERSION + 1).encode()
    write_table(table.replace_schema_metadata(meta), str(tmp_path / "new.parquet"))
    with pytest.raises(SchemaError, match="upgrade sdrpn"):
        read_label_table(str(tmp_path / "new.parquet"))


def test_train_then_predict_from_the_command_line(tmp_path, tiny_llava_dir, capsys):
    # Labels whose foreground is the image's top-left quadrant, as if a teacher had looked there.
    records = []
    for i in range(8):
        path = tmp_path / f"img{i}.png"
        random_image(i, (40, 40)).save(path)
        grounding = np.full((4, 4), 1e-4)
        grounding[0:2, 0:2] = 1.0
        records.append(
            TeacherRecord(
                f"s{i}", str(path), "what is the digit ?", "7", (4, 4), grounding.ravel(), np.zeros(16), 2, (40, 40)
            )
        )
    write_table(label_table(records, LabelParams()), str(tmp_path / "labels.parquet"))
    out = tmp_path / "train"
    assert (
        main(
            [
                "train",
                "--model",
                tiny_llava_dir,
                "--labels",
                str(tmp_path / "labels.parquet"),
                "--K",
                "1",
                "--T",
                "2",
                "--lr",
                "5e-3",
                "--batch-size",
                "4",
                "--epochs",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "rpn" / "rpn.safetensors").exists() and (out / "checkpoint" / "state.json").exists()
    overlay = tmp_path / "overlay.png"
    assert (
        main(
            [
                "predict",
                str(tmp_path / "img0.png"),
                "what is the digit ?",
                "--rpn",
                str(out / "rpn"),
                "--max-new-tokens",
                "3",
                "--overlay",
                str(overlay),
                "--compare",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "baseline:" in printed and f"wrote {overlay}" in printed
    img = Image.open(overlay)
    assert img.size == (40, 40) and img.mode == "RGB"
