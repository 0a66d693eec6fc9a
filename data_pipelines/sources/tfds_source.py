"""Random access to prepared TFDS datasets (array_record, read without TensorFlow) as source records.

`TfdsSource(name, split, data_dir, kind)` reads `tfds.data_source(name, split, data_dir)`, or, when
`name` is a prepared dataset directory, `tfds.builder_from_directory(name).as_data_source(split)`.

    kind="detection":    {image: Image, objects: Sequence({bbox: BBoxFeature, label: ClassLabel})}
      -> {'id', 'image' uint8 [H, W, 3], 'objects': [tasks.Annotation], 'categories', 'dropped'}
    kind="conversation": {image: Image, conversations: Text (LLaVA JSON [{"from", "value"}])}
      -> {'id', 'image' uint8 [H, W, 3], 'turns': [(role, text)]}

TFDS boxes are normalized `[ymin, xmin, ymax, xmax]`; records carry pixel `(x1, y1, x2, y2)` like the
COCO/LVIS source. Objects whose box has no area (or whose label is unknown) are dropped and counted;
an image left without objects is skipped (reason 'no_objects'). A dataset that is missing or lacks
the features of its kind raises at construction.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import features as F

from data_pipelines import anyres
from data_pipelines.example import ExampleError
from data_pipelines.sources.conversation import parse_turns
from data_pipelines.sources.detection import category_name
from data_pipelines.tasks import Annotation

KINDS = ("detection", "conversation")
_NEEDS = {
    "detection": "'image' (Image) and 'objects' with 'bbox' (BBoxFeature) and 'label' (ClassLabel)",
    "conversation": "'image' (Image) and 'conversations' (Text)",
}


def _first_line(error: BaseException) -> str:
    # TFDS' not-found message goes on to list every registered dataset.
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def open_data_source(name: str, split: str, data_dir: str | None) -> Any:
    """The random-access TFDS data source for `name` (a registered name or a prepared directory).

    Never downloads: a dataset that is not prepared is a configuration error (FileNotFoundError);
    an unknown split or a non-random-access file format is a ValueError.
    """
    where = f"TFDS dataset {name!r} (split {split!r}, data_dir {data_dir!r})"
    try:
        if os.path.isabs(name) or os.path.isdir(name):
            return tfds.builder_from_directory(name).as_data_source(split)
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (tfds.core.DatasetNotFoundError, tfds.core.dataset_info.DatasetInfoFileError, FileNotFoundError) as e:
        raise FileNotFoundError(f"{where} not found: {_first_line(e)}") from e
    except (ValueError, NotImplementedError) as e:  # unknown split; prepared as tfrecord (needs TensorFlow)
        raise ValueError(f"{where} cannot be opened as a random-access source: {e}") from e


def _leaf(feature: Any) -> Any:
    """The per-element feature under any `Sequence` wrappers."""
    while isinstance(feature, F.Sequence):
        feature = feature.feature
    return feature


def feature_paths(features: Any, prefix: str = "") -> list[str]:
    """Sorted slash-joined names of all leaf features: ['image', 'objects/bbox', 'objects/label']."""
    features = _leaf(features)
    if not isinstance(features, F.FeaturesDict):
        return [prefix.rstrip("/")]
    return sorted(p for key in features.keys() for p in feature_paths(features[key], f"{prefix}{key}/"))


def _feature(features: Any, path: str) -> Any:
    """The leaf feature at `path` ('objects/label'), or None when there is none."""
    for key in path.split("/"):
        features = _leaf(features)
        if not isinstance(features, F.FeaturesDict) or key not in features.keys():
            return None
        features = features[key]
    return _leaf(features)


def check_features(features: Any, kind: str, name: str) -> None:
    """ValueError naming what the dataset has and what `kind` needs, unless the features fit."""
    required = {"image": F.Image}
    if kind == "detection":
        required.update({"objects/bbox": F.BBoxFeature, "objects/label": F.ClassLabel})
    else:
        required["conversations"] = F.Text
    wrong = [p for p, cls in required.items() if not isinstance(_feature(features, p), cls)]
    if wrong:
        raise ValueError(
            f"TFDS dataset {name!r} has features {feature_paths(features)}; kind={kind!r} needs {_NEEDS[kind]} "
            f"(missing or of another type: {wrong})"
        )


def pixel_box(bbox: np.ndarray, width: int, height: int) -> tuple[float, float, float, float] | None:
    """Normalized `[ymin, xmin, ymax, xmax]` -> pixel `(x1, y1, x2, y2)` clipped to the image.

    `(xmin * W, ymin * H, xmax * W, ymax * H)` clipped to [0, W - 1] x [0, H - 1]; None when the
    clipped box has no area (or is not finite).
    """
    ymin, xmin, ymax, xmax = (float(v) for v in bbox)
    x1, x2 = np.clip([xmin * width, xmax * width], 0.0, width - 1.0)
    y1, y2 = np.clip([ymin * height, ymax * height], 0.0, height - 1.0)
    if not np.all(np.isfinite([x1, y1, x2, y2])) or x2 <= x1 or y2 <= y1:
        return None
    return float(x1), float(y1), float(x2), float(y2)


def annotations(objects: dict, names: tuple[str, ...], width: int, height: int) -> tuple[list[Annotation], int]:
    """TFDS `objects` {'bbox': [N, 4] normalized, 'label': [N] ids} -> (usable Annotations, dropped count)."""
    try:
        boxes = np.asarray(objects["bbox"], np.float64).reshape(-1, 4)
        labels = np.asarray(objects["label"], np.int64).reshape(-1)
    except (KeyError, TypeError, ValueError) as e:
        raise ExampleError("bad_record", f"objects need 'bbox' [N, 4] and 'label' [N]: {e}") from e
    if len(boxes) != len(labels):
        raise ExampleError("bad_record", f"{len(boxes)} boxes but {len(labels)} labels")
    kept = []
    for bbox, label in zip(boxes, labels):
        box = pixel_box(bbox, width, height)
        if box is not None and 0 <= label < len(names):
            kept.append(Annotation(names[label], box))
    return kept, len(boxes) - len(kept)


def conversation_turns(raw: Any) -> list[tuple[str, str]]:
    """The `conversations` text feature (LLaVA JSON, str or bytes) -> [(role, text)]; 'bad_record'
    when it does not parse or is not a list of {from: human|gpt, value} turns."""
    try:
        turns = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ExampleError("bad_record", f"conversations is not valid JSON: {e}") from e
    return parse_turns(turns)


def rgb_image(image: Any) -> np.ndarray:
    """A decoded TFDS image (uint8 `[H, W, C]`, C = 1, 3 or 4) -> uint8 `[H, W, 3]`."""
    try:
        return anyres.to_rgb(np.asarray(image))
    except anyres.ImageError as e:
        raise ExampleError("bad_image", f"unusable image: {e}") from e


class TfdsSource:
    """A prepared TFDS dataset split as detection or conversation records (see the module doc).

    Pickles as (name, split, data_dir, kind, metadata): each worker process opens its own handle.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None, kind: str = "detection"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.name, self.split, self.data_dir, self.kind = name, split, data_dir, kind
        self._source = open_data_source(name, split, data_dir)
        features = self._source.dataset_info.features
        check_features(features, kind, name)
        self._len = len(self._source)
        self.categories: tuple[str, ...] = ()
        if kind == "detection":
            self.categories = tuple(category_name(n) for n in _feature(features, "objects/label").names)

    def __getstate__(self) -> dict:  # open file handles stay in the process that opened them
        return {**self.__dict__, "_source": None}

    @property
    def source(self) -> Any:
        if self._source is None:
            self._source = open_data_source(self.name, self.split, self.data_dir)
        return self._source

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        example = self.source[index]
        image = rgb_image(example["image"])
        record_id = f"{self.name}/{self.split}/{index}"
        if self.kind == "conversation":
            return {"id": record_id, "image": image, "turns": conversation_turns(example["conversations"])}
        height, width = image.shape[:2]
        objects, dropped = annotations(example["objects"], self.categories, width, height)
        if not objects:
            raise ExampleError("no_objects", f"{record_id}: none of {dropped} objects is usable")
        return {"id": record_id, "image": image, "objects": objects, "categories": self.categories, "dropped": dropped}
