"""Shared by the stages: how a stage declares itself (`Stage`), the store from settings, a local cache dir, and
one loaded model per process."""

from __future__ import annotations

import inspect
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
from storage.fingerprint import cache_root, hash_obj, stage_fingerprint
from storage.store import Store, StoreSettings


def pick(fn: Callable[..., Any], arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments `fn` names (a lookup or a key takes the few it needs of the run's)."""
    return {name: arguments[name] for name in inspect.signature(fn).parameters if name in arguments}


@dataclass(frozen=True)
class Stage:
    """A pipeline stage, all of it in one declaration at the end of its module; `tasks.stages.stage_task` makes
    the Prefect task from this, so a new stage is its module and a line in the flow.

    `run(…, store, …, fp, progress=None)` computes and commits the stage's output under `fp` and returns its
    reference; the task takes the same arguments with the store's settings in place of `store`, and without `fp`
    when the stage declares its `key`: the material of its cache key, from the run's arguments named as `run`
    names them (the inputs' references and the parameters), hashed with the stage's name and code version into
    `fp`. `lookup` (its parameters named as `run`'s) returns the committed, verified output or None: the one
    lookup per call, made before `run` (`ensure` here, the task under Prefect; a found output ends the task
    `Cached`). `run_name` and `progress` are templates over the arguments (`{shard1}` is the 1-based `shard`).
    `config(cfg, preset)` builds the stage's parameters from the config sections it reads: the flow passes them on.

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
    key: Callable[..., Any] | None = None
    # the stage's parameters from the config section(s) it reads: (config, preset of the source) → parameters
    config: Callable[..., Any] | None = None
    code: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def fingerprint(self, **arguments: Any) -> str:
        """The stage's output's fingerprint for these run arguments: its key, its name, its code version."""
        if self.key is None:
            raise TypeError(f"stage {self.name} declares no key: its callers pass `fp`")
        return stage_fingerprint(self.name, {}, self.key(**pick(self.key, arguments)), code=self.code_version())

    def keyed(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The run's arguments with `fp` filled in from the key, when the stage declares one."""
        if self.key is None or "fp" in arguments:
            return arguments
        return {**arguments, "fp": self.fingerprint(**arguments)}

    def find(self, arguments: dict[str, Any]) -> Any | None:
        """The committed output for these run arguments, or None: the stage's one lookup."""
        return self.lookup(**pick(self.lookup, self.keyed(arguments))) if self.lookup is not None else None

    def ensure(self, **arguments: Any) -> Any:
        """The output, looked up once and computed only when it is not in the store (the task does the same under
        Prefect, with progress and a `Cached` state): for scripts, benchmarks and tests."""
        arguments = self.keyed(arguments)
        found = self.find(arguments)
        return found if found is not None else self.run(**pick(self.run, arguments))

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
