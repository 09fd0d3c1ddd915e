"""What only the Qwen2.5-VL adapter does: chat prompts, the pixel budget, M-RoPE positions after crop insertion.

Everything else (teacher, labels, RPN, training, inference, flows) runs on tiny Qwen through the parametrised tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdrpn_core.infer import _full_prefill, answer_baseline, answer_sdrpn, answer_with_boxes, run_pass1
from sdrpn_core.models import AdapterError, load_adapter
from sdrpn_core.models.qwen import SHORT_ANSWER, QwenSettings
from sdrpn_core.models.tiny import TinyQwenSpec, build_tiny_qwen
from sdrpn_core.rpn import RoIPredictor
from tests.conftest import QUESTIONS, random_image

Q = "what is the digit in the red box ?"


def test_prompt_is_the_chat_template_with_the_short_answer_sentence_once(tiny_qwen):
    p = tiny_qwen.prompt(Q)
    assert p.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert p.endswith(
        f"<|vision_start|><|image_pad|><|vision_end|>{Q}\n{SHORT_ANSWER}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tiny_qwen.prompt(QUESTIONS[3]).count(SHORT_ANSWER) == 1  # already there: not appended twice
    ids = tiny_qwen.tokenizer(p)["input_ids"]
    assert tiny_qwen.tokenizer.decode(ids[-1:]) == "\n"  # the RPN's query row: the \n after "assistant"


def test_grounding_and_literal_image_tag_options():
    a = build_tiny_qwen(settings=QwenSettings(min_pixels=112 * 112, max_pixels=112 * 112, prompt="grounding"))
    p = a.prompt(QUESTIONS[3])
    assert SHORT_ANSWER not in p and "x_min y_min x_max y_max {detail_label}" in p
    assert "Who wrote this book ? Output the grounding bounding box of Region of Interest" in p  # replaced in place
    assert a.prompt(Q).count(Q) == 1 and "x_min" not in a.prompt(Q)  # no sentence to replace: the question as is
    b = build_tiny_qwen(
        settings=QwenSettings(min_pixels=112 * 112, max_pixels=112 * 112, prompt="plain", literal_image_tag=True)
    )
    assert f"user\n<image><|vision_start|><|image_pad|><|vision_end|>\n{Q}<|im_end|>" in b.prompt(Q)
    with pytest.raises(AdapterError, match="prompt"):
        QwenSettings(prompt="verbose")


def test_padded_budget_gives_one_grid_for_every_aspect(tiny_qwen):
    grids = {tiny_qwen.build_inputs([random_image(0, size)], [Q]).grids[0] for size in [(33, 25), (200, 20), (5, 90)]}
    assert grids == {tiny_qwen.grid} == {(4, 4)}


def test_dynamic_budget_follows_the_aspect_and_teacher_groups_by_grid():
    from sdrpn_core.data import Sample
    from sdrpn_core.presets import get_preset
    from sdrpn_core.teacher import extract_teacher_maps

    a = build_tiny_qwen(settings=QwenSettings(min_pixels=56 * 56, max_pixels=168 * 168, pad_square=False))
    wide, tall = random_image(1, (160, 60)), random_image(2, (60, 160))
    x = a.build_inputs([wide, tall], [Q, Q])
    (gh0, gw0), (gh1, gw1) = x.grids
    assert gw0 > gh0 and gh1 > gw1  # no padding: the grid keeps the aspect
    preset = get_preset("qwen2.5-vl-7b/natural", grounding={2: (0, 3)}, sink={}, K=1, T=2)
    out = extract_teacher_maps(a, [Sample("w", wide, Q), Sample("t", tall, Q)], preset, batch_size=2, max_new_tokens=2)
    assert {r.sample_id: r.grid for r in out.records} == {"w": x.grids[0], "t": x.grids[1]} and not out.rejected
    assert all(r.grounding.size == r.grid[0] * r.grid[1] for r in out.records)
    # inference on a non-square grid, boxes mapped back by a plain per-axis scale
    rpn = RoIPredictor.from_adapter(a, K=2, T=2)
    ans = answer_sdrpn(a, rpn, wide, Q, threshold=0.0, max_new_tokens=2)
    assert ans.roi.logits.shape == x.grids[0] and ans.roi.pixel_boxes == [(0, 0, 160, 60)]


def test_prefill_with_our_embeddings_and_positions_equals_the_model_forward(tiny_qwen):
    x = tiny_qwen.build_inputs([random_image(3, (50, 30))], [Q])
    with torch.no_grad():
        ours, _ = _full_prefill(tiny_qwen, tiny_qwen.embed(x), tiny_qwen.position_ids(x))
        ref = tiny_qwen.model(**x.model_kwargs()).logits[:, -1]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def explicit_pass2_ids(adapter, x, n_crop: int) -> torch.Tensor:
    """The pass-2 token sequence written out: … <vs> V <vs> V_crop <ve> <ve> … (docs/method.md §6.4)."""
    cfg = adapter.model.config
    ids = x.input_ids[0].tolist()
    end = int(x.image_positions[0][-1]) + 1
    assert ids[end] == cfg.vision_end_token_id and ids[int(x.image_positions[0][0]) - 1] == cfg.vision_start_token_id
    block = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_crop + [cfg.vision_end_token_id]
    return torch.tensor([ids[:end] + block + ids[end:]])


def test_positions_after_crop_insertion_match_get_rope_index_on_the_explicit_sequence(tiny_qwen):
    image = random_image(4, (90, 60))
    x = tiny_qwen.build_inputs([image], [Q])
    embeds = tiny_qwen.embed(x)
    feats, (gh, gw) = tiny_qwen.encode_crop(image.crop((10, 5, 50, 45)))
    assert feats.shape[0] == gh * gw
    ids = explicit_pass2_ids(tiny_qwen, x, gh * gw)
    thw = torch.tensor([[1, 2 * g[0], 2 * g[1]] for g in (x.grids[0], (gh, gw))])
    ref, _ = tiny_qwen.model.model.get_rope_index(ids, ids.eq(tiny_qwen.image_token_id).int(), image_grid_thw=thw)
    e_all, pos_all = tiny_qwen.insert_crop(x, embeds, [(feats, (gh, gw))], [None])
    assert torch.equal(pos_all, ref) and e_all.shape[1] == ids.shape[1]
    # the crop's own M-RoPE grid: one temporal id, gh rows × gw cols, starting after its <vision_start>
    n0 = int(x.image_positions[0][-1]) + 2  # first crop token
    t, h, w = ref[:, 0, n0 : n0 + gh * gw]
    assert len(set(t.tolist())) == 1 and int(t[0]) == int(ref[0, 0, n0 - 1]) + 1
    assert int(h.max() - h.min()) == gh - 1 and int(w.max() - w.min()) == gw - 1
    # masked crop tokens dropped: every survivor keeps its position from the full layout
    keep = np.zeros((gh, gw), dtype=bool)
    keep[: gh // 2, 1:] = True
    e_kept, pos_kept = tiny_qwen.insert_crop(x, embeds, [(feats, (gh, gw))], [keep])
    kept = torch.ones(ids.shape[1], dtype=torch.bool)
    kept[n0 : n0 + gh * gw] = torch.from_numpy(keep.reshape(-1))
    assert torch.equal(pos_kept, ref[:, :, kept]) and torch.equal(e_kept, e_all[:, kept])


def test_answer_with_a_crop_equals_hf_generate_on_the_two_image_sequence(tiny_qwen):
    """No tokens dropped: our insertion, positions and decoding equal the model's own two-image forward."""
    image, box = random_image(5, (80, 64)), (8, 8, 48, 40)
    ours = answer_with_boxes(tiny_qwen, image, Q, [box], max_new_tokens=5)
    x = tiny_qwen.build_inputs([image], [Q])
    crop_px = tiny_qwen._process(image.crop(box))
    n_crop = int(crop_px.grid_thw.prod()) // 4
    ids = explicit_pass2_ids(tiny_qwen, x, n_crop)
    with torch.no_grad():
        out = tiny_qwen.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=torch.cat([x.pixel_values, crop_px.values]),
            image_grid_thw=torch.stack([x.extra["image_grid_thw"][0], crop_px.grid_thw]),
            mm_token_type_ids=ids.eq(tiny_qwen.image_token_id).int(),
            max_new_tokens=5,
            do_sample=False,
        )
    assert ours.token_ids == out[0, ids.shape[1] :].tolist()


