"""grain graphs from sources to batches of the contract: mix, shuffle, repeat, shard, build, batch.

    MapDataset.range per source -> (source, index) -> mix(weights) -> shuffle(seed) -> repeat
      -> [process_index::process_count] -> random_map(ExampleTransform) -> batch -> iterator

Everything before the iterator is random-access, so the iterator's `get_state()` is a small JSON-able
dict and `set_state` resumes exactly. Bad data never raises: a record that fails (unreadable, or
refused by `build_example`) is replaced by a deterministic redraw from the same source, and the
failure is counted in the example's `skips` vector (`[len(SKIP_REASONS)]`, summed over a batch),
which the trainer logs. Bad configuration raises before anything runs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import grain
import numpy as np

from data_pipelines import example as ex
from data_pipelines import tasks, text

# Why a drawn record was skipped (redrawn), and what was repaired in a kept one; counted per example.
SKIP_REASONS = (
    "too_many_regions", "region_without_slot", "slot_without_region", "too_long", "bad_region",
    "bad_record", "bad_image", "no_image", "no_objects", "bad_placeholder",
)
REPAIR_REASONS = ("clipped_box", "dropped_annotation")
MAX_REDRAWS = 16
MAX_QUESTIONS = 3  # stage III questions per image (each may refer to one region)
GROUNDING_SHARE = 0.5  # stage III: the default share of those questions that ask for a box

# A task function turns one source record into (image, Task).
TaskFn = Callable[[dict, np.random.Generator], tuple[np.ndarray, tasks.Task]]


class ExampleTransform(grain.transforms.RandomMap):
    """`(source id, record index)` -> one contract example plus its `skips` and `repairs` counts."""

    def __init__(self, sources: Sequence, task_fns: Sequence[TaskFn], tokenizer_proto: bytes, config: ex.ExampleConfig):
        self.sources, self.task_fns, self.config = list(sources), list(task_fns), config
        self._proto = tokenizer_proto
        self._tokenizer = None

    def __getstate__(self):  # SentencePiece processors don't pickle; worker processes rebuild it
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self) -> text.Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = text.Tokenizer(model_proto=self._proto)
        return self._tokenizer

    def random_map(self, element, rng: np.random.Generator) -> dict:
        source_id, index = (int(v) for v in element)
        source, task_fn = self.sources[source_id], self.task_fns[source_id]
        skips = np.zeros(len(SKIP_REASONS), np.int32)
        for _ in range(MAX_REDRAWS):
            try:
                record = source[index]
                image, task = task_fn(record, rng)
                out = ex.build_example(image, task.turns, task.regions, self.tokenizer, self.config, rng, task.segmentations)
            except ex.ExampleError as e:
                skips[SKIP_REASONS.index(e.reason if e.reason in SKIP_REASONS else "bad_record")] += 1
            except (ValueError, KeyError, TypeError, OSError, IndexError):
                skips[SKIP_REASONS.index("bad_record")] += 1
            else:
                repairs = {"dropped_annotation": record.get("dropped", 0), **task.repairs}
                out["skips"] = skips
                out["repairs"] = np.asarray([repairs.get(r, 0) for r in REPAIR_REASONS], np.int32)
                return out
            index = int(rng.integers(len(source)))
        raise RuntimeError(
            f"source {source_id}: {MAX_REDRAWS} consecutive records could not become examples "
            f"({dict(zip(SKIP_REASONS, skips.tolist()))}); check the data and the config (max_length, max_regions)"
        )


def build_batches(
    sources: Sequence,
    weights: Sequence[float],
    task_fns: Sequence[TaskFn],
    tokenizer_proto: bytes,
    config: ex.ExampleConfig,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """The per-process batches as a random-access (infinite) `MapDataset`: batch i is `ds[i]`."""
    if not sources or not (len(sources) == len(weights) == len(task_fns)):
        raise ValueError(f"{len(sources)} sources, {len(weights)} weights, {len(task_fns)} task functions: need equal, non-zero counts")
    if any(w <= 0 for w in weights):
        raise ValueError(f"mixture weights must be positive, got {list(weights)}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    if any(len(s) == 0 for s in sources):
        raise ValueError("a source is empty")
    parts = [
        grain.MapDataset.range(len(src)).map(lambda i, k=k: np.array([k, i], np.int64)) for k, src in enumerate(sources)
    ]
    ds = grain.MapDataset.mix(parts, weights) if len(parts) > 1 else parts[0]
    ds = ds.shuffle(seed=seed).repeat()
    ds = ds[process_index::process_count]
    ds = ds.random_map(ExampleTransform(sources, task_fns, tokenizer_proto, config), seed=seed + 1)
    return ds.batch(batch_size, drop_remainder=True)


# grain's default (16 threads, 500 elements) would build up to 500 whole batches ahead, taking the
# cores from the training step for minutes on a small host; a few batches ahead hide the latency.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def build_dataset(*args, read_options: grain.ReadOptions | None = None, **kwargs) -> grain.IterDataset:
    """The per-process batch stream (infinite: the mixture repeats with a new shuffle per epoch);
    arguments as `build_batches`; `read_options`: threads building batches ahead and how many
    (default DEFAULT_READ_OPTIONS). Its iterator's state round-trips with get_state/set_state."""
    return build_batches(*args, **kwargs).to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)


