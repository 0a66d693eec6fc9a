"""One example of the batch contract, built on the host from a real photograph; refusals; the model
consumes it."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import data as skdata

from data_pipelines import example as ex
from data_pipelines import regions as R
from data_pipelines import text
from ferret_jax import config_lib
from ferret_jax.models.ferret import Ferret, example_batch

SENTENCES = [
    "What is the object in the region? It is a person in a white suit.",
    "Where is the rocket? The rocket is at the top left of the image.",
    "Include the coordinates for each mentioned object.",
    "A chat between a human and an AI that understands visuals.",
    "USER: ASSISTANT: There is a cat and a dog in the figure.",
] + [f"[{i}, {i + 7}, {2 * i}, {3 * i}]" for i in range(0, 300, 13)]


@pytest.fixture(scope="module")
def tokenizer():
    return text.Tokenizer(model_proto=text.train_tiny_tokenizer(SENTENCES, vocab_size=318))


@pytest.fixture(scope="module")
def setup(tokenizer):
    model_cfg = config_lib.ferret_config("tiny")
    assert tokenizer.vocab_size <= model_cfg.llm.vocab_size
    cfg = ex.ExampleConfig.for_model(model_cfg, max_length=512, max_regions=2)
    return model_cfg, cfg


def _astronaut_example(tokenizer, cfg, seed=0):
    image = skdata.astronaut()[:, 50:]  # 512 x 462: a non-square real photograph
    h, w = image.shape[:2]
    box = R.Box(150, 20, 320, 200)
    turns = [
        ("human", f"<image>\nWhat is the object in the region {ex.region_prompt(box, w, h)}?"),
        ("gpt", f"It is a person {text.box_text((150, 20, 320, 200), w, h)}."),
    ]
    return image, turns, [box], ex.build_example(image, turns, [box], tokenizer, cfg, np.random.default_rng(seed))


def test_contract_shapes_and_slots(tokenizer, setup):
    model_cfg, cfg = setup
    image, turns, regions, out = _astronaut_example(tokenizer, cfg)
    reference = example_batch(model_cfg, batch=1, length=cfg.max_length, regions=cfg.max_regions)
    assert set(out) == set(reference)
    for key, ref in reference.items():
        assert out[key].shape == ref.shape[1:], key
        assert out[key].dtype == ref.dtype, key
    cols, rows = out["grid"]
    n_vis = cfg.num_visual_tokens(cols, rows)
    slots = np.flatnonzero(out["visual_index"] >= 0)
    assert len(slots) == n_vis and (np.diff(slots) == 1).all()
    np.testing.assert_array_equal(out["visual_index"][slots], np.arange(n_vis))
    assert (out["tokens"][slots] == text.IMAGE_ID).all()
    (region_slot,) = np.flatnonzero(out["region_index"] >= 0)
    assert out["tokens"][region_slot] == tokenizer.region_id and out["region_index"][region_slot] == 0
    assert out["region_valid"].tolist() == [True, False]
    # region points lie inside the box (row = y): x in [150, 320], y in [20, 200]
    h, w = image.shape[:2]
    px, py = out["region_points"][0, :, 0] * w, out["region_points"][0, :, 1] * h
    assert px.min() >= 150 and px.max() <= 321 and py.min() >= 20 and py.max() <= 201
    assert (out["region_points"][1] == 0).all()


def test_loss_mask_covers_exactly_the_answer(tokenizer, setup):
    _, cfg = setup
    _, turns, _, out = _astronaut_example(tokenizer, cfg)
    supervised = out["targets"][out["loss_mask"] > 0]
    assert tokenizer.decode(supervised.tolist()) == turns[1][1] + "</s>"
    n = int((out["tokens"] != ex.PAD_ID).sum())
    np.testing.assert_array_equal(out["targets"][: n - 1][out["tokens"][1:n] >= 0], out["tokens"][1:n][out["tokens"][1:n] >= 0])
    assert out["loss_mask"][n - 1 :].sum() == 0


def test_seeded_points(tokenizer, setup):
    _, cfg = setup
    a = _astronaut_example(tokenizer, cfg, seed=1)[3]["region_points"]
    b = _astronaut_example(tokenizer, cfg, seed=1)[3]["region_points"]
    c = _astronaut_example(tokenizer, cfg, seed=2)[3]["region_points"]
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0


def _refusal(tokenizer, cfg, turns, regions):
    image = np.zeros((60, 80, 3), np.uint8)
    with pytest.raises(ex.ExampleError) as e:
        ex.build_example(image, turns, regions, tokenizer, cfg, np.random.default_rng(0))
    return e.value


def test_refusals_name_their_reason(tokenizer, setup):
    _, cfg = setup
    box = R.Box(1, 1, 10, 10)
    q = f"What is {text.REGION_TOKEN}?"
    assert _refusal(tokenizer, cfg, [("human", q), ("gpt", "x")], []).reason == "slot_without_region"
    assert _refusal(tokenizer, cfg, [("human", "What?"), ("gpt", "x")], [box]).reason == "region_without_slot"
    many = [("human", q * 3), ("gpt", "x")]
    err = _refusal(tokenizer, cfg, many, [box] * 3)
    assert err.reason == "too_many_regions" and "3 regions" in str(err)
    long_answer = [("human", "Where?"), ("gpt", "rocket " * 200)]
    err = _refusal(tokenizer, cfg, long_answer, [])
    assert err.reason == "too_long" and "max_length 512" in str(err)
    outside = R.Box(500, 500, 600, 600)
    assert _refusal(tokenizer, cfg, [("human", q), ("gpt", "x")], [outside]).reason == "bad_region"


def test_image_marker_added_when_missing(tokenizer, setup):
    _, cfg = setup
    out = ex.build_example(np.zeros((30, 30, 3), np.uint8), [("human", "Where?"), ("gpt", "Here.")], [], tokenizer,
                           cfg, np.random.default_rng(0))
    assert (out["visual_index"] >= 0).sum() == cfg.num_visual_tokens(*out["grid"])


def test_model_consumes_built_examples(tokenizer, setup):
    model_cfg, cfg = setup
    e1 = _astronaut_example(tokenizer, cfg)[3]
    image = skdata.coffee()[:120]  # 600 x 120: a wide grid
    e2 = ex.build_example(image, [("human", "What is this?"), ("gpt", "A cup of coffee.")], [], tokenizer, cfg,
                          np.random.default_rng(3))
    assert tuple(e1["grid"]) != tuple(e2["grid"])
    batch = {k: jnp.asarray(np.stack([e1[k], e2[k]])) for k in e1}
    model = Ferret(model_cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    emb = jax.jit(lambda p, b: model.apply({"params": p}, b, method=Ferret.embed_inputs))(params, batch)
    logits = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch)
    assert logits.shape == (2, cfg.max_length, model_cfg.llm.vocab_size) and np.isfinite(np.asarray(logits)).all()
    (slot,) = np.flatnonzero(e1["region_index"] >= 0)
    text_emb = jax.jit(lambda p, t: model.apply({"params": p}, t, method=lambda m, t: m.llm.embed(t)))(params, batch["tokens"])
    assert np.abs(np.asarray(emb[0, slot]) - np.asarray(text_emb[0, slot])).max() > 1e-3  # replaced by the sampler


@pytest.mark.parametrize("system_prompt", [True, False])
def test_build_prompt_is_the_example_before_the_answer(system_prompt):
    """The generation prompt equals the training example's tokens up to "ASSISTANT:", in either
    format; without the system prompt the sequence is shorter by exactly its tokens."""
    corpus = [text.SYSTEM_PROMPT, "What is in the box? A small red circle."]
    tok = text.Tokenizer(model_proto=text.train_tiny_tokenizer(corpus, vocab_size=300))
    cfg = ex.ExampleConfig(max_length=512, max_regions=2, global_size=28, cell=28, max_tiles=4, global_grid=2,
                           tile_grid=2, num_points=8, system_prompt=system_prompt)
    image = np.zeros((40, 60, 3), np.uint8)
    region = R.Box(5, 5, 20, 30)
    question = f"What is in {ex.region_prompt(region, 60, 40)}?"
    full = ex.build_example(image, [("human", question), ("gpt", "A small red circle.")], [region], tok, cfg,
                            np.random.default_rng(0))
    prompt = ex.build_prompt(image, [("human", question)], [region], tok, cfg, np.random.default_rng(0))
    n = int(prompt["prompt_length"])
    answer = tok.encode("A small red circle.") + [tok.eos_id]
    assert n + len(answer) == int((full["tokens"] != ex.PAD_ID).sum())
    np.testing.assert_array_equal(prompt["tokens"][:n], full["tokens"][:n])
    assert (prompt["tokens"][n:] == ex.PAD_ID).all() and prompt["loss_mask"].sum() == 0
    for key in ("visual_index", "region_index", "region_points", "region_valid", "global_image", "tiles", "grid"):
        np.testing.assert_array_equal(prompt[key], full[key])
    with_head, without_head = tok.encode(text.SYSTEM_PROMPT + " USER:"), tok.encode("USER:")
    head = with_head if system_prompt else without_head
    assert prompt["tokens"][1 : 1 + len(head)].tolist() == head
    other = ex.build_prompt(image, [("human", question)], [region], tok, dataclasses.replace(cfg, system_prompt=not system_prompt),
                            np.random.default_rng(0))
    assert abs(n - int(other["prompt_length"])) == len(with_head) - len(without_head)
