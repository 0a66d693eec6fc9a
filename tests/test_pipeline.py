"""grain pipeline: contract batches from the synthetic world, determinism, resumable iterator state,
disjoint process shards, and bad records counted instead of raised."""

import re

import numpy as np
import pytest

from data_pipelines import example as ex
from data_pipelines import pipeline, synthetic, tasks, text

CFG = ex.ExampleConfig(max_length=1024, max_regions=10, global_size=28, cell=28, max_tiles=6, global_grid=2,
                       tile_grid=2, num_points=16)


@pytest.fixture(scope="module")
def proto():
    source = synthetic.SyntheticSource("train", 30, seed=0)
    corpus = [text.SYSTEM_PROMPT, text.GROUNDING_SUFFIX, tasks.DENSE_REFERRING_Q, tasks.DENSE_DETECTION_Q]
    rng = np.random.default_rng(0)
    for stage in (1, 2, 3):
        fn = pipeline.synthetic_task(stage)
        for i in range(30):
            corpus += [t for _, t in fn(source[i], rng)[1].turns]
    return text.train_tiny_tokenizer(corpus, vocab_size=800)


def _dataset(proto, stage=3, seed=0, process_index=0, process_count=1, sources=None, fns=None, weights=None):
    sources = sources or [synthetic.SyntheticSource("train", 1000, seed=1)]
    fns = fns or [pipeline.synthetic_task(stage)]
    return pipeline.build_dataset(sources, weights or [1.0] * len(sources), fns, proto, CFG, batch_size=2, seed=seed,
                                  process_index=process_index, process_count=process_count)


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_batches_follow_the_contract(proto, stage):
    batch = next(iter(_dataset(proto, stage)))
    assert batch["tokens"].shape == (2, CFG.max_length) and batch["tiles"].shape == (2, 6, 28, 28, 3)
    assert batch["region_points"].shape == (2, 10, 16, 2) and batch["skips"].shape == (2, len(pipeline.SKIP_REASONS))
    assert (batch["loss_mask"].sum(1) > 0).all()
    if stage == 1:
        assert (batch["region_index"] < 0).all()


def test_deterministic_and_resumable(proto):
    a = _take(iter(_dataset(proto, seed=4)), 3)
    b = _take(iter(_dataset(proto, seed=4)), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["region_points"], y["region_points"])
    it = iter(_dataset(proto, seed=4))
    _take(it, 1)
    state = it.get_state()
    expected = _take(it, 2)
    resumed = iter(_dataset(proto, seed=4))
    resumed.set_state(state)
    for x, y in zip(expected, _take(resumed, 2)):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["global_image"], y["global_image"])
    c = next(iter(_dataset(proto, seed=5)))
    assert not np.array_equal(a[0]["tokens"], c["tokens"])


