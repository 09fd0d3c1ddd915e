"""Teacher: the frozen MLLM's answer-to-image attention at chosen heads, the noisy RoI map of SD-RPN.

Exactly as the authors' `get_attn_weights_map` (docs/method.md §3.3–3.4): greedy generation; for every decode step
(the prefill is skipped) the softmax attention row of the fed token — every generated token except the last —
over the *full* key sequence (not renormalised), restricted to the image columns; averaged over steps, then
equally over the configured (layer, head) pairs. The sink map is built the same way from the sink heads.

Unlike `generate(output_attentions=True)`, which stores [heads, q, k] for every layer and step (the prefill
alone is layers × heads × L² floats), we register an attention function that reads only the configured layers'
selected heads at decode steps and stores [heads_sel, n_img] per step; every other call goes to the model's own
kernel (SDPA or eager) untouched.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

from sdrpn_core.data import BadSample, Rejection, Sample, check_question, load_image
from sdrpn_core.models.base import VLMAdapter, VLMInputs
from sdrpn_core.models.decoder import eos_token_ids
from sdrpn_core.presets import HeadMap, Preset
from sdrpn_core.progress import Progress, ProgressCallback

log = logging.getLogger(__name__)


@dataclass
class TeacherRecord:
    """One sample's raw teacher output: what the label stage denoises (maps are row-major over the grid)."""

    sample_id: str
    image: str
    question: str
    answer: str
    grid: tuple[int, int]
    grounding: np.ndarray
    sink: np.ndarray
    n_steps: int
    image_size: tuple[int, int]
    image_hidden_norms: np.ndarray | None = None


@dataclass
class TeacherOutput:
    records: list[TeacherRecord]
    rejected: list[Rejection]


# -- attention capture ---------------------------------------------------------------------------------------------


class _Capture:
    """Per-generate state: which attention modules to read, their heads, and the image columns of each row."""

    def __init__(
        self, modules: dict[int, int], heads: dict[int, list[int]], image_positions: torch.Tensor, prefill: bool
    ):
        self.prefill = prefill  # read the last prompt token's row at prefill (ViCrop) instead of decode steps
        self.layer_of = modules  # id(self_attn module) → layer index
        self.heads = heads  # layer → head indices read (all heads when the preset says None)
        self.image_positions = image_positions  # [B, n_img]
        self.steps: dict[int, list[torch.Tensor]] = {layer: [] for layer in heads}

    def record(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling):
        layer = self.layer_of[id(module)]
        heads = torch.tensor(self.heads[layer], device=query.device)
        groups = query.shape[1] // key.shape[1]
        q = query.index_select(1, heads)  # [B, h, 1, d]
        k = key.index_select(1, heads // groups)  # GQA: head h reads kv head h // groups
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling  # same op order and dtype as eager attention
        if mask is not None:
            mask = mask[..., : k.shape[-2]]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)[:, :, 0]  # [B, h, kv]
        index = self.image_positions[:, None, :].expand(-1, probs.shape[1], -1)
        self.steps[layer].append(probs.gather(2, index))


class _ActiveCaptures(threading.local):
    """The capture of the generate call in flight, per thread: concurrent teacher runs (threaded task runners)
    on one shared model must not see each other's attention."""

    def __init__(self):
        self.stack: list[_Capture] = []


_ACTIVE = _ActiveCaptures()
_SWITCH_LOCK = threading.Lock()
_USERS: dict[int, tuple[int, str]] = {}  # id(model) → (threads capturing on it, implementation to restore)


def capture_attention(delegate, module, query, key, value, attention_mask, **kwargs):
    """The attention function installed while capturing: records the capture's rows, then runs `delegate` (the
    model's own SDPA or eager kernel) unchanged. Registered below with `delegate` bound by `functools.partial`."""
    cap = _ACTIVE.stack[-1] if _ACTIVE.stack else None
    if cap is not None and id(module) in cap.layer_of:
        scaling = kwargs.get("scaling", module.scaling)
        if query.shape[2] == 1 and not cap.prefill:
            cap.record(module, query, key, attention_mask, scaling)
        elif query.shape[2] > 1 and cap.prefill:
            last_mask = attention_mask[..., -1:, :] if attention_mask is not None else None
            cap.record(module, query[:, :, -1:], key, last_mask, scaling)
    return delegate(module, query, key, value, attention_mask, **kwargs)


