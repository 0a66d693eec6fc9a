"""Any-resolution input: grid selection, stretch resize, tiling and normalization.

Host-side only (numpy + PIL; no JAX). References: SPEC §2.4 (grids, selection rule, row-major split),
§4.6 item 5 (float64 arithmetic of the rule), §6.2 (normalization, bicubic stretch resize);
DESIGN §4-§5 (the `global_image` / `tiles` / `grid` batch keys).

Layout conventions: images are `[H, W, 3]` (row = y), sizes are passed as (width, height), grids as
(cols, rows). A canvas of `cols x rows` cells of side `cell` is `[rows*cell, cols*cell, 3]` and is
split row-major: tile `r * cols + c` covers rows `r*cell:(r+1)*cell`, columns `c*cell:(c+1)*cell`.

Resize-then-split *without* padding (SPEC §2.4, INFERRED there): the stretch keeps a single
normalized coordinate system [0, 1)^2 for the global view, the merged local map and the 0-999 text
coordinates.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
from PIL import Image

# --- constants -----------------------------------------------------------------------------------

# The 14 (cols, rows) configurations of SPEC §2.4, in the order the tie-break depends on.
GRIDS: tuple[tuple[int, int], ...] = (
    (1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1),
    (1, 5), (5, 1), (1, 6), (6, 1), (2, 2), (2, 3), (3, 2),
)  # fmt: skip

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """An image, size or grid argument that the any-res preprocessing cannot use."""


# --- validation helpers --------------------------------------------------------------------------


def _positive_int(value: Any, name: str) -> int:
    # bool is an int subclass; True as a size is always a bug.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ImageError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_grids(grids: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    grids = tuple(grids)
    if not grids:
        raise ImageError("grids is empty: need at least one (cols, rows) candidate")
    out = []
    for g in grids:
        if not (isinstance(g, (tuple, list)) and len(g) == 2):
            raise ImageError(f"each grid must be a (cols, rows) pair, got {g!r}")
        out.append((_positive_int(g[0], "grid cols"), _positive_int(g[1], "grid rows")))
    return tuple(out)


def _check_uint8_rgb(image: Any, name: str = "image") -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ImageError(f"{name} must be a uint8 [H, W, 3] array (use to_rgb), got {desc}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"{name} is empty: shape {image.shape}")
    return image


# --- grid selection (SPEC §2.4, §4.6 item 5) -----------------------------------------------------


def select_grid(
    width: int, height: int, cell: int, grids: Sequence[tuple[int, int]] = GRIDS
) -> tuple[int, int]:
    """LLaVA-NeXT's `select_best_resolution` over the canvases (cols*cell, rows*cell).

    For each candidate canvas (Wc, Hc): scale = min(Wc/W, Hc/H); downscaled = (int(W*scale),
    int(H*scale)); effective = min(dw*dh, W*H); wasted = Wc*Hc - effective. The largest effective
    wins, ties go to the smallest wasted, exact ties to the first candidate in `grids`.

    The arithmetic is Python float64 in HF's expression order on purpose: exact rational arithmetic
    picks a different grid for some sizes (e.g. 2643x2640), see SPEC §4.6 item 5.

    Returns:
      (cols, rows) of the chosen grid.
    """
    width = _positive_int(width, "width")
    height = _positive_int(height, "height")
    cell = _positive_int(cell, "cell")
    grids = _check_grids(grids)

    best = grids[0]
    max_effective = 0
    min_wasted = float("inf")
    for cols, rows in grids:
        canvas_w, canvas_h = cols * cell, rows * cell
        scale = min(canvas_w / width, canvas_h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = canvas_w * canvas_h - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best = effective, wasted, (cols, rows)
    return best


# --- image conversion and resizing ---------------------------------------------------------------


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        array = array[:, :, :3]  # RGBA: drop alpha (no compositing), like PIL's convert("RGB")
    else:
        raise ImageError(f"image array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"image is empty: shape {array.shape}")

    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ImageError("float image contains NaN or inf")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(f"float image values must lie in [0, 1], got [{lo}, {hi}]")
        # Round to nearest: x*255 is exact for the 256 uint8 levels, so uint8 -> float -> uint8 round-trips.
        return np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise ImageError(
                f"integer image values must lie in 0..255, got {lo}..{hi} ({array.dtype}); "
                "rescale 16-bit images explicitly"
            )
        return array.astype(np.uint8)
    raise ImageError(f"unsupported image dtype {array.dtype}: use uint8, an integer type in 0..255 or float in [0, 1]")


def to_rgb(image: Any) -> np.ndarray:
    """A PIL image or numpy array -> uint8 `[H, W, 3]`.

    Accepted: any PIL mode that converts to RGB (L, P, RGBA, LA, CMYK, ...; alpha is dropped, not
    composited); PIL I/F/I;16 modes and numpy arrays `[H, W]`, `[H, W, 1]` (grey), `[H, W, 3]`,
    `[H, W, 4]` (alpha dropped) of dtype uint8, an integer type with values in 0..255, or float with
    values in [0, 1] (scaled by 255 and rounded to nearest).
    """
    if isinstance(image, Image.Image):
        if image.mode in ("I", "F") or image.mode.startswith("I;"):
            # High-bit-depth modes: PIL's convert("RGB") would clip silently; let the array path judge.
            return _array_to_rgb(np.asarray(image))
        return np.asarray(image.convert("RGB")).copy()
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise ImageError(f"image must be a PIL.Image.Image or a numpy array, got {type(image).__name__}")


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Stretch-resize uint8 `[H, W, 3]` -> uint8 `[height, width, 3]` with PIL bicubic.

    No aspect-ratio preservation and no padding (Ferret's convention, SPEC §6.2).
    """
    image = _check_uint8_rgb(image)
    return np.array(_resize_pil(Image.fromarray(image), width, height))


