"""COCO / LVIS detection JSON -> per-image records of named objects with boxes and masks.

    {"images": [{id, file_name | coco_url, width, height}],
     "annotations": [{image_id, category_id, bbox: [x, y, w, h], segmentation: polygons | RLE}],
     "categories": [{id, name, synonyms?}]}

LVIS names its images by `coco_url` (COCO 2017 files); its category names use underscores
("baseball_bat"), which are written as words. A record is `{'id', 'image' [H, W, 3] uint8,
'objects': [tasks.Annotation], 'categories': all names (for negatives), 'dropped': int}`; objects
whose box or mask has no area are dropped and counted, an image with no usable object is skipped
(reason 'no_objects').
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from data_pipelines import regions as R
from data_pipelines.example import ExampleError
from data_pipelines.sources import files
from data_pipelines.tasks import Annotation


def category_name(name: str) -> str:
    """LVIS 'baseball_bat' -> 'baseball bat'; COCO names pass unchanged."""
    return name.replace("_", " ").strip()


def coco_box(bbox: Any, width: int, height: int) -> tuple[float, float, float, float]:
    """COCO `[x, y, w, h]` -> `(x1, y1, x2, y2)` = (x, y, x + w, y + h) clipped to the image.

    Raises RegionError for malformed, non-positive-size or fully outside boxes.
    """
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise R.RegionError(f"bbox must be [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
        raise R.RegionError(f"bbox {bbox!r} has no area")
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, width - 1.0), min(y + h, height - 1.0)
    if x2 < x1 or y2 < y1:
        raise R.RegionError(f"bbox {bbox!r} lies outside the {width}x{height} image")
    return x1, y1, x2, y2


def segmentation_mask(segmentation: Any, width: int, height: int) -> np.ndarray:
    """COCO segmentation (polygon list, uncompressed or compressed RLE) -> bool `[H, W]`.

    Raises RegionError for malformed input or an empty mask.
    """
    try:
        if isinstance(segmentation, list):
            polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
            if not polygons:
                raise R.RegionError(f"no polygon with >= 3 points in {str(segmentation)[:80]}")
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
            mask = mask_utils.decode(rle).astype(bool)
        elif isinstance(segmentation, dict):
            mask = R.shape_mask(R.Rle(segmentation), width, height)
        else:
            raise R.RegionError(f"segmentation must be polygons or RLE, got {type(segmentation).__name__}")
    except R.RegionError:
        raise
    except Exception as e:  # pycocotools raises assorted types on malformed input
        raise R.RegionError(f"cannot decode segmentation: {e}") from e
    if not mask.any():
        raise R.RegionError("segmentation mask is empty")
    return mask


def annotation(ann: dict, name: str, width: int, height: int, with_mask: bool = True) -> Annotation:
    """One COCO annotation -> `Annotation(name, box, mask)`; RegionError when unusable."""
    if not isinstance(ann, dict):
        raise R.RegionError(f"annotation must be an object, got {type(ann).__name__}")
    box = coco_box(ann.get("bbox"), width, height)
    mask = None
    if with_mask and ann.get("segmentation") not in (None, [], {}):
        mask = segmentation_mask(ann["segmentation"], width, height)
    return Annotation(name, box, mask)


@dataclasses.dataclass(frozen=True)
class _Image:
    file_name: str
    width: int
    height: int


def _image_entry(image: dict) -> _Image | None:
    name = image.get("file_name") or os.path.basename(str(image.get("coco_url", "")))
    width, height = image.get("width"), image.get("height")
    if not name or not isinstance(width, int) or not isinstance(height, int):
        return None
    return _Image(name, width, height)


class DetectionSource:
    """COCO/LVIS detection JSON + image directory -> one record per image with annotations.

    `with_masks=False` skips decoding segmentations (boxes only, faster).
    """

    def __init__(self, annotations: str, image_root: str, with_masks: bool = True):
        doc = files.load_json(annotations, "detection annotations")
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")):
            raise ValueError(f"{annotations}: a COCO/LVIS file needs the lists 'images', 'annotations', 'categories'")
        self.image_root = files.require_dir(image_root, "detection image root")
        self.with_masks = with_masks
        self.categories = {c["id"]: category_name(c["name"]) for c in doc["categories"] if isinstance(c, dict) and "id" in c and "name" in c}
        self.synonyms = {
            category_name(c["name"]): tuple(category_name(s) for s in c.get("synonyms", []) or [c["name"]])
            for c in doc["categories"]
            if isinstance(c, dict) and "name" in c
        }
        by_image: dict[Any, list[dict]] = {}
        for ann in doc["annotations"]:
            if isinstance(ann, dict):
                by_image.setdefault(ann.get("image_id"), []).append(ann)
        self._images = [im for im in doc["images"] if isinstance(im, dict) and by_image.get(im.get("id"))]
        self._anns = [by_image[im["id"]] for im in self._images]
        self.names = tuple(sorted(set(self.categories.values())))

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict:
        entry = _image_entry(self._images[index])
        if entry is None:
            raise ExampleError("bad_record", f"image entry {index} needs file_name (or coco_url), width and height")
        pixels = files.load_image(files.image_path(self.image_root, entry.file_name))
        height, width = pixels.shape[:2]
        if (width, height) != (entry.width, entry.height):
            raise ExampleError("bad_image", f"{entry.file_name}: file is {width}x{height}, annotations say {entry.width}x{entry.height}")
        objects, dropped = [], 0
        for ann in self._anns[index]:
            name = self.categories.get(ann.get("category_id"))
            try:
                if name is None:
                    raise R.RegionError(f"unknown category_id {ann.get('category_id')!r}")
                objects.append(annotation(ann, name, width, height, self.with_masks))
            except (R.RegionError, TypeError, ValueError):
                dropped += 1
        if not objects:
            raise ExampleError("no_objects", f"{entry.file_name}: none of {dropped} annotations is usable")
        return {"id": str(self._images[index].get("id")), "image": pixels, "objects": objects,
                "categories": self.names, "dropped": dropped}
