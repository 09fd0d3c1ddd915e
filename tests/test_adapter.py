from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdrpn_core.models import AdapterError, LlavaAdapter, load_adapter
from sdrpn_core.models.llava import VICUNA_SYSTEM, expand_to_square
from sdrpn_core.models.tiny import TinyLlavaSpec, build_tiny_llava


def test_prompt_is_vicuna_v1_exactly(tiny_llava):
    assert tiny_llava.prompt("what is it?") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nwhat is it? ASSISTANT:"
    )
    assert tiny_llava.prompt("q").startswith(VICUNA_SYSTEM + " USER: ")


def test_grid_comes_from_the_vision_config():
    model, processor = build_tiny_llava(TinyLlavaSpec(image_size=48, patch_size=8))
    adapter = LlavaAdapter(model, processor)
    assert adapter.grid == (6, 6)
    inputs = adapter.build_inputs([Image.new("RGB", (30, 20))], ["q"])
    assert len(inputs.image_positions[0]) == 36


def test_pad_to_square_keeps_all_content_and_uses_clip_mean():
    red = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = expand_to_square(red, (122, 116, 104))
    arr = np.asarray(sq)
    assert sq.size == (40, 40)
    assert (arr[10:30] == [255, 0, 0]).all()  # the whole original survives, centred
    assert (arr[:10] == [122, 116, 104]).all() and (arr[30:] == [122, 116, 104]).all()


def test_adapter_pads_with_processor_mean_instead_of_centre_crop(tiny_llava):
    # A wide image whose left and right thirds are distinct colours: a centre crop would lose both ends.
    img = Image.new("RGB", (90, 30), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 30, 30))
    img.paste((0, 255, 0), (60, 0, 90, 30))
    px = tiny_llava.pixel_values(img)
    mean = torch.tensor(tiny_llava.processor.image_processor.image_mean)[:, None]
    std = torch.tensor(tiny_llava.processor.image_processor.image_std)[:, None]
    rgb = (px.reshape(3, -1) * std + mean).reshape(3, 32, 32)
    mid = rgb[:, 16]
    assert mid[0, 1] > 0.9 and mid[1, 1] < 0.1  # red survives at the left edge
    assert mid[1, -2] > 0.9 and mid[0, -2] < 0.1  # green at the right edge
    top = rgb[:, 1, 16]
    assert torch.allclose(top, mean[:, 0], atol=0.02)  # padding band is the CLIP mean colour


def test_batch_is_left_padded_with_one_image_run_per_row(tiny_llava, images):
    x = tiny_llava.build_inputs(images[:2], ["short ?", "a much longer question about the left side ?"])
    assert x.attention_mask[0, 0] == 0 and x.attention_mask[1, 0] == 1
    assert x.attention_mask[:, -1].all()
    n = tiny_llava.num_image_tokens
    for row, pos in zip(x.input_ids, x.image_positions, strict=True):
        assert len(pos) == n and torch.equal(pos, torch.arange(pos[0], pos[0] + n))
        assert (row[pos] == tiny_llava.image_token_id).all()


def test_structure_access(tiny_llava):
    assert len(tiny_llava.decoder_layers) == tiny_llava.num_layers == 4
    assert tiny_llava.head_dim * tiny_llava.num_heads == tiny_llava.model.config.text_config.hidden_size
    assert tiny_llava.final_norm is tiny_llava.language_model.norm
    feats = tiny_llava.encode_images(tiny_llava.pixel_values(Image.new("RGB", (8, 8)))[None])
    assert feats.shape == (1, tiny_llava.num_image_tokens, tiny_llava.model.config.text_config.hidden_size)


def test_round_trip_through_load_adapter(tiny_llava, tiny_llava_dir, images):
    loaded = load_adapter(tiny_llava_dir, dtype="float32")
    assert isinstance(loaded, LlavaAdapter) and loaded.grid == tiny_llava.grid
    a = tiny_llava.build_inputs(images[:1], ["q ?"])
    b = loaded.build_inputs(images[:1], ["q ?"])
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    with torch.no_grad():
        la = tiny_llava.model(**a.model_kwargs()).logits
        lb = loaded.model(**b.model_kwargs()).logits
    assert torch.allclose(la, lb, atol=1e-5)


def test_missing_model_fails_clearly(tmp_path):
    with pytest.raises(OSError, match="no-such-model"):
        load_adapter(str(tmp_path / "no-such-model"))


def test_config_without_image_token_is_rejected():
    model, processor = build_tiny_llava()
    model.config.image_token_id = None
    with pytest.raises(AdapterError, match="image_token_id"):
        LlavaAdapter(model, processor)


def test_unknown_dtype_is_rejected(tiny_llava_dir):
    with pytest.raises(AdapterError, match="dtype"):
        load_adapter(tiny_llava_dir, dtype="float8")
