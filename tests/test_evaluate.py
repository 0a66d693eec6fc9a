"""Evaluation: SPEC §7.1 metrics on hand-made answers, the held-out synthetic records against the
training task builders, and `evaluate` end to end on a tiny random model."""

import collections
import dataclasses
import json
import math
import os

import numpy as np
import pytest
from absl import flags

from data_pipelines import regions as R, synthetic, tasks, text
from data_pipelines.example import ExampleError, region_prompt
from ferret_jax import config_lib
from ferret_jax import evaluate as E
from tests import train_helpers as th

# ----------------------------------------------------------------------------------------------
# IoU


def test_iou_edge_cases():
    assert E.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert E.iou((0, 0, 10, 10), (0, 0, 5, 10)) == 0.5  # continuous areas: 50 / 100
    assert E.iou((0, 0, 5, 10), (0, 0, 10, 10)) == 0.5  # symmetric
    assert E.iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no area
    assert E.iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert E.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # two zero boxes: empty union, no crash
    assert E.iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0  # an inverted box has no area
    assert E.iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    with pytest.raises(ValueError, match="x1, y1, x2, y2"):
        E.iou((0, 0, 10), (0, 0, 10, 10))
    with pytest.raises(ValueError, match="finite"):
        E.iou((0, 0, float("nan"), 10), (0, 0, 10, 10))


def test_merged_box_is_the_union():
    assert E.merged_box([(10, 10, 30, 90), (40, 5, 60, 80)]) == (10, 5, 60, 90)
    assert E.merged_box((1, 2, 3, 4)) == (1, 2, 3, 4)


# ----------------------------------------------------------------------------------------------
# REC


def _rec(box, width=200, height=50):
    return {"id": "r", "box": box, "width": width, "height": height}


def test_rec_accuracy_on_known_answers():
    # A wide 200x50 image: x scales by 200/1000, y by 50/1000. GT (20, 10, 120, 40) is, by hand,
    # x 20 -> 100, y 10 -> 200, x 120 -> 600, y 40 -> 800 on the canvas.
    gt = (20, 10, 120, 40)
    predictions = [
        "The dog [100, 200, 600, 800].",  # exact
        "The dog [700, 0, 999, 100].",  # far off
        "I cannot see it.",  # no box -> zero box
        "Here [700, 0, 999, 100] and there [100, 200, 600, 800].",  # only the first box counts
        "Here [100, 200, 600, 800] and there [700, 0, 999, 100].",
        "A point [500, 500] is no box.",
    ]
    metrics, samples = E.rec_accuracy(predictions, [_rec(gt)] * len(predictions))
    assert [s["correct"] for s in samples] == [True, False, False, False, True, False]
    assert samples[0]["box"] == [20, 10, 120, 40] and samples[0]["iou"] == 1.0
    assert samples[2]["box"] == [0, 0, 0, 0] and samples[2]["iou"] == 0.0
    assert samples[5]["box"] == [0, 0, 0, 0]
    assert metrics["n"] == 6 and metrics["acc50"] == pytest.approx(2 / 6)
    assert metrics["mean_iou"] == pytest.approx(sum(s["iou"] for s in samples) / 6)


def test_rec_rescales_x_and_y_with_their_own_sides():
    # Tall 50x200 image: the same canvas numbers mean other pixels, so the wide image's exact
    # answer now misses a GT placed by this image's scale.
    metrics, samples = E.rec_accuracy(["[100, 200, 600, 800]"], [_rec((5, 40, 30, 160), width=50, height=200)])
    assert samples[0]["box"] == [5, 40, 30, 160] and metrics["acc50"] == 1.0
    metrics, _ = E.rec_accuracy(["[100, 200, 600, 800]"], [_rec((20, 10, 120, 40), width=50, height=200)])
    assert metrics["acc50"] == 0.0


