from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from sdrpn_core.models import AdapterError, LlavaAdapter
from sdrpn_core.models.tiny import TinyLlavaSpec, build_tiny_llava
from sdrpn_core.rpn import RoIPredictor, partial_prefill
from tests.conftest import QUESTIONS, random_image


@pytest.fixture(scope="module")
def rpn(tiny_vlm):
    torch.manual_seed(1)
    return RoIPredictor.from_adapter(tiny_vlm, K=1, T=2)


@pytest.fixture(scope="module")
def batch(tiny_vlm):
    x = tiny_vlm.build_inputs([random_image(i) for i in range(3)], QUESTIONS[:3])
    with torch.no_grad():
        embeds = tiny_vlm.embed(x)
        hidden, mask, pe, pos = partial_prefill(tiny_vlm, embeds, x.attention_mask, tiny_vlm.position_ids(x), 1)
    return x, hidden, mask, pe, pos


def test_twig_layers_are_copies_of_backbone_layers_k_onwards(tiny_vlm, rpn):
    for i, twig in enumerate(rpn.twig_layers):
        src = tiny_vlm.decoder_layers[1 + i]
        for (name, a), (_, b) in zip(twig.named_parameters(), src.named_parameters(), strict=True):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    if tiny_vlm.family == "llava":  # LLaVA: extra norm from the final norm, no RoPE in the head
        assert torch.equal(rpn.twig_norm.weight, tiny_vlm.final_norm.weight) and not rpn.config.rope_in_head
    else:  # Qwen: no extra norm, M-RoPE in the head
        assert rpn.twig_norm is None and rpn.config.rope_in_head


