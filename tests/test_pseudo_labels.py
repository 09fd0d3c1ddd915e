"""Hand-made maps for every rule of the authors' label code (docs/method.md §3.5)."""

from __future__ import annotations

import numpy as np
import pytest

from sdrpn_core.pseudo_labels import (
    hidden_norm_sinks,
    make_pseudo_labels,
    make_pseudo_labels_with_stats,
    padding_mask,
)

G = (8, 8)


def grid_map(cells: dict[tuple[int, int], float], base: float = 0.0) -> np.ndarray:
    m = np.full(G, base)
    for (r, c), v in cells.items():
        m[r, c] = v
    return m.reshape(-1)


def label_at(labels, r, c):
    return labels.reshape(G)[r, c]


def test_foreground_is_strictly_above_fg_ratio_of_max():
    a = grid_map({(2, 2): 1.0, (2, 3): 0.2, (3, 2): 0.2000001})
    lab = make_pseudo_labels(a, None, grid=G)
    assert label_at(lab, 2, 2) == 1
    assert label_at(lab, 2, 3) != 1  # exactly 0.2·max is not foreground (strict >)
    assert label_at(lab, 3, 2) == 1


def test_background_is_outside_box_and_strictly_below_bg_ratio():
    a = grid_map({(2, 2): 1.0, (3, 3): 0.5, (6, 6): 0.1, (6, 7): 0.0999, (0, 7): 0.15})
    lab = make_pseudo_labels(a, None, grid=G)
    # box is rows 2..3, cols 2..3; the non-FG cell inside it is ignored
    assert label_at(lab, 2, 3) == -100 and label_at(lab, 3, 2) == -100
    assert label_at(lab, 6, 6) == -100  # exactly 0.1·max is not background (strict <)
    assert label_at(lab, 6, 7) == 0
    assert label_at(lab, 0, 7) == -100  # between 0.1 and 0.2 of max, outside the box: ignored
    assert label_at(lab, 7, 0) == 0


def test_sinks_are_zeroed_so_a_sink_outside_the_box_becomes_background():
    a = grid_map({(1, 1): 0.5, (6, 6): 5.0})  # (6,6) is the strongest cell but is a sink
    s = grid_map({(6, 6): 2e-3, (1, 2): 1e-3})  # (1,2) exactly at τ_sink is a sink too (≥)
    lab, st = make_pseudo_labels_with_stats(a, s, grid=G, sink_thresh=1e-3)
    assert label_at(lab, 1, 1) == 1
    assert label_at(lab, 6, 6) == 0
    assert st.num_sink == 2 and st.max_attn == pytest.approx(0.5)


def test_box_at_or_above_max_frac_ignores_the_whole_sample():
    a = grid_map({(0, 0): 1.0, (7, 3): 1.0})  # box 8 rows × 4 cols = 32 = 0.5 · 64
    lab, st = make_pseudo_labels_with_stats(a, None, grid=G, max_box_frac=0.5)
    assert (lab == -100).all() and not st.valid and st.reason == "foreground box too large"
    b = grid_map({(0, 0): 1.0, (6, 3): 1.0})  # 7 × 4 = 28 < 32: valid
    assert make_pseudo_labels_with_stats(b, None, grid=G)[1].valid


def test_empty_foreground_ignores_everything():
    lab, st = make_pseudo_labels_with_stats(np.zeros(64), None, grid=G)
    assert (lab == -100).all() and st.reason == "no foreground"
    only_sinks = grid_map({(3, 3): 1.0})
    lab2, st2 = make_pseudo_labels_with_stats(only_sinks, only_sinks, grid=G)
    assert (lab2 == -100).all() and st2.reason == "no foreground"


def test_counts_add_up_and_match_labels():
    rng = np.random.default_rng(0)
    a = rng.random(64) ** 8
    lab, st = make_pseudo_labels_with_stats(a, None, grid=G)
    assert st.num_fg + st.num_bg + st.num_ignore == 64
    assert st.num_fg == (lab == 1).sum() and st.num_bg == (lab == 0).sum()
    assert lab.dtype.kind == "i" and set(np.unique(lab)) <= {-100, 0, 1}


