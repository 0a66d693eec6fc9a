"""Region -> mask -> points (data_pipelines/regions.py).

Expectations are written out by hand (literal pixel ranges on a non-square 40x30 image), so a
transposed [W, H] layout or an off-by-one in the inclusive corners fails.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from data_pipelines.regions import (
    NUM_POINTS,
    POINT_HALF_WINDOW,
    Box,
    Mask,
    Point,
    Polygon,
    RegionError,
    Rle,
    Scribble,
    box_mask,
    region_box,
    region_mask,
    region_points,
    sample_points,
    shape_mask,
)

pytestmark = pytest.mark.filterwarnings(
    # pycocotools (Cython) calls np.asarray(copy=False) on numpy 2: harmless, upstream.
    "ignore:__array__ implementation doesn.t accept a copy keyword:DeprecationWarning"
)

W, H = 40, 30


def _rect(cols: range, rows: range) -> np.ndarray:
    """Hand-built expectation: True on the given columns (x) and rows (y) of a [H, W] image."""
    out = np.zeros((H, W), bool)
    for y in rows:
        for x in cols:
            out[y, x] = True
    return out


def test_constants():
    assert NUM_POINTS == 512 and POINT_HALF_WINDOW == 5
    assert issubclass(RegionError, ValueError)


# --- boxes ---------------------------------------------------------------------------------------


def test_box_mask_inclusive_rectangle_in_image_layout():
    m = box_mask(5.7, 2.2, 12.0, 20.9, W, H)
    assert m.shape == (H, W) and m.dtype == bool
    np.testing.assert_array_equal(m, _rect(range(5, 13), range(2, 21)))
    assert m.sum() == 8 * 19
    assert m[2, 5] and m[20, 12] and not m[21, 12] and not m[20, 13]
    assert not m[5, 2]  # the transposed location


def test_box_mask_clips_and_can_be_empty():
    np.testing.assert_array_equal(box_mask(-10, -5, 3, 2, W, H), _rect(range(0, 4), range(0, 3)))
    np.testing.assert_array_equal(box_mask(35, 25, 100, 100, W, H), _rect(range(35, 40), range(25, 30)))
    assert not box_mask(50, 0, 60, 10, W, H).any()
    assert not box_mask(-3, 0, -0.5, 10, W, H).any()  # floor(-0.5) = -1: left of the image


def test_region_mask_box_and_region_box():
    box = Box(5.7, 2.2, 12.0, 20.9)
    np.testing.assert_array_equal(region_mask(box, W, H), _rect(range(5, 13), range(2, 21)))
    assert region_box(box, W, H) == (5, 2, 12, 20)
    assert region_box(Box(-10, -5, 3, 2), W, H) == (0, 0, 3, 2)
    assert region_box(Box(35, 25, 100, 100), W, H) == (35, 25, 39, 29)


def test_box_intersected_with_segmentation():
    seg = _rect(range(10, 30), range(0, 8))  # overlaps the box's rows 2..7, columns 10..12
    m = region_mask(Box(5, 2, 12, 20), W, H, segmentation=seg)
    np.testing.assert_array_equal(m, _rect(range(10, 13), range(2, 8)))


def test_box_segmentation_empty_intersection_falls_back_to_box():
    seg = _rect(range(30, 40), range(25, 30))  # disjoint from the box
    m = region_mask(Box(5, 2, 12, 20), W, H, segmentation=seg)
    np.testing.assert_array_equal(m, _rect(range(5, 13), range(2, 21)))


def test_segmentation_must_be_image_layout():
    with pytest.raises(RegionError, match=r"\[30, 40\]"):
        region_mask(Box(5, 2, 12, 20), W, H, segmentation=np.ones((W, H), bool))


# --- points --------------------------------------------------------------------------------------


def test_point_window_is_11x11():
    m = region_mask(Point(20.5, 15.2), W, H)
    np.testing.assert_array_equal(m, _rect(range(15, 26), range(10, 21)))
    assert m.sum() == 121
    assert region_box(Point(20.5, 15.2), W, H) == (20, 15, 20, 15)


@pytest.mark.parametrize(
    "point, cols, rows",
    [
        (Point(0, 0), range(0, 6), range(0, 6)),
        (Point(39, 29), range(34, 40), range(24, 30)),
        (Point(39.9, 0), range(34, 40), range(0, 6)),
        (Point(2, 27), range(0, 8), range(22, 30)),
        (Point(-3, 10), range(0, 3), range(5, 16)),  # outside, but the window still reaches in
    ],
)
def test_point_window_clipped(point, cols, rows):
    np.testing.assert_array_equal(region_mask(point, W, H), _rect(cols, rows))


def test_point_box_clamped_to_image():
    assert region_box(Point(-3, 10), W, H) == (0, 10, 0, 10)
    assert region_box(Point(40.0, 30.0), W, H) == (39, 29, 39, 29)


def test_point_intersected_with_segmentation():
    seg = _rect(range(0, 18), range(0, 40 // 2))  # covers the window's columns 15..17, rows 10..19
    m = region_mask(Point(20, 15), W, H, segmentation=seg)
    np.testing.assert_array_equal(m, _rect(range(15, 18), range(10, 20)))
    far = _rect(range(0, 3), range(0, 3))
    window = _rect(range(15, 26), range(10, 21))
    np.testing.assert_array_equal(region_mask(Point(20, 15), W, H, segmentation=far), window)


# --- free-form shapes ----------------------------------------------------------------------------


TRIANGLE = Polygon(((5, 5), (30, 5), (5, 25)))  # right angle at (5, 5); hypotenuse (30,5)-(5,25)


def test_polygon_triangle_inside_outside():
    m = region_mask(TRIANGLE, W, H)
    inside = [(6, 6), (10, 10), (25, 8), (6, 22), (5, 5), (29, 5)]
    outside = [(4, 10), (28, 22), (8, 25), (20, 20), (10, 4), (35, 5)]
    for x, y in inside:
        assert m[y, x], (x, y)
    for x, y in outside:
        assert not m[y, x], (x, y)
    assert region_box(TRIANGLE, W, H) == (5, 5, 30, 25)
    # Area 25*20/2 = 250 plus the boundary pixels PIL draws; much less than the 26x21 bounding box.
    assert 250 <= m.sum() <= 300


def test_scribble_pixels_along_line():
    s = Scribble(((2, 15), (37, 15)), width=3)
    m = region_mask(s, W, H)
    assert all(m[15, x] for x in range(2, 38))
    assert not m[2, 20] and not m[25, 20] and not m[15, 0] and not m[15, 39]
    x1, y1, x2, y2 = region_box(s, W, H)
    assert (x1, x2) == (2, 37) and 13 <= y1 <= 15 <= y2 <= 17
    # A diagonal thin scribble: its own end points are set, the opposite corners are not.
    d = region_mask(Scribble(((2, 2), (30, 25)), width=1), W, H)
    assert d[2, 2] and d[25, 30] and not d[25, 2] and not d[2, 30]


def test_mask_region_is_the_mask():
    want = np.zeros((H, W), bool)
    want[3:9, 30:36] = True
    want[7, 2] = True  # a far pixel: the bounding box spans it, the result keeps only the shape
    got = region_mask(Mask(want), W, H)
    np.testing.assert_array_equal(got, want)
    assert region_box(Mask(want), W, H) == (2, 3, 35, 8)


def test_mask_region_wrong_layout_raises():
    with pytest.raises(RegionError, match=r"does not match the image 40x30"):
        region_mask(Mask(np.ones((W, H), bool)), W, H)


def test_rle_compressed_roundtrip():
    want = np.zeros((H, W), bool)
    want[10:20, 3:7] = True
    want[0, 39] = True
    rle = mask_utils.encode(np.asfortranarray(want.astype(np.uint8)))
    np.testing.assert_array_equal(region_mask(Rle(rle), W, H), want)
    as_str = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}  # JSON form
    np.testing.assert_array_equal(region_mask(Rle(as_str), W, H), want)


def test_rle_uncompressed_counts():
    # 4 wide, 3 high, only pixel (x=2, y=1) set. Column-major index = x*h + y = 7: runs 7 off, 1 on, 4 off.
    m = region_mask(Rle({"size": [3, 4], "counts": [7, 1, 4]}), 4, 3)
    want = np.zeros((3, 4), bool)
    want[1, 2] = True
    np.testing.assert_array_equal(m, want)


def test_rle_errors():
    with pytest.raises(RegionError, match="does not match"):
        region_mask(Rle({"size": [W, H], "counts": [W * H]}), W, H)
    with pytest.raises(RegionError, match="size"):
        Rle({"size": [3], "counts": []})
    with pytest.raises(RegionError, match="'size' and 'counts'"):
        Rle({"counts": "abc"})


def test_free_form_is_bbox_intersect_shape_and_clipped():
    # Square polygon hanging off the bottom-right corner: clipped to columns 30..39, rows 20..29.
    sq = Polygon(((30, 20), (60, 20), (60, 50), (30, 50)))
    np.testing.assert_array_equal(region_mask(sq, W, H), _rect(range(30, 40), range(20, 30)))
    assert region_box(sq, W, H) == (30, 20, 39, 29)
    # An L-shaped mask: the result is the L (bbox & shape), not its filled bounding box.
    ell = np.zeros((H, W), bool)
    ell[5:15, 5] = True
    ell[14, 5:15] = True
    np.testing.assert_array_equal(region_mask(Mask(ell), W, H), ell)
    # Free-form regions ignore the segmentation: the shape already is the object mask.
    np.testing.assert_array_equal(region_mask(Mask(ell), W, H, segmentation=~ell), ell)


@pytest.mark.parametrize(
    "region",
    [
        Box(50, 0, 60, 10),
        Box(-20, -20, -1, -1),
        Point(-6, 10),
        Point(20, 40),
        Polygon(((50, 5), (60, 5), (55, 20))),
        Scribble(((-30, -30), (-10, -20))),
        Mask(np.zeros((H, W), bool)),
    ],
)
def test_all_outside_raises_with_clear_message(region):
    with pytest.raises(RegionError, match=r"no pixel inside the 40x30 \(WxH\) image") as info:
        region_mask(region, W, H)
    assert type(region).__name__ in str(info.value)
    with pytest.raises(RegionError):
        region_box(region, W, H)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Box(10, 0, 5, 10), "inverted"),
        (lambda: Box(0, 0, float("nan"), 1), "finite"),
        (lambda: Point("a", 1), "number"),
        (lambda: Polygon(((0, 0), (1, 1))), "at least 3"),
        (lambda: Scribble(((0, 0),)), "at least 2"),
        (lambda: Scribble(((0, 0), (1, 1)), width=0), "width"),
        (lambda: Polygon(((0, 0), (1,), (2, 2))), r"\(x, y\) pairs"),
        (lambda: Mask(np.zeros((2, 2, 2))), "2-D"),
        (lambda: shape_mask(Box(0, 0, 1, 1), W, H), "Scribble, Polygon"),
        (lambda: region_mask("box", W, H), "unknown region kind"),
        (lambda: box_mask(0, 0, 1, 1, 0, H), "width"),
    ],
)
def test_bad_regions_raise(make, match):
    with pytest.raises(RegionError, match=match):
        make()


# --- sampling ------------------------------------------------------------------------------------


def _pixels_of(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalized points -> integer (x, y) pixels, asserting they are exact pixel positions."""
    xy = points.astype(np.float64) * [width, height]
    pix = np.rint(xy)
    np.testing.assert_allclose(xy, pix, atol=1e-3)
    return pix.astype(int)