def test_decoding_after_dropped_tokens_uses_hf_rope_deltas(tiny_qwen):
    """After masked crop tokens are dropped, each new token's position is HF's cache length + rope delta."""
    from sdrpn_core.infer import crop_tokens, run_pass2
    from sdrpn_core.roi import RoIPlan

    torch.manual_seed(0)
    rpn = RoIPredictor.from_adapter(tiny_qwen, K=2, T=2)
    image = random_image(6, (70, 70))
    region = np.array([[True, False], [True, True]])
    plan = RoIPlan("mask", ((1, 1, 3, 3),), region=region)
    p1 = run_pass1(tiny_qwen, rpn, image, Q, reuse_kv=False)
    ours, roi = run_pass2(tiny_qwen, p1, plan, max_new_tokens=5)
    assert roi.plan.kind == "mask" and roi.n_crop_tokens > 2
    crops, keep, _, _ = crop_tokens(tiny_qwen, image, plan, p1.grid)
    assert 0 < keep[0].sum() < keep[0].size  # some crop tokens really are dropped
    e2, pos2 = tiny_qwen.insert_crop(p1.inputs, p1.embeds, crops, keep)
    lm = tiny_qwen.language_model
    delta = int(pos2.max()) + 1 - e2.shape[1]  # HF's rope_deltas for this sequence
    with torch.no_grad():
        out = lm(inputs_embeds=e2, position_ids=pos2, use_cache=True)
        cache, tokens = out.cache, []
        for _ in range(5):
            token = int(tiny_qwen.lm_head(out.last_hidden_state[:, -1]).argmax())
            tokens.append(token)
            length = cache.get_seq_length()
            pos = torch.full((3, 1, 1), length + delta)
            out = lm(inputs_embeds=tiny_qwen.embed_tokens(torch.tensor([[token]])), position_ids=pos, cache=cache)
            cache = out.cache
    assert ours == tokens[: len(ours)]