def test_default_grid_is_24x24():
    a = np.zeros(576)
    a[100] = 1.0
    lab = make_pseudo_labels(a, np.zeros(576))
    assert lab.shape == (576,) and lab[100] == 1 and (lab == 0).sum() == 575


@pytest.mark.parametrize(
    ("bad", "match"),
    [(np.zeros(63), "63 values"), (np.full(64, np.nan), "NaN"), (-np.ones(64), "negative")],
)
def test_bad_maps_raise_value_error_naming_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        make_pseudo_labels(bad, None, grid=G)
    with pytest.raises(ValueError, match="sink map"):
        make_pseudo_labels(np.ones(64), bad, grid=G)


def test_padding_mask_matches_authors_truncation():
    # 40×20 image on an 8×8 grid: content 8 wide, int(20/40·8)=4 tall, rows 2..5
    pad = padding_mask((40, 20), G).reshape(G)
    assert pad[:2].all() and pad[6:].all() and not pad[2:6].any()
    # 20×40: content cols 2..5
    pad = padding_mask((20, 40), G).reshape(G)
    assert pad[:, :2].all() and pad[:, 6:].all() and not pad[:, 2:6].any()
    # 30×10 on 8: int(10/30·8)=2 rows; (8-2)//2=3 → rows 3..4, ceil keeps the extent at 2
    pad = padding_mask((30, 10), G).reshape(G)
    assert not pad[3:5].any() and pad[:3].all() and pad[5:].all()
    assert not padding_mask((16, 16), G).any()
    # Qwen without square padding: the grid follows the aspect, nothing is padding
    assert padding_mask((40, 20), (4, 8)).shape == (32,) and not padding_mask((40, 20), (4, 8)).any()


def test_qwen_variant_padding_forced_background_and_dilated_box():
    a = grid_map({(3, 3): 1.0, (3, 4): 0.5, (0, 0): 0.9}, base=0.05)  # (0,0) lies in the padding
    s = np.zeros(64)
    lab, st = make_pseudo_labels_with_stats(a, s, grid=G, sink_thresh=1e-2, variant="qwen", image_size=(40, 20))
    pad = padding_mask((40, 20), G)
    assert (lab[pad] == 0).all()  # padding: background, never foreground, even though (0,0) is strong
    assert label_at(lab, 3, 3) == 1 and label_at(lab, 3, 4) == 1
    assert st.box == (2, 2, 4, 5)  # FG box rows 3..3, cols 3..4 grown by one cell on each side by the blur
    assert label_at(lab, 4, 5) == -100  # inside the dilated box, not FG: ignored (LLaVA rules would say BG)
    llava = make_pseudo_labels(a, s, grid=G, sink_thresh=1e-2)
    assert label_at(llava, 4, 5) == 0  # LLaVA's tight box (rows 0..3, cols 0..4) leaves it outside: background
    assert label_at(llava, 0, 0) == 1  # LLaVA rules know nothing of padding


def test_qwen_variant_needs_max_attention_of_5e_3():
    a = grid_map({(3, 3): 4e-3})
    lab, st = make_pseudo_labels_with_stats(a, None, grid=G, variant="qwen", image_size=(8, 8))
    assert (lab == -100).all() and st.reason == "attention too weak"
    lab2 = make_pseudo_labels(a * 2, None, grid=G, variant="qwen", image_size=(8, 8))
    assert label_at(lab2, 3, 3) == 1
    with pytest.raises(ValueError, match="image_size"):
        make_pseudo_labels(a, None, grid=G, variant="qwen")


def test_hidden_norm_sink_criterion():
    norms = grid_map({(5, 5): 300.0}, base=10.0)
    sinks = hidden_norm_sinks(norms, 100.0)
    assert sinks.sum() == 1 and sinks.reshape(G)[5, 5]
    a = grid_map({(5, 5): 1.0, (1, 1): 0.5})
    lab = make_pseudo_labels(a, None, grid=G, sink_mask=sinks)
    assert label_at(lab, 1, 1) == 1 and label_at(lab, 5, 5) == 0


def test_empty_foreground_is_invalid_even_with_a_loose_box_limit():
    lab, st = make_pseudo_labels_with_stats(np.zeros(64), None, grid=G, max_box_frac=1.5)
    assert (lab == -100).all() and not st.valid and st.reason == "no foreground"


