"""Pictures of what the model was asked and what it answered: input regions and grounded boxes.

Pure PIL. Small images are enlarged (nearest) so that labels stay readable; coordinates are pixels
of the original image.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import anyres
from data_pipelines import regions as R
from data_pipelines.text import Grounding

REGION_COLOUR = (0, 200, 255)  # what the user pointed at
ANSWER_COLOURS = ((255, 60, 60), (255, 200, 0), (80, 255, 80), (255, 100, 255), (255, 150, 40))
MIN_SIDE = 320


def _scale(image: np.ndarray) -> float:
    return max(1.0, MIN_SIDE / min(image.shape[:2]))


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour) -> None:
    x, y = xy
    left, top, right, bottom = draw.textbbox((x, y), text)
    y = max(0.0, y - (bottom - top) - 2)
    draw.rectangle([x, y, x + (right - left) + 4, y + (bottom - top) + 2], fill=colour)
    draw.text((x + 2, y), text, fill=(0, 0, 0))


def draw_answer(
    image, regions: Sequence[R.Region] = (), groundings: Sequence[Grounding] = (), title: str | None = None
) -> Image.Image:
    """The image with each input region (outline of its mask's box, or its point) labelled
    "region k", and each grounded phrase's boxes and points in its own colour, labelled."""
    pixels = anyres.to_rgb(image)
    height, width = pixels.shape[:2]
    s = _scale(pixels)
    canvas = Image.fromarray(pixels).resize((round(width * s), round(height * s)), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for k, region in enumerate(regions):
        if isinstance(region, R.Point):
            x, y = region.x * s, region.y * s
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline=REGION_COLOUR, width=3)
            _label(draw, (x + 6, y), f"region {k + 1}", REGION_COLOUR)
            continue
        x1, y1, x2, y2 = R.region_box(region, width, height)
        draw.rectangle([x1 * s, y1 * s, (x2 + 1) * s, (y2 + 1) * s], outline=REGION_COLOUR, width=3)
        _label(draw, (x1 * s, y1 * s), f"region {k + 1}", REGION_COLOUR)
    for k, g in enumerate(groundings):
        colour = ANSWER_COLOURS[k % len(ANSWER_COLOURS)]
        for x1, y1, x2, y2 in g.boxes:
            # an answer may write its corners swapped (x2 < x1): draw the box they span
            draw.rectangle([min(x1, x2) * s, min(y1, y2) * s, max(x1, x2) * s, max(y1, y2) * s], outline=colour, width=3)
            _label(draw, (x1 * s, y1 * s), g.phrase or "?", colour)
        for x, y in g.points:
            draw.ellipse([x * s - 5, y * s - 5, x * s + 5, y * s + 5], fill=colour)
            _label(draw, (x * s + 6, y * s), g.phrase or "?", colour)
    if title:
        _label(draw, (4, canvas.height), title, (255, 255, 255))
    return canvas


def grid(images: Sequence[Image.Image], columns: int = 4, pad: int = 8) -> Image.Image:
    """Images side by side, `columns` per row, on a dark background."""
    if not images:
        raise ValueError("no images to arrange")
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    rows = -(-len(images) // columns)
    cols = min(columns, len(images))
    out = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), (30, 30, 30))
    for i, im in enumerate(images):
        out.paste(im, (pad + (i % columns) * (cell_w + pad), pad + (i // columns) * (cell_h + pad)))
    return out
