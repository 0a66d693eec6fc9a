"""The demo's warm-ups. Dense encoder warm-up: targets on hand-made scenes, learning (the sampler's
region categories too), and the hand-over to stage I through `init.pretrained` (frozen there in the
tiny config, so bit-identical after steps). Language warm-up: the text examples, skipping what is too long, learning."""

import collections
import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import synthetic, text
from data_pipelines.example import ExampleError
from ferret_jax import config_lib, train, warmup
from ferret_jax.convert import load_converted, save_converted
from ferret_jax.models.ferret import ProjectorConfig
from tests import train_helpers as th

TINY = config_lib.ferret_config("tiny")  # 28-pixel views, 2x2 patches, up to 4 tiles
TINY_WORLD = dict(max_objects=3, cell_range=(28, 56))
TINY_LABELS = 1 + len(synthetic.category_names())  # categories + background


def test_view_windows_follow_the_row_major_tiles():
    np.testing.assert_allclose(warmup.view_windows((2, 1), 3),
                               [(0, 0, 1, 1), (0, 0, 0.5, 1), (0.5, 0, 1, 1), (0, 0, 0, 0)])
    np.testing.assert_allclose(warmup.view_windows((1, 2), 2)[1:], [(0, 0, 1, 0.5), (0, 0.5, 1, 1)])


def test_patch_targets_in_global_and_tile_coordinates():
    index = np.zeros((8, 8), np.int32)
    index[0:4, 4:8] = 1  # object 0 fills the top-right quadrant
    boxes = np.array([(0.5, 0.0, 1.0, 0.5)])
    obj, box = warmup.patch_targets(index, boxes, np.array((0, 0, 1, 1.0)), 2)
    np.testing.assert_array_equal(obj, [[0, 1], [0, 0]])
    np.testing.assert_allclose(box[0, 1], (0.5, 0, 1, 0.5))
    assert not box[obj == 0].any()
    obj, box = warmup.patch_targets(index, boxes, np.array((0.5, 0, 1, 1.0)), 2)  # the right half
    np.testing.assert_array_equal(obj, [[1, 1], [0, 0]])
    np.testing.assert_allclose(box[0, 0], (0, 0, 1, 0.5))
    across = np.zeros((8, 8), np.int32)
    across[0:4, 2:6] = 1  # an object across the right half's left edge: its box is cut at the view
    obj, box = warmup.patch_targets(across, np.array([(0.25, 0.0, 0.75, 0.5)]), np.array((0.5, 0, 1, 1.0)), 2)
    np.testing.assert_array_equal(obj, [[1, 0], [0, 0]])
    np.testing.assert_allclose(box[0, 0], (0, 0, 0.5, 0.5))


def test_dense_example_labels_each_view_with_the_object_it_shows():
    image = np.full((28, 56, 3), 128, np.uint8)
    mask = np.zeros((28, 56), bool)
    mask[:, 28:] = True  # a red square over the right half of a 2x1 image
    image[mask] = synthetic.COLOURS["red"]
    scene = synthetic.Scene(image, (synthetic.SceneObject("square", "red", "", (28, 0, 55, 27), mask),))
    categories = list(synthetic.category_names(name_sizes=False))
    ex = warmup.dense_example(scene, categories, TINY, grids=((2, 1),), max_regions=2, rng=np.random.default_rng(0))
    red_square = 1 + categories.index("red square")
    np.testing.assert_array_equal(ex["grid"], [2, 1])
    np.testing.assert_array_equal(ex["region_label"], [red_square, 0])
    np.testing.assert_array_equal(ex["region_valid"], [True, False])
    assert ex["region_points"].shape == (2, TINY.sampler.num_points, 2) and not ex["region_points"][1].any()
    assert (ex["region_points"][0, :, 0] >= 0.49).all()  # every point on the square, in the right half
    np.testing.assert_array_equal(ex["global_label"], [[0, red_square], [0, red_square]])
    np.testing.assert_allclose(ex["global_box"][:, 1], [(28 / 56, 0, 55 / 56, 27 / 28)] * 2)
    np.testing.assert_array_equal(ex["tile_valid"], [True, True, False, False])
    np.testing.assert_array_equal(ex["tile_label"][0], 0)
    np.testing.assert_array_equal(ex["tile_label"][1], red_square)
    np.testing.assert_allclose(ex["tile_box"][1].reshape(-1, 4), [(0, 0, (55 / 56 - 0.5) / 0.5, 27 / 28)] * 4, rtol=1e-6)
    assert ex["tiles"].shape == (4, 28, 28, 3) and not ex["tiles"][2:].any()


