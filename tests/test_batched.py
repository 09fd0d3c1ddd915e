"""Batched answering gives every row the answer it gets alone, for both families and on every RoI branch:
images of different sizes (different padding, Qwen's different image-token counts), a mixed batch of plans
(no crop / box / mask) with and without KV reuse, Qwen's high-resolution pruning, a row stopping early at EOS,
the repetition penalty, and ViCrop and the oracle crop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sdrpn_core import infer
from sdrpn_core.infer import (
    answer_baseline,
    answer_baseline_batch,
    answer_sdrpn,
    answer_sdrpn_batch,
    answer_vicrop,
    answer_vicrop_batch,
    answer_with_boxes,
    answer_with_boxes_batch,
    plan_for,
    run_pass1,
    run_pass1_batch,
    run_pass2,
    run_pass2_batch,
)
from tests.conftest import random_image
from tests.test_infer import PLANS, Q

QUESTIONS = [Q, "how many boxes are there ?", "what colour is the box on the left of the red one ?", "digit ?"]
SIZES = [(90, 60), (64, 64), (50, 120), (200, 80)]


def _rows(n: int = 4):
    return [random_image(20 + i, SIZES[i % len(SIZES)]) for i in range(n)], QUESTIONS[:n]


def test_baseline_batch_equals_batch_1(nano):
    adapter, _ = nano
    images, questions = _rows()
    batch = answer_baseline_batch(adapter, images, questions, max_new_tokens=6)
    alone = [answer_baseline(adapter, im, q, max_new_tokens=6) for im, q in zip(images, questions, strict=True)]
    assert [a.token_ids for a in batch] == [a.token_ids for a in alone]
    assert [a.text for a in batch] == [a.text for a in alone]


@pytest.mark.parametrize("reuse", [True, False])
def test_a_mixed_batch_of_plans_equals_each_row_alone(nano, reuse):
    """Rows with no crop, a box and a mask in one pass-2 batch (ragged crop-token counts)."""
    adapter, rpn = nano
    images, questions = _rows()
    plans = [plan_for(adapter, PLANS[b], 0.5) for b in ("none", "box", "mask", "box")]
    p1s = run_pass1_batch(adapter, rpn, images, questions, reuse_kv=reuse)
    batch = run_pass2_batch(adapter, p1s, plans, max_new_tokens=6)
    for i, (image, question) in enumerate(zip(images, questions, strict=True)):
        p1 = run_pass1(adapter, rpn, image, question, reuse_kv=reuse)
        np.testing.assert_allclose(p1s[i].logits_map, p1.logits_map, rtol=1e-4, atol=1e-5)
        tokens, roi = run_pass2(adapter, p1, plans[i], max_new_tokens=6)
        assert batch[i][0] == tokens, i
        assert (batch[i][1].n_crop_tokens, batch[i][1].pixel_boxes) == (roi.n_crop_tokens, roi.pixel_boxes)
    assert batch[0][1].n_crop_tokens == 0 and len({r.n_crop_tokens for _, r in batch}) > 1


@pytest.mark.parametrize("mode", ["box", "mask"])
def test_sdrpn_batch_equals_batch_1(nano, mode):
    adapter, rpn = nano
    images, questions = _rows()
    kwargs = {"threshold": 0.5, "mode": mode, "max_new_tokens": 5}
    batch = answer_sdrpn_batch(adapter, rpn, images, questions, **kwargs)
    alone = [answer_sdrpn(adapter, rpn, im, q, **kwargs) for im, q in zip(images, questions, strict=True)]
    assert [a.token_ids for a in batch] == [a.token_ids for a in alone]
    assert [a.roi.pixel_boxes for a in batch] == [a.roi.pixel_boxes for a in alone]
    assert set(batch[0].seconds) == {"pass1", "pass2+decode"}


def test_qwen_pruned_rows_in_a_batch_equal_each_row_alone(nano, monkeypatch):
    adapter, rpn = nano
    if not adapter.prunes_image_tokens:
        pytest.skip("LLaVA never prunes its image tokens")
    monkeypatch.setattr(infer, "PRUNE_ABOVE", 8)  # the tiny grids stand for > 1024 image tokens
    images, questions = _rows(3)
    for cut in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999):  # a score cut that drops some tokens, not all
        monkeypatch.setattr(infer, "PRUNE_SCORE", cut)
        p1s = run_pass1_batch(adapter, rpn, images, questions)
        if any(0 < p.image_keep.sum() < p.image_keep.size for p in p1s):
            break
    assert any(not p.image_keep.all() for p in p1s)
    plans = [plan_for(adapter, PLANS["box"], 0.5)] * 3
    batch = run_pass2_batch(adapter, p1s, plans, max_new_tokens=5)
    for i, (image, question) in enumerate(zip(images, questions, strict=True)):
        p1 = run_pass1(adapter, rpn, image, question)
        np.testing.assert_array_equal(p1.image_keep, p1s[i].image_keep)
        assert batch[i][0] == run_pass2(adapter, p1, plans[i], max_new_tokens=5)[0]


def test_a_row_that_stops_early_and_the_repetition_penalty(nano, monkeypatch):
    """A token one row emits early is made an EOS id: that row stops there while another goes on, as alone."""
    adapter, _ = nano
    images, questions = _rows()
    config = adapter.model.generation_config
    monkeypatch.setattr(config, "repetition_penalty", 1.3)
    seqs = [
        answer_baseline(adapter, im, q, max_new_tokens=6).token_ids for im, q in zip(images, questions, strict=True)
    ]

    def stop(seq, token):  # the answer's length were `token` an EOS id
        return seq.index(token) + 1 if token in seq else len(seq)

    candidates = [t for seq in seqs for t in seq[1:]]
    eos = next(t for t in candidates if len({stop(seq, t) for seq in seqs}) > 1)
    monkeypatch.setattr(config, "eos_token_id", eos)
    batch = answer_baseline_batch(adapter, images, questions, max_new_tokens=6)
    alone = [answer_baseline(adapter, im, q, max_new_tokens=6) for im, q in zip(images, questions, strict=True)]
    assert [a.token_ids for a in batch] == [a.token_ids for a in alone]
    lengths = [len(a.token_ids) for a in batch]
    assert lengths == [stop(seq, eos) for seq in seqs] and min(lengths) < max(lengths), lengths


def test_vicrop_and_oracle_batches_equal_batch_1(nano):
    adapter, _ = nano
    images, questions = _rows(3)
    boxes = [[(0, 0, 30, 30)], [], [(10, 5, 40, 60), (0, 0, 20, 20)]]
    batch = answer_with_boxes_batch(adapter, images, questions, boxes, max_new_tokens=5)
    alone = [answer_with_boxes(adapter, im, q, b, 5) for im, q, b in zip(images, questions, boxes, strict=True)]
    assert [a.token_ids for a in batch] == [a.token_ids for a in alone]
    vic = answer_vicrop_batch(adapter, images, questions, layer=1, max_new_tokens=5)
    vic1 = [answer_vicrop(adapter, im, q, layer=1, max_new_tokens=5) for im, q in zip(images, questions, strict=True)]
    assert [a.token_ids for a in vic] == [a.token_ids for a in vic1]
    assert [a.roi.pixel_boxes for a in vic] == [a.roi.pixel_boxes for a in vic1]


def test_a_collated_row_is_that_row_collated_alone(nano):
    """`collated_row` slices the batch (no second tokenisation); it must be exactly what `collate` gives one row:
    ids, mask, its own pixels (Qwen's packed patches of different counts), positions, grid and extras."""
    adapter, _ = nano
    images, questions = _rows()
    pixels = [adapter.pixel_values(im) for im in images]
    x = adapter.collate(pixels, questions)
    for i in range(len(images)):
        start = x.input_ids.shape[1] - int(x.attention_mask[i].sum())
        row, alone = adapter.collated_row(x, i, start), adapter.collate([pixels[i]], [questions[i]])
        for name in ("input_ids", "attention_mask", "pixel_values"):
            assert torch.equal(getattr(row, name), getattr(alone, name)), (i, name)
        assert [p.tolist() for p in row.image_positions] == [p.tolist() for p in alone.image_positions]
        assert row.grids == alone.grids and row.extra.keys() == alone.extra.keys()
        for key in alone.extra:
            assert torch.equal(row.extra[key], alone.extra[key]), (i, key)
    assert len({int(m.sum()) for m in x.attention_mask}) > 1  # the rows really were padded differently


def test_preprocessed_images_give_the_same_answers(nano, tmp_path):
    """Evaluation hands the methods images decoded and processed ahead (`preprocess`); answers are the same as from
    the files, and an image processed for another adapter's inputs is processed again, not reused."""
    adapter, rpn = nano
    images, questions = _rows(3)
    paths = []
    for k, im in enumerate(images):
        im.save(tmp_path / f"{k}.png")
        paths.append(str(tmp_path / f"{k}.png"))
    ready = [infer.preprocess(adapter, p) for p in paths]
    kwargs = {"threshold": 0.5, "mode": "box", "max_new_tokens": 5}
    from_files = answer_sdrpn_batch(adapter, rpn, paths, questions, **kwargs)
    assert [a.token_ids for a in answer_sdrpn_batch(adapter, rpn, ready, questions, **kwargs)] == [
        a.token_ids for a in from_files
    ]
    vic = answer_vicrop_batch(adapter, ready, questions, layer=1, max_new_tokens=5)
    assert [a.token_ids for a in vic] == [
        a.token_ids for a in answer_vicrop_batch(adapter, paths, questions, layer=1, max_new_tokens=5)
    ]
    other = copy.copy(adapter)
    again = infer.preprocess(other, ready[0])
    assert again.adapter is other and again is not ready[0] and again.image is ready[0].image
