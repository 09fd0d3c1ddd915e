"""Choosing the teacher's grounding heads: score every (layer, head) against ground-truth boxes on a calibration
set. The authors hand-picked theirs and published no procedure (docs/method.md §12); a new model needs one.

A head's score is its hit rate: how often the argmax of its answer-to-image attention (the teacher's map for
that single head, sinks included) falls inside the asked region. `mass` (attention inside the box / total) is
reported beside it. Pick heads on a calibration split, never on the held-out one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sdrpn_core.data import BadSample, load_image
from sdrpn_core.models.base import VLMAdapter
from sdrpn_core.presets import get_preset
from sdrpn_core.roi import PixelBox
from sdrpn_core.teacher import _generate_batch


@dataclass(frozen=True)
class HeadScore:
    layer: int
    head: int
    hit_rate: float
    mass: float


def score_heads(
    adapter: VLMAdapter,
    samples: Sequence[tuple[object, str, PixelBox]],
    *,
    layers: Sequence[int] | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 8,
) -> list[HeadScore]:
    """(image, question, gt box in source pixels) samples → every head of `layers` (default: all), best first."""
    layers = list(layers) if layers is not None else list(range(adapter.num_layers))
    preset = get_preset("llava-1.5-7b", grounding=dict.fromkeys(layers), sink={}, K=1, T=1)
    n_heads = adapter.num_heads
    hits = np.zeros((len(layers), n_heads))
    mass = np.zeros((len(layers), n_heads))
    counted = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        pixels, questions, cells = [], [], []
        for image, question, box in chunk:
            try:
                img = load_image(image)
            except BadSample:
                continue
            pixels.append(adapter.pixel_values(img))
            questions.append(question)
            cells.append((box, img.size))
        if not pixels:
            continue
        inputs = adapter.collate(pixels, questions)
        if len(set(inputs.grids)) > 1:
            raise ValueError("head scoring needs one image grid per batch: use batch_size=1 or a fixed pixel budget")
        grid = inputs.grids[0]
        per_head = _per_head(adapter, inputs, preset, layers, max_new_tokens)  # [B, layers, heads, n_img]
        for b, (box, size) in enumerate(cells):
            x0, y0, x1, y1 = adapter.pixels_to_box(box, size, grid)
            maps = per_head[b].reshape(len(layers), n_heads, *grid)
            inside = maps[..., y0:y1, x0:x1].sum((-1, -2))
            total = maps.sum((-1, -2)).clamp(min=1e-12)
            flat = maps.reshape(len(layers), n_heads, -1).argmax(-1)
            rows, cols = flat // grid[1], flat % grid[1]
            hits += ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)).float().numpy()
            mass += (inside / total).numpy()
            counted += 1
    if counted == 0:
        raise ValueError("no usable calibration sample")
    scores = [
        HeadScore(layer, h, float(hits[i, h] / counted), float(mass[i, h] / counted))
        for i, layer in enumerate(layers)
        for h in range(n_heads)
    ]
    return sorted(scores, key=lambda s: (s.hit_rate, s.mass), reverse=True)


def _per_head(adapter: VLMAdapter, inputs, preset, layers, max_new_tokens) -> torch.Tensor:
    """Per-head teacher maps for every head of `layers`, from one generation → [B, layers, heads, n_img]."""
    _, maps, _, _, _ = _generate_batch(adapter, inputs, preset, max_new_tokens, {}, None, per_head=True)
    return maps.reshape(maps.shape[0], len(layers), adapter.num_heads, -1)
