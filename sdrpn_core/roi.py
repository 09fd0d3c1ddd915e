"""Region-of-interest map operations shared by the label rules and RoI inference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.special import expit


def gaussian_kernel1d(size: int = 3, sigma: float = 1.0) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(map2d: np.ndarray, size: int = 3, sigma: float = 1.0) -> np.ndarray:
    """Separable Gaussian blur with reflect padding (edge not repeated), as torchvision's `gaussian_blur`."""
    k = gaussian_kernel1d(size, sigma)
    out = ndimage.convolve1d(np.asarray(map2d, dtype=np.float64), k, axis=0, mode="mirror")
    return ndimage.convolve1d(out, k, axis=1, mode="mirror")


def tight_box(mask2d: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive (row0, col0, row1, col1) around the True cells, or None when there are none."""
    rows, cols = np.nonzero(mask2d)
    if rows.size == 0:
        return None
    return int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())


# -- from the RPN's logit map to crop(s) (docs/method.md §6.2) ---------------------------------------------------------

GridBox = tuple[int, int, int, int]
"""(x0, y0, x1, y1) on the token grid, upper bounds exclusive."""

PixelBox = tuple[int, int, int, int]
"""(x0, y0, x1, y1) in source-image pixels, upper bounds exclusive."""


@dataclass(frozen=True)
class RoIPlan:
    """What pass 2 will do. kind: 'none' (answer as the baseline), 'box' (crop each of `boxes`, keep all their
    tokens) or 'mask' (crop the union box, keep the crop tokens under `keep_mask`)."""

    kind: Literal["none", "box", "mask"]
    boxes: tuple[GridBox, ...] = ()
    region: np.ndarray | None = None  # kind 'mask': the cells above τ inside the union box (bool, box-shaped)
    prob: np.ndarray | None = None  # blurred sigmoid map, for overlays
    reason: str = ""


def sigmoid(x: np.ndarray) -> np.ndarray:
    return expit(np.asarray(x, dtype=np.float64))  # scipy's: no overflow for large |x|


def component_boxes(binary: np.ndarray, min_area: int = 4, max_area: int | None = 225) -> list[GridBox]:
    """8-connected components → boxes, with the authors' rules: drop 1-cell components (sinks, noise), drop
    components of more than `max_area` cells, grow components under `min_area` cells to at least 3×3 around their
    centre (the upper corner is clamped to the last cell index, as the authors do), else the tight box."""
    h, w = binary.shape
    labelled, _ = ndimage.label(binary, structure=np.ones((3, 3), dtype=int))
    boxes: list[GridBox] = []
    for i, sl in enumerate(ndimage.find_objects(labelled), start=1):
        area = int((labelled[sl] == i).sum())
        y0, y1 = sl[0].start, sl[0].stop
        x0, x1 = sl[1].start, sl[1].stop
        if area == 1 or (max_area is not None and area > max_area):
            continue
        if area < min_area:
            xc, yc = (x0 + x1) / 2, (y0 + y1) / 2
            bw, bh = max(3, x1 - x0 + 1), max(3, y1 - y0 + 1)
            x0, y0 = max(0, int(xc - bw / 2)), max(0, int(yc - bh / 2))
            x1, y1 = min(w - 1, int(xc + bw / 2)), min(h - 1, int(yc + bh / 2))
        boxes.append((x0, y0, x1, y1))
    return boxes


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 0/1 mask (align_corners=False, as `F.interpolate`) then > 0.5."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    return (F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0] > 0.5).numpy()


ROI_MODES = ("mask", "box")


def check_mode(mode: str) -> None:
    if mode not in ROI_MODES:
        raise ValueError(f"RoI mode {mode!r}: choose 'mask' or 'box'")


def plan_roi(
    logits: np.ndarray,
    grid: tuple[int, int],
    threshold: float = 0.15,
    mode: Literal["mask", "box"] = "mask",
    min_area: int = 4,
    max_area: int | None = 225,
    max_boxes: int = 2,
) -> RoIPlan:
    """The authors' LLaVA rules: sigmoid → 3×3 σ=1 blur → > τ → components.

    mask mode: 0 boxes → none; 1 → box crop with all tokens; ≥ 2 → union box of *every* cell above τ, keep the
    crop tokens inside the mask. box mode (the "Box Upscaling" ablation): each box up to `max_boxes`, else none.
    A negative τ means "> |τ|·max" on the raw (not sigmoid) map, the authors' MSE-loss convention.
    Degenerate maps (NaN, ±inf) give 'none' with a reason instead of an exception.
    """
    check_mode(mode)
    arr = np.asarray(logits, dtype=np.float64).reshape(grid)
    if not np.all(np.isfinite(arr)):
        return RoIPlan("none", reason="RoI map has NaN or infinite values")
    if threshold < 0:
        prob = gaussian_blur(arr)
        binary = prob > prob.max() * -threshold
    else:
        prob = gaussian_blur(sigmoid(arr))
        binary = prob > threshold
    boxes = component_boxes(binary, min_area, max_area)
    if mode == "box":
        if not boxes or len(boxes) > max_boxes:
            return RoIPlan("none", prob=prob, reason=f"{len(boxes)} boxes (box mode takes 1..{max_boxes})")
        return RoIPlan("box", tuple(boxes), prob=prob)
    if not boxes:
        return RoIPlan("none", prob=prob, reason="no component of 2..max_area cells above the threshold")
    if len(boxes) == 1:
        return RoIPlan("box", tuple(boxes), prob=prob)
    r0, c0, r1, c1 = tight_box(binary)  # type: ignore[misc]
    return RoIPlan("mask", ((c0, r0, c1 + 1, r1 + 1),), region=binary[r0 : r1 + 1, c0 : c1 + 1], prob=prob)


def plan_roi_union(logits: np.ndarray, grid: tuple[int, int], threshold: float = 0.1) -> RoIPlan:
    """The authors' Qwen rules (docs/method.md §6.3), always the union mask: sigmoid; on maps of more than 768 cells the
    sink strips (column 0 of the top quarter rows, row 0 of the left quarter columns) zeroed; 3×3 σ=1 blur; > τ;
    the union box of every cell above τ, whose cells become the keep-mask. No component rules."""
    arr = np.asarray(logits, dtype=np.float64).reshape(grid)
    if not np.all(np.isfinite(arr)):
        return RoIPlan("none", reason="RoI map has NaN or infinite values")
    p = sigmoid(arr)
    h, w = grid
    if h * w > 768:
        p[: h // 4, 0] = 0.0
        p[0, : w // 4] = 0.0
    prob = gaussian_blur(p)
    binary = prob > threshold
    box = tight_box(binary)
    if box is None:
        return RoIPlan("none", prob=prob, reason="no cell above the threshold")
    r0, c0, r1, c1 = box
    return RoIPlan("mask", ((c0, r0, c1 + 1, r1 + 1),), region=binary[r0 : r1 + 1, c0 : c1 + 1], prob=prob)


def grid_box_to_pixels(
    box: GridBox, image_size: tuple[int, int], grid: tuple[int, int], vision_size: int
) -> PixelBox | None:
    """Grid box → source pixels, undoing pad-to-square exactly as the authors' `get_bbox4src`: scale to the vision
    input, remove the centred padding (vision − int(side·r))/2, divide by r = min(S/W, S/H), clamp, truncate.
    None when nothing is left (a box wholly in the padding); otherwise at least 1×1 pixel."""
    w, h = image_size
    sx, sy = vision_size / grid[1], vision_size / grid[0]
    r = min(vision_size / w, vision_size / h)
    pad_x, pad_y = (vision_size - int(w * r)) / 2, (vision_size - int(h * r)) / 2
    fx0, fx1 = (box[0] * sx - pad_x) / r, (box[2] * sx - pad_x) / r
    fy0, fy1 = (box[1] * sy - pad_y) / r, (box[3] * sy - pad_y) / r
    if fx1 <= 0 or fy1 <= 0 or fx0 >= w or fy0 >= h:
        return None
    x0, x1 = (int(min(max(v, 0.0), w)) for v in (fx0, fx1))  # fx0 < w above, so x0 <= w - 1
    y0, y1 = (int(min(max(v, 0.0), h)) for v in (fy0, fy1))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def pixels_to_grid_box(box: PixelBox, image_size: tuple[int, int], grid: tuple[int, int], vision_size: int) -> GridBox:
    """Source pixels → the grid cells that cover them on the pad-to-square input (inverse of grid_box_to_pixels)."""
    w, h = image_size
    r = min(vision_size / w, vision_size / h)
    pad_x, pad_y = (vision_size - int(w * r)) / 2, (vision_size - int(h * r)) / 2
    cx, cy = vision_size / grid[1], vision_size / grid[0]
    x0, x1 = int((box[0] * r + pad_x) // cx), int(np.ceil((box[2] * r + pad_x) / cx))
    y0, y1 = int((box[1] * r + pad_y) // cy), int(np.ceil((box[3] * r + pad_y) / cy))
    return max(0, x0), max(0, y0), min(grid[1], max(x1, x0 + 1)), min(grid[0], max(y1, y0 + 1))