_IMPLS = {"sdpa": sdpa_attention_forward, "eager": eager_attention_forward}
for _base, _fn in _IMPLS.items():
    AttentionInterface.register(f"sdrpn_capture_{_base}", functools.partial(capture_attention, _fn))
    AttentionMaskInterface.register(f"sdrpn_capture_{_base}", ALL_MASK_ATTENTION_FUNCTIONS[_base])


@contextlib.contextmanager
def capturing(
    adapter: VLMAdapter, heads: HeadMap, image_positions: torch.Tensor, prefill: bool = False
) -> Iterator[_Capture]:
    """Route the language model's attention through the capture function for the duration of one generate.

    The switch is reference-counted per model, so threads generating on the same model concurrently keep the
    capture function installed until the last one leaves; outside a capture it behaves as the base kernel."""
    model = adapter.model
    modules = {id(adapter.decoder_layers[layer].self_attn): layer for layer in heads}
    resolved = {layer: list(range(adapter.num_heads)) if h is None else list(h) for layer, h in heads.items()}
    cap = _Capture(modules, resolved, image_positions, prefill)
    with _SWITCH_LOCK:
        users, previous = _USERS.get(id(model), (0, model.config.text_config._attn_implementation))
        if users == 0:
            base = "eager" if previous == "eager" else "sdpa"
            model.set_attn_implementation({"text_config": f"sdrpn_capture_{base}"})
        _USERS[id(model)] = (users + 1, previous)
    _ACTIVE.stack.append(cap)
    try:
        yield cap
    finally:
        _ACTIVE.stack.pop()
        with _SWITCH_LOCK:
            users, previous = _USERS[id(model)]
            if users == 1:
                del _USERS[id(model)]
                model.set_attn_implementation({"text_config": previous})
            else:
                _USERS[id(model)] = (users - 1, previous)


# -- maps from captured steps ---------------------------------------------------------------------------------------


def valid_steps(generated: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """Decode steps that fed a real answer token, per row: (tokens up to and including the first EOS) − 1."""
    is_eos = torch.isin(generated, torch.tensor(list(eos_ids), device=generated.device))
    n_gen = generated.shape[1]
    never = torch.full((generated.shape[0],), n_gen, dtype=torch.long, device=generated.device)
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), never)
    n_tokens = torch.clamp(first_eos + 1, max=n_gen)
    return n_tokens - 1


def average_maps(
    steps: dict[int, torch.Tensor],
    read_heads: dict[int, list[int]],
    spec: HeadMap,
    n_valid: torch.Tensor,
    n_img: int,
    per_head: bool = False,
) -> torch.Tensor:
    """Mean over each row's valid steps, then equally over the spec's (layer, head) pairs → [B, n_img]
    (`per_head`: the pairs kept apart, in spec order → [B, pairs, n_img])."""
    batch = n_valid.shape[0]
    if not spec:
        return torch.zeros(batch, n_img)
    pairs = []
    for layer, heads in spec.items():
        stacked = steps[layer]  # [S, B, h_read, n_img]
        s = stacked.shape[0]
        keep = (torch.arange(s)[:, None] < n_valid[None, :]).to(stacked.dtype)  # [S, B]
        mean = (stacked * keep[:, :, None, None]).sum(0) / n_valid.clamp(min=1)[:, None, None].to(stacked.dtype)
        cols = [read_heads[layer].index(h) for h in (heads if heads is not None else read_heads[layer])]
        pairs.append(mean[:, cols])
    stacked = torch.cat(pairs, dim=1)
    return stacked if per_head else stacked.mean(1)


# -- the teacher run -------------------------------------------------------------------------------------------------


def _prepare(adapter: VLMAdapter, sample: Sample) -> tuple[object, str, tuple[int, int]]:
    question = check_question(sample.question)
    image = load_image(sample.image)
    try:
        pixels = adapter.pixel_values(image)
    except Exception as e:  # the processor's own message names the problem; we add the sample
        raise BadSample(f"image processor rejected the image: {type(e).__name__}: {e}") from None
    return pixels, question, image.size


