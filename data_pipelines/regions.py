"""Referred regions -> binary masks -> the sampler's 512 normalized points.

Host-side only (numpy + PIL + pycocotools; no JAX). References: SPEC §4.2 step 1 (points from a
mask), §4.3 (how each referring type becomes a mask), §8 item 1 (layout); DESIGN §5
(`region_points`), §10.

Layout: every mask here is image layout `[H, W]` bool, row = y, column = x. This deliberately
differs from Ferret's `[W, H]` masks (SPEC §4.1 quirk); points come out as (x, y) either way.
Pixel coordinates: x to the right, y down; pixel (x, y) covers [x, x+1) x [y, y+1), so a float
coordinate belongs to pixel floor(.).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

NUM_POINTS = 512  # points per region fed to the sampler (SPEC §4.2)
POINT_HALF_WINDOW = 5  # a point becomes an 11x11 window (SPEC §4.3)


class RegionError(ValueError):
    """A region that cannot be turned into a box or a non-empty mask on the given image."""


# --- region kinds --------------------------------------------------------------------------------


def _finite(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RegionError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise RegionError(f"{name} must be finite, got {value!r}")
    return v


def _point_list(points: Any, kind: str, minimum: int) -> tuple[tuple[float, float], ...]:
    try:
        pts = tuple((_finite(p[0], f"{kind} x"), _finite(p[1], f"{kind} y")) for p in points if len(p) == 2)
        ok = len(pts) == len(points)
    except TypeError:
        ok = False
    if not ok:
        raise RegionError(f"{kind} points must be a sequence of (x, y) pairs, got {points!r}")
    if len(pts) < minimum:
        raise RegionError(f"{kind} needs at least {minimum} points, got {len(pts)}")
    return pts


@dataclass(frozen=True)
class Box:
    """Pixel box, corners inclusive: columns floor(x1)..floor(x2), rows floor(y1)..floor(y2)."""

    x1: float
    y1: float
    x2: float
    y2: float

    def __post_init__(self):
        for name in ("x1", "y1", "x2", "y2"):  # store plain floats so comparisons below are numeric
            object.__setattr__(self, name, _finite(getattr(self, name), f"Box.{name}"))
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise RegionError(f"{self}: corners inverted (need x1 <= x2 and y1 <= y2)")


@dataclass(frozen=True)
class Point:
    """Pixel point (x, y); the referred pixel is (floor(x), floor(y))."""

    x: float
    y: float

    def __post_init__(self):
        object.__setattr__(self, "x", _finite(self.x, "Point.x"))
        object.__setattr__(self, "y", _finite(self.y, "Point.y"))


@dataclass(frozen=True)
class Scribble:
    """Polyline through `points` (pixel (x, y)), drawn with PIL `ImageDraw.line` of `width` pixels."""

    points: tuple[tuple[float, float], ...]
    width: int = 3

    def __post_init__(self):
        object.__setattr__(self, "points", _point_list(self.points, "Scribble", 2))
        if isinstance(self.width, bool) or not isinstance(self.width, (int, np.integer)) or self.width < 1:
            raise RegionError(f"Scribble.width must be a positive int, got {self.width!r}")


@dataclass(frozen=True)
class Polygon:
    """Filled polygon with vertices `points` (pixel (x, y)), drawn with PIL `ImageDraw.polygon`."""

    points: tuple[tuple[float, float], ...]

    def __post_init__(self):
        object.__setattr__(self, "points", _point_list(self.points, "Polygon", 3))


@dataclass(frozen=True, eq=False)  # eq=False: `==` on arrays is elementwise, identity is what fits
class Mask:
    """Binary mask `[H, W]` (row = y) of the whole image; stored as a read-only bool copy."""

    mask: np.ndarray

    def __post_init__(self):
        m = np.asarray(self.mask)
        if m.ndim != 2 or not (m.dtype == bool or np.issubdtype(m.dtype, np.number)):
            raise RegionError(f"Mask.mask must be a 2-D [H, W] bool array, got {m.dtype} {m.shape}")
        m = m.astype(bool)  # astype copies, so freezing it cannot affect the caller's array
        m.flags.writeable = False
        object.__setattr__(self, "mask", m)

    def __repr__(self) -> str:  # the default repr would print the whole array into error messages
        h, w = self.mask.shape
        return f"Mask(<{h}x{w} bool, {int(self.mask.sum())} set>)"


@dataclass(frozen=True, eq=False)
class Rle:
    """COCO RLE {'size': [h, w], 'counts': str | bytes | list[int]} of the whole image."""

    rle: dict

    def __post_init__(self):
        r = self.rle
        if not isinstance(r, dict) or "size" not in r or "counts" not in r:
            raise RegionError(f"Rle needs a dict with 'size' and 'counts', got {_short(r)}")
        size = r["size"]
        if not (
            isinstance(size, (list, tuple))
            and len(size) == 2
            and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size)
        ):
            raise RegionError(f"Rle size must be [h, w] positive ints, got {size!r}")
        if not isinstance(r["counts"], (str, bytes, list)):
            raise RegionError(f"Rle counts must be str, bytes or a list of ints, got {type(r['counts']).__name__}")

    def __repr__(self) -> str:
        h, w = self.rle["size"]
        return f"Rle(<{h}x{w}>)"


Region = Union[Box, Point, Scribble, Polygon, Mask, Rle]
_FREE_FORM = (Scribble, Polygon, Mask, Rle)


def _short(value: Any, limit: int = 80) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _check_size(width: Any, height: Any) -> tuple[int, int]:
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise RegionError(f"image {name} must be a positive int, got {v!r}")
    return int(width), int(height)


# --- rasterization -------------------------------------------------------------------------------


def _clipped_span(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Inclusive pixel span floor(lo)..floor(hi) clipped to 0..size-1; empty when first > last."""
    return max(math.floor(lo), 0), min(math.floor(hi), size - 1)


