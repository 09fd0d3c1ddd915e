from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdrpn_core.infer import (
    answer_baseline,
    answer_sdrpn,
    answer_sdrpn_batch,
    crop_tokens,
    plan_for,
    run_pass1,
    run_pass2,
)
from sdrpn_core.models import LlavaAdapter
from sdrpn_core.models.tiny import TinyLlavaSpec, build_tiny_llava
from sdrpn_core.roi import RoIPlan
from sdrpn_core.rpn import RoIPredictor
from tests.conftest import random_image

G = (8, 8)
Q = "what is the digit in the red box ?"


def hand_map(*blocks):
    m = np.full(G, -8.0)
    for r0, c0, r1, c1 in blocks:
        m[r0 : r1 + 1, c0 : c1 + 1] = 8.0
    return m


PLANS = {
    "none": hand_map(),
    "box": hand_map((3, 3, 4, 4)),
    "mask": hand_map((1, 1, 2, 2), (5, 5, 6, 6)),
}


def test_baseline_matches_hf_generate(nano):
    adapter, _ = nano
    image = random_image(5, (80, 50))
    ours = answer_baseline(adapter, image, Q, max_new_tokens=6)
    x = adapter.build_inputs([image], [Q])
    with torch.no_grad():
        ref = adapter.model.generate(**x.model_kwargs(), max_new_tokens=6, do_sample=False)
    assert ours.token_ids == ref[0, x.input_ids.shape[1] :].tolist()


@pytest.mark.parametrize("branch", ["none", "box", "mask"])
def test_kv_reuse_gives_the_same_answer_as_full_recompute(nano, branch):
    adapter, rpn = nano
    image = random_image(7, (90, 60))
    plan = plan_for(adapter, PLANS[branch], 0.5)
    assert plan.kind == branch or (adapter.family == "qwen2_5_vl" and branch == "box" and plan.kind == "mask")
    answers = []
    for reuse in (True, False):
        p1 = run_pass1(adapter, rpn, image, Q, reuse_kv=reuse)
        tokens, roi = run_pass2(adapter, p1, plan, max_new_tokens=8)
        answers.append((tokens, roi.n_crop_tokens, roi.pixel_boxes))
    assert answers[0] == answers[1]
    n_crop = adapter.encode_crop(image.crop(answers[0][2][0]))[0].shape[0] if answers[0][2] else 0
    markers = 2 if adapter.family == "qwen2_5_vl" else 0  # Qwen's crop block has its own <vs> … <ve>
    if branch == "box":
        assert answers[0][1] == n_crop + markers  # all crop tokens kept
    if branch == "mask":
        assert markers < answers[0][1] < n_crop + markers


@pytest.mark.parametrize("branch", ["none", "box", "mask"])
def test_reuse_keeps_every_step_logits_close_through_run_pass2(nano, branch):
    """Through the public `run_pass2`, not a re-implementation: with KV reuse, every decoding step's logits equal
    the full recompute's to 2e-5 (float32; the two differ only in summation order). A one-position shift of the
    re-run tokens moves them by ~4e-4 without changing the argmax, so tokens alone would not show it."""
    adapter, rpn = nano
    image = random_image(8, (64, 64))
    plan = plan_for(adapter, PLANS[branch], 0.5)
    steps = {}
    for reuse in (True, False):
        steps[reuse] = []
        run_pass2(
            adapter, run_pass1(adapter, rpn, image, Q, reuse_kv=reuse), plan, max_new_tokens=4, scores=steps[reuse]
        )
    assert len(steps[True]) == len(steps[False]) >= 1
    for with_reuse, recomputed in zip(steps[True], steps[False], strict=True):
        torch.testing.assert_close(with_reuse, recomputed, atol=2e-5, rtol=0)


