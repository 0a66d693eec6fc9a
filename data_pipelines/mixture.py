"""A stage's data from its config: named sources, their weights, their task functions.

    config.data.sources = {
        "grit":   {"type": "grit", "annotations": "/data/grit.json", "image_root": "/data/coco2014"},
        "vqa":    {"type": "grounded_conversation", "annotations": "/data/llava_vqa.json",
                   "image_root": "/data", "detections": "/data/glip.json", "min_score": 0.5},
        "shapes": {"type": "synthetic", "split": "train", "num_records": 100000,
                   "grounding_share": 0.5,  # stage III: grounding vs referring questions
                   "box_quantum": 1},  # answers' box coordinates: centres of bins this wide (1: exact)
    }
    config.data.weights = {"grit": 3.0, "vqa": 1.0, "shapes": 0.5}

`type` picks the reader (`SOURCE_TYPES`); the other keys are its options. The stage picks the task
for object-annotated sources (captions / dense alignment / referring and grounding). Everything
that is wrong with the configuration raises here, before any data is read: unknown type or
option, weights that don't name exactly the sources, missing files.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import grain

from data_pipelines import example as ex
from data_pipelines import pipeline, synthetic
from data_pipelines.sources import conversation, detection, evaluation, grit, tfds_source


def _task_options(opts: dict) -> dict:
    """Pops the options of `pipeline.objects_task` out of an object-annotated source's options."""
    return {"grounding_share": opts.pop("grounding_share", pipeline.GROUNDING_SHARE),
            "box_quantum": opts.pop("box_quantum", 1)}


def _synthetic(opts: dict, stage: int):
    task = _task_options(opts)
    return synthetic.SyntheticSource(**opts), pipeline.synthetic_task(stage, **task)


def _conversation(opts: dict, stage: int):
    return conversation.ConversationSource(**opts), pipeline.conversation_task


def _grounded_conversation(opts: dict, stage: int):
    min_score = opts.pop("min_score", 0.5)
    return conversation.GroundedConversationSource(**opts), pipeline.grounded_conversation_task(min_score)


def _grit(opts: dict, stage: int):
    return grit.GritSource(**opts), pipeline.grit_task


def _detection(opts: dict, stage: int):
    task = _task_options(opts)
    return detection.DetectionSource(**opts), pipeline.objects_task(stage, **task)


def _tfds(opts: dict, stage: int):
    task = _task_options(opts)  # detection datasets only
    source = tfds_source.TfdsSource(**opts)
    return source, pipeline.objects_task(stage, **task) if source.kind == "detection" else pipeline.conversation_task


def _refexp(opts: dict, stage: int):
    return evaluation.RefExpSource(**opts), pipeline.refexp_task


# type -> (options, stage) -> (source, task function)
SOURCE_TYPES: dict[str, Callable[[dict, int], tuple[Any, pipeline.TaskFn]]] = {
    "synthetic": _synthetic,
    "conversation": _conversation,
    "grounded_conversation": _grounded_conversation,
    "grit": _grit,
    "detection": _detection,
    "tfds": _tfds,
    "refexp": _refexp,
}