def test_rec_threshold_is_inclusive_and_canvas_values_clamp():
    # 1000x1000: canvas == pixels. Half the GT box -> IoU exactly 0.5 -> correct.
    _, samples = E.rec_accuracy(["[0, 0, 50, 100]"], [_rec((0, 0, 100, 100), 1000, 1000)])
    assert samples[0]["iou"] == 0.5 and samples[0]["correct"]
    _, samples = E.rec_accuracy(["[0, 0, 1500, 2000]"], [_rec((0, 0, 999, 999), 1000, 1000)])
    assert samples[0]["box"] == [0, 0, 999, 999]


def test_rec_reads_the_size_from_the_image_and_checks_lengths():
    record = {"id": "r", "box": (20, 10, 120, 40), "image": np.zeros((50, 200, 3), np.uint8)}
    assert E.rec_accuracy(["[100, 200, 600, 800]"], [record])[0]["acc50"] == 1.0
    with pytest.raises(ValueError, match="2 predictions for 1 records"):
        E.rec_accuracy(["a", "b"], [record])
    assert E.rec_accuracy([], [])[0] == {"acc50": None, "mean_iou": None, "n": 0}


# ----------------------------------------------------------------------------------------------
# ROC


@pytest.mark.parametrize(
    "answer, name, synonyms, correct",
    [
        ("It is a dog.", "dog", (), True),
        ("It is a puppy.", "dog", ("puppy",), True),  # a synonym
        ("A DOG, clearly.", "dog", (), True),  # case-insensitive
        ("It is not a cat, it is a dog", "dog", (), True),  # the negated clause goes, the GT stays
        ("No, it is a dog.", "dog", (), True),
        ("It is not a dog.", "dog", (), False),
        ("It is not a dog", "dog", (), False),  # a clause cut at the end of the text goes too
        ("There is no dog here.", "dog", (), False),
        ("It is a cat or a dog.", "dog", (), True),  # both named, GT not negated: correct, as Ferret
        ("It is a cat.", "dog", (), False),
        ("It is a hotdog.", "dog", (), False),  # whole words only
        ("Nothing but a dog.", "dog", (), True),  # "nothing" is no negation
        ("It is a small  red\ncircle.", "small red circle", (), True),  # any whitespace between words
        ("It is a large red circle.", "small red circle", (), False),
        ("It is a bat.", "bat (animal)", (), True),  # LVIS qualifiers split as Ferret does
        ("It is a baseball bat.", "baseball_bat", (), True),
    ],
)
def test_roc_correct(answer, name, synonyms, correct):
    assert E.roc_correct(answer, name, synonyms) is correct


def test_remove_negations_is_clause_bounded():
    assert E.remove_negations("It is not a cat, it is a dog.").split() == ["It", "is", "it", "is", "a", "dog."]
    assert "north" in E.remove_negations("It points north.")


def test_roc_accuracy_per_kind():
    records = [
        {"name": "dog", "synonyms": ("dog",), "kind": "point"},
        {"name": "dog", "synonyms": ("dog",), "kind": "point"},
        {"name": "cat", "synonyms": ("cat", "kitty"), "kind": "box"},
        {"name": "cup", "synonyms": ("cup",), "kind": "free_form"},
    ]
    answers = ["It is a dog.", "It is not a dog.", "It is a kitty.", "It is a mug."]
    metrics, samples = E.roc_accuracy(answers, records)
    assert [s["correct"] for s in samples] == [True, False, True, False]
    assert metrics == {
        "accuracy": 0.5, "n": 4,
        "accuracy/box": 1.0, "n/box": 1,
        "accuracy/free_form": 0.0, "n/free_form": 1,
        "accuracy/point": 0.5, "n/point": 2,
    }


# ----------------------------------------------------------------------------------------------
# Flickr30k Entities


