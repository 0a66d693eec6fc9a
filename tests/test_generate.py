"""KV-cache decoding (`ferret_jax.generate`): token-for-token equal to uncached greedy decoding,
per-row correct on right-padded batches, eos handling, sampling, sharding and argument errors."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import example as ex
from data_pipelines import regions as R
from data_pipelines import text
from ferret_jax import config_lib, sharding
from ferret_jax.generate import Sampling, argmax, choose_tokens, llama_generate, make_generate, nucleus_logits
from ferret_jax.models import Llama
from ferret_jax.models.ferret import Ferret, example_batch

NEW = 12
LENGTH = 192  # Ferret prompts, padded
GREEDY = Sampling(max_new_tokens=NEW, eos_id=-1)  # eos never stops a row: all 12 tokens compared


def _abstract(model, *args):
    """Param shapes without running (or compiling) the initializers."""
    return jax.eval_shape(lambda k: nn.meta.unbox(model.init(k, *args)["params"]), jax.random.key(0))


def _random(shapes, seed, std=lambda path, shape: 0.05):
    """numpy-random params of the given shapes: norm scales near 1, biases near 0, the rest
    normal with `std(path, shape)`."""
    rng = np.random.RandomState(seed)

    def one(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.randn(*leaf.shape).astype(np.float32)
        if name.endswith("['scale']"):
            return 1.0 + 0.1 * noise
        if name.endswith("['bias']"):
            return 0.02 * noise
        return np.float32(std(path, leaf.shape)) * noise

    return jax.tree_util.tree_map_with_path(one, shapes)


def _llm_std(path, shape):
    """Embeddings of std 1, projections of std 1/sqrt(fan-in) (peaked attention) and an lm_head
    giving logits of std ~3, so a greedy choice is never a near-tie that float noise could flip."""
    name = jax.tree_util.keystr(path)
    if "['embed']" in name:
        return 1.0
    if "['lm_head']" in name:
        return 3.0 / np.sqrt(shape[0])
    fan_in = shape[1] * shape[2] if "['o']" in name else shape[1]  # stacked: [layers, in..., out...]
    return 1.0 / np.sqrt(fan_in)


@pytest.fixture(scope="module")
def llm():
    cfg = config_lib.ferret_config("tiny").llm  # 2 layers, 4 heads over 2 key/value heads (GQA)
    model = Llama(cfg)
    return model, _random(_abstract(model, jnp.zeros((1, 4), jnp.int32)), 1, _llm_std)


def _prompts(vocab, lengths, width, seed=0):
    """Right-padded `[B, width]` prompts of ids in [3, vocab) with the given lengths."""
    rng = np.random.RandomState(seed)
    tokens = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.randint(3, vocab, n)
    return tokens, np.asarray(lengths, np.int32)


def _uncached_greedy(model, params, prompt, steps, width):
    """Reference: the full forward (no cache) over prompt + tokens so far, argmax at the last of
    them. The sequence sits in a row of fixed `width` (one compile); causal, so the zeros after it
    change nothing."""
    fwd = jax.jit(lambda p, t, i: model.apply({"params": p}, t)[0][0, i])
    seq = np.zeros((1, width), np.int32)
    seq[0, : len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + steps):
        seq[0, n] = int(jnp.argmax(fwd(params, seq, n - 1)))
    return seq[0, len(prompt) : len(prompt) + steps]


@pytest.fixture(scope="module")
def prompts(llm):
    """Three right-padded prompts of different lengths and their greedy continuations."""
    model, params = llm
    tokens, lengths = _prompts(model.config.vocab_size, [9, 3, 14], 14)
    return tokens, lengths, jax.device_get(llama_generate(model, params, tokens, lengths, GREEDY))


def test_cached_equals_uncached_greedy_llama(llm, prompts):
    model, params = llm
    tokens, lengths, out = prompts
    assert out["tokens"].shape == (3, NEW) and out["tokens"].dtype == np.int32
    np.testing.assert_array_equal(out["lengths"], [NEW] * 3)
    assert not out["finished"].any() and out["steps"] == NEW - 1
    for i, n in enumerate(lengths):
        ref = _uncached_greedy(model, params, tokens[i, :n], NEW, tokens.shape[1] + NEW)
        assert len(set(ref)) > 3, ref  # a non-trivial continuation
        np.testing.assert_array_equal(out["tokens"][i], ref, err_msg=f"row {i} (prompt length {n})")


def test_row_alone_equals_row_in_batch(llm, prompts):
    model, params = llm
    tokens, lengths, out = prompts
    batched = out["tokens"]
    for i in (1,):  # alone and unpadded: another padded length, another batch size
        n = lengths[i]
        alone = llama_generate(model, params, tokens[i : i + 1, :n], lengths[i : i + 1], GREEDY)["tokens"]
        np.testing.assert_array_equal(np.asarray(alone)[0], batched[i])


def test_eos_stops_a_row(llm, prompts):
    model, params = llm
    tokens, lengths, out = prompts
    free = out["tokens"]
    eos = int(free[0, 4])  # row 0 emits it at step 4 (or earlier): eos for the second run
    out = jax.device_get(llama_generate(model, params, tokens, lengths, Sampling(NEW, eos_id=eos)))
    assert out["finished"][0]
    for i in range(3):
        hits = np.flatnonzero(free[i] == eos)
        n = hits[0] + 1 if len(hits) else NEW  # tokens generated, eos included
        assert out["lengths"][i] == n and out["finished"][i] == bool(len(hits))
        np.testing.assert_array_equal(out["tokens"][i, :n], free[i, :n])
        assert (out["tokens"][i, n:] == 0).all()
    # A lone row that finishes stops the loop early.
    lone = jax.device_get(llama_generate(model, params, tokens[:1], lengths[:1], Sampling(NEW, eos_id=eos)))
    assert lone["steps"] == lone["lengths"][0] - 1 < NEW - 1


def test_sampling(llm, prompts):
    model, params = llm
    tokens, lengths, out = prompts
    greedy = out["tokens"]

    def sample(temperature, top_p, seed):
        s = Sampling(NEW, temperature=temperature, top_p=top_p, eos_id=-1)
        return np.asarray(llama_generate(model, params, tokens, lengths, s, jax.random.key(seed))["tokens"])

    a = sample(3.0, 0.95, 0)
    np.testing.assert_array_equal(a, sample(3.0, 0.95, 0))  # fixed rng: deterministic
    assert (a != sample(3.0, 0.95, 1)).mean() > 0.5  # hot: different rngs differ
    assert (a != greedy).mean() > 0.5
    np.testing.assert_array_equal(sample(3.0, 1e-6, 5), greedy)  # top_p -> 0+: the argmax only


def test_nucleus_keeps_the_smallest_prefix_reaching_top_p():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda p: np.isfinite(np.asarray(nucleus_logits(logits, p)))[0].tolist()  # noqa: E731
    assert kept(0.75) == [False, True, False, True]  # 0.5 falls short, 0.5 + 0.3 reaches it
    assert kept(0.85) == [False, True, True, True]
    assert kept(1e-9) == [False, True, False, False]
    assert kept(1.0) == [True, True, True, True]
    choose = jax.jit(choose_tokens, static_argnums=1)
    draws = choose(jnp.tile(logits, (4000, 1)), Sampling(temperature=1.0, top_p=0.8), jax.random.key(0))
    counts = np.bincount(np.asarray(draws), minlength=4)
    assert counts[0] == counts[2] == 0
    assert abs(counts[1] / 4000 - 0.5 / 0.8) < 0.03


def test_argmax_is_first_index_of_the_maximum():
    x = np.random.RandomState(0).randn(64, 33).astype(np.float32)
    x[3, [2, 9]] = x[7, [0, 32]] = 9.0  # ties: the first index wins, as in np.argmax
    np.testing.assert_array_equal(np.asarray(argmax(jnp.asarray(x))), x.argmax(-1))


def test_errors(llm):
    model, params = llm
    tokens, lengths = _prompts(model.config.vocab_size, [4, 2], 5)
    for kw, match in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ]:
        with pytest.raises(ValueError, match=match):
            Sampling(**kw)
    with pytest.raises(ValueError, match=r"prompt_lengths must be in \[1, 5\]"):
        llama_generate(model, params, tokens, np.asarray([4, 0], np.int32), GREEDY)
    with pytest.raises(ValueError, match=r"prompt_lengths must be in \[1, 5\]"):
        llama_generate(model, params, tokens, np.asarray([6, 2], np.int32), GREEDY)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        llama_generate(model, params, tokens, lengths[:1], GREEDY)
    with pytest.raises(ValueError, match="tokens must be"):
        llama_generate(model, params, tokens[0], lengths, GREEDY)
    with pytest.raises(ValueError, match="eos_id"):
        llama_generate(model, params, tokens, lengths, Sampling(NEW, eos_id=model.config.vocab_size))


# ----------------------------------------------------------------------------------------------
# Ferret: prompts from the data pipeline, visual tokens and a region feature in the sequence

SENTENCES = [
    text.SYSTEM_PROMPT,
    "What is the object in the region? It is a small red circle.",
    "Describe the image. Where is the dog? The dog is on the left.",
]


@pytest.fixture(scope="module")
def ferret():
    cfg = config_lib.ferret_config("tiny")
    # A larger vocabulary than the tiny preset's keeps the system prompt shorter (~140 tokens, not ~290).
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=672))
    tok = text.Tokenizer(model_proto=text.train_tiny_tokenizer(SENTENCES, vocab_size=800))
    assert tok.vocab_size <= cfg.llm.vocab_size
    ecfg = ex.ExampleConfig.for_model(cfg, max_length=LENGTH, max_regions=1)
    image = np.random.RandomState(0).randint(0, 255, (40, 60, 3)).astype(np.uint8)
    region = R.Box(5, 5, 30, 25)
    questions = [f"What is the object in the region {ex.region_prompt(region, 60, 40)}?",
                 f"Describe {ex.region_prompt(region, 60, 40)} and where the dog is in the image, please."]
    prompts = [ex.build_prompt(image, [("human", q)], [region], tok, ecfg, np.random.default_rng(i))
               for i, q in enumerate(questions)]
    batch = {k: np.stack([p[k] for p in prompts]) for k in prompts[0]}
    model = Ferret(cfg)
    shapes = _abstract(model, example_batch(cfg, 2, LENGTH))
    params = {**_random(shapes, 2), "llm": _random(shapes["llm"], 3, _llm_std)}
    return model, params, batch, jax.device_get(make_generate(model, GREEDY)(params, batch))


def _ferret_uncached_greedy(model, params, batch, steps):
    """Reference: the full Ferret forward on the prompt batch with the tokens so far written right
    after each prompt, argmax at each row's last position."""
    fwd = jax.jit(lambda p, b: model.apply({"params": p}, b))
    batch = dict(batch)
    tokens = batch["tokens"].copy()
    n = batch["prompt_length"]
    rows = np.arange(len(n))
    out = []
    for t in range(steps):
        batch["tokens"] = tokens
        nxt = np.asarray(jnp.argmax(fwd(params, batch)[rows, n + t - 1], -1))
        tokens = tokens.copy()
        tokens[rows, n + t] = nxt
        out.append(nxt)
    return np.stack(out, 1)