def test_save_load_round_trip_and_input_overrides(tiny_qwen, tmp_path):
    tiny_qwen.save_pretrained(tmp_path / "m")
    loaded = load_adapter(tmp_path / "m")
    assert loaded.family == "qwen2_5_vl" and loaded.settings == tiny_qwen.settings and loaded.grid == tiny_qwen.grid
    x = loaded.build_inputs([random_image(7)], [Q])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**x.model_kwargs()).logits, tiny_qwen.model(**x.model_kwargs()).logits)
    bigger = load_adapter(tmp_path / "m", inputs={"min_pixels": 168 * 168, "max_pixels": 168 * 168})
    assert bigger.grid == (6, 6) and bigger.describe()["max_pixels"] == 168 * 168
    with pytest.raises(AdapterError, match="unknown Qwen input settings"):
        load_adapter(tmp_path / "m", inputs={"max_pix": 1})


def test_llava_rejects_input_overrides_and_image_pruning(tiny_llava_dir, tiny_llava):
    with pytest.raises(AdapterError, match="not adjustable for llava"):
        load_adapter(tiny_llava_dir, inputs={"max_pixels": 10})
    x = tiny_llava.build_inputs([random_image(0)], [Q])
    with pytest.raises(AdapterError, match="no high-resolution pruning"):
        tiny_llava.insert_crop(x, tiny_llava.embed(x), [], [], np.ones(16, dtype=bool))


