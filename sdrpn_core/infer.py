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
Single image, batch 1, like the authors' evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from sdrpn_core.data import load_image
from sdrpn_core.models.base import VLMAdapter, VLMInputs
from sdrpn_core.models.decoder import (
    eos_token_ids,
    layer_inputs,
    new_cache,
    run_layers,
    text_positions,
    truncate_cache,
)
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


def _next_logits(adapter: VLMAdapter, hidden: torch.Tensor) -> torch.Tensor:
    return adapter.lm_head(adapter.final_norm(hidden[:, -1:]))[:, -1]


def _full_prefill(adapter: VLMAdapter, embeds: torch.Tensor, positions: torch.Tensor):
    cache = new_cache(adapter)
    mask, pe = layer_inputs(adapter, embeds, positions, None, cache)
    hidden = run_layers(adapter.decoder_layers, embeds, mask, pe, positions, cache)
    return _next_logits(adapter, hidden), cache


def _greedy(
    adapter: VLMAdapter,
    cache,
    logits: torch.Tensor,
    positions: torch.Tensor,
    max_new_tokens: int,
    scores: list[torch.Tensor] | None = None,
    prompt_ids: torch.Tensor | None = None,
) -> list[int]:
    """Greedy decoding with an explicit cache; each new token takes the last position + 1 (the KV length for 1-D
    positions; after M-RoPE or dropped crop tokens, the max position + 1, as Qwen's `rope_deltas` give).
    The checkpoint's `repetition_penalty` applies to the prompt's ids and the answer so far, as `generate` does
    with the generation config (Qwen2.5-VL-Instruct ships 1.05). `scores`, when given, receives each step's
    next-token scores (as `generate(output_scores=True)` does)."""
    eos = set(eos_token_ids(adapter.model))
    penalty = float(getattr(adapter.model.generation_config, "repetition_penalty", None) or 1.0)
    seen = set(prompt_ids.tolist()) if prompt_ids is not None and penalty != 1.0 else set()
    start = int(positions.max()) + 1
    tokens: list[int] = []
    for step in range(max_new_tokens):
        if penalty != 1.0:
            logits = _penalised(logits, seen, penalty)
        if scores is not None:
            scores.append(logits[0].float().cpu())
        token = int(logits[0].argmax())
        seen.add(token)
        tokens.append(token)
        if token in eos or step == max_new_tokens - 1:
            break
        emb = adapter.embed_tokens(torch.tensor([[token]], device=adapter.device))
        pos = text_positions(positions, start + step)
        mask, pe = layer_inputs(adapter, emb, pos, None, cache)
        logits = _next_logits(adapter, run_layers(adapter.decoder_layers, emb, mask, pe, pos, cache))
    return tokens


def _penalised(logits: torch.Tensor, seen: set[int], penalty: float) -> torch.Tensor:
    """HF's repetition penalty: the logits of tokens already seen are divided by it (multiplied when negative)."""
    if not seen:
        return logits
    ids = torch.tensor(sorted(seen), device=logits.device)
    picked = logits[0, ids]
    out = logits.clone()
    out[0, ids] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return out


def _prompt_ids(x) -> torch.Tensor:
    return x.input_ids[0][x.attention_mask[0].bool()]


def _finish(adapter: VLMAdapter, tokens: list[int], roi: RoIOutcome | None, seconds: dict[str, float]) -> Answer:
    text_ids = [t for t in tokens if t not in set(eos_token_ids(adapter.model))]
    return Answer(adapter.decode(text_ids), tokens, roi, seconds)


def _inputs(adapter: VLMAdapter, image: Image.Image | str, question: str):
    image = load_image(image)
    x = adapter.collate([adapter.pixel_values(image)], [question])
    return image, x, adapter.embed(x), adapter.position_ids(x)


@torch.inference_mode()
def answer_baseline(adapter: VLMAdapter, image: Image.Image | str, question: str, max_new_tokens: int = 128) -> Answer:
    """The MLLM alone (same prompt and decoding as SD-RPN's pass 2, without an insertion)."""
    t0 = time.perf_counter()
    _, x, embeds, positions = _inputs(adapter, image, question)
    logits, cache = _full_prefill(adapter, embeds, positions)
    t1 = time.perf_counter()
    tokens = _greedy(adapter, cache, logits, positions, max_new_tokens, prompt_ids=_prompt_ids(x))
    return _finish(adapter, tokens, None, {"prefill": t1 - t0, "decode": time.perf_counter() - t1})


Crop = tuple[torch.Tensor, tuple[int, int]]  # [n, D] visual tokens of one crop and their grid


