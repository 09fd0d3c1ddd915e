"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) seen through the adapter protocol.

Dynamic resolution: an image becomes (grid_h × grid_w) patches of 14 px, merged 2×2 into (grid_h/2 × grid_w/2) LLM
tokens; that merged raster is the RoI grid. The pixel budget (`min_pixels`, `max_pixels`) and square padding are
settings recorded with every result; the default is the authors' label/training setting: pad to a square with grey
(127, 127, 127) and min = max pixels, a fixed grid (24×24 at 451 584 pixels) (docs/method.md §2, §3.2).

Positions are M-RoPE: (temporal, height, width) ids from the model's own `get_rope_index`.
The stock `Qwen2_5_VLProcessor` needs torchvision for its video slot, which does not work here, so inputs are
built from the PIL image processor and the tokenizer directly (env-notes Q2; tensors equal to the processor's).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from sdrpn_core.models.base import AdapterError, DecoderParts, Family, VLMInputs, register_family
from sdrpn_core.models.llava import expand_to_square, resolve_dtype
from sdrpn_core.roi import GridBox, PixelBox, RoIPlan, grid_box_to_pixels, pixels_to_grid_box, plan_roi_union

QWEN_SYSTEM = "You are a helpful assistant."
SHORT_ANSWER = "Answer the question using a single word or phrase."
# The authors' natural-image label prompt (`Qwen2.5-VL/make_pseudo_label_natural.py`, docs/method.md §3.2): the
# short-answer sentence is replaced, in place, by this request for grounding boxes as raw text; "{detail_label}" is
# literal text there (a plain string, not a format string), kept as is.
GROUNDING_INSTRUCTION = (
    "Output the grounding bounding box of Region of Interest for the question. IMPORTANT: The output MUST be raw "
    "text, one box per line. DO NOT use JSON. Follow this exact format: x_min y_min x_max y_max {detail_label}."
)
SETTINGS_FILE = "sdrpn_qwen.json"


FETCH_FACTOR, FETCH_MIN_PIXELS, FETCH_MAX_PIXELS = 28, 4 * 28 * 28, 16384 * 28 * 28  # qwen_vl_utils' defaults


def fetch_resized(image: Image.Image) -> Image.Image:
    """`qwen_vl_utils.fetch_image`'s resize with its defaults (what the authors' chat wrapper gives the processor):
    each side rounded to a multiple of 28, the area kept in [3,136, 12,845,056] pixels, PIL's bicubic resize."""
    w, h = image.size
    if max(w, h) / min(w, h) > 200:
        raise AdapterError(f"image {w}×{h}: aspect ratio above 200, which fetch_image refuses")
    f = FETCH_FACTOR
    h_bar, w_bar = max(f, round(h / f) * f), max(f, round(w / f) * f)
    if h_bar * w_bar > FETCH_MAX_PIXELS:
        beta = math.sqrt(h * w / FETCH_MAX_PIXELS)
        h_bar, w_bar = max(f, math.floor(h / beta / f) * f), max(f, math.floor(w / beta / f) * f)
    elif h_bar * w_bar < FETCH_MIN_PIXELS:
        beta = math.sqrt(FETCH_MIN_PIXELS / (h * w))
        h_bar, w_bar = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
    return image.resize((w_bar, h_bar), Image.BICUBIC)


@dataclass(frozen=True)
class QwenSettings:
    """What the adapter does around the model; recorded with every result.

    prompt: 'short' (the chat template + the short-answer sentence, the authors' evaluation), 'plain' (the question
    as given) or 'grounding' (the natural-image label prompt). literal_image_tag keeps the literal "<image>" text
    before the vision block, as the authors' label and training prompts do (docs/method.md §3.2)."""

    min_pixels: int = 451584
    max_pixels: int = 451584
    pad_square: bool = True
    pad_fill: tuple[int, int, int] = (127, 127, 127)
    system: str = QWEN_SYSTEM
    prompt: str = "short"
    literal_image_tag: bool = False
    # the authors' chat wrapper first resizes every image with qwen_vl_utils' fetch_image (to multiples of 28 near
    # its own size), then the processor resizes it to the budget: two roundings, another grid for ~16 % of sizes
    fetch_resize: bool = False

    def __post_init__(self):
        if self.prompt not in ("short", "plain", "grounding"):
            raise AdapterError(f"Qwen prompt {self.prompt!r}: choose short, plain or grounding")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise AdapterError(f"pixel budget min {self.min_pixels} / max {self.max_pixels} is not 0 < min <= max")

    def updated(self, overrides: dict) -> QwenSettings:
        """These settings with `overrides` applied; unknown keys are an error naming them."""
        base = asdict(self)
        unknown = set(overrides) - set(base)
        if unknown:
            raise AdapterError(f"unknown Qwen input settings {sorted(unknown)} (known: {', '.join(base)})")
        merged = {**base, **overrides}
        merged["pad_fill"] = tuple(merged["pad_fill"])
        return QwenSettings(**merged)


@dataclass
class QwenPixels:
    """One image after the processor: flattened patches [n_patches, C·T·P·P] and its (t, h, w) patch grid."""

    values: torch.Tensor
    grid_thw: torch.Tensor  # [3]


def load_qwen_settings(path: str | Path) -> QwenSettings:
    f = Path(path) / SETTINGS_FILE
    if not f.exists():
        return QwenSettings()
    raw = json.loads(f.read_text())
    raw["pad_fill"] = tuple(raw.get("pad_fill", (127, 127, 127)))
    return QwenSettings(**raw)


def save_qwen_settings(path: str | Path, settings: QwenSettings) -> None:
    (Path(path) / SETTINGS_FILE).write_text(json.dumps(asdict(settings), indent=2))


class QwenAdapter(DecoderParts):
    """Qwen2.5-VL: merged-token grid from the processed image, chat-template prompts, M-RoPE positions."""

    family = "qwen2_5_vl"
    prompt_template = "qwen2_5_vl chat template (system, image, text)"
    rpn_twig_norm = False  # the released checkpoint carries one, the authors' forward never applies it
    rpn_rope_in_head = True
    rpn_fixed_grid = False  # the head scores any number of merged tokens
    prunes_image_tokens = True  # above PRUNE_ABOVE image tokens (docs/method.md §6.4)
    label_variant = "qwen"  # padding cells become background, weak maps are dropped (docs/method.md §3.5)
    # the authors' `finetune_roi_fix_res*.sh` (docs/method.md §5.2): 16 per device × 2 steps × 4 GPUs = 128, HF's
    # default AdamW betas, gradients clipped at norm 1; the question as given after a literal "<image>" line, as
    # their `data_qwen.py` builds training prompts
    train_recipe: ClassVar[dict[str, Any]] = {
        "inputs": {"prompt": "plain", "literal_image_tag": True},
        "lr": 1e-4,
        "betas": (0.9, 0.999),
        "weight_decay": 0.0,
        "warmup_ratio": 0.03,
        "epochs": 1,
        "keep_all_ignore": True,
        "batch_size": 16,
        "effective_batch": 128,
        "max_grad_norm": 1.0,
    }
    # the authors' lmms-eval wrapper: no square padding, the task's prompt as given (its post-prompt included)
    # the authors' lmms-eval runs `--model qwen2_5_vl` through its chat wrapper (`models/chat/qwen2_5_vl.py`): no
    # square padding, the short-answer sentence appended to any text that lacks it, 128 new tokens by default
    evaluation_inputs: ClassVar[dict[str, Any]] = {"pad_square": False, "prompt": "short", "fetch_resize": True}
    default_max_new_tokens: ClassVar[int] = 128

    def __init__(
        self,
        model: Qwen2_5_VLForConditionalGeneration,
        image_processor: Qwen2VLImageProcessorPil,
        tokenizer,
        settings: QwenSettings | None = None,
    ):
        self.model = model
        self.settings = settings or QwenSettings()
        self.image_processor = copy.copy(image_processor)  # the budget is set on our own copy
        self.image_processor.min_pixels = self.settings.min_pixels
        self.image_processor.max_pixels = self.settings.max_pixels
        self.image_processor.size = {
            "shortest_edge": self.settings.min_pixels,
            "longest_edge": self.settings.max_pixels,
        }
        self._tokenizer = tokenizer
        self.processor = self  # the adapter is its own processor (no torchvision-backed Qwen2_5_VLProcessor)
        cfg = model.config
        self._image_token_id = int(cfg.image_token_id)
        self._vision_start_id = int(cfg.vision_start_token_id)
        self._vision_end_id = int(cfg.vision_end_token_id)
        self._merge = int(cfg.vision_config.spatial_merge_size)
        self._factor = int(cfg.vision_config.patch_size) * self._merge  # pixels per merged token along a side
        if tokenizer.convert_tokens_to_ids("<|image_pad|>") != self._image_token_id:
            raise AdapterError(
                f"tokenizer's <|image_pad|> does not map to config image_token_id {self._image_token_id}"
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
    ) -> QwenAdapter:
        """Model, processor and the folder's input settings (`sdrpn_qwen.json`, else the authors' defaults);
        `with_inputs` overrides them."""
        torch_dtype = resolve_dtype(dtype, device)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        return cls(model.to(device).eval(), image_processor, tokenizer, load_qwen_settings(path))

    def save_pretrained(self, path: str | Path) -> None:
        """Model, image processor, tokenizer and the adapter settings: a folder `from_pretrained` loads."""
        self.model.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        self._tokenizer.save_pretrained(path)
        save_qwen_settings(path, self.settings)

    # -- structure ---------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def grid(self) -> tuple[int, int]:
        """The merged grid of a square image at the budget: the fixed grid of the default (padded) setting."""
        side = int(self.settings.max_pixels**0.5) // self._factor
        return side, side

    @property
    def vision_size(self) -> int:
        """Side in pixels of a square image at the budget (the default setting's processed side)."""
        return self.grid[0] * self._factor

    def with_inputs(self, **overrides) -> QwenAdapter:
        """The same model (shared, not copied) with other input settings, e.g. the teacher's label prompt."""
        return QwenAdapter(self.model, self.image_processor, self._tokenizer, self.settings.updated(overrides))

    def plan_roi(self, logits_map: np.ndarray, threshold: float, mode: str = "mask") -> RoIPlan:
        """The authors' Qwen rule: always the union mask (docs/method.md §6.3); `mode` does not apply."""
        return plan_roi_union(logits_map, logits_map.shape, threshold)

    @property
    def pads_to_square(self) -> bool:
        return self.settings.pad_square

    @property
    def image_token_budget(self) -> int | None:
        side = self.image_processor.patch_size * self.image_processor.merge_size
        return self.settings.max_pixels // (side * side)

    def describe(self) -> dict:
        return {"family": self.family, **asdict(self.settings)}

    # -- inputs ------------------------------------------------------------------------------------------------
    def prompt(self, question: str) -> str:
        """The Qwen chat template (system, user turn with the vision block then the text, generation prompt)."""
        s = self.settings
        text = question
        if s.prompt == "short" and SHORT_ANSWER not in text:
            text = f"{text}\n{SHORT_ANSWER}"
        elif s.prompt == "grounding":  # as theirs: a question without the sentence goes as it is
            text = text.replace(SHORT_ANSWER, GROUNDING_INSTRUCTION)
        tag = "<image>" if s.literal_image_tag else ""
        vision = f"{tag}<|vision_start|><|image_pad|><|vision_end|>"
        sep = "\n" if s.literal_image_tag else ""
        return (
            f"<|im_start|>system\n{s.system}<|im_end|>\n"
            f"<|im_start|>user\n{vision}{sep}{text}<|im_end|>\n<|im_start|>assistant\n"
        )

    def prepare_image(self, image: Image.Image) -> Image.Image:
        """Grey pad to a square and, at a fixed budget, resize to the budget's side: smart_resize's float rounding
        can otherwise give a 5×5 grid where 4×4 was asked for, so every padded image gets the same grid."""
        image = image.convert("RGB")
        if not self.settings.pad_square:
            return fetch_resized(image) if self.settings.fetch_resize else image
        square = expand_to_square(image, self.settings.pad_fill)
        if self.settings.fetch_resize:
            square = fetch_resized(square)
        if self.settings.min_pixels == self.settings.max_pixels:
            side = self.vision_size
            square = square.resize((side, side), Image.BICUBIC)
        return square

    def _process(self, image: Image.Image) -> QwenPixels:
        out = self.image_processor(images=[image], return_tensors="pt")
        return QwenPixels(out["pixel_values"], out["image_grid_thw"][0])

    def pixel_values(self, image: Image.Image) -> QwenPixels:
        return self._process(self.prepare_image(image))

    def merged_grid(self, grid_thw: torch.Tensor) -> tuple[int, int]:
        return int(grid_thw[1]) // self._merge, int(grid_thw[2]) // self._merge

    def collate(self, pixel_values: list[QwenPixels], questions: list[str]) -> VLMInputs:
        """Tokenise with one <|image_pad|> run per image sized by its grid; left padding; packed pixels."""
        texts = []
        for px, q in zip(pixel_values, questions, strict=True):
            n = int(px.grid_thw.prod()) // self._merge**2
            texts.append(self.prompt(q).replace("<|image_pad|>", "<|image_pad|>" * n))
        enc = self._tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        ids = enc["input_ids"]
        positions = [row.eq(self._image_token_id).nonzero().squeeze(-1) for row in ids]
        grids = [self.merged_grid(px.grid_thw) for px in pixel_values]
        for i, (pos, g) in enumerate(zip(positions, grids, strict=True)):
            if pos.numel() != g[0] * g[1]:
                raise AdapterError(f"prompt {i} has {pos.numel()} image tokens, expected {g[0] * g[1]}")
        return VLMInputs(
            input_ids=ids,
            attention_mask=enc["attention_mask"],
            pixel_values=torch.cat([px.values for px in pixel_values]),
            image_positions=positions,
            grids=grids,
            extra={
                "image_grid_thw": torch.stack([px.grid_thw for px in pixel_values]),
                "mm_token_type_ids": ids.eq(self._image_token_id).int(),
            },
        )

    def collated_row(self, x: VLMInputs, i: int, start: int) -> VLMInputs:
        thw = x.extra["image_grid_thw"]
        patches = [0, *thw.prod(-1).cumsum(0).tolist()]  # the rows' pixel patches are packed one after another
        return VLMInputs(
            input_ids=x.input_ids[i : i + 1, start:],
            attention_mask=x.attention_mask[i : i + 1, start:],
            pixel_values=x.pixel_values[patches[i] : patches[i + 1]],
            image_positions=[x.image_positions[i] - start],
            grids=[x.grids[i]],
            extra={
                "image_grid_thw": thw[i : i + 1],
                "mm_token_type_ids": x.extra["mm_token_type_ids"][i : i + 1, start:],
            },
        )

    def build_inputs(self, images: list[Image.Image], questions: list[str]) -> VLMInputs:
        return self.collate([self.pixel_values(im) for im in images], questions)

    def _encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(
            pixel_values=pixel_values.to(self.device, self.dtype), image_grid_thw=grid_thw.to(self.device)
        )
        feats = getattr(out, "pooler_output", out)
        return list(feats)

    def embed(self, x: VLMInputs) -> torch.Tensor:
        ids = x.input_ids.to(self.device)
        embeds = self.embed_tokens(ids)
        feats = torch.cat(self._encode(x.pixel_values, x.extra["image_grid_thw"])).to(embeds.dtype)
        where = ids.eq(self._image_token_id)[..., None].expand_as(embeds)
        return embeds.masked_scatter(where, feats)

    def position_ids(self, x: VLMInputs) -> torch.Tensor:
        """(3, B, L) M-RoPE ids from the model's `get_rope_index` (pads get 0)."""
        pos, _ = self.model.model.get_rope_index(
            x.input_ids.to(self.device),
            x.extra["mm_token_type_ids"].to(self.device),
            image_grid_thw=x.extra["image_grid_thw"].to(self.device),
            attention_mask=x.attention_mask.to(self.device),
        )
        return pos

    def encode_crop(self, crop: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """A crop through the image processor at the same pixel budget (aspect kept, no padding; small crops are
        up-sampled to about the budget, docs/method.md §6.3) → ([n, D] tokens, merged grid)."""
        px = self._process(crop.convert("RGB"))
        return self._encode(px.values, px.grid_thw[None])[0], self.merged_grid(px.grid_thw)

    def insert_crop(
        self,
        x: VLMInputs,
        embeds: torch.Tensor,
        crops: list[tuple[torch.Tensor, tuple[int, int]]],
        keep: list[np.ndarray | None],
        keep_image: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass-2 layout `… <vs> V <vs> V_crop <ve> <ve> …` (docs/method.md §6.4): positions from `get_rope_index`
        with the crop as a further image, then crop tokens outside `keep` (and original image tokens outside
        `keep_image`, the high-resolution pruning) dropped; the survivors keep their 3-D positions."""
        dev = embeds.device
        ids = x.input_ids[0].to(dev)
        end = int(x.image_positions[0][-1]) + 1  # the original <|vision_end|> sits here
        block_ids, block_emb, keep_flags, thws = [], [], [], [x.extra["image_grid_thw"][0]]
        vs = self.embed_tokens(torch.tensor([self._vision_start_id, self._vision_end_id], device=dev))
        for (feats, (gh, gw)), k in zip(crops, keep, strict=True):
            n = feats.shape[0]
            block_ids += [self._vision_start_id] + [self._image_token_id] * n + [self._vision_end_id]
            block_emb += [vs[:1], feats.to(embeds.dtype), vs[1:]]
            flags = np.ones(n, dtype=bool) if k is None else np.asarray(k, dtype=bool).reshape(-1)
            keep_flags += [True, *flags.tolist(), True]
            thws.append(torch.tensor([1, gh * self._merge, gw * self._merge]))
        new_ids = torch.cat([ids[:end], torch.tensor(block_ids, device=dev), ids[end:]])[None]
        pos, _ = self.model.model.get_rope_index(
            new_ids, new_ids.eq(self._image_token_id).int(), image_grid_thw=torch.stack(thws).to(dev)
        )
        new_embeds = torch.cat([embeds[:, :end], torch.cat(block_emb)[None], embeds[:, end:]], dim=1)
        kept = torch.ones(new_ids.shape[1], dtype=torch.bool, device=dev)
        kept[end : end + len(keep_flags)] = torch.tensor(keep_flags, device=dev)
        if keep_image is not None:
            kept[x.image_positions[0].to(dev)] = torch.as_tensor(np.asarray(keep_image, dtype=bool), device=dev)
        return new_embeds[:, kept], pos[:, :, kept]

    def box_to_pixels(self, box: GridBox, image_size: tuple[int, int], grid: tuple[int, int]) -> PixelBox | None:
        if self.settings.pad_square:  # the padded square, undone as for LLaVA
            return grid_box_to_pixels(box, image_size, grid, grid[0] * self._factor)
        w, h = image_size  # no padding: a plain per-axis scale (docs/method.md §6.3)
        x0, x1 = int(box[0] * w / grid[1]), int(box[2] * w / grid[1])
        y0, y1 = int(box[1] * h / grid[0]), int(box[3] * h / grid[0])
        x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
        return x0, y0, max(min(x1, w), x0 + 1), max(min(y1, h), y0 + 1)

    def pixels_to_box(self, box: PixelBox, image_size: tuple[int, int], grid: tuple[int, int]) -> GridBox:
        if self.settings.pad_square:
            return pixels_to_grid_box(box, image_size, grid, grid[0] * self._factor)
        w, h = image_size
        x0, x1 = int(box[0] * grid[1] / w), int(np.ceil(box[2] * grid[1] / w))
        y0, y1 = int(box[1] * grid[0] / h), int(np.ceil(box[3] * grid[0] / h))
        return max(0, x0), max(0, y0), min(grid[1], max(x1, x0 + 1)), min(grid[0], max(y1, y0 + 1))

    def decode(self, token_ids: torch.Tensor | list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True).strip()


register_family(Family("qwen2_5_vl", QwenAdapter, tiny="sdrpn_core.models.tiny:tiny_qwen_adapter", aliases=("qwen",)))