class _Indexed:
    """Records that carry their index in the image, to see which records a process reads."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": i}


def _indexed_task(record, rng):
    image = np.full((28, 28, 3), record["i"], np.uint8)
    return image, tasks.Task([("human", "What?"), ("gpt", "A shape.")], [], [])


def test_process_shards_are_disjoint_and_cover(proto):
    seen = []
    for p in range(2):
        it = iter(_dataset(proto, process_index=p, process_count=2, sources=[_Indexed(40)], fns=[_indexed_task]))
        ids = []
        for batch in _take(it, 10):  # 2 processes x 10 batches x 2 = one epoch of 40 records
            ids += [int(np.rint(g[0, 0, 0] * 0.26862954 * 255 + 0.48145466 * 255)) for g in batch["global_image"]]
        seen.append(ids)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(40))


def test_bad_records_are_counted_not_raised(proto):
    class Flaky(_Indexed):
        def __getitem__(self, i):
            if i % 3 == 0:
                raise OSError(f"cannot read record {i}")
            return {"i": i}

    def task(record, rng):
        if record["i"] % 3 == 1:  # a region slot without a region
            return np.zeros((28, 28, 3), np.uint8), tasks.Task([("human", f"What is {text.REGION_TOKEN}?"), ("gpt", "x")], [], [])
        return _indexed_task(record, rng)

    batches = _take(iter(_dataset(proto, sources=[Flaky(30)], fns=[task])), 10)
    skips = sum(b["skips"].sum(0) for b in batches)
    assert skips[pipeline.SKIP_REASONS.index("bad_record")] > 0
    assert skips[pipeline.SKIP_REASONS.index("slot_without_region")] > 0
    for b in batches:  # only good records made it into batches
        assert (b["loss_mask"].sum(1) > 0).all() and (b["region_index"] < 0).all()


def test_stage3_grounding_share():
    """`grounding_share` 1 asks only grounding questions, 0 only referring ones (an absent category
    exists in every synthetic scene), 0.75 about three in four; outside [0, 1] it raises."""
    source = synthetic.SyntheticSource("train", 200, seed=0)

    def share(value):
        fn, rng, kinds = pipeline.synthetic_task(3, value), np.random.default_rng(0), []
        for i in range(len(source)):
            kinds += [q.startswith("What is the location") for role, q in fn(source[i], rng)[1].turns if role == "human"]
        return np.mean(kinds), len(kinds)

    assert share(1.0)[0] == 1.0 and share(0.0)[0] == 0.0
    measured, n = share(0.75)
    assert n > 400 and abs(measured - 0.75) < 0.05
    with pytest.raises(ValueError, match="grounding_share"):
        pipeline.synthetic_task(3, 1.5)


_BOX = re.compile(r"\[\d+, \d+, \d+, \d+\]")


@pytest.mark.parametrize("stage", [2, 3])
def test_box_quantum_rewrites_only_the_answers_boxes(stage):
    """With `box_quantum` 100, every box an answer writes (Dense Detection, grounding) is the exact
    one's bin centres, "[450, 250, 850, 650]"; the questions' region boxes stay exact; the
    conversations are otherwise the same, token for token; a quantum outside 1..1000 raises."""
    source = synthetic.SyntheticSource("train", 40, seed=0)
    exact, binned = pipeline.synthetic_task(stage), pipeline.synthetic_task(stage, box_quantum=100)
    answer_boxes = 0
    for i in range(len(source)):
        turns_exact = exact(source[i], np.random.default_rng(i))[1].turns
        turns_binned = binned(source[i], np.random.default_rng(i))[1].turns
        assert [r for r, _ in turns_exact] == [r for r, _ in turns_binned]
        for (role, a), (_, b) in zip(turns_exact, turns_binned):
            if role == "human":
                assert a == b
                continue
            boxes_a, boxes_b = text.parse_boxes(a), text.parse_boxes(b)
            assert len(boxes_a) == len(boxes_b) and _BOX.sub("", a) == _BOX.sub("", b)
            for box_a, box_b in zip(boxes_a, boxes_b):
                assert box_b == tuple(v // 100 * 100 + 50 for v in box_a)
                answer_boxes += 1
    assert answer_boxes > 30
    with pytest.raises(ValueError, match="box quantum"):
        pipeline.synthetic_task(3, box_quantum=0)


def test_bad_configuration_raises(proto):
    with pytest.raises(ValueError, match="equal, non-zero counts"):
        pipeline.build_dataset([_Indexed(3)], [1.0, 2.0], [_indexed_task], proto, CFG, 2, 0)
    with pytest.raises(ValueError, match="weights must be positive"):
        pipeline.build_dataset([_Indexed(3)], [0.0], [_indexed_task], proto, CFG, 2, 0)
    with pytest.raises(ValueError, match="process_index"):
        pipeline.build_dataset([_Indexed(3)], [1.0], [_indexed_task], proto, CFG, 2, 0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="stage must be"):
        pipeline.synthetic_task(4)


def test_worker_processes_give_the_same_batches_and_resume(proto):
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
        flags.FLAGS.mark_as_parsed()
    ds = _dataset(proto, stage=2, seed=7)
    single = _take(iter(ds), 3)
    workers = iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=2)))
    first = next(workers)
    np.testing.assert_array_equal(first["tokens"], single[0]["tokens"])
    state = workers.get_state()
    expected = next(workers)
    resumed = iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=2)))
    resumed.set_state(state)
    got = next(resumed)
    np.testing.assert_array_equal(got["tokens"], expected["tokens"])
    np.testing.assert_array_equal(got["tokens"], single[1]["tokens"])