def crop_tokens(
    adapter: VLMAdapter, image: Image.Image, plan: RoIPlan, grid: tuple[int, int]
) -> tuple[list[Crop], list[np.ndarray | None], list[PixelBox], str]:
    """Crop the plan's boxes (on a `grid` map) from the full-resolution image and encode them → (crops, keep masks
    (None = every token), source-pixel boxes, why nothing was cropped)."""
    if plan.kind == "none":
        return [], [], [], plan.reason
    pixel_boxes = [b for b in (adapter.box_to_pixels(g, image.size, grid) for g in plan.boxes) if b is not None]
    if not pixel_boxes:
        return [], [], [], "RoI lies in the square padding, outside the image"
    crops = [adapter.encode_crop(image.crop(b)) for b in pixel_boxes]
    if plan.kind == "mask":
        # the RoI cells inside the union box, resized bilinearly to the crop's own grid, > 0.5
        return crops, [resize_mask(plan.region, crops[0][1])], pixel_boxes, ""
    return crops, [None] * len(crops), pixel_boxes, ""


@torch.inference_mode()
def answer_with_boxes(
    adapter: VLMAdapter,
    image: Image.Image | str,
    question: str,
    pixel_boxes: list[PixelBox],
    max_new_tokens: int = 128,
) -> Answer:
    """Answer with given source-pixel crops inserted after the image tokens (the oracle and ViCrop rows)."""
    t0 = time.perf_counter()
    image, x, embeds, positions = _inputs(adapter, image, question)
    if pixel_boxes:
        crops = [adapter.encode_crop(image.crop(b)) for b in pixel_boxes]
        embeds, positions = adapter.insert_crop(x, embeds, crops, [None] * len(crops))
    logits, cache = _full_prefill(adapter, embeds, positions)
    tokens = _greedy(adapter, cache, logits, positions, max_new_tokens, prompt_ids=_prompt_ids(x))
    return _finish(adapter, tokens, None, {"total": time.perf_counter() - t0})


VICROP_GENERIC_PROMPT = "Write a general description of the image."


@torch.inference_mode()
def vicrop_map(adapter: VLMAdapter, image: Image.Image, question: str, layer: int) -> np.ndarray:
    """ViCrop's rel-att map: the last prompt token's attention to the image for the question, divided by that for
    a generic description prompt (two extra partial prefills, batched), at one layer, mean over heads."""
    from sdrpn_core.teacher import prompt_attention

    px = adapter.pixel_values(image)
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


def answer_vicrop(
    adapter: VLMAdapter,
    image: Image.Image | str,
    question: str,
    *,
    layer: int,
    window_frac: float = 0.5,
    max_new_tokens: int = 128,
) -> Answer:
    """Training-free ViCrop (rel-att): crop the window of highest relative attention, append its tokens."""
    t0 = time.perf_counter()
    image = load_image(image)
    ratio = vicrop_map(adapter, image, question, layer)
    box = best_window(ratio, round(min(ratio.shape) * window_frac))
    pixel = adapter.box_to_pixels(box, image.size, ratio.shape)
    answer = answer_with_boxes(adapter, image, question, [pixel] if pixel else [], max_new_tokens)
    plan = RoIPlan("box" if pixel else "none", (box,), prob=ratio / max(float(ratio.max()), 1e-8))
    answer.roi = RoIOutcome(plan, ratio, [pixel] if pixel else [], -1 if pixel else 0)
    answer.seconds = {"total": time.perf_counter() - t0}
    return answer


@torch.inference_mode()
def predict_roi(adapter: VLMAdapter, rpn: RoIPredictor, image: Image.Image | str, question: str) -> np.ndarray:
    """Pass 1 alone: the RPN's logit map [grid_h, grid_w] for one image and question."""
    return run_pass1(adapter, rpn, image, question, reuse_kv=False).logits_map


PRUNE_ABOVE = 1024  # Qwen: with more original image tokens than this, pass 2 also prunes them …
PRUNE_SCORE = 0.01  # … keeping those whose max RPN score over the tokens after the image is above this


