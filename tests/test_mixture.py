"""Stage datasets from configs: named sources of every real format plus the synthetic world,
contract batches per stage, and configuration mistakes raising before any data is read."""

import os

import ml_collections
import numpy as np
import pytest

from data_pipelines import example as ex
from data_pipelines import mixture, pipeline, synthetic, tasks, text
from tests import data_fixtures as fx

CFG = ex.ExampleConfig(max_length=1024, max_regions=10, global_size=28, cell=28, max_tiles=6, global_grid=2,
                       tile_grid=2, num_points=16)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mixture"))
    fx.write_photos(root)
    return {
        "images": os.path.join(root, "images"),
        "llava": fx.write_json(os.path.join(root, "llava.json"), fx.llava_records()),
        "grit": fx.write_json(os.path.join(root, "grit.json"), fx.grit_records()),
        "coco": fx.write_json(os.path.join(root, "coco.json"), fx.coco_doc()),
        "dets": fx.write_json(os.path.join(root, "dets.json"), {"coffee.png": [{"label": "cup", "box": [30, 20, 90, 60]}]}),
    }


@pytest.fixture(scope="module")
def proto():
    corpus = [text.SYSTEM_PROMPT, text.GROUNDING_SUFFIX, tasks.DENSE_REFERRING_Q, tasks.DENSE_DETECTION_Q]
    corpus += [t["value"] for r in fx.llava_records() + fx.grit_records() for t in r["conversations"]]
    corpus += list(synthetic.category_names()) + ["person baseball bat cup Here are the categories The objects are"]
    return text.train_tiny_tokenizer(corpus, vocab_size=600)


def _config(files, stage):
    shapes = {"type": "synthetic", "split": "train", "num_records": 50, "seed": 3}
    sources = {
        1: {"captions": {"type": "conversation", "annotations": files["llava"], "image_root": files["images"]},
            "shapes": shapes},
        2: {"lvis": {"type": "detection", "annotations": files["coco"], "image_root": files["images"]},
            "shapes": shapes},
        3: {"grit": {"type": "grit", "annotations": files["grit"], "image_root": files["images"]},
            "vqa": {"type": "grounded_conversation", "annotations": files["llava"], "image_root": files["images"],
                    "detections": files["dets"], "min_score": 0.3},
            "coco": {"type": "detection", "annotations": files["coco"], "image_root": files["images"]},
            "shapes": shapes},
    }[stage]
    return ml_collections.ConfigDict({"sources": sources, "weights": {name: 1.0 for name in sources}})


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_builds_contract_batches_from_real_formats(files, proto, stage):
    ds = mixture.build_stage_dataset(_config(files, stage), stage, proto, CFG, batch_size=4, seed=0)
    batches = [b for _, b in zip(range(4), ds)]
    for b in batches:
        assert b["tokens"].shape == (4, CFG.max_length) and b["tiles"].shape == (4, 6, 28, 28, 3)
        assert b["skips"].shape == (4, len(pipeline.SKIP_REASONS)) and b["repairs"].shape == (4, len(pipeline.REPAIR_REASONS))
        assert (b["loss_mask"].sum(1) > 0).all()
        assert ((b["region_index"] >= 0).sum(1) == b["region_valid"].sum(1)).all()
    regions = sum(int(b["region_valid"].sum()) for b in batches)
    assert regions == 0 if stage == 1 else regions > 0


def test_detection_repairs_are_counted(files, proto):
    config = _config(files, 2)
    del config.sources["shapes"], config.weights["shapes"]
    ds = mixture.build_stage_dataset(config, 2, proto, CFG, batch_size=2, seed=1)
    repairs = sum(b["repairs"].sum(0) for _, b in zip(range(4), ds))
    assert repairs[pipeline.REPAIR_REASONS.index("dropped_annotation")] > 0  # the zero-area box of image 1


def test_sources_are_ordered_by_name_and_weighted(files):
    sources, weights, fns, names = mixture.build_sources(
        {"sources": {"b": {"type": "synthetic", "num_records": 5}, "a": {"type": "conversation",
         "annotations": files["llava"], "image_root": files["images"]}}, "weights": {"a": 2, "b": 1}}, 1)
    assert names == ["a", "b"] and weights == [2.0, 1.0] and len(sources[0]) == 2 and len(sources[1]) == 5


@pytest.mark.parametrize(
    "data, error, message",
    [
        ({"sources": {}}, ValueError, "must map source names"),
        ({"sources": {"x": {"type": "webdataset"}}, "weights": {"x": 1}}, ValueError, "unknown type 'webdataset'"),
        ({"sources": {"x": {"type": "synthetic", "splitt": "train"}}, "weights": {"x": 1}}, ValueError,
         "source 'x' .*splitt"),
        ({"sources": {"x": {"type": "synthetic"}}, "weights": {"y": 1}}, ValueError, r"missing \['x'\], unknown \['y'\]"),
        ({"sources": {"x": {"type": "synthetic"}, "z": {"type": "synthetic"}}, "weights": {"x": 1}}, ValueError,
         r"missing \['z'\]"),
        ({"sources": {"x": {"type": "grit", "annotations": "/nope.json", "image_root": "/"}}, "weights": {"x": 1}},
         FileNotFoundError, "source 'x' .*no such file '/nope.json'"),
        ({"sources": {"x": {"type": "synthetic"}}, "weights": {"x": 0}}, ValueError, "weights must be positive"),
        ({"sources": {"x": {"type": "synthetic", "box_quantum": 0}}, "weights": {"x": 1}}, ValueError,
         "source 'x' .*box quantum"),
    ],
)
def test_bad_configuration_raises_clearly(proto, data, error, message):
    with pytest.raises(error, match=message):
        mixture.build_stage_dataset(data, 3, proto, CFG, batch_size=2, seed=0)


def test_unknown_stage_raises(files, proto):
    with pytest.raises(ValueError, match="stage must be 1, 2 or 3"):
        mixture.build_stage_dataset(_config(files, 2), 4, proto, CFG, batch_size=2, seed=0)


def test_synthetic_tokenizer_keeps_names_whole():
    """Like a real LLM vocabulary, the synthetic one has a whole piece for every word of an object
    name, so copying a name from the question is a word-to-word mapping, not a spelling task."""
    from data_pipelines import synthetic, text

    tok = text.Tokenizer(model_proto=mixture.synthetic_tokenizer(1023))
    for form in (*synthetic.COLOURS, *synthetic.SHAPES, *synthetic.SIZES):
        assert len(tok.encode(form)) == 1, (form, [tok.decode([i]) for i in tok.encode(form)])
    assert len(tok.encode("red circle")) == 2


def test_synthetic_tokenizer_with_whole_names_has_one_piece_per_name():
    """`whole_names`: each colour-shape name is one id, the same in a question, an answer and a
    referring choice, with or without a size word before it."""
    from data_pipelines import synthetic, text

    tok = text.Tokenizer(model_proto=mixture.synthetic_tokenizer(1023, whole_names=True))
    ids = set()
    for name in synthetic.category_names(name_sizes=False):
        (piece,) = tok.encode(name)
        for sentence in (f"What is the location of {name} in the image?", f"{name} [120, 340, 560, 780]",
                         f"Is it a {name} or a blue square?", f"a large {name}."):
            assert piece in tok.encode(sentence), (sentence, [tok.decode([i]) for i in tok.encode(sentence)])
        ids.add(piece)
        assert tok.decode(tok.encode(f"the {name} [1")) == f"the {name} [1"
    assert len(ids) == len(synthetic.COLOURS) * len(synthetic.SHAPES)