# -- written against mutation survivors (benchmarks/results/mutation.md) -------------------------------------------


def test_padding_mask_by_hand():
    """The authors' extents: content starts at (side - n) // 2 and ends at n + ceil((side - n) / 2)."""
    wide = padding_mask((40, 10), (4, 4)).reshape(4, 4)  # n_h = 1: rows 1..2 are content
    assert wide.tolist() == [[True] * 4, [False] * 4, [False] * 4, [True] * 4]
    tall = padding_mask((10, 40), (4, 4)).reshape(4, 4)  # n_w = 1: columns 1..2
    assert tall.tolist() == [[True, False, False, True]] * 4
    # a sliver truncates to 0 cells and is kept as 1: on a 5-grid the content is row (or column) 2 alone
    assert np.flatnonzero(~padding_mask((100, 1), (5, 5)).reshape(5, 5).all(1)).tolist() == [2]
    assert np.flatnonzero(~padding_mask((1, 100), (5, 5)).reshape(5, 5).all(0)).tolist() == [2]
    assert not padding_mask((1, 1), (4, 4)).any() and not padding_mask((30, 29), (4, 4)).any()
    assert padding_mask((1, 10), (4, 4)).any() and padding_mask((10, 1), (4, 4)).any()  # 1 pixel is a size
    for bad in [(0, 10), (10, 0), (-1, 5)]:
        with pytest.raises(ValueError, match=r"image size must be positive"):
            padding_mask(bad, (4, 4))


def test_hidden_norm_sinks_strictly_above_threshold_on_any_shape():
    assert hidden_norm_sinks(np.array([[1.0, 2.0], [3.0, 2.0]]), 2.0).tolist() == [False, False, True, False]


def test_two_dimensional_maps_and_float_sink_masks_are_accepted():
    a = grid_map({(2, 2): 1.0})
    flat, _ = make_pseudo_labels_with_stats(a, None, G)
    square, _ = make_pseudo_labels_with_stats(a.reshape(G), np.zeros(G), G)
    assert square.tolist() == flat.tolist() and flat.dtype == np.int64
    sinks = np.zeros(G)
    sinks[0, 0] = 1.0
    masked, st = make_pseudo_labels_with_stats(a, None, G, sink_mask=sinks)
    assert st.num_sink == 1 and masked.tolist() == flat.tolist()
    with pytest.raises(ValueError, match=r"grounding map has 63 values, expected 64"):
        make_pseudo_labels_with_stats(a[:63], None, G)


def test_stats_box_and_fraction_on_a_non_square_grid():
    grid = (3, 5)
    a = np.zeros(15)
    a[[1 * 5 + 2, 2 * 5 + 3]] = 1.0  # fg at (1, 2) and (2, 3): box rows 1-2, cols 2-3
    _, st = make_pseudo_labels_with_stats(a, None, grid, max_box_frac=0.5)
    assert st.box == (1, 2, 2, 3) and st.box_frac == pytest.approx(4 / 15) and st.valid and st.reason == ""
    _, empty = make_pseudo_labels_with_stats(np.zeros(15), None, grid)
    assert empty.box == (0, 0, 2, 4) and empty.box_frac == 1.0 and empty.reason == "no foreground"


def test_qwen_max_attention_exactly_at_the_minimum_is_kept():
    a = grid_map({(3, 3): 5e-3})
    _, st = make_pseudo_labels_with_stats(a, None, G, variant="qwen", image_size=(8, 8), min_max_attn=5e-3)
    assert st.valid and st.max_attn == 5e-3


# defaults are the authors' constants (docs/method.md §3.5): sink 1e-3, fg 0.2, bg 0.1, max box 0.5
BIG_BOX = grid_map({(r, c): 1.0 for r in range(6) for c in range(6)})  # 36 of 64 cells: too large at 0.5
MIXED = grid_map({(2, 2): 1.0, (6, 6): 0.5, (0, 7): 0.09, (7, 0): 0.15, (3, 3): 0.8}, base=0.0)
SINKS = grid_map({(1, 1): 2e-3, (1, 2): 5e-4, (3, 3): 2e-3})  # (3, 3): a sink on a foreground cell


