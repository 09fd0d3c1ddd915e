"""Shared by the stages: the store from settings, a local cache dir, and one loaded model per process."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from storage.fingerprint import cache_root
from storage.store import Store, StoreSettings

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


def load_model(ref):
    """The adapter for a ModelRef, loaded once per process (tasks in threads share it)."""
    from sdrpn_core.models import load_adapter

    def load():
        inputs = json.loads(ref.inputs)
        return load_adapter(ref.path, family=ref.family, dtype=ref.dtype, device=ref.device, inputs=inputs)

    return cached_in_process(ref.fingerprint, load)