def test_sample_points_large_mask_subset_without_replacement():
    mask = box_mask(3, 4, 34, 27, W, H)  # 32 * 24 = 768 pixels >= 512
    pts = sample_points(mask, np.random.default_rng(0))
    assert pts.shape == (512, 2) and pts.dtype == np.float32
    assert np.all(pts >= 0) and np.all(pts < 1)
    pix = _pixels_of(pts, W, H)
    assert mask[pix[:, 1], pix[:, 0]].all()  # mask[y, x]
    assert len({tuple(p) for p in pix}) == 512  # no duplicates
    assert pix[:, 0].min() >= 3 and pix[:, 0].max() <= 34 and pix[:, 1].min() >= 4 and pix[:, 1].max() <= 27


def test_sample_points_small_mask_pads_with_replacement():
    mask = np.zeros((H, W), bool)
    for x, y in [(1, 2), (39, 0), (17, 29)]:
        mask[y, x] = True
    pts = sample_points(mask, np.random.default_rng(1))
    assert pts.shape == (512, 2)
    pix = {tuple(p) for p in _pixels_of(pts, W, H)}
    assert pix == {(1, 2), (39, 0), (17, 29)}  # all of them, nothing else
    # The first three are the whole set (raster order: y=0 first), the rest are draws from it.
    np.testing.assert_allclose(pts[:3], [(39 / 40, 0.0), (1 / 40, 2 / 30), (17 / 40, 29 / 30)], rtol=1e-6)