def test_tiny_qwen_is_seeded():
    a, b = build_tiny_qwen(TinyQwenSpec(seed=5)), build_tiny_qwen(TinyQwenSpec(seed=5))
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))


def test_with_inputs_shares_the_model_and_leaves_the_original_alone(tiny_qwen, tiny_llava):
    from sdrpn_core.presets import PRESETS
    from stages.refs import ModelRef
    from stages.teacher import teacher_fingerprint

    g = tiny_qwen.with_inputs(prompt="grounding", min_pixels=168 * 168, max_pixels=168 * 168)
    assert g.model is tiny_qwen.model and "x_min" in g.prompt(QUESTIONS[3]) and SHORT_ANSWER in tiny_qwen.prompt(Q)
    assert g.build_inputs([random_image(0)], [Q]).grids[0] == (6, 6)
    assert tiny_qwen.build_inputs([random_image(0)], [Q]).grids[0] == (4, 4)  # the shared model's own budget kept
    with pytest.raises(AdapterError, match="not adjustable for llava"):
        tiny_llava.with_inputs(prompt="grounding")
    ref = ModelRef("fp", "/m", "qwen2_5_vl", "float32", "cpu")
    preset = PRESETS["qwen2.5-vl-7b/natural"]
    assert teacher_fingerprint(ref, preset, 8) != teacher_fingerprint(ref, preset, 8, {"prompt": "grounding"})


def test_high_resolution_pruning_drops_low_scoring_image_tokens(tiny_qwen, monkeypatch):
    """Above 1024 image tokens (here the limit is lowered to the tiny grid) pass 2 keeps only the original image
    tokens whose max RPN score over the tokens after the image passes the bar; positions stay those of the full
    layout, and KV reuse still gives the full recompute's answer."""
    import sdrpn_core.infer as infer
    from sdrpn_core.infer import crop_tokens, run_pass2
    from sdrpn_core.roi import RoIPlan

    torch.manual_seed(1)
    rpn = RoIPredictor.from_adapter(tiny_qwen, K=2, T=2)
    image = random_image(11, (64, 64))
    monkeypatch.setattr(infer, "PRUNE_ABOVE", 8)
    probe = run_pass1(tiny_qwen, rpn, image, Q, reuse_kv=False)
    # the scores by another path: the RPN's forward with each token after the image as the query
    x, L = probe.inputs, probe.embeds.shape[1]
    with torch.no_grad():
        from sdrpn_core.rpn import partial_prefill

        hk, mask, pe, pos = partial_prefill(tiny_qwen, probe.embeds, x.attention_mask, probe.positions, 2)
        per_row = [
            rpn(hk, mask, pe, pos, torch.tensor([r]), probe.image_positions[None])[0]
            for r in range(int(probe.image_positions[-1]) + 1, L)
        ]
    scores = torch.sigmoid(torch.stack(per_row).amax(0)).numpy()
    monkeypatch.setattr(infer, "PRUNE_SCORE", float(np.median(scores)))
    plan = RoIPlan("mask", ((0, 0, 2, 2),), region=np.ones((2, 2), dtype=bool))
    answers = []
    for reuse in (True, False):
        p1 = run_pass1(tiny_qwen, rpn, image, Q, reuse_kv=reuse)
        np.testing.assert_array_equal(p1.image_keep, scores > float(np.median(scores)))
        answers.append(run_pass2(tiny_qwen, p1, plan, max_new_tokens=5)[0])
    assert answers[0] == answers[1]
    assert 0 < p1.image_keep.sum() < p1.image_keep.size
    crops, keep, _, _ = crop_tokens(tiny_qwen, image, plan, p1.grid)
    _, full_pos = tiny_qwen.insert_crop(x, p1.embeds, crops, keep)
    _, pruned_pos = tiny_qwen.insert_crop(x, p1.embeds, crops, keep, p1.image_keep)
    kept = torch.ones(full_pos.shape[-1], dtype=torch.bool)
    kept[x.image_positions[0]] = torch.from_numpy(p1.image_keep)
    assert torch.equal(pruned_pos, full_pos[:, :, kept])


