"""Shared by the stages: how a stage declares itself (`Stage`), the store from settings, a local cache dir, and
one loaded model per process."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from stages.code import code_fingerprint, library_versions
from storage.artifacts import ArtifactStore
from storage.fingerprint import cache_root, hash_obj
from storage.store import Store, StoreSettings


@dataclass(frozen=True)
class Stage:
    """A pipeline stage as its module declares it; `tasks.stages.stage_task` makes the Prefect task from this, so
    a new stage is its module and a line in the flow.

    `run(…, store, …, progress=None)` computes and commits the stage's output and returns its reference; the
    task takes the same arguments with the store's settings in place of `store`. `lookup` (its parameters named
    as `run`'s: `store`, `fp`, …) returns the committed, verified output or None: when found, the task ends
    `Cached` without running. `run_name` and `progress` are templates over the arguments (`{shard1}` is the
    1-based `shard`).

    `code` names the modules the stage runs (default: the module of `run`); the stage's key covers their import
    closure inside the project (`stages.code`), less the `exclude`d packages, whose part in the output its key
    holds by value. A model-bound stage is also keyed on the numeric libraries' versions."""

    name: str
    run: Callable[..., Any]
    lookup: Callable[..., Any] | None = None
    run_name: str = ""  # the task run's name in the UI, e.g. "labels[{dataset.name}]"; default: `name`
    progress: str | None = None  # a progress artifact's description, e.g. "teacher extraction, shard {shard1}"
    model_bound: bool = False  # loads the model: tagged for the one-GPU concurrency limit
    retries: bool = True  # transient I/O failures (S3 5xx, resets) retried; False where a retry redoes hours
    cached_if: Callable[[Any], bool] | None = None  # an output that says nothing was left to do (a resumed shard)
    summary: Callable[[Any], str] | None = None  # logged when the stage ran
    code: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def code_version(self) -> str:
        """What the stage's output depends on of the code (and, for a model-bound stage, of torch/transformers)."""
        roots = self.code or (self.run.__module__,)
        parts: dict[str, Any] = {"code": code_fingerprint(roots, self.exclude)}
        if self.model_bound:
            parts["libraries"] = library_versions()
        return hash_obj(parts)


_STORES: dict[StoreSettings, Store] = {}
_MODELS: dict[object, object] = {}
_LOCK = threading.RLock()  # re-entrant: loading an RPN loads its model


def get_store(settings: StoreSettings) -> Store:
    with _LOCK:
        if settings not in _STORES:
            _STORES[settings] = Store(settings)
        return _STORES[settings]


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_in_process(key: object, load):
    """`load()` once per process and key (models, RPNs): threads and the tasks a worker runs share the result."""
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = load()
        return _MODELS[key]


def read_manifest(ref, store: Store) -> list[dict]:
    """A dataset's manifest rows, checked against the artifact's commit record (a modified manifest is refused)."""
    data = ArtifactStore(store).read("datasets", ref.fingerprint, "manifest.parquet")
    return pq.read_table(io.BytesIO(data)).to_pylist()


def read_rejections(ref, store: Store) -> list[dict]:
    """A dataset's quarantined rows (id and reason)."""
    data = ArtifactStore(store).read("datasets", ref.fingerprint, "quarantine.parquet")
    return pq.read_table(io.BytesIO(data)).to_pylist()


def load_model(ref):
    """The adapter for a ModelRef, loaded once per process (tasks in threads share it)."""
    from sdrpn_core.models import load_adapter

    def load():
        inputs = json.loads(ref.inputs)
        return load_adapter(ref.path, family=ref.family, dtype=ref.dtype, device=ref.device, inputs=inputs)

    return cached_in_process(ref.fingerprint, load)