def test_no_roi_answers_exactly_as_the_baseline(nano):
    adapter, rpn = nano
    image = random_image(9, (70, 70))
    sd = answer_sdrpn(adapter, rpn, image, Q, threshold=0.9999, max_new_tokens=6)
    base = answer_baseline(adapter, image, Q, max_new_tokens=6)
    assert sd.roi.plan.kind == "none" and sd.token_ids == base.token_ids


def test_box_in_the_padding_falls_back_to_baseline(nano):
    adapter, _ = nano
    wide = random_image(1, (128, 32))  # content rows ≈ 3..4 of 8; rows 0..1 are padding
    plan = RoIPlan("box", ((0, 0, 8, 2),))
    crops, _, boxes, reason = crop_tokens(adapter, wide, plan, G)
    assert crops == [] and boxes == [] and "padding" in reason


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (40, 30), 128),
        Image.new("RGBA", (30, 40), (10, 200, 30, 128)),
        Image.fromarray(np.arange(36 * 24, dtype=np.uint16).reshape(24, 36) * 70),
        Image.new("RGB", (3, 2), (255, 0, 0)),
    ],
    ids=["grayscale", "rgba", "16-bit", "3x2-pixels"],
)
def test_odd_images_have_a_defined_outcome(nano, image):
    adapter, rpn = nano
    p1 = run_pass1(adapter, rpn, image, Q)
    tokens, roi = run_pass2(adapter, p1, plan_for(adapter, PLANS["box"], 0.5), max_new_tokens=3)
    assert len(tokens) == 3
    if roi.plan.kind != "none":
        (x0, y0, x1, y1) = roi.pixel_boxes[0]
        assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
    else:
        assert roi.plan.reason


def test_answer_records_timings_and_roi(nano):
    adapter, rpn = nano
    a = answer_sdrpn(adapter, rpn, random_image(2), Q, threshold=0.5, max_new_tokens=4)
    assert set(a.seconds) == {"pass1", "pass2+decode"} and a.roi.logits.shape == G


def test_llava_pass2_equals_hf_generate_on_the_written_out_two_image_sequence():
    """SD-RPN's pass 2 on LLaVA (box plan: every crop token kept, KV reuse on) against the model's own `generate`
    on the sequence written out: the original image tokens followed at once by the crop's, two pixel inputs."""
    model, processor = build_tiny_llava(TinyLlavaSpec(image_size=64, patch_size=8, seed=3))
    adapter = LlavaAdapter(model, processor)
    torch.manual_seed(0)
    rpn = RoIPredictor.from_adapter(adapter, K=2, T=2)
    image = random_image(12, (90, 60))
    plan = plan_for(adapter, PLANS["box"], 0.5, mode="box")
    tokens, roi = run_pass2(adapter, run_pass1(adapter, rpn, image, Q, reuse_kv=True), plan, max_new_tokens=6)
    (box,) = roi.pixel_boxes
    x = adapter.build_inputs([image], [Q])
    n = adapter.num_image_tokens
    cut = int(x.image_positions[0][-1]) + 1
    ids = torch.cat([x.input_ids[:, :cut], x.input_ids[:, cut - n : cut], x.input_ids[:, cut:]], dim=1)
    pixels = torch.stack([x.pixel_values[0], adapter.crop_pixel_values(image.crop(box))])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=6, do_sample=False
        )
    assert roi.n_crop_tokens == n and tokens == out[0, ids.shape[1] :].tolist()


def test_best_window_picks_the_highest_total_and_stays_on_the_grid():
    from sdrpn_core.infer import best_window

    score = np.zeros((6, 8))
    score[4, 6] = 5.0  # the 3x3 windows holding this cell: their top-left corner in rows 2..3, cols 4..5
    score[0, 0] = 4.0
    assert best_window(score, 3) == (4, 2, 7, 5)  # first in row-major order among the ties
    score[2, 4] = 1.0
    assert best_window(score, 3) == (4, 2, 7, 5)  # now the unique best: holds both
    assert best_window(score, 20) == (1, 0, 7, 6)  # the side is clamped to the short side (6): cols 1-6 hold 6.0
    assert best_window(score, 0) == (6, 4, 7, 5)  # … and to at least one cell: the single best cell


