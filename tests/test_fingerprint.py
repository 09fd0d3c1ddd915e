from __future__ import annotations

import json
import os
import shutil

import pytest

from storage.fingerprint import (
    dataset_fingerprint,
    file_sha256,
    hash_obj,
    model_fingerprint,
    module_fingerprint,
    stage_fingerprint,
)
from tests.conftest import random_image


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDRPN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def model_dir(tmp_path, tiny_vlm_dir):
    d = tmp_path / "model"
    shutil.copytree(tiny_vlm_dir, d)
    return d


def test_model_fingerprint_follows_content_adapter_and_dtype(model_dir):
    fp = model_fingerprint(model_dir, adapter="llava", dtype="float32")
    assert fp == model_fingerprint(model_dir, adapter="llava", dtype="float32")
    assert fp != model_fingerprint(model_dir, adapter="llava", dtype="bfloat16")
    assert fp != model_fingerprint(model_dir, adapter="nano", dtype="float32")
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert model_fingerprint(model_dir, adapter="llava", dtype="float32") != fp
    changed = model_fingerprint(model_dir, adapter="llava", dtype="float32")
    cfg = model_dir / "config.json"
    raw = json.loads(cfg.read_text())
    raw["text_config"]["max_position_embeddings"] += 1  # a key both families' configs have
    cfg.write_text(json.dumps(raw))
    assert model_fingerprint(model_dir, adapter="llava", dtype="float32") not in (fp, changed)


def test_model_fingerprint_ignores_location(model_dir, tmp_path):
    other = tmp_path / "elsewhere"
    shutil.copytree(model_dir, other)
    assert model_fingerprint(model_dir, adapter="llava", dtype="float32") == model_fingerprint(
        other, adapter="llava", dtype="float32"
    )


def test_file_hash_is_cached_by_path_size_mtime(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    first = file_sha256(f)
    st = f.stat()
    f.write_bytes(b"b" * 1000)  # same size; restore the mtime: the cache cannot tell, by design (and documented)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(f) == first
    assert file_sha256(f, use_cache=False) != first
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a touched file is re-read
    assert file_sha256(f) != first


def test_hub_cache_blobs_are_not_read(tmp_path):
    snap = tmp_path / "models--org--m" / "snapshots" / "abc123"
    blobs = tmp_path / "models--org--m" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    blob = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    (blobs / blob).write_bytes(b"weights")
    (blobs / "cfgblob0000000000000000000000000000000000000").write_text("{}")
    os.symlink(f"../../blobs/{blob}", snap / "model.safetensors")
    os.symlink("../../blobs/cfgblob0000000000000000000000000000000000000", snap / "config.json")
    fp = model_fingerprint(snap, adapter="llava", dtype="bfloat16")
    (blobs / blob).write_bytes(b"changed")  # the blob's name is its hash: not re-read
    assert model_fingerprint(snap, adapter="llava", dtype="bfloat16") == fp


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        model_fingerprint(tmp_path / "nowhere", adapter="llava", dtype="float32")


def test_module_fingerprint_sees_weights(tiny_vlm):
    import torch

    fp = module_fingerprint(tiny_vlm.model, adapter="llava")
    assert fp == module_fingerprint(tiny_vlm.model, adapter="llava")
    p = next(tiny_vlm.model.parameters())
    original = p.detach().clone()
    with torch.no_grad():
        p.view(-1)[0] += 1.0
        try:
            assert module_fingerprint(tiny_vlm.model, adapter="llava") != fp
        finally:
            p.copy_(original)  # exactly as before: the model is shared by other tests


def _manifest(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = folder / f"{i}.png"
        random_image(i).save(path)
        rows.append({"sample_id": f"s{i}", "image": str(path), "question": f"q{i}", "answers": ["7"]})
    return rows


def test_dataset_fingerprint_order_and_location_independent(tmp_path):
    rows = _manifest(tmp_path / "a")
    fp = dataset_fingerprint(rows)
    assert dataset_fingerprint(list(reversed(rows))) == fp
    moved = _manifest(tmp_path / "b")  # same bytes elsewhere
    assert dataset_fingerprint(moved) == fp
    changed_q = [dict(r) for r in rows]
    changed_q[1]["question"] = "other"
    assert dataset_fingerprint(changed_q) != fp
    changed_id = [dict(r) for r in rows]
    changed_id[0]["sample_id"] = "zz"
    assert dataset_fingerprint(changed_id) != fp
    random_image(99).save(rows[2]["image"])  # new pixels under the same name
    os.utime(rows[2]["image"], ns=(1, 10**18))
    assert dataset_fingerprint(rows) != fp
    assert dataset_fingerprint(rows[:3]) != dataset_fingerprint(rows)


def test_stage_fingerprint_changes_with_what_matters_only():
    base = stage_fingerprint("labels", {"teacher": "t1"}, {"fg": 0.2, "bg": 0.1}, code="c1")
    assert base == stage_fingerprint("labels", {"teacher": "t1"}, {"bg": 0.1, "fg": 0.2}, code="c1")
    assert base != stage_fingerprint("labels", {"teacher": "t2"}, {"fg": 0.2, "bg": 0.1}, code="c1")
    assert base != stage_fingerprint("labels", {"teacher": "t1"}, {"fg": 0.25, "bg": 0.1}, code="c1")
    assert base != stage_fingerprint("labels", {"teacher": "t1"}, {"fg": 0.2, "bg": 0.1}, code="c2")
    assert base != stage_fingerprint("train", {"teacher": "t1"}, {"fg": 0.2, "bg": 0.1}, code="c1")
    assert hash_obj({"x": 1}) != hash_obj({"x": 1.0})
