"""Ferret / GRIT JSON -> records with region placeholders (SPEC §5.2).

    [{"image": "path.jpg", "image_w": W, "image_h": H,
      "conversations": [{"from": "human", "value": "What is <bbox_location0>?"}, {"from": "gpt", ...}],
      "box_x1y1x2y2": [[[x1, y1, x2, y2]], []],      # per turn, per placeholder K, pixels of W x H
      "masks": [[{"size": [H, W], "counts": ...}], []]}]   # optional, same nesting (RLE or null)

A record is `{'id', 'image', 'turns', 'boxes', 'masks'}` with boxes rescaled to the decoded
image when its size differs from (image_w, image_h), and masks decoded to bool `[H, W]` (None
where absent). `tasks.fill_placeholders` turns it into text and regions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipelines import regions as R
from data_pipelines.example import ExampleError
from data_pipelines.sources import files
from data_pipelines.sources.conversation import parse_turns


def _per_turn(value: Any, turns: int, name: str) -> list[list]:
    if not isinstance(value, list) or len(value) != turns or not all(isinstance(v, list) for v in value):
        raise ExampleError("bad_record", f"'{name}' must hold one list per turn ({turns})")
    return value


def _scaled(box: Any, sx: float, sy: float) -> tuple[float, ...]:
    if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
        raise ExampleError("bad_record", f"box must be [x1, y1, x2, y2] numbers, got {str(box)[:60]}")
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def _mask(rle: Any, width: int, height: int) -> np.ndarray | None:
    if rle is None:
        return None
    try:
        return R.shape_mask(R.Rle(rle), width, height)
    except R.RegionError as e:
        raise ExampleError("bad_region", f"mask: {e}") from e


class GritSource:
    """GRIT-style referring/grounding JSON (list or JSON Lines) + image directory."""

    def __init__(self, annotations: str, image_root: str):
        self._records = files.read_records(annotations, "GRIT annotations")
        self.image_root = files.require_dir(image_root, "GRIT image root")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        raw = files.decode_record(self._records[index])
        turns = parse_turns(raw.get("conversations"))
        boxes = _per_turn(raw.get("box_x1y1x2y2", [[] for _ in turns]), len(turns), "box_x1y1x2y2")
        masks = raw.get("masks")
        masks = None if masks is None else _per_turn(masks, len(turns), "masks")
        image = files.load_image(files.image_path(self.image_root, raw.get("image")))
        height, width = image.shape[:2]
        declared_w, declared_h = raw.get("image_w", width), raw.get("image_h", height)
        if not all(isinstance(v, (int, float)) and v > 0 for v in (declared_w, declared_h)):
            raise ExampleError("bad_record", f"image_w/image_h must be positive numbers, got {declared_w!r}, {declared_h!r}")
        sx, sy = width / declared_w, height / declared_h  # annotations of a resized copy still fit
        if masks is not None and (sx, sy) != (1.0, 1.0):
            raise ExampleError("bad_image", f"image is {width}x{height} but its masks were made for {declared_w}x{declared_h}")
        return {
            "id": str(raw.get("id", index)),
            "image": image,
            "turns": turns,
            "boxes": [[_scaled(b, sx, sy) for b in turn] for turn in boxes],
            "masks": None if masks is None else [[_mask(m, width, height) for m in turn] for turn in masks],
        }
