"""Samples and image loading. A bad sample is an outcome with a reason, never a crash of the run; a failure to
*reach* an image (a 503, a timeout, a reset connection) is not a bad sample: it is retried, then raised as
`ImageReadError` so the shard fails and a rerun processes the sample."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
READ_ATTEMPTS = 4
READ_BACKOFF_S = 0.5


class ImageReadError(OSError):
    """An image that could not be read for a reason outside the sample (network, server): never quarantined."""


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


def read_image_bytes(source: str) -> bytes:
    """The bytes at a path / fsspec URL. Missing files and folders are BadSample; anything else that goes wrong
    while reading (S3 5xx, timeouts, resets) is retried with backoff, then raised as ImageReadError."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            with fsspec.open(source, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise BadSample(f"image not found: {source}") from None
        except IsADirectoryError:
            raise BadSample(f"image is a folder, not a file: {source}") from None
        except PermissionError as e:
            raise BadSample(f"image not readable (permission denied): {source}: {e}") from None
        except (OSError, ConnectionError, TimeoutError) as e:
            if attempt == READ_ATTEMPTS:
                raise ImageReadError(
                    f"could not read {source} after {READ_ATTEMPTS} attempts ({type(e).__name__}: {e}); "
                    "the sample is not quarantined: rerun when the store is reachable"
                ) from e
            log.warning(
                "reading %s failed (%s: %s), retrying %d/%d", source, type(e).__name__, e, attempt, READ_ATTEMPTS
            )
            time.sleep(READ_BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def decode_image(data: bytes, source: str) -> Image.Image:
    """Encoded bytes → a fully decoded PIL image; BadSample naming `source` and the problem."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as e:
        raise BadSample(f"image too large to decode safely {source}: {e}") from None
    except UnidentifiedImageError:
        raise BadSample(f"not an image file: {source}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadSample(f"undecodable image {source}: {e}") from None
    return image


def load_image(source: str | bytes | Image.Image) -> Image.Image:
    """Open and fully decode an image (a path / URL, encoded bytes, or a PIL image); BadSample naming the file and
    the problem, ImageReadError when the file could not be reached."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, bytes):
        image = decode_image(source, f"embedded image ({len(source)} bytes)")
    else:
        image = decode_image(read_image_bytes(source), source)
    if image.width < 1 or image.height < 1:
        raise BadSample(f"empty image ({image.width}x{image.height}): {source if isinstance(source, str) else ''}")
    return to_rgb(image)


def check_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise BadSample("empty question")
    return question.strip()


def read_ahead(read: Callable[[T], R], items: Sequence[T], background: bool = True) -> Iterator[tuple[T, R]]:
    """(item, read(item)) in order, the next item read in a background thread while the caller works on this one:
    decoding and image processing release the GIL, so a batch's reading overlaps the model's work on the one before.
    An exception from `read` is raised here, at the item it belongs to. `background=False` reads each item in turn
    (a model on the CPU already has every core: a reading thread would only slow its kernels down)."""
    if not items:
        return
    if not background:
        yield from ((item, read(item)) for item in items)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="sdrpn-read-ahead") as pool:
        pending = pool.submit(read, items[0])
        for k, item in enumerate(items):
            value = pending.result()
            if k + 1 < len(items):
                pending = pool.submit(read, items[k + 1])
            yield item, value
