"""LLaVA-1.5 (`LlavaForConditionalGeneration`) seen through the adapter protocol.

The prompt is the authors' `vicuna_v1` template and the image is padded to a square with the CLIP mean colour before
the processor's resize (docs/method.md §3.2, §11): the stock processor's centre crop would cut content silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from sdrpn_core.models.base import AdapterError, DecoderParts, Family, VLMInputs, register_family
from sdrpn_core.models.decoder import positions_from_mask
from sdrpn_core.roi import GridBox, PixelBox, RoIPlan, grid_box_to_pixels, pixels_to_grid_box, plan_roi

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """'auto' means bf16 on CUDA and fp32 on CPU (half precision is slower than fp32 on most CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise AdapterError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad to a centred square (LLaVA's `expand2square`): nothing is cut, the short side gets bands of `fill`."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def load_llava_processor(path: str | Path) -> LlavaProcessor:
    """The saved processor, rebuilt from its parts with the PIL image backend (no torchvision here)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = CLIPImageProcessorPil.from_pretrained(path)
    return LlavaProcessor.from_pretrained(path, tokenizer=tokenizer, image_processor=image_processor)


class LlavaAdapter(DecoderParts):
    """LLaVA-1.5: a 24×24 raster of image tokens (from the vision config, never hard-coded), vicuna_v1 prompts."""

    family = "llava"
    prompt_template = "vicuna_v1"
    rpn_twig_norm = True  # the authors' LLaVA twig applies a copy of the final norm
    rpn_rope_in_head = False
    rpn_fixed_grid = True  # 24x24 tokens whatever the image
    prunes_image_tokens = False
    label_variant = "llava"  # pseudo-label rules (docs/method.md §3.5)
    # the authors' `scripts/finetune_rois.sh` (docs/method.md §5.2): 8 per device × 16 steps × 4 GPUs = 512; what the
    # script leaves out is HF's TrainingArguments default
    train_recipe: ClassVar[dict[str, Any]] = {
        "lr": 5e-5,
        "betas": (0.9, 0.98),
        "weight_decay": 0.0,
        "warmup_ratio": 0.03,
        "epochs": 1,
        "keep_all_ignore": True,
        "batch_size": 8,
        "effective_batch": 512,
        "max_grad_norm": 1.0,  # not passed by the script: HF TrainingArguments' default, which the Trainer applies
    }

    def __init__(self, model: LlavaForConditionalGeneration, processor: LlavaProcessor):
        self.model = model
        self.processor = processor
        cfg = model.config
        image_token_id = getattr(cfg, "image_token_id", None)
        if image_token_id is None:
            raise AdapterError("model config has no image_token_id; it is not a LLaVA-style MLLM")
        if cfg.vision_feature_select_strategy != "default":
            raise AdapterError(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: the RoI grid needs "
                "'default' (patch tokens without CLS), as LLaVA-1.5 uses"
            )
        vision = cfg.vision_config
        side = vision.image_size // vision.patch_size
        self._grid = (side, side)
        if processor.tokenizer.convert_tokens_to_ids(processor.image_token) != image_token_id:
            raise AdapterError(
                f"tokenizer's image token {processor.image_token!r} does not map to config image_token_id "
                f"{image_token_id}"
            )
        self._image_token_id = int(image_token_id)
        mean = processor.image_processor.image_mean
        self._pad_fill = tuple(int(x * 255) for x in mean)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
    ) -> LlavaAdapter:
        """Load from a local folder or a hub id (hub access fails on machines without internet)."""
        torch_dtype = resolve_dtype(dtype, device)
        model = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
        return cls(model.to(device).eval(), load_llava_processor(path))

    def save_pretrained(self, path: str | Path) -> None:
        """Model and processor: a folder `from_pretrained` loads."""
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    # -- structure ---------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def grid(self) -> tuple[int, int]:
        return self._grid

    pads_to_square = True

    def plan_roi(self, logits_map: np.ndarray, threshold: float, mode: str = "mask") -> RoIPlan:
        """The authors' LLaVA rule: components of the blurred map ('mask' or 'box' mode, docs/method.md §6.2)."""
        return plan_roi(logits_map, logits_map.shape, threshold, mode)  # type: ignore[arg-type]

    @property
    def vision_size(self) -> int:
        return self.model.config.vision_config.image_size

    # -- inputs ------------------------------------------------------------------------------------------------
    def prompt(self, question: str) -> str:
        return f"{VICUNA_SYSTEM} USER: {self.processor.image_token}\n{question} ASSISTANT:"

    def prepare_image(self, image: Image.Image) -> Image.Image:
        return expand_to_square(image, self._pad_fill)

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """One image → [3, S, S] after pad-to-square; raises whatever the processor raises for a bad image."""
        out = self.processor.image_processor(self.prepare_image(image), return_tensors="pt")
        return out["pixel_values"][0]

    def collate(self, pixel_values: list[torch.Tensor], questions: list[str]) -> VLMInputs:
        """Tokenise prompts (left padding, for batched generation) with one image-token run each."""
        n = self.num_image_tokens
        image_token = self.processor.image_token
        texts = [self.prompt(q).replace(image_token, image_token * n) for q in questions]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        ids = enc["input_ids"]
        positions = [row.eq(self._image_token_id).nonzero().squeeze(-1) for row in ids]
        for i, pos in enumerate(positions):
            if pos.numel() != n:
                raise AdapterError(f"prompt {i} has {pos.numel()} image tokens, expected {n}")
        return VLMInputs(
            input_ids=ids,
            attention_mask=enc["attention_mask"],
            pixel_values=torch.stack(pixel_values),
            image_positions=positions,
            grids=[self._grid] * len(questions),
        )

    def collated_row(self, x: VLMInputs, i: int, start: int) -> VLMInputs:
        return VLMInputs(
            input_ids=x.input_ids[i : i + 1, start:],
            attention_mask=x.attention_mask[i : i + 1, start:],
            pixel_values=x.pixel_values[i : i + 1],
            image_positions=[x.image_positions[i] - start],
            grids=[x.grids[i]],
        )

    def build_inputs(self, images: list[Image.Image], questions: list[str]) -> VLMInputs:
        return self.collate([self.pixel_values(im) for im in images], questions)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower (layer -2, patch tokens) + projector → [B, n_img, hidden]."""
        cfg = self.model.config
        feats = self.model.model.get_image_features(
            pixel_values=pixel_values.to(self.device, self.dtype),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        feats = getattr(feats, "pooler_output", feats)
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def embed(self, x: VLMInputs) -> torch.Tensor:
        """Text embeddings with the projected image features written over the image-token run of each row."""
        input_ids = x.input_ids.to(self.device)
        embeds = self.embed_tokens(input_ids)
        feats = self.encode_images(x.pixel_values).to(embeds.dtype)
        where = input_ids.eq(self._image_token_id)[..., None].expand_as(embeds)
        return embeds.masked_scatter(where, feats)

    def position_ids(self, x: VLMInputs) -> torch.Tensor:
        """[B, L] positions of a left-padded batch, as HF generate computes them."""
        return positions_from_mask(x.attention_mask.to(self.device))

    def encode_crop(self, crop: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """A crop resized to the vision square, encoded → ([n_img, D] tokens, the grid)."""
        return self.encode_images(self.crop_pixel_values(crop)[None])[0], self._grid

    def encode_crops(self, crops: list[Image.Image]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Every crop resized to the vision square, encoded in one vision-tower call."""
        if not crops:
            return []
        feats = self.encode_images(torch.stack([self.crop_pixel_values(c) for c in crops]))
        return [(f, self._grid) for f in feats]

    def insert_crop(
        self,
        x: VLMInputs,
        embeds: torch.Tensor,
        crops: list[tuple[torch.Tensor, tuple[int, int]]],
        keep: list[np.ndarray | None],
        keep_image: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop tokens (those under `keep`) right after the original image tokens, no separators, positions
        0..L'−1 (the authors' `insert_sub_feat`, docs/method.md §6.4). LLaVA never prunes its own image tokens."""
        if keep_image is not None:
            raise AdapterError("LLaVA's pass 2 keeps every original image token (no high-resolution pruning)")
        tokens = [
            f if k is None else f[torch.as_tensor(np.asarray(k).reshape(-1), device=f.device)]
            for (f, _grid), k in zip(crops, keep, strict=True)
        ]
        cut = int(x.image_positions[0][-1]) + 1
        new = torch.cat([embeds[:, :cut], torch.cat(tokens)[None].to(embeds.dtype), embeds[:, cut:]], dim=1)
        return new, torch.arange(new.shape[1], device=new.device)[None]

    def box_to_pixels(self, box: GridBox, image_size: tuple[int, int], grid: tuple[int, int]) -> PixelBox | None:
        return grid_box_to_pixels(box, image_size, grid, self.vision_size)

    def pixels_to_box(self, box: PixelBox, image_size: tuple[int, int], grid: tuple[int, int]) -> GridBox:
        return pixels_to_grid_box(box, image_size, grid, self.vision_size)

    def with_inputs(self, **overrides) -> LlavaAdapter:
        if overrides:
            raise AdapterError(f"input settings {sorted(overrides)} are not adjustable for llava (fixed 336 px input)")
        return self

    def describe(self) -> dict:
        side = self.vision_size
        return {"family": self.family, "pixel_budget": f"{side}x{side}", "pad": f"square, fill {self._pad_fill}"}

    def crop_pixel_values(self, crop: Image.Image) -> torch.Tensor:
        """A crop resized to the vision input square (aspect not kept, as the authors do) → [3, S, S]."""
        side = self.vision_size
        return self.pixel_values(crop.resize((side, side), Image.BILINEAR))

    def decode(self, token_ids: torch.Tensor | list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()


register_family(Family("llava", LlavaAdapter, tiny="sdrpn_core.models.tiny:tiny_llava_adapter"))
