"""Content fingerprints: what a stage's output depends on, as a short stable hash.

* model: config + weights (+ adapter name + dtype). Weight files are hashed by content, but a file's hash is
  cached by (path, size, mtime) in `~/.cache/sdrpn/file-hashes.json` (override: `SDRPN_CACHE_DIR`), so a 14 GB
  model is read once, not every run. Files in a Hugging Face hub cache are not read at all: their blob names are
  already the sha256 of their content, and the snapshot folder names the commit.
* dataset: the sample manifest — ids, questions, answers, boxes and the *bytes* of each image — independent of row
  order and of where the files live (image URIs are not part of it, their content is).
* stage: stage name + the inputs' fingerprints + the stage's parameters + the version of the code the stage runs
  (`stages.code`: its import closure, without comments or docstrings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

FP_LEN = 16
_LOCK = threading.Lock()


def _canonical(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _canonical(dataclasses.asdict(obj))
    if hasattr(obj, "model_dump"):
        return _canonical(obj.model_dump())
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_canonical(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest() + f":{obj.dtype}:{obj.shape}"
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, float):
        return repr(obj)  # 0.1 and 0.1000000001 must differ; 1 and 1.0 too
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot fingerprint a {type(obj).__name__}")


def hash_obj(obj: Any) -> str:
    """Stable hash of JSON-like data (dicts in any key order, dataclasses, pydantic models, arrays)."""
    blob = json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:FP_LEN]


# -- file content hashes, cached by (path, size, mtime) ------------------------------------------------------------


def cache_root() -> Path:
    """sdrpn's local cache folder: `SDRPN_CACHE_DIR`, else `~/.cache/sdrpn`."""
    return Path(os.environ.get("SDRPN_CACHE_DIR", Path.home() / ".cache" / "sdrpn"))


def _cache_file() -> Path:
    return cache_root() / "file-hashes.json"


def _load_cache() -> dict[str, str]:
    try:
        return json.loads(_cache_file().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _save_cache(entries: dict[str, str]) -> None:
    path = _cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries))
    tmp.replace(path)


def file_sha256(path: str | Path, *, use_cache: bool = True) -> str:
    """sha256 of a local file's bytes; cached by (absolute path, size, mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    if use_cache:
        with _LOCK:
            hit = _load_cache().get(key)
        if hit:
            return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if use_cache:
        with _LOCK:
            entries = _load_cache()
            entries[key] = digest
            _save_cache(entries)
    return digest


def uri_sha256(uri: str, **storage_options) -> str:
    """Content hash of any fsspec URL; local files go through the (path, size, mtime) cache."""
    if "://" not in uri or uri.startswith("file://"):
        return file_sha256(uri.removeprefix("file://"))
    with fsspec.open(uri, "rb", **storage_options) as f:
        return hashlib.sha256(f.read()).hexdigest()


# -- models ----------------------------------------------------------------------------------------------------


def _hub_blob_hash(path: Path) -> str | None:
    """In a hub cache, snapshots/<commit>/file → ../../blobs/<sha256>: the link target is the content hash."""
    if path.is_symlink() and "snapshots" in path.parts:
        target = Path(os.readlink(path)).name
        if len(target) >= 40:
            return target
    return None


def model_fingerprint(path: str | Path, *, adapter: str, dtype: str) -> str:
    """Config + weight contents of a local model folder (or hub snapshot), + adapter name and dtype."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {path} (a hub id must be downloaded first)")
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    if not weights:
        raise FileNotFoundError(f"no weight files (*.safetensors) in {folder}")
    parts: dict[str, Any] = {"adapter": adapter, "dtype": str(dtype).removeprefix("torch."), "files": {}}
    for p in sorted(folder.iterdir()):
        if (
            p.name
            in (
                "config.json",
                "generation_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "preprocessor_config.json",
                "processor_config.json",
                "sdrpn_qwen.json",
            )
            or p in weights
        ):
            parts["files"][p.name] = _hub_blob_hash(p) or file_sha256(p)
    return hash_obj(parts)


def module_fingerprint(model, *, adapter: str) -> str:
    """For an in-memory model (tests, freshly built): config + every tensor's bytes."""
    import torch

    h = hashlib.sha256()
    h.update(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return hash_obj({"adapter": adapter, "state": h.hexdigest(), "dtype": str(next(model.parameters()).dtype)})


# -- datasets --------------------------------------------------------------------------------------------------


def dataset_fingerprint(
    rows: Iterable[Mapping[str, Any]],
    *,
    image_key: str = "image",
    image_hashes: Sequence[str] | None = None,
    **storage_options,
) -> str:
    """Order- and location-independent hash of a manifest: each row is hashed with its image's content hash in
    place of the image URI (read from `image_key`, or given as `image_hashes` when already known); the row hashes
    are sorted before the final hash."""
    row_hashes = []
    for i, row in enumerate(rows):
        content = {k: v for k, v in row.items() if k != image_key}
        image = row.get(image_key)
        if image_hashes is not None:
            content["image_sha256"] = image_hashes[i]
        else:
            content["image_sha256"] = uri_sha256(image, **storage_options) if isinstance(image, str) else None
        row_hashes.append(hash_obj(content))
    return hash_obj(sorted(row_hashes))


# -- stages and code ---------------------------------------------------------------------------------------------


def stage_fingerprint(stage: str, inputs: Mapping[str, str], params: Any, *, code: str) -> str:
    """`code`: the stage's code version (`stages.common.Stage.code_version`: the modules it runs)."""
    return hash_obj({"stage": stage, "inputs": dict(inputs), "params": params, "code": code})