def _resize_pil(image: Image.Image, width: int, height: int) -> np.ndarray:
    """`resize` of an RGB PIL image, as a read-only array (no copy out of PIL's buffer)."""
    width = _positive_int(width, "width")
    height = _positive_int(height, "height")
    return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))


def _normalize_lut(mean: Sequence[float], std: Sequence[float], channels: int) -> np.ndarray:
    """Validated float32 `[channels * 256]` table: entry `c * 256 + v` = `(v / 255 - mean[c]) / std[c]`."""
    mean_a = np.asarray(mean, dtype=np.float32)
    std_a = np.asarray(std, dtype=np.float32)
    if mean_a.shape != (channels,) or std_a.shape != (channels,):
        raise ImageError(
            f"mean/std must have one value per channel ({channels}), got {mean_a.shape} and {std_a.shape}"
        )
    if not np.all(std_a > 0):
        raise ImageError(f"std must be positive, got {tuple(std)}")
    # The same float32 operations, in the same order, as on the image itself: the table is exact.
    levels = np.arange(256, dtype=np.uint8)[None, :].astype(np.float32)
    return ((levels / np.float32(255.0) - mean_a[:, None]) / std_a[:, None]).reshape(-1)


_CHUNK_PIXELS = 1 << 16  # pixels per lookup chunk: the index buffer stays cache-sized


@functools.lru_cache(maxsize=None)
def _channel_offsets(channels: int) -> np.ndarray:
    """Read-only `[_CHUNK_PIXELS * channels]`: `c * 256` for channel c of each element of `[..., C]` pixels."""
    dtype = np.uint16 if channels <= 256 else np.int64
    out = np.tile(np.arange(channels, dtype=dtype) * 256, _CHUNK_PIXELS)
    out.flags.writeable = False
    return out