def test_partial_prefill_equals_hidden_states_k(tiny_vlm, batch):
    x, hidden, *_, pos = batch
    with torch.no_grad():
        ref = tiny_vlm.model(**x.model_kwargs(), position_ids=pos, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(hidden, ref, atol=1e-6)


def hand_logits(adapter, rpn, hidden, mask, pe, pos, positions) -> list[torch.Tensor]:
    """Twig layers 0..T-2 as decoder blocks; LLaVA: the extra norm; then the last layer's input norm + q/k; Qwen: the
    model's own M-RoPE at the true (3-D) positions of the query and key rows, kv heads repeated; head-mean of
    q·k/√d, for the last token of each row."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    text_pos = pos if pos.ndim == 2 else None
    h = hidden
    for layer in rpn.twig_layers[:-1]:
        h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=text_pos)
    if rpn.twig_norm is not None:
        h = rpn.twig_norm(h)
    last = rpn.twig_layers[-1]
    heads, d = adapter.num_heads, adapter.head_dim
    kv = adapter.text_config.num_key_value_heads
    cos, sin = adapter.rotary_emb(h, pos)  # [B, L, d]
    out = []
    for b in range(h.shape[0]):
        rows = torch.cat([positions[b], torch.tensor([h.shape[1] - 1])])
        normed = last.input_layernorm(h[b, rows])
        q = last.self_attn.q_proj(normed).view(-1, heads, d).transpose(0, 1)  # [heads, n+1, d]
        k = last.self_attn.k_proj(normed).view(-1, kv, d).transpose(0, 1)
        if adapter.family == "qwen2_5_vl":
            q, k = apply_rotary_pos_emb(q[None], k[None], cos[b : b + 1, rows], sin[b : b + 1, rows])
            q, k = q[0], k[0]
        k = k.repeat_interleave(heads // kv, dim=0)
        out.append(torch.stack([(k[hh, :-1] @ q[hh, -1]) / math.sqrt(d) for hh in range(heads)]).mean(0))
    return out


@pytest.mark.parametrize("T", [2, 3])
def test_logits_equal_a_hand_computation(tiny_vlm, rpn, batch, T):
    x, hidden, mask, pe, pos = batch
    positions = torch.stack(x.image_positions)
    torch.manual_seed(2)
    model = rpn if T == 2 else RoIPredictor.from_adapter(tiny_vlm, K=1, T=3)
    query = torch.full((3,), hidden.shape[1] - 1)
    with torch.no_grad():
        logits = model(hidden, mask, pe, pos, query, positions)
        for b, expected in enumerate(hand_logits(tiny_vlm, model, hidden, mask, pe, pos, positions)):
            assert torch.allclose(logits[b], expected, atol=1e-5)
    assert logits.shape == (3, tiny_vlm.num_image_tokens)


def test_query_token_is_the_last_prompt_token(tiny_vlm, rpn, batch):
    x, hidden, mask, pe, pos = batch
    positions = torch.stack(x.image_positions)
    with torch.no_grad():
        a = rpn(hidden, mask, pe, pos, torch.full((3,), hidden.shape[1] - 1), positions)
        b = rpn(hidden, mask, pe, pos, torch.full((3,), hidden.shape[1] - 2), positions)
    assert not torch.allclose(a, b)


def test_save_load_round_trip(tiny_vlm, rpn, batch, tmp_path):
    rpn.save(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"rpn.safetensors", "rpn_config.json"}
    loaded = RoIPredictor.load(tmp_path / "ckpt", tiny_vlm)
    assert loaded.config == rpn.config
    for (n, a), (_, b) in zip(rpn.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_load_refuses_another_grid_family_and_fingerprint(tiny_llava, tiny_qwen, tmp_path):
    other_model, other_proc = build_tiny_llava(TinyLlavaSpec(image_size=48))
    other = LlavaAdapter(other_model, other_proc)
    RoIPredictor.from_adapter(other, K=1, T=2, base_model_fingerprint="0123456789abcdef").save(tmp_path / "o")
    with pytest.raises(AdapterError, match="grid"):
        RoIPredictor.load(tmp_path / "o", tiny_llava)
    with pytest.raises(AdapterError, match="qwen2_5_vl"):
        RoIPredictor.load(tmp_path / "o", tiny_qwen)
    with pytest.raises(AdapterError, match=r"base model 0123456789ab, not on this one \(fedcba987654\)$"):
        RoIPredictor.load(tmp_path / "o", other, check_fingerprint="fedcba9876543210")
    with pytest.raises(FileNotFoundError, match=r"rpn_config\.json"):
        RoIPredictor.load(tmp_path, tiny_llava)


def released_folder(adapter, folder, K: int, T: int) -> dict[str, torch.Tensor]:
    """A "-filled" model folder laid out as the authors release it: bf16 tensors in two safetensors shards with an
    index, the backbone under `model.layers.*` (and Qwen's tower under `visual.*`), the twig under
    `model.twig_layers.{i}.*` with the decoder layer's own sub-module names, `model.twig_norm.weight` (both
    families), `twig_head.weight` ([vocab, hidden], unused), and `twig_K` / `twig_T` in config.json. The twig
    weights are the backbone's layers K.. perturbed, so a loader that copies the backbone instead is caught."""
    g = torch.Generator().manual_seed(7)
    twig = {}
    for i in range(T):
        for name, p in adapter.decoder_layers[K + i].state_dict().items():
            twig[f"model.twig_layers.{i}.{name}"] = (p + 0.05 * torch.randn(p.shape, generator=g)).bfloat16()
    hidden = adapter.text_config.hidden_size
    twig["model.twig_norm.weight"] = (1 + 0.5 * torch.randn(hidden, generator=g)).bfloat16()
    twig["twig_head.weight"] = torch.randn(adapter.text_config.vocab_size, hidden, generator=g).bfloat16()
    backbone = {f"model.layers.0.{k}": v.bfloat16() for k, v in adapter.decoder_layers[0].state_dict().items()}
    if adapter.family == "qwen2_5_vl":
        backbone["visual.blocks.0.norm1.weight"] = torch.ones(8).bfloat16()
    shards = {"model-00001-of-00002.safetensors": backbone, "model-00002-of-00002.safetensors": twig}
    for name, tensors in shards.items():
        save_file(tensors, folder / name, metadata={"format": "pt"})
    index = {"weight_map": {k: name for name, tensors in shards.items() for k in tensors}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"enable_twig": True, "twig_K": K, "twig_T": T}))
    return twig


