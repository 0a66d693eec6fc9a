"""TfdsSource over tiny array_record datasets of real photographs built in a temporary directory:
pixels, pixel boxes, label names, dropped objects, conversations, pickling, configuration errors,
and a grain pipeline batch from the source."""

import json
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from skimage import data as skdata

from data_pipelines import example as ex
from data_pipelines import pipeline, tasks, text
from data_pipelines.example import ExampleError
from data_pipelines.sources.tfds_source import TfdsSource, check_features

LABELS = ["baseball_bat", "coffee_cup", "cat"]
TURNS = [("human", "<image>\nWhat is in the picture?"), ("gpt", "A cup of coffee on a saucer.")]


def _photo(name: str, width: int, height: int) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)()).resize((width, height), Image.BILINEAR)


PHOTOS = [_photo("astronaut", 64, 48), _photo("coffee", 48, 32), _photo("chelsea", 40, 30)]
GRAY = _photo("camera", 32, 24)  # mode L

# Normalized [ymin, xmin, ymax, xmax]; fractions of 8 keep `* size` exact.
TRAIN_OBJECTS = [
    ([[0.25, 0.125, 0.75, 0.5], [0.5, 0.5, 0.5, 0.75], [0.0, 0.5, 1.0, 1.0]], [0, 1, 2]),  # 2nd has no height
    ([[0.125, 0.25, 0.875, 0.75]], [1]),
    ([[0.5, 0.0, 1.0, 0.5]], [2]),
]


def _llava(turns) -> str:
    return json.dumps([{"from": role, "value": value} for role, value in turns])


