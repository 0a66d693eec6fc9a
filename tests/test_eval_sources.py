"""Evaluation sources (SPEC §7.1): RefCOCO-style REC, Flickr30k mergedGT grounding, LVIS referring
classification, on small annotation files over real photographs."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from data_pipelines import regions as R
from data_pipelines import text
from data_pipelines.example import ExampleError
from data_pipelines.sources import evaluation as ev

ROC_RE = re.compile(r"Is the object \[\d+, \d+, \d+, \d+\] <region_fea> of the image a (.+) or a (.+)\?")


def _save(root, name, pixels):
    path = root / name
    Image.fromarray(pixels).save(path)
    return path


def _decoded(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return str(path)


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    return {
        "root": root,
        "astronaut": _save(root, "astronaut.jpg", skdata.astronaut()),  # 512 x 512
        "coffee": _save(root, "coffee.png", skdata.coffee()),  # 600 x 400 (W x H)
        "chelsea": _save(root, "chelsea.png", skdata.chelsea()),  # 451 x 300
    }


@pytest.fixture()
def refexp_file(tmp_path):
    doc = {
        "images": [
            {"id": 0, "file_name": "astronaut.jpg", "height": 512, "width": 512, "caption": "man, in red shirt", "original_id": 7},
            {"id": 1, "file_name": "coffee.png", "height": 400, "width": 600, "caption": "cup of coffee", "original_id": 8},
            {"id": 2, "file_name": "coffee.png", "height": 400, "width": 600, "caption": "the spoon", "original_id": 8},
            {"id": 3, "file_name": "astronaut.jpg", "height": 512, "width": 512, "caption": "the flag", "original_id": 7},
        ],
        "annotations": [
            {"id": 10, "image_id": 0, "bbox": [10.5, 20.0, 100.0, 200.0], "category_id": 1},
            {"id": 11, "image_id": 1, "bbox": [300, 200, 400, 300], "category_id": 47},  # reaches past the image
            {"id": 12, "image_id": 3, "bbox": [5, 6, 7, 8], "category_id": 1},
            {"id": 13, "image_id": 3, "bbox": [50, 60, 70, 80], "category_id": 1},  # a second one: ignored
        ],  # entry 2 has no annotation
        "categories": [{"id": 1, "name": "person"}, {"id": 47, "name": "cup"}],
    }
    return _write(tmp_path / "finetune_refcoco_val.json", doc)


CAPTION = "A tabby cat looks at two toys, near a wall."


def _span(word):
    start = CAPTION.index(word)
    return [start, start + len(word)]


@pytest.fixture()
def flickr_file(tmp_path):
    cat, two, toys, wall = _span("A tabby cat"), _span("two"), _span("toys"), _span("a wall")
    doc = {
        "images": [
            {"id": 0, "file_name": "chelsea.png", "height": 300, "width": 451, "caption": CAPTION,
             "tokens_positive_eval": [[cat], [two, toys]]},
            {"id": 1, "file_name": "chelsea.png", "height": 300, "width": 451, "caption": "Nothing here.",
             "tokens_positive_eval": []},
        ],
        "annotations": [
            {"id": 0, "image_id": 0, "bbox": [100, 50, 200, 150], "tokens_positive": [cat]},
            {"id": 1, "image_id": 0, "bbox": [10, 200, 40, 30], "tokens_positive": [[two[0], toys[1]]]},
            {"id": 2, "image_id": 0, "bbox": [300, 220, 50, 60], "tokens_positive": [[two[0], toys[1]]]},
            {"id": 3, "image_id": 0, "bbox": [0, 0, 451, 40], "tokens_positive": [wall]},  # not an eval phrase
        ],
        "categories": [],
    }
    return _write(tmp_path / "final_flickr_mergedGT_val.json", doc)


@pytest.fixture()
def lvis_file(tmp_path, images):
    # LVIS names its images by coco_url; the basename is the file in the COCO 2017 directory.
    _save(images["root"], "000000000042.jpg", skdata.astronaut())
    _save(images["root"], "000000000043.png", skdata.coffee())
    url = "http://images.cocodataset.org/val2017/"
    doc = {
        "images": [
            {"id": 42, "coco_url": url + "000000000042.jpg", "height": 512, "width": 512},
            {"id": 43, "coco_url": url + "000000000043.png", "height": 400, "width": 600},
        ],
        "annotations": [
            {"id": 100, "image_id": 42, "category_id": 2, "bbox": [150, 40, 250, 300],
             "segmentation": [[150, 40, 400, 40, 275, 340]]},
            {"id": 101, "image_id": 43, "category_id": 3, "bbox": [100, 50, 300, 250],
             "segmentation": [[100, 50, 400, 50, 400, 300, 100, 300]]},
            {"id": 102, "image_id": 43, "category_id": 4, "bbox": [20, 30, 0, 50],  # no area
             "segmentation": [[20, 30, 21, 30, 21, 80]]},
            {"id": 103, "image_id": 43, "category_id": 4, "bbox": [420, 100, 80, 200],
             "segmentation": [[420, 100, 500, 100, 460, 300]]},
        ],
        "categories": [
            {"id": 1, "name": "baseball_bat", "synonyms": ["baseball_bat"]},
            {"id": 2, "name": "person", "synonyms": ["person", "human"]},
            {"id": 3, "name": "coffee_cup", "synonyms": ["coffee_cup", "cup_of_coffee"]},
            {"id": 4, "name": "spoon", "synonyms": ["spoon"]},
            {"id": 5, "name": "flag", "synonyms": ["flag"]},
        ],
    }
    return _write(tmp_path / "lvis_v1_val.json", doc)


# --- REC -------------------------------------------------------------------------------------------------


def test_refexp_records(refexp_file, images):
    src = ev.RefExpSource(refexp_file, str(images["root"]))
    assert len(src) == 3 and src.skipped == 1
    r = src[0]
    assert r["id"] == "0"
    assert r["expression"] == "man, in red shirt"
    assert r["question"] == "What is the location of man in red shirt in the image?"
    assert r["turns"] == [("human", "What is the location of man in red shirt in the image?")]
    assert r["box"] == (10.5, 20.0, 110.5, 220.0)
    assert r["regions"] == [] and r["segmentations"] == []
    assert r["image"].dtype == np.uint8 and r["image"].shape == (512, 512, 3)
    np.testing.assert_array_equal(r["image"], _decoded(images["astronaut"]))


def test_refexp_box_is_not_clipped_and_first_annotation_wins(refexp_file, images):
    src = ev.RefExpSource(refexp_file, str(images["root"]))
    assert src[1]["box"] == (300.0, 200.0, 700.0, 500.0)
    np.testing.assert_array_equal(src[1]["image"], skdata.coffee())  # PNG is lossless
    assert src[2]["expression"] == "the flag" and src[2]["box"] == (5.0, 6.0, 12.0, 14.0)


def test_refexp_grounding_suffix(refexp_file, images):
    q = ev.RefExpSource(refexp_file, str(images["root"]), grounding_suffix=True)[0]["question"]
    assert q == "What is the location of man in red shirt in the image?\nInclude the coordinates for each mentioned object."


def test_refexp_record_errors(tmp_path, images):
    doc = {
        "images": [
            {"id": 0, "file_name": "missing.jpg", "height": 512, "width": 512, "caption": "a man"},
            {"id": 1, "file_name": "astronaut.jpg", "height": 500, "width": 512, "caption": "a man"},
            {"id": 2, "file_name": "astronaut.jpg", "height": 512, "width": 512, "caption": "a man"},
        ],
        "annotations": [
            {"image_id": 0, "bbox": [1, 2, 3, 4]},
            {"image_id": 1, "bbox": [1, 2, 3, 4]},
            {"image_id": 2, "bbox": [1, 2, 3]},
        ],
    }
    src = ev.RefExpSource(_write(tmp_path / "bad.json", doc), str(images["root"]))
    reasons = []
    for i in range(len(src)):
        with pytest.raises(ExampleError) as e:
            src[i]
        reasons.append(e.value.reason)
    assert reasons == ["bad_image", "bad_image", "bad_record"]


# --- Flickr30k Entities ------------------------------------------------------------------------------------


def test_flickr_phrases_boxes_and_question(flickr_file, images):
    src = ev.FlickrSource(flickr_file, str(images["root"]))
    assert len(src) == 1 and src.skipped == 1
    r = src[0]
    assert r["caption"] == CAPTION
    assert r["phrases"] == ["A tabby cat", "two toys"]
    # The two boxes of "two toys" merge into their union (mergedGT); "a wall" is not asked.
    assert r["boxes"] == [(100.0, 50.0, 300.0, 200.0), (10.0, 200.0, 350.0, 280.0)]
    assert r["question"] == "What are the locations of a tabby cat, two toys?"
    assert r["turns"] == [("human", r["question"])]
    assert r["regions"] == [] and r["segmentations"] == []
    np.testing.assert_array_equal(r["image"], skdata.chelsea())


def test_flickr_phrase_without_box_is_a_bad_record(tmp_path, images):
    doc = {
        "images": [{"id": 0, "file_name": "chelsea.png", "height": 300, "width": 451, "caption": CAPTION,
                    "tokens_positive_eval": [[_span("a wall")]]}],
        "annotations": [{"image_id": 0, "bbox": [1, 2, 3, 4], "tokens_positive": [_span("A tabby cat")]}],
    }
    with pytest.raises(ExampleError) as e:
        ev.FlickrSource(_write(tmp_path / "f.json", doc), str(images["root"]))[0]
    assert e.value.reason == "bad_record"


def test_span_helpers():
    assert ev.spans_overlap((0, 5), (4, 9)) and not ev.spans_overlap((0, 5), (5, 9))
    assert ev.phrase_text("red shirt man", [(0, 3), (10, 13)]) == "red man"
    assert ev.union_box([(1, 2, 3, 4), (0, 5, 2, 6)]) == (0, 2, 3, 6)


# --- LVIS referring object classification ----------------------------------------------------------------


def test_lvis_box_questions(lvis_file, images):
    src = ev.LvisReferringSource(lvis_file, str(images["root"]), kind="box", seed=3)
    assert len(src) == 4
    for i in (0, 1, 3):
        r = src[i]
        m = ROC_RE.fullmatch(r["question"])
        assert m, r["question"]
        first, second = m.groups()
        # GT first on even indices, negative first on odd ones.
        assert (first, second) == ((r["name"], r["negative"]) if i % 2 == 0 else (r["negative"], r["name"]))
        assert r["negative"] != r["name"] and r["negative"] not in r["synonyms"]
        assert r["negative"] in src.names
        assert r["turns"] == [("human", r["question"])]
        (region,) = r["regions"]
        assert isinstance(region, R.Box) and r["segmentations"] == [None]
        height, width = r["image"].shape[:2]
        assert text.box_text(R.region_box(region, width, height), width, height) in r["question"]
        assert R.region_points(region, width, height, np.random.default_rng(0), r["segmentations"][0]).shape == (512, 2)
    r = src[1]
    assert r["id"] == "101" and r["name"] == "coffee cup" and r["synonyms"] == ("coffee cup", "cup of coffee")
    assert r["box"] == (100.0, 50.0, 400.0, 300.0) and r["kind"] == "box"
    assert src[0]["question"].startswith("Is the object [292, 78, 781, 664] <region_fea> of the image a person or a ")
    np.testing.assert_array_equal(src[0]["image"], _decoded(images["root"] / "000000000042.jpg"))


def test_lvis_zero_area_box_is_a_bad_region(lvis_file, images):
    src = ev.LvisReferringSource(lvis_file, str(images["root"]))
    with pytest.raises(ExampleError) as e:
        src[2]
    assert e.value.reason == "bad_region"


def test_lvis_is_deterministic(lvis_file, images):
    for kind in ("point", "box", "free_form"):
        a = ev.LvisReferringSource(lvis_file, str(images["root"]), kind=kind, seed=5)
        b = ev.LvisReferringSource(lvis_file, str(images["root"]), kind=kind, seed=5)
        for i in (0, 1, 3):
            ra, rb = a[i], b[i]
            assert ra["question"] == rb["question"] and ra["negative"] == rb["negative"]
            height, width = ra["image"].shape[:2]
            assert R.region_box(ra["regions"][0], width, height) == R.region_box(rb["regions"][0], width, height)


def test_lvis_negatives_vary_with_seed_and_stay_valid(lvis_file, images):
    negatives = {ev.LvisReferringSource(lvis_file, str(images["root"]), seed=s)[0]["negative"] for s in range(12)}
    assert len(negatives) > 1 and "person" not in negatives


def test_lvis_free_form_gives_a_mask_region(lvis_file, images):
    r = ev.LvisReferringSource(lvis_file, str(images["root"]), kind="free_form")[0]
    (region,) = r["regions"]
    assert isinstance(region, R.Mask) and r["segmentations"] == [None] and r["kind"] == "free_form"
    assert region.mask.shape == (512, 512) and region.mask[100, 275] and not region.mask[300, 160]
    x1, y1, x2, y2 = R.region_box(region, 512, 512)
    assert (x1, y1) == (150, 40) and 398 <= x2 <= 400 and 338 <= y2 <= 340  # the polygon's own box
    assert ROC_RE.fullmatch(r["question"])
    assert text.box_text((x1, y1, x2, y2), 512, 512) in r["question"]


def test_lvis_point_kind(lvis_file, images):
    r = ev.LvisReferringSource(lvis_file, str(images["root"]), kind="point")[1]
    (region,) = r["regions"]
    assert isinstance(region, R.Point) and r["segmentations"] == [None]
    assert 100 <= region.x <= 400 and 50 <= region.y <= 300
    assert re.fullmatch(r"Is the object \[\d+, \d+\] <region_fea> of the image a (.+) or a (.+)\?", r["question"])


def test_lvis_options(lvis_file, images):
    assert len(ev.LvisReferringSource(lvis_file, str(images["root"]), max_records=2)) == 2
    with pytest.raises(ValueError, match="kind"):
        ev.LvisReferringSource(lvis_file, str(images["root"]), kind="scribble")


# --- configuration errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ev.RefExpSource, ev.FlickrSource, ev.LvisReferringSource])
def test_missing_files_raise(cls, tmp_path, images, refexp_file):
    with pytest.raises(FileNotFoundError):
        cls(str(tmp_path / "nope.json"), str(images["root"]))
    with pytest.raises(FileNotFoundError):
        cls(refexp_file, str(tmp_path / "no_dir"))


def test_file_without_lists_names_what_is_missing(tmp_path, images):
    path = _write(tmp_path / "odd.json", {"images": []})
    with pytest.raises(ValueError, match=r"odd\.json.*'annotations'"):
        ev.RefExpSource(path, str(images["root"]))
    with pytest.raises(ValueError, match=r"'annotations', 'categories'"):
        ev.LvisReferringSource(path, str(images["root"]))
    with pytest.raises(ValueError, match="JSON object"):
        ev.FlickrSource(_write(tmp_path / "list.json", []), str(images["root"]))
