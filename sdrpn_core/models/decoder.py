"""Running slices of a decoder stack by hand: the partial prefill of SD-RPN and the KV-reusing second pass.

Works on HF decoder layers of the transformers 5.x functional form (`layer(hidden, attention_mask=,
position_embeddings=, position_ids=, cache=)` returning a tensor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from sdrpn_core.models.base import VLMAdapter


def new_cache(adapter: VLMAdapter) -> DynamicCache:
    return DynamicCache(config=adapter.text_config)


def layer_inputs(
    adapter: VLMAdapter,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache: DynamicCache | None = None,
    layer_idx: int = 0,
) -> tuple[object, tuple[torch.Tensor, torch.Tensor]]:
    """The causal mask (sized by cache layer `layer_idx`'s length) and rotary embeddings for `hidden`'s positions.

    `position_ids` is [B, L], or [3, B, L] for M-RoPE (whose mask is built without positions, as Qwen's own
    forward does: 3-D ids are not a packing signal)."""
    mask = create_causal_mask(
        config=adapter.text_config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=position_ids if position_ids.ndim == 2 else None,
        layer_idx=layer_idx,
    )
    return mask, adapter.rotary_emb(hidden, position_ids=position_ids)


def run_layers(
    layers: Sequence[nn.Module],
    hidden: torch.Tensor,
    mask,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    position_ids: torch.Tensor,
    cache: DynamicCache | None = None,
) -> torch.Tensor:
    text_ids = position_ids if position_ids.ndim == 2 else None  # layers only pass these on to flash kernels
    for layer in layers:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            position_ids=text_ids,
            cache=cache,
            use_cache=cache is not None,
        )
    return hidden


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch, as HF generate computes them (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def eos_token_ids(model: nn.Module, generation_kwargs: dict | None = None) -> list[int]:
    """The ids that end an answer: a generate-call override, else the model's generation config."""
    eos = (generation_kwargs or {}).get("eos_token_id", model.generation_config.eos_token_id)
    return [eos] if isinstance(eos, int) else list(eos or [])
