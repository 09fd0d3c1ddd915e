"""Answering with SD-RPN: pass 1 predicts the RoI, pass 2 answers with the crop's tokens inserted.

Pass 1 is a partial prefill (backbone layers 0..K−1 + the RPN). The family's RoI rules (`plan_for`: LLaVA's
components, Qwen's union mask) pick crops from the original full-resolution image; the adapter inserts their
visual tokens after the original image tokens (`insert_crop`: LLaVA with contiguous positions, Qwen as its own
vision block with M-RoPE positions, masked tokens dropped); pass 2 is a prefill over the longer sequence, then
greedy decoding at the last position + 1 (docs/method.md §6).

Beyond the authors: the prefix (system prompt + original image) is causal and identical in both passes, so
with `reuse_kv=True` pass 2 takes layers 0..K−1 of the prefix from pass 1's KV cache and h^K of the prefix from
pass 1's hidden states, and only runs the new tokens through those layers. `reuse_kv=False` recomputes
everything, exactly as the authors do. Both give the same answer (tested).

Every function has a batched form (`*_batch`: lists of images and questions → list of answers) that runs B rows
through one prefill and one greedy loop (`sdrpn_core.batched`); the single-image functions are its batch-1 case.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdrpn_core.batched import (
    Packed,
    concat,
    greedy,
    next_logits,
    pack,
    padding_mask,
    prefill,
    reuse_prefix_cache,
)
from sdrpn_core.data import load_image
from sdrpn_core.models.base import VLMAdapter, VLMInputs
from sdrpn_core.models.decoder import eos_token_ids, layer_inputs, new_cache, run_layers
from sdrpn_core.roi import PixelBox, RoIPlan, check_mode, resize_mask
from sdrpn_core.rpn import RoIPredictor, partial_prefill


@dataclass
class RoIOutcome:
    plan: RoIPlan
    logits: np.ndarray  # [grid_h, grid_w], raw RPN logits
    pixel_boxes: list[PixelBox]
    n_crop_tokens: int  # tokens inserted (crop tokens + Qwen's vision start/end markers); −1 when not counted


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    roi: RoIOutcome | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def _full_prefill(adapter: VLMAdapter, embeds: torch.Tensor, positions: torch.Tensor):
    """The whole decoder over one unpadded row → (next-token logits [1, V], KV cache)."""
    return prefill(adapter, Packed(embeds, positions, _ones(embeds)))


def _ones(embeds: torch.Tensor) -> torch.Tensor:
    return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)


def _prompt_ids(x: VLMInputs) -> list[torch.Tensor]:
    return [ids[mask.bool()] for ids, mask in zip(x.input_ids, x.attention_mask, strict=True)]


def _finish(adapter: VLMAdapter, tokens: list[int], roi: RoIOutcome | None, seconds: dict[str, float]) -> Answer:
    text_ids = [t for t in tokens if t not in set(eos_token_ids(adapter.model))]
    return Answer(adapter.decode(text_ids), tokens, roi, seconds)


@dataclass(frozen=True)
class Preprocessed:
    """A decoded image and `adapter.pixel_values` of it, made ahead of answering (evaluation reads the next batch
    in a background thread), so the model never waits on decoding or the image processor."""

    image: Image.Image
    pixels: Any
    adapter: VLMAdapter = field(repr=False, compare=False)  # pixel values hold only for the adapter's inputs


def preprocess(adapter: VLMAdapter, source: Image.Image | str | bytes | Preprocessed) -> Preprocessed:
    """An image (a path / URL, encoded bytes, a PIL image) → decoded and processed for `adapter`; BadSample naming
    the image when it does not decode."""
    if isinstance(source, Preprocessed):
        if source.adapter is adapter:
            return source
        source = source.image
    image = load_image(source)
    return Preprocessed(image, adapter.pixel_values(image), adapter)


@dataclass
class _Batch:
    """Collated inputs of B (image, question) rows, and each row's own view (its batch-1 inputs, embeddings and
    positions, the batch's padding stripped)."""

    images: list[Image.Image]
    x: VLMInputs
    embeds: torch.Tensor
    positions: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.x.attention_mask.to(self.embeds.device)

    def offset(self, i: int) -> int:
        return self.embeds.shape[1] - int(self.x.attention_mask[i].sum())

    def row(self, adapter: VLMAdapter, i: int) -> tuple[VLMInputs, torch.Tensor, torch.Tensor]:
        off = self.offset(i)
        x_i = adapter.collated_row(self.x, i, off)
        return x_i, self.embeds[i : i + 1, off:], self.positions[..., i : i + 1, off:]