class TinyObjects(tfds.core.GeneratorBasedBuilder):
    """Photos with boxes and a conversation; 'validation' holds the malformed records."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file to look up beside the code (the lookup needs importlib_resources)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(),
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(), "label": tfds.features.ClassLabel(names=LABELS)}),
            "conversations": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"), "validation": self._generate_examples("validation")}

    def _generate_examples(self, split):
        if split == "train":
            for i, (photo, (boxes, labels)) in enumerate(zip(PHOTOS, TRAIN_OBJECTS)):
                yield i, {"image": photo, "objects": {"bbox": np.array(boxes, np.float32), "label": labels},
                          "conversations": _llava(TURNS)}
            return
        zero_area = {"bbox": np.array([[0.5, 0.5, 0.5, 0.75], [0.25, 0.25, 0.75, 0.25]], np.float32), "label": [0, 1]}
        yield 0, {"image": PHOTOS[0], "objects": zero_area, "conversations": _llava([("user", "Hi?"), ("gpt", "Hi.")])}
        yield 1, {"image": PHOTOS[1], "objects": {"bbox": np.array(TRAIN_OBJECTS[1][0], np.float32), "label": [1]},
                  "conversations": "not json ["}


class TinyGray(tfds.core.GeneratorBasedBuilder):
    """Grayscale photos ([H, W, 1]) with conversations only."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file to look up beside the code (the lookup needs importlib_resources)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1)), "conversations": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {"image": GRAY, "conversations": _llava(TURNS)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    for builder in (TinyObjects, TinyGray):
        builder(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


@pytest.fixture(scope="module")
def train(data_dir):
    return TfdsSource("tiny_objects", "train", data_dir=data_dir)


def test_detection_records_hold_the_written_pixels_boxes_and_names(train):
    assert len(train) == 3
    assert train.categories == ("baseball bat", "coffee cup", "cat")
    for i, (photo, (boxes, labels)) in enumerate(zip(PHOTOS, TRAIN_OBJECTS)):
        record = train[i]
        width, height = photo.size
        assert record["id"] == f"tiny_objects/train/{i}"
        assert record["image"].dtype == np.uint8 and record["image"].shape == (height, width, 3)
        np.testing.assert_array_equal(record["image"], np.asarray(photo))  # PNG is lossless
        assert record["categories"] == train.categories
        kept = [(b, label) for b, label in zip(boxes, labels) if b[0] != b[2]]
        assert record["dropped"] == len(boxes) - len(kept)
        expected = [
            (train.categories[label], (min(x1 * width, width - 1), min(y1 * height, height - 1),
                                       min(x2 * width, width - 1), min(y2 * height, height - 1)))
            for (y1, x1, y2, x2), label in kept
        ]
        assert [(o.name, o.box) for o in record["objects"]] == expected
        assert all(o.mask is None for o in record["objects"])


def test_boxes_are_clipped_and_zero_area_objects_dropped(train):
    record = train[0]
    assert record["dropped"] == 1
    assert [o.box for o in record["objects"]] == [(8.0, 12.0, 32.0, 36.0), (32.0, 0.0, 63.0, 47.0)]


def test_an_image_without_usable_objects_is_skipped(data_dir):
    source = TfdsSource("tiny_objects", "validation", data_dir=data_dir)
    with pytest.raises(ExampleError, match="none of 2 objects") as info:
        source[0]
    assert info.value.reason == "no_objects"
    assert len(source[1]["objects"]) == 1


def test_conversation_records_round_trip(data_dir):
    source = TfdsSource("tiny_objects", "train", data_dir=data_dir, kind="conversation")
    record = source[1]
    assert set(record) == {"id", "image", "turns"} and record["id"] == "tiny_objects/train/1"
    assert record["turns"] == TURNS
    np.testing.assert_array_equal(record["image"], np.asarray(PHOTOS[1]))


def test_malformed_conversations_are_bad_records(data_dir):
    source = TfdsSource("tiny_objects", "validation", data_dir=data_dir, kind="conversation")
    for index, message in [(0, "'from': 'human'|'gpt'"), (1, "not valid JSON")]:
        with pytest.raises(ExampleError, match=message) as info:
            source[index]
        assert info.value.reason == "bad_record"


def test_grayscale_images_become_rgb(data_dir):
    record = TfdsSource("tiny_gray", "train", data_dir=data_dir, kind="conversation")[0]
    gray = np.asarray(GRAY)
    assert record["image"].shape == (*gray.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(record["image"][..., c], gray)
    assert record["turns"] == TURNS


def test_a_dataset_directory_reads_like_its_name(data_dir, train):
    directory = f"{data_dir}/tiny_objects/1.0.0"  # a prepared dataset: dataset_info.json + array_record files
    source = TfdsSource(directory, "train")
    assert len(source) == len(train) and source[2]["id"] == f"{directory}/train/2"
    np.testing.assert_array_equal(source[2]["image"], train[2]["image"])
    assert source[2]["objects"] == train[2]["objects"]


def test_the_source_pickles_without_its_open_handle(train):
    expected = train[0]
    state = pickle.dumps(train)
    copy = pickle.loads(state)
    assert copy._source is None  # each worker process opens its own
    got = copy[0]
    np.testing.assert_array_equal(got["image"], expected["image"])
    assert got["objects"] == expected["objects"] and got["id"] == expected["id"] and len(copy) == len(train)


def test_configuration_errors_raise_at_construction(data_dir, tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        TfdsSource("tiny_objects", "train", data_dir=data_dir, kind="segmentation")
    with pytest.raises(ValueError, match=r"has features \['conversations', 'image'\]; kind='detection' needs 'image'"):
        TfdsSource("tiny_gray", "train", data_dir=data_dir)
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(), "objects": tfds.features.Sequence({
        "bbox": tfds.features.BBoxFeature(), "label": tfds.features.Tensor(shape=(), dtype=np.int64)})})
    with pytest.raises(ValueError, match=r"kind='conversation' needs .*missing or of another type: \['conversations'\]"):
        check_features(features, "conversation", "x")
    with pytest.raises(ValueError, match=r"has features \['image', 'objects/bbox', 'objects/label'\].*\['objects/label'\]"):
        check_features(features, "detection", "x")  # a label without class names
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        TfdsSource("tiny_objects", "test", data_dir=data_dir)


def test_missing_datasets_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dataset.*not found"):
        TfdsSource("no_such_dataset", "train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        TfdsSource(str(tmp_path / "nowhere"), "train")


def _dense_detection(record, rng):
    height, width = record["image"].shape[:2]
    return record["image"], tasks.dense_detection(record["objects"], width, height, rng)


def test_batches_from_the_source_follow_the_contract(train):
    corpus = [text.SYSTEM_PROMPT, tasks.DENSE_DETECTION_Q, *train.categories]
    rng = np.random.default_rng(0)
    corpus += [t for i in range(len(train)) for _, t in _dense_detection(train[i], rng)[1].turns]
    proto = text.train_tiny_tokenizer(corpus, vocab_size=400)
    config = ex.ExampleConfig(max_length=512, max_regions=4, global_size=28, cell=28, max_tiles=6, global_grid=2,
                              tile_grid=2, num_points=16)
    ds = pipeline.build_dataset([train], [1.0], [_dense_detection], proto, config, batch_size=2, seed=0)
    batch = next(iter(ds))
    assert batch["tokens"].shape == (2, 512) and batch["tiles"].shape == (2, 6, 28, 28, 3)
    assert batch["region_points"].shape == (2, 4, 16, 2) and batch["skips"].shape == (2, len(pipeline.SKIP_REASONS))
    assert (batch["loss_mask"].sum(1) > 0).all() and (batch["region_index"] < 0).all()
    assert batch["skips"].sum() == 0  # every record of the split is usable
