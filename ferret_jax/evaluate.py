"""Evaluation (SPEC §7.1): model outputs -> REC, ROC and Flickr30k Entities metrics; held-out
synthetic records for the shapes world; a batched greedy runner; the command line.

    python -m ferret_jax.evaluate --checkpoint=DIR --task=rec --annotations=FILE --image_root=DIR --out=OUT
    python -m ferret_jax.evaluate --checkpoint=DIR --task=synthetic_grounding --out=OUT

`--checkpoint` is a training workdir (its latest checkpoint) or a `ferret_jax.export` directory.
`OUT/predictions.jsonl` gets one line per record (id, question, prediction and the per-sample
score); `OUT/metrics.json` the metrics.

Conventions:
- Boxes are pixel `(x1, y1, x2, y2)` with continuous coordinates: area = (x2 - x1) * (y2 - y1),
  as Ferret's evaluation computes IoU. Predicted boxes come from the 0..999 canvas with SPEC
  §5.1's decoding `int(v * size / 1000)` (values past 999 clamp to 999).
- The synthetic grounding ground truth is the object's inclusive mask box `SceneObject.box`:
  the very numbers training encodes in its answers (`tasks.grounding` -> `text.box_text`), so a
  perfect answer decodes to within one pixel of it (images are narrower than 1000 pixels). A
  world trained with `box_quantum` > 1 answers at bin centres and is still scored against the
  exact box (the demo's bins of 100: the true boxes at their bin centres score Acc@0.5 0.975).
- ROC negation rule: see `remove_negations`.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import json
import os
import re
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from data_pipelines import synthetic, tasks, text
from data_pipelines.example import ExampleConfig, ExampleError, build_prompt
from data_pipelines.sources import evaluation as eval_sources
from ferret_jax.checkpoint import TOKENIZER_FILE

TASKS = ("rec", "roc", "flickr", "synthetic_grounding", "synthetic_referring")
IOU_THRESHOLD = 0.5
ZERO_BOX = (0, 0, 0, 0)  # the prediction of an answer without a box (Ferret's REC protocol)
PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"

Box = tuple[float, float, float, float]

# ----------------------------------------------------------------------------------------------
# Geometry


def _box4(box: Sequence[float], what: str) -> Box:
    if len(box) != 4:
        raise ValueError(f"{what} must be (x1, y1, x2, y2), got {box!r}")
    values = tuple(float(v) for v in box)
    if not all(np.isfinite(values)):
        raise ValueError(f"{what} must be finite, got {box!r}")
    return values  # type: ignore[return-value]


def box_area(box: Sequence[float]) -> float:
    """(x2 - x1) * (y2 - y1), continuous coordinates; an inverted or flat box has no area."""
    x1, y1, x2, y2 = _box4(box, "box")
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two pixel boxes (x1, y1, x2, y2), continuous coordinates.

    A box covers [x1, x2] x [y1, y2]; its area is (x2 - x1) * (y2 - y1) (Ferret's convention: no
    +1 for inclusive pixel ends). 0 when the union has no area (e.g. two zero boxes).
    """
    ax1, ay1, ax2, ay2 = _box4(a, "box a")
    bx1, by1, bx2, by2 = _box4(b, "box b")
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def canvas_to_pixels(coords: Sequence[int], width: int, height: int) -> tuple[int, ...]:
    """Canvas (x, y, ...) integers -> pixels, x with `width` and y with `height` (SPEC §5.1).

    Values past 999 clamp to 999 first: a model may emit them, and the box then stays inside.
    """
    sizes = (width, height) * (len(coords) // 2)
    return tuple(text.from_canvas(min(int(v), text.CANVAS - 1), s) for v, s in zip(coords, sizes))


def merged_box(gt: Any) -> Box:
    """One ground-truth box: a box (4 numbers) as is, or the union of a list of boxes (Flickr30k's
    mergedGT protocol; `FlickrSource` records already hold merged boxes)."""
    if len(gt) and all(isinstance(b, (list, tuple, np.ndarray)) for b in gt):
        return eval_sources.union_box([_box4(b, "ground-truth box") for b in gt])
    return _box4(gt, "ground-truth box")


def record_size(record: dict) -> tuple[int, int]:
    """(width, height) of a record's image: its `width`/`height` keys, else the image's shape."""
    if "width" in record and "height" in record:
        return int(record["width"]), int(record["height"])
    if "image" not in record:
        raise ValueError(f"record {record.get('id')!r} has neither width/height nor an image")
    height, width = np.shape(record["image"])[:2]
    return int(width), int(height)


def _check_lengths(predictions: Sequence[str], records: Sequence[dict]) -> None:
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")


def _rate(hits: int, n: int) -> float | None:
    """hits / n; None (JSON null) when there is nothing to score rather than a made-up 0."""
    return hits / n if n else None


# ----------------------------------------------------------------------------------------------
# REC (RefCOCO/+/g and the synthetic grounding records)


def rec_sample(prediction: str, gt_box: Sequence[float], width: int, height: int) -> dict:
    """The first predicted box in pixels (the zero box when none parses) and its IoU with `gt_box`."""
    boxes = text.parse_boxes(prediction)
    box = canvas_to_pixels(boxes[0], width, height) if boxes else ZERO_BOX
    overlap = iou(box, gt_box)
    return {"box": list(box), "iou": overlap, "correct": overlap >= IOU_THRESHOLD}


def rec_accuracy(predictions: Sequence[str], records: Sequence[dict]) -> tuple[dict, list[dict]]:
    """Acc@0.5 (SPEC §7.1): ({'acc50', 'mean_iou', 'n'}, per-sample {'box', 'iou', 'correct'}).

    Records need `box` (pixel GT) and their image size (`record_size`).
    """
    _check_lengths(predictions, records)
    samples = [rec_sample(p, r["box"], *record_size(r)) for p, r in zip(predictions, records)]
    n = len(samples)
    hits = sum(s["correct"] for s in samples)
    mean_iou = sum(s["iou"] for s in samples) / n if n else None
    return {"acc50": _rate(hits, n), "mean_iou": mean_iou, "n": n}, samples


# ----------------------------------------------------------------------------------------------
# ROC (LVIS referring object classification and the synthetic referring records)

# A negated clause: the whole word "not" or "no", up to and including the next punctuation mark
# (or the end of the text, since a generation cut at max_new_tokens may have none). Ferret's
# `remove_not_phrases_v2` does the same for `\s+not[^,.]*[,.]` and `\s+no[^,.]*[,.]`; whole words
# keep "nothing"/"north"/"notebook" intact, and an answer cut short still loses its negation.
NEGATION = re.compile(r"\b(?:not|no)\b[^.,;:!?]*(?:[.,;:!?]|$)", re.IGNORECASE)


def remove_negations(answer: str) -> str:
    """`answer` without its negated clauses ("It is not a cat, it is a dog." -> "It is  it is a dog.")."""
    return NEGATION.sub(" ", answer)


def class_words(name: str, synonyms: Iterable[str] = ()) -> list[str]:
    """The words that name a class: the name and each synonym, underscores as spaces, an LVIS
    qualifier "bat (animal)" split into "bat" and "animal" as Ferret's eval_lvis does."""
    out: list[str] = []
    for word in (name, *synonyms):
        word = word.replace("_", " ")
        for part in re.split(r"[()]", word):
            part = " ".join(part.split())
            if part and part not in out:
                out.append(part)
    return out


def mentions(answer: str, words: str) -> bool:
    """Whether `words` occurs in `answer` as whole words, case-insensitive, any whitespace between."""
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words.split()) + r"(?!\w)"
    return re.search(pattern, answer, re.IGNORECASE) is not None