def _plain(value: Any) -> Any:
    """ConfigDict / FrozenConfigDict -> dict, recursively (duck-typed: no ml_collections import)."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return dict(value) if isinstance(value, Mapping) else value


def build_sources(data_config: Any, stage: int) -> tuple[list, list[float], list[pipeline.TaskFn], list[str]]:
    """(sources, weights, task functions, names) in the sorted order of the source names."""
    cfg = _plain(data_config)
    sources_cfg = _plain(cfg.get("sources")) if isinstance(cfg, dict) else None
    if not isinstance(sources_cfg, dict) or not sources_cfg:
        raise ValueError("config.data.sources must map source names to {'type': ..., options}")
    specs = {name: _plain(spec) for name, spec in sources_cfg.items()}
    weights = _plain(cfg.get("weights")) or {}
    if set(weights) != set(specs):
        raise ValueError(
            f"config.data.weights must name exactly the sources {sorted(specs)}; "
            f"missing {sorted(set(specs) - set(weights))}, unknown {sorted(set(weights) - set(specs))}"
        )
    sources, task_fns, names = [], [], sorted(specs)
    for name in names:
        opts = {k: (None if v == "" else v) for k, v in specs[name].items()}  # "" = unset (config placeholders)
        kind = opts.pop("type", None)
        if kind not in SOURCE_TYPES:
            raise ValueError(f"source {name!r}: unknown type {kind!r}; choose from {sorted(SOURCE_TYPES)}")
        try:
            source, task_fn = SOURCE_TYPES[kind](opts, stage)
        except TypeError as e:  # an option the reader doesn't take, or a required one missing
            raise ValueError(f"source {name!r} (type {kind!r}): {e}") from e
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"source {name!r} (type {kind!r}): {e}") from e
        if len(source) == 0:
            raise ValueError(f"source {name!r} (type {kind!r}) has no records")
        sources.append(source)
        task_fns.append(task_fn)
    return sources, [float(weights[n]) for n in names], task_fns, names


def build_stage_batches(
    data_config: Any,
    stage: int,
    tokenizer_proto: bytes,
    example_config: ex.ExampleConfig,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """A stage's per-process batches as a random-access `MapDataset` (batch i is `ds[i]`, built on
    demand, no background threads), from `config.data` (see the module docstring)."""
    sources, weights, task_fns, _ = build_sources(data_config, stage)
    return pipeline.build_batches(
        sources, weights, task_fns, tokenizer_proto, example_config, batch_size, seed, process_index, process_count
    )


def build_stage_dataset(*args, read_options: grain.ReadOptions | None = None, **kwargs) -> grain.IterDataset:
    """The per-process batch stream of a stage; arguments as `build_stage_batches`, `read_options`
    as `pipeline.build_dataset`."""
    return build_stage_batches(*args, **kwargs).to_iter_dataset(read_options or pipeline.DEFAULT_READ_OPTIONS)


@functools.lru_cache(maxsize=8)
def synthetic_tokenizer(vocab_size: int, scenes: int = 300, seed: int = 0, whole_names: bool = False) -> bytes:
    """A SentencePiece model (proto bytes) trained on the synthetic world's texts of all three
    stages, digits split; deterministic for its arguments. Used by the demo and tests.

    With `whole_names`, every colour-shape name ("red circle") is one piece, as most object names
    are one token of a real LLM's vocabulary (`benchmarks/probe_name_copy.py`; DEMO_RUNS.md).

    Kept per process: every fresh workdir of a synthetic run (the warm-up, then each stage) asks
    for it, and drawing its 600 scenes takes ~15 s on a 2-core CPU."""
    import numpy as np

    from data_pipelines import tasks, text

    rng = np.random.default_rng(seed)
    corpus = [text.SYSTEM_PROMPT, text.GROUNDING_SUFFIX, tasks.DENSE_REFERRING_Q, tasks.DENSE_DETECTION_Q]
    fns = [pipeline.synthetic_task(stage) for stage in (1, 2, 3)]
    # Worlds with and without size words: every word of a name should be a whole piece, as in a
    # real LLM vocabulary, not letters.
    for name_sizes in (True, False):
        source = synthetic.SyntheticSource("train", scenes, seed=seed, name_sizes=name_sizes)
        corpus += list(source.categories)
        for i in range(scenes):
            for fn in fns:
                corpus += [t for _, t in fn(source[i], rng)[1].turns]
    # The names in colour-then-shape order, not `synthetic.category_names`' sorted one: the order
    # fixes the pieces' ids, and the README's name-copy figures were measured with this one.
    names = [f"{c} {s}" for c in synthetic.COLOURS for s in synthetic.SHAPES] if whole_names else []
    # A user-defined piece is matched in the normalized text, where spaces are "▁".
    return text.train_tiny_tokenizer(corpus, vocab_size=vocab_size, user_defined_symbols=["▁" + n.replace(" ", "▁") for n in names])
