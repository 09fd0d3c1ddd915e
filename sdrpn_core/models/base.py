"""The adapter protocol: what the SD-RPN method needs from an MLLM family, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn


class AdapterError(ValueError):
    """A model or preset that the method cannot run on; raised at start-up, naming what is wrong."""


@dataclass
class VLMInputs:
    """A left-padded batch ready for the model, with the image-token positions of every row.

    `image_positions[i]` indexes row i of `input_ids`; `grids[i]` is that image's (rows, cols) token raster.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_positions: list[torch.Tensor]
    grids: list[tuple[int, int]]
    extra: dict[str, Any] = field(default_factory=dict)

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pixel_values": self.pixel_values,
            **self.extra,
        }

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> VLMInputs:
        pixel = self.pixel_values.to(device=device, dtype=dtype) if dtype else self.pixel_values.to(device)
        return VLMInputs(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            pixel_values=pixel,
            image_positions=[p.to(device) for p in self.image_positions],
            grids=self.grids,
            extra={k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.extra.items()},
        )


@runtime_checkable
class VLMAdapter(Protocol):
    """One MLLM family (LLaVA-1.5, Qwen2.5-VL, the nano model) seen through the method's eyes."""

    family: str
    model: nn.Module
    processor: Any

    @property
    def tokenizer(self) -> Any: ...
    @property
    def text_config(self) -> Any: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def grid(self) -> tuple[int, int]: ...
    @property
    def image_token_id(self) -> int: ...
    @property
    def decoder_layers(self) -> nn.ModuleList: ...
    @property
    def language_model(self) -> nn.Module: ...
    @property
    def final_norm(self) -> nn.Module: ...
    @property
    def lm_head(self) -> nn.Module: ...
    @property
    def embed_tokens(self) -> nn.Module: ...
    @property
    def vision_size(self) -> int: ...
    @property
    def rotary_emb(self) -> nn.Module: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def dtype(self) -> torch.dtype: ...

    def prompt(self, question: str) -> str: ...
    def prepare_image(self, image: Image.Image) -> Image.Image: ...
    def build_inputs(self, images: list[Image.Image], questions: list[str]) -> VLMInputs: ...
    def pixel_values(self, image: Image.Image) -> torch.Tensor: ...
    def collate(self, pixel_values: list[torch.Tensor], questions: list[str]) -> VLMInputs: ...
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor: ...
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor: ...
    def crop_pixel_values(self, crop: Image.Image) -> torch.Tensor: ...
    def decode(self, token_ids: torch.Tensor | list[int]) -> str: ...
