"""Task builders: annotated objects -> conversations (turns) + the regions they refer to.

Shared by every source that knows objects (COCO/LVIS detections, the synthetic world): an object is
an `Annotation(name, box, mask)`. Each builder returns a `Task` whose `turns` already contain the
hybrid region text (`[x1, y1, x2, y2] <region_fea>`, SPEC §5.1) for each entry of `regions`, in
order, ready for `example.build_example`. Prompts are SPEC §5.3's (stage II) and §7.1's (the
evaluation prompts the model must answer in stage III).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from data_pipelines import regions as R
from data_pipelines import text
from data_pipelines.example import ExampleError, region_prompt

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
    repairs: dict[str, int] = dataclasses.field(default_factory=dict)  # what was fixed on the way, by reason


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
    objects: Sequence[Annotation], width: int, height: int, rng: np.random.Generator, max_objects: int = 10,
    quantum: int = 1,
) -> Task:
    """Stage II Dense Detection: every (up to `max_objects`) object with its box, raster order
    (coordinates in `quantum`-wide bins, `text.box_text`)."""
    chosen = raster_order(_subset(objects, max_objects, rng))
    listed = [f"{o.name} {text.box_text(o.box, width, height, quantum)}" for o in chosen]
    return Task([("human", DENSE_DETECTION_Q), ("gpt", f"The objects are: {_numbered(listed)}.")], [], [])


def grounding(name: str, boxes: Sequence[Sequence[float]], width: int, height: int, suffix: bool = True,
              quantum: int = 1) -> Task:
    """REC-style grounding (SPEC §7.1 prompt): where is <name>? -> '<name> [box].', or
    '<name> [[box1], [box2]].' when several objects answer to the name (V2 Fig. 1). The name is
    written as asked, as in Dense Detection's '1: <name> [box]': the answer's name is then the
    question's tokens, not a capitalized variant the model has to learn to map to them. The
    coordinates are in `quantum`-wide bins (`text.box_text`)."""
    if not boxes:
        raise ValueError(f"no box to ground {name!r}")
    question = text.rec_question(name)
    if suffix:
        question = text.add_grounding_suffix(question)
    coords = [text.box_text(b, width, height, quantum) for b in boxes]
    written = coords[0] if len(coords) == 1 else "[" + ", ".join(coords) + "]"
    return Task([("human", question), ("gpt", f"{name} {written}.")], [], [])


def referring_classification(
    obj: Annotation, negative: str, width: int, height: int, rng: np.random.Generator, kind: str = "box"
) -> Task:
    """LVIS-style binary referring question (SPEC §7.1): 'Is the object <loc> a A or a B?'."""
    region, seg, prompt = referring_region(obj, kind, rng, width, height)
    names = [obj.name, negative] if rng.integers(2) == 0 else [negative, obj.name]
    question = text.roc_question(prompt.removesuffix(f" {text.REGION_TOKEN}"), *names)
    return Task([("human", question), ("gpt", referring_answer(obj.name))], [region], [seg])


def referring_answer(name: str) -> str:
    """The binary-choice referring answer the world's conversations write: 'It is a <name>.'"""
    return f"It is a {name}."


def referred_name(answer: str) -> str | None:
    """The name a `referring_answer` states; None for any other text."""
    named = re.fullmatch(r"It is a (.+)\.", answer)
    return named.group(1) if named else None


def caption(objects: Sequence[Annotation]) -> Task:
    """Stage I caption alignment for object-annotated images: a plain list of what is there."""
    if not objects:
        raise ValueError("no objects to caption")
    names = [o.name for o in raster_order(objects)]
    body = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return Task([("human", "Describe the image briefly."), ("gpt", f"The image shows {body}.")], [], [])


def combine(parts: Sequence[Task]) -> Task:
    """One multi-turn conversation from single-turn tasks about the same image: turns, regions and
    segmentations concatenated in order, repairs summed. The image and system prompt are paid once
    for all the answers, which is most of a short example's sequence."""
    if not parts:
        raise ValueError("nothing to combine")
    repairs: dict[str, int] = {}
    for p in parts:
        for k, v in p.repairs.items():
            repairs[k] = repairs.get(k, 0) + v
    return Task([t for p in parts for t in p.turns], [r for p in parts for r in p.regions],
                [s for p in parts for s in p.segmentations], repairs)


def _subset(objects: Sequence[Annotation], k: int, rng: np.random.Generator) -> list[Annotation]:
    if not objects:
        raise ValueError("no objects to build a task from")
    if len(objects) <= k:
        return list(objects)
    return [objects[i] for i in sorted(rng.choice(len(objects), size=k, replace=False))]


# ----------------------------------------------------------------------------------------------
# Conversations from files: LLaVA/ShareGPT4V as they are, GRIT with its region placeholders.


def conversation(turns: Sequence[tuple[str, str]]) -> Task:
    """A conversation without regions (captions, VQA, OCR): the turns as given."""
    return Task(list(turns), [], [])


PLACEHOLDER = re.compile(r"<bbox_location(\d+)>")
_ANY_PLACEHOLDER = re.compile(r"<bbox_location[^>]*>")
HUMAN_KINDS = ("point", "box")  # how a human turn's region is written (SPEC §4.3, chosen at random)


