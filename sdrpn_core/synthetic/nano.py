"""sdrpn-nano: a real `LlavaForConditionalGeneration` small enough to train on a laptop CPU, trained by the
project on the synthetic fine-grained task so that its attention means something.

CLIP vision (hidden 128, 3 layers, 4 heads, 64 px, patch 8 → an 8×8 grid of 64 tokens) + LLaVA's GELU MLP
projector + Llama (hidden 128, intermediate 384, 4 layers, 4 heads, untied), a word-level tokenizer of the
vicuna_v1 prompt and the task's words: about 1.5 M parameters. Same adapter, prompt and grid rules as LLaVA-1.5.

The training (`train_nano`) follows a recipe found on a 2-core machine: two phases; glyphs snapped to the patch
grid at native scale and an auxiliary per-patch colour / digit loss on the vision tower (without both, training
stayed at chance); on half the steps the answer echoes the asked colour ("red 7"), which is what made the model
bind the colour word to a box. Phase 2 adds two-view steps (the original view plus a readable crop inserted after
the image tokens, SD-RPN's pass-2 layout) and large canvases seen at 64 px. Phase 3 makes the second view look
like the crops SD-RPN's inference actually takes — windows of 2–4 token-grid cells around the asked box, which
usually hold other boxes too — with the per-patch loss on that view as well (a pretrained CLIP reads text at many
scales; ours learns it here). Without phase 3 the model read only 8 % of such windows; the global view and its
attention are what phases 1–2 made them. There is never a loss on attention maps, and the held-out split is never
seen.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from sdrpn_core.models.llava import VICUNA_SYSTEM, LlavaAdapter
from sdrpn_core.models.tiny import llava_from_config, llava_processor, llava_tokenizer
from sdrpn_core.progress import Progress
from sdrpn_core.synthetic import COLOURS, SceneSample, make_scene

log = logging.getLogger(__name__)

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
TASK_WORDS = [
    "USER:",
    "ASSISTANT:",
    "what",
    "is",
    "the",
    "digit",
    "in",
    "box",
    "?",
    *COLOURS,
    *[str(d) for d in range(10)],
]
SIDE, PATCH = 64, 8


def nano_tokenizer() -> PreTrainedTokenizerFast:
    """Word level: the vicuna_v1 system prompt, the task's words, digits; anything else is <unk>."""
    words = list(
        dict.fromkeys(SPECIALS + VICUNA_SYSTEM.replace(".", " .").replace(",", " ,").split() + [".", ","] + TASK_WORDS)
    )
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace("\n", " ")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(pattern=tokenizers_regex(), behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return llava_tokenizer(tok)


def tokenizers_regex():
    from tokenizers import Regex

    return Regex(r"<image>|[.,?]")


def build_nano(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    tokenizer = nano_tokenizer()
    processor = llava_processor(tokenizer, SIDE, PATCH)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=SIDE,
            patch_size=PATCH,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(SIDE // PATCH) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = llava_from_config(config, tokenizer, seed)
    return model, processor


# -- training data ------------------------------------------------------------------------------------------------


@dataclass
class Example:
    image: Image.Image
    question: str
    answer: str
    crop: Image.Image | None  # the second view (two-view steps)
    patch_colour: np.ndarray | None  # [64] class per patch (0 none, 1.. colours) for the auxiliary loss
    patch_digit: np.ndarray | None  # [64] class per patch (0 none, 1..10 digit+1)
    crop_colour: np.ndarray | None = None  # the same targets for the crop view (phase 3)
    crop_digit: np.ndarray | None = None


def _patch_targets(scene: SceneSample) -> tuple[np.ndarray, np.ndarray]:
    colours = {c: i + 1 for i, c in enumerate(COLOURS)}
    colour = np.zeros((SIDE // PATCH, SIDE // PATCH), dtype=np.int64)
    digit = np.zeros_like(colour)
    for (x0, y0, x1, y1), c, d in scene.objects:
        colour[y0 // PATCH : y1 // PATCH, x0 // PATCH : x1 // PATCH] = colours[c]
        digit[y0 // PATCH : y1 // PATCH, x0 // PATCH : x1 // PATCH] = int(d) + 1
    return colour.reshape(-1), digit.reshape(-1)


def _window_targets(scene: SceneSample, window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch targets of a crop `window` resized to the vision square: a patch takes a box's classes when its
    centre falls inside the box (boxes are no longer on the patch grid once a crop is rescaled)."""
    colours = {c: i + 1 for i, c in enumerate(COLOURS)}
    wx0, wy0, wx1, wy1 = window
    centres = (np.arange(SIDE // PATCH) + 0.5) * PATCH
    cx = wx0 + centres * (wx1 - wx0) / SIDE  # patch centres in scene pixels
    cy = wy0 + centres * (wy1 - wy0) / SIDE
    colour = np.zeros((SIDE // PATCH, SIDE // PATCH), dtype=np.int64)
    digit = np.zeros_like(colour)
    for (x0, y0, x1, y1), c, d in scene.objects:
        inside = ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]
        colour[inside], digit[inside] = colours[c], int(d) + 1
    return colour.reshape(-1), digit.reshape(-1)


ROI_SPANS = (2, 3, 3, 3, 4)


def roi_window(
    rng: np.random.Generator,
    scene: SceneSample,
    canvas: int,
    grid: int = SIDE // PATCH,
    spans: tuple[int, ...] = ROI_SPANS,
) -> tuple:
    """A crop shaped like the ones SD-RPN's inference makes: a window of `spans` grid cells per side (mostly 3: a
    3×3-grown component), aligned to the token grid, holding the asked box's centre."""
    cell = canvas / grid
    x0, y0, x1, y1 = scene.box
    window = []
    for lo, hi in ((x0, x1), (y0, y1)):
        span = int(rng.choice(list(spans)))
        centre = int((lo + hi) / 2 // cell)
        start = int(np.clip(centre - rng.integers(0, span), 0, grid - span))
        window.append((round(start * cell), round((start + span) * cell)))
    (wx0, wx1), (wy0, wy1) = window
    return wx0, wy0, wx1, wy1


def make_example(rng: np.random.Generator, phase: int, echo: float = 0.5) -> Example:
    """Phase 1: native 64 px three-box scenes. Phase 2: 34 % two-view steps (a 72–256 px scene plus a crop around
    the asked box); of single views 40 % native, the rest 72–256 px canvases shrunk to 64 px."""
    two_view = phase == 2 and rng.random() < 0.34
    native = phase == 1 or (not two_view and rng.random() < 0.4)
    canvas = SIDE if native else int(rng.choice([72, 96, 128, 160, 192, 224, 256]))
    scene = make_scene(rng, "train", canvas=canvas)
    answer = f"{scene.colour} {scene.answer}" if rng.random() < echo else scene.answer
    crop = None
    if two_view:  # the asked box with 0–15 px of context (wider, off-centre crops of 24–96 px read worse: 0.17)
        x0, y0, x1, y1 = scene.box
        margin = int(rng.integers(0, 16))
        crop = scene.image.crop(
            (max(0, x0 - margin), max(0, y0 - margin), min(canvas, x1 + margin), min(canvas, y1 + margin))
        )
    colour, digit = _patch_targets(scene) if native else (None, None)
    return Example(scene.image, scene.question, answer, crop, colour, digit)


def make_roi_example(rng: np.random.Generator, echo: float = 0.5, spans: tuple[int, ...] = ROI_SPANS) -> Example:
    """Phase 3: 60 % two-view steps whose crop is an RoI-shaped window (`roi_window`, usually holding other boxes
    too, so the colour must be bound inside the crop), with the per-patch loss on the crop view as well; the rest
    is phase 2's mix, so the global view and its attention stay as they were."""
    if rng.random() >= 0.6:
        return make_example(rng, 2, echo)
    canvas = int(rng.choice([128, 160, 192, 224, 256, 256, 256]))
    scene = make_scene(rng, "train", canvas=canvas)
    answer = f"{scene.colour} {scene.answer}" if rng.random() < echo else scene.answer
    window = roi_window(rng, scene, canvas, spans=spans)
    crop_colour, crop_digit = _window_targets(scene, window)
    return Example(scene.image, scene.question, answer, scene.image.crop(window), None, None, crop_colour, crop_digit)


# -- training -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NanoRecipe:
    seed: int = 0
    phase1_steps: int = 1800
    phase2_steps: int = 1500
    phase3_steps: int = 4000
    batch_size: int = 32
    lr1: float = 2e-3
    lr2: float = 1e-3
    lr3: float = 5e-4
    warmup: int = 50
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    echo: float = 0.5
    roi_spans: tuple[int, ...] = ROI_SPANS  # phase 3 window sides, in grid cells (drawn uniformly from the list)


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine down to 10 %


def _batch_loss(adapter: LlavaAdapter, heads: torch.nn.Module, batch: list[Example], aux_weight: float):
    model, tok = adapter.model, adapter.tokenizer
    n_img = adapter.num_image_tokens
    dev = adapter.device
    pixel = torch.stack([adapter.pixel_values(e.image) for e in batch]).to(dev)
    vision = model.model.vision_tower(pixel, output_hidden_states=True)
    patch_feats = vision.hidden_states[-2][:, 1:]  # what the projector sees ("default" strategy)
    feats = model.model.multi_modal_projector(patch_feats)
    crops = [e for e in batch if e.crop is not None]
    crop_feats, crop_patches = {}, None
    if crops:
        cp = torch.stack([adapter.crop_pixel_values(e.crop) for e in crops]).to(dev)
        crop_patches = model.model.vision_tower(cp, output_hidden_states=True).hidden_states[-2][:, 1:]
        cf = model.model.multi_modal_projector(crop_patches)
        crop_feats = {id(e): cf[i] for i, e in enumerate(crops)}
    seqs, targets = [], []
    for i, e in enumerate(batch):
        prompt = tok(adapter.prompt(e.question).replace("<image>", "<image>" * n_img))["input_ids"]
        answer = tok(e.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor(prompt + answer, device=dev)
        emb = adapter.embed_tokens(ids)
        pos = (ids == adapter.image_token_id).nonzero().squeeze(-1)
        emb = torch.cat([emb[: pos[0]], feats[i], emb[pos[-1] + 1 :]])
        label = torch.full((len(ids),), -100, device=dev)
        label[len(prompt) :] = torch.tensor(answer, device=dev)
        if id(e) in crop_feats:  # SD-RPN's pass-2 layout: crop tokens right after the image tokens
            cut = int(pos[-1]) + 1
            emb = torch.cat([emb[:cut], crop_feats[id(e)], emb[cut:]])
            label = torch.cat([label[:cut], torch.full((n_img,), -100, device=dev), label[cut:]])
        seqs.append(emb)
        targets.append(label)
    length = max(len(s) for s in seqs)
    embeds = torch.zeros(len(seqs), length, seqs[0].shape[-1], device=dev)
    mask = torch.zeros(len(seqs), length, dtype=torch.long, device=dev)
    labels = torch.full((len(seqs), length), -100, device=dev)
    for i, (s, t) in enumerate(zip(seqs, targets, strict=True)):
        embeds[i, : len(s)], mask[i, : len(s)], labels[i, : len(t)] = s, 1, t
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask)
    logits = model.lm_head(out.last_hidden_state)
    lm_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    views = [(patch_feats[i], e.patch_colour, e.patch_digit) for i, e in enumerate(batch) if e.patch_colour is not None]
    views += [(crop_patches[i], e.crop_colour, e.crop_digit) for i, e in enumerate(crops) if e.crop_colour is not None]
    aux = torch.zeros((), device=dev)
    if views:
        colour_logits, digit_logits = heads(torch.stack([v[0] for v in views]))
        colour_t = torch.as_tensor(np.stack([v[1] for v in views]), device=dev)
        digit_t = torch.as_tensor(np.stack([v[2] for v in views]), device=dev)
        aux = F.cross_entropy(colour_logits.reshape(-1, colour_logits.shape[-1]), colour_t.reshape(-1))
        aux = aux + F.cross_entropy(digit_logits.reshape(-1, digit_logits.shape[-1]), digit_t.reshape(-1))
    return lm_loss + aux_weight * aux, float(lm_loss.detach()), float(aux.detach())


class PatchHeads(torch.nn.Module):
    """Per-patch colour and digit classifiers on the vision tower (standing in for pretrained CLIP features);
    training-time only, not part of the shipped model."""

    def __init__(self, hidden: int):
        super().__init__()
        self.colour = torch.nn.Linear(hidden, len(COLOURS) + 1)
        self.digit = torch.nn.Linear(hidden, 11)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.colour(x), self.digit(x)


def train_nano(
    recipe: NanoRecipe = NanoRecipe(),
    progress: Callable[[int, int], None] | None = None,
    on_phase_end: Callable[[int, LlavaAdapter], None] | None = None,
    device: str = "cpu",
    init: LlavaAdapter | None = None,
) -> LlavaAdapter:
    """Build and train sdrpn-nano from scratch (seeded; fp32), or go on training `init` (phases with 0 steps are
    skipped)."""
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    if init is None:
        model, processor = build_nano(recipe.seed)
    else:
        model, processor = init.model, init.processor
    adapter = LlavaAdapter(model.to(device).train(), processor)
    heads = PatchHeads(model.config.vision_config.hidden_size).to(device)
    params = list(model.parameters()) + list(heads.parameters())
    phases = [
        (1, recipe.phase1_steps, recipe.lr1),
        (2, recipe.phase2_steps, recipe.lr2),
        (3, recipe.phase3_steps, recipe.lr3),
    ]
    total = sum(steps for _, steps, _ in phases)
    bar = Progress(total, "nano", log, callback=progress)
    step = 0
    for phase, steps, peak in phases:
        if steps == 0:
            continue
        optimizer = torch.optim.AdamW(params, lr=peak, betas=(0.9, 0.98), weight_decay=recipe.weight_decay)
        t0 = time.perf_counter()
        for i in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr(i, steps, peak, recipe.warmup)
            batch = [
                make_roi_example(rng, recipe.echo, recipe.roi_spans)
                if phase == 3
                else make_example(rng, phase, recipe.echo)
                for _ in range(recipe.batch_size)
            ]
            loss, lm, aux = _batch_loss(adapter, heads, batch, recipe.aux_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            bar.update(1, phase=phase, lm=f"{lm:.3f}", aux=f"{aux:.3f}")
        log.info("phase %d: %d steps in %.0f s", phase, steps, time.perf_counter() - t0)
        if on_phase_end is not None:
            model.eval()
            on_phase_end(phase, adapter)
            model.train()
    model.eval()
    return adapter


@torch.inference_mode()
def probe(adapter: LlavaAdapter, n: int = 60, seed: int = 12345, canvas: int = 256) -> dict[str, float]:
    """Accuracy of the global view, of an oracle crop of the asked box, of a random box's crop and of an RoI-shaped
    window holding the asked box (`roi_window`), on `canvas` scenes seen at 64 px (digits scored as the last word,
    since the model may echo the colour)."""
    from sdrpn_core.infer import answer_baseline, answer_with_boxes
    from sdrpn_core.metrics import exact_match

    rng = np.random.default_rng(seed)
    hits = {"global": 0.0, "oracle": 0.0, "random_box": 0.0, "roi_window": 0.0}
    for i in range(n):
        scene = make_scene(rng, f"probe-{i}", canvas=canvas)
        other = scene.objects[int(rng.integers(len(scene.objects)))][0]
        window = roi_window(rng, scene, canvas)
        hits["roi_window"] += exact_match(
            answer_with_boxes(adapter, scene.image, scene.question, [window], 4).text, [scene.answer]
        )
        hits["global"] += exact_match(answer_baseline(adapter, scene.image, scene.question, 4).text, [scene.answer])
        hits["oracle"] += exact_match(
            answer_with_boxes(adapter, scene.image, scene.question, [scene.box], 4).text, [scene.answer]
        )
        hits["random_box"] += exact_match(
            answer_with_boxes(adapter, scene.image, scene.question, [other], 4).text, [scene.answer]
        )
    return {k: v / n for k, v in hits.items()}
