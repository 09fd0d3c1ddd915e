"""Samples and image loading. A bad sample is an outcome with a reason, never a crash of the run."""

from __future__ import annotations

import io
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError


class BadSample(Exception):
    """A sample that cannot be used; `reason` is what goes into the quarantine table."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Sample:
    """One (image, question) pair. `image` is a local path, an fsspec URL, or an already-open PIL image."""

    sample_id: str
    image: str | Image.Image
    question: str
    domain: str = "default"

    @property
    def image_uri(self) -> str:
        return self.image if isinstance(self.image, str) else f"<in-memory {self.image.size}>"


@dataclass(frozen=True)
class Rejection:
    sample_id: str
    reason: str


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB. 16/32-bit greyscale is rescaled by its range instead of being clipped to white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_image(source: str | bytes | Image.Image) -> Image.Image:
    """Open and fully decode an image (a path / URL, encoded bytes, or a PIL image); raise BadSample naming the
    file and the problem."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, bytes):
        try:
            image = Image.open(io.BytesIO(source))
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadSample(f"undecodable embedded image ({len(source)} bytes): {e}") from None
    else:
        try:
            with fsspec.open(source, "rb") as f:
                image = Image.open(f)
                image.load()
        except FileNotFoundError:
            raise BadSample(f"image not found: {source}") from None
        except Image.DecompressionBombError as e:
            raise BadSample(f"image too large to decode safely {source}: {e}") from None
        except UnidentifiedImageError:
            raise BadSample(f"not an image file: {source}") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise BadSample(f"unreadable image {source}: {e}") from None
    if image.width < 1 or image.height < 1:
        raise BadSample(f"empty image ({image.width}x{image.height}): {source if isinstance(source, str) else ''}")
    return to_rgb(image)


def check_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise BadSample("empty question")
    return question.strip()
