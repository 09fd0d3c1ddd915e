"""The answering methods an evaluation compares, one registry: the baseline, SD-RPN, training-free ViCrop and the
oracle crop (the ground-truth box, an upper bound). A new method (S², say) is one `register_method` call.

Each method answers a batch of (image, prompt) rows with the run's settings (`MethodSettings`) and may need an
RPN or a ground-truth box. The images come decoded and processed ahead (`Preprocessed`: `.image` is the PIL
image, `.pixels` the adapter's processed form); the `*_batch` answer functions take them as they are. A sample
without what a method needs is skipped for that method (the oracle on unboxed data)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

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
class EvalParams:
    """What an evaluation reads; the config's `eval:` section is generated from these fields (one left unset takes
    the preset's value, then the default here). `options` holds each method's own settings by method name, as
    sorted items (`eval.options.<method>` in the config), validated by the method's `options` dataclass."""

    methods: tuple[str, ...] = ("baseline", "sdrpn", "vicrop", "oracle")
    # None: the benchmark's per-family value, else `default_threshold`; "auto": chosen by the calibrate stage
    threshold: float | Literal["auto"] | None = None
    default_threshold: float = 0.15
    mode: Literal["mask", "box", "auto"] = "mask"  # "auto": chosen by the calibrate stage
    reuse_kv: bool = True
    max_new_tokens: int | None = None  # None: the benchmark's
    vicrop_layer: int = 14
    gallery: int = 6
    batch_size: int = 1  # rows answered together (answers equal batch 1's; throughput is what changes)
    inputs: tuple[tuple[str, Any], ...] = ()  # adapter input overrides for evaluation (sorted items)
    model_key: str = ""  # the preset's model ("qwen2.5-vl-3b"): selects the authors' per-model τ
    protocol: str = "lmms-eval 0.4.0 (the authors' vendored copy)"  # prompts and metrics scored as by this harness
    options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # (method, its settings' sorted items)
    calibrated_by: str = ""  # the calibration that chose τ / mode (its fingerprint), set by the flow for `auto`

    @property
    def calibrated(self) -> bool:
        """τ or the mode is left to the calibrate stage (`auto`)."""
        return self.threshold == "auto" or self.mode == "auto"

    def __post_init__(self):
        for name, ok in [
            ("batch_size", self.batch_size >= 1),
            ("gallery", self.gallery >= 0),
            ("vicrop_layer", self.vicrop_layer >= 0),
            ("max_new_tokens", self.max_new_tokens is None or self.max_new_tokens >= 1),
            ("mode", self.mode in ("mask", "box", "auto")),
        ]:
            if not ok:
                raise ValueError(f"eval.{name} = {getattr(self, name)!r} is out of range")
        for method in self.methods:
            get_method(method)  # unknown names: a KeyError listing the known ones
        for method, _ in self.options:
            get_method(method).options_of(self)  # unknown settings: an error naming them


@dataclass(frozen=True)
class MethodSettings:
    """What the methods of one evaluation run share, and (`options`) the answering method's own settings."""

    adapter: VLMAdapter
    rpn: RoIPredictor | None
    threshold: float
    mode: str
    reuse_kv: bool
    max_new_tokens: int
    vicrop_layer: int
    options: Any = None


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
    # a frozen dataclass of the method's own settings, set in the config as `eval.options.<name>` and given to the
    # answerer as `settings.options`; its pieces are keyed on them, the other methods' are not
    options: type | None = None

    def options_of(self, params: EvalParams) -> Any:
        """This method's settings in `params` (its dataclass's defaults for those not given), or None."""
        given = dict(dict(params.options).get(self.name, ()))
        if self.options is None:
            if given:
                raise ValueError(f"eval.options.{self.name}: the method {self.name!r} takes no options")
            return None
        known = {f.name for f in dataclasses.fields(self.options)}
        if unknown := sorted(set(given) - known):
            raise ValueError(f"eval.options.{self.name}: unknown {unknown}; known: {sorted(known)}")
        return self.options(**given)


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