def test_cached_equals_uncached_greedy_ferret(ferret):
    model, params, batch, out = ferret
    n = batch["prompt_length"]
    assert n[0] != n[1] and (batch["region_index"] >= 0).sum() == 2 and (batch["visual_index"] >= 0).any()
    assert n.max() + NEW <= batch["tokens"].shape[1]
    ref = _ferret_uncached_greedy(model, params, batch, NEW)
    assert len(set(ref[0].tolist())) > 3
    np.testing.assert_array_equal(out["tokens"], ref)
    np.testing.assert_array_equal(out["lengths"], [NEW, NEW])


def test_sharded_ferret_generate_equals_unsharded(ferret):
    """Params sharded as the trainer shards them (fsdp and tensor), batch over ('data', 'fsdp')."""
    model, params, batch, unsharded = ferret
    mesh = sharding.make_mesh((1, 2, 2), devices=jax.devices()[:4])
    boxed = jax.eval_shape(model.init, jax.random.key(0), example_batch(model.config, 2, LENGTH))["params"]
    shardings = sharding.param_shardings(boxed, mesh)
    sharded_params = jax.device_put(params, shardings)
    assert not sharded_params["llm"]["lm_head"].sharding.is_fully_replicated
    out = make_generate(model, GREEDY, mesh, shardings)(sharded_params, batch)
    assert not out["tokens"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(out["tokens"]), unsharded["tokens"])
    with pytest.raises(ValueError, match="not divisible"):
        make_generate(model, GREEDY, mesh, shardings)(sharded_params, {k: v[:1] for k, v in batch.items()})
    with pytest.raises(ValueError, match="need the mesh"):
        make_generate(model, GREEDY, None, shardings)
    with pytest.raises(ValueError, match="prompt_length"):
        make_generate(model, GREEDY)(params, {k: v for k, v in batch.items() if k != "prompt_length"})
