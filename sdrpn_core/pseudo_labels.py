"""Pseudo-labels: the teacher's noisy RoI map → foreground (1) / background (0) / ignore (−100) per image token.

The authors' rules, token for token (docs/method.md §3.5; `create_pseudo_labels` in their LLaVA and Qwen code):

* LLaVA: sinks (sink attention ≥ τ_sink) are zeroed; m = max of what remains; FG = a' > τ_fg·m (strict);
  the tight inclusive box around FG; BG = outside the box and a' < τ_bg·m (strict; a zeroed sink outside the box
  is therefore background); everything else ignored; the whole sample is ignored when the box covers
  ≥ max_box_frac of the grid (an empty FG gives the whole grid as box, hence an ignored sample).
* Qwen: tokens in the square-padding area join the sinks for FG and are forced to BG; the box is taken on a
  3×3 σ=1 blur of the thresholded map (one cell larger each side); the sample is valid only when m ≥ 5e-3 and
  the box covers < max_box_frac of the grid.

The paper's own sink criterion, the L2 norm of the visual hidden state above τ_norm, is available by passing
`sink_mask=hidden_norm_sinks(norms, τ_norm)` (the authors' code uses the attention criterion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from sdrpn_core.roi import gaussian_blur, tight_box

FOREGROUND, BACKGROUND, IGNORE = 1, 0, -100


@dataclass(frozen=True)
class LabelStats:
    """Per-sample label statistics for reports. `box` is inclusive (row0, col0, row1, col1) on the grid."""

    num_fg: int
    num_bg: int
    num_ignore: int
    num_sink: int
    box: tuple[int, int, int, int]
    box_frac: float
    max_attn: float
    valid: bool
    reason: str  # "" when valid, else why the whole sample is ignored


def _check_map(name: str, values: np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size != n:
        raise ValueError(f"{name} map has {arr.size} values, expected {n} for the grid")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} map contains NaN or infinite values")
    if np.any(arr < 0):
        raise ValueError(f"{name} map contains negative values (min {arr.min():.3g}); attention is non-negative")
    return arr


def padding_mask(image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """True on grid cells covered by the square padding of an image of (width, height), as the authors compute it.

    Like their `get_foreground_mask`, the content extent is truncated to whole cells and the padding split
    floor/ceil around it. A non-square grid comes from an unpadded image (Qwen's dynamic resolution without
    `pad_square`): no cell is padding then.
    """
    w, h = image_size
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    if grid[0] != grid[1]:
        return np.zeros(grid[0] * grid[1], dtype=bool)
    side = grid[0]
    big = max(w, h)
    new_h, new_w = max(int(h / big * side), 1), max(int(w / big * side), 1)
    content = np.zeros((side, side), dtype=bool)
    if new_w > new_h:
        y0 = (side - new_h) // 2
        content[y0 : new_h + int(np.ceil((side - new_h) / 2)), :new_w] = True
    elif new_h > new_w:
        x0 = (side - new_w) // 2
        content[:new_h, x0 : new_w + int(np.ceil((side - new_w) / 2))] = True
    else:
        content[:, :] = True
    return ~content.reshape(-1)


def hidden_norm_sinks(image_hidden_norms: np.ndarray, norm_thresh: float) -> np.ndarray:
    """The paper's sink criterion: ‖(H_v)_j‖₂ > τ_norm."""
    return np.asarray(image_hidden_norms, dtype=np.float64).reshape(-1) > norm_thresh


