"""Shared by the stages: the store from settings, a local cache dir, and one loaded model per process."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from storage.fingerprint import cache_root
from storage.store import Store, StoreSettings

_STORES: dict[StoreSettings, Store] = {}
_MODELS: dict[str, object] = {}
_LOCK = threading.Lock()


def get_store(settings: StoreSettings) -> Store:
    with _LOCK:
        if settings not in _STORES:
            _STORES[settings] = Store(settings)
        return _STORES[settings]


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_model(ref):
    """The adapter for a ModelRef, loaded once per process (tasks in threads share it)."""
    from sdrpn_core.models import load_adapter

    with _LOCK:
        if ref.fingerprint not in _MODELS:
            _MODELS[ref.fingerprint] = load_adapter(
                ref.path, family=ref.family, dtype=ref.dtype, device=ref.device, inputs=json.loads(ref.inputs)
            )
        return _MODELS[ref.fingerprint]
