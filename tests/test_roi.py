"""Every branch of the crop rules on hand-made maps (docs/method.md §6.2)."""

from __future__ import annotations

import numpy as np
import pytest

from sdrpn_core.roi import (
    component_boxes,
    gaussian_blur,
    grid_box_to_pixels,
    pixels_to_grid_box,
    plan_roi,
    plan_roi_union,
    resize_mask,
)

G = (24, 24)
LOW, HIGH = -8.0, 8.0  # sigmoid ≈ 0.0003 / 0.9997


def logit_map(*blocks: tuple[int, int, int, int]) -> np.ndarray:
    """Rectangles (r0, c0, r1, c1 inclusive) of high logits on a low background."""
    m = np.full(G, LOW)
    for r0, c0, r1, c1 in blocks:
        m[r0 : r1 + 1, c0 : c1 + 1] = HIGH
    return m


def test_blur_is_3x3_sigma1_with_reflect_padding():
    m = np.zeros((5, 5))
    m[2, 2] = 1.0
    b = gaussian_blur(m)
    k = np.exp(-0.5 * np.array([1.0, 0.0, 1.0]))
    k /= k.sum()
    np.testing.assert_allclose(b[1:4, 1:4], np.outer(k, k))
    edge = np.zeros((3, 3))
    edge[0, 0] = 1.0  # reflect (edge not repeated): the corner's mirror images are at (0,2),(2,0),(2,2)
    assert gaussian_blur(edge)[0, 0] == pytest.approx(k[1] ** 2)


def test_components_drop_singletons_and_giants_grow_small_ones():
    b = np.zeros(G, dtype=bool)
    b[2, 2] = True  # 1 cell: dropped
    b[10, 10:12] = True  # 2 cells: grown to 3×3 around its centre
    b[0:16, 20:24] = True  # 64 cells: kept as tight box
    boxes = component_boxes(b, min_area=4, max_area=225)
    assert (9, 9, 12, 12) in boxes  # x0,y0 = int(11 − 1.5)=9, int(10.5 − 1.5)=9; x1 = int(11 + 1.5)=12
    assert (20, 0, 24, 16) in boxes and len(boxes) == 2
    giant = np.zeros(G, dtype=bool)
    giant[0:16, 0:15] = True  # 240 cells > 225
    assert component_boxes(giant) == []
    diagonal = np.zeros(G, dtype=bool)
    diagonal[5, 5] = diagonal[6, 6] = diagonal[7, 7] = diagonal[8, 8] = True  # 8-connected: one component
    assert component_boxes(diagonal) == [(5, 5, 9, 9)]


def test_grown_box_is_clamped_to_last_index_at_the_border():
    b = np.zeros(G, dtype=bool)
    b[23, 22:24] = True
    (box,) = component_boxes(b)
    assert box[2] <= 23 and box[3] <= 23  # the authors clamp the exclusive upper corner to W−1 / H−1


def test_no_component_gives_baseline():
    plan = plan_roi(np.full(G, LOW), G, 0.15)
    assert plan.kind == "none" and plan.reason
    one_cell = plan_roi(logit_map((5, 5, 5, 5)), G, 0.15)  # the centre blurs to ≈0.20, its neighbours to ≈0.12
    assert (one_cell.prob > 0.15).sum() == 1 and one_cell.kind == "none"  # dropped by the 1-cell rule, not by τ
    assert plan_roi(logit_map((5, 5, 5, 6)), G, 0.15).kind == "box"  # while two cells make a component


def test_all_above_threshold_is_one_giant_component_hence_baseline():
    plan = plan_roi(np.full(G, HIGH), G, 0.15)
    assert plan.kind == "none"


def test_nan_map_gives_baseline_with_reason():
    m = logit_map((3, 3, 6, 6))
    m[0, 0] = np.nan
    plan = plan_roi(m, G, 0.15)
    assert plan.kind == "none" and "NaN" in plan.reason


def test_one_component_is_a_box_crop():
    plan = plan_roi(logit_map((4, 6, 7, 9)), G, 0.15)
    assert plan.kind == "box" and len(plan.boxes) == 1
    x0, y0, x1, y1 = plan.boxes[0]
    assert x0 <= 6 and y0 <= 4 and x1 >= 10 and y1 >= 8  # the blur widens the region by about a cell