def roc_correct(prediction: str, name: str, synonyms: Iterable[str] = ()) -> bool:
    """SPEC §7.1: correct when the GT name or a synonym appears once negated clauses are removed.

    Only the GT is looked for, as in Ferret: an answer naming both classes without negating the GT
    ("a cat or a dog") counts as correct.
    """
    kept = remove_negations(prediction)
    return any(mentions(kept, w) for w in class_words(name, synonyms))


def roc_accuracy(predictions: Sequence[str], records: Sequence[dict]) -> tuple[dict, list[dict]]:
    """Accuracy overall and per referring kind: ({'accuracy', 'n', 'accuracy/<kind>', 'n/<kind>'},
    per-sample {'correct', 'kind'}). Records need `name`, `synonyms` and `kind`."""
    _check_lengths(predictions, records)
    samples = [
        {"correct": roc_correct(p, r["name"], r.get("synonyms", ())), "kind": r.get("kind", "box")}
        for p, r in zip(predictions, records)
    ]
    metrics: dict[str, Any] = {"accuracy": _rate(sum(s["correct"] for s in samples), len(samples)), "n": len(samples)}
    for kind in sorted({s["kind"] for s in samples}):
        of_kind = [s for s in samples if s["kind"] == kind]
        metrics[f"accuracy/{kind}"] = _rate(sum(s["correct"] for s in of_kind), len(of_kind))
        metrics[f"n/{kind}"] = len(of_kind)
    return metrics, samples


