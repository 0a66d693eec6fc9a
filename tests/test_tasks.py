"""Task builders: SPEC §5.3 prompts, raster order, referring kinds, and examples built from them."""

import re

import numpy as np
import pytest

from data_pipelines import example as ex
from data_pipelines import regions as R
from data_pipelines import synthetic, tasks, text

W, H = 200, 100


def _objects():
    mask = np.zeros((H, W), bool)
    mask[60:80, 20:50] = True
    return [
        tasks.Annotation("dog", (120, 10, 150, 40)),
        tasks.Annotation("cat", (20, 60, 49, 79), mask),
        tasks.Annotation("bird", (10, 10, 30, 30)),
    ]


def test_raster_order_is_top_then_left():
    assert [o.name for o in tasks.raster_order(_objects())] == ["bird", "dog", "cat"]


def test_dense_detection_prompt_and_answer():
    task = tasks.dense_detection(_objects(), W, H, np.random.default_rng(0))
    assert task.turns[0] == ("human", "Please localize visible objects in the image in a raster scan order.")
    assert task.turns[1][1] == (
        "The objects are: 1: bird [50, 100, 150, 300], 2: dog [600, 100, 750, 400], 3: cat [100, 600, 245, 790]."
    )
    assert task.regions == []


def test_dense_referring_binds_one_region_per_object():
    rng = np.random.default_rng(1)
    task = tasks.dense_referring(_objects(), W, H, rng)
    question, answer = task.turns[0][1], task.turns[1][1]
    assert question.startswith("Please classify the objects in the following locations. 1: [")
    assert question.count(text.REGION_TOKEN) == len(task.regions) == 3
    assert answer == "Here are the categories: 1: bird, 2: dog, 3: cat."
    # the region text of each entry is its region's box (or point)
    for k, region in enumerate(task.regions):
        written = re.search(rf"{k + 1}: (\[[\d, ]+\]) {text.REGION_TOKEN}", question).group(1)
        assert ex.region_prompt(region, W, H) == f"{written} {text.REGION_TOKEN}"


def test_referring_kinds():
    rng = np.random.default_rng(2)
    cat = _objects()[1]
    point, seg, prompt = tasks.referring_region(cat, "point", rng, W, H)
    assert isinstance(point, R.Point) and cat.mask[int(point.y), int(point.x)]
    assert prompt.count(",") == 1 and seg is cat.mask
    free, seg, _ = tasks.referring_region(cat, "free_form", rng, W, H)
    assert isinstance(free, R.Mask) and seg is None
    dog = _objects()[0]  # no mask: point falls inside the box and is intersected with it
    point, seg, _ = tasks.referring_region(dog, "point", rng, W, H)
    assert 120 <= point.x <= 150 and 10 <= point.y <= 40 and seg.sum() == 31 * 31
    box, seg, _ = tasks.referring_region(dog, "free_form", rng, W, H)
    assert isinstance(box, R.Box) and seg is None
    box, seg, prompt = tasks.referring_region(cat, "box", rng, W, H)  # a box is intersected with the mask
    assert box == R.Box(*cat.box) and seg is cat.mask and prompt == f"[100, 600, 245, 790] {text.REGION_TOKEN}"
    with pytest.raises(ValueError, match="unknown referring kind"):
        tasks.referring_region(dog, "scribble", rng, W, H)


def test_grounding_and_classification_prompts():
    dog = _objects()[0]
    g = tasks.grounding(dog.name, [dog.box], W, H)
    assert g.turns[0][1] == "What is the location of dog in the image?\nInclude the coordinates for each mentioned object."
    assert g.turns[1][1] == "dog [600, 100, 750, 400]."
    two = tasks.grounding("red dog", [dog.box, (0, 0, 99, 49)], W, H, suffix=False)
    assert two.turns[0][1] == "What is the location of red dog in the image?"
    assert two.turns[1][1] == "red dog [[600, 100, 750, 400], [0, 0, 495, 490]]."
    assert text.parse_groundings(two.turns[1][1], W, H)[0].boxes == [(120, 10, 150, 40), (0, 0, 99, 49)]
    c = tasks.referring_classification(dog, "cat", W, H, np.random.default_rng(0))
    assert re.fullmatch(r"Is the object \[600, 100, 750, 400\] <region_fea> of the image a (dog or a cat|cat or a dog)\?", c.turns[0][1])
    assert c.turns[1][1] == "It is a dog."
    assert tasks.caption(_objects()).turns[1][1] == "The image shows bird, dog and cat."