def test_two_components_give_union_box_and_keep_mask():
    plan = plan_roi(logit_map((2, 2, 4, 4), (15, 15, 18, 18)), G, 0.5)
    assert plan.kind == "mask"
    (union,) = plan.boxes
    assert union[0] <= 2 and union[1] <= 2 and union[2] >= 19 and union[3] >= 19
    assert plan.region.shape == (union[3] - union[1], union[2] - union[0])
    keep = resize_mask(plan.region, G)  # what the LLaVA adapter keeps of a crop encoded at the full grid
    assert keep.shape == G and keep.dtype == bool
    assert keep[0:3, 0:3].any() and keep[-3:, -3:].any()  # both blobs survive the resize
    assert not keep[10:13, 10:13].any()  # the gap between them is dropped
    assert keep.sum() < keep.size / 2


def test_box_mode_takes_up_to_two_boxes():
    two = plan_roi(logit_map((2, 2, 4, 4), (15, 15, 18, 18)), G, 0.5, mode="box")
    assert two.kind == "box" and len(two.boxes) == 2
    three = plan_roi(logit_map((2, 2, 4, 4), (15, 15, 18, 18), (2, 15, 4, 18)), G, 0.5, mode="box")
    assert three.kind == "none"


def test_negative_threshold_is_relative_to_max():
    m = np.zeros(G)
    m[5:8, 5:8] = 1.0
    m[20, 20] = 0.1
    plan = plan_roi(m, G, -0.5)
    assert plan.kind == "box"


def test_pixel_mapping_undoes_pad_to_square_on_a_wide_image():
    # 672×336 image → 336 square: r = 0.5, content height int(336·0.5) = 168, padding (336−168)/2 = 84 on top
    assert grid_box_to_pixels((0, 6, 24, 18), (672, 336), G, 336) == (0, 0, 672, 336)
    # cells x 12..24, y 6..12 → 336-px (168, 84)..(336, 168) → minus pad (0, 84) → /0.5
    assert grid_box_to_pixels((12, 6, 24, 12), (672, 336), G, 336) == (336, 0, 672, 168)


def test_pixel_mapping_on_a_tall_image():
    # 336×672 → r = 0.5, content width 168, pad_x = 84: cells x 6..12 → 84..168 px → 0..84 → /0.5
    assert grid_box_to_pixels((6, 0, 12, 12), (336, 672), G, 336) == (0, 0, 168, 336)
    # 300×600: r = 0.56 and int(300·0.56) = 167 in floating point, as in the authors' code → pad 84.5
    assert grid_box_to_pixels((6, 0, 12, 12), (300, 600), G, 336) == (0, 0, 149, 299)


def test_box_in_the_padding_gives_none_and_tiny_sources_give_at_least_one_pixel():
    assert grid_box_to_pixels((0, 0, 24, 5), (672, 336), G, 336) is None  # rows 0..4 are all top padding
    tiny = grid_box_to_pixels((10, 10, 11, 11), (3, 3), G, 336)
    assert tiny is not None
    x0, y0, x1, y1 = tiny
    assert 0 <= x0 < x1 <= 3 and 0 <= y0 < y1 <= 3


def test_qwen_union_plan_keeps_every_cell_above_threshold_without_component_rules():
    single = logit_map((5, 5, 5, 5))  # blurred, only the centre (0.20) stays above 0.15: one cell
    assert plan_roi(single, G, 0.15).kind == "none"  # LLaVA's rules drop 1-cell components
    plan = plan_roi_union(single, G, 0.15)
    assert plan.kind == "mask" and plan.boxes == ((5, 5, 6, 6),) and plan.region.tolist() == [[True]]
    two = plan_roi_union(logit_map((2, 2, 4, 4), (15, 15, 18, 18)), G, 0.5)
    (union,) = two.boxes
    assert union[0] <= 2 and union[2] >= 19 and two.region.shape == (union[3] - union[1], union[2] - union[0])
    assert not two.region[8:10, 8:10].any()  # the gap is outside the keep-mask
    assert plan_roi_union(np.full(G, LOW), G, 0.1).kind == "none"


def test_qwen_sink_strips_are_suppressed_only_on_large_maps():
    big = (32, 32)  # 1024 cells > 768
    m = np.full(big, LOW)
    m[0:8, 0] = HIGH  # a sink strip down column 0 of the top quarter
    assert plan_roi_union(m, big, 0.1).kind == "none"
    small = np.full(G, LOW)  # 576 cells: no suppression
    small[0:6, 0] = HIGH
    assert plan_roi_union(small, G, 0.1).kind == "mask"


