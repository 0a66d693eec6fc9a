"""Task builders: annotated objects -> conversations (turns) + the regions they refer to.

Shared by every source that knows objects (COCO/LVIS detections, the synthetic world): an object is
an `Annotation(name, box, mask)`. Each builder returns a `Task` whose `turns` already contain the
hybrid region text (`[x1, y1, x2, y2] <region_fea>`, SPEC §5.1) for each entry of `regions`, in
order, ready for `example.build_example`. Prompts are SPEC §5.3's (stage II) and §7.1's (the
evaluation prompts the model must answer in stage III).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from data_pipelines import regions as R
from data_pipelines import text
from data_pipelines.example import region_prompt

DENSE_REFERRING_Q = "Please classify the objects in the following locations."
DENSE_DETECTION_Q = "Please localize visible objects in the image in a raster scan order."
REFERRING_KINDS = ("point", "box", "free_form")


@dataclasses.dataclass(frozen=True)
class Annotation:
    name: str
    box: tuple[float, float, float, float]  # pixel (x1, y1, x2, y2), inclusive
    mask: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)  # bool [H, W]


@dataclasses.dataclass(frozen=True)
class Task:
    turns: list[tuple[str, str]]
    regions: list[R.Region]
    segmentations: list[np.ndarray | None]


def raster_order(objects: Sequence[Annotation]) -> list[Annotation]:
    """Top to bottom, then left to right: sorted by the box's (y1, x1) (SPEC §5.3, INFERRED key)."""
    return sorted(objects, key=lambda o: (o.box[1], o.box[0]))


def referring_point(obj: Annotation, rng: np.random.Generator) -> R.Point:
    """The point a user would click for `obj` (SPEC §4.3 'segment_mask|center'): with a mask, the
    mask pixel nearest the box centre among up to 1000 random ones; else a Gaussian around the
    centre (std 0.15 x box side), redrawn until it falls inside the box."""
    x1, y1, x2, y2 = obj.box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if obj.mask is not None and obj.mask.any():
        ys, xs = np.nonzero(obj.mask)
        pick = rng.choice(len(xs), size=min(1000, len(xs)), replace=False)
        best = pick[np.argmin((xs[pick] - cx) ** 2 + (ys[pick] - cy) ** 2)]
        return R.Point(float(xs[best]), float(ys[best]))
    for _ in range(100):
        x = rng.normal(cx, 0.15 * max(x2 - x1, 1))
        y = rng.normal(cy, 0.15 * max(y2 - y1, 1))
        if x1 <= x <= x2 and y1 <= y <= y2:
            return R.Point(float(x), float(y))
    return R.Point(float(cx), float(cy))


def referring_region(
    obj: Annotation, kind: str, rng: np.random.Generator, width: int, height: int
) -> tuple[R.Region, np.ndarray | None, str]:
    """(region, segmentation for SPEC §4.3's ∩ rule, its prompt text) of one referred object.

    A point is intersected with the object's mask, or with its box when there is no mask; a box
    with the mask; 'free_form' is the mask itself and falls back to a box without one.
    """
    if kind not in REFERRING_KINDS:
        raise ValueError(f"unknown referring kind {kind!r}; choose from {REFERRING_KINDS}")
    if kind == "point":
        seg = obj.mask if obj.mask is not None else R.box_mask(*obj.box, width, height)
        region = referring_point(obj, rng)
    elif kind == "free_form" and obj.mask is not None:
        region, seg = R.Mask(obj.mask), None
    else:
        region, seg = R.Box(*obj.box), obj.mask
    return region, seg, region_prompt(region, width, height)


def _numbered(items: Sequence[str]) -> str:
    return ", ".join(f"{i + 1}: {s}" for i, s in enumerate(items))


def dense_referring(
    objects: Sequence[Annotation], width: int, height: int, rng: np.random.Generator,
    max_objects: int = 10, kinds: Sequence[str] = REFERRING_KINDS,
) -> Task:
    """Stage II Dense Referring: classify up to `max_objects` objects given by point/box/free-form."""
    chosen = raster_order(_subset(objects, max_objects, rng))
    regions_, segs, prompts = [], [], []
    for obj in chosen:
        region, seg, prompt = referring_region(obj, kinds[rng.integers(len(kinds))], rng, width, height)
        regions_.append(region)
        segs.append(seg)
        prompts.append(prompt)
    question = f"{DENSE_REFERRING_Q} {_numbered(prompts)}."
    answer = f"Here are the categories: {_numbered([o.name for o in chosen])}."
    return Task([("human", question), ("gpt", answer)], regions_, segs)


def dense_detection(
    objects: Sequence[Annotation], width: int, height: int, rng: np.random.Generator, max_objects: int = 10
) -> Task:
    """Stage II Dense Detection: every (up to `max_objects`) object with its box, raster order."""
    chosen = raster_order(_subset(objects, max_objects, rng))
    listed = [f"{o.name} {text.box_text(o.box, width, height)}" for o in chosen]
    return Task([("human", DENSE_DETECTION_Q), ("gpt", f"The objects are: {_numbered(listed)}.")], [], [])


def grounding(obj: Annotation, width: int, height: int, suffix: bool = True) -> Task:
    """REC-style grounding (SPEC §7.1 prompt): where is <name>? -> '<name> [box]'."""
    question = text.rec_question(obj.name)
    if suffix:
        question = text.add_grounding_suffix(question)
    answer = f"{obj.name.capitalize()} {text.box_text(obj.box, width, height)}."
    return Task([("human", question), ("gpt", answer)], [], [])


def referring_classification(
    obj: Annotation, negative: str, width: int, height: int, rng: np.random.Generator, kind: str = "box"
) -> Task:
    """LVIS-style binary referring question (SPEC §7.1): 'Is the object <loc> a A or a B?'."""
    region, seg, prompt = referring_region(obj, kind, rng, width, height)
    names = [obj.name, negative] if rng.integers(2) == 0 else [negative, obj.name]
    question = text.roc_question(prompt.removesuffix(f" {text.REGION_TOKEN}"), *names)
    return Task([("human", question), ("gpt", f"It is a {obj.name}.")], [region], [seg])


def caption(objects: Sequence[Annotation]) -> Task:
    """Stage I caption alignment for object-annotated images: a plain list of what is there."""
    if not objects:
        raise ValueError("no objects to caption")
    names = [o.name for o in raster_order(objects)]
    body = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return Task([("human", "Describe the image briefly."), ("gpt", f"The image shows {body}.")], [], [])


def _subset(objects: Sequence[Annotation], k: int, rng: np.random.Generator) -> list[Annotation]:
    if not objects:
        raise ValueError("no objects to build a task from")
    if len(objects) <= k:
        return list(objects)
    return [objects[i] for i in sorted(rng.choice(len(objects), size=k, replace=False))]