def test_referred_name_reads_back_the_referring_answer():
    for name in ("dog", "small red circle", "bat (animal)"):
        assert tasks.referred_name(tasks.referring_answer(name)) == name
    for other in ("It is not a dog.", "dog [600, 100, 750, 400].", "It is a dog", "The image shows dog."):
        assert tasks.referred_name(other) is None


def test_combine_keeps_the_order_of_turns_regions_and_segmentations():
    rng = np.random.default_rng(3)
    dog, cat, _ = _objects()
    first = tasks.referring_classification(cat, "bird", W, H, rng, "point")
    second = tasks.grounding(dog.name, [dog.box], W, H)
    third = tasks.referring_classification(dog, "cat", W, H, rng, "box")
    first = tasks.Task(first.turns, first.regions, first.segmentations, {"clipped": 1})
    third = tasks.Task(third.turns, third.regions, third.segmentations, {"clipped": 2, "swapped": 1})
    both = tasks.combine([first, second, third])
    assert both.turns == first.turns + second.turns + third.turns
    assert both.regions == first.regions + third.regions
    assert both.segmentations[0] is cat.mask and both.segmentations[1] is None  # the dog has no mask
    assert both.repairs == {"clipped": 3, "swapped": 1}
    with pytest.raises(ValueError, match="nothing to combine"):
        tasks.combine([])


def test_dense_tasks_keep_at_most_max_objects_in_raster_order():
    objs = [tasks.Annotation(f"thing{i}", (10 * i, 5 * (7 - i), 10 * i + 5, 5 * (7 - i) + 4)) for i in range(8)]
    drawn = set()
    for seed in range(10):
        answer = tasks.dense_detection(objs, W, H, np.random.default_rng(seed), max_objects=3).turns[1][1]
        names = re.findall(r"thing\d", answer)
        assert len(set(names)) == 3
        assert names == sorted(names, reverse=True)  # raster order: the higher boxes (larger i) first
        drawn |= set(names)
    assert len(drawn) > 3  # a random subset, not always the same three


def test_builders_refuse_an_image_without_objects():
    rng = np.random.default_rng(0)
    for build in (lambda: tasks.grounding("dog", [], W, H), lambda: tasks.caption([]),
                  lambda: tasks.dense_detection([], W, H, rng), lambda: tasks.dense_referring([], W, H, rng)):
        with pytest.raises(ValueError, match="no box to ground 'dog'|no objects"):
            build()


def test_synthetic_scenes_become_valid_examples():
    """Every builder on synthetic scenes goes through build_example into a contract example."""
    source = synthetic.SyntheticSource("train", 20, seed=5)
    corpus = []
    built = []
    rng = np.random.default_rng(0)
    for i in range(20):
        scene = source[i]["scene"]
        w, h = scene.size
        objs = [tasks.Annotation(o.name, o.box, o.mask) for o in scene.objects]
        kind = tasks.REFERRING_KINDS[i % len(tasks.REFERRING_KINDS)]
        for task in (tasks.dense_referring(objs, w, h, rng), tasks.dense_detection(objs, w, h, rng),
                     tasks.grounding(objs[0].name, [objs[0].box], w, h), tasks.caption(objs),
                     tasks.referring_classification(objs[0], "nothing", w, h, rng, kind)):
            corpus += [t for _, t in task.turns]
            built.append((scene, task))
    tok = text.Tokenizer(model_proto=text.train_tiny_tokenizer(corpus + [text.SYSTEM_PROMPT], vocab_size=600))
    cfg = ex.ExampleConfig(max_length=2048, max_regions=10, global_size=28, cell=28, max_tiles=6,
                           global_grid=2, tile_grid=2, num_points=32)
    for scene, task in built:
        out = ex.build_example(scene.image, task.turns, task.regions, tok, cfg, rng, task.segmentations)
        assert out["region_valid"].sum() == len(task.regions)
        assert (out["region_index"] >= 0).sum() == len(task.regions)
        assert tok.decode(out["targets"][out["loss_mask"] > 0].tolist()) == task.turns[1][1] + "</s>"
