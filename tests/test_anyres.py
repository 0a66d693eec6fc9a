"""Any-res grid selection, tiling, normalization and conversion (data_pipelines/anyres.py)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from data_pipelines import anyres
from data_pipelines.anyres import (
    CLIP_MEAN,
    CLIP_STD,
    GRIDS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    merge_tiles,
    normalize,
    preprocess,
    resize,
    select_grid,
    split_tiles,
    to_rgb,
)

# --- grid selection ------------------------------------------------------------------------------


def test_grids_are_the_14_of_the_spec_in_order():
    assert GRIDS == (
        (1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1),
        (1, 5), (5, 1), (1, 6), (6, 1), (2, 2), (2, 3), (3, 2),
    )  # fmt: skip
    assert max(c * r for c, r in GRIDS) == 6


@pytest.mark.parametrize(
    "width, height, expected",
    [
        (640, 480, (2, 2)),
        (1024, 768, (3, 2)),
        (1920, 1080, (3, 2)),
        (336, 336, (1, 1)),
        (300, 200, (1, 1)),
        (4000, 1000, (4, 1)),
        (500, 2500, (1, 5)),
    ],
)
def test_select_grid_spec_worked_examples(width, height, expected):
    # SPEC §2.4 table, cell 336.
    assert select_grid(width, height, 336) == expected


def _exact_rule(width: int, height: int, cell: int, grids) -> tuple[int, int]:
    """The selection rule in exact rational arithmetic (what HF's float64 version approximates)."""
    best, best_key = None, None
    for cols, rows in grids:
        wc, hc = cols * cell, rows * cell
        scale = min(Fraction(wc, width), Fraction(hc, height))
        eff = min(math.floor(width * scale) * math.floor(height * scale), width * height)
        key = (-eff, wc * hc - eff)
        if best_key is None or key < best_key:
            best, best_key = (cols, rows), key
    return best


def test_select_grid_uses_float64_in_hf_order():
    # SPEC §4.6 item 5. For 2643x2640 on the 3x2 canvas (1008x672), scale = 672/2640 and
    # 2640 * (672/2640) evaluates to 671.999... in float64, so int() gives 671 and 3x2 ties 2x2 on
    # effective area (672*671); 2x2 wastes less and wins. Exact arithmetic gives 672*672 -> 3x2.
    assert 2640 * (672 / 2640) < 672
    assert _exact_rule(2643, 2640, 336, GRIDS) == (3, 2)
    assert select_grid(2643, 2640, 336) == (2, 2)


def test_select_grid_tie_keeps_first_candidate():
    # Two identical candidates: the first in list order must win.
    assert select_grid(100, 100, 50, grids=((2, 2), (1, 1), (2, 2))) == (2, 2)
    # 1x2 and 2x1 give a square image the same effective and wasted area: the earlier one wins.
    assert select_grid(500, 500, 336, grids=((1, 2), (2, 1))) == (1, 2)
    assert select_grid(500, 500, 336, grids=((2, 1), (1, 2))) == (2, 1)


def test_select_grid_respects_candidate_subset():
    # 4000x1000 prefers 4x1; restricted to at most 3 cells, 3x1 is the best remaining fit.
    three = tuple(g for g in GRIDS if g[0] * g[1] <= 3)
    assert select_grid(4000, 1000, 336, three) == (3, 1)


hf_select = None


def _hf():
    global hf_select
    if hf_select is None:
        mod = pytest.importorskip("transformers.image_processing_utils")
        hf_select = mod.select_best_resolution
    return hf_select


@settings(max_examples=200, deadline=None)
@given(
    width=st.one_of(st.integers(1, 6000), st.integers(1, 40)),
    height=st.one_of(st.integers(1, 6000), st.integers(1, 40)),
    cell=st.sampled_from([14, 224, 336, 448]),
    max_tiles=st.integers(1, 6),
)
def test_select_grid_matches_hf_select_best_resolution(width, height, cell, max_tiles):
    select = _hf()
    grids = [g for g in GRIDS if g[0] * g[1] <= max_tiles]
    # HF takes (height, width) and candidates as (height, width), and returns (height, width).
    best_h, best_w = select((height, width), [(r * cell, c * cell) for c, r in grids])
    assert select_grid(width, height, cell, grids) == (best_w // cell, best_h // cell)


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 10, 336), "width"),
        ((10, -1, 336), "height"),
        ((10, 10, 0), "cell"),
        ((10.0, 10, 336), "width"),
        ((True, 10, 336), "width"),
    ],
)
def test_select_grid_rejects_bad_sizes(args, match):
    with pytest.raises(ImageError, match=match):
        select_grid(*args)


def test_select_grid_rejects_bad_grids():
    with pytest.raises(ValueError, match="empty"):
        select_grid(10, 10, 336, grids=())
    with pytest.raises(ValueError, match="grid"):
        select_grid(10, 10, 336, grids=((1, 0),))
    with pytest.raises(ValueError, match="pair"):
        select_grid(10, 10, 336, grids=((1, 2, 3),))


