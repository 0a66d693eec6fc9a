"""Evaluation annotations (SPEC §7.1) -> records an evaluator consumes directly.

Three sources, each random access (`len(source)`, `source[i] -> dict`):

- `RefExpSource`: REC on RefCOCO / RefCOCO+ / RefCOCOg, MDETR's `finetune_refcoco*_{val,testA,...}.json`
  (one COCO `images` entry per referring expression, its GT box in `annotations`).
- `FlickrSource`: Flickr30k Entities phrase grounding, MDETR's `final_flickr_mergedGT_{val,test}.json`
  (one `images` entry per caption; the GT boxes of a phrase are merged into their union).
- `LvisReferringSource`: LVIS referring object classification (one record per annotation).

Every record holds::

    id             str
    image          uint8 [H, W, 3], read on access
    turns          [("human", question)]: the prompt, no answer turn
    regions        the regions the question's `<region_fea>` tokens refer to, in order
    segmentations  one bool [H, W] or None per region (SPEC §4.3's intersection rule)
    question       the question text

plus the task's ground truth (see each class). A file that cannot be opened raises at construction;
a record that cannot be read raises `ExampleError` ('bad_image', 'bad_record', 'bad_region') when
accessed. Entries are kept as encoded JSON and parsed on access, so sources pickle cheaply.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np

from data_pipelines import regions as R
from data_pipelines import tasks, text
from data_pipelines.example import ExampleError
from data_pipelines.sources import detection, files

XYXY = tuple[float, float, float, float]
Span = tuple[int, int]

# --- pure helpers ----------------------------------------------------------------------------------


def xywh_to_xyxy(bbox: Any) -> XYXY:
    """COCO `[x, y, w, h]` -> `(x, y, x + w, y + h)`, not clipped (the evaluator compares as is).

    A malformed or empty box is a bad record: it is ground truth, not a region the model reads.
    """
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ExampleError("bad_record", f"bbox must be [x, y, w, h], got {bbox!r}")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ExampleError("bad_record", f"bbox must hold numbers, got {bbox!r}") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise ExampleError("bad_record", f"bbox {bbox!r} has no area")
    return x, y, x + w, y + h


def union_box(boxes: Sequence[XYXY]) -> XYXY:
    """The smallest box holding all `boxes` (Flickr30k's "merged GT")."""
    if not boxes:
        raise ValueError("union_box needs at least one box")
    x1s, y1s, x2s, y2s = zip(*boxes)
    return min(x1s), min(y1s), max(x2s), max(y2s)


def spans_overlap(a: Span, b: Span) -> bool:
    """Whether half-open character spans [start, end) share a character."""
    return a[0] < b[1] and b[0] < a[1]


def parse_spans(value: Any, length: int) -> list[Span]:
    """`[[start, end], ...]` character spans inside a string of `length`; else a bad record."""
    if not isinstance(value, list) or not value:
        raise ExampleError("bad_record", f"spans must be a non-empty list of [start, end], got {value!r}")
    spans = []
    for span in value:
        ok = (
            isinstance(span, (list, tuple))
            and len(span) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
            and 0 <= span[0] < span[1] <= length
        )
        if not ok:
            raise ExampleError("bad_record", f"span {span!r} is not [start, end] inside a caption of {length} characters")
        spans.append((span[0], span[1]))
    return spans


def phrase_text(caption: str, spans: Sequence[Span]) -> str:
    """The caption's words a phrase covers; a phrase of several spans joins them with a space."""
    return " ".join(caption[s:e].strip() for s, e in spans)


def phrase_boxes(phrases: Sequence[Sequence[Span]], annotations: Sequence[dict], length: int) -> list[XYXY]:
    """One merged box per phrase: the union of the boxes whose `tokens_positive` overlap the phrase.

    MDETR's mergedGT files already hold one box per phrase; grouping by span keeps this right for
    files that list every box. A phrase without any box is a bad record.
    """
    spans_and_boxes = [(parse_spans(a.get("tokens_positive"), length), xywh_to_xyxy(a.get("bbox"))) for a in annotations]
    merged = []
    for k, phrase in enumerate(phrases):
        hits = [box for spans, box in spans_and_boxes if any(spans_overlap(p, s) for p in phrase for s in spans)]
        if not hits:
            raise ExampleError("bad_record", f"phrase {k} (spans {list(phrase)}) has no box")
        merged.append(union_box(hits))
    return merged


def negative_name(names: Sequence[str], excluded: Sequence[str], rng: np.random.Generator) -> str:
    """A category name drawn from `names` that is none of `excluded` (the GT name and synonyms)."""
    excluded = set(excluded)
    pool = [n for n in names if n not in excluded]
    if not pool:
        raise ExampleError("bad_record", f"no negative category besides {list(excluded)[:4]}")
    return pool[int(rng.integers(len(pool)))]


def category_words(category: dict) -> tuple[str, tuple[str, ...]]:
    """An LVIS category's (name, synonyms) written as words; no synonyms -> the name alone."""
    synonyms = [s for s in category.get("synonyms") or [] if isinstance(s, str)] or [category["name"]]
    return detection.category_name(category["name"]), tuple(detection.category_name(s) for s in synonyms)


def ordered_names(index: int, name: str, negative: str) -> tuple[str, str]:
    """SPEC §7.1: the GT and negative alternate by index, GT first on even indices."""
    return (name, negative) if index % 2 == 0 else (negative, name)


# --- shared file handling ----------------------------------------------------------------------------


def _coco_document(path: str, what: str, lists: Sequence[str]) -> dict:
    """A COCO-format JSON object holding the lists `lists`; else ValueError naming what is missing."""
    doc = files.load_json(path, what)
    if not isinstance(doc, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object with the lists {list(lists)}, got {type(doc).__name__}")
    missing = [k for k in lists if not isinstance(doc.get(k), list)]
    if missing:
        raise ValueError(f"{what}: {path} has no list {', '.join(repr(k) for k in missing)} (COCO format needs {list(lists)})")
    return doc


def _annotations_by_image(annotations: list) -> dict[Any, list[dict]]:
    by_image: dict[Any, list[dict]] = {}
    for ann in annotations:
        if isinstance(ann, dict):
            by_image.setdefault(ann.get("image_id"), []).append(ann)
    return by_image


def _image_size(entry: dict) -> tuple[int, int]:
    """(width, height) an image entry declares; positive ints or a bad record."""
    width, height = files.field(entry, "width", int), files.field(entry, "height", int)
    if width <= 0 or height <= 0:
        raise ExampleError("bad_record", f"image size {width}x{height} must be positive")
    return width, height


def _read_image(root: str, name: Any, width: int, height: int) -> np.ndarray:
    """Pixels of `root/name`, refused when the file's size disagrees with the annotations (boxes
    and masks are in the annotated size)."""
    pixels = files.load_image(files.image_path(root, name))
    h, w = pixels.shape[:2]
    if (w, h) != (width, height):
        raise ExampleError("bad_image", f"{name}: file is {w}x{h}, annotations say {width}x{height}")
    return pixels


def _prompt(question: str, grounding_suffix: bool) -> str:
    return text.add_grounding_suffix(question) if grounding_suffix else question


class _EncodedRecords:
    """`len` and raw access over entries kept as encoded JSON (cheap to pickle)."""

    _raw: list[bytes]

    def __len__(self) -> int:
        return len(self._raw)

    def _entry(self, index: int) -> dict:
        return files.decode_record(self._raw[index])


# --- REC: RefCOCO / RefCOCO+ / RefCOCOg --------------------------------------------------------------


class RefExpSource(_EncodedRecords):
    """MDETR's refexp files + the COCO train2014 image directory -> REC records.

    Extra record fields: `expression` (str), `box` (x1, y1, x2, y2) GT in pixels, not clipped.
    The question is SPEC §7.1's `What is the location of <expression> in the image?` (commas
    removed); `grounding_suffix=True` appends the stage III grounding instruction. `regions` and
    `segmentations` are empty. Entries without a GT annotation are skipped and counted in `skipped`;
    an entry with several takes the first.
    """

    def __init__(self, annotations: str, image_root: str, grounding_suffix: bool = False):
        self.image_root = files.require_dir(image_root, "refexp image root")
        doc = _coco_document(annotations, "refexp annotations", ("images", "annotations"))
        self.grounding_suffix = grounding_suffix
        by_image = _annotations_by_image(doc["annotations"])
        self._raw, self.skipped = [], 0
        for entry in doc["images"]:
            anns = by_image.get(entry.get("id")) if isinstance(entry, dict) else None
            if not anns:
                self.skipped += 1
                continue
            self._raw.append(json.dumps({"image": entry, "box": anns[0].get("bbox")}).encode())

    def __getitem__(self, index: int) -> dict:
        raw = self._entry(index)
        entry = files.field(raw, "image", dict)
        expression = files.field(entry, "caption", str).strip()
        if not expression:
            raise ExampleError("bad_record", f"refexp entry {entry.get('id')!r} has an empty expression")
        box = xywh_to_xyxy(raw.get("box"))
        width, height = _image_size(entry)
        image = _read_image(self.image_root, files.field(entry, "file_name", str), width, height)
        question = _prompt(text.rec_question(expression), self.grounding_suffix)
        return {"id": str(entry.get("id")), "image": image, "turns": [("human", question)], "regions": [],
                "segmentations": [], "question": question, "expression": expression, "box": box}


# --- Flickr30k Entities phrase grounding ------------------------------------------------------------


class FlickrSource(_EncodedRecords):
    """MDETR's Flickr30k Entities mergedGT files + the flickr30k image directory -> grounding records.

    Extra record fields: `caption`, `phrases` (the caption's words of each `tokens_positive_eval`
    phrase, spans joined by a space), `boxes` (one merged GT box per phrase, pixels, not clipped).
    The question is SPEC §7.1's `What are the locations of <p1>, <p2>, ...?`. Caption entries with
    no phrase are skipped and counted in `skipped`.
    """

    def __init__(self, annotations: str, image_root: str, grounding_suffix: bool = False):
        self.image_root = files.require_dir(image_root, "flickr image root")
        doc = _coco_document(annotations, "flickr annotations", ("images", "annotations"))
        self.grounding_suffix = grounding_suffix
        by_image = _annotations_by_image(doc["annotations"])
        self._raw, self.skipped = [], 0
        for entry in doc["images"]:
            if not isinstance(entry, dict) or not entry.get("tokens_positive_eval"):
                self.skipped += 1
                continue
            self._raw.append(json.dumps({"image": entry, "annotations": by_image.get(entry.get("id"), [])}).encode())

    def __getitem__(self, index: int) -> dict:
        raw = self._entry(index)
        entry = files.field(raw, "image", dict)
        caption = files.field(entry, "caption", str)
        phrase_list = files.field(entry, "tokens_positive_eval", list)
        phrase_spans = [parse_spans(p, len(caption)) for p in phrase_list]
        anns = [a for a in files.field(raw, "annotations", list) if isinstance(a, dict)]
        boxes = phrase_boxes(phrase_spans, anns, len(caption))
        phrases = [phrase_text(caption, spans) for spans in phrase_spans]
        width, height = _image_size(entry)
        image = _read_image(self.image_root, files.field(entry, "file_name", str), width, height)
        question = _prompt(text.flickr_question(phrases), self.grounding_suffix)
        return {"id": str(entry.get("id")), "image": image, "turns": [("human", question)], "regions": [],
                "segmentations": [], "question": question, "caption": caption, "phrases": phrases, "boxes": boxes}


# --- LVIS referring object classification -------------------------------------------------------------


class LvisReferringSource(_EncodedRecords):
    """LVIS val JSON + COCO 2017 image directory -> one referring classification record per annotation.

    The question is SPEC §7.1's `Is the object <location> <region_fea> of the image a <A> or a <B>?`:
    the GT category and a negative one drawn from `numpy.random.default_rng([seed, index])`, GT
    first on even indices. The region is written as a point, a box or a free-form shape (`kind`);
    its mask follows LVIS evaluation (SPEC §4.3): the point's window or the box's rectangle alone,
    the shape's box intersected with the shape. Extra record fields: `name` and `synonyms` (words,
    not underscores), `negative`, `kind`, `box` (clipped pixel box of the annotation).
    `max_records` keeps the first N annotations. An annotation whose box or mask is unusable raises
    ExampleError('bad_region') on access.
    """

    def __init__(
        self, annotations: str, image_root: str, kind: str = "box", seed: int = 0, max_records: int | None = None
    ):
        if kind not in tasks.REFERRING_KINDS:
            raise ValueError(f"unknown referring kind {kind!r}; choose from {tasks.REFERRING_KINDS}")
        if max_records is not None and max_records < 0:
            raise ValueError(f"max_records must be >= 0 or None, got {max_records}")
        self.image_root = files.require_dir(image_root, "LVIS image root")
        doc = _coco_document(annotations, "LVIS annotations", ("images", "annotations", "categories"))
        self.kind, self.seed = kind, seed
        self.categories = {
            c["id"]: category_words(c) for c in doc["categories"] if isinstance(c, dict) and "id" in c and isinstance(c.get("name"), str)
        }
        self.names = tuple(sorted({name for name, _ in self.categories.values()}))
        if len(self.names) < 2:
            raise ValueError(f"LVIS annotations: {annotations} needs at least two categories to draw negatives")
        images = {im["id"]: im for im in doc["images"] if isinstance(im, dict) and "id" in im}
        self._raw, self.skipped = [], 0
        for ann in doc["annotations"]:
            if max_records is not None and len(self._raw) >= max_records:
                break
            if not isinstance(ann, dict) or ann.get("image_id") not in images:
                self.skipped += 1  # nothing to show: no image entry for it
                continue
            self._raw.append(json.dumps({"image": images[ann["image_id"]], "annotation": ann}).encode())

    def _object(self, ann: dict, name: str, width: int, height: int) -> tasks.Annotation:
        """The annotation as a named box + mask; a free-form region needs the mask."""
        try:
            obj = detection.annotation(ann, name, width, height, with_mask=True)
        except (R.RegionError, TypeError, ValueError) as e:
            raise ExampleError("bad_region", f"annotation {ann.get('id')!r}: {e}") from e
        if self.kind == "free_form" and obj.mask is None:
            raise ExampleError("bad_region", f"annotation {ann.get('id')!r} has no segmentation for a free-form region")
        return obj

    def __getitem__(self, index: int) -> dict:
        raw = self._entry(index)
        entry, ann = files.field(raw, "image", dict), files.field(raw, "annotation", dict)
        if ann.get("category_id") not in self.categories:
            raise ExampleError("bad_record", f"annotation {ann.get('id')!r} has unknown category_id {ann.get('category_id')!r}")
        name, synonyms = self.categories[ann["category_id"]]
        width, height = _image_size(entry)
        obj = self._object(ann, name, width, height)
        file_name = entry.get("file_name") or os.path.basename(str(entry.get("coco_url", "")))
        image = _read_image(self.image_root, file_name, width, height)

        rng = np.random.default_rng([self.seed, index])
        negative = negative_name(self.names, (name, *synonyms), rng)
        try:
            region, segmentation, prompt = tasks.referring_region(obj, self.kind, rng, width, height)
        except R.RegionError as e:
            raise ExampleError("bad_region", f"annotation {ann.get('id')!r}: {e}") from e
        if self.kind != "free_form":
            segmentation = None  # LVIS evaluation uses the point window / box rectangle alone
        location = prompt.removesuffix(f" {text.REGION_TOKEN}")
        question = text.roc_question(location, *ordered_names(index, name, negative))
        return {"id": str(ann.get("id", index)), "image": image, "turns": [("human", question)],
                "regions": [region], "segmentations": [segmentation], "question": question, "name": name,
                "synonyms": synonyms, "negative": negative, "kind": self.kind, "box": obj.box}