def test_sample_points_normalization_is_index_over_size():
    mask = np.zeros((H, W), bool)
    mask[29, 39] = True  # last pixel: (39/40, 29/30), strictly below 1
    pts = sample_points(mask, np.random.default_rng(0), num_points=4)
    np.testing.assert_allclose(pts, np.tile([[39 / 40, 29 / 30]], (4, 1)), rtol=1e-7)


def test_sample_points_deterministic_per_seed():
    mask = box_mask(0, 0, 39, 29, W, H)
    a = sample_points(mask, np.random.default_rng(7))
    b = sample_points(mask, np.random.default_rng(7))
    c = sample_points(mask, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_points_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(RegionError, match="empty"):
        sample_points(np.zeros((H, W), bool), rng)
    with pytest.raises(RegionError, match="Generator"):
        sample_points(np.ones((H, W), bool), 0)
    with pytest.raises(RegionError, match="num_points"):
        sample_points(np.ones((H, W), bool), rng, num_points=0)
    with pytest.raises(RegionError, match="2-D"):
        sample_points(np.ones((2, 2, 2), bool), rng)


def test_region_points_end_to_end():
    seg = _rect(range(10, 30), range(0, 8))
    pts = region_points(Box(5, 2, 12, 20), W, H, np.random.default_rng(3), segmentation=seg, num_points=64)
    assert pts.shape == (64, 2) and pts.dtype == np.float32
    pix = _pixels_of(pts, W, H)
    assert set(map(tuple, pix)) == {(x, y) for x in range(10, 13) for y in range(2, 8)}  # 18 px, padded


def test_modules_do_not_import_jax():
    code = "import sys, data_pipelines.anyres, data_pipelines.regions; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
