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


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _wrapped(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) > width and line:
            lines.append(line)
            line = word
        else:
            line = trial
    return [*lines, line] if line else lines


def answer_card(
    image: Image.Image,
    prob: np.ndarray | None,
    boxes: list[tuple[int, int, int, int]],
    question: str,
    answer: str,
    *,
    title: str = "SD-RPN",
    padded: bool = True,
    width: int = 480,
) -> Image.Image:
    """The RoI overlay with a title, the question, the answer and a legend (red: RoI probability 0 → 1; green:
    the crop re-encoded for the answer)."""
    view = roi_overlay(image, prob, boxes, padded=padded)
    view = view.resize((width, max(1, round(view.height * width / view.width))), Image.BILINEAR)
    font, bold = _font(14), _font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text = [(title, bold, "black")]
    text += [(ln, font, "black") for ln in _wrapped(probe, f"Q: {question}", font, width - 16)]
    text += [(ln, font, "darkgreen") for ln in _wrapped(probe, f"A: {answer}", font, width - 16)]
    height = view.height + 10 + 20 * len(text) + 34
    card = Image.new("RGB", (width, height), "white")
    card.paste(view, (0, 0))
    draw = ImageDraw.Draw(card)
    y = view.height + 6
    for line, f, colour in text:
        draw.text((8, y), line, fill=colour, font=f)
        y += 20
    ramp = np.tile(np.linspace(0.0, 1.0, 120, dtype=np.float32), (12, 1))  # the legend, drawn by the overlay itself
    card.paste(roi_overlay(Image.new("RGB", (120, 12), (128, 128, 128)), ramp, padded=False), (8, y + 6))
    draw.text((134, y + 4), "RoI probability 0 → 1", fill="black", font=font)
    draw.rectangle([300, y + 6, 312, y + 18], outline=(0, 255, 0), width=2)
    draw.text((318, y + 4), "crop" if boxes else "no crop", fill="black", font=font)
    return card


def side_by_side(*cards: Image.Image) -> Image.Image:
    """Cards next to each other (baseline | SD-RPN), top-aligned on white."""
    out = Image.new("RGB", (sum(c.width for c in cards) + 8 * (len(cards) - 1), max(c.height for c in cards)), "white")
    x = 0
    for c in cards:
        out.paste(c, (x, 0))
        x += c.width + 8
    return out