def test_flickr_recall_matches_normalized_phrases_against_merged_boxes():
    # 100x100 image: pixel = canvas / 10. "A man" has two GT boxes whose union the answer hits
    # (IoU 1 with the union, 0.4 with the first box alone); "the red car" is never grounded.
    record = {"id": "f", "width": 100, "height": 100, "phrases": ["A man", "the red car"],
              "boxes": [[(10, 10, 30, 90), (40, 10, 60, 90)], (60, 60, 90, 90)]}
    answer = "a Man, [100, 100, 600, 900] stands next to a dog [600, 600, 900, 900]."
    metrics, samples = E.flickr_recall([answer], [record])
    man, car = samples[0]["phrases"]
    assert man["box"] == [10, 10, 60, 90] and man["iou"] == 1.0 and man["hit"]
    assert car["box"] is None and car["iou"] == 0.0 and not car["hit"]
    assert metrics == {"recall1": 0.5, "n_phrases": 2, "n": 1}

    # The first matching grounding and its first box count; punctuation and case do not.
    answer = "THE RED CAR: [0, 0, 100, 100] [600, 600, 900, 900]. The red car [600, 600, 900, 900]."
    _, samples = E.flickr_recall([answer], [record])
    assert samples[0]["phrases"][1]["box"] == [0, 0, 10, 10] and not samples[0]["phrases"][1]["hit"]
    # A phrase runs from the punctuation after the previous box (SPEC §5.4), so "and" joins it.
    answer = "A man [100, 100, 600, 900], the red car [600, 600, 900, 900]."
    assert E.flickr_recall([answer], [record])[0]["recall1"] == 1.0
    answer = "A man [100, 100, 600, 900] and the red car [600, 600, 900, 900]."
    assert E.flickr_recall([answer], [record])[0]["recall1"] == 0.5


def test_flickr_unmerged_box_would_miss():
    record = {"width": 100, "height": 100, "phrases": ["a man"], "boxes": [(10, 10, 30, 90)]}
    metrics, _ = E.flickr_recall(["a man [100, 100, 600, 900]"], [record])
    assert metrics["recall1"] == 0.0


# ----------------------------------------------------------------------------------------------
# Synthetic held-out records


@pytest.fixture(scope="module")
def grounding_records():
    return E.synthetic_grounding_records(num_records=200)


@pytest.fixture(scope="module")
def referring_records():
    return E.synthetic_referring_records(num_records=200)


def _scene(record):
    split, index = record["id"].split("/")[1:]
    return synthetic.SyntheticSource(split, int(index) + 1)[int(index)]["scene"]


def test_grounding_records_are_deterministic_and_unambiguous(grounding_records):
    assert len(grounding_records) == 200
    again = E.synthetic_grounding_records(num_records=5)
    for a, b in zip(again, grounding_records):
        assert (a["id"], a["question"], a["box"]) == (b["id"], b["question"], b["box"])
        assert np.array_equal(a["image"], b["image"])
    other = E.synthetic_grounding_records(num_records=5, seed=1)
    assert [r["question"] for r in other] != [r["question"] for r in again]
    for record in grounding_records[:40]:
        scene = _scene(record)
        matching = [o for o in scene.objects if o.name == record["expression"]]
        assert len(matching) == 1, record["id"]
        assert record["box"] == matching[0].box  # inclusive mask box, as training writes it
        assert np.array_equal(record["image"], scene.image)


def test_grounding_records_name_the_other_objects(grounding_records):
    counts = collections.Counter()
    for record in grounding_records[:60]:
        scene = _scene(record)
        others = sorted(tuple(o.box) for o in scene.objects if o.name != record["expression"])
        assert sorted(record["other_boxes"]) == others, record["id"]
        counts[len(scene.objects)] += 1
    assert len(counts) > 1  # scenes of one and of several objects, so the split below means something