def box_mask(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> np.ndarray:
    """Inclusive rectangle -> bool `[height, width]`.

    Columns floor(x1)..floor(x2) and rows floor(y1)..floor(y2), clipped to the image; all False
    if nothing remains.
    """
    width, height = _check_size(width, height)
    c1, c2 = _clipped_span(_finite(x1, "x1"), _finite(x2, "x2"), width)
    r1, r2 = _clipped_span(_finite(y1, "y1"), _finite(y2, "y2"), height)
    out = np.zeros((height, width), bool)
    if c1 <= c2 and r1 <= r2:
        out[r1 : r2 + 1, c1 : c2 + 1] = True
    return out


def _decode_rle(rle: dict, width: int, height: int) -> np.ndarray:
    h, w = (int(s) for s in rle["size"])
    if (h, w) != (height, width):
        raise RegionError(f"RLE size [h, w] = [{h}, {w}] does not match the image {width}x{height} (WxH)")
    counts = rle["counts"]
    try:
        if isinstance(counts, list):
            coco = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)  # uncompressed -> compressed
        else:
            coco = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        decoded = mask_utils.decode(coco)
    except Exception as e:  # pycocotools raises a zoo of types on corrupt counts
        raise RegionError(f"cannot decode RLE of size [{h}, {w}]: {e}") from e
    if decoded.shape != (height, width):
        raise RegionError(f"RLE decoded to shape {decoded.shape}, expected [{height}, {width}]")
    return np.ascontiguousarray(decoded, dtype=bool)


def shape_mask(region: Region, width: int, height: int) -> np.ndarray:
    """Raster of a free-form region's own shape -> bool `[height, width]`, clipped to the image.

    Scribble: PIL polyline of the scribble's width. Polygon: PIL filled polygon (outline included).
    Mask / Rle: the mask itself; its size must equal the image size.
    """
    width, height = _check_size(width, height)
    if isinstance(region, (Scribble, Polygon)):
        canvas = Image.new("L", (width, height), 0)  # PIL clips drawing to the canvas
        draw = ImageDraw.Draw(canvas)
        if isinstance(region, Scribble):
            draw.line(list(region.points), fill=1, width=int(region.width))
        else:
            draw.polygon(list(region.points), fill=1, outline=1)
        return np.asarray(canvas) > 0
    if isinstance(region, Mask):
        if region.mask.shape != (height, width):
            raise RegionError(
                f"{region!r}: mask shape [H, W] = {list(region.mask.shape)} does not match the image "
                f"{width}x{height} (WxH)"
            )
        return region.mask.copy()
    if isinstance(region, Rle):
        return _decode_rle(region.rle, width, height)
    raise RegionError(f"shape_mask takes a Scribble, Polygon, Mask or Rle, got {_short(region)}")


def _outside(region: Region, width: int, height: int) -> RegionError:
    return RegionError(f"region {_short(region)} has no pixel inside the {width}x{height} (WxH) image")


def _unknown_kind(region: Any) -> RegionError:
    return RegionError(
        f"unknown region kind {type(region).__name__}: expected Box, Point, Scribble, Polygon, Mask or Rle"
    )


def region_box(region: Region, width: int, height: int) -> tuple[int, int, int, int]:
    """The integer pixel box (x1, y1, x2, y2), inclusive, that the text writes for the region.

    Box: its corners floored and clipped. Point: (x, y, x, y) floored and clamped to the image,
    provided its 11x11 window touches the image. Free-form: the bounding box of its clipped shape
    mask. Raises RegionError if the region has no pixel inside the image.
    """
    width, height = _check_size(width, height)
    if isinstance(region, Box):
        c1, c2 = _clipped_span(region.x1, region.x2, width)
        r1, r2 = _clipped_span(region.y1, region.y2, height)
        if c1 > c2 or r1 > r2:
            raise _outside(region, width, height)
        return c1, r1, c2, r2
    if isinstance(region, Point):
        # Same extent as region_mask's window, so both agree on which points are usable.
        px, py = math.floor(region.x), math.floor(region.y)
        k = POINT_HALF_WINDOW
        if not (-k <= px < width + k and -k <= py < height + k):
            raise _outside(region, width, height)
        x, y = min(max(px, 0), width - 1), min(max(py, 0), height - 1)
        return x, y, x, y
    if isinstance(region, _FREE_FORM):
        shape = shape_mask(region, width, height)
        rows = np.flatnonzero(shape.any(axis=1))
        cols = np.flatnonzero(shape.any(axis=0))
        if rows.size == 0:
            raise _outside(region, width, height)
        return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])
    raise _unknown_kind(region)


