"""Property test: random mixtures of good and malformed GRIT records (and garbage) go through the
pipeline; it yields only valid contract batches, never raises, and counts every skipped draw with
the right reason."""

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from data_pipelines import example as ex
from data_pipelines import pipeline, text
from data_pipelines.sources import grit
from tests import data_fixtures as fx

CFG = ex.ExampleConfig(max_length=512, max_regions=3, global_size=28, cell=28, max_tiles=6, global_grid=2,
                       tile_grid=2, num_points=8)
W, H = fx.PHOTOS["chelsea.png"][1]
WORDS = st.text(alphabet=st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), max_size=30)


def _record(question, answer, boxes_h, boxes_g, image="chelsea.png", **extra):
    return {"image": image, "image_w": W, "image_h": H, **extra,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
            "box_x1y1x2y2": [boxes_h, boxes_g]}


@st.composite
def good_record(draw):
    q, a = draw(WORDS), draw(WORDS)
    x1, y1 = draw(st.integers(-20, W - 10)), draw(st.integers(-20, H - 10))  # may reach outside: clipped
    box = [x1, y1, max(x1 + draw(st.integers(2, 60)), 1), max(y1 + draw(st.integers(2, 40)), 1)]
    kind = draw(st.sampled_from(["refer", "ground", "plain"]))
    if kind == "refer":
        return _record(f"<image>\n{q} <bbox_location0>?", a, [box], [])
    if kind == "ground":
        return _record(q, f"{a} <bbox_location0>.", [], [box])
    return _record(q, a or "ok", [], [])


GOOD_BOX = [10, 10, 40, 30]
BAD = {  # kind -> (record or raw line, the reason it must be counted under)
    "missing_image": (_record("q <bbox_location0>", "a", [GOOD_BOX], [], image="missing.png"), "bad_image"),
    "corrupt_image": (_record("q", "a", [], [], image="corrupt.png"), "bad_image"),
    "no_image": ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "no_image"),
    "bad_role": (_record("q", "a", [], []) | {"conversations": [{"from": "robot", "value": "q"}]}, "bad_record"),
    "not_alternating": (_record("q", "a", [], []) | {"conversations": [{"from": "gpt", "value": "q"},
                                                                      {"from": "human", "value": "a"}]}, "bad_record"),
    "boxes_not_per_turn": (_record("q", "a", [], []) | {"box_x1y1x2y2": [[GOOD_BOX]]}, "bad_record"),
    "box_not_numbers": (_record("q <bbox_location0>", "a", [["a", 1, 2, 3]], []), "bad_record"),
    "unknown_placeholder": (_record("q <bbox_location3>", "a", [GOOD_BOX], []), "bad_placeholder"),
    "malformed_placeholder": (_record("q <bbox_locationX>", "a", [GOOD_BOX], []), "bad_placeholder"),
    "zero_area": (_record("q <bbox_location0>", "a", [[20, 20, 20, 30]], []), "bad_region"),
    "outside": (_record("q", "a <bbox_location0>", [], [[W + 5, 0, W + 30, 10]]), "bad_region"),
    "empty_mask": (_record("q <bbox_location0>", "a", [GOOD_BOX], [], masks=[[fx.rle(np.zeros((H, W), bool))], []]),
                   "bad_region"),
    "too_many_regions": (_record(" ".join(f"<bbox_location{k}>" for k in range(4)), "a", [GOOD_BOX] * 4, []),
                         "too_many_regions"),
    "too_long": (_record("q", "word " * 600, [], []), "too_long"),
    "stray_region_token": (_record("what is <region_fea>?", "a", [], []), "slot_without_region"),
    "region_token_in_answer": (_record("q", "a <region_fea>", [], []), "bad_record"),
    "json_list": ([1, 2], "bad_record"),
    "not_json": (b"{'image': oops", "bad_record"),
}
GARBAGE = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                       max_leaves=6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("malformed"))
    fx.write_photos(root)
    with open(os.path.join(root, "images", "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    corpus = [text.SYSTEM_PROMPT, "word " * 20, "q a what is ok"]
    return root, text.train_tiny_tokenizer(corpus, vocab_size=300)


ACCESSED: list[int] = []


class Logged:
    """Records every index the pipeline reads (in-process, so the list is this one)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        ACCESSED.append(int(index))
        return self.source[index]


def _check_contract(batch, vocab):
    n = batch["tokens"].shape[0]
    assert batch["tokens"].shape == (n, CFG.max_length) and batch["region_points"].shape == (n, 3, 8, 2)
    for k in ("global_image", "tiles", "region_points", "loss_mask"):
        assert np.isfinite(batch[k]).all()
    assert (batch["loss_mask"].sum(1) > 0).all()
    assert ((batch["tokens"] == text.IMAGE_ID) | ((batch["tokens"] >= 0) & (batch["tokens"] <= vocab))).all()
    assert ((batch["region_index"] >= 0).sum(1) == batch["region_valid"].sum(1)).all()
    grid = batch["grid"]
    assert ((batch["visual_index"] >= 0).sum(1) == 4 + grid[:, 0] * grid[:, 1] * 4).all()


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(good=st.lists(good_record(), min_size=4, max_size=10),
       bad=st.lists(st.sampled_from(sorted(BAD)) | GARBAGE.map(lambda g: ("garbage", g)), max_size=5),
       seed=st.integers(0, 2**16))
def test_malformed_records_are_skipped_and_counted(world, good, bad, seed):
    root, proto = world
    bad = bad[: len(good) // 2]  # mostly good data: 16 bad draws in a row would be a data problem
    expected = ["ok"] * len(good)
    lines = [json.dumps(r).encode() for r in good]
    for item in bad:
        if isinstance(item, tuple):  # garbage: a JSON value that is not a usable record
            lines.append(json.dumps(item[1]).encode())
            expected.append("bad_record")
        else:
            record, reason = BAD[item]
            lines.append(record if isinstance(record, bytes) else json.dumps(record).encode())
            expected.append(reason)
    order = np.random.default_rng(seed).permutation(len(lines))
    path = os.path.join(root, f"grit_{seed}.jsonl")
    with open(path, "wb") as f:
        f.write(b"\n".join(lines[i] for i in order) + b"\n")
    expected = [expected[i] for i in order]

    source = Logged(grit.GritSource(path, os.path.join(root, "images")))
    batches = pipeline.build_batches([source], [1.0], [pipeline.grit_task], proto, CFG, batch_size=2, seed=seed)
    ACCESSED.clear()
    got = [batches[i] for i in range(4)]
    vocab = text.Tokenizer(model_proto=proto).region_id
    for b in got:
        _check_contract(b, vocab)
    skips = sum(b["skips"].sum(0) for b in got)
    assert len(ACCESSED) == 8 + skips.sum()  # every draw became an example or a counted skip
    want = np.zeros(len(pipeline.SKIP_REASONS), int)
    for i in ACCESSED:
        if expected[i] != "ok":
            want[pipeline.SKIP_REASONS.index(expected[i])] += 1
    np.testing.assert_array_equal(skips, want)
    STATS["skips"] += int(skips.sum())


STATS = {"skips": 0}


def test_the_property_test_saw_skips():
    """Guards against a vacuous run (e.g. a strategy that stops producing bad records)."""
    assert STATS["skips"] > 10