def test_grounding_by_scene_on_known_answers():
    """Acc@0.5 per number of objects, and how often the box is another object's instead."""
    asked, other = (0, 0, 9, 9), (20, 20, 29, 29)
    records = [
        {"box": asked, "other_boxes": [], "image": np.zeros((40, 40, 3), np.uint8)},  # alone, hit
        {"box": asked, "other_boxes": [], "image": np.zeros((40, 40, 3), np.uint8)},  # alone, miss
        {"box": asked, "other_boxes": [other], "image": np.zeros((40, 40, 3), np.uint8)},  # hit the asked one
        {"box": asked, "other_boxes": [other], "image": np.zeros((40, 40, 3), np.uint8)},  # boxed the other
        {"box": asked, "other_boxes": [other], "image": np.zeros((40, 40, 3), np.uint8)},  # no box at all
    ]
    # boxes on the 0-999 canvas of a 40x40 image: [0, 0, 249, 249] is pixels (0, 0, 9, 9)
    predictions = ["a [0, 0, 249, 249]", "a [500, 500, 999, 999]", "a [0, 0, 249, 249]", "a [500, 500, 749, 749]", "none"]
    metrics, samples = E.score("synthetic_grounding", predictions, records)
    assert metrics["acc50"] == pytest.approx(2 / 5)
    assert metrics["acc50_by_objects"] == {1: 0.5, 2: pytest.approx(1 / 3)}
    assert metrics["other_object_rate"] == pytest.approx(1 / 3)
    # the asked object (top left) comes first in raster order in every crowded scene
    assert metrics["acc50_by_raster_rank"] == {1: pytest.approx(1 / 3)}
    alone = E.grounding_by_scene(samples[:2], records[:2])
    assert alone == {"acc50_by_objects": {1: 0.5}, "other_object_rate": None, "acc50_by_raster_rank": {}}
    # asked second: below the other object, or level with it and to its right
    below = {"box": other, "other_boxes": [asked], "image": np.zeros((40, 40, 3), np.uint8)}
    right = {"box": (20, 0, 29, 9), "other_boxes": [asked], "image": np.zeros((40, 40, 3), np.uint8)}
    first = {"box": asked, "other_boxes": [other, (20, 0, 29, 9)], "image": np.zeros((40, 40, 3), np.uint8)}
    # each answers the top-left object: right where it was asked, wrong where it was not
    ranked, _ = E.score("synthetic_grounding", ["a [0, 0, 249, 249]"] * 3, [below, right, first])
    assert ranked["acc50_by_raster_rank"] == {1: 1.0, 2: 0.0}
    with pytest.raises(ValueError, match="predictions"):
        E.grounding_by_scene(samples, records[:2])


def test_grounding_prompts_are_the_training_task_prompts(grounding_records):
    for record in grounding_records[:20]:
        h, w = record["image"].shape[:2]
        trained = tasks.grounding(record["expression"], [record["box"]], w, h)  # stage III: suffix on
        assert record["turns"] == [trained.turns[0]] and record["question"] == trained.turns[0][1]
        assert record["regions"] == [] and record["segmentations"] == []
    plain = E.synthetic_grounding_records(num_records=3, grounding_suffix=False)
    for record in plain:
        h, w = record["image"].shape[:2]
        assert record["question"] == tasks.grounding(record["expression"], [record["box"]], w, h, suffix=False).turns[0][1]
        assert text.GROUNDING_SUFFIX not in record["question"]


def test_training_answers_score_as_correct_groundings(grounding_records):
    """The GT box convention agrees with how answers are written and decoded: the training
    answers themselves reach the ceiling that canvas truncation leaves (objects of a few pixels
    can lose a pixel per side)."""
    answers = []
    for r in grounding_records:
        h, w = r["image"].shape[:2]
        answers.append(tasks.grounding(r["expression"], [r["box"]], w, h).turns[1][1])
    metrics, samples = E.rec_accuracy(answers, grounding_records)
    assert metrics["acc50"] >= 0.99
    assert all(s["iou"] > 0.4 for s in samples)


