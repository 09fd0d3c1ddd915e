"""The answering methods an evaluation compares, one registry: the baseline, SD-RPN, training-free ViCrop and the
oracle crop (the ground-truth box, an upper bound). A new method (S², say) is one `register_method` call.

Each method answers a batch of (image, prompt) rows with the run's settings (`MethodSettings`) and may need an
RPN or a ground-truth box. The images come decoded and processed ahead (`Preprocessed`: `.image` is the PIL
image, `.pixels` the adapter's processed form); the `*_batch` answer functions take them as they are. A sample
without what a method needs is skipped for that method (the oracle on unboxed data)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sdrpn_core.infer import (
    Answer,
    Preprocessed,
    answer_baseline_batch,
    answer_sdrpn_batch,
    answer_vicrop_batch,
    answer_with_boxes_batch,
)
from sdrpn_core.models.base import VLMAdapter
from sdrpn_core.registry import Registry
from sdrpn_core.rpn import RoIPredictor


@dataclass(frozen=True)
class MethodSettings:
    """What the methods of one evaluation run share."""

    adapter: VLMAdapter
    rpn: RoIPredictor | None
    threshold: float
    mode: str
    reuse_kv: bool
    max_new_tokens: int
    vicrop_layer: int


Answerer = Callable[
    [MethodSettings, "list[Preprocessed]", "list[str]", "list[tuple[int, int, int, int] | None]"], "list[Answer]"
]


@dataclass(frozen=True)
class EvalMethod:
    name: str
    answer: Answerer  # (settings, images, prompts, ground-truth boxes or None) → one Answer per row, batched
    label: str  # as the report's tables name it
    needs_rpn: bool = False
    needs_box: bool = False
    # the evaluation parameters its answers depend on beyond those every method shares (generation limit, inputs):
    # an evaluation piece is fingerprinted on these alone, so changing τ re-runs SD-RPN and nothing else
    depends_on: tuple[str, ...] = ()


METHODS: Registry[EvalMethod] = Registry("evaluation method")
register_method = METHODS.register
get_method = METHODS.find


register_method(
    EvalMethod(
        "baseline",
        lambda s, images, prompts, boxes: answer_baseline_batch(s.adapter, images, prompts, s.max_new_tokens),
        "baseline",
    )
)
register_method(
    EvalMethod(
        "sdrpn",
        lambda s, images, prompts, boxes: answer_sdrpn_batch(
            s.adapter,
            s.rpn,
            images,
            prompts,
            threshold=s.threshold,
            mode=s.mode,
            reuse_kv=s.reuse_kv,
            max_new_tokens=s.max_new_tokens,
        ),
        "+SD-RPN",
        needs_rpn=True,
        depends_on=("threshold", "default_threshold", "model_key", "mode", "reuse_kv"),
    )
)
register_method(
    EvalMethod(
        "vicrop",
        lambda s, images, prompts, boxes: answer_vicrop_batch(
            s.adapter, images, prompts, layer=s.vicrop_layer, max_new_tokens=s.max_new_tokens
        ),
        "+ViCrop",
        depends_on=("vicrop_layer",),
    )
)
register_method(
    EvalMethod(
        "oracle",
        lambda s, images, prompts, boxes: answer_with_boxes_batch(
            s.adapter, images, prompts, [[box] for box in boxes], s.max_new_tokens
        ),
        "+oracle crop",
        needs_box=True,
    )
)