def test_vicrop_relative_attention_and_window_against_output_attentions(nano):
    """ViCrop's rel-att map from an independent computation (the model's own eager forward with
    output_attentions), and the window and crop answer_vicrop takes from it."""
    from sdrpn_core.infer import VICROP_GENERIC_PROMPT, answer_vicrop, best_window, vicrop_map

    adapter, _ = nano
    image, layer = random_image(11, (90, 60)), 1
    ratio = vicrop_map(adapter, image, Q, layer)

    def last_token_to_image(question: str) -> torch.Tensor:
        x = adapter.build_inputs([image], [question])
        attn = adapter.model.config.text_config._attn_implementation
        adapter.model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                out = adapter.model(**x.model_kwargs(), output_attentions=True)
        finally:
            adapter.model.set_attn_implementation(attn)
        return out.attentions[layer][0, :, -1, x.image_positions[0]].float().mean(0)

    expected = last_token_to_image(Q) / (last_token_to_image(VICROP_GENERIC_PROMPT) + 1e-8)
    np.testing.assert_allclose(ratio.reshape(-1), expected.numpy(), rtol=1e-4, atol=1e-6)
    ans = answer_vicrop(adapter, image, Q, layer=layer, max_new_tokens=3)
    box = best_window(ratio, round(min(ratio.shape) * 0.5))
    assert ans.roi.plan.boxes == (box,) and ans.roi.pixel_boxes == [adapter.box_to_pixels(box, image.size, ratio.shape)]


# -- written against mutation survivors (benchmarks/results/mutation.md) -------------------------------------------


def test_repetition_penalty_by_hand():
    from sdrpn_core.batched import penalised

    logits = torch.tensor([[2.0, -2.0, 0.5, 3.0]])
    out = penalised(logits, [{0, 1}], 2.0)
    assert out.tolist() == [[1.0, -4.0, 0.5, 3.0]] and logits.tolist() == [[2.0, -2.0, 0.5, 3.0]]
    assert penalised(logits, [set()], 2.0) is logits


