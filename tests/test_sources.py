"""File sources over real photographs: LLaVA conversations, GRIT placeholders, COCO/LVIS
detections, VQA/OCR boxes written into answers; bad records raise a countable ExampleError."""

import json
import os
import pickle

import numpy as np
import pytest

from data_pipelines import regions as R
from data_pipelines import tasks, text
from data_pipelines.example import ExampleError
from data_pipelines.sources import conversation, detection, files, grit
from tests import data_fixtures as fx


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sources"))
    pixels = fx.write_photos(root)
    return root, pixels


def _images(root):
    return os.path.join(root, "images")


def test_conversation_source_reads_json_and_jsonl(data):
    root, pixels = data
    path = fx.write_json(os.path.join(root, "llava.json"), fx.llava_records())
    src = conversation.ConversationSource(path, _images(root))
    assert len(src) == 2
    rec = src[1]
    np.testing.assert_array_equal(rec["image"], pixels["coffee.png"])
    assert rec["id"] == "b" and rec["turns"][2] == ("human", "What colour is the cup?")
    jsonl = os.path.join(root, "llava.jsonl")
    with open(jsonl, "w") as f:
        for r in fx.llava_records():
            f.write(json.dumps(r) + "\n")
        f.write("{not json\n")
    src_l = conversation.ConversationSource(jsonl, _images(root))
    assert len(src_l) == 3 and src_l[0]["turns"] == src[0]["turns"]
    with pytest.raises(ExampleError) as e:
        src_l[2]
    assert e.value.reason == "bad_record"
    restored = pickle.loads(pickle.dumps(src))  # worker processes receive sources pickled
    np.testing.assert_array_equal(restored[0]["image"], pixels["astronaut.jpg"])


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"id": 1, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "no_image"),
        ({"image": "missing.jpg", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "bad_image"),
        ({"image": "corrupt.jpg", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "bad_image"),
        ({"image": "astronaut.jpg", "conversations": [{"from": "robot", "value": "a"}]}, "bad_record"),
        ({"image": "astronaut.jpg", "conversations": "hello"}, "bad_record"),
        ({"image": "../etc/passwd", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "bad_record"),
        ([1, 2, 3], "bad_record"),
    ],
)
def test_bad_conversation_records_have_reasons(data, record, reason):
    root, _ = data
    with open(os.path.join(_images(root), "corrupt.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    src = conversation.ConversationSource(fx.write_json(os.path.join(root, "bad.json"), [record]), _images(root))
    with pytest.raises(ExampleError) as e:
        src[0]
    assert e.value.reason == reason


def test_configuration_errors_raise_at_construction(data, tmp_path):
    root, _ = data
    with pytest.raises(FileNotFoundError, match="no such file"):
        conversation.ConversationSource(str(tmp_path / "nope.json"), _images(root))
    path = fx.write_json(str(tmp_path / "ok.json"), fx.llava_records())
    with pytest.raises(FileNotFoundError, match="no such directory"):
        conversation.ConversationSource(path, str(tmp_path / "no_images"))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        grit.GritSource(str(tmp_path / "broken.json"), _images(root))
    with pytest.raises(ValueError, match="'images', 'annotations', 'categories'"):
        detection.DetectionSource(path, _images(root))


def test_grit_placeholders_become_regions_and_boxes(data):
    root, pixels = data
    src = grit.GritSource(fx.write_json(os.path.join(root, "grit.json"), fx.grit_records()), _images(root))
    rec = src[0]
    np.testing.assert_array_equal(rec["image"], pixels["chelsea.png"])
    assert rec["masks"][0][0].sum() == 30 * 40 and rec["masks"][1] == [None, None]
    kinds = set()
    for seed in range(12):
        task = tasks.fill_placeholders(rec["turns"], rec["boxes"], rec["masks"], 90, 60, np.random.default_rng(seed))
        (region,) = task.regions
        kinds.add(type(region).__name__)
        human = task.turns[0][1]
        if isinstance(region, R.Point):  # a point is chosen on the mask (SPEC §4.3)
            assert rec["masks"][0][0][int(region.y), int(region.x)]
            assert human == f"<image>\nWhat is in {text.point_text((region.x, region.y), 90, 60)} <region_fea>?"
        else:
            assert human == "<image>\nWhat is in [222, 166, 655, 650] <region_fea>?"
            assert task.segmentations[0] is rec["masks"][0][0]
        assert task.turns[1][1] == "A cat [222, 166, 655, 650] lying next to a wall [0, 0, 988, 150]."
    assert kinds == {"Point", "Box"}
    scaled = src[1]  # annotated at 256x192, file is 128x96
    assert scaled["boxes"][0] == [(0.0, 0.0, 30.0, 40.0)]


@pytest.mark.parametrize(
    "turns, boxes, masks, reason",
    [
        ([("human", "What is <bbox_location1>?"), ("gpt", "x")], [[[1, 1, 5, 5]], []], None, "bad_placeholder"),
        ([("human", "What is <bbox_locationX>?"), ("gpt", "x")], [[[1, 1, 5, 5]], []], None, "bad_placeholder"),
        ([("human", "What is <bbox_location0>?"), ("gpt", "x")], [[[5, 5, 5, 9]], []], None, "bad_region"),
        ([("human", "What is <bbox_location0>?"), ("gpt", "x")], [[[200, 200, 300, 300]], []], None, "bad_region"),
        ([("human", "What is <bbox_location0>?"), ("gpt", "x")], [[[1, 1, 5, 5]], []],
         [[np.zeros((60, 90), bool)], []], "bad_region"),
        ([("human", "What is <bbox_location0>?"), ("gpt", "x")], [[[1, 1, 5, 5]]], None, "bad_placeholder"),
    ],
)
def test_bad_grit_records_have_reasons(turns, boxes, masks, reason):
    with pytest.raises(ExampleError) as e:
        tasks.fill_placeholders(turns, boxes, masks, 90, 60, np.random.default_rng(0))
    assert e.value.reason == reason


def test_grit_boxes_reaching_outside_are_clipped_and_counted():
    task = tasks.fill_placeholders([("human", "Hi"), ("gpt", "A dog <bbox_location0>.")], [[], [[-5, 10, 200, 50]]],
                                   None, 90, 60, np.random.default_rng(0))
    assert task.turns[1][1] == "A dog [0, 166, 988, 833]." and task.repairs == {"clipped_box": 1}


def test_detection_source_coco_and_lvis_layouts(data):
    root, pixels = data
    src = detection.DetectionSource(fx.write_json(os.path.join(root, "coco.json"), fx.coco_doc()), _images(root))
    assert len(src) == 2  # the image without annotations is not a record
    rec = src[0]
    np.testing.assert_array_equal(rec["image"], pixels["astronaut.jpg"])
    assert [o.name for o in rec["objects"]] == ["person", "baseball bat"] and rec["dropped"] == 1
    person, bat = rec["objects"]
    assert person.box == (10.0, 10.0, 50.0, 40.0) and bat.mask is None
    assert person.mask[10:40, 10:50].all() and person.mask.sum() == 40 * 30  # COCO area: continuous polygon
    cup = src[1]["objects"][0]  # LVIS names images by coco_url; RLE segmentation
    assert cup.name == "cup" and cup.mask.sum() == 40 * 60 and cup.box == (30.0, 20.0, 90.0, 60.0)
    assert src.names == ("baseball bat", "cup", "person") and src.synonyms["cup"] == ("cup", "mug")
    boxes_only = detection.DetectionSource(os.path.join(root, "coco.json"), _images(root), with_masks=False)
    assert all(o.mask is None for o in boxes_only[0]["objects"])


def test_detection_image_with_only_bad_annotations_is_skipped(data):
    root, _ = data
    doc = fx.coco_doc()
    doc["annotations"] = [dict(doc["annotations"][2])]  # the zero-area one
    src = detection.DetectionSource(fx.write_json(os.path.join(root, "coco_bad.json"), doc), _images(root))
    with pytest.raises(ExampleError) as e:
        src[0]
    assert e.value.reason == "no_objects"


def test_coco_geometry_helpers():
    assert detection.coco_box([10, 5, 20, 10], 100, 100) == (10.0, 5.0, 30.0, 15.0)
    assert detection.coco_box([90, 90, 50, 50], 100, 100) == (90.0, 90.0, 99.0, 99.0)  # clipped
    for bad in ([1, 2, 0, 5], [1, 2, 3], [200, 200, 5, 5], "x"):
        with pytest.raises(R.RegionError):
            detection.coco_box(bad, 100, 100)
    with pytest.raises(R.RegionError, match="empty"):
        detection.segmentation_mask([[200, 200, 210, 200, 210, 210]], 100, 100)
    with pytest.raises(R.RegionError):
        detection.segmentation_mask({"size": [5, 5], "counts": "zz"}, 100, 100)


def test_vqa_and_ocr_boxes_are_written_into_answers(data):
    root, _ = data
    dets = fx.write_json(os.path.join(root, "dets.json"), {
        "coffee.png": [{"label": "cup", "box": [30, 20, 90, 60], "score": 0.9},
                       {"label": "saucer", "box": [10, 50, 110, 79], "score": 0.2}],  # below min_score
    })
    ocr = fx.write_json(os.path.join(root, "ocr.json"), {"coffee.png": [{"text": "coffee", "box": [0, 0, 11, 7]}]})
    path = fx.write_json(os.path.join(root, "vqa.json"), fx.llava_records())
    src = conversation.GroundedConversationSource(path, _images(root), detections=dets, ocr=ocr)
    rec = src[1]
    assert [d.phrase for d in rec["detections"]] == ["cup", "saucer", "coffee"]
    task = tasks.grounded_conversation(rec["turns"], rec["detections"], 120, 80, min_score=0.5)
    assert task.turns[0][1] == "What is in the cup?\n<image>\n" + text.GROUNDING_SUFFIX
    assert task.turns[1][1] == "There is coffee [0, 0, 91, 87] in the cup [250, 250, 750, 750] on the saucer."
    assert task.turns[3][1] == "It is red."
    plain = tasks.grounded_conversation(src[0]["turns"], src[0]["detections"], 128, 96)
    assert plain.turns == src[0]["turns"]  # nothing detected: no suffix, nothing written
    with pytest.raises(ValueError, match="detections file, an OCR file or both"):
        conversation.GroundedConversationSource(path, _images(root))


def test_ground_answer_whole_words_plurals_and_lists():
    dets = [tasks.Detection("cup", (10, 10, 50, 50)), tasks.Detection("cup", (60, 10, 90, 50)),
            tasks.Detection("red car", (0, 0, 99, 99)), tasks.Detection("car", (5, 5, 20, 20))]
    out, n = tasks.ground_answer("Two cups near the red car, a car and a scar.", dets, 100, 100)
    assert out == ("Two cups [[100, 100, 500, 500], [600, 100, 900, 500]] near the red car [0, 0, 990, 990], "
                   "a car [50, 50, 200, 200] and a scar.")
    assert n == 4
    grounded = text.parse_groundings(out, 100, 100)
    assert [g.phrase for g in grounded] == ["two cups", "near the red car", "a car"]


def test_files_helpers_refuse_bad_input(tmp_path):
    with pytest.raises(ExampleError, match="record must be a JSON object"):
        files.decode_record(b"[1]")
    assert files.field({"a": 1}, "a", int) == 1
    for record in ({"a": True}, {"a": "1"}, {}):
        with pytest.raises(ExampleError):
            files.field(record, "a", int)