# ----------------------------------------------------------------------------------------------
# Task functions per record kind


def _check_stage(stage: int) -> int:
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
    return stage


def objects_task(stage: int, grounding_share: float = GROUNDING_SHARE, box_quantum: int = 1) -> TaskFn:
    """Records with named objects (`{'image', 'objects', 'categories'}`: COCO/LVIS, TFDS detection,
    the synthetic world), one multi-turn conversation per image:
    stage 1, a caption; stage 2, Dense Referring and Dense Detection (SPEC §5.3) in random order;
    stage 3, one question for each of up to MAX_QUESTIONS objects in random order, each
    grounding with the coordinates suffix (with probability `grounding_share`) or referring
    classification against a category absent from the image (point, box or free-form, at
    random); grounding whenever no category is absent. The answers' boxes (Dense Detection,
    grounding) write each coordinate as the centre of its `box_quantum`-wide bin of the 0..999
    canvas (1: exactly; `text.box_text`)."""
    _check_stage(stage)
    text.check_box_quantum(box_quantum)  # before any record is read
    if not 0.0 <= grounding_share <= 1.0:
        raise ValueError(f"grounding_share must be in [0, 1], got {grounding_share}")

    def fn(record: dict, rng: np.random.Generator):
        image, objs = record["image"], record["objects"]
        h, w = image.shape[:2]
        if stage == 1:
            return image, tasks.caption(objs)
        if stage == 2:
            parts = [tasks.dense_referring(objs, w, h, rng), tasks.dense_detection(objs, w, h, rng, quantum=box_quantum)]
            return image, tasks.combine(parts[:: 1 if rng.integers(2) else -1])
        present = {o.name for o in objs}
        negatives = [c for c in record["categories"] if c not in present]
        parts = []
        for k in rng.permutation(len(objs))[: MAX_QUESTIONS]:
            obj = objs[k]
            if negatives and rng.random() >= grounding_share:
                kind = tasks.REFERRING_KINDS[rng.integers(len(tasks.REFERRING_KINDS))]
                negative = negatives[rng.integers(len(negatives))]
                parts.append(tasks.referring_classification(obj, negative, w, h, rng, kind))
            else:
                boxes = [o.box for o in objs if o.name == obj.name]
                parts.append(tasks.grounding(obj.name, boxes, w, h, quantum=box_quantum))
        return image, tasks.combine(parts)

    return fn


def synthetic_task(stage: int, grounding_share: float = GROUNDING_SHARE, box_quantum: int = 1) -> TaskFn:
    """`objects_task` over the synthetic world's scenes."""
    fn = objects_task(stage, grounding_share, box_quantum)

    def synthetic_fn(record: dict, rng: np.random.Generator):
        scene = record["scene"]
        objs = [tasks.Annotation(o.name, o.box, o.mask) for o in scene.objects]
        return fn({"image": scene.image, "objects": objs, "categories": record["categories"]}, rng)

    return synthetic_fn


def conversation_task(record: dict, rng: np.random.Generator):
    """LLaVA/ShareGPT4V conversations as they are."""
    return record["image"], tasks.conversation(record["turns"])


def grit_task(record: dict, rng: np.random.Generator):
    """GRIT referring/grounding: placeholders -> points or boxes (human) and boxes (gpt)."""
    h, w = record["image"].shape[:2]
    return record["image"], tasks.fill_placeholders(record["turns"], record["boxes"], record["masks"], w, h, rng)


def grounded_conversation_task(min_score: float = 0.5) -> TaskFn:
    """VQA/OCR conversations with detector and OCR boxes written into the answers (SPEC §5.3)."""

    def fn(record: dict, rng: np.random.Generator):
        h, w = record["image"].shape[:2]
        return record["image"], tasks.grounded_conversation(record["turns"], record["detections"], w, h, min_score)

    return fn


def refexp_task(record: dict, rng: np.random.Generator):
    """RefCOCO-style records as stage III grounding with the coordinates suffix."""
    h, w = record["image"].shape[:2]
    return record["image"], tasks.grounding(record["expression"].replace(",", ""), [record["box"]], w, h)