@dataclass
class Pass1:
    """What pass 1 leaves for pass 2: the inputs, their embeddings and positions, h^K, the layers-0..K−1 cache."""

    image: Image.Image
    inputs: VLMInputs
    embeds: torch.Tensor
    positions: torch.Tensor
    hidden_k: torch.Tensor
    cache: object | None
    logits_map: np.ndarray
    K: int
    image_keep: np.ndarray | None = None  # original image tokens pass 2 keeps (Qwen, > 1024 image tokens)

    @property
    def image_positions(self) -> torch.Tensor:
        return self.inputs.image_positions[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.inputs.grids[0]


@torch.inference_mode()
def run_pass1(
    adapter: VLMAdapter, rpn: RoIPredictor, image: Image.Image | str, question: str, *, reuse_kv: bool = True
) -> Pass1:
    """Partial prefill (backbone layers 0..K−1) + the RPN for the last prompt token → the RoI logit map."""
    K = rpn.config.K
    image, x, embeds, positions = _inputs(adapter, image, question)
    cache = new_cache(adapter) if reuse_kv else None
    hidden_k, mask, pe, pos = partial_prefill(adapter, embeds, x.attention_mask, positions, K, cache)
    image_positions = x.image_positions[0].to(embeds.device)
    h = rpn.twig_hidden(hidden_k, mask, pe, pos)
    query = torch.tensor([[embeds.shape[1] - 1]], device=embeds.device)
    logits = rpn.head(h, pe, query, image_positions[None])[0, 0].float().cpu().numpy()
    keep = None
    if adapter.prunes_image_tokens and image_positions.numel() > PRUNE_ABOVE:
        # the authors' high-resolution pruning (docs/method.md §6.4 step 5): image scored against every later token
        after = torch.arange(int(image_positions[-1]) + 1, embeds.shape[1], device=embeds.device)[None]
        scores = torch.sigmoid(rpn.head(h, pe, after, image_positions[None])[0].float().amax(0))
        keep = (scores > PRUNE_SCORE).cpu().numpy()
    return Pass1(image, x, embeds, positions, hidden_k, cache, logits.reshape(x.grids[0]), K, keep)


@torch.inference_mode()
def run_pass2(
    adapter: VLMAdapter,
    p1: Pass1,
    plan: RoIPlan,
    max_new_tokens: int = 128,
    scores: list[torch.Tensor] | None = None,
) -> tuple[list[int], RoIOutcome]:
    """Insert the plan's crop tokens after the original image tokens, prefill, decode greedily (`scores` receives
    each step's logits).

    With a pass-1 cache (reuse), layers 0..K−1 run only over the tokens after the unchanged prefix and layers
    K.. run over the whole sequence from h^K; without one, the whole prefill is recomputed (the authors' way).
    """
    K = p1.K
    crops, keep, pixel_boxes, reason = crop_tokens(adapter, p1.image, plan, p1.grid)
    if not crops and plan.kind != "none":
        plan = RoIPlan("none", prob=plan.prob, reason=reason)
    if not crops:  # nothing inserted: the whole prompt is the reusable prefix
        prefix, embeds2, pos2 = p1.embeds.shape[1], p1.embeds, p1.positions
    else:
        prefix = int(p1.image_positions[-1]) + 1
        if p1.image_keep is not None and not p1.image_keep.all():  # pruned: reuse stops at the first dropped token
            prefix = int(p1.image_positions[int(np.argmin(p1.image_keep))])
        embeds2, pos2 = adapter.insert_crop(p1.inputs, p1.embeds, crops, keep, p1.image_keep)
    total = embeds2.shape[1]
    cache = p1.cache
    if cache is not None:
        truncate_cache(cache, prefix)
        layers = adapter.decoder_layers
        new = embeds2[:, prefix:]
        h_k = p1.hidden_k
        if new.shape[1] > 0:
            pos_new = pos2[..., prefix:]
            m_new, pe_new = layer_inputs(adapter, new, pos_new, None, cache, layer_idx=0)
            h_new = run_layers(layers[:K], new, m_new, pe_new, pos_new, cache)
            h_k = torch.cat([p1.hidden_k[:, :prefix], h_new], dim=1)
        m_all, pe_all = layer_inputs(adapter, h_k, pos2, None, cache, layer_idx=K)
        next_logits = _next_logits(adapter, run_layers(layers[K:], h_k, m_all, pe_all, pos2, cache))
    else:
        next_logits, cache = _full_prefill(adapter, embeds2, pos2)
    tokens = _greedy(adapter, cache, next_logits, pos2, max_new_tokens, scores, _prompt_ids(p1.inputs))
    return tokens, RoIOutcome(plan, p1.logits_map, pixel_boxes, total - p1.embeds.shape[1])


def plan_for(adapter: VLMAdapter, logits_map: np.ndarray, threshold: float, mode: str = "mask") -> RoIPlan:
    """The family's RoI rules (the adapter's): LLaVA's components ('mask' or 'box' mode), Qwen's union mask."""
    check_mode(mode)  # Qwen's union rule ignores the mode: a misspelt one still fails there
    return adapter.plan_roi(logits_map, threshold, mode)


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
    t0 = time.perf_counter()
    p1 = run_pass1(adapter, rpn, image, question, reuse_kv=reuse_kv)
    plan = plan_for(adapter, p1.logits_map, threshold, mode)
    t1 = time.perf_counter()
    tokens, roi = run_pass2(adapter, p1, plan, max_new_tokens)
    return _finish(adapter, tokens, roi, {"pass1": t1 - t0, "pass2+decode": time.perf_counter() - t1})
