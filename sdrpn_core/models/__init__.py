"""Model adapters: the method talks to an MLLM only through these."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from sdrpn_core.models.base import AdapterError, VLMAdapter, VLMInputs
from sdrpn_core.models.llava import LlavaAdapter
from sdrpn_core.models.qwen import QwenAdapter

ADAPTERS: dict[str, type] = {"llava": LlavaAdapter, "qwen2_5_vl": QwenAdapter}


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
    if family not in ADAPTERS:
        raise AdapterError(f"no adapter for model family {family!r} (known: {', '.join(sorted(ADAPTERS))})")
    adapter = ADAPTERS[family].from_pretrained(
        path, dtype=dtype, device=device, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
    )
    return adapter.with_inputs(**inputs) if inputs else adapter


__all__ = ["ADAPTERS", "AdapterError", "LlavaAdapter", "QwenAdapter", "VLMAdapter", "VLMInputs", "load_adapter"]