# ----------------------------------------------------------------------------------------------
# Flickr30k Entities phrase grounding


def flickr_sample(prediction: str, phrases: Sequence[str], gt_boxes: Sequence[Any], width: int, height: int) -> list[dict]:
    """Per GT phrase: the first box of the first predicted grounding with an equal normalized phrase
    (`text.normalize_phrase`) and at least one box, its IoU with the merged GT box, and whether it
    is a hit (IoU >= 0.5). A phrase no grounding matches is a miss (box None, IoU 0)."""
    if len(phrases) != len(gt_boxes):
        raise ValueError(f"{len(phrases)} phrases but {len(gt_boxes)} ground-truth boxes")
    groundings = [g for g in text.parse_groundings(prediction, width, height) if g.boxes]
    out = []
    for phrase, gt in zip(phrases, gt_boxes):
        key = text.normalize_phrase(phrase)
        match = next((g for g in groundings if g.phrase == key), None)
        box = match.boxes[0] if match else None
        overlap = iou(box, merged_box(gt)) if box else 0.0
        out.append({"phrase": phrase, "box": list(box) if box else None, "iou": overlap, "hit": overlap >= IOU_THRESHOLD})
    return out


def flickr_recall(predictions: Sequence[str], records: Sequence[dict]) -> tuple[dict, list[dict]]:
    """Recall@1 at IoU 0.5 over all phrases (SPEC §7.1, mergedGT): ({'recall1', 'n_phrases',
    'n'}, per-sample {'phrases': [...], 'hits'}). Records need `phrases` and `boxes`."""
    _check_lengths(predictions, records)
    samples = []
    for p, r in zip(predictions, records):
        per_phrase = flickr_sample(p, r["phrases"], r["boxes"], *record_size(r))
        samples.append({"phrases": per_phrase, "hits": sum(q["hit"] for q in per_phrase)})
    n_phrases = sum(len(s["phrases"]) for s in samples)
    recall = _rate(sum(s["hits"] for s in samples), n_phrases)
    return {"recall1": recall, "n_phrases": n_phrases, "n": len(samples)}, samples


def grounding_by_scene(samples: Sequence[dict], records: Sequence[dict]) -> dict:
    """What the synthetic grounding answers hit, by the number of objects in the scene.

    Records need `other_boxes` (the scene's other objects, pixels); `samples` are `rec_accuracy`'s.
    Returns `acc50_by_objects` ({objects in the scene: Acc@0.5}) and `other_object_rate`: the share
    of answers in scenes of several objects whose box has IoU >= 0.5 with another object than the
    one asked for (it picked the wrong object), None without such scenes; and
    `acc50_by_raster_rank`: Acc@0.5 in those scenes by where the asked object comes in raster order
    (`tasks.raster_order`: 1 = first), the order of the visual tokens. A model that picks objects
    by name scores the ranks alike; one that reads whichever object comes first does not.
    """
    _check_lengths(samples, records)
    hits, by_rank, wrong, crowded = collections.defaultdict(list), collections.defaultdict(list), 0, 0
    for s, r in zip(samples, records):
        hits[1 + len(r["other_boxes"])].append(s["correct"])
        if r["other_boxes"]:
            crowded += 1
            wrong += any(iou(s["box"], b) >= IOU_THRESHOLD for b in r["other_boxes"])
            key = (r["box"][1], r["box"][0])
            by_rank[1 + sum((b[1], b[0]) < key for b in r["other_boxes"])].append(s["correct"])
    return {"acc50_by_objects": {n: _rate(sum(h), len(h)) for n, h in sorted(hits.items())},
            "other_object_rate": _rate(wrong, crowded) if crowded else None,
            "acc50_by_raster_rank": {n: _rate(sum(h), len(h)) for n, h in sorted(by_rank.items())}}


def score(task: str, predictions: Sequence[str], records: Sequence[dict]) -> tuple[dict, list[dict]]:
    """The task's metric function."""
    if task == "synthetic_grounding":
        metrics, samples = rec_accuracy(predictions, records)
        return {**metrics, **grounding_by_scene(samples, records)}, samples
    if task == "rec":
        return rec_accuracy(predictions, records)
    if task in ("roc", "synthetic_referring"):
        return roc_accuracy(predictions, records)
    if task == "flickr":
        return flickr_recall(predictions, records)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


# ----------------------------------------------------------------------------------------------
# Held-out synthetic records (the shapes world's "test" split by default)

