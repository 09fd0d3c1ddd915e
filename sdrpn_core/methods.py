"""The answering methods an evaluation compares, one registry: the baseline, SD-RPN, training-free ViCrop and the
oracle crop (the ground-truth box, an upper bound). A new method (S², say) is one `register_method` call.

Each method answers one (image, prompt) with the run's settings (`MethodSettings`) and may need an RPN or a
ground-truth box; a sample without what a method needs is skipped for that method (the oracle on unboxed data)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from sdrpn_core.infer import Answer, answer_baseline, answer_sdrpn, answer_vicrop, answer_with_boxes
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


Answerer = Callable[[MethodSettings, Image.Image, str, "tuple[int, int, int, int] | None"], Answer]


@dataclass(frozen=True)
class EvalMethod:
    name: str
    answer: Answerer  # (settings, image, prompt, ground-truth box or None) → Answer
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
        lambda s, image, prompt, box: answer_baseline(s.adapter, image, prompt, s.max_new_tokens),
        "baseline",
    )
)
register_method(
    EvalMethod(
        "sdrpn",
        lambda s, image, prompt, box: answer_sdrpn(
            s.adapter,
            s.rpn,
            image,
            prompt,
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
        lambda s, image, prompt, box: answer_vicrop(
            s.adapter, image, prompt, layer=s.vicrop_layer, max_new_tokens=s.max_new_tokens
        ),
        "+ViCrop",
        depends_on=("vicrop_layer",),
    )
)
register_method(
    EvalMethod(
        "oracle",
        lambda s, image, prompt, box: answer_with_boxes(s.adapter, image, prompt, [box], s.max_new_tokens),
        "+oracle crop",
        needs_box=True,
    )
)