def test_defaults_are_the_papers_constants():
    from sdrpn_core.pseudo_labels import LabelParams

    p = LabelParams()
    assert (p.sink_thresh, p.fg_ratio, p.bg_ratio, p.max_box_frac, p.variant, p.min_max_attn) == (
        1e-3,
        0.2,
        0.1,
        0.5,
        "llava",
        5e-3,
    )
    for fn in (make_pseudo_labels, lambda *a: make_pseudo_labels_with_stats(*a)[0]):
        assert fn(BIG_BOX, None, G).tolist() == [-100] * 64  # max box 0.5
        explicit = make_pseudo_labels(MIXED, SINKS, G, 1e-3, 0.2, 0.1, 0.5)
        assert fn(MIXED, SINKS, G).tolist() == explicit.tolist()
    assert label_at(explicit, 0, 7) == 0 and label_at(explicit, 6, 6) == 1  # 0.09 < 0.1·max; 0.5 > 0.2·max
    assert make_pseudo_labels_with_stats(MIXED, SINKS, G)[1].num_sink == 2  # 2e-3 ≥ 1e-3 > 5e-4
    assert label_at(explicit, 3, 3) != 1 and label_at(explicit, 7, 0) == -100  # a sink; 0.15 is neither fg nor bg
    assert make_pseudo_labels(BIG_BOX, None, G, max_box_frac=0.6).tolist() != [-100] * 64  # forwarded


def test_label_params_forward_every_field():
    from sdrpn_core.presets import PRESETS
    from sdrpn_core.pseudo_labels import LabelParams

    a = grid_map({(2, 2): 0.02, (2, 3): 0.009, (5, 5): 0.004, (0, 0): 0.0019})
    s = grid_map({(2, 3): 0.03, (4, 4): 0.005})
    sinks = np.zeros(64, dtype=bool)
    sinks[[3, 4]] = True
    kw = dict(sink_thresh=0.01, fg_ratio=0.3, bg_ratio=0.05, max_box_frac=0.4, variant="qwen", min_max_attn=0.01)
    params = LabelParams(**kw)
    for mask in (None, sinks):
        got = params.apply(a, s, G, image_size=(16, 12), sink_mask=mask)
        want = make_pseudo_labels_with_stats(
            a, s, G, 0.01, 0.3, 0.05, 0.4, variant="qwen", image_size=(16, 12), min_max_attn=0.01, sink_mask=mask
        )
        assert got[0].tolist() == want[0].tolist() and got[1] == want[1]
    # each forwarded: a tiny box cap, a high minimum attention, each deciding validity against the defaults
    assert LabelParams(max_box_frac=0.01).apply(a, s, G)[1].reason == "foreground box too large"
    weak = LabelParams(variant="qwen", min_max_attn=0.03).apply(a, s, G, image_size=(16, 12))[1]
    assert weak.reason == "attention too weak"
    assert params.apply(a, s, G, image_size=(16, 12), sink_mask=sinks)[1].num_sink == 2
    assert params.apply(a, s, G, image_size=(16, 12))[1].box != LabelParams().apply(a, s, G)[1].box
    qwen = LabelParams.from_preset(PRESETS["qwen2.5-vl-7b/natural"], fg_ratio=0.3)
    assert (qwen.sink_thresh, qwen.variant, qwen.fg_ratio) == (1e-2, "qwen", 0.3)


@pytest.mark.parametrize(
    ("field", "bad", "edge"),
    [
        ("sink_thresh", 0.0, 1e-9),
        ("fg_ratio", 0.0, 1.0),
        ("fg_ratio", 1.01, 1.0),
        ("bg_ratio", 0.0, 1.0),
        ("bg_ratio", 1.5, 1.0),
        ("max_box_frac", 0.0, 1e-9),
        ("min_max_attn", -1e-9, 0.0),
        ("variant", "mistral", "qwen"),
    ],
)
def test_label_params_reject_out_of_range_values_naming_them(field, bad, edge):
    from sdrpn_core.pseudo_labels import LabelParams

    with pytest.raises(ValueError, match=rf"labels\.{field} = {bad!r} is out of range"):
        LabelParams(**{field: bad})
    assert getattr(LabelParams(**{field: edge}), field) == edge