def _inputs(adapter: VLMAdapter, images: list, questions: list[str]) -> _Batch:
    ready = [preprocess(adapter, im) for im in images]
    x = adapter.collate([r.pixels for r in ready], list(questions))
    return _Batch([r.image for r in ready], x, adapter.embed(x), adapter.position_ids(x))


def answers_of(adapter: VLMAdapter, tokens: list[list[int]], seconds: dict[str, float], rois=None) -> list[Answer]:
    """Per-row answers; each row is charged an equal share of the batch's time (per phase)."""
    share = {k: v / max(1, len(tokens)) for k, v in seconds.items()}
    return [_finish(adapter, t, rois[i] if rois else None, dict(share)) for i, t in enumerate(tokens)]


@torch.inference_mode()
def answer_baseline_batch(
    adapter: VLMAdapter, images: list, questions: list[str], max_new_tokens: int = 128
) -> list[Answer]:
    """The MLLM alone (same prompt and decoding as SD-RPN's pass 2, without an insertion), B rows at once."""
    t0 = time.perf_counter()
    b = _inputs(adapter, images, questions)
    packed = Packed(b.embeds, b.positions, b.mask)
    logits, cache = prefill(adapter, packed)
    tokens = greedy(adapter, cache, logits, packed, max_new_tokens, _prompt_ids(b.x))
    return answers_of(adapter, tokens, {"total": time.perf_counter() - t0})


def answer_baseline(adapter: VLMAdapter, image: Image.Image | str, question: str, max_new_tokens: int = 128) -> Answer:
    return answer_baseline_batch(adapter, [image], [question], max_new_tokens)[0]


Crop = tuple[torch.Tensor, tuple[int, int]]  # [n, D] visual tokens of one crop and their grid


def crop_boxes(adapter: VLMAdapter, image: Image.Image, plan: RoIPlan, grid: tuple[int, int]) -> tuple[list, str]:
    """The plan's boxes (on a `grid` map) in source pixels → (pixel boxes, why nothing is cropped)."""
    if plan.kind == "none":
        return [], plan.reason
    pixel_boxes = [b for b in (adapter.box_to_pixels(g, image.size, grid) for g in plan.boxes) if b is not None]
    return pixel_boxes, "" if pixel_boxes else "RoI lies in the square padding, outside the image"


def keep_masks(plan: RoIPlan, crops: list[Crop]) -> list[np.ndarray | None]:
    """Which crop tokens pass 2 keeps: 'mask' plans the RoI cells inside the union box, resized bilinearly to the
    crop's own grid, > 0.5; otherwise every token (None)."""
    if plan.kind == "mask" and crops:
        return [resize_mask(plan.region, crops[0][1])]
    return [None] * len(crops)


def crop_tokens(
    adapter: VLMAdapter, image: Image.Image, plan: RoIPlan, grid: tuple[int, int]
) -> tuple[list[Crop], list[np.ndarray | None], list[PixelBox], str]:
    """Crop the plan's boxes (on a `grid` map) from the full-resolution image and encode them → (crops, keep masks
    (None = every token), source-pixel boxes, why nothing was cropped)."""
    pixel_boxes, reason = crop_boxes(adapter, image, plan, grid)
    crops = adapter.encode_crops([image.crop(b) for b in pixel_boxes])
    return crops, keep_masks(plan, crops), pixel_boxes, reason


