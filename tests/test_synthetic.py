"""The synthetic shapes world: masks and boxes agree with the pixels; sizes cover every grid;
records are deterministic and splits disjoint."""

import numpy as np
import pytest

from data_pipelines import anyres, regions, synthetic


@pytest.fixture(scope="module")
def scenes():
    source = synthetic.SyntheticSource("train", num_records=300, seed=0)
    return [source[i]["scene"] for i in range(len(source))]


def test_masks_and_boxes_agree_with_pixels(scenes):
    for scene in scenes[:120]:
        h, w = scene.image.shape[:2]
        painted = np.zeros((h, w), bool)
        for obj in scene.objects:
            assert obj.mask.shape == (h, w) and obj.mask.any()
            colour = np.asarray(synthetic.COLOURS[obj.colour], np.uint8)
            assert (scene.image[obj.mask] == colour).all()  # every mask pixel is painted in its colour
            ys, xs = np.nonzero(obj.mask)
            assert obj.box == (xs.min(), ys.min(), xs.max(), ys.max())  # row = y
            # the box covers the mask and the region pipeline reproduces the mask from the box
            assert (regions.region_mask(regions.Box(*obj.box), w, h, obj.mask) == obj.mask).all()
            assert not (painted & obj.mask).any()  # no overlap: masks are exact
            painted |= obj.mask
        assert 1 <= len(scene.objects) <= 8


def test_shapes_have_their_geometry():
    box = (10, 10, 49, 49)
    areas = {s: synthetic._shape_mask(s, box, 60, 60).sum() for s in synthetic.SHAPES}
    assert areas["square"] == 40 * 40
    assert 0.7 < areas["circle"] / 1600 < 0.85  # pi/4
    assert 0.4 < areas["triangle"] / 1600 < 0.6 and 0.4 < areas["diamond"] / 1600 < 0.6
    tri = synthetic._shape_mask("triangle", box, 60, 60)
    assert tri[48, 12] and not tri[12, 12]  # apex at the top (y grows downwards)


def test_every_grid_occurs(scenes):
    grids = {anyres.select_grid(*s.size, cell=80) for s in scenes}
    assert len(grids) >= 12  # most of the 14 grids from 300 scenes; wide, tall and square alike
    assert any(c > r for c, r in grids) and any(r > c for c, r in grids)


def test_deterministic_and_splits_disjoint():
    a = synthetic.SyntheticSource("train", 10, seed=3)
    b = synthetic.SyntheticSource("train", 10, seed=3)
    v = synthetic.SyntheticSource("val", 10, seed=3)
    for i in range(10):
        np.testing.assert_array_equal(a[i]["scene"].image, b[i]["scene"].image)
        assert a[i]["scene"].objects == b[i]["scene"].objects
    assert all(a[i]["scene"].image.shape != v[i]["scene"].image.shape or
               (a[i]["scene"].image != v[i]["scene"].image).any() for i in range(10))
    assert a[4]["id"] == "synthetic/train/4"


def test_errors():
    with pytest.raises(ValueError, match="unknown split"):
        synthetic.SyntheticSource("dev")
    with pytest.raises(IndexError):
        synthetic.SyntheticSource("train", 5)[5]
    with pytest.raises(ValueError, match="min_objects"):
        synthetic.make_scene(np.random.default_rng(0), min_objects=3, max_objects=2)


def test_world_without_size_words_names_colour_and_shape():
    named = synthetic.SyntheticSource("train", 40, seed=3)
    unnamed = synthetic.SyntheticSource("train", 40, seed=3, name_sizes=False)
    assert len(unnamed.categories) == len(synthetic.COLOURS) * len(synthetic.SHAPES)
    assert set(named.categories) == set(synthetic.category_names()) and "red circle" in unnamed.categories
    for i in range(40):
        a, b = named[i], unnamed[i]
        np.testing.assert_array_equal(a["scene"].image, b["scene"].image)  # the same scenes, only the names differ
        assert [o.name.split(" ", 1)[1] for o in a["scene"].objects] == [o.name for o in b["scene"].objects]
        assert all(o.name in b["categories"] for o in b["scene"].objects)
