"""Pictures people would rather see than read: the RoI map and crop boxes over the image."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from sdrpn_core.data import to_rgb


def map_to_image(prob: np.ndarray, image_size: tuple[int, int], padded: bool = True) -> np.ndarray:
    """A grid map over the pad-to-square input → per-pixel values over the original image (padding cut away);
    `padded=False`: the map covers the image itself (Qwen without square padding)."""
    w, h = image_size
    if not padded:
        return np.asarray(Image.fromarray(np.asarray(prob, dtype=np.float32), mode="F").resize((w, h), Image.BILINEAR))
    side = max(w, h)
    grid_img = Image.fromarray(np.asarray(prob, dtype=np.float32), mode="F").resize((side, side), Image.BILINEAR)
    x0, y0 = (side - w) // 2, (side - h) // 2
    return np.asarray(grid_img)[y0 : y0 + h, x0 : x0 + w]


def roi_overlay(
    image: Image.Image,
    prob: np.ndarray | None,
    boxes: list[tuple[int, int, int, int]] = (),
    *,
    alpha: float = 0.6,
    box_colour: tuple[int, int, int] = (0, 255, 0),
    padded: bool = True,
) -> Image.Image:
    """The image dimmed where the RoI probability is low, red where it is high, crop boxes outlined."""
    base = np.asarray(to_rgb(image), dtype=np.float32)
    if prob is not None:
        p = np.clip(map_to_image(prob, image.size, padded), 0.0, 1.0)[..., None]
        red = np.zeros_like(base)
        red[..., 0] = 255.0
        base = base * (1 - alpha * (1 - p)) * (1 - 0.5 * p) + red * 0.5 * p
    out = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    width = max(1, round(min(image.size) / 150))
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=box_colour, width=width)
    return out