def test_tiny_family_names_are_checked():
    from sdrpn_core.models.tiny import tiny_family

    assert tiny_family("qwen") == tiny_family("qwen2_5_vl") == "qwen2_5_vl" and tiny_family("llava") == "llava"
    with pytest.raises(AdapterError, match="no adapter for model family 'qwne'"):
        tiny_family("qwne")


def test_pruning_uses_the_authors_constants_above_1024_image_tokens():
    """The real constants, not lowered ones: a 33×33 grid (1,089 image tokens) prunes, a 32×32 one (exactly
    1,024) does not; a token is kept exactly where the sigmoid of its max RPN score over the tokens after the image,
    computed here by another path (the RPN's forward, one query row at a time), is above 0.01."""
    from sdrpn_core.infer import PRUNE_ABOVE, PRUNE_SCORE
    from sdrpn_core.models.tiny import TinyQwenSpec, build_tiny_qwen
    from sdrpn_core.rpn import partial_prefill

    assert (PRUNE_ABOVE, PRUNE_SCORE) == (1024, 0.01)
    adapter = build_tiny_qwen(TinyQwenSpec(side=28 * 33, text_layers=3))
    torch.manual_seed(2)
    rpn = RoIPredictor.from_adapter(adapter, K=1, T=2)
    q_proj = rpn.twig_layers[-1].self_attn.q_proj
    with torch.no_grad():  # a large query bias spreads the random head's scores to both sides of 0.01
        q_proj.weight.zero_()
        q_proj.bias.copy_(torch.randn_like(q_proj.bias) * 400)
    big = run_pass1(adapter, rpn, random_image(3, (28 * 33, 28 * 33)), Q)
    assert big.grid == (33, 33) and big.image_keep is not None
    x, L = big.inputs, big.embeds.shape[1]
    with torch.no_grad():
        hk, mask, pe, pos = partial_prefill(adapter, big.embeds, x.attention_mask, big.positions, 1)
        rows = range(int(big.image_positions[-1]) + 1, L)
        per_row = torch.stack([rpn(hk, mask, pe, pos, torch.tensor([r]), big.image_positions[None])[0] for r in rows])
    scores = torch.sigmoid(per_row.amax(0)).numpy()
    np.testing.assert_array_equal(big.image_keep, scores > 0.01)
    assert 0 < big.image_keep.sum() < 33 * 33  # some dropped, some kept, at the real bar
    budget = (28 * 32) ** 2
    edge = run_pass1(adapter.with_inputs(min_pixels=budget, max_pixels=budget), rpn, random_image(3, (900, 900)), Q)
    assert edge.grid == (32, 32) and edge.image_keep is None  # "more than 1024": exactly 1024 is not pruned


def test_decoding_follows_the_checkpoints_repetition_penalty_as_generate_does(tiny_qwen):
    """Qwen2.5-VL-Instruct's generation config carries repetition_penalty 1.05, which the authors' `generate` calls
    inherit; ours applies it the same way (a strong value here, so that it changes this random model's answer)."""
    image = random_image(3, (64, 48))
    config = tiny_qwen.model.generation_config
    plain = answer_baseline(tiny_qwen, image, Q, max_new_tokens=10).token_ids
    config.repetition_penalty = 3.0
    try:
        ours = answer_baseline(tiny_qwen, image, Q, max_new_tokens=10).token_ids
        x = tiny_qwen.build_inputs([image], [Q])
        with torch.no_grad():
            ref = tiny_qwen.model.generate(**x.model_kwargs(), max_new_tokens=10, do_sample=False)
    finally:
        config.repetition_penalty = None
    assert ours == ref[0, x.input_ids.shape[1] :].tolist()
    assert ours != plain and len(set(ours)) > len(set(plain))  # the penalty did something


