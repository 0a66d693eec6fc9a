"""The synthetic shapes world: procedurally drawn scenes with exact object masks, no files needed.

Each scene is a textured background with 1-8 flat-coloured shapes (shape x colour x size) that do
not overlap, so every object's mask is exactly the set of pixels painted in its colour and its box
is the mask's bounding box. Image sizes follow the any-resolution grids: a scene draws a grid
(cols, rows) of `anyres.GRIDS` and a cell side, so wide, tall and square images all occur.

`SyntheticSource(split, num_records, seed)` is a random-access source (`len`, `[i]`) usable with
`grain.MapDataset.source`; record i of a split is the same on every host and every run. Splits use
disjoint seeds, so held-out scenes are never trained on.
"""

from __future__ import annotations

import dataclasses
import inspect
import zlib

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import anyres

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
MAX_OBJECTS = 8  # make_scene's default
SIZES = {"small": (0.12, 0.2), "large": (0.25, 0.4)}  # object side as a fraction of min(W, H)
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str  # the size word of its name ('' in a world that does not name sizes)
    box: tuple[int, int, int, int]  # inclusive pixel box (x1, y1, x2, y2) of the mask
    mask: np.ndarray = dataclasses.field(repr=False, compare=False)  # bool [H, W], row = y

    @property
    def name(self) -> str:
        """Category phrase, e.g. 'small red circle' ('red circle' without a size word)."""
        return " ".join(w for w in (self.size, self.colour, self.shape) if w)


@dataclasses.dataclass(frozen=True)
class Scene:
    image: np.ndarray = dataclasses.field(repr=False, compare=False)  # uint8 [H, W, 3]
    objects: tuple[SceneObject, ...]

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[0]


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Low-frequency colour blotches plus pixel noise, kept dull so shapes stay distinct."""
    coarse = rng.uniform(70, 150, (max(2, height // 24), max(2, width // 24), 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.float32)
    noise = rng.normal(0.0, 8.0, (height, width, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def _shape_mask(shape: str, box: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    x1, y1, x2, y2 = box
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([x1, y1, x2, y2], fill=1)
    elif shape == "square":
        draw.rectangle([x1, y1, x2, y2], fill=1)
    elif shape == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=1)
    elif shape == "diamond":
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    return np.asarray(canvas, bool)


def make_scene(
    rng: np.random.Generator,
    *,
    min_objects: int = 1,
    max_objects: int = MAX_OBJECTS,
    cell_range: tuple[int, int] = (48, 112),
    grids=anyres.GRIDS,
    max_attempts: int = 50,
    sizes: dict[str, tuple[float, float]] | None = None,
    name_sizes: bool = True,
) -> Scene:
    """A random scene: image size from a random any-res grid, 1..max_objects non-overlapping shapes.

    Objects that find no free spot after `max_attempts` tries are left out, so very crowded
    requests may yield fewer objects (never fewer than one). `sizes` overrides the side fractions
    of 'small' and 'large' (e.g. a world of larger objects for a short CPU demo). `name_sizes=False`
    still draws both size classes but leaves the size word out of the names ('red circle').
    """
    sizes = {**SIZES, **(sizes or {})}
    if set(sizes) != set(SIZES) or not all(0 < lo <= hi < 1 for lo, hi in sizes.values()):
        raise ValueError(f"sizes must give (lo, hi) side fractions in (0, 1) for {sorted(SIZES)}, got {sizes}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    cols, rows = grids[rng.integers(len(grids))]
    cell = int(rng.integers(cell_range[0], cell_range[1] + 1))
    width = max(16, int(cols * cell * rng.uniform(0.85, 1.15)))
    height = max(16, int(rows * cell * rng.uniform(0.85, 1.15)))
    image = _background(rng, width, height)
    taken = np.zeros((height, width), bool)
    objects: list[SceneObject] = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        for _ in range(max_attempts):
            side = max(6, int(min(width, height) * rng.uniform(*sizes[size])))
            x1 = int(rng.integers(0, width - side + 1))
            y1 = int(rng.integers(0, height - side + 1))
            mask = _shape_mask(shape, (x1, y1, x1 + side - 1, y1 + side - 1), width, height)
            # a one-pixel margin keeps shapes from touching, so each mask stays one colour blob
            grown = np.zeros_like(taken)
            ys, xs = np.nonzero(mask)
            grown[max(0, ys.min() - 1) : ys.max() + 2, max(0, xs.min() - 1) : xs.max() + 2] = True
            if not (grown & taken).any():
                break
        else:
            continue
        taken |= mask
        image[mask] = COLOURS[colour]
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        objects.append(SceneObject(shape, colour, size if name_sizes else "", box, mask))
    if not objects:  # the first object always fits an empty canvas; keep the guarantee explicit
        raise RuntimeError("could not place any object")
    return Scene(image, tuple(objects))


def split_seed(seed: int, split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    return zlib.crc32(f"{seed}/{split}".encode())


class SyntheticSource:
    """Random-access source of scenes: `len(source)`, `source[i] -> {'id', 'scene'}`.

    Generated on the fly from (seed, split, index), so it needs no files and every process sees
    the same record for the same index.
    """

    def __init__(self, split: str = "train", num_records: int = 100_000, seed: int = 0, **scene_kwargs):
        if num_records <= 0:
            raise ValueError(f"num_records must be positive, got {num_records}")
        self.split, self.num_records = split, num_records
        self._seed = split_seed(seed, split)
        inspect.signature(make_scene).bind(None, **scene_kwargs)  # unknown options fail now, not per record
        self._scene_kwargs = scene_kwargs

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} outside [0, {self.num_records})")
        rng = np.random.default_rng([self._seed, index])
        scene = make_scene(rng, **self._scene_kwargs)
        return {"id": f"synthetic/{self.split}/{index}", "scene": scene, "categories": self.categories}

    @property
    def categories(self) -> tuple[str, ...]:
        """Every object name this source's world can draw."""
        return category_names(self._scene_kwargs.get("name_sizes", True))


def category_names(name_sizes: bool = True) -> tuple[str, ...]:
    """Every object name the world can draw ('small red circle', ...; 'red circle', ... when the
    world does not name sizes), sorted."""
    sizes = SIZES if name_sizes else ("",)
    return tuple(sorted(" ".join(w for w in (size, colour, shape) if w) for size in sizes for colour in COLOURS for shape in SHAPES))