def test_box_digits_are_the_leading_digits_of_the_text_coordinates():
    from data_pipelines import text

    box = np.array([[0.5, 0.0, 0.9999, 0.1234]], np.float32)
    assert warmup.DIGITS == 1  # the hundreds digit of each coordinate
    np.testing.assert_array_equal(warmup.box_digits(box)[0], [[5], [0], [9], [1]])
    # an edge at the view's border (1.0, as clipped tile boxes have) is the last canvas value, 999
    np.testing.assert_array_equal(warmup.box_digits(np.array([[1.0, 0, 0, 0.0999]]))[0], [[9], [0], [0], [0]])
    # the same numbers `text.box_text` writes for the inclusive pixel box of a 1000-wide image
    assert text.box_text((500, 0, 999.9, 123.4), 1000, 1000) == "[500, 0, 999, 123]"


def test_background_patches_digit_logits_are_pushed_flat():
    k = TINY_LABELS
    label = jnp.array([[[0, 1], [0, 0]]])  # one object patch, three background ones
    box = jnp.broadcast_to(jnp.array([0.25, 0.15, 0.75, 0.95]), (1, 2, 2, 4))
    weight = jnp.ones((1, 2, 2))
    out = jnp.zeros((1, 2, 2, k + 40 * warmup.DIGITS))
    flat_loss, flat = warmup._view_loss(out, label, box, weight, k)
    assert abs(float(flat["background_kl"])) < 1e-6
    # one background patch says "hundreds digit 3" for every coordinate: KL(uniform || softmax)
    peak = 4.0
    peaked = out.at[0, 0, 0, k + 3::10].set(peak)
    loss, metrics = warmup._view_loss(peaked, label, box, weight, k)
    logp = np.log(np.exp(np.eye(10)[3] * peak) / np.exp(np.eye(10)[3] * peak).sum())
    kl_one_patch = -np.log(10) - logp.mean()
    np.testing.assert_allclose(metrics["background_kl"], kl_one_patch / 3, rtol=1e-5)
    np.testing.assert_allclose(loss - flat_loss, kl_one_patch / 3, rtol=1e-5)
    # the object patch's digits are its box's, not pushed flat
    on_object = out.at[0, 0, 1, k + np.array([2, 11, 27, 39])].set(peak)  # digits 2, 1, 7, 9
    loss, metrics = warmup._view_loss(on_object, label, box, weight, k)
    assert abs(float(metrics["background_kl"])) < 1e-6 and float(loss) < float(flat_loss)


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("warmup") / "backbones")
    encoders, result, bank = warmup.warm_up(TINY, TINY_WORLD, steps=40, batch_size=16, lr=3e-3, log=lambda _: None)
    width = TINY.llm.hidden_size
    projectors = {"proj_global": ProjectorConfig(TINY.clip.hidden_size, width), "proj_local": ProjectorConfig(TINY.dino.hidden_size, width)}
    save_converted(out, {"clip": TINY.clip, "dino": TINY.dino, "sampler": TINY.sampler, **projectors}, encoders)
    return out, result, bank


def test_warm_up_learns(warmed):
    _, result, _ = warmed
    assert result["loss"] < 0.75 * result["initial_loss"], result
    assert result["steps"] == 40 and result["seconds"] > 0
    # the tiny heads' 40 digit logits fit its LLM's width (64)
    assert result["projectors_from_heads"]