def test_every_step_scores_text_and_penalty_match_hf_generate(nano, monkeypatch):
    """Decoding against `generate(output_scores=True)` step by step, under a repetition penalty and with an EOS
    that ends the answer early: positions of the new tokens, the penalty over prompt and answer, the stop rule and
    the answer text (EOS dropped) all show here; tokens alone would not."""
    adapter, rpn = nano
    image = random_image(5, (80, 50))
    config = adapter.model.generation_config
    monkeypatch.setattr(config, "repetition_penalty", 1.3)
    free = answer_baseline(adapter, image, Q, max_new_tokens=6).token_ids
    stop = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    monkeypatch.setattr(config, "eos_token_id", stop)
    x = adapter.build_inputs([image], [Q])
    with torch.no_grad():
        ref = adapter.model.generate(
            **x.model_kwargs(), max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    ref_tokens = ref.sequences[0, x.input_ids.shape[1] :].tolist()
    assert ref_tokens[-1] == stop and len(ref_tokens) < 6
    steps: list[torch.Tensor] = []
    tokens, _ = run_pass2(adapter, run_pass1(adapter, rpn, image, Q), plan_for(adapter, PLANS["none"], 0.5), 6, steps)
    assert tokens == ref_tokens and len(steps) == len(ref.scores)
    for ours, theirs in zip(steps, ref.scores, strict=True):
        torch.testing.assert_close(ours, theirs[0].float(), atol=1e-4, rtol=1e-4)
    base = answer_baseline(adapter, image, Q, max_new_tokens=6)
    assert base.token_ids == ref_tokens and base.text == adapter.decode(ref_tokens[:-1])
    assert base.text != adapter.decode([stop])


def test_baseline_prefill_is_causal_under_the_eager_kernel(nano):
    adapter, _ = nano
    image = random_image(6, (60, 80))
    x = adapter.build_inputs([image], [Q])
    previous = adapter.model.config.text_config._attn_implementation
    adapter.model.set_attn_implementation({"text_config": "eager"})
    try:
        ours = answer_baseline(adapter, image, Q, max_new_tokens=5).token_ids
        with torch.no_grad():
            ref = adapter.model.generate(**x.model_kwargs(), max_new_tokens=5, do_sample=False)
    finally:
        adapter.model.set_attn_implementation({"text_config": previous})
    assert ours == ref[0, x.input_ids.shape[1] :].tolist()


def test_default_answer_length_and_sdrpn_defaults(nano, monkeypatch):
    """Without an EOS in reach every answer runs to the default 128 tokens; SD-RPN's defaults are τ 0.15, mask."""
    from sdrpn_core.infer import answer_vicrop, answer_with_boxes

    adapter, rpn = nano
    monkeypatch.setattr(adapter.model.generation_config, "eos_token_id", 10**6)
    image = random_image(3, (64, 48))
    assert len(answer_baseline(adapter, image, Q).token_ids) == 128
    assert len(answer_with_boxes(adapter, image, Q, []).token_ids) == 128
    assert len(answer_vicrop(adapter, image, Q, layer=1).token_ids) == 128
    default = answer_sdrpn(adapter, rpn, image, Q)
    explicit = answer_sdrpn(adapter, rpn, image, Q, threshold=0.15, mode="mask", max_new_tokens=128)
    (batch,) = answer_sdrpn_batch(adapter, rpn, [image], [Q])  # the batch function's own defaults are the same
    assert batch.token_ids == explicit.token_ids and batch.roi.plan.boxes == explicit.roi.plan.boxes
    assert default.token_ids == explicit.token_ids and len(default.token_ids) == 128
    assert default.roi.plan.boxes == explicit.roi.plan.boxes and default.roi.plan.kind != "none"
    with pytest.raises(ValueError, match=r"RoI mode 'bxo': choose 'mask' or 'box'"):
        answer_sdrpn(adapter, rpn, image, Q, mode="bxo")


def test_vicrop_outcome_fields(nano, monkeypatch):
    from sdrpn_core import infer
    from sdrpn_core.infer import answer_vicrop

    adapter, _ = nano
    image = random_image(11, (90, 60))
    a = answer_vicrop(adapter, image, Q, layer=1, max_new_tokens=3)
    ratio = a.roi.logits
    assert a.roi.plan.kind == "box" and a.roi.n_crop_tokens == -1 and len(a.roi.pixel_boxes) == 1
    np.testing.assert_allclose(a.roi.plan.prob, ratio / ratio.max())
    np.testing.assert_allclose(ratio, infer.vicrop_map(adapter, image, Q, 1))
    assert set(a.seconds) == {"total"} and 0 < a.seconds["total"] < 60
    with_box = infer.answer_with_boxes(adapter, image, Q, a.roi.pixel_boxes, 3)
    assert a.token_ids == with_box.token_ids
    monkeypatch.setattr(adapter, "box_to_pixels", lambda *args: None)  # the window fell in the padding
    b = answer_vicrop(adapter, image, Q, layer=1, max_new_tokens=3)
    assert b.roi.plan.kind == "none" and b.roi.pixel_boxes == [] and b.roi.n_crop_tokens == 0
    assert b.token_ids == answer_baseline(adapter, image, Q, max_new_tokens=3).token_ids


def test_vicrop_batch_defaults_rows_and_time_share(nano, monkeypatch):
    """The batch function's own answer limit is the others' 128; images and questions must pair up; each answer's
    time is its share of the batch's (mutation survivors)."""
    import time

    from sdrpn_core.infer import answer_vicrop_batch

    adapter, _ = nano
    images = [random_image(5, (64, 48)), random_image(6, (48, 64))]
    with pytest.raises(ValueError):
        answer_vicrop_batch(adapter, images, [Q], layer=1, max_new_tokens=2)
    t0 = time.perf_counter()
    (one,) = answer_vicrop_batch(adapter, images[:1], [Q], layer=1, max_new_tokens=2)
    wall = time.perf_counter() - t0
    assert 0.5 * wall <= one.seconds["total"] <= wall
    t0 = time.perf_counter()
    two = answer_vicrop_batch(adapter, images, [Q, Q], layer=1, max_new_tokens=2)
    assert sum(a.seconds["total"] for a in two) <= time.perf_counter() - t0
    monkeypatch.setattr(adapter.model.generation_config, "eos_token_id", 10**6)
    assert len(answer_vicrop_batch(adapter, images[:1], [Q], layer=1)[0].token_ids) == 128


def test_single_row_wrappers_pass_their_settings_on(nano, monkeypatch):
    """run_pass1 keeps the cache pass 2 reuses unless told not to; run_pass2 answers up to 128 tokens by default;
    answer_vicrop's window size reaches the window (mutation survivors)."""
    from sdrpn_core.infer import answer_vicrop, run_pass1, run_pass2

    adapter, rpn = nano
    image = random_image(8, (64, 48))
    assert run_pass1(adapter, rpn, image, Q).cache is not None
    assert run_pass1(adapter, rpn, image, Q, reuse_kv=False).cache is None
    p1 = run_pass1(adapter, rpn, image, Q)
    monkeypatch.setattr(adapter.model.generation_config, "eos_token_id", 10**6)
    assert len(run_pass2(adapter, p1, RoIPlan("none", reason="none"))[0]) == 128
    small, default = (
        answer_vicrop(adapter, image, Q, layer=1, max_new_tokens=1, **kw) for kw in ({"window_frac": 0.25}, {})
    )
    (y0, x0, y1, x1), (Y0, X0, Y1, X1) = small.roi.plan.boxes[0], default.roi.plan.boxes[0]
    assert (y1 - y0, x1 - x0) < (Y1 - Y0, X1 - X0)


def test_second_round_of_survivors(nano):
    from sdrpn_core.infer import best_window

    adapter, rpn = nano
    image = random_image(4, (64, 64))
    none = RoIPlan("none", reason="no component above τ")
    assert crop_tokens(adapter, image, none, G) == ([], [], [], "no component above τ")
    assert crop_tokens(adapter, image, plan_for(adapter, PLANS["box"], 0.5), G)[3] == ""
    assert crop_tokens(adapter, image, plan_for(adapter, PLANS["mask"], 0.5), G)[3] == ""
    two = plan_for(adapter, PLANS["mask"], 0.5, mode="box")
    assert two.kind == ("mask" if adapter.family == "qwen2_5_vl" else "box") and (
        adapter.family == "qwen2_5_vl" or len(two.boxes) == 2
    )
    a = answer_sdrpn(adapter, rpn, image, Q, threshold=0.5, max_new_tokens=2)
    assert all(0 <= v < 60 for v in a.seconds.values())
    tall = np.zeros((8, 6))
    tall[7, 5] = 1.0
    assert best_window(tall, 20) == (0, 2, 6, 8)  # the side is clamped to the width, 6


def test_bf16_logits_are_penalised_and_compared_in_fp32_as_generate_does(nano, monkeypatch):
    """Two tokens both in the prompt, bf16 logits 17.0 and 17.125, penalty 1.05: in bf16 both become 16.25 and the
    argmax takes the first; `generate` casts to fp32 first (16.19 < 16.31) and takes the second. The reference is
    HF's own repetition-penalty processor on the fp32 logits, as `generate` runs it."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from sdrpn_core.batched import Packed, greedy

    adapter, _ = nano
    monkeypatch.setattr(adapter.model.generation_config, "repetition_penalty", 1.05)
    vocab = adapter.model.config.get_text_config().vocab_size
    a, b = 5, 9  # two ordinary tokens, neither an EOS
    logits = torch.full((1, vocab), -30.0, dtype=torch.bfloat16)
    logits[0, a], logits[0, b] = 17.0, 17.125
    prompt = torch.tensor([1, a, b, 2])
    penalised_bf16 = logits.clone()
    penalised_bf16[0, [a, b]] = logits[0, [a, b]] / 1.05
    assert penalised_bf16[0, a] == penalised_bf16[0, b]  # the tie the bf16 path would break towards `a`
    reference = RepetitionPenaltyLogitsProcessor(1.05)(prompt[None], logits.float()).argmax(-1).item()
    packed = Packed(torch.zeros(1, 4, 8), torch.arange(4)[None], torch.ones(1, 4, dtype=torch.long))
    (tokens,) = greedy(adapter, None, logits.clone(), packed, 1, [prompt])
    assert reference == b and tokens == [b]


def test_the_best_window_never_leaves_the_map_whatever_the_scores():
    """Totals from a cumulative sum: a window of negative scores next to the edge must not lose to a window that
    hangs over it."""
    from sdrpn_core.infer import best_window

    rows = np.array([[0.0, 0.0], [-10.0, -10.0], [5.0, 5.0]])
    assert best_window(rows, 2) == (0, 1, 2, 3)
    assert best_window(rows.T.copy(), 2) == (1, 0, 3, 2)


def test_vicrop_refuses_images_and_questions_that_do_not_pair(tiny_llava):
    from sdrpn_core.infer import answer_vicrop_batch

    with pytest.raises(ValueError, match="zip"):
        answer_vicrop_batch(tiny_llava, [random_image(0), random_image(1)], ["q ?"], layer=1, max_new_tokens=1)


def test_vicrops_map_is_scaled_to_one_whatever_its_range(tiny_llava, monkeypatch):
    """A relative-attention map below 1 everywhere (the question looked at the image less than the generic
    prompt did) is still shown on the 0..1 scale."""
    import sdrpn_core.infer as infer

    monkeypatch.setattr(infer, "vicrop_map", lambda *a: np.full(tiny_llava.grid, 0.25))
    answer = infer.answer_vicrop_batch(tiny_llava, [random_image(0)], ["q ?"], layer=1, max_new_tokens=1)[0]
    assert answer.roi.plan.prob.max() == 1.0 and answer.roi.plan.kind == "box"


def test_a_roi_in_the_square_padding_crops_nothing_and_says_why(nano):
    adapter, rpn = nano
    if not adapter.pads_to_square:
        pytest.skip("only a padded square has an outside")
    image = random_image(3, (96, 24))  # a 4:1 strip: the square's top and bottom rows are padding
    plan = plan_for(adapter, hand_map((0, 2, 1, 5)), 0.5)
    assert plan.kind != "none", plan.reason
    for reuse in (True, False):
        tokens, roi = run_pass2(adapter, run_pass1(adapter, rpn, image, Q, reuse_kv=reuse), plan, max_new_tokens=3)
        assert (roi.plan.kind, roi.pixel_boxes, roi.n_crop_tokens) == ("none", [], 0)
        assert roi.plan.reason == "RoI lies in the square padding, outside the image" and roi.plan.prob is plan.prob
        assert tokens == answer_baseline(adapter, image, Q, max_new_tokens=3).token_ids  # nothing inserted


def test_each_row_of_a_batch_is_charged_an_equal_share_of_its_time(tiny_llava):
    from sdrpn_core.infer import answers_of

    two = answers_of(tiny_llava, [[5], [6]], {"pass1": 1.0, "pass2": 4.0})
    assert [a.seconds for a in two] == [{"pass1": 0.5, "pass2": 2.0}] * 2
    assert answers_of(tiny_llava, [[5]], {"pass2": 4.0})[0].seconds == {"pass2": 4.0}
