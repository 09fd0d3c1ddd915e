"""A seeded fine-grained VQA task: small coloured boxes holding digits on cluttered canvases.

At a model's low input resolution the colours are visible and the digits are not, which is exactly the situation
SD-RPN fixes: look at the right box, then read it from a full-resolution crop. Variants:

* select: three boxes in three colours; "what is the digit in the red box ?" needs the question to pick the box.
* single: one box among clutter; saliency alone finds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}


@dataclass(frozen=True)
class SceneSample:
    sample_id: str
    image: Image.Image
    question: str
    answer: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the asked box, pixels, exclusive
    colour: str = ""  # of the asked box
    objects: tuple[tuple[tuple[int, int, int, int], str, str], ...] = ()  # every (box, colour, digit) drawn


def make_scene(
    rng: np.random.Generator,
    sample_id: str,
    canvas: int = 256,
    box_side: int = 24,
    snap: int = 8,
    variant: Literal["select", "single"] = "select",
) -> SceneSample:
    """One scene; boxes are snapped to the `snap`-pixel grid (the vision patch grid at native scale)."""
    img = Image.fromarray(rng.integers(100, 160, (canvas, canvas, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):  # clutter: grey strokes and blobs
        x, y = rng.integers(0, canvas, 2)
        w, h = rng.integers(4, 20, 2)
        shade = int(rng.integers(60, 200))
        draw.rectangle([int(x), int(y), int(x + w), int(y + h)], fill=(shade, shade, shade))
    n_boxes = 3 if variant == "select" else 1
    names = list(rng.permutation(list(COLOURS)))[:n_boxes]
    boxes = _place_boxes(rng, n_boxes, canvas // snap, box_side // snap, snap, box_side)
    font = digit_font(int(box_side * 0.66))
    digits = [str(int(d)) for d in rng.integers(0, 10, n_boxes)]
    for name, box, digit in zip(names, boxes, digits, strict=True):
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=COLOURS[name])
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        draw.text((cx, cy), digit, fill=(255, 255, 255), font=font, anchor="mm")
    ask = int(rng.integers(n_boxes))
    question = f"what is the digit in the {names[ask]} box ?"
    objects = tuple(zip(boxes, names, digits, strict=True))
    return SceneSample(sample_id, img, question, digits[ask], boxes[ask], names[ask], objects)


def digit_font(size: int) -> ImageFont.ImageFont:
    """A bold sans face where the system has DejaVu (Debian images do), else Pillow's built-in face."""
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _place_boxes(rng: np.random.Generator, n: int, cells: int, span: int, snap: int, side: int) -> list[tuple]:
    """Non-touching boxes on the snap grid; placement restarts when it paints itself into a corner."""
    if cells < span:
        raise ValueError(f"canvas of {cells} cells cannot hold a {span}-cell box")
    for _ in range(200):
        taken: list[tuple[int, int]] = []
        for _ in range(50 * n):
            cx, cy = (int(v) for v in rng.integers(0, cells - span + 1, 2))
            if all(abs(cx - tx) > span or abs(cy - ty) > span for tx, ty in taken):
                taken.append((cx, cy))
                if len(taken) == n:
                    return [(x * snap, y * snap, x * snap + side, y * snap + side) for x, y in taken]
    raise ValueError(f"cannot place {n} separate {span}-cell boxes on a {cells}×{cells}-cell canvas")


def make_split(n: int, seed: int, **scene_kwargs) -> list[SceneSample]:
    rng = np.random.default_rng(seed)
    return [make_scene(rng, f"syn-{seed}-{i:05d}", **scene_kwargs) for i in range(n)]


def write_split(folder: str | Path, samples: list[SceneSample]) -> Path:
    """PNG files + `manifest.jsonl` ({id, image, question, answers, box}) in the layout the benchmark readers use."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for s in samples:
        name = f"images/{s.sample_id}.png"
        s.image.save(folder / name)
        lines.append(
            json.dumps(
                {"id": s.sample_id, "image": name, "question": s.question, "answers": [s.answer], "box": list(s.box)}
            )
        )
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