def test_grown_width_counts_the_cells_of_small_lines():
    """A 3-cell line grows to its own length + 1 (the authors' `x1 − x0 + 1` on exclusive stops), not to 3."""
    b = np.zeros(G, dtype=bool)
    b[10, 10:13] = True  # x0=10, x1=13 → bw = max(3, 4) = 4, centre 11.5; y: 10..11 → bh = 3, centre 10.5
    assert component_boxes(b) == [(9, 9, 13, 12)]
    ell = np.zeros(G, dtype=bool)
    ell[10, 10:12] = ell[11, 10] = True  # 3 cells in a 2×2 frame: bw = bh = 3 around (11, 11)
    assert component_boxes(ell) == [(9, 9, 12, 12)]


def test_threshold_is_strictly_greater_than():
    """Cells exactly at τ are out (the authors' `>`): a 6×6 plateau's 4×4 interior blurs to one value v; τ = v gives
    no RoI, τ just below v gives the interior as one box."""
    logits = np.full(G, LOW)
    logits[4:10, 4:10] = 8.0
    probe = plan_roi(logits, G, 0.5)
    interior = probe.prob[5:9, 5:9]
    v = float(interior[0, 0])
    assert np.all(interior == v) and probe.prob.max() == v
    assert plan_roi(logits, G, v).kind == "none"
    below = plan_roi(logits, G, float(np.nextafter(v, 0)))
    assert below.kind == "box" and below.boxes == ((5, 5, 9, 9),)
    assert plan_roi_union(logits, G, v).kind == "none"
    assert plan_roi_union(logits, G, float(np.nextafter(v, 0))).boxes == ((5, 5, 9, 9),)


# -- written against the survivors of `python benchmarks/mutation.py`: exact arithmetic on non-square cases ------


def _ref_grid_to_pixels(box, image_size, grid, vision):
    """get_bbox4src as the authors write it (float arithmetic, their order of operations), not the module's code."""
    w, h = image_size
    r = min(vision / w, vision / h)
    pad = ((vision - int(w * r)) / 2, (vision - int(h * r)) / 2)
    cell = (vision / grid[1], vision / grid[0])
    f = [(box[i] * cell[i % 2] - pad[i % 2]) / r for i in range(4)]
    if f[2] <= 0 or f[3] <= 0 or f[0] >= w or f[1] >= h:
        return None
    x0, x1 = (int(min(max(v, 0), w)) for v in (f[0], f[2]))
    y0, y1 = (int(min(max(v, 0), h)) for v in (f[1], f[3]))
    x0, y0 = min(x0, w - 1), min(y0, h - 1)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def test_grid_box_to_pixels_on_non_square_grids_and_images():
    rng = np.random.default_rng(0)
    for _ in range(400):
        grid = (int(rng.integers(2, 9)), int(rng.integers(2, 9)))
        image = (int(rng.integers(20, 400)), int(rng.integers(20, 400)))
        x0, y0 = int(rng.integers(0, grid[1])), int(rng.integers(0, grid[0]))
        box = (x0, y0, int(rng.integers(x0 + 1, grid[1] + 1)), int(rng.integers(y0 + 1, grid[0] + 1)))
        assert grid_box_to_pixels(box, image, grid, 336) == _ref_grid_to_pixels(box, image, grid, 336)
    # worked by hand: 200x100 image, 6x12 grid: r 1.68, pad_y 84, cells 28 wide and 56 high
    assert grid_box_to_pixels((3, 2, 6, 4), (200, 100), (6, 12), 336) == (50, 16, 100, 83)
    # a box ending exactly at the padding's edge covers no pixel: None (not a 1-pixel sliver)
    assert grid_box_to_pixels((0, 0, 12, 1), (200, 100), (4, 12), 336) is None
    assert grid_box_to_pixels((0, 0, 1, 12), (100, 200), (12, 4), 336) is None
    assert grid_box_to_pixels((0, 0, 76, 12), (100, 200), (12, 300), 336) == (0, 0, 1, 200)  # 0 < x1 < 1 px
    assert grid_box_to_pixels((11, 2, 12, 3), (200, 100), (6, 12), 336) == (183, 16, 200, 50)


