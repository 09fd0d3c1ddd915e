from __future__ import annotations

import numpy as np
import pytest

from sdrpn_core.synthetic import COLOURS, make_scene, make_split, write_split


def test_generator_is_deterministic():
    a, b = make_split(3, 7), make_split(3, 7)
    for x, y in zip(a, b, strict=True):
        assert x.question == y.question and x.answer == y.answer and x.box == y.box
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
    assert make_split(1, 8)[0].box != a[0].box or make_split(1, 8)[0].question != a[0].question


@pytest.mark.parametrize("canvas", [64, 96, 256])
def test_boxes_match_the_drawn_glyphs_and_the_patch_grid(canvas):
    rng = np.random.default_rng(canvas)
    for i in range(5):
        scene = make_scene(rng, str(i), canvas=canvas)
        arr = np.asarray(scene.image).astype(int)
        assert len(scene.objects) == 3 and scene.question.endswith(f"{scene.colour} box ?")
        assert (scene.box, scene.colour, scene.answer) in scene.objects
        for (x0, y0, x1, y1), colour, _digit in scene.objects:
            assert x0 % 8 == 0 and y0 % 8 == 0 and x1 - x0 == 24 and y1 - y0 == 24  # on the 8-px patch grid
            region = arr[y0:y1, x0:x1].reshape(-1, 3)
            is_fill = (np.abs(region - COLOURS[colour]).sum(1) == 0).mean()
            is_glyph = (region == 255).all(1).mean()
            assert is_fill > 0.5 and 0.02 < is_glyph < 0.5  # the box is its colour, with a white digit inside
            outside = arr[max(0, y0 - 1) : y0, x0:x1].reshape(-1, 3)
            assert not (np.abs(outside - COLOURS[colour]).sum(1) == 0).all() or y0 == 0
        boxes = [o[0] for o in scene.objects]
        for j, a in enumerate(boxes):  # boxes never touch
            for b in boxes[j + 1 :]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def test_single_variant_and_impossible_canvas():
    scene = make_scene(np.random.default_rng(0), "s", canvas=96, variant="single")
    assert len(scene.objects) == 1
    with pytest.raises(ValueError, match="cannot place"):
        make_scene(np.random.default_rng(0), "s", canvas=32)


def test_heldout_split_layout(tmp_path):
    import json

    manifest = write_split(tmp_path, make_split(2, 3, canvas=96))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert rows[0].keys() == {"id", "image", "question", "answers", "box"}
    assert (tmp_path / rows[0]["image"]).exists()


def test_nano_patch_targets_align_with_boxes():
    from sdrpn_core.synthetic.nano import _patch_targets

    scene = make_scene(np.random.default_rng(1), "s", canvas=64)
    colour, digit = _patch_targets(scene)
    grid_c, grid_d = colour.reshape(8, 8), digit.reshape(8, 8)
    for (x0, y0, x1, y1), c, d in scene.objects:
        assert (grid_c[y0 // 8 : y1 // 8, x0 // 8 : x1 // 8] == list(COLOURS).index(c) + 1).all()
        assert (grid_d[y0 // 8 : y1 // 8, x0 // 8 : x1 // 8] == int(d) + 1).all()
    assert (grid_c > 0).sum() == 3 * 9


def test_roi_windows_are_grid_aligned_and_hold_the_asked_box_centre():
    from sdrpn_core.synthetic.nano import roi_window

    rng = np.random.default_rng(2)
    for canvas in (128, 256):
        cell = canvas / 8
        for i in range(30):
            scene = make_scene(rng, str(i), canvas=canvas)
            x0, y0, x1, y1 = roi_window(rng, scene, canvas)
            assert 0 <= x0 < x1 <= canvas and 0 <= y0 < y1 <= canvas
            for lo, hi in ((x0, x1), (y0, y1)):
                assert lo % cell == 0 and hi % cell == 0 and 2 <= (hi - lo) / cell <= 4
            cx, cy = (scene.box[0] + scene.box[2]) / 2, (scene.box[1] + scene.box[3]) / 2
            assert x0 <= cx <= x1 and y0 <= cy <= y1


def test_crop_view_targets_follow_the_boxes_through_the_resize():
    from sdrpn_core.synthetic.nano import _patch_targets, _window_targets

    scene = make_scene(np.random.default_rng(3), "s", canvas=64)
    # the whole canvas as the window is the native view: the same targets as the patch-grid ones
    for got, want in zip(_window_targets(scene, (0, 0, 64, 64)), _patch_targets(scene), strict=True):
        assert np.array_equal(got, want)
    (bx0, by0, bx1, by1), colour, digit = scene.objects[0]
    c, d = _window_targets(scene, (bx0, by0, bx1, by1))  # a crop of exactly one box: every patch is that box
    assert (c == list(COLOURS).index(colour) + 1).all() and (d == int(digit) + 1).all()


def test_a_rebuilt_synthetic_split_is_found_without_regenerating_it(tmp_path, monkeypatch):
    """A cached rerun finds the manifest a synthetic spec built without drawing (and hashing) the scenes again;
    deleted scenes or another store build it anew."""
    import sdrpn_core.synthetic as synthetic
    from stages.config import DatasetSpec
    from stages.data import _synthetic_folder, build_manifest
    from storage.store import Store, StoreSettings

    monkeypatch.setenv("SDRPN_CACHE_DIR", str(tmp_path / "cache"))
    store = Store(StoreSettings(root=str(tmp_path / "store")))
    spec = DatasetSpec(kind="synthetic", n=5, seed=3, canvas=96)
    first = build_manifest(spec, store)
    calls = []
    real = synthetic.make_split
    monkeypatch.setattr(synthetic, "make_split", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert build_manifest(spec, store) == first and calls == []
    images = store.ls(_synthetic_folder(spec), "images")
    store.rm(_synthetic_folder(spec), "images", images[0])
    assert build_manifest(spec, store) == first and calls == [1]  # the scene is drawn again, same manifest
    other = Store(StoreSettings(root=str(tmp_path / "other")))
    assert build_manifest(spec, other).fingerprint == first.fingerprint and calls == [1, 1]