def test_referring_records_follow_the_protocol(referring_records):
    assert len(referring_records) == 200
    names = set(synthetic.category_names())
    for i, record in enumerate(referring_records[:30]):
        scene = _scene(record)
        present = {o.name for o in scene.objects}
        assert record["name"] in present and record["negative"] not in present and record["negative"] in names
        assert record["synonyms"] == (record["name"],)
        assert record["kind"] == tasks.REFERRING_KINDS[i % 3]
        first, second = (record["name"], record["negative"]) if i % 2 == 0 else (record["negative"], record["name"])
        assert record["question"].endswith(f"of the image a {first} or a {second}?")
        (obj,) = [o for o in scene.objects if o.box == record["box"]]
        h, w = scene.image.shape[:2]
        (region,) = record["regions"]
        if record["kind"] == "point":
            assert isinstance(region, R.Point) and obj.mask[int(region.y), int(region.x)]
            assert np.array_equal(record["segmentations"][0], obj.mask)  # the training task's point ∩ mask
        else:
            # a free-form region is written as its box too: the region itself tells the kinds apart
            if record["kind"] == "box":
                assert region == R.Box(*obj.box) and np.array_equal(record["segmentations"][0], obj.mask)
            else:
                assert isinstance(region, R.Mask) and np.array_equal(region.mask, obj.mask)
                assert record["segmentations"][0] is None
            # Location and region are deterministic here: the training task writes the same
            # question, in one of its two name orders.
            trained = {
                tasks.referring_classification(
                    tasks.Annotation(obj.name, obj.box, obj.mask), record["negative"], w, h, np.random.default_rng(s),
                    record["kind"],
                ).turns[0][1]
                for s in range(8)
            }
            assert record["question"] in trained
        location = region_prompt(region, w, h).removesuffix(f" {text.REGION_TOKEN}")
        assert record["question"] == text.roc_question(location, first, second)
    again = E.synthetic_referring_records(num_records=4, kinds=("box",))
    assert all(r["kind"] == "box" for r in again)
    with pytest.raises(ValueError, match="kinds"):
        E.synthetic_referring_records(num_records=2, kinds=("polygon",))


# ----------------------------------------------------------------------------------------------
# Loading, the CLI, and evaluate end to end


def test_model_config_round_trips_through_json():
    cfg = config_lib.ferret_config("tiny")
    assert E.ferret_config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    bad = {**dataclasses.asdict(cfg), "wings": 2}
    with pytest.raises(ValueError, match="wings"):
        E.ferret_config_from_dict(bad)
    assert E._max_length({"config": {"data": {"max_length": 77}}}, cfg, None) == 77
    assert E._max_length({}, cfg, None) == cfg.llm.max_position_embeddings
    assert E._max_length({"config": {"data": {"max_length": 77}}}, cfg, 99) == 99