def _normalize_into(image_uint8: np.ndarray, lut: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Table lookup of uint8 `[..., C]` into the C-contiguous float32 `out` of the same shape."""
    if out.shape != image_uint8.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ImageError(f"out must be C-contiguous float32 {image_uint8.shape}, got {out.dtype} {out.shape}")
    offsets = _channel_offsets(image_uint8.shape[-1])
    flat, flat_out = image_uint8.reshape(-1), out.reshape(-1)  # flat_out is a view: out is contiguous
    index = np.empty(offsets.shape, offsets.dtype)
    for start in range(0, flat.size, offsets.size):
        n = min(offsets.size, flat.size - start)
        np.add(flat[start : start + n], offsets[:n], out=index[:n], dtype=offsets.dtype)
        np.take(lut, index[:n], out=flat_out[start : start + n])
    return out


def normalize(image_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 `[..., 3]` -> float32 `(x / 255 - mean) / std`, per channel.

    Computed as a lookup in a 256-entry table per channel, built with the same float32 operations:
    bit-identical to evaluating the expression on the image, in a fraction of the time.
    """
    if not isinstance(image_uint8, np.ndarray) or image_uint8.dtype != np.uint8:
        raise ImageError(f"normalize expects a uint8 array, got {getattr(image_uint8, 'dtype', type(image_uint8))}")
    channels = image_uint8.shape[-1] if image_uint8.ndim else 0
    lut = _normalize_lut(mean, std, channels)
    return _normalize_into(image_uint8, lut, np.empty(image_uint8.shape, np.float32))


# --- tiling --------------------------------------------------------------------------------------


def split_tiles(canvas: np.ndarray, cols: int, rows: int) -> np.ndarray:
    """Canvas `[rows*ch, cols*cw, C]` -> tiles `[rows*cols, ch, cw, C]`, row-major.

    Tile `r * cols + c` is the cell in grid row r (top to bottom), column c (left to right),
    matching LLaVA's `divide_to_patches` order.
    """
    cols = _positive_int(cols, "cols")
    rows = _positive_int(rows, "rows")
    if not isinstance(canvas, np.ndarray) or canvas.ndim != 3:
        raise ImageError(f"canvas must be a [H, W, C] array, got {getattr(canvas, 'shape', type(canvas))}")
    h, w, c = canvas.shape
    if h % rows or w % cols or h == 0 or w == 0:
        raise ImageError(f"canvas {w}x{h} (WxH) does not split into {cols}x{rows} (cols x rows) equal cells")
    ch, cw = h // rows, w // cols
    return canvas.reshape(rows, ch, cols, cw, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, ch, cw, c)


def merge_tiles(tiles: np.ndarray, cols: int, rows: int) -> np.ndarray:
    """Tiles `[rows*cols, ch, cw, C]` (row-major) -> canvas `[rows*ch, cols*cw, C]`; inverse of split_tiles."""
    cols = _positive_int(cols, "cols")
    rows = _positive_int(rows, "rows")
    if not isinstance(tiles, np.ndarray) or tiles.ndim != 4:
        raise ImageError(f"tiles must be a [N, h, w, C] array, got {getattr(tiles, 'shape', type(tiles))}")
    n, ch, cw, c = tiles.shape
    if n != rows * cols:
        raise ImageError(f"{n} tiles cannot form a {cols}x{rows} (cols x rows) grid")
    return tiles.reshape(rows, cols, ch, cw, c).transpose(0, 2, 1, 3, 4).reshape(rows * ch, cols * cw, c)


# --- full preprocessing --------------------------------------------------------------------------


def preprocess(
    image: Any,
    *,
    global_size: int,
    cell: int,
    max_tiles: int,
    use_local: bool = True,
    grids: Sequence[tuple[int, int]] = GRIDS,
) -> dict[str, np.ndarray]:
    """One image -> the image part of the batch contract (DESIGN §5).

    Returns a dict with:
      global_image: float32 `[global_size, global_size, 3]`, stretch-resized, CLIP-normalized.
      tiles: float32 `[max_tiles, cell, cell, 3]`: the image stretch-resized to the chosen canvas,
        split row-major, ImageNet-normalized (DINOv2); rows past cols*rows are exact zeros.
      grid: int32 `[2]` = (cols, rows). Only grids with cols*rows <= max_tiles are candidates.
      size: int32 `[2]` = the original (width, height).

    With `use_local=False` (stage I / Ferret-v1 mode) no tile is used: `tiles` is all zeros and
    `grid` is (0, 0), so that cols*rows = 0 counts the tiles actually used; `max_tiles` may be 0.
    """
    global_size = _positive_int(global_size, "global_size")
    cell = _positive_int(cell, "cell")
    if isinstance(max_tiles, bool) or not isinstance(max_tiles, (int, np.integer)) or max_tiles < 0:
        raise ImageError(f"max_tiles must be a non-negative int, got {max_tiles!r}")
    max_tiles = int(max_tiles)

    rgb = to_rgb(image)
    height, width = rgb.shape[:2]
    pil = Image.fromarray(rgb)  # both resizes start from the same PIL copy
    global_image = normalize(_resize_pil(pil, global_size, global_size), CLIP_MEAN, CLIP_STD)
    tiles = np.zeros((max_tiles, cell, cell, 3), np.float32)

    if not use_local:
        grid = (0, 0)
    else:
        if max_tiles < 1:
            raise ImageError("use_local=True needs max_tiles >= 1")
        candidates = [g for g in _check_grids(grids) if g[0] * g[1] <= max_tiles]
        if not candidates:
            raise ImageError(f"no grid in {tuple(grids)} has at most max_tiles={max_tiles} cells")
        cols, rows = select_grid(width, height, cell, candidates)
        canvas = _resize_pil(pil, cols * cell, rows * cell)
        # Split the uint8 canvas, then normalize straight into the tile rows (elementwise, so the
        # order of the two does not change a value).
        lut = _normalize_lut(IMAGENET_MEAN, IMAGENET_STD, 3)
        _normalize_into(split_tiles(canvas, cols, rows), lut, tiles[: cols * rows])
        grid = (cols, rows)

    return {
        "global_image": global_image,
        "tiles": tiles,
        "grid": np.asarray(grid, np.int32),
        "size": np.asarray((width, height), np.int32),
    }
