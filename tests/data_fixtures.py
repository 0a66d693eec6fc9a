"""Small annotation files in the real formats over real photographs (skimage.data), for the
source, mixture and malformed-record tests."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import skimage.data

# name -> (skimage loader, size written (W, H), format)
PHOTOS = {
    "astronaut.jpg": (skimage.data.astronaut, (128, 96), "JPEG"),
    "coffee.png": (skimage.data.coffee, (120, 80), "PNG"),
    "chelsea.png": (skimage.data.chelsea, (90, 60), "PNG"),
}


def write_photos(root: str) -> dict[str, np.ndarray]:
    """Write the photos under `root/images`; returns name -> the pixels a reader must decode."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    pixels = {}
    for name, (load, size, fmt) in PHOTOS.items():
        path = os.path.join(root, "images", name)
        Image.fromarray(load()).convert("RGB").resize(size, Image.BICUBIC).save(path, fmt, quality=95)
        with Image.open(path) as im:
            pixels[name] = np.asarray(im.convert("RGB"))
    return pixels


def write_json(path: str, doc) -> str:
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE with str counts (as stored in JSON)."""
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode("ascii")}


def llava_records() -> list[dict]:
    return [
        {"id": "a", "image": "astronaut.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is the person wearing?"},
            {"from": "gpt", "value": "The astronaut wears a white space suit."}]},
        {"id": "b", "image": "coffee.png", "conversations": [
            {"from": "human", "value": "What is in the cup?\n<image>"},
            {"from": "gpt", "value": "There is coffee in the cup on the saucer."},
            {"from": "human", "value": "What colour is the cup?"},
            {"from": "gpt", "value": "It is red."}]},
    ]


def grit_records() -> list[dict]:
    mask = np.zeros((60, 90), bool)
    mask[10:40, 20:60] = True
    return [
        {"id": "g0", "image": "chelsea.png", "image_w": 90, "image_h": 60,
         "conversations": [
             {"from": "human", "value": "<image>\nWhat is in <bbox_location0>?"},
             {"from": "gpt", "value": "A cat <bbox_location0> lying next to a wall <bbox_location1>."}],
         "box_x1y1x2y2": [[[20, 10, 59, 39]], [[20, 10, 59, 39], [0, 0, 89, 9]]],
         "masks": [[rle(mask)], [None, None]]},
        # annotated on a copy twice as large: boxes must be scaled to the file's 128x96
        {"id": "g1", "image": "astronaut.jpg", "image_w": 256, "image_h": 192,
         "conversations": [
             {"from": "human", "value": "Is <bbox_location0> a flag or a helmet?"},
             {"from": "gpt", "value": "It is a flag <bbox_location0>."}],
         "box_x1y1x2y2": [[[0, 0, 60, 80]], [[0, 0, 60, 80]]]},
    ]


def coco_doc() -> dict:
    square = [[10, 10, 50, 10, 50, 40, 10, 40]]  # polygon covering x 10..50, y 10..40 on the 128x96 photo
    blob = np.zeros((80, 120), bool)
    blob[20:60, 30:90] = True
    return {
        "images": [
            {"id": 1, "file_name": "astronaut.jpg", "width": 128, "height": 96},
            {"id": 2, "coco_url": "http://images.cocodataset.org/val2017/coffee.png", "width": 120, "height": 80},
            {"id": 3, "file_name": "chelsea.png", "width": 90, "height": 60},  # no annotations: not a record
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 30], "segmentation": square},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [70, 5, 30, 60], "segmentation": []},
            {"id": 12, "image_id": 1, "category_id": 2, "bbox": [5, 5, 0, 10], "segmentation": []},  # no area: dropped
            {"id": 20, "image_id": 2, "category_id": 3, "bbox": [30, 20, 60, 40], "segmentation": rle(blob)},
        ],
        "categories": [
            {"id": 1, "name": "person", "synonyms": ["person", "human"]},
            {"id": 2, "name": "baseball_bat", "synonyms": ["baseball_bat"]},
            {"id": 3, "name": "cup", "synonyms": ["cup", "mug"]},
        ],
    }
