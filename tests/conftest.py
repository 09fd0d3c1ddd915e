from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail at once instead of retrying for 20 s

import numpy as np
import pytest
from PIL import Image

from sdrpn_core.models import LlavaAdapter
from sdrpn_core.models.tiny import TinyLlavaSpec, build_tiny_llava
from sdrpn_core.presets import get_preset


@pytest.fixture(scope="session")
def tiny_llava() -> LlavaAdapter:
    model, processor = build_tiny_llava(TinyLlavaSpec())
    return LlavaAdapter(model, processor)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, tiny_llava) -> str:
    d = tmp_path_factory.mktemp("tiny-llava")
    tiny_llava.model.save_pretrained(d)
    tiny_llava.processor.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_preset():
    """The LLaVA-7B preset re-pointed at the tiny model's 4 layers × 4 heads."""
    return get_preset("llava-1.5-7b", grounding={2: (0, 3), 1: (2,)}, sink={0: None}, K=1, T=2)


def random_image(seed: int, size: tuple[int, int] = (40, 28)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def images() -> list[Image.Image]:
    return [random_image(i, (24 + 9 * i, 40 - 5 * i)) for i in range(4)]


QUESTIONS = [
    "what is the digit in the red box ?",
    "what colour is the car on the left side of the image ?",
    "yes ?",
    "Who wrote this book ? Answer the question using a single word or phrase.",
]