def test_importing_defines_no_flags_and_missing_inputs_fail_clearly(tmp_path):
    assert "checkpoint" not in flags.FLAGS and "task" not in flags.FLAGS
    with pytest.raises(FileNotFoundError, match="no such directory"):
        E.evaluate("synthetic_grounding", str(tmp_path / "missing"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="needs --annotations"):
        E.evaluate("rec", str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        E.evaluate("roc", str(tmp_path), str(tmp_path / "out"), annotations=str(tmp_path / "lvis.json"),
                   image_root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither an export"):
        E.load_model(str(tmp_path))
    with pytest.raises(ValueError, match="unknown task"):
        E.load_records("vqa")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    return th.write_tiny_export(str(tmp_path_factory.mktemp("export")), max_length=544)


@pytest.mark.parametrize("system_prompt", [None, True, False])
def test_load_model_builds_prompts_in_the_format_the_model_was_trained_on(tmp_path, system_prompt):
    source = th.write_tiny_export(str(tmp_path), max_length=300, system_prompt=system_prompt)
    *_, example_config = E.load_model(source)
    assert example_config.system_prompt is (system_prompt is not False)  # runs without the key had it
    assert example_config.max_length == 300


def test_load_model_names_what_a_broken_checkpoint_lacks(tiny_export, tmp_path):
    import shutil

    from ferret_jax import checkpoint

    def broken(name, edit):
        path = tmp_path / name
        shutil.copytree(tiny_export, path)
        edit(path)
        return str(path)

    def meta_edit(change):
        def edit(path):
            meta = json.loads((path / checkpoint.EXPORT_META).read_text())
            change(meta)
            (path / checkpoint.EXPORT_META).write_text(json.dumps(meta))
        return edit

    no_meta = broken("no_meta", lambda p: (p / checkpoint.EXPORT_META).unlink())
    with pytest.raises(FileNotFoundError, match=f"has params but no {checkpoint.EXPORT_META}"):
        E.load_model(no_meta)
    no_model = broken("no_model", meta_edit(lambda m: m.pop("model")))
    with pytest.raises(ValueError, match="its meta has no 'model' config"):
        E.load_model(no_model)
    no_tokenizer = broken("no_tokenizer", lambda p: (p / E.TOKENIZER_FILE).unlink())
    with pytest.raises(FileNotFoundError, match=f"has no {E.TOKENIZER_FILE}"):
        E.load_model(no_tokenizer)
    small_vocab = broken("small_vocab", meta_edit(lambda m: m["model"]["llm"].update(vocab_size=16)))
    with pytest.raises(ValueError, match="ids, the LLM has 16"):
        E.load_model(small_vocab)


def test_records_and_scores_refuse_bad_arguments_clearly():
    with pytest.raises(ValueError, match="max_records must be positive, got 0"):
        E.load_records("synthetic_grounding", max_records=0)
    with pytest.raises(ValueError, match="unknown referring kind 'scribble'"):
        E.load_records("roc", kind="scribble")
    with pytest.raises(ValueError, match="num_records must be positive, got 0"):
        E.synthetic_grounding_records(num_records=0)
    with pytest.raises(ValueError, match="has neither width/height nor an image"):
        E.record_size({"id": "r1"})
    assert E.record_size({"width": 30, "height": 20, "image": np.zeros((5, 6, 3))}) == (30, 20)
    assert E.record_size({"image": np.zeros((5, 6, 3))}) == (6, 5)
    with pytest.raises(ValueError, match="2 phrases but 1 ground-truth boxes"):
        E.flickr_sample("a dog [1, 2, 3, 4].", ["a dog", "a cat"], [(0, 0, 1, 1)], 10, 10)
    with pytest.raises(ValueError, match="3 predictions for 2 records"):
        E.rec_accuracy(["", "", ""], [{"box": (0, 0, 1, 1), "width": 2, "height": 2}] * 2)
    with pytest.raises(ValueError, match="model config must be a dict, got list"):
        E.ferret_config_from_dict([])
    with pytest.raises(ValueError, match=r"model config lacks \['dino', 'llm'\]"):
        E.ferret_config_from_dict({"clip": {}})
    with pytest.raises(ValueError, match="model config llm: expected a dict, got int"):
        E.ferret_config_from_dict({"clip": {}, "dino": {}, "llm": 3})


def test_decode_output_cuts_at_eos_and_drops_unknown_ids(tiny_export):
    tokenizer = text.Tokenizer(model_file=os.path.join(tiny_export, E.TOKENIZER_FILE))
    ids = tokenizer.encode("It is a large red circle.")
    row = np.asarray(ids[:3] + [10**6] + ids[3:] + [tokenizer.eos_id] + ids[:2] + [0, 0], np.int32)
    assert E.decode_output(row, len(ids) + 2, tokenizer) == "It is a large red circle."
    assert E.decode_output(row, 3, tokenizer) == tokenizer.decode(ids[:3]).strip()


def test_evaluate_end_to_end(tiny_export, tmp_path):
    logs = []
    out = str(tmp_path / "eval")
    metrics = E.evaluate("synthetic_grounding", tiny_export, out, num_records=4, batch_size=3, max_new_tokens=8,
                         log=logs.append)
    with open(os.path.join(out, E.PREDICTIONS_FILE)) as f:
        lines = [json.loads(line) for line in f]
    assert [line["id"] for line in lines] == [f"synthetic/test/{i}" for i in range(4)]
    assert all(isinstance(line["prediction"], str) and math.isfinite(line["iou"]) for line in lines)
    assert all(line["question"].startswith("What is the location of") for line in lines)
    with open(os.path.join(out, E.METRICS_FILE)) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(metrics))
    assert saved["n"] == 4 and saved["n_records"] == 4 and saved["n_failed"] == 0
    assert 0.0 <= saved["acc50"] <= 1.0 and math.isfinite(saved["mean_iou"])
    # the metrics are the lines' own scores, each line its record's
    assert saved["mean_iou"] == pytest.approx(np.mean([line["iou"] for line in lines]))
    assert saved["acc50"] == np.mean([line["correct"] for line in lines])
    records = E.synthetic_grounding_records(num_records=4)
    assert [line["question"] for line in lines] == [r["question"] for r in records]
    assert logs[-1].startswith("[predict] 4/4 records")  # two batches, the last one padded
    assert "acc50" in E.metrics_table(metrics)


def test_evaluate_lists_and_counts_the_records_it_cannot_read_or_prompt(tiny_export, tmp_path, monkeypatch):
    """An unreadable record is listed with its error and not scored (no ground truth); a record
    whose prompt cannot be built is scored with an empty answer; both are counted by reason, and
    the records beside them in their batches are answered and scored."""
    good = E.synthetic_grounding_records(num_records=3)
    too_long = dict(good[1], turns=[("human", good[1]["question"] + " again" * 600)])

    class Records:
        def __len__(self):
            return 4

        def __getitem__(self, index):
            if index == 1:
                raise ExampleError("unreadable_image", "cannot read image scene1.png")
            return [good[0], None, too_long, good[2]][index]

    monkeypatch.setattr(E, "load_records", lambda *args, **kwargs: Records())
    out = str(tmp_path / "eval")
    metrics = E.evaluate("synthetic_grounding", tiny_export, out, num_records=4, batch_size=2, max_new_tokens=8,
                         log=lambda _: None)
    assert metrics["n_records"] == 4 and metrics["n_failed"] == 2 and metrics["n_unreadable"] == 1
    assert metrics["failures"] == {"too_long": 1, "unreadable_image": 1}
    assert metrics["n"] == 3  # the unreadable record is not scored
    with open(os.path.join(out, E.PREDICTIONS_FILE)) as f:
        lines = [json.loads(line) for line in f]
    assert [line["index"] for line in lines] == [0, 1, 2, 3]
    assert lines[1]["error"].startswith("unreadable_image: cannot read image") and "iou" not in lines[1]
    assert lines[2]["error"].startswith("too_long:") and lines[2]["prediction"] == "" and lines[2]["iou"] == 0.0
    for line, record in ((lines[0], good[0]), (lines[3], good[2])):
        assert "error" not in line and line["id"] == record["id"] and line["question"] == record["question"]
        assert line["prediction"] and math.isfinite(line["iou"])


def test_synthetic_world_is_the_training_sources_scene_options():
    """Held-out scenes come from the training world: the scene options of the checkpoint's first
    synthetic source, without the source's and the task's own options."""
    config = config_lib.stage_config(3, "demo")
    world = E.synthetic_world({"config": {"data": config.data.to_dict()}})
    assert world == config_lib._DEMO_SCENE
    synthetic.SyntheticSource("test", 3, seed=0, **world)[0]  # every key is a make_scene option
    assert E.synthetic_world({"config": {"data": {"sources": {"x": {"type": "grit"}}}}}) is None
