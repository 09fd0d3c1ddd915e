"""Model adapters: the method talks to an MLLM only through these."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from sdrpn_core.models.base import FAMILIES, AdapterError, Family, VLMAdapter, VLMInputs, get_family, register_family
from sdrpn_core.models.llava import LlavaAdapter
from sdrpn_core.models.qwen import QwenAdapter


def _import_families() -> None:
    """Every module of this package is imported once, so a new family's adapter module registers itself."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "decoder", "tiny"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_families()


def load_adapter(
    path: str | Path,
    *,
    family: str = "auto",
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    inputs: dict | None = None,
) -> VLMAdapter:
    """Load a model folder or hub id with the adapter for its family ('auto' reads config.model_type).
    `inputs` overrides the adapter's input settings (Qwen: pixel budget, padding, prompt)."""
    if family == "auto":
        family = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type
    adapter = get_family(family).adapter.from_pretrained(
        path, dtype=dtype, device=device, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
    )
    return adapter.with_inputs(**inputs) if inputs else adapter


__all__ = [
    "FAMILIES",
    "AdapterError",
    "Family",
    "LlavaAdapter",
    "QwenAdapter",
    "VLMAdapter",
    "VLMInputs",
    "get_family",
    "load_adapter",
    "register_family",
]