def _checked_box(box, width: int, height: int) -> tuple[tuple[float, float, float, float], bool]:
    """(box clipped to the image, whether clipping changed it); ExampleError for unusable boxes."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError) as e:
        raise ExampleError("bad_region", f"box must be 4 numbers, got {box!r}") from e
    if not all(np.isfinite([x1, y1, x2, y2])) or x2 <= x1 or y2 <= y1:
        raise ExampleError("bad_region", f"box {box!r} has no area")
    clipped = (max(x1, 0.0), max(y1, 0.0), min(x2, width - 1.0), min(y2, height - 1.0))
    if clipped[2] < clipped[0] or clipped[3] < clipped[1]:
        raise ExampleError("bad_region", f"box {box!r} lies outside the {width}x{height} image")
    return clipped, clipped != (x1, y1, x2, y2)


def fill_placeholders(
    turns: Sequence[tuple[str, str]],
    boxes: Sequence[Sequence],
    masks: Sequence[Sequence[np.ndarray | None]] | None,
    width: int,
    height: int,
    rng: np.random.Generator,
    human_kinds: Sequence[str] = HUMAN_KINDS,
) -> Task:
    """GRIT turns with `<bbox_locationK>` -> hybrid region text (SPEC §5.2).

    `boxes[t][K]` is the pixel box of placeholder K in turn t, `masks[t][K]` its optional bool
    mask. In a human turn a placeholder becomes a point or a box at random plus `<region_fea>`
    (one region each, in order of appearance); in a gpt turn, the box text. Boxes reaching outside
    the image are clipped (counted as 'clipped_box'); unknown placeholders, boxes without area and
    empty masks raise ExampleError.
    """
    if len(boxes) != len(turns) or (masks is not None and len(masks) != len(turns)):
        raise ExampleError("bad_placeholder", f"{len(turns)} turns but {len(boxes)} box lists")
    out_turns, regions_, segs, clipped_count = [], [], [], 0
    for t, (role, value) in enumerate(turns):
        pieces, last = [], 0
        for m in _ANY_PLACEHOLDER.finditer(value):
            full = PLACEHOLDER.fullmatch(m.group(0))
            k = int(full.group(1)) if full else -1
            if not 0 <= k < len(boxes[t]):
                raise ExampleError("bad_placeholder", f"turn {t}: {m.group(0)} but {len(boxes[t])} boxes")
            box, clipped = _checked_box(boxes[t][k], width, height)
            clipped_count += clipped
            if role == text.GPT_ROLE:
                written = text.box_text(box, width, height)
            else:
                mask = masks[t][k] if masks is not None and k < len(masks[t]) else None
                if mask is not None and not np.asarray(mask).any():
                    raise ExampleError("bad_region", f"turn {t}: mask of {m.group(0)} is empty")
                kind = human_kinds[rng.integers(len(human_kinds))]
                region, seg, written = referring_region(Annotation("", box, mask), kind, rng, width, height)
                regions_.append(region)
                segs.append(seg)
            pieces += [value[last : m.start()], written]
            last = m.end()
        out_turns.append((role, "".join(pieces) + value[last:]))
    return Task(out_turns, regions_, segs, {"clipped_box": clipped_count} if clipped_count else {})


# ----------------------------------------------------------------------------------------------
# VQA / OCR unification (SPEC §5.3): write detector and OCR boxes into the answers.


@dataclasses.dataclass(frozen=True)
class Detection:
    """A detector's box for a phrase (GLIPv2 over VQA data) or an OCR word's box."""

    phrase: str
    box: tuple[float, float, float, float]  # pixel (x1, y1, x2, y2)
    score: float = 1.0


def _phrase_pattern(phrase: str) -> re.Pattern:
    words = [re.escape(w) for w in phrase.split()]
    # whole words, case-insensitive; a plural 's'/'es' on the last word still matches
    return re.compile(r"(?<![\w\[])" + r"\s+".join(words) + r"(?:e?s)?(?![\w\]])", re.IGNORECASE)


def ground_answer(answer: str, detections: Sequence[Detection], width: int, height: int, min_score: float = 0.5) -> tuple[str, int]:
    """Write each detected phrase's boxes right after its first mention in `answer`.

    Several boxes for one phrase are written as a list, `cups [[x1, y1, x2, y2], [...]]`
    (V2 Fig. 1); detections below `min_score`, without area, or whose phrase is not mentioned are
    ignored. Returns (grounded answer, number of boxes written).
    """
    by_phrase: dict[str, list[tuple[float, float, float, float]]] = {}
    for d in detections:
        phrase = " ".join(str(d.phrase).split())
        if not phrase or d.score < min_score:
            continue
        try:
            box, _ = _checked_box(d.box, width, height)
        except ExampleError:
            continue
        by_phrase.setdefault(phrase.lower(), []).append(box)
    insertions: list[tuple[int, int, str, int]] = []  # mention (start, end), coordinates text, boxes
    for phrase in sorted(by_phrase, key=len, reverse=True):  # longer phrases claim their words first
        for m in _phrase_pattern(phrase).finditer(answer):
            if any(s < m.end() and m.start() < e for s, e, _, _ in insertions):
                continue
            coords = [text.box_text(b, width, height) for b in by_phrase[phrase]]
            written = coords[0] if len(coords) == 1 else "[" + ", ".join(coords) + "]"
            insertions.append((m.start(), m.end(), written, len(coords)))
            break
    out = answer
    for _, end, written, _ in sorted(insertions, reverse=True):
        out = f"{out[:end]} {written}{out[end:]}"
    return out, sum(n for *_, n in insertions)


def grounded_conversation(
    turns: Sequence[tuple[str, str]], detections: Sequence[Detection], width: int, height: int, min_score: float = 0.5
) -> Task:
    """A VQA/OCR conversation with the boxes written into its answers; the first question gets the
    task-generalization suffix (SPEC §5.3) when any box was written."""
    out, total = [], 0
    for role, value in turns:
        if role == text.GPT_ROLE:
            value, n = ground_answer(value, detections, width, height, min_score)
            total += n
        out.append((role, value))
    if total and out and out[0][0] == text.HUMAN_ROLE:
        out[0] = (out[0][0], text.add_grounding_suffix(out[0][1]))
    return Task(out, [], [])