def _encode_all(adapter: VLMAdapter, images: list[Image.Image], boxes: list[list[PixelBox]]) -> list[list[Crop]]:
    """Every row's crops encoded together (one vision call for a batch where the family allows it)."""
    flat = adapter.encode_crops([im.crop(b) for im, row in zip(images, boxes, strict=True) for b in row])
    out, start = [], 0
    for row in boxes:
        out.append(flat[start : start + len(row)])
        start += len(row)
    return out


@torch.inference_mode()
def answer_with_boxes_batch(
    adapter: VLMAdapter,
    images: list,
    questions: list[str],
    pixel_boxes: list[list[PixelBox]],
    max_new_tokens: int = 128,
) -> list[Answer]:
    """Answer each row with its given source-pixel crops inserted after the image tokens (the oracle and ViCrop
    rows), B rows at once."""
    t0 = time.perf_counter()
    b = _inputs(adapter, images, questions)
    rows = []
    for i, crops in enumerate(_encode_all(adapter, b.images, pixel_boxes)):
        x_i, embeds, positions = b.row(adapter, i)
        if crops:
            embeds, positions = adapter.insert_crop(x_i, embeds, crops, [None] * len(crops))
        rows.append((embeds, positions))
    packed = pack(rows)
    logits, cache = prefill(adapter, packed)
    tokens = greedy(adapter, cache, logits, packed, max_new_tokens, _prompt_ids(b.x))
    return answers_of(adapter, tokens, {"total": time.perf_counter() - t0})


def answer_with_boxes(
    adapter: VLMAdapter,
    image: Image.Image | str,
    question: str,
    pixel_boxes: list[PixelBox],
    max_new_tokens: int = 128,
) -> Answer:
    return answer_with_boxes_batch(adapter, [image], [question], [pixel_boxes], max_new_tokens)[0]


VICROP_GENERIC_PROMPT = "Write a general description of the image."


@torch.inference_mode()
def vicrop_map(adapter: VLMAdapter, image: Image.Image | Preprocessed, question: str, layer: int) -> np.ndarray:
    """ViCrop's rel-att map: the last prompt token's attention to the image for the question, divided by that for
    a generic description prompt (two extra partial prefills, batched), at one layer, mean over heads."""
    from sdrpn_core.teacher import prompt_attention

    px = preprocess(adapter, image).pixels
    x = adapter.collate([px, px], [question, VICROP_GENERIC_PROMPT])
    att = prompt_attention(adapter, x, layer)
    return (att[0] / (att[1] + 1e-8)).numpy().reshape(x.grids[0])