def test_projector_from_head_starts_fc1_as_the_centred_head():
    from ferret_jax.models.ferret import Projector

    rng = np.random.default_rng(0)
    groups, width = (5, 10, 10), 32
    head = {"kernel": rng.normal(size=(16, 25)).astype(np.float32), "bias": rng.normal(size=25).astype(np.float32)}
    key = jax.random.key(3)
    params = warmup.projector_from_head(head, groups, width, key)
    x = rng.normal(size=(7, 16)).astype(np.float32)
    logits = x @ head["kernel"] + head["bias"]
    pre = np.asarray(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    for start, size in ((0, 5), (5, 10), (15, 10)):
        group = logits[:, start:start + size]
        np.testing.assert_allclose(pre[:, start:start + size], group - group.mean(-1, keepdims=True), rtol=1e-5, atol=1e-5)
    fresh = train._values(Projector(width).init(key, jnp.zeros((1, 16)))["params"])
    np.testing.assert_array_equal(params["fc1"]["kernel"][:, 25:], fresh["fc1"]["kernel"][:, 25:])
    np.testing.assert_array_equal(params["fc2"]["kernel"], fresh["fc2"]["kernel"])
    assert not np.allclose(params["fc1"]["kernel"][:, :25], fresh["fc1"]["kernel"][:, :25])
    out = Projector(width).apply({"params": params}, x)  # the layout a stage loads
    assert out.shape == (7, width) and np.isfinite(out).all()
    with pytest.raises(ValueError, match="summing to 25, projector width 24"):
        warmup.projector_from_head(head, groups, 24, key)


def test_projectors_start_from_the_heads_box_digit_logits_alone():
    rng = np.random.default_rng(1)
    labels, channels = 5, 12
    n = 40 * warmup.DIGITS  # 10 logits per digit of each of the 4 coordinates
    heads = {name: {"kernel": rng.normal(size=(channels, labels + n)).astype(np.float32),
                    "bias": rng.normal(size=labels + n).astype(np.float32)} for name in ("clip_head", "dino_head")}
    key = jax.random.key(7)
    projectors = warmup.projectors_from_heads(heads, labels, 96, key)
    assert set(projectors) == {"proj_global", "proj_local"}
    for name, head in (("proj_global", "clip_head"), ("proj_local", "dino_head")):
        digits = heads[head]["kernel"][:, labels:]  # the category logits stay out
        centred = np.concatenate([g - g.mean(-1, keepdims=True) for g in np.split(digits, n // 10, axis=-1)], -1)
        np.testing.assert_allclose(projectors[name]["fc1"]["kernel"][:, :n], centred, rtol=1e-5, atol=1e-6)
    assert warmup.projectors_from_heads(heads, labels, n - 1, key) == {}  # the logits do not fit n - 1 units


def test_text_example_supervises_the_answers_of_the_conversation_without_its_image():
    tokenizer = text.Tokenizer(model_proto=th.tokenizer_proto())
    turns = [("human", "What is the location of red circle in the image?"), ("gpt", "Red circle [1, 2, 3, 4].")]
    ex = warmup.text_example(turns, tokenizer, 200)
    ids, weights = text.tokenize_conversation(turns, tokenizer)
    n = len(ids) - 1
    np.testing.assert_array_equal(ex["tokens"][:n], ids[:-1])
    np.testing.assert_array_equal(ex["targets"][:n], ids[1:])
    assert not ex["tokens"][n:].any() and not ex["loss_mask"][n:].any()
    answer = tokenizer.decode(ex["targets"][ex["loss_mask"] > 0].tolist())
    assert answer.startswith("Red circle [1, 2, 3, 4].") and text.IMAGE_ID not in ex["tokens"]
    short = warmup.text_example(turns, tokenizer, 200, system_prompt=False)
    assert (short["loss_mask"] > 0).sum() == (ex["loss_mask"] > 0).sum()
    assert (short["tokens"] > 0).sum() < n - 40  # the system prompt is gone
    exact = warmup.text_example(turns, tokenizer, n)  # a conversation of exactly max_length fits
    assert exact["loss_mask"][-1] > 0 and exact["targets"][-1] == ids[-1]
    with pytest.raises(ExampleError, match=f"{n} tokens > max_length {n - 1}") as error:
        warmup.text_example(turns, tokenizer, n - 1)
    assert error.value.reason == "too_long"


def test_scrambled_coordinates_keep_the_words_and_which_numbers_repeat():
    turns = [("human", "What is the location of red circle in the image?"), ("gpt", "Red circle [10, 20, 10, 999]."),
             ("human", "Is the object [10, 20, 10, 999] <region_fea> of the image a red circle or a blue square?"),
             ("gpt", "It is a red circle.")]
    rng = np.random.default_rng(0)
    scrambled = [warmup.scramble_coordinates(turns, rng) for _ in range(20)]
    for out in scrambled:
        assert [re.sub(r"\d+", "#", v) for _, v in out] == [re.sub(r"\d+", "#", v) for _, v in turns]
        a, b, c, d = text.parse_boxes(out[1][1])[0]
        assert a == c and len({a, b, d}) == 3 and all(0 <= v < 1000 for v in (a, b, d))
        assert text.parse_boxes(out[2][1])[0] == (a, b, c, d)
    assert len({out[1][1] for out in scrambled}) == 20


def test_language_dataset_skips_and_counts_the_conversations_too_long():
    tokenizer = text.Tokenizer(model_proto=th.tokenizer_proto())
    skipped = collections.Counter()
    batches = iter(warmup.language_dataset(TINY_WORLD, tokenizer, 8, 200, 0, skipped=skipped))
    lengths = np.concatenate([(next(batches)["tokens"] > 0).sum(1) for _ in range(4)])
    assert lengths.max() <= 200 and lengths.min() > 100  # the system prompt alone is ~85 tokens
    assert skipped["too_long"] > 0 and set(skipped) == {"too_long"}


@pytest.mark.parametrize("share", [0.0, 0.25, 1.0])
def test_language_dataset_mixes_in_the_stage1_captions_at_caption_share(share):
    tokenizer = text.Tokenizer(model_proto=th.tokenizer_proto())
    batches = iter(warmup.language_dataset(TINY_WORLD, tokenizer, 16, 200, 0, system_prompt=False, caption_share=share))
    rows = [row for _ in range(15) for row in next(batches)["tokens"]]
    first_words = [tokenizer.decode([int(t) for t in row if t > 0]).split()[1] for row in rows]  # after "USER:"
    captions = np.mean([w == "Describe" for w in first_words])  # the caption prompt (tasks.caption)
    assert set(first_words) <= {"Describe", "What", "Is"}, set(first_words)  # caption, grounding, referring
    assert abs(captions - share) < 0.07, (captions, share)


def test_language_dataset_rejects_a_caption_share_outside_0_1():
    with pytest.raises(ValueError, match="caption_share"):
        warmup.language_dataset(TINY_WORLD, text.Tokenizer(model_proto=th.tokenizer_proto()), 8, 200, 0, caption_share=1.5)


def test_dense_heads_refuse_a_sampler_on_projected_features():
    import dataclasses

    batch = next(iter(warmup.dense_dataset(TINY_WORLD, TINY, 2, seed=0)))
    model = warmup.DenseHeads(dataclasses.replace(TINY, sampler_input="projected"), TINY_LABELS)
    with pytest.raises(ValueError, match="trains the sampler on raw encoder features, got sampler_input='projected'"):
        model.init(jax.random.key(0), batch)


def test_warm_up_keeps_a_bank_of_region_features_by_category(warmed):
    _, _, bank = warmed
    assert bank.shape == (TINY_LABELS, 16, TINY.llm.hidden_size)
    assert not bank[0].any()  # background
    drawn = np.abs(bank[1:]).sum((1, 2)) > 0
    assert drawn.sum() >= 20, drawn.sum()  # 20 batches of 16 scenes draw most of the 48 categories


def test_region_feature_bank_holds_the_first_regions_of_each_category():
    model = warmup.DenseHeads(TINY, TINY_LABELS)
    batches = list(itertools.islice(iter(warmup.dense_dataset(TINY_WORLD, TINY, 8, seed=0)), 2))
    params = model.init(jax.random.key(0), batches[0])["params"]
    bank = warmup.region_feature_bank(params, model, iter(batches), TINY_LABELS, num_batches=2, per_category=3)
    feats = np.concatenate([np.asarray(model.apply({"params": params}, b)[3])[b["region_valid"]] for b in batches])
    labels = np.concatenate([b["region_label"][b["region_valid"]] for b in batches])
    assert bank.shape == (TINY_LABELS, 3, TINY.llm.hidden_size) and not bank[0].any()
    for c in range(1, TINY_LABELS):
        rows = feats[labels == c]
        if len(rows):  # the first three, repeated when fewer were drawn
            np.testing.assert_allclose(bank[c], rows[np.arange(3) % len(rows)], rtol=1e-5, atol=1e-6)
        else:
            assert not bank[c].any()
    assert 0 < len(set(labels.tolist())) < TINY_LABELS - 1  # both branches ran


def test_region_categories_are_named_by_the_referring_answers():
    categories = ["green square", "red circle"]
    turns = [("human", "Is the object [1, 2] <region_fea> of the image a red circle or a blue diamond?"),
             ("gpt", "It is a red circle."),
             ("human", "What is the location of green square in the image?"), ("gpt", "green square [1, 2, 3, 4]."),
             ("human", "Is the object [1, 2, 3, 4] <region_fea> of the image a green square or a red circle?"),
             ("gpt", "It is a green square."),
             ("human", "Is the object [5, 6] <region_fea> of the image a blue diamond or a red circle?"),
             ("gpt", "It is a blue diamond.")]
    assert warmup.region_categories(turns, categories) == [2, 1, 0]  # blue diamond: not a category


def test_with_region_features_fills_the_region_slots_from_the_bank():
    bank = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4) + 100  # [K, M, D]
    tokens = np.array([[5, 9, 6, 9, 9], [9, 5, 5, 5, 5]], np.int32)  # region id 9; row 0's third slot has no label
    batch = {"tokens": tokens, "region_label": np.array([[2, 1], [0, 0]], np.int32),
             "region_pick": np.array([[3, 4], [1, 1]], np.int32)}
    embeddings = np.zeros((2, 5, 4), np.float32)
    out = np.asarray(warmup.with_region_features(jnp.asarray(embeddings), batch, jnp.asarray(bank), 9))
    np.testing.assert_array_equal(out[0, 1], bank[2, 1])  # first slot: category 2, pick 3 % 2
    np.testing.assert_array_equal(out[0, 3], bank[1, 0])  # second slot: category 1, pick 4 % 2
    assert not out[0, [0, 2, 4]].any() and not out[1].any()  # other tokens, label 0, a slot past R: unchanged


def test_language_loss_reads_the_bank_in_the_region_slots(warmed):
    from ferret_jax.models.llama import Llama

    tokenizer = text.Tokenizer(model_proto=th.tokenizer_proto())
    batch = next(iter(warmup.language_dataset(TINY_WORLD, tokenizer, 8, 200, 0, system_prompt=False)))
    assert (batch["tokens"] == tokenizer.region_id).any() and batch["region_label"].any()
    model = Llama(TINY.llm)
    params = model.init(jax.random.key(0), batch["tokens"][:1])["params"]
    plain, _ = warmup.language_loss(params, batch, model)
    banked, _ = warmup.language_loss(params, batch, model, jnp.asarray(warmed[2]), tokenizer.region_id)
    elsewhere, _ = warmup.language_loss(params, batch, model, jnp.asarray(warmed[2]), -1)  # no slot carries a feature
    # bit-identical without features in the slots, so any difference is the features' (a random
    # LLM moves the loss only a little)
    assert float(elsewhere) == float(plain) and float(banked) != float(plain), (plain, banked)


def test_language_warm_up_learns_the_answers(warmed, monkeypatch):
    config = TINY.llm
    tokenizer = text.Tokenizer(model_proto=th.tokenizer_proto())
    region_ids = []
    fill = warmup.with_region_features
    monkeypatch.setattr(warmup, "with_region_features", lambda e, b, bank, rid: region_ids.append(rid) or fill(e, b, bank, rid))
    params, result = warmup.language_warm_up(config, TINY_WORLD, tokenizer, steps=30, batch_size=8, lr=3e-3,
                                             max_length=200, system_prompt=False, region_bank=warmed[2],
                                             log=lambda _: None)
    assert result["loss"] < 0.6 * result["initial_loss"], result
    assert region_ids and set(region_ids) == {tokenizer.region_id}  # the bank fills the tokenizer's region slots
    assert jax.tree.structure(params["llm"]) == jax.tree.structure(jax.tree.map(np.asarray, th.init_params(seed=0)["llm"]))


def test_induction_batches_repeat_a_sequence_and_score_its_copy():
    ids = np.array([3, 5, 7, 11, 13, 17, 19, 23])
    length, filler = 10, 6
    batch = next(warmup.induction_batches(ids, 4, seed=0, length=length, filler=filler))
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["loss_mask"]
    assert tokens.shape == targets.shape == mask.shape == (4, 2 * length + filler)
    assert set(np.unique(tokens)) <= set(ids.tolist())
    np.testing.assert_array_equal(targets[:, :-1], tokens[:, 1:])
    assert (mask.sum(1) == length - 1).all()  # the repeat's tokens after its first
    for row in range(4):
        at = np.flatnonzero(mask[row])
        assert at[0] == length + filler and at[-1] == 2 * length + filler - 2  # from the repeat's first token on
        repeat = tokens[row, length + filler :]
        # the repeat copies a sequence that starts within the filler before it
        assert any((tokens[row, b : b + length] == repeat).all() for b in range(filler)), tokens[row]
    assert len({tuple(r) for r in tokens}) == 4
    again = next(warmup.induction_batches(ids, 4, seed=0, length=length, filler=filler))
    np.testing.assert_array_equal(again["tokens"], tokens)  # deterministic for the seed


def test_language_warm_up_starts_the_conversations_from_the_induction_phase(monkeypatch):
    config = TINY.llm
    tokenizer = text.Tokenizer(model_proto=th.tokenizer_proto())
    calls, fit = [], warmup.adamw_fit

    def spy(loss_fn, init_fn, batches, **kw):
        params, result = fit(loss_fn, init_fn, batches, **kw)
        calls.append((kw["tag"], init_fn, params))
        return params, result

    monkeypatch.setattr(warmup, "adamw_fit", spy)
    _, result = warmup.language_warm_up(config, TINY_WORLD, tokenizer, steps=2, batch_size=4, lr=3e-3, max_length=200,
                                        system_prompt=False, induction_steps=3, log=lambda _: None)
    assert [c[0] for c in calls] == ["llm induction", "llm warmup"]
    assert calls[1][1](None, None) is calls[0][2]  # the conversations start from the induction's params
    assert 0.0 <= result["induction_accuracy"] <= 1.0 and 10 <= result["induction_ids"] < config.vocab_size


def test_the_sampler_learns_the_regions_categories_through_the_region_head():
    """On one fixed batch, 30 AdamW steps of the dense loss cut the regions' cross-entropy by more
    than half: the gradient reaches the sampler and its features come to tell the objects apart."""
    batch = next(iter(warmup.dense_dataset(TINY_WORLD, TINY, 8, seed=0)))
    assert batch["region_valid"].any() and not batch["region_label"][~batch["region_valid"]].any()
    model = warmup.DenseHeads(TINY, TINY_LABELS)
    loss = functools.partial(warmup.dense_loss, model=model)
    init = lambda k, b: model.init(k, b)["params"]  # noqa: E731
    before = loss(init(jax.random.key(0), batch), batch)[1]["region_ce"]
    params, result = warmup.adamw_fit(loss, init, itertools.repeat(batch), steps=30, lr=3e-3, seed=0, tag="t",
                                      describe=str, log_every=100, log=lambda _: None)
    after = loss(params, batch)[1]
    assert after["region_ce"] < 0.5 * before, (before, after["region_ce"])
    assert after["region_acc"] > 0.5, after["region_acc"]


def test_stage1_starts_from_the_warmed_backbones(tmp_path, warmed):
    """`init.pretrained` with a dir holding clip, dino, the sampler and the projectors: those load,
    the LLM keeps its random init; the tiny stage I trains only `proj_global`, so the others are
    bit-identical after training."""
    out, _, _ = warmed
    workdir = th.prepare(tmp_path / "stage1", th.tokenizer_proto())
    train.train(th.config(1, total_steps=2, **{"init.pretrained": out}), workdir)
    params, _ = th.params_of(workdir, 1)
    _, loaded = load_converted(out)
    random_init = jax.tree.map(np.asarray, th.init_params(seed=0))
    for key, expected in (("clip", loaded["clip"]), ("dino", loaded["dino"]), ("sampler", loaded["sampler"]),
                          ("proj_local", loaded["proj_local"]), ("llm", random_init["llm"])):
        same = jax.tree.map(lambda a, b: th.same_bits(np.asarray(a), np.asarray(b)), params[key], expected)
        assert all(jax.tree.leaves(same)), key
    assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: th.same_bits(a, np.asarray(b)),
                                                params["clip"], random_init["clip"])))
