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

from sdrpn_core.models.llava import VICUNA_SYSTEM

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


def build_tiny_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with LLaVA's special tokens: any text encodes, `<image>` stays one token."""
    specials = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
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