# --- tiling --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cols, rows", [(1, 1), (3, 2), (2, 3), (1, 5), (6, 1)])
def test_split_tiles_row_major_and_merge_inverse(cols, rows):
    ch, cw = 4, 5
    canvas = np.arange(rows * ch * cols * cw * 3, dtype=np.int64).reshape(rows * ch, cols * cw, 3)
    tiles = split_tiles(canvas, cols, rows)
    assert tiles.shape == (rows * cols, ch, cw, 3)
    k = 0
    for r in range(rows):  # top row first, left to right within a row
        for c in range(cols):
            np.testing.assert_array_equal(tiles[k], canvas[r * ch : (r + 1) * ch, c * cw : (c + 1) * cw])
            k += 1
    np.testing.assert_array_equal(merge_tiles(tiles, cols, rows), canvas)


def test_split_tiles_second_tile_is_right_of_first():
    # 2x2 canvas of 1-pixel cells with distinct values: a column-major split would put 20 second.
    canvas = np.array([[10, 11], [20, 21]])[:, :, None]
    assert split_tiles(canvas, 2, 2)[:, 0, 0, 0].tolist() == [10, 11, 20, 21]


def test_split_merge_errors():
    with pytest.raises(ImageError, match="does not split"):
        split_tiles(np.zeros((10, 9, 3)), 2, 2)
    with pytest.raises(ImageError, match="cannot form"):
        merge_tiles(np.zeros((5, 2, 2, 3)), 3, 2)
    with pytest.raises(ImageError, match="cols"):
        split_tiles(np.zeros((4, 4, 3)), 0, 1)


# --- normalization, conversion, resizing ---------------------------------------------------------


def test_normalize_values():
    img = np.array([[[0, 128, 255]]], np.uint8)
    out = normalize(img, CLIP_MEAN, CLIP_STD)
    assert out.dtype == np.float32 and out.shape == (1, 1, 3)
    expected = [
        (0 / 255 - 0.48145466) / 0.26862954,
        (128 / 255 - 0.4578275) / 0.26130258,
        (255 / 255 - 0.40821073) / 0.27577711,
    ]
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)
    out = normalize(img, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(out[0, 0], [-0.485 / 0.229, (128 / 255 - 0.456) / 0.224, 0.594 / 0.225], rtol=1e-6)


def test_normalize_errors():
    with pytest.raises(ImageError, match="uint8"):
        normalize(np.zeros((2, 2, 3), np.float32), CLIP_MEAN, CLIP_STD)
    with pytest.raises(ImageError, match="per channel"):
        normalize(np.zeros((2, 2, 3), np.uint8), (0.5, 0.5), (1, 1))
    with pytest.raises(ImageError, match="positive"):
        normalize(np.zeros((2, 2, 3), np.uint8), CLIP_MEAN, (1, 0, 1))


def test_to_rgb_numpy_conversions():
    grey = np.array([[0, 50], [200, 255]], np.uint8)
    for arr in (grey, grey[:, :, None]):
        out = to_rgb(arr)
        assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
        for ch in range(3):
            np.testing.assert_array_equal(out[:, :, ch], grey)
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 7
    np.testing.assert_array_equal(to_rgb(rgba), np.broadcast_to([10, 20, 30], (2, 3, 3)))
    levels = np.array([0, 1, 127, 128, 254, 255], np.uint8)
    as_float = np.stack([levels / 255.0] * 3, axis=-1)[None].astype(np.float32)
    np.testing.assert_array_equal(to_rgb(as_float)[0, :, 0], levels)  # float [0, 1] round-trips
    np.testing.assert_array_equal(to_rgb(np.full((1, 1, 3), 0.5))[0, 0], [128, 128, 128])
    np.testing.assert_array_equal(to_rgb(np.full((1, 1, 3), 200, np.int64))[0, 0], [200, 200, 200])


def test_to_rgb_pil_conversions():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb(Image.fromarray(rgb)), rgb)
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 3, np.uint8)], axis=-1)
    np.testing.assert_array_equal(to_rgb(Image.fromarray(rgba)), rgb)  # alpha dropped, not composited
    grey = Image.fromarray(rgb[:, :, 0])
    assert grey.mode == "L"
    np.testing.assert_array_equal(to_rgb(grey), np.repeat(rgb[:, :, :1], 3, axis=2))
    pal = Image.fromarray(rgb).convert("P")
    np.testing.assert_array_equal(to_rgb(pal), np.asarray(pal.convert("RGB")))
    out = to_rgb(Image.fromarray(np.array([[0.0, 1.0]], np.float32), mode="F"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 255])


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 2, 5), np.uint8), "shape"),
        (np.zeros((1, 2, 2, 3), np.uint8), "shape"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.full((2, 2), 1.5), r"\[0, 1\]"),
        (np.full((2, 2), -0.1), r"\[0, 1\]"),
        (np.full((2, 2), np.nan), "NaN"),
        (np.full((2, 2), 300, np.uint16), "0..255"),
        (np.zeros((2, 2), bool), "dtype"),
        ("image.png", "PIL"),
        ([[0, 1], [2, 3]], "PIL"),
    ],
)
def test_to_rgb_errors(bad, match):
    with pytest.raises(ImageError, match=match):
        to_rgb(bad)
    assert issubclass(ImageError, ValueError)


