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
from data_pipelines import synthetic, tasks, text

SKIP_REASONS = ("too_many_regions", "region_without_slot", "slot_without_region", "too_long", "bad_region", "bad_record")
MAX_REDRAWS = 16

# A task function turns one source record into (image, Task).
TaskFn = Callable[[dict, np.random.Generator], tuple[np.ndarray, tasks.Task]]


class ExampleTransform(grain.transforms.RandomMap):
    """`(source id, record index)` -> one contract example plus its `skips` counts."""

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
                image, task = task_fn(source[index], rng)
                out = ex.build_example(image, task.turns, task.regions, self.tokenizer, self.config, rng, task.segmentations)
                out["skips"] = skips
                return out
            except ex.ExampleError as e:
                skips[SKIP_REASONS.index(e.reason)] += 1
            except (ValueError, KeyError, TypeError, OSError, IndexError):
                skips[SKIP_REASONS.index("bad_record")] += 1
            index = int(rng.integers(len(source)))
        raise RuntimeError(
            f"source {source_id}: {MAX_REDRAWS} consecutive records could not become examples "
            f"({dict(zip(SKIP_REASONS, skips.tolist()))}); check the data and the config (max_length, max_regions)"
        )


def build_dataset(
    sources: Sequence,
    weights: Sequence[float],
    task_fns: Sequence[TaskFn],
    tokenizer_proto: bytes,
    config: ex.ExampleConfig,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """The per-process batch stream (infinite: the mixture repeats with a new shuffle per epoch)."""
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
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset()


# ----------------------------------------------------------------------------------------------
# The synthetic world's tasks per stage


def _annotations(scene: synthetic.Scene) -> list[tasks.Annotation]:
    return [tasks.Annotation(o.name, o.box, o.mask) for o in scene.objects]


def synthetic_task(stage: int) -> TaskFn:
    """Task function for the synthetic world: stage 1 captions; stage 2 dense referring or
    detection; stage 3 grounding (with the coordinates suffix), referring classification against
    another object's name, or dense referring."""
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")

    def fn(record: dict, rng: np.random.Generator):
        scene = record["scene"]
        w, h = scene.size
        objs = _annotations(scene)
        if stage == 1:
            return scene.image, tasks.caption(objs)
        if stage == 2:
            build = tasks.dense_referring if rng.integers(2) == 0 else tasks.dense_detection
            return scene.image, build(objs, w, h, rng)
        obj = objs[rng.integers(len(objs))]
        choice = rng.integers(3)
        if choice == 0:
            return scene.image, tasks.grounding(obj, w, h)
        if choice == 1:
            others = sorted({o.name for o in objs} - {obj.name}) or [_random_other_name(obj.name, rng)]
            kind = tasks.REFERRING_KINDS[rng.integers(len(tasks.REFERRING_KINDS))]
            return scene.image, tasks.referring_classification(obj, others[rng.integers(len(others))], w, h, rng, kind)
        return scene.image, tasks.dense_referring(objs, w, h, rng)

    return fn


def _random_other_name(name: str, rng: np.random.Generator) -> str:
    while True:
        other = " ".join(
            [list(synthetic.SIZES)[rng.integers(2)], list(synthetic.COLOURS)[rng.integers(6)], synthetic.SHAPES[rng.integers(4)]]
        )
        if other != name:
            return other