@torch.inference_mode()
def _generate_batch(
    adapter: VLMAdapter,
    inputs: VLMInputs,
    preset: Preset,
    max_new_tokens: int,
    generation_kwargs: dict,
    hidden_norm_layer: int | None,
    per_head: bool = False,
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    model = adapter.model
    inputs = inputs.to(adapter.device, adapter.dtype)
    positions = torch.stack(inputs.image_positions)  # [B, n_img]; every row has the same image-token count
    need = preset.heads_needed()
    norms: list[torch.Tensor] = []
    hook = None
    if hidden_norm_layer is not None:

        def grab(_m, _a, out):
            h = out[0] if isinstance(out, tuple) else out
            if h.shape[1] > 1 and not norms:  # prefill only
                norms.append(h.float().gather(1, positions[..., None].expand(-1, -1, h.shape[-1])).norm(dim=-1))

        hook = adapter.decoder_layers[hidden_norm_layer].register_forward_hook(grab)
    try:
        with capturing(adapter, need, positions) as cap:
            out = model.generate(
                **inputs.model_kwargs(),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                **generation_kwargs,
            )
    finally:
        if hook is not None:
            hook.remove()
    generated = out[:, inputs.input_ids.shape[1] :].cpu()
    eos_ids = eos_token_ids(model, generation_kwargs)
    n_valid = valid_steps(generated, eos_ids)
    n_img = positions.shape[1]
    steps = {
        layer: torch.stack(v).cpu() if v else torch.zeros(0, len(generated), len(cap.heads[layer]), n_img)
        for layer, v in cap.steps.items()
    }
    grounding = average_maps(steps, cap.heads, preset.grounding, n_valid, n_img, per_head)
    sink = average_maps(steps, cap.heads, preset.sink, n_valid, n_img)
    answers = []
    for row, n in zip(generated, n_valid.tolist(), strict=True):
        answers.append(adapter.decode(row[: n + 1][~torch.isin(row[: n + 1], torch.tensor(eos_ids))]))
    return answers, grounding, sink, n_valid, norms[0].cpu() if norms else None


def _failed(sample: Sample, error: Exception) -> Rejection:
    return Rejection(sample.sample_id, f"generation failed: {type(error).__name__}: {error}")


def extract_teacher_maps(
    adapter: VLMAdapter,
    samples: Sequence[Sample],
    preset: Preset,
    *,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    generation_kwargs: dict | None = None,
    hidden_norm_layer: int | None = None,
    progress: ProgressCallback | None = None,
) -> TeacherOutput:
    """Run the teacher over `samples`: answers, grounding and sink maps; bad samples are rejected with a reason.

    Batched generation uses left padding and gives the batch-1 maps to float tolerance. A batch that fails as a
    whole is retried one sample at a time so that one bad sample cannot take its neighbours down.
    `hidden_norm_layer` also records the L2 norm of each image token's hidden state after that layer (prefill),
    the paper's alternative sink criterion.
    """
    preset.validate(adapter.num_layers, adapter.num_heads)
    if hidden_norm_layer is not None and not 0 <= hidden_norm_layer < adapter.num_layers:
        raise ValueError(f"hidden_norm_layer {hidden_norm_layer} outside the model's {adapter.num_layers} layers")
    max_new = max_new_tokens or preset.max_new_tokens
    gen_kwargs = dict(generation_kwargs or {})
    records: list[TeacherRecord] = []
    rejected: list[Rejection] = []
    bar = Progress(len(samples), "teacher", log, callback=progress)

    def run(batch: list[tuple[Sample, object, str, tuple[int, int]]]) -> None:
        inputs = adapter.collate([b[1] for b in batch], [b[2] for b in batch])
        if len(set(inputs.grids)) > 1:  # dynamic resolution: rows of one generate call share an image grid
            by_grid: dict[tuple[int, int], list] = {}
            for item, grid in zip(batch, inputs.grids, strict=True):
                by_grid.setdefault(grid, []).append(item)
            for group in by_grid.values():
                run(group)
            return
        answers, grounding, sink, n_valid, norms = _generate_batch(
            adapter, inputs, preset, max_new, gen_kwargs, hidden_norm_layer
        )
        for i, (sample, _px, question, size) in enumerate(batch):
            if int(n_valid[i]) == 0:
                rejected.append(Rejection(sample.sample_id, "empty answer: the model emitted EOS first"))
                continue
            records.append(
                TeacherRecord(
                    sample_id=sample.sample_id,
                    image=sample.image_uri,
                    question=question,
                    answer=answers[i],
                    grid=inputs.grids[i],
                    grounding=grounding[i].numpy().astype(np.float32),
                    sink=sink[i].numpy().astype(np.float32),
                    n_steps=int(n_valid[i]),
                    image_size=size,
                    image_hidden_norms=None if norms is None else norms[i].numpy().astype(np.float32),
                )
            )

    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        ready = []
        for sample in chunk:
            try:
                ready.append((sample, *_prepare(adapter, sample)))
            except BadSample as e:
                rejected.append(Rejection(sample.sample_id, e.reason))
        if ready:
            try:
                run(ready)
            except (RuntimeError, ValueError) as e:
                log.warning("batch of %d failed (%s); retrying one sample at a time", len(ready), e)
                for item in ready if len(ready) > 1 else []:
                    try:
                        run([item])
                    except (RuntimeError, ValueError) as e1:
                        rejected.append(_failed(item[0], e1))
                if len(ready) == 1:
                    rejected.append(_failed(ready[0][0], e))
        bar.update(len(chunk), rejected=len(rejected))
    return TeacherOutput(records, rejected)


@torch.inference_mode()
def prompt_attention(
    adapter: VLMAdapter, inputs: VLMInputs, layer: int, heads: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Softmax attention of the last prompt token to the image tokens at `layer`, mean over `heads` (all by
    default) → [B, n_img]. Only layers 0..layer run (the map ViCrop's rel-att method is built from)."""
    from sdrpn_core.models.decoder import layer_inputs, run_layers

    if not 0 <= layer < adapter.num_layers:
        raise ValueError(f"layer {layer} is outside the model's {adapter.num_layers} layers")
    inputs = inputs.to(adapter.device, adapter.dtype)
    positions = torch.stack(inputs.image_positions)
    embeds = adapter.embed(inputs)
    pos = adapter.position_ids(inputs)
    padded = not bool(inputs.attention_mask.all())
    mask, pe = layer_inputs(adapter, embeds, pos, inputs.attention_mask if padded else None)
    with capturing(adapter, {layer: heads}, positions, prefill=True) as cap:
        run_layers(adapter.decoder_layers[: layer + 1], embeds, mask, pe, pos)
    return cap.steps[layer][0].float().mean(1).cpu()


def reference_maps_output_attentions(
    adapter: VLMAdapter, inputs: VLMInputs, preset: Preset, max_new_tokens: int, **generation_kwargs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The straightforward way, `generate(output_attentions=True)` with eager attention: every layer, every step.

    Kept as the reference our capture is tested against and as the baseline of `benchmarks/teacher_memory.py`.
    Returns (grounding [B, n_img], sink [B, n_img], generated tokens [B, G]).
    """
    model = adapter.model
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        inputs = inputs.to(adapter.device, adapter.dtype)
        with torch.inference_mode():
            out = model.generate(
                **inputs.model_kwargs(),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                output_attentions=True,
                return_dict_in_generate=True,
                **generation_kwargs,
            )
    finally:
        model.set_attn_implementation({"text_config": previous})
    positions = torch.stack(inputs.image_positions).cpu()
    generated = out.sequences[:, inputs.input_ids.shape[1] :].cpu()
    n_valid = valid_steps(generated, eos_token_ids(model, generation_kwargs))
    need = preset.heads_needed()
    read = {layer: list(range(adapter.num_heads)) if h is None else list(h) for layer, h in need.items()}
    n_img = positions.shape[1]
    steps = {}
    for layer, heads in read.items():
        per_step = []
        for step_attn in out.attentions[1:]:  # [0] is the prefill
            a = step_attn[layer][:, heads, -1, :].float().cpu()  # [B, h, kv]
            per_step.append(a.gather(2, positions[:, None, :].expand(-1, len(heads), -1)))
        steps[layer] = torch.stack(per_step) if per_step else torch.zeros(0, len(generated), len(heads), n_img)
    return (
        average_maps(steps, read, preset.grounding, n_valid, n_img),
        average_maps(steps, read, preset.sink, n_valid, n_img),
        generated,
    )