def test_resize_stretches_to_width_height():
    img = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = resize(img, 7, 5)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(img).resize((7, 5), Image.BICUBIC))
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(resize(img, 40, 30), img)  # same size is the identity
    const = np.full((13, 29, 3), (9, 99, 199), np.uint8)  # bicubic keeps a constant image constant
    np.testing.assert_array_equal(resize(const, 50, 4), np.full((4, 50, 3), (9, 99, 199), np.uint8))
    with pytest.raises(ImageError, match="uint8"):
        resize(img.astype(np.float32), 7, 5)
    with pytest.raises(ImageError, match="height"):
        resize(img, 7, 0)


# --- preprocess ----------------------------------------------------------------------------------


def _ref_normalized(rgb: np.ndarray, width: int, height: int, mean, std) -> np.ndarray:
    resized = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BICUBIC)).astype(np.float64)
    return (resized / 255.0 - np.asarray(mean)) / np.asarray(std)


def test_preprocess_shapes_values_and_zero_padding():
    rgb = np.random.default_rng(2).integers(0, 256, (10, 40, 3), dtype=np.uint8)  # W=40, H=10
    out = preprocess(rgb, global_size=12, cell=4, max_tiles=6)
    assert set(out) == {"global_image", "tiles", "grid", "size"}
    assert out["global_image"].shape == (12, 12, 3) and out["global_image"].dtype == np.float32
    assert out["tiles"].shape == (6, 4, 4, 3) and out["tiles"].dtype == np.float32
    assert out["grid"].dtype == np.int32 and out["size"].dtype == np.int32
    assert out["size"].tolist() == [40, 10]
    # By hand: 4x1 (16x4) keeps 16*4 = 64 px at scale 0.4 with no waste; 6x1 keeps 64 but wastes
    # 32; 3x2 (12x8) keeps 12*3 = 36.
    assert out["grid"].tolist() == [4, 1]
    np.testing.assert_allclose(
        out["global_image"], _ref_normalized(rgb, 12, 12, CLIP_MEAN, CLIP_STD), atol=1e-5
    )
    canvas = _ref_normalized(rgb, 16, 4, IMAGENET_MEAN, IMAGENET_STD)
    for c in range(4):
        np.testing.assert_allclose(out["tiles"][c], canvas[:, 4 * c : 4 * c + 4], atol=1e-5)
    assert np.all(out["tiles"][4:] == 0.0)


def test_preprocess_max_tiles_limits_candidates():
    rgb = np.random.default_rng(3).integers(0, 256, (10, 40, 3), dtype=np.uint8)
    out = preprocess(Image.fromarray(rgb), global_size=8, cell=4, max_tiles=3)
    assert out["grid"].tolist() == [3, 1]
    assert out["tiles"].shape == (3, 4, 4, 3)
    canvas = _ref_normalized(rgb, 12, 4, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(merge_tiles(out["tiles"], 3, 1), canvas, atol=1e-5)


def test_preprocess_tall_image_row_major_tiles():
    # Top half white, bottom half black: in a 1xN column grid the first tiles must be the white ones.
    img = np.zeros((200, 20, 3), np.uint8)
    img[:100] = 255
    out = preprocess(img, global_size=8, cell=10, max_tiles=6)
    cols, rows = out["grid"].tolist()
    assert cols == 1 and rows >= 2
    means = out["tiles"][:rows].mean(axis=(1, 2, 3))
    assert means[0] > 0 > means[-1]


def test_preprocess_without_local_tiles():
    rgb = np.random.default_rng(4).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    out = preprocess(rgb, global_size=8, cell=4, max_tiles=6, use_local=False)
    assert out["grid"].tolist() == [0, 0]
    assert out["tiles"].shape == (6, 4, 4, 3) and not out["tiles"].any()
    assert out["size"].tolist() == [11, 9]
    np.testing.assert_allclose(out["global_image"], _ref_normalized(rgb, 8, 8, CLIP_MEAN, CLIP_STD), atol=1e-5)
    assert preprocess(rgb, global_size=8, cell=4, max_tiles=0, use_local=False)["tiles"].shape == (0, 4, 4, 3)


def test_preprocess_errors():
    rgb = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ImageError, match="max_tiles"):
        preprocess(rgb, global_size=8, cell=4, max_tiles=0)
    with pytest.raises(ImageError, match="max_tiles"):
        preprocess(rgb, global_size=8, cell=4, max_tiles=-1, use_local=False)
    with pytest.raises(ImageError, match="no grid"):
        preprocess(rgb, global_size=8, cell=4, max_tiles=3, grids=((2, 2),))
    with pytest.raises(ImageError, match="global_size"):
        preprocess(rgb, global_size=0, cell=4, max_tiles=1)


def test_module_does_not_import_jax():
    assert "jax" not in vars(anyres)