_GROUNDING_STREAM, _REFERRING_STREAM = 1, 2  # keep record choices apart from the scene's own draws


def _record_rng(split: str, seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([synthetic.split_seed(seed, split), index, stream])


def _scenes(split: str, seed: int, needed: int, world: dict | None = None) -> Iterable[tuple[int, dict]]:
    """(index, scene record) of the split in order; a generous bound since a few may be skipped.
    `world` holds `make_scene` options: the world the model was trained on (e.g. the demo's)."""
    source = synthetic.SyntheticSource(split, 4 * needed + 64, seed, **(world or {}))
    return ((i, source[i]) for i in range(len(source)))


def _check_count(num_records: int) -> None:
    if num_records <= 0:
        raise ValueError(f"num_records must be positive, got {num_records}")


def synthetic_grounding_records(
    split: str = "test", num_records: int = 200, seed: int = 0, grounding_suffix: bool = True, world: dict | None = None
) -> list[dict]:
    """REC-style records on synthetic scenes, one per scene, deterministic for (split, seed).

    Each asks for an object whose name is unique in its scene (so one box is the answer; scenes
    without such an object are skipped), with the question `tasks.grounding` trains on: the REC
    prompt plus, with `grounding_suffix` (stage III's form, the default), the coordinates suffix.
    Fields: id, image, turns, regions [], segmentations [], question, expression (the name), box:
    the object's inclusive mask box in pixels, what training writes as the answer, and
    other_boxes: the scene's other objects' boxes.
    """
    _check_count(num_records)
    out = []
    for index, rec in _scenes(split, seed, num_records, world):
        scene = rec["scene"]
        counts = collections.Counter(o.name for o in scene.objects)
        unique = [o for o in scene.objects if counts[o.name] == 1]
        if not unique:
            continue
        obj = unique[_record_rng(split, seed, index, _GROUNDING_STREAM).integers(len(unique))]
        width, height = scene.size
        task = tasks.grounding(obj.name, [obj.box], width, height, suffix=grounding_suffix)
        question = task.turns[0][1]
        out.append({"id": rec["id"], "image": scene.image, "turns": [("human", question)], "regions": [],
                    "segmentations": [], "question": question, "expression": obj.name, "box": tuple(obj.box),
                    "other_boxes": [tuple(o.box) for o in scene.objects if o is not obj]})
        if len(out) == num_records:
            return out
    raise RuntimeError(f"only {len(out)} of {num_records} synthetic scenes have an object with a unique name")


def synthetic_referring_records(
    split: str = "test", num_records: int = 200, seed: int = 0, kinds: Sequence[str] = tasks.REFERRING_KINDS,
    world: dict | None = None,
) -> list[dict]:
    """ROC records on synthetic scenes, one per scene, deterministic for (split, seed).

    Record i refers to a random object of scene i as `kinds[i % len(kinds)]` and asks SPEC §7.1's
    question with the GT name and a negative name absent from the scene, GT first on even i. The
    region and its segmentation are those `tasks.referring_classification` trains with (the
    `tasks.referring_region` of the object). Fields: id, image, turns, regions, segmentations,
    question, name, synonyms (name,), negative, kind, box (the object's inclusive mask box).
    """
    _check_count(num_records)
    kinds = tuple(kinds)
    if not kinds or any(k not in tasks.REFERRING_KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty selection of {tasks.REFERRING_KINDS}, got {kinds}")
    names = synthetic.category_names((world or {}).get("name_sizes", True))
    out = []
    for index, rec in _scenes(split, seed, num_records, world):
        scene = rec["scene"]
        rng = _record_rng(split, seed, index, _REFERRING_STREAM)
        obj = scene.objects[rng.integers(len(scene.objects))]
        present = {o.name for o in scene.objects}
        negatives = [n for n in names if n not in present]
        negative = negatives[rng.integers(len(negatives))]
        kind = kinds[len(out) % len(kinds)]
        width, height = scene.size
        region, segmentation, prompt = tasks.referring_region(
            tasks.Annotation(obj.name, obj.box, obj.mask), kind, rng, width, height
        )
        location = prompt.removesuffix(f" {text.REGION_TOKEN}")
        question = text.roc_question(location, *eval_sources.ordered_names(len(out), obj.name, negative))
        out.append({"id": rec["id"], "image": scene.image, "turns": [("human", question)], "regions": [region],
                    "segmentations": [segmentation], "question": question, "name": obj.name, "synonyms": (obj.name,),
                    "negative": negative, "kind": kind, "box": tuple(obj.box)})
        if len(out) == num_records:
            return out
    raise RuntimeError(f"only {len(out)} of {num_records} synthetic referring records could be built")


# ----------------------------------------------------------------------------------------------
# Runner


def stack_prompts(prompts: Sequence[dict]) -> dict[str, np.ndarray]:
    """`build_prompt` outputs -> one batch dict (leading batch axis)."""
    return {k: np.stack([p[k] for p in prompts]) for k in prompts[0]}


def decode_output(tokens: np.ndarray, length: int, tokenizer: text.Tokenizer) -> str:
    """One generated row -> text: the first `length` tokens, cut at the first eos. Ids the
    tokenizer does not have (an LLM vocabulary padded past it) are dropped, not fatal."""
    ids = [int(t) for t in np.asarray(tokens)[: int(length)]]
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    ids = [i for i in ids if 0 <= i < tokenizer.vocab_size]
    return tokenizer.decode(ids).split(text.SEP2)[0].strip()


def _record_prompt(records, index: int, tokenizer, example_config, rng_seed: int) -> dict:
    """The generation prompt of record `index`; ExampleError when it cannot be read or built. Each
    record seeds its own point subsets, so prompts do not depend on the batch size."""
    record = records[index]
    rng = np.random.default_rng([rng_seed, index])
    return build_prompt(record["image"], record["turns"], record["regions"], tokenizer, example_config, rng,
                        record.get("segmentations"))


def predict_detailed(
    model,
    params,
    tokenizer: text.Tokenizer,
    example_config: ExampleConfig,
    records: Sequence[dict],
    sampling,
    batch_size: int,
    rng_seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[list[str], dict[int, str]]:
    """`predict` plus the failures: {record index: "reason: message"}.

    `records` is any random-access sequence (a list or an evaluation source); each record is read
    once, in order, one batch at a time, so images are never all in memory.
    """
    import jax  # here, not at the top: the metrics and records need no JAX
    import jax.numpy as jnp

    from ferret_jax.generate import make_generate

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generate = make_generate(model, sampling)
    key = jax.random.key(rng_seed)
    total = len(records)
    predictions = [""] * total
    failures: dict[int, str] = {}
    start = time.time()
    for first in range(0, total, batch_size):
        indices = list(range(first, min(first + batch_size, total)))
        built: dict[int, dict] = {}
        for i in indices:
            try:
                built[i] = _record_prompt(records, i, tokenizer, example_config, rng_seed)
            except ExampleError as e:
                failures[i] = f"{e.reason}: {e}"
                log(f"[predict] record {i} failed ({e.reason}): {e}")
        if built:
            # Fixed batch shape (one compilation): failed rows and the tail repeat a built prompt;
            # their outputs are dropped.
            last = built[max(built)]
            rows = [built.get(i, last) for i in indices] + [last] * (batch_size - len(indices))
            batch = {k: jnp.asarray(v) for k, v in stack_prompts(rows).items()}
            out = jax.device_get(generate(params, batch, jax.random.fold_in(key, first)))
            for row, i in enumerate(indices):
                if i in built:
                    predictions[i] = decode_output(out["tokens"][row], out["lengths"][row], tokenizer)
        done = indices[-1] + 1
        rate = done / max(time.time() - start, 1e-9)
        log(f"[predict] {done}/{total} records, {rate:.2f} records/s, {len(failures)} failed")
    return predictions, failures


def predict(
    model,
    params,
    tokenizer: text.Tokenizer,
    example_config: ExampleConfig,
    records: Sequence[dict],
    sampling,
    batch_size: int,
    rng_seed: int = 0,
) -> list[str]:
    """Generate an answer per record (its `turns`, `regions`, `segmentations`) in fixed-size
    batches with one compiled `make_generate`; a record that cannot become a prompt gets "" and
    is reported (see `predict_detailed` for the failures themselves)."""
    return predict_detailed(model, params, tokenizer, example_config, records, sampling, batch_size, rng_seed)[0]


# ----------------------------------------------------------------------------------------------
# Model loading


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the frozen config dataclasses hold."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _config(cls, values: Any, where: str):
    """`cls(**values)` with lists as tuples; a clear error for a non-dict or unknown fields."""
    if not isinstance(values, dict):
        raise ValueError(f"model config {where}: expected a dict, got {type(values).__name__}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"model config {where}: unknown fields {unknown} for {cls.__name__}")
    return cls(**{k: _tuples(v) for k, v in values.items()})


def ferret_config_from_dict(d: dict):
    """A `FerretConfig` back from `dataclasses.asdict` output read from JSON (checkpoint meta)."""
    from ferret_jax.models.clip import ClipConfig
    from ferret_jax.models.dinov2 import Dinov2Config
    from ferret_jax.models.ferret import FerretConfig
    from ferret_jax.models.llama import LlamaConfig
    from ferret_jax.models.sampler import SamplerConfig

    if not isinstance(d, dict):
        raise ValueError(f"model config must be a dict, got {type(d).__name__}")
    missing = [k for k in ("clip", "dino", "llm") if k not in d]
    if missing:
        raise ValueError(f"model config lacks {missing}")
    nested = {"clip": ClipConfig, "dino": Dinov2Config, "llm": LlamaConfig, "sampler": SamplerConfig}
    top = {k: v for k, v in d.items() if k not in nested}
    top.update({k: _config(cls, d[k], k) for k, cls in nested.items() if k in d})
    return _config(FerretConfig, top, "top level")


def source_meta(source: str) -> dict:
    """The meta of an export (`export.json`) or of a training run's latest checkpoint."""
    from ferret_jax import checkpoint

    if not os.path.isdir(source):
        raise FileNotFoundError(f"checkpoint {source!r}: no such directory (a training workdir or an export)")
    if os.path.exists(os.path.join(source, checkpoint.EXPORT_PARAMS)):
        meta_path = os.path.join(source, checkpoint.EXPORT_META)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"export {source!r} has params but no {checkpoint.EXPORT_META}")
        with open(meta_path) as f:
            return json.load(f)
    if checkpoint.latest_step(source) is None:
        raise FileNotFoundError(
            f"checkpoint {source!r}: neither an export ({checkpoint.EXPORT_PARAMS}/ + {checkpoint.EXPORT_META}) "
            f"nor a training workdir with checkpoints"
        )
    return checkpoint.read_meta(source)


def synthetic_world(meta: dict) -> dict | None:
    """`make_scene` options of the first synthetic training source in a checkpoint's config: the
    held-out scenes then come from the world the model was trained on."""
    sources = ((meta.get("config") or {}).get("data") or {}).get("sources") or {}
    for spec in sources.values():
        if isinstance(spec, dict) and spec.get("type") == "synthetic":
            scene_options = inspect.signature(synthetic.make_scene).parameters
            return {k: v for k, v in spec.items() if k in scene_options}
    return None


def _max_length(meta: dict, model_config, max_length: int | None) -> int:
    """Prompt length: the argument, else the training run's `data.max_length`, else the LLM's
    `max_position_embeddings` (exports drop the training config)."""
    if max_length is not None:
        return int(max_length)
    data = (meta.get("config") or {}).get("data") or {}
    if "max_length" in data:
        return int(data["max_length"])
    return int(model_config.llm.max_position_embeddings)


def _system_prompt(meta: dict) -> bool:
    """Whether the model was trained with the system prompt (the training run's
    `data.system_prompt`; runs and exports without the key had it)."""
    return bool(((meta.get("config") or {}).get("data") or {}).get("system_prompt", True))


def load_model(source: str, max_length: int | None = None, max_regions: int = 1):
    """(model, params, tokenizer, example_config) from a training workdir or an export directory.

    The model config comes from the checkpoint meta (`meta['model']`), the tokenizer from
    `source/tokenizer.model`. Params are restored onto the first device. `max_regions` bounds the
    regions of one prompt (the evaluation prompts refer to at most one).
    """
    import jax

    from ferret_jax import checkpoint
    from ferret_jax.models.ferret import Ferret, example_batch
    from ferret_jax.train import _values

    meta = source_meta(source)
    if "model" not in meta:
        raise ValueError(f"checkpoint {source!r}: its meta has no 'model' config")
    model_config = ferret_config_from_dict(meta["model"])
    tokenizer_path = os.path.join(source, TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"checkpoint {source!r} has no {TOKENIZER_FILE}")
    tokenizer = text.Tokenizer(model_file=tokenizer_path)
    if tokenizer.region_id >= model_config.llm.vocab_size:
        raise ValueError(f"{tokenizer_path} needs {tokenizer.region_id + 1} ids, the LLM has {model_config.llm.vocab_size}")

    model = Ferret(model_config)
    sample = example_batch(model_config, batch=1, regions=max_regions)
    abstract = _values(jax.eval_shape(model.init, jax.random.key(0), sample)["params"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    stored = meta.get("dtype")  # an export's params dtype: keep it (bfloat16 halves the memory)

    def slot(a):
        dtype = stored if stored and jax.numpy.issubdtype(a.dtype, jax.numpy.floating) else a.dtype
        return jax.ShapeDtypeStruct(a.shape, dtype, sharding=device)

    target = jax.tree.map(slot, abstract)
    params, _ = checkpoint.load_params(source, target)
    example_config = ExampleConfig.for_model(model_config, _max_length(meta, model_config, max_length), max_regions,
                                             _system_prompt(meta))
    return model, params, tokenizer, example_config


# ----------------------------------------------------------------------------------------------
# Records and the evaluation run


class _Head:
    """The first `n` records of a random-access source."""

    def __init__(self, source, n: int):
        self.source, self.n = source, min(n, len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.source[index]


class _GroundTruth:
    """Passes records through to the runner and keeps each one's ground truth without its pixels
    (plus its image size), so scoring needs no second read; a record that fails to be read is
    remembered with its error and re-raised."""

    _HEAVY = ("image", "regions", "segmentations")

    def __init__(self, records):
        self.records = records
        self.kept: dict[int, dict] = {}
        self.unreadable: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        try:
            record = self.records[index]
        except ExampleError as e:
            self.unreadable[index] = f"{e.reason}: {e}"
            raise
        width, height = record_size(record)
        self.kept[index] = {**{k: v for k, v in record.items() if k not in self._HEAVY}, "width": width, "height": height}
        return record


def _require(value: str | None, flag: str, task: str) -> str:
    if not value:
        raise FileNotFoundError(f"task {task!r} needs --{flag}")
    return value


def load_records(
    task: str,
    annotations: str | None = None,
    image_root: str | None = None,
    kind: str | None = None,
    max_records: int | None = None,
    num_records: int = 200,
    seed: int = 0,
    grounding_suffix: bool | None = None,
    world: dict | None = None,
):
    """The task's records (a random-access sequence).

    rec / flickr / roc read `annotations` + `image_root` (`data_pipelines.sources.evaluation`);
    the synthetic tasks build `num_records` (or `max_records`) records of the "test" split.
    `grounding_suffix` None means the task's default: Ferret's plain prompt for rec / flickr,
    stage III's suffixed prompt for synthetic_grounding (the form the demo model trains on).
    `kind` picks the ROC referring kind (default box; the synthetic task cycles all three).
    `world`: `make_scene` options of the synthetic tasks (default: the library's world).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if max_records is not None and max_records <= 0:
        raise ValueError(f"max_records must be positive, got {max_records}")
    if kind is not None and kind not in tasks.REFERRING_KINDS:
        raise ValueError(f"unknown referring kind {kind!r}; choose from {tasks.REFERRING_KINDS}")
    count = max_records or num_records
    if task == "synthetic_grounding":
        return synthetic_grounding_records("test", count, seed, True if grounding_suffix is None else grounding_suffix, world)
    if task == "synthetic_referring":
        return synthetic_referring_records("test", count, seed, (kind,) if kind else tasks.REFERRING_KINDS, world)
    annotations = _require(annotations, "annotations", task)
    image_root = _require(image_root, "image_root", task)
    if task == "roc":
        return eval_sources.LvisReferringSource(annotations, image_root, kind or "box", seed, max_records)
    cls = eval_sources.RefExpSource if task == "rec" else eval_sources.FlickrSource
    source = cls(annotations, image_root, grounding_suffix=bool(grounding_suffix))
    return _Head(source, max_records) if max_records else source


def _json_ready(value: Any) -> Any:
    """numpy scalars and tuples -> plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def prediction_lines(predictions, failures: dict[int, str], gt: _GroundTruth, samples: dict[int, dict]) -> list[dict]:
    """One predictions.jsonl entry per record, in order: id, question, prediction, the per-sample
    score (when scored) and the error (when the record failed)."""
    lines = []
    for i, prediction in enumerate(predictions):
        kept = gt.kept.get(i, {})
        line = {"index": i, "id": kept.get("id"), "question": kept.get("question"), "prediction": prediction}
        line.update(samples.get(i, {}))
        if i in failures:
            line["error"] = failures[i]
        lines.append(_json_ready(line))
    return lines


def evaluate(
    task: str,
    source: str,
    out_dir: str,
    *,
    annotations: str | None = None,
    image_root: str | None = None,
    kind: str | None = None,
    max_records: int | None = None,
    num_records: int = 200,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    seed: int = 0,
    grounding_suffix: bool | None = None,
    max_length: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs `task` on the model at `source` and writes `out_dir/predictions.jsonl` and
    `out_dir/metrics.json`; returns the metrics.

    Greedy decoding (SPEC §7.1's temperature 0.001 is effectively greedy) up to `max_new_tokens`.
    A record that cannot be read has no ground truth: it is listed with its error and counted in
    `n_failed` but not scored. A record that cannot become a prompt is scored with an empty answer.
    """
    from ferret_jax.generate import Sampling

    if not os.path.isdir(source):  # fail before reading annotations
        raise FileNotFoundError(f"checkpoint {source!r}: no such directory (a training workdir or an export)")
    world = synthetic_world(source_meta(source)) if task.startswith("synthetic") else None
    records = load_records(task, annotations, image_root, kind, max_records, num_records, seed, grounding_suffix, world)
    os.makedirs(out_dir, exist_ok=True)
    model, params, tokenizer, example_config = load_model(source, max_length)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, eos_id=tokenizer.eos_id)
    gt = _GroundTruth(records)
    predictions, failures = predict_detailed(model, params, tokenizer, example_config, gt, sampling, batch_size, seed, log)

    scored = sorted(gt.kept)
    metrics, per_sample = score(task, [predictions[i] for i in scored], [gt.kept[i] for i in scored])
    reasons = collections.Counter(f.split(":", 1)[0] for f in failures.values())
    metrics = {"task": task, "checkpoint": os.path.abspath(source), **metrics, "n_records": len(predictions),
               "n_failed": len(failures), "n_unreadable": len(gt.unreadable), "failures": dict(sorted(reasons.items()))}
    lines = prediction_lines(predictions, failures, gt, dict(zip(scored, per_sample)))
    with open(os.path.join(out_dir, PREDICTIONS_FILE), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    with open(os.path.join(out_dir, METRICS_FILE), "w") as f:
        json.dump(_json_ready(metrics), f, indent=2)
    return metrics


def metrics_table(metrics: dict) -> str:
    """The metrics as an aligned two-column text table (nested dicts flattened with '/')."""
    rows = []

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, float):
            rows.append((prefix, f"{value:.4f}"))
        else:
            rows.append((prefix, "-" if value is None else str(value)))

    add("", metrics)
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# ----------------------------------------------------------------------------------------------
# CLI


def main() -> None:
    """The command line; flags are defined here so importing this module defines none."""
    from absl import app, flags, logging

    checkpoint_flag = flags.DEFINE_string("checkpoint", None, "training workdir or export directory")
    task = flags.DEFINE_enum("task", None, TASKS, "what to evaluate")
    out = flags.DEFINE_string("out", None, "output directory for predictions.jsonl and metrics.json")
    annotations = flags.DEFINE_string("annotations", None, "annotation file (rec, roc, flickr)")
    image_root = flags.DEFINE_string("image_root", None, "image directory (rec, roc, flickr)")
    kind = flags.DEFINE_enum("kind", None, tasks.REFERRING_KINDS, "ROC referring kind (roc: box; synthetic: all)")
    max_records = flags.DEFINE_integer("max_records", None, "evaluate only the first N records")
    num_records = flags.DEFINE_integer("num_records", 200, "synthetic tasks: number of records")
    batch_size = flags.DEFINE_integer("batch_size", 8, "prompts per generation batch")
    max_new_tokens = flags.DEFINE_integer("max_new_tokens", 64, "generated tokens per answer at most")
    seed = flags.DEFINE_integer("seed", 0, "records (synthetic, ROC negatives) and region point subsets")
    suffix = flags.DEFINE_boolean("grounding_suffix", None, "append the coordinates suffix to grounding questions "
                                  "(default: rec/flickr no, synthetic_grounding yes)")
    max_length = flags.DEFINE_integer("max_length", None, "prompt length (default: the training config's)")
    flags.mark_flags_as_required(["checkpoint", "task", "out"])

    def run(argv) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:  # checkpoint libraries log every read at INFO
            logging.set_verbosity(logging.WARNING)
        try:
            metrics = evaluate(
                task.value, checkpoint_flag.value, out.value, annotations=annotations.value, image_root=image_root.value,
                kind=kind.value, max_records=max_records.value, num_records=num_records.value,
                batch_size=batch_size.value, max_new_tokens=max_new_tokens.value, seed=seed.value,
                grounding_suffix=suffix.value, max_length=max_length.value,
            )
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
        print(metrics_table(metrics))
        print(f"wrote {os.path.join(out.value, PREDICTIONS_FILE)} and {os.path.join(out.value, METRICS_FILE)}")

    app.run(run)


if __name__ == "__main__":
    main()
