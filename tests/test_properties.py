"""Property-based tests (hypothesis) for the rules with many branches: RoI plans and crops, pseudo-labels, metrics,
fingerprints. Each property holds for every input the strategies can draw; hypothesis shrinks a failure to its
smallest case."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from sdrpn_core.metrics import anls, levenshtein, relaxed_accuracy, vqa_accuracy
from sdrpn_core.pseudo_labels import BACKGROUND, FOREGROUND, IGNORE, make_pseudo_labels_with_stats
from sdrpn_core.roi import component_boxes, grid_box_to_pixels, plan_roi, plan_roi_union
from storage.fingerprint import hash_obj

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)  # the same examples on every CI run
grids = st.tuples(st.integers(3, 16), st.integers(3, 16))


@st.composite
def logit_maps(draw):
    h, w = draw(grids)
    blobs = draw(
        st.lists(
            st.tuples(st.integers(0, h - 1), st.integers(0, w - 1), st.integers(1, 5), st.integers(1, 5)), max_size=4
        )
    )
    m = np.full((h, w), draw(st.floats(-9, -2)))
    for r, c, bh, bw in blobs:
        m[r : r + bh, c : c + bw] = draw(st.floats(-1, 9))
    return m


@SETTINGS
@given(logit_maps(), st.floats(0.01, 0.99), st.sampled_from(["mask", "box"]))
def test_roi_plan_boxes_lie_in_the_grid_and_hold_cells_above_tau(logits, tau, mode):
    h, w = logits.shape
    plan = plan_roi(logits, (h, w), tau, mode)
    assert plan.kind in ("none", "box", "mask")
    binary = plan.prob > tau if plan.prob is not None else np.zeros((h, w), bool)
    if plan.kind == "none":
        assert not plan.boxes and plan.reason
        return
    assert 1 <= len(plan.boxes) <= 2 or (plan.kind == "box" and mode == "mask" and len(plan.boxes) == 1)
    for x0, y0, x1, y1 in plan.boxes:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert binary[y0 : y1 + 1, x0 : x1 + 1].sum() >= 2  # never a box around a lone cell
    if plan.kind == "mask":  # the union box of every cell above τ, and the keep-mask is exactly those cells
        ((x0, y0, x1, y1),) = plan.boxes
        ys, xs = np.nonzero(binary)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert np.array_equal(plan.region, binary[y0:y1, x0:x1])


@SETTINGS
@given(arrays(bool, st.tuples(st.integers(3, 14), st.integers(3, 14))))
def test_components_one_box_per_component_of_2_to_225_cells_each_covering_it(binary):
    h, w = binary.shape
    labelled, n = ndimage.label(binary, structure=np.ones((3, 3), int))
    sizes = [int((labelled == i).sum()) for i in range(1, n + 1)]
    boxes = component_boxes(binary, min_area=4, max_area=225)
    assert len(boxes) == sum(2 <= s <= 225 for s in sizes)
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    kept = [i + 1 for i, s in enumerate(sizes) if 2 <= s <= 225]
    for i, (x0, y0, x1, y1) in zip(kept, boxes, strict=True):
        ys, xs = np.nonzero(labelled == i)
        if sizes[i - 1] >= 4:  # large components: the tight box (exclusive upper corner)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        else:  # small ones grow to ≥ 3 cells around their centre; the authors clamp the (exclusive) upper corner
            # to the last index, so at the right / bottom border the box loses that last column / row
            assert x0 <= xs.min() and y0 <= ys.min()
            assert x1 >= min(xs.max() + 1, w - 1) and y1 >= min(ys.max() + 1, h - 1)
            xc, yc = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2  # int() truncation: ≥ 2 cells
            assert x1 - x0 >= min(2, w - 1 - int(xc - 1.5)) and y1 - y0 >= min(2, h - 1 - int(yc - 1.5))


@SETTINGS
@given(logit_maps(), st.floats(0.01, 0.99))
def test_qwen_union_plan_is_the_box_of_every_cell_above_tau(logits, tau):
    h, w = logits.shape
    plan = plan_roi_union(logits, (h, w), tau)
    binary = plan.prob > tau
    assert (plan.kind == "none") == (not binary.any())
    if plan.kind == "mask":
        ((x0, y0, x1, y1),) = plan.boxes
        assert binary.sum() == plan.region.sum() and np.array_equal(plan.region, binary[y0:y1, x0:x1])


@SETTINGS
@given(
    st.tuples(st.integers(1, 3000), st.integers(1, 3000)),
    st.integers(0, 23),
    st.integers(0, 23),
    st.integers(1, 24),
    st.integers(1, 24),
)
def test_grid_boxes_map_inside_the_image_with_at_least_one_pixel(size, x0, y0, bw, bh):
    box = (x0, y0, min(24, x0 + bw), min(24, y0 + bh))
    px = grid_box_to_pixels(box, size, (24, 24), 336)
    if px is not None:
        a, b, c, d = px
        assert 0 <= a < c <= size[0] and 0 <= b < d <= size[1]


@st.composite
def attention_maps(draw):
    h, w = draw(grids)
    attention = st.floats(0, 1).map(lambda v: v if v > 1e-300 else 0.0)  # no values whose products underflow
    grounding = draw(arrays(np.float64, h * w, elements=attention))
    sink = draw(arrays(np.float64, h * w, elements=st.floats(0, 2e-3)))
    return (h, w), grounding, sink


@SETTINGS
@given(attention_maps(), st.floats(0.05, 0.95), st.floats(0.01, 0.5), st.sampled_from(["llava", "qwen"]))
def test_pseudo_labels_counts_box_and_ignore_rule(maps, fg_ratio, bg_ratio, variant):
    (h, w), grounding, sink = maps
    labels, st_ = make_pseudo_labels_with_stats(
        grounding, sink, (h, w), 1e-3, fg_ratio, bg_ratio, 0.5, variant=variant, image_size=(w * 10, h * 10)
    )
    n = h * w
    assert set(np.unique(labels)) <= {FOREGROUND, BACKGROUND, IGNORE}
    assert st_.num_fg + st_.num_bg + st_.num_ignore == n
    if not st_.valid:  # an invalid sample is ignored as a whole
        assert st_.reason and np.all(labels == IGNORE)
        return
    r0, c0, r1, c1 = st_.box
    grid = labels.reshape(h, w)
    inside = np.zeros((h, w), bool)
    inside[r0 : r1 + 1, c0 : c1 + 1] = True
    assert st_.num_fg > 0 and np.all(inside[grid == FOREGROUND])  # foreground lies in the box
    assert np.all(~inside[grid == BACKGROUND])  # background outside it (no padding cells on a square image)
    assert not np.any((sink >= 1e-3) & (labels == FOREGROUND))  # a sink is never foreground
    if variant == "llava":  # the rules are relative to the map's max: scaling the map (by 4: exact in binary
        # floating point, so no comparison can flip by rounding) changes nothing
        scaled, _ = make_pseudo_labels_with_stats(4.0 * grounding, sink, (h, w), 1e-3, fg_ratio, bg_ratio, 0.5)
        assert np.array_equal(scaled, labels)


texts = st.text(alphabet="abc 12.%-", max_size=12)


@SETTINGS
@given(texts, texts)
def test_anls_is_bounded_symmetric_and_one_on_the_answer(a, b):
    assert 0.0 <= anls(a, [b]) <= 1.0
    assert anls(a, [b]) == anls(b, [a])
    assert anls(a, [a]) == 1.0
    assert anls(a, [b, a]) == 1.0  # the best reference counts
    assert levenshtein(a, b) == levenshtein(b, a) <= max(len(a), len(b))


@SETTINGS
@given(texts, st.lists(texts, min_size=1, max_size=10))
def test_vqa_and_relaxed_accuracy_are_bounded(prediction, answers):
    assert 0.0 <= vqa_accuracy(prediction, answers) <= 1.0
    assert relaxed_accuracy(prediction, answers) in (0.0, 1.0)
    assert vqa_accuracy(answers[0], [answers[0]] * 10) == 1.0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@SETTINGS
@given(st.dictionaries(st.text(max_size=5), json_values, min_size=1, max_size=5), st.randoms())
def test_fingerprints_ignore_key_order_and_see_every_value(obj, rnd):
    items = list(obj.items())
    rnd.shuffle(items)
    assert hash_obj(dict(items)) == hash_obj(obj)
    key = rnd.choice(list(obj))
    assert hash_obj({**obj, key: [obj[key]]}) != hash_obj(obj)  # any change of a value changes the hash
    assert hash_obj({**obj, f"{key}_extra": 0}) != hash_obj(obj)