def authors_forward(adapter, released, hidden, mask, pe, pos, positions, K: int, T: int) -> torch.Tensor:
    """The authors' RPN forward (docs/method.md §4.2) written out from the released tensors: twig layers 0..T-2 as
    decoder blocks, LLaVA's twig_norm (an RMSNorm, by hand; Qwen skips it), the last layer's input RMSNorm and q/k
    projections (by hand), Qwen's M-RoPE at the true positions, kv heads repeated, head-mean of q·k/√d."""
    import copy

    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    def weights(i: int, name: str) -> torch.Tensor:
        return released[f"model.twig_layers.{i}.{name}"].float()

    def rms(x, w):
        eps = adapter.text_config.rms_norm_eps
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    text_pos = pos if pos.ndim == 2 else None
    h = hidden
    for i in range(T - 1):
        block = copy.deepcopy(adapter.decoder_layers[K + i])
        block.load_state_dict({n: weights(i, n) for n in block.state_dict()})
        h = block(h, attention_mask=mask, position_embeddings=pe, position_ids=text_pos)
    qwen = adapter.family == "qwen2_5_vl"
    if not qwen:
        h = rms(h, released["model.twig_norm.weight"].float())
    last = T - 1
    heads, d, kv = adapter.num_heads, adapter.head_dim, adapter.text_config.num_key_value_heads
    bias = {n: weights(last, f"self_attn.{n}.bias") if qwen else None for n in ("q_proj", "k_proj")}
    cos, sin = adapter.rotary_emb(h, pos)
    out = []
    for b in range(h.shape[0]):
        rows = torch.cat([positions[b], torch.tensor([h.shape[1] - 1])])
        normed = rms(h[b, rows], weights(last, "input_layernorm.weight"))
        q = torch.nn.functional.linear(normed, weights(last, "self_attn.q_proj.weight"), bias["q_proj"])
        k = torch.nn.functional.linear(normed, weights(last, "self_attn.k_proj.weight"), bias["k_proj"])
        q, k = q.view(-1, heads, d).transpose(0, 1), k.view(-1, kv, d).transpose(0, 1)
        if qwen:
            q, k = apply_rotary_pos_emb(q[None], k[None], cos[b : b + 1, rows], sin[b : b + 1, rows])
            q, k = q[0], k[0]
        k = k.repeat_interleave(heads // kv, dim=0)
        out.append(torch.stack([(k[hh, :-1] @ q[hh, -1]) / math.sqrt(d) for hh in range(heads)]).mean(0))
    return torch.stack(out)


def test_released_checkpoints_load_and_predict_as_the_authors_forward(tiny_vlm, tmp_path):
    K, T = 1, 3
    released = released_folder(tiny_vlm, tmp_path, K, T)
    rpn = RoIPredictor.from_authors_checkpoint(tmp_path, tiny_vlm)  # K, T from config.json
    assert (rpn.config.K, rpn.config.T) == (K, T) and rpn.config.base_model == str(tmp_path)
    assert (rpn.twig_norm is not None) == (tiny_vlm.family == "llava")  # Qwen's released twig_norm stays unused
    x = tiny_vlm.build_inputs([random_image(i) for i in range(2)], QUESTIONS[:2])
    with torch.no_grad():
        hidden, mask, pe, pos = partial_prefill(
            tiny_vlm, tiny_vlm.embed(x), x.attention_mask, tiny_vlm.position_ids(x), K
        )
        positions = torch.stack(x.image_positions)
        ours = rpn(hidden, mask, pe, pos, torch.full((2,), hidden.shape[1] - 1), positions)
        theirs = authors_forward(tiny_vlm, released, hidden, mask, pe, pos, positions, K, T)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    with pytest.raises(AdapterError, match="says twig_T=3, not 2"):
        RoIPredictor.from_authors_checkpoint(tmp_path, tiny_vlm, K=1, T=2)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(AdapterError, match="does not match K=1, T=2") as mismatch:
        RoIPredictor.from_authors_checkpoint(tmp_path, tiny_vlm, K=1, T=2)
    unexpected = str(mismatch.value).rsplit("unexpected ", 1)[1]
    assert unexpected.count("twig_layers.2.") == 4  # the first four of the third layer's keys, no more
    with pytest.raises(AdapterError, match="twig_K is not in"):
        RoIPredictor.from_authors_checkpoint(tmp_path, tiny_vlm)
    (tmp_path / "config.json").unlink()  # no config at all: K and T must be given
    with pytest.raises(AdapterError, match="twig_K is not in"):
        RoIPredictor.from_authors_checkpoint(tmp_path, tiny_vlm)
    assert RoIPredictor.from_adapter(tiny_vlm, K=1, T=1).config.T == 1  # one block is a valid RPN


def test_bad_depth_is_rejected(tiny_vlm):
    with pytest.raises(AdapterError, match="K\\+T <= 4"):
        RoIPredictor.from_adapter(tiny_vlm, K=3, T=2)


def test_rpn_reads_the_last_prompt_token_in_training_and_inference(tiny_vlm):
    """The query row is picked by hand here: position L−1 of the prompt, whose h^K comes from the model's own
    forward (`output_hidden_states`), not from our partial prefill. Training's batch logits and inference's pass-1
    map must both equal the RPN at that row, and differ from the row before it."""
    from sdrpn_core.infer import run_pass1
    from sdrpn_core.rpn import partial_prefill
    from sdrpn_core.train import rpn_logits
    from tests.conftest import random_image

    torch.manual_seed(1)
    K = 1
    rpn = RoIPredictor.from_adapter(tiny_vlm, K=K, T=2).float()
    image, question = random_image(3, (40, 40)), "what colour is the car on the left side of the image ?"
    x = tiny_vlm.build_inputs([image], [question])
    L = x.input_ids.shape[1]
    with torch.no_grad():
        h_k = tiny_vlm.model(**x.model_kwargs(), output_hidden_states=True).hidden_states[K]
        _, mask, pe, pos = partial_prefill(tiny_vlm, tiny_vlm.embed(x), x.attention_mask, tiny_vlm.position_ids(x), K)
        image_positions = torch.stack(x.image_positions)
        at = {row: rpn(h_k, mask, pe, pos, torch.tensor([row]), image_positions)[0] for row in (L - 1, L - 2)}
        trained = rpn_logits(tiny_vlm, rpn, tiny_vlm.collate([tiny_vlm.pixel_values(image)], [question]), K)[0]
    inferred = torch.as_tensor(run_pass1(tiny_vlm, rpn, image, question).logits_map).reshape(-1)
    assert not torch.allclose(at[L - 1], at[L - 2], atol=1e-4)
    torch.testing.assert_close(trained, at[L - 1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(inferred, at[L - 1], atol=1e-4, rtol=1e-4)


# -- written against mutation survivors (benchmarks/results/mutation.md) -------------------------------------------


def test_checkpoint_files_as_written_and_strictly_read(tiny_vlm, tmp_path):
    import json

    from safetensors import safe_open

    torch.manual_seed(4)
    rpn = RoIPredictor.from_adapter(tiny_vlm, K=1, T=3, base_model_fingerprint="", preset="demo", base_model="m")
    folder = tmp_path / "runs" / "a" / "rpn"  # parents made
    rpn.save(folder)
    rpn.save(folder)  # saving again over a checkpoint is allowed
    with safe_open(folder / "rpn.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    text = (folder / "rpn_config.json").read_text()
    assert len(text.splitlines()) > len(json.loads(text))  # one field per line: readable in a diff
    loaded = RoIPredictor.load(folder, tiny_vlm, check_fingerprint="anything")  # none recorded: nothing to check
    assert loaded.config == rpn.config and loaded.config.T == 3
    for (n, a), (_, b) in zip(rpn.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    state = {k: v.clone() for k, v in rpn.state_dict().items()}
    save_file({**state, "twig_layers.9.extra": torch.zeros(1)}, folder / "rpn.safetensors")
    with pytest.raises(RuntimeError, match=r"twig_layers\.9\.extra"):
        RoIPredictor.load(folder, tiny_vlm)


def test_from_adapter_defaults_depth_checks_and_an_own_norm(tiny_llava):
    rpn = RoIPredictor.from_adapter(tiny_llava, K=1)
    assert rpn.config.T == 3 and len(rpn.twig_layers) == 3
    for K, T in [(0, 2), (1, 0), (2, 3)]:
        with pytest.raises(AdapterError, match="K\\+T <= 4"):
            RoIPredictor.from_adapter(tiny_llava, K=K, T=T)
    # the extra norm is a copy: training it must not move the base model's final norm
    assert rpn.twig_norm.weight.data_ptr() != tiny_llava.final_norm.weight.data_ptr()
    with torch.no_grad():
        rpn.twig_norm.weight.add_(1.0)
    assert not torch.equal(rpn.twig_norm.weight, tiny_llava.final_norm.weight)