def best_window(score: np.ndarray, side: int) -> tuple[int, int, int, int]:
    """The side×side window (grid cells) with the largest total score → (x0, y0, x1, y1), exclusive."""
    h, w = score.shape
    side = max(1, min(side, h, w))
    cum = np.pad(score, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = cum[side:, side:] - cum[:-side, side:] - cum[side:, :-side] + cum[:-side, :-side]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(x), int(y), int(x) + side, int(y) + side


def answer_vicrop_batch(
    adapter: VLMAdapter,
    images: list,
    questions: list[str],
    *,
    layer: int,
    window_frac: float = 0.5,
    max_new_tokens: int = 128,
) -> list[Answer]:
    """Training-free ViCrop (rel-att): crop the window of highest relative attention, append its tokens. The maps
    are made per row (two partial prefills each); the answers are batched."""
    t0 = time.perf_counter()
    images = [preprocess(adapter, im) for im in images]
    rois: list[RoIOutcome] = []
    for image, question in zip(images, questions, strict=True):
        ratio = vicrop_map(adapter, image, question, layer)  # the batch's processed pixels, not processed again
        box = best_window(ratio, round(min(ratio.shape) * window_frac))
        pixel = adapter.box_to_pixels(box, image.image.size, ratio.shape)
        plan = RoIPlan("box" if pixel else "none", (box,), prob=ratio / max(float(ratio.max()), 1e-8))
        rois.append(RoIOutcome(plan, ratio, [pixel] if pixel else [], -1 if pixel else 0))
    answers = answer_with_boxes_batch(adapter, images, questions, [r.pixel_boxes for r in rois], max_new_tokens)
    share = {"total": (time.perf_counter() - t0) / max(1, len(answers))}
    for answer, roi in zip(answers, rois, strict=True):
        answer.roi, answer.seconds = roi, dict(share)
    return answers


def answer_vicrop(
    adapter: VLMAdapter,
    image: Image.Image | str,
    question: str,
    *,
    layer: int,
    window_frac: float = 0.5,
    max_new_tokens: int = 128,
) -> Answer:
    return answer_vicrop_batch(
        adapter, [image], [question], layer=layer, window_frac=window_frac, max_new_tokens=max_new_tokens
    )[0]


PRUNE_ABOVE = 1024  # Qwen: with more original image tokens than this, pass 2 also prunes them …
PRUNE_SCORE = 0.01  # … keeping those whose max RPN score over the tokens after the image is above this


@dataclass
class Pass1:
    """What pass 1 leaves for pass 2, for one row: its batch-1 inputs, embeddings and positions, h^K, and the
    layers-0..K−1 cache of the pass-1 batch (`row` in it, after `offset` padding columns)."""

    image: Image.Image
    inputs: VLMInputs
    embeds: torch.Tensor
    positions: torch.Tensor
    hidden_k: torch.Tensor
    cache: object | None
    logits_map: np.ndarray
    K: int
    image_keep: np.ndarray | None = None  # original image tokens pass 2 keeps (Qwen, > 1024 image tokens)
    row: int = 0
    offset: int = 0

    @property
    def image_positions(self) -> torch.Tensor:
        return self.inputs.image_positions[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.inputs.grids[0]


@torch.inference_mode()
def run_pass1_batch(
    adapter: VLMAdapter, rpn: RoIPredictor, images: list, questions: list[str], *, reuse_kv: bool = True
) -> list[Pass1]:
    """Partial prefill (backbone layers 0..K−1) + the RPN for each row's last prompt token → its RoI logit map."""
    K = rpn.config.K
    b = _inputs(adapter, images, questions)
    cache = new_cache(adapter) if reuse_kv else None
    hidden_k, mask, pe, pos = partial_prefill(adapter, b.embeds, b.x.attention_mask, b.positions, K, cache)
    h = rpn.twig_hidden(hidden_k, mask, pe, pos)
    length = b.embeds.shape[1]
    out = []
    for i in range(len(b.images)):
        x_i, embeds, positions = b.row(adapter, i)
        off = b.offset(i)
        h_i, pe_i = h[i : i + 1], tuple(t[..., i : i + 1, :, :] if t.ndim == 4 else t[i : i + 1] for t in pe)
        image_positions = b.x.image_positions[i].to(h.device)[None]  # in the batch's columns
        query = torch.tensor([[length - 1]], device=h.device)
        logits = rpn.head(h_i, pe_i, query, image_positions)[0, 0].float().cpu().numpy()
        keep = None
        if adapter.prunes_image_tokens and image_positions.numel() > PRUNE_ABOVE:
            # the authors' high-resolution pruning (docs/method.md §6.4 step 5): image scored against every later token
            after = torch.arange(int(image_positions[0, -1]) + 1, length, device=h.device)[None]
            scores = torch.sigmoid(rpn.head(h_i, pe_i, after, image_positions)[0].float().amax(0))
            keep = (scores > PRUNE_SCORE).cpu().numpy()
        grid = x_i.grids[0]
        out.append(
            Pass1(b.images[i], x_i, embeds, positions, hidden_k[i : i + 1, off:], cache, logits.reshape(grid), K, keep)
        )
        out[-1].row, out[-1].offset = i, off
    return out


def run_pass1(
    adapter: VLMAdapter, rpn: RoIPredictor, image: Image.Image | str, question: str, *, reuse_kv: bool = True
) -> Pass1:
    return run_pass1_batch(adapter, rpn, [image], [question], reuse_kv=reuse_kv)[0]


@dataclass
class _Pass2Row:
    """One row's pass-2 sequence: the plan actually run, its embeddings and positions, the reusable prefix length."""

    plan: RoIPlan
    embeds: torch.Tensor
    positions: torch.Tensor
    prefix: int
    pixel_boxes: list[PixelBox]


def _pass2_rows(adapter: VLMAdapter, p1s: list[Pass1], plans: list[RoIPlan]) -> list[_Pass2Row]:
    """Each row's pass-2 sequence: the plan's crop tokens after the original image tokens (every row's crops
    encoded together). Nothing cropped: the whole prompt is the reusable prefix, less its last token, which pass 2
    runs again so every row ends on a token it computes."""
    boxes = [crop_boxes(adapter, p1.image, plan, p1.grid) for p1, plan in zip(p1s, plans, strict=True)]
    encoded = _encode_all(adapter, [p1.image for p1 in p1s], [b for b, _ in boxes])
    rows = []
    for p1, plan, (pixel_boxes, reason), crops in zip(p1s, plans, boxes, encoded, strict=True):
        if not crops:
            plan = plan if plan.kind == "none" else RoIPlan("none", prob=plan.prob, reason=reason)
            rows.append(_Pass2Row(plan, p1.embeds, p1.positions, p1.embeds.shape[1] - 1, pixel_boxes))
            continue
        prefix = int(p1.image_positions[-1]) + 1
        if p1.image_keep is not None and not p1.image_keep.all():  # pruned: reuse stops at the first dropped token
            prefix = int(p1.image_positions[int(np.argmin(p1.image_keep))])
        embeds, positions = adapter.insert_crop(p1.inputs, p1.embeds, crops, keep_masks(plan, crops), p1.image_keep)
        rows.append(_Pass2Row(plan, embeds, positions, prefix, pixel_boxes))
    return rows


def _prefill_reusing(adapter: VLMAdapter, p1s: list[Pass1], rows: list[_Pass2Row]):
    """Pass 2's prefill with pass 1's prefix: layers 0..K−1 run only over the new tokens, layers K.. over the
    whole sequence from h^K → (next-token logits, cache, the packed batch)."""
    K = p1s[0].K
    width = max(r.prefix for r in rows)
    cache = reuse_prefix_cache(
        adapter, p1s[0].cache, [(p.row, p.offset, r.prefix) for p, r in zip(p1s, rows, strict=True)], K, width
    )
    prefix = pack(
        [(p.hidden_k[:, : r.prefix], r.positions[..., : r.prefix]) for p, r in zip(p1s, rows, strict=True)], width
    )
    new = pack([(r.embeds[:, r.prefix :], r.positions[..., r.prefix :]) for r in rows])
    whole = concat(prefix, new)
    layers = adapter.decoder_layers
    m_new, pe_new = layer_inputs(adapter, new.embeds, new.positions, padding_mask(whole.mask), cache, layer_idx=0)
    h_new = run_layers(layers[:K], new.embeds, m_new, pe_new, new.positions, cache)
    h_k = torch.cat([prefix.embeds, h_new], dim=1)
    m_all, pe_all = layer_inputs(adapter, h_k, whole.positions, padding_mask(whole.mask), cache, layer_idx=K)
    return next_logits(adapter, run_layers(layers[K:], h_k, m_all, pe_all, whole.positions, cache)), cache, whole


@torch.inference_mode()
def run_pass2_batch(
    adapter: VLMAdapter,
    p1s: list[Pass1],
    plans: list[RoIPlan],
    max_new_tokens: int = 128,
    scores: list[torch.Tensor] | None = None,
) -> list[tuple[list[int], RoIOutcome]]:
    """Insert each row's crop tokens after its original image tokens, prefill the ragged rows as one batch, decode
    greedily (`scores` receives row 0's logits at each step).

    With pass 1's cache (reuse), each row's unchanged prefix is not recomputed (`_prefill_reusing`); without one,
    the whole prefill is recomputed (the authors' way)."""
    rows = _pass2_rows(adapter, p1s, plans)
    if p1s[0].cache is not None:
        logits, cache, packed = _prefill_reusing(adapter, p1s, rows)
    else:
        packed = pack([(r.embeds, r.positions) for r in rows])
        logits, cache = prefill(adapter, packed)
    prompt_ids = [_prompt_ids(p1.inputs)[0] for p1 in p1s]
    tokens = greedy(adapter, cache, logits, packed, max_new_tokens, prompt_ids, scores)
    return [
        (t, RoIOutcome(r.plan, p1.logits_map, r.pixel_boxes, r.embeds.shape[1] - p1.embeds.shape[1]))
        for t, r, p1 in zip(tokens, rows, p1s, strict=True)
    ]


def run_pass2(
    adapter: VLMAdapter,
    p1: Pass1,
    plan: RoIPlan,
    max_new_tokens: int = 128,
    scores: list[torch.Tensor] | None = None,
) -> tuple[list[int], RoIOutcome]:
    return run_pass2_batch(adapter, [p1], [plan], max_new_tokens, scores)[0]


def plan_for(adapter: VLMAdapter, logits_map: np.ndarray, threshold: float, mode: str = "mask") -> RoIPlan:
    """The family's RoI rules (the adapter's): LLaVA's components ('mask' or 'box' mode), Qwen's union mask."""
    check_mode(mode)  # Qwen's union rule ignores the mode: a misspelt one still fails there
    return adapter.plan_roi(logits_map, threshold, mode)


def answer_sdrpn_batch(
    adapter: VLMAdapter,
    rpn: RoIPredictor,
    images: list,
    questions: list[str],
    *,
    threshold: float = 0.15,
    mode: str = "mask",
    reuse_kv: bool = True,
    max_new_tokens: int = 128,
) -> list[Answer]:
    """SD-RPN's answers, B rows at once: pass 1 → RoI plan per row (τ = `threshold`, 'mask' or 'box') → pass 2."""
    t0 = time.perf_counter()
    p1s = run_pass1_batch(adapter, rpn, images, questions, reuse_kv=reuse_kv)
    plans = [plan_for(adapter, p1.logits_map, threshold, mode) for p1 in p1s]
    t1 = time.perf_counter()
    done = run_pass2_batch(adapter, p1s, plans, max_new_tokens)
    seconds = {"pass1": t1 - t0, "pass2+decode": time.perf_counter() - t1}
    return answers_of(adapter, [t for t, _ in done], seconds, [roi for _, roi in done])


def answer_sdrpn(
    adapter: VLMAdapter,
    rpn: RoIPredictor,
    image: Image.Image | str,
    question: str,
    *,
    threshold: float = 0.15,
    mode: str = "mask",
    reuse_kv: bool = True,
    max_new_tokens: int = 128,
) -> Answer:
    """SD-RPN's answer: pass 1 → RoI plan (τ = `threshold`, 'mask' or 'box' mode) → pass 2."""
    return answer_sdrpn_batch(
        adapter,
        rpn,
        [image],
        [question],
        threshold=threshold,
        mode=mode,
        reuse_kv=reuse_kv,
        max_new_tokens=max_new_tokens,
    )[0]