def test_evaluation_inputs_are_the_authors_chat_wrappers(tiny_qwen):
    """`--model qwen2_5_vl` is lmms-eval's chat class: unpadded, the short-answer sentence appended to any prompt that
    lacks it (ChartQA's own instruction included), 128 new tokens where a task sets no limit."""
    from sdrpn_core.models import QwenAdapter

    ev = tiny_qwen.with_inputs(**QwenAdapter.evaluation_inputs)
    chart = "How many bars?\nAnswer the question with a single word."
    assert f"{chart}\n{SHORT_ANSWER}<|im_end|>" in ev.prompt(chart)
    assert ev.prompt(QUESTIONS[3]).count(SHORT_ANSWER) == 1 and not ev.settings.pad_square
    assert QwenAdapter.default_max_new_tokens == 128


def _authors_grid(width: int, height: int, budget: int) -> tuple[int, int]:
    """The merged token grid the authors' chat wrapper gives a width×height image at a fixed pixel budget, written
    out from their code's arithmetic: qwen_vl_utils.fetch_image (smart_resize with its defaults 4·28² .. 16384·28²),
    then the processor's smart_resize at min = max = budget; factor 28 (14-px patches merged 2×2)."""
    import math

    def smart_resize(h, w, lo, hi):
        h_bar, w_bar = max(28, round(h / 28) * 28), max(28, round(w / 28) * 28)
        if h_bar * w_bar > hi:
            beta = math.sqrt(h * w / hi)
            return max(28, math.floor(h / beta / 28) * 28), max(28, math.floor(w / beta / 28) * 28)
        if h_bar * w_bar < lo:
            beta = math.sqrt(lo / (h * w))
            return math.ceil(h * beta / 28) * 28, math.ceil(w * beta / 28) * 28
        return h_bar, w_bar

    h, w = smart_resize(height, width, 4 * 28 * 28, 16384 * 28 * 28)  # fetch_image
    h, w = smart_resize(h, w, budget, budget)  # the processor
    return h // 28, w // 28


def test_evaluation_grids_equal_the_authors_two_resizes_over_a_sweep_of_image_sizes(tiny_qwen):
    """1024×768 (TextVQA's common size) is 20×28 after their two resizes and 20×27 after one; the evaluation inputs
    (the family's, as `prepare_run` applies them) give their grid for every size of the sweep."""
    budget = 576 * 28 * 28
    evaluating = tiny_qwen.with_inputs(**tiny_qwen.evaluation_inputs, min_pixels=budget, max_pixels=budget)
    once = tiny_qwen.with_inputs(pad_square=False, min_pixels=budget, max_pixels=budget)
    rng = np.random.default_rng(0)
    sizes = [(1024, 768), (768, 1024), (640, 480), (800, 600), (1280, 720), (500, 375), (333, 500), (1600, 1200)]
    sizes += [tuple(int(v) for v in rng.integers(200, 2000, 2)) for _ in range(24)]
    differs = 0
    for w, h in sizes:
        image = Image.new("RGB", (w, h), (90, 120, 150))
        grid = evaluating.merged_grid(evaluating.pixel_values(image).grid_thw)
        assert grid == _authors_grid(w, h, budget), (w, h)
        differs += once.merged_grid(once.pixel_values(image).grid_thw) != grid
    assert _authors_grid(1024, 768, budget) == (20, 28)
    assert once.merged_grid(once.pixel_values(Image.new("RGB", (1024, 768))).grid_thw) == (20, 27)
    assert differs >= 3  # one resize is another protocol for a good share of sizes
