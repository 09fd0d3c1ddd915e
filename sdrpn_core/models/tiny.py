"""Tiny random LLaVA-1.5-shaped models for tests and benchmarks (the transformers model-tester pattern).

Nothing here downloads: the tokenizer is trained locally on the vicuna_v1 prompt text, the image processor is the
PIL CLIP processor (torchvision does not work on these machines), and the weights are random.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from sdrpn_core.models.llava import VICUNA_SYSTEM, LlavaAdapter

_CORPUS = [
    VICUNA_SYSTEM,
    "USER: ASSISTANT: what is the digit in the red box ? what colour is the car on the left side of the image ?",
    "Answer the question using a single word or phrase. What is written on the sign ? Who wrote this book ?",
    "yes no one two three four five six seven eight nine zero red green blue yellow left right top bottom",
]


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Shape of a tiny LLaVA; defaults are CPU-seconds small. `image_size // patch_size` sets the RoI grid."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    vocab_size: int = 600
    seed: int = 0


def byte_bpe(specials: list[str], corpus: list[str], vocab_size: int, unk: str | None = None) -> Tokenizer:
    """A byte-level BPE trained on `corpus` (any text encodes) with `specials` kept whole."""
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def build_tiny_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """LLaVA's special tokens on a byte-level BPE: any text encodes, `<image>` stays one token."""
    tok = byte_bpe(["<unk>", "<pad>", "<s>", "</s>", "<image>"], _CORPUS, vocab_size, unk="<unk>")
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return llava_tokenizer(tok)


def llava_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A `tokenizers` object wrapped with LLaVA's special tokens; left padding for batched generation."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )


def llava_processor(tokenizer: PreTrainedTokenizerFast, side: int, patch: int) -> LlavaProcessor:
    """The PIL CLIP image processor at `side` px (torchvision does not work here) + the tokenizer."""
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def llava_from_config(
    config: LlavaConfig,
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LlavaForConditionalGeneration:
    """Seeded random weights (initialised on `device`); generation ids taken from the tokenizer."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def build_tiny_llava(
    spec: TinyLlavaSpec | None = None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random `LlavaForConditionalGeneration` and its processor, LLaVA-1.5-like in every rule we rely on.

    `device` is where the weights are initialised (a 7B-sized random model initialises in seconds on a GPU)."""
    spec = spec or TinyLlavaSpec()
    tokenizer = build_tiny_tokenizer(spec.vocab_size)
    side = spec.image_size
    n_img = (side // spec.patch_size) ** 2
    processor = llava_processor(tokenizer, side, spec.patch_size)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=4,
            image_size=side,
            patch_size=spec.patch_size,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_kv_heads,
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n_img,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return llava_from_config(config, tokenizer, spec.seed, dtype, device), processor


# -- Qwen2.5-VL ----------------------------------------------------------------------------------------------------

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


@dataclass(frozen=True)
class TinyQwenSpec:
    """Shape of a tiny Qwen2.5-VL: 14-px patches merged 2×2; `side` px images give a (side/28)² token grid."""

    side: int = 112
    vision_hidden: int = 32
    vision_layers: int = 2
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2  # GQA, as the real models
    vocab_size: int = 600
    seed: int = 0


def build_tiny_qwen_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen's special tokens; left padding for batched generation."""
    from sdrpn_core.models.qwen import QWEN_SYSTEM, SHORT_ANSWER

    tok = byte_bpe(QWEN_SPECIALS, [*_CORPUS, QWEN_SYSTEM, SHORT_ANSWER, "system user assistant <image>"], vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def build_tiny_qwen(spec: TinyQwenSpec | None = None, *, dtype: torch.dtype = torch.float32, settings=None):
    """A random `Qwen2_5_VLForConditionalGeneration` wrapped in its adapter (PIL image processor, local tokenizer);
    the default budget is min = max = side² pixels on square-padded images, a fixed (side/28)² grid."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from sdrpn_core.models.qwen import QwenAdapter, QwenSettings

    spec = spec or TinyQwenSpec()
    tokenizer = build_tiny_qwen_tokenizer(spec.vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    half = spec.text_hidden // spec.text_heads // 2
    hw = half * 3 // 8  # Qwen's split of the rotary half into (t, h, w): [16, 24, 24] for head_dim 128
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=spec.vision_layers,
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            out_hidden_size=spec.text_hidden,
            fullatt_block_indexes=[spec.vision_layers - 1],
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_kv_heads,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e4,
                "mrope_section": [half - 2 * hw, hw, hw],
            },
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.bos_token_id = None
    budget = spec.side * spec.side
    settings = settings or QwenSettings(min_pixels=budget, max_pixels=budget)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
    return QwenAdapter(model, image_processor, tokenizer, settings)


def tiny_llava_adapter(**spec) -> LlavaAdapter:
    return LlavaAdapter(*build_tiny_llava(TinyLlavaSpec(**spec)))


def tiny_qwen_adapter(**spec):
    return build_tiny_qwen(TinyQwenSpec(**spec))


def tiny_family(name: str) -> str:
    """The adapter family a tiny-model name means (a family's name or alias); an error naming the known ones."""
    from sdrpn_core.models import get_family

    return get_family(name).name


def build_tiny(family: str = "llava", **spec):
    """A tiny random model of `family` (any registered family's name or alias) wrapped in its adapter."""
    from sdrpn_core.models import get_family

    return get_family(family).build_tiny(**spec)
