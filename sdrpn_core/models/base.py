"""The adapter protocol: what the SD-RPN method needs from an MLLM family, and nothing else."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn


class AdapterError(ValueError):
    """A model or preset that the method cannot run on; raised at start-up, naming what is wrong."""


@dataclass(frozen=True)
class Family:
    """A model family as the pipeline knows it: its adapter class, where its tiny random builder lives
    ("module:function", imported when first asked for; `**spec -> adapter`), and other names it answers to."""

    name: str  # the adapter's `family`, the HF `model_type` its checkpoints declare
    adapter: type
    tiny: str | None = None
    aliases: tuple[str, ...] = ()

    def build_tiny(self, **spec: Any) -> Any:
        if self.tiny is None:
            raise AdapterError(f"model family {self.name!r} has no tiny builder")
        module, _, function = self.tiny.partition(":")
        return getattr(importlib.import_module(module), function)(**spec)


FAMILIES: dict[str, Family] = {}  # name and aliases → family; filled by each family's module as it is imported


def register_family(family: Family) -> Family:
    """Called at the bottom of a family's adapter module: the one place that makes a family known."""
    for key in (family.name, *family.aliases):
        if key in FAMILIES and FAMILIES[key].adapter is not family.adapter:
            raise AdapterError(f"model family name {key!r} is taken by {FAMILIES[key].adapter.__name__}")
        FAMILIES[key] = family
    return family


def get_family(name: str) -> Family:
    """The family for a name (or alias); an error naming the known ones, never a fallback to another's rules."""
    if name not in FAMILIES:
        raise AdapterError(f"no adapter for model family {name!r} (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[name]


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
    pads_to_square: bool  # the image is padded to a centred square before the processor
    # the family's SD-RPN rules (docs/method.md §5-6): the RPN's extra final norm, RoPE inside its head, whether its
    # map has a fixed grid, and whether high-resolution inputs prune image tokens before pass 2
    rpn_twig_norm: bool
    rpn_rope_in_head: bool
    rpn_fixed_grid: bool
    prunes_image_tokens: bool
    label_variant: str  # the pseudo-label rules ('llava' or 'qwen'), the default of the family's presets
    # the authors' training hyper-parameters for this family: `TrainConfig` fields (docs/method.md §5.2)
    train_recipe: ClassVar[dict[str, Any]]

    def plan_roi(self, logits_map: Any, threshold: float, mode: str = "mask") -> Any:
        """The family's RoI rule on the RPN's logit map → a RoIPlan."""

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
    def pixel_values(self, image: Image.Image) -> Any:
        """One image → the family's processed form (raises on a bad image); `collate` batches these."""

    def collate(self, pixel_values: list[Any], questions: list[str]) -> VLMInputs: ...
    def collated_row(self, x: VLMInputs, i: int, start: int) -> VLMInputs:
        """Row i of a collated batch, its first `start` columns (left padding) cut: what `collate` gives for that
        row alone, sliced rather than tokenised again."""

    def embed(self, x: VLMInputs) -> torch.Tensor:
        """Input embeddings [B, L, D] with the image features in place of the image tokens."""

    def position_ids(self, x: VLMInputs) -> torch.Tensor:
        """[B, L] (1-D RoPE) or [3, B, L] (M-RoPE) positions of the batch."""

    def encode_crop(self, crop: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """A crop of the source image → ([n, D] visual tokens, their (rows, cols) grid)."""

    def encode_crops(self, crops: list[Image.Image]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """`encode_crop` of each crop, in as few vision-tower calls as the family allows (a batch's crops)."""

    def insert_crop(
        self,
        x: VLMInputs,
        embeds: torch.Tensor,
        crops: list[tuple[torch.Tensor, tuple[int, int]]],
        keep: list,
        keep_image: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SD-RPN's pass-2 sequence for batch-1 inputs: crop tokens (those under each keep mask, or all when
        None) after the original image tokens, original image tokens outside `keep_image` dropped (Qwen's
        high-resolution pruning) → (embeddings [1, L', D], positions)."""

    def box_to_pixels(self, box: tuple, image_size: tuple[int, int], grid: tuple[int, int]) -> tuple | None:
        """Grid box (x0, y0, x1, y1, exclusive) → source-image pixels, undoing the family's preprocessing."""

    def pixels_to_box(self, box: tuple, image_size: tuple[int, int], grid: tuple[int, int]) -> tuple:
        """Source-image pixel box → the grid cells covering it."""

    def with_inputs(self, **overrides: Any) -> VLMAdapter:
        """This model (shared) with other input settings; an error naming them where the family has none."""

    def describe(self) -> dict:
        """The input settings recorded with every result (pixel budget, padding, prompt)."""

    def decode(self, token_ids: torch.Tensor | list[int]) -> str: ...
    def save_pretrained(self, path: Any) -> None: ...


class DecoderParts:
    """The structure accessors both HF families share (`model.model.language_model` holds the decoder); adapters
    inherit them and set `self.model`, `self._image_token_id` and a `grid`."""

    model: nn.Module
    _image_token_id: int
    # the input settings evaluation uses (the authors evaluate some families differently from how they label)
    evaluation_inputs: ClassVar[dict[str, Any]] = {}
    # the generation limit of the authors' evaluation wrapper, used when a benchmark's task sets none
    default_max_new_tokens: ClassVar[int] = 1024
    prompt_template: ClassVar[str] = ""  # the conversation template's name, recorded with results

    @property
    def image_token_budget(self) -> int | None:
        """The image-token budget the authors' τ tables are keyed on, where the family has one."""
        return None

    def encode_crops(self, crops: list) -> list:
        return [self.encode_crop(c) for c in crops]  # one call each; a family with fixed-size crops batches them

    @property
    def text_config(self) -> Any:
        return self.model.config.text_config

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.text_config, "head_dim", None) or self.text_config.hidden_size // self.num_heads

    @property
    def num_image_tokens(self) -> int:
        rows, cols = self.grid  # type: ignore[attr-defined]
        return rows * cols

    @property
    def image_token_id(self) -> int:
        return self._image_token_id

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def rotary_emb(self) -> nn.Module:
        return self.language_model.rotary_emb

    @property
    def embed_tokens(self) -> nn.Module:
        return self.language_model.embed_tokens

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