def _check_segmentation(segmentation: Any, width: int, height: int) -> np.ndarray:
    seg = np.asarray(segmentation)
    if seg.shape != (height, width):
        raise RegionError(
            f"segmentation must be [H, W] = [{height}, {width}] (image layout, row = y), got shape {seg.shape}"
        )
    return seg.astype(bool)


def _intersect_or_keep(base: np.ndarray, segmentation: np.ndarray | None) -> np.ndarray:
    # SPEC §4.3: an empty intersection falls back to the un-intersected mask.
    if segmentation is None:
        return base
    both = base & segmentation
    return both if both.any() else base


def region_mask(
    region: Region, width: int, height: int, segmentation: np.ndarray | None = None
) -> np.ndarray:
    """Region -> the sampler's bool mask `[height, width]` (SPEC §4.3), clipped to the image.

    Box: the inclusive rectangle, intersected with `segmentation` when given (fallback: rectangle
    if the intersection is empty). Point: the 11x11 window around (floor(x), floor(y)), likewise
    intersected with `segmentation` (for training without a segmentation, pass the object's
    `box_mask` as `segmentation`). Free-form: bounding-box rectangle & shape mask; `segmentation`
    is ignored since the shape already is the object's own mask.

    An empty result falls back to the `region_box` rectangle; RegionError if even that is empty.
    """
    width, height = _check_size(width, height)
    seg = None if segmentation is None else _check_segmentation(segmentation, width, height)
    if isinstance(region, Box):
        mask = _intersect_or_keep(box_mask(region.x1, region.y1, region.x2, region.y2, width, height), seg)
    elif isinstance(region, Point):
        px, py = math.floor(region.x), math.floor(region.y)
        k = POINT_HALF_WINDOW
        mask = _intersect_or_keep(box_mask(px - k, py - k, px + k, py + k, width, height), seg)
    elif isinstance(region, _FREE_FORM):
        shape = shape_mask(region, width, height)
        if not shape.any():
            raise _outside(region, width, height)
        # bounding-box rectangle & shape == shape: the box is the shape's own bounding box.
        mask = shape
    else:
        raise _unknown_kind(region)
    if not mask.any():
        x1, y1, x2, y2 = region_box(region, width, height)  # raises when the region is outside the image
        mask = box_mask(x1, y1, x2, y2, width, height)
    return mask


# --- points --------------------------------------------------------------------------------------


def sample_points(mask: np.ndarray, rng: np.random.Generator, num_points: int = NUM_POINTS) -> np.ndarray:
    """Mask `[H, W]` -> float32 `[num_points, 2]` normalized (x / W, y / H) in [0, 1) (SPEC §4.2 step 1).

    With at least `num_points` set pixels: a uniform random subset without replacement. With fewer:
    all of them (raster order) followed by extra draws with replacement from the same set.
    Deterministic for a given `rng` state.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise RegionError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    if not isinstance(rng, np.random.Generator):
        raise RegionError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)) or num_points <= 0:
        raise RegionError(f"num_points must be a positive int, got {num_points!r}")
    height, width = mask.shape
    flat = np.flatnonzero(mask)  # raster order; (y, x) = divmod(index, W), taken only for the chosen
    n = flat.size
    if n == 0:
        raise RegionError(f"mask of shape [H, W] = [{height}, {width}] is empty: no points to sample")
    if n >= num_points:
        idx = rng.choice(n, size=num_points, replace=False)
    else:
        idx = np.concatenate([np.arange(n), rng.integers(0, n, size=num_points - n)])
    ys, xs = np.divmod(flat[idx], width)
    # Pixel index / size, not / (size - 1): SPEC §4.2. float64 first so only the final cast rounds.
    points = np.stack([xs / width, ys / height], axis=1)
    return points.astype(np.float32)


def region_points(
    region: Region,
    width: int,
    height: int,
    rng: np.random.Generator,
    segmentation: np.ndarray | None = None,
    num_points: int = NUM_POINTS,
) -> np.ndarray:
    """Region -> float32 `[num_points, 2]` normalized (x, y): `sample_points(region_mask(...))`."""
    return sample_points(region_mask(region, width, height, segmentation), rng, num_points)