def make_pseudo_labels_with_stats(
    grounding: np.ndarray,
    sink: np.ndarray | None,
    grid: tuple[int, int] = (24, 24),
    sink_thresh: float = 1e-3,
    fg_ratio: float = 0.2,
    bg_ratio: float = 0.1,
    max_box_frac: float = 0.5,
    *,
    variant: Literal["llava", "qwen"] = "llava",
    image_size: tuple[int, int] | None = None,
    min_max_attn: float = 5e-3,
    sink_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, LabelStats]:
    """Labels (int array of length h·w: 1 / 0 / −100) and their statistics. See the module docstring."""
    h, w = grid
    n = h * w
    a = _check_map("grounding", grounding, n)
    if sink_mask is not None:
        sinks = np.asarray(sink_mask, dtype=bool).reshape(-1)
        if sinks.size != n:
            raise ValueError(f"sink_mask has {sinks.size} values, expected {n} for the grid")
    else:
        s = np.zeros(n) if sink is None else _check_map("sink", sink, n)
        sinks = s >= sink_thresh
    if variant not in ("llava", "qwen"):
        raise ValueError(f"unknown label variant {variant!r}; use 'llava' or 'qwen'")
    pad = np.zeros(n, dtype=bool)
    if variant == "qwen":
        if image_size is None:
            raise ValueError("the qwen label variant needs image_size (width, height) for the padding area")
        pad = padding_mask(image_size, grid)

    a_fg = np.where(sinks | pad, 0.0, a)
    m = float(a_fg.max())
    fg = a_fg > fg_ratio * m
    if variant == "qwen":
        box = tight_box(gaussian_blur(np.where(fg, a_fg, 0.0).reshape(h, w)) > 0)
    else:
        box = tight_box(fg.reshape(h, w))
    r0, c0, r1, c1 = box if box is not None else (0, 0, h - 1, w - 1)
    rows, cols = np.divmod(np.arange(n), w)
    in_box = (rows >= r0) & (rows <= r1) & (cols >= c0) & (cols <= c1)
    a_bg = np.where(sinks, 0.0, a)  # the padding is not zeroed here: it becomes background below instead
    bg = ~in_box & (a_bg < bg_ratio * m)
    bg |= pad

    area = (r1 - r0 + 1) * (c1 - c0 + 1)
    reason = ""
    if not fg.any():
        reason = "no foreground"
    elif area >= max_box_frac * n:
        reason = "foreground box too large"
    elif variant == "qwen" and m < min_max_attn:
        reason = "attention too weak"
    labels = np.full(n, IGNORE, dtype=np.int64)
    if not reason:
        labels[bg] = BACKGROUND
        labels[fg] = FOREGROUND
    stats = LabelStats(
        num_fg=int((labels == FOREGROUND).sum()),
        num_bg=int((labels == BACKGROUND).sum()),
        num_ignore=int((labels == IGNORE).sum()),
        num_sink=int(sinks.sum()),
        box=(r0, c0, r1, c1),
        box_frac=area / n,
        max_attn=m,
        valid=not reason,
        reason=reason,
    )
    return labels, stats


def make_pseudo_labels(
    grounding: np.ndarray,
    sink: np.ndarray | None,
    grid: tuple[int, int] = (24, 24),
    sink_thresh: float = 1e-3,
    fg_ratio: float = 0.2,
    bg_ratio: float = 0.1,
    max_box_frac: float = 0.5,
    **options,
) -> np.ndarray:
    """Three-state labels for one sample: 1 = foreground, 0 = background, −100 = ignore (length h·w)."""
    labels, _ = make_pseudo_labels_with_stats(
        grounding, sink, grid, sink_thresh, fg_ratio, bg_ratio, max_box_frac, **options
    )
    return labels


@dataclass(frozen=True)
class LabelParams:
    """The label stage's parameters; cheap to change (the teacher maps are reused)."""

    sink_thresh: float = 1e-3
    fg_ratio: float = 0.2
    bg_ratio: float = 0.1
    max_box_frac: float = 0.5
    variant: Literal["llava", "qwen"] = "llava"
    min_max_attn: float = 5e-3

    def __post_init__(self):
        for name, ok in [
            ("sink_thresh", self.sink_thresh > 0),
            ("fg_ratio", 0 < self.fg_ratio <= 1),
            ("bg_ratio", 0 < self.bg_ratio <= 1),
            ("max_box_frac", self.max_box_frac > 0),
            ("min_max_attn", self.min_max_attn >= 0),
            ("variant", self.variant in ("llava", "qwen")),
        ]:
            if not ok:
                raise ValueError(f"labels.{name} = {getattr(self, name)!r} is out of range")

    @classmethod
    def from_preset(cls, preset, **overrides) -> LabelParams:
        return cls(sink_thresh=preset.sink_thresh, variant=preset.label_variant, **overrides)

    def apply(
        self,
        grounding: np.ndarray,
        sink: np.ndarray | None,
        grid: tuple[int, int],
        image_size: tuple[int, int] | None = None,
        sink_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, LabelStats]:
        return make_pseudo_labels_with_stats(
            grounding,
            sink,
            grid,
            self.sink_thresh,
            self.fg_ratio,
            self.bg_ratio,
            self.max_box_frac,
            variant=self.variant,
            image_size=image_size,
            min_max_attn=self.min_max_attn,
            sink_mask=sink_mask,
        )