def test_pixels_to_grid_box_on_non_square_grids_and_images():
    import math

    def ref(box, image, grid, vision):
        w, h = image
        r = min(vision / w, vision / h)
        pad = ((vision - int(w * r)) / 2, (vision - int(h * r)) / 2)
        cell = (vision / grid[1], vision / grid[0])
        lo = [int((box[i] * r + pad[i]) // cell[i]) for i in (0, 1)]
        hi = [math.ceil((box[i + 2] * r + pad[i]) / cell[i]) for i in (0, 1)]
        return max(0, lo[0]), max(0, lo[1]), min(grid[1], max(hi[0], lo[0] + 1)), min(grid[0], max(hi[1], lo[1] + 1))

    rng = np.random.default_rng(1)
    for _ in range(400):
        grid = (int(rng.integers(2, 9)), int(rng.integers(2, 9)))
        image = (int(rng.integers(20, 400)), int(rng.integers(20, 400)))
        x0, y0 = int(rng.integers(0, image[0])), int(rng.integers(0, image[1]))
        box = (x0, y0, int(rng.integers(x0, image[0] + 1)), int(rng.integers(y0, image[1] + 1)))
        assert pixels_to_grid_box(box, image, grid, 336) == ref(box, image, grid, 336), (box, image, grid)
    assert pixels_to_grid_box((50, 16, 100, 83), (200, 100), (6, 12), 336) == (3, 1, 6, 4)


def test_resize_mask_is_half_pixel_bilinear_then_strictly_above_half():
    up = resize_mask(np.array([[1, 0], [0, 0]]), (4, 4))
    # sources at (i + 0.5) / 2 - 0.5: weights 1, 0.75, 0.25, 0 along each axis; products > 0.5 survive
    assert up.tolist() == [[True, True, False, False], [True, True, False, False], [False] * 4, [False] * 4]
    assert resize_mask(np.array([[1, 0]]), (1, 3)).tolist() == [[True, False, False]]  # the middle is exactly 0.5


def test_plan_roi_defaults_are_the_authors():
    # after the 3x3 σ=1 blur, a block of saturated cells stays exactly itself above 0.3 (inside ≥ 0.527, the ring
    # outside ≤ 0.274): a 2x2 block (4 cells, kept as is under min_area 4) and a 2x113 block (226 > 225 cells)
    logits = np.full((10, 120), -30.0)  # (blocks kept off the border: the blur reflects there)
    logits[2:4, 2:4] = 30.0
    logits[6:8, 3:116] = 30.0
    plan = plan_roi(logits, (10, 120), 0.3, mode="box")
    assert plan.kind == "box" and plan.boxes == ((2, 2, 4, 4),)
    assert plan_roi(logits, (10, 120), 0.3, mode="box", min_area=5).boxes == ((1, 1, 4, 4),)  # grown to 3x3
    assert len(plan_roi(logits, (10, 120), 0.3, mode="box", max_area=226).boxes) == 2
    assert plan_roi(logits, (10, 120)).kind == "none"  # at the default τ 0.15 the halos join both: one part, too big
    assert plan_roi(np.zeros((10, 120)), (10, 120)).kind == "none"  # sigmoid(0)=0.5 everywhere: one 1,200-cell part


# -- written against mutation survivors (benchmarks/results/mutation.md) -------------------------------------------


def test_gaussian_kernel_and_blur_by_hand():
    from sdrpn_core.roi import gaussian_kernel1d

    e = np.exp(-0.5)
    np.testing.assert_allclose(gaussian_kernel1d(), np.array([e, 1.0, e]) / (1 + 2 * e))
    e2 = np.exp(-0.5 / 4)  # σ = 2
    np.testing.assert_allclose(gaussian_kernel1d(3, 2.0), np.array([e2, 1.0, e2]) / (1 + 2 * e2))
    ints = np.zeros((5, 5), dtype=int)
    ints[2, 2] = 1  # an integer map is blurred in floats, not truncated back to integers
    k = np.array([e, 1.0, e]) / (1 + 2 * e)
    np.testing.assert_allclose(gaussian_blur(ints)[1:4, 1:4], np.outer(k, k))
    k2 = gaussian_kernel1d(3, 2.0)
    np.testing.assert_allclose(gaussian_blur(ints, sigma=2.0)[1:4, 1:4], np.outer(k2, k2))


def test_sigmoid_is_stable_and_exact_far_out():
    from sdrpn_core.roi import sigmoid

    np.testing.assert_allclose(sigmoid(np.array([-100.0, 0.0, 100.0])), [1 / (1 + np.exp(100)), 0.5, 1.0])


def test_grid_box_to_pixels_at_the_image_edges():
    assert grid_box_to_pixels((0, 0, 1, 1), (100, 100), (100, 100), 100) == (0, 0, 1, 1)  # ends 1 px in
    # a box starting exactly at the image's right (bottom) edge holds no pixel: wide padding on both sides
    assert grid_box_to_pixels((15, 0, 20, 1), (50, 100), (20, 20), 100) is None  # x0 = 15·5 − 25 = 50 = w
    assert grid_box_to_pixels((0, 15, 1, 20), (100, 50), (20, 20), 100) is None
    assert grid_box_to_pixels((14, 0, 20, 1), (50, 100), (20, 20), 100) == (45, 0, 50, 5)


def test_an_empty_pixel_box_on_a_cell_edge_still_takes_one_cell():
    assert pixels_to_grid_box((20, 30, 20, 30), (100, 100), (10, 10), 100) == (2, 3, 3, 4)


def test_plan_roi_thresholds_modes_and_shapes():
    m = logit_map((4, 4, 6, 6))
    assert plan_roi(m.reshape(-1), G).boxes == plan_roi(m, G, 0.15).boxes == ((3, 3, 8, 8),)  # blur halo
    assert plan_roi(m, G, 0.0).kind == "none"  # τ 0 is sigmoid > 0: every cell, one giant part
    assert plan_roi(m, G, -1.0).kind == "none"  # nothing is strictly above the max
    plateau = logit_map((2, 2, 10, 10))  # its 7×7 interior blurs to exactly the max: still not above it
    assert plan_roi(plateau, G, -1.0).kind == "none"
    assert plan_roi(m, G, -0.3).boxes == ((4, 4, 7, 7),)  # > 0.3·max of the blurred raw map
    too_many = plan_roi(logit_map((2, 2, 4, 4), (10, 10, 12, 12), (18, 18, 20, 20)), G, mode="box")
    assert too_many.kind == "none" and too_many.prob is not None and too_many.reason.startswith("3 boxes")
    with pytest.raises(ValueError, match="RoI mode 'MASK'"):
        plan_roi(m, G, mode="MASK")


def test_qwen_union_defaults_strips_and_degenerate_maps():
    m = np.full(G, LOW)
    m[5, 5] = 0.0  # sigmoid 0.5, blurred ≈ 0.2 at the centre: above 0.1, below 1.1
    assert plan_roi_union(m, G).kind == "mask" and plan_roi_union(m.reshape(-1), G).boxes == plan_roi_union(m, G).boxes
    bad = plan_roi_union(np.full(G, np.nan), G)
    assert bad.kind == "none" and bad.reason == "RoI map has NaN or infinite values"
    none = plan_roi_union(np.full(G, LOW), G)
    assert none.kind == "none" and none.reason == "no cell above the threshold"
    big = (32, 32)  # strips: column 0 of rows 0..7, row 0 of columns 0..7 — and nothing else
    for cell, suppressed in [((7, 0), True), ((0, 7), True), ((1, 1), False), ((8, 0), False), ((0, 8), False)]:
        m = np.full(big, LOW)
        m[cell] = HIGH
        assert (plan_roi_union(m, big).kind == "none") == suppressed, cell
    beside = np.full(big, LOW)
    beside[7, 1] = HIGH  # next to the strip: the strip is zeroed (not made NaN), so this cell keeps its RoI
    assert plan_roi_union(beside, big).boxes[0][0] <= 1
    exactly = (24, 32)  # 768 cells: not more than 768, no suppression
    m = np.full(exactly, LOW)
    m[0, 0] = HIGH
    assert plan_roi_union(m, exactly).kind == "mask"
    line = (1, 769)  # 769 cells: row 0's first 769 // 4 = 192 cells are a strip
    m = np.full(line, LOW)
    m[0, 100] = HIGH
    assert plan_roi_union(m, line).kind == "none"


def test_small_vertical_lines_grow_by_their_own_height_and_the_default_area_cap_is_225():
    line = np.zeros((10, 10), dtype=bool)
    line[3:6, 5] = True  # 3 cells: height 3 + 1 = 4 rows, width max(3, 2) = 3 columns, around the centre
    assert component_boxes(line) == [(4, 2, 7, 6)]
    for cells, kept in [(225, True), (226, False)]:
        big = np.zeros((20, 20), dtype=bool)
        big.flat[np.arange(20 * 20)[:cells]] = True  # a solid block of `cells` cells (rows of 20)
        assert bool(component_boxes(big)) == kept, cells


def test_the_qwen_sink_strips_are_zero_not_undefined_on_a_large_map():
    """On maps over 768 cells the strips are zeroed: the blurred map stays finite next to them."""
    from sdrpn_core.roi import plan_roi_union

    plan = plan_roi_union(np.full((32, 32), 3.0), (32, 32), threshold=0.5)
    assert np.all(np.isfinite(plan.prob)) and plan.prob[0, 1] < plan.prob[16, 16]
    assert plan.region[1, 4] and plan.boxes == ((0, 0, 32, 32),)  # next to a strip: dimmed, still in the union
