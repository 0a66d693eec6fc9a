"""Optimizer, schedule and per-stage masks on the tiny Ferret param tree."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from ferret_jax import config_lib, optim
from ferret_jax.models.ferret import Ferret, example_batch

SUBTREES = ("clip", "dino", "proj_global", "proj_local", "sampler", "llm")
STAGES = {
    1: (("proj_global/.*",), {"proj_global"}),
    2: (("proj_global/.*", "proj_local/.*", "sampler/.*"), {"proj_global", "proj_local", "sampler"}),
    3: ((".*",), set(SUBTREES)),
}


@pytest.fixture(scope="module")
def params():
    """The tiny model's param tree (shapes from `eval_shape`, values random: only paths matter)."""
    cfg = config_lib.ferret_config("tiny")
    abstract = nn.meta.unbox(jax.eval_shape(Ferret(cfg).init, jax.random.key(0), example_batch(cfg))["params"])
    return _random_like(abstract, seed=0, scale=0.1)


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def _random_like(params, seed, scale=1.0):
    r = np.random.RandomState(seed)
    return jax.tree.map(lambda p: jnp.asarray(scale * r.randn(*p.shape), p.dtype), params)


def _is_masked(x):
    return isinstance(x, optax.MaskedNode)


def _adam_states(state):
    return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]


def _run(tx, params, grads_seq):
    """Applies each gradient tree in turn; returns (params, per-step updates)."""
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates_seq = []
    for grads in grads_seq:
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        updates_seq.append(updates)
    return params, updates_seq


def test_param_paths_match_flatten_dict(params):
    paths = _flat(optim.param_paths(params))
    assert paths and all(k == v for k, v in paths.items())
    assert "llm/layers/q/kernel" in paths


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_masks_select_exactly_their_subtrees(params, stage):
    patterns, expected = STAGES[stage]
    mask = optim.trainable_mask(params, patterns)
    for name in SUBTREES:
        leaves = jax.tree.leaves(mask[name])
        assert all(leaves) if name in expected else not any(leaves), name


def test_bad_trainable_patterns_raise(params):
    with pytest.raises(ValueError, match=re.escape("'proj_globl/.*'")):
        optim.trainable_mask(params, ("proj_global/.*", "proj_globl/.*"))
    for partial in ("proj_global", "global/.*", "fc1/kernel"):  # fullmatch, not search
        with pytest.raises(ValueError, match=re.escape(repr(partial))):
            optim.trainable_mask(params, (partial,))
    with pytest.raises(ValueError, match="invalid regex"):
        optim.trainable_mask(params, ("proj[",))
    with pytest.raises(ValueError, match="single string"):
        optim.trainable_mask(params, ".*")  # ('.*') is a str, not a tuple
    with pytest.raises(ValueError, match="no parameter to train"):
        optim.make_optimizer(params, trainable=(), lr=1e-3, total_steps=10, warmup_steps=1)


def test_frozen_leaves_hold_no_optimizer_state(params):
    mask = optim.trainable_mask(params, STAGES[1][0])
    tx, labels = optim.make_optimizer(params, trainable=STAGES[1][0], lr=1e-3, total_steps=10, warmup_steps=2,
                                      weight_decay=0.1)
    state = tx.init(params)

    flags, leaves = jax.tree.leaves(mask), jax.tree.leaves(params)
    n_train, n_frozen = sum(flags), len(flags) - sum(flags)
    train_bytes = sum(p.nbytes for p, t in zip(leaves, flags) if t)
    state_leaves = jax.tree.leaves(state, is_leaf=_is_masked)
    arrays = [x for x in state_leaves if not _is_masked(x) and x.ndim > 0]
    scalars = [x for x in state_leaves if not _is_masked(x) and x.ndim == 0]
    # One Adam group: mu and nu hold an array per trainable leaf and a MaskedNode per frozen one.
    assert len(arrays) == 2 * n_train
    assert sum(map(_is_masked, state_leaves)) == 2 * n_frozen
    # The scalars are the step counts of scale_by_adam and of the lr schedule.
    assert len(scalars) == 2 and all(x.dtype == jnp.int32 for x in scalars)
    assert optim.optimizer_state_bytes(state) == 2 * train_bytes + 2 * 4

    (adam,) = _adam_states(state)
    for moment in (adam.mu, adam.nu):
        masked = jax.tree.map(_is_masked, moment, is_leaf=_is_masked)
        assert jax.tree.leaves(masked) == [not t for t in flags]

    # Built from an abstract tree: same labels and the same state size.
    abstract = jax.eval_shape(lambda: params)
    tx_a, labels_a = optim.make_optimizer(abstract, trainable=STAGES[1][0], lr=1e-3, total_steps=10, warmup_steps=2,
                                          weight_decay=0.1)
    assert labels_a == labels
    assert optim.optimizer_state_bytes(jax.eval_shape(tx_a.init, abstract)) == optim.optimizer_state_bytes(state)


def test_updates_leave_frozen_params_bit_identical(params):
    patterns = STAGES[2][0]
    mask = optim.trainable_mask(params, patterns)
    tx, _ = optim.make_optimizer(params, trainable=patterns, lr=1e-2, total_steps=10, warmup_steps=1, weight_decay=0.1)
    # Nonzero gradients for every leaf, frozen ones included.
    new, _ = _run(tx, params, [_random_like(params, seed) for seed in range(3)])
    for (path, old), t, p in zip(_flat(params).items(), jax.tree.leaves(mask), jax.tree.leaves(new)):
        same = np.array_equal(np.asarray(old).view(np.uint8), np.asarray(p).view(np.uint8))
        assert same != t, path


def test_decay_mask_excludes_vectors_and_embeddings(params):
    decay = _flat(optim.decay_mask(params))
    for path in ("llm/embed", "clip/pos_embed", "dino/pos_embed", "clip/cls", "dino/cls", "clip/layers/q/bias",
                 "clip/layers/ln1/scale", "dino/layers/ls1/scale", "llm/final_norm/scale",
                 "llm/layers/attn_norm/scale", "proj_global/fc1/bias", "sampler/stage0/norm/scale"):
        assert not decay[path], path
    for path in ("llm/layers/q/kernel", "llm/lm_head", "clip/patch_embed/kernel", "dino/layers/mlp/fc1/kernel",
                 "proj_global/fc2/kernel", "sampler/stage1/diff/kernel"):
        assert decay[path], path
    # Everything else that decays is a kernel.
    assert all(p.endswith("kernel") for p, d in decay.items() if d and p != "llm/lm_head")


def test_weight_decay_shrinks_kernels_only(params):
    peak, wd, warmup = 0.1, 0.5, 2
    shifted = jax.tree.map(lambda p: p + 1.0, params)  # biases start at 0, where decay is invisible
    tx, _ = optim.make_optimizer(shifted, trainable=(".*",), lr=peak, total_steps=10, warmup_steps=warmup,
                                 weight_decay=wd, clip_norm=None)
    zeros = jax.tree.map(jnp.zeros_like, shifted)
    new, _ = _run(tx, shifted, [zeros] * (warmup + 1))
    # Zero grads: Adam's part is 0, each step multiplies decayed leaves by (1 - lr_t * wd).
    sched = optim.lr_schedule(peak, 10, warmup)
    factor = math.prod(1.0 - float(sched(t)) * wd for t in range(warmup + 1))
    old, new = _flat(shifted), _flat(new)
    for path in ("llm/layers/q/kernel", "proj_global/fc1/kernel", "clip/patch_embed/kernel"):
        np.testing.assert_allclose(new[path], old[path] * factor, rtol=1e-5, err_msg=path)
    for path in ("proj_global/fc1/bias", "llm/embed", "clip/pos_embed", "llm/final_norm/scale", "dino/cls"):
        np.testing.assert_array_equal(new[path], old[path], err_msg=path)


def test_schedule_warmup_then_cosine():
    peak, total, warmup, ratio = 1e-3, 100, 10, 0.1
    s = optim.lr_schedule(peak, total, warmup, min_lr_ratio=ratio)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), peak / 2, rtol=1e-6)
    np.testing.assert_allclose(float(s(warmup)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(s(total)), peak * ratio, rtol=1e-6)
    for t in (20, 37, 55, 80, 99):
        want = peak * ratio + (peak - peak * ratio) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
        np.testing.assert_allclose(float(s(t)), want, rtol=1e-5)
    after = np.array([float(s(t)) for t in range(warmup, total + 1)])
    assert np.all(np.diff(after) < 0)
    assert float(optim.lr_schedule(peak, total, 0)(0)) == pytest.approx(peak)
    for bad in [dict(total_steps=10, warmup_steps=10), dict(total_steps=10, warmup_steps=-1),
                dict(total_steps=10, warmup_steps=1, peak_lr=0.0)]:
        with pytest.raises(ValueError):
            optim.lr_schedule(**{"peak_lr": peak, **bad})


def test_lr_multipliers_scale_the_first_step(params):
    lr = 1e-2
    tx, labels = optim.make_optimizer(params, trainable=("clip/.*", "proj_global/.*"), lr=lr, total_steps=10,
                                      warmup_steps=0, clip_norm=None, lr_multipliers={"clip/.*": 0.1})
    labels = _flat(labels)
    assert labels["clip/layers/q/kernel"] == "lr_x0.1" and labels["proj_global/fc1/kernel"] == "lr_x1"
    assert labels["llm/embed"] == "frozen"
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.37), params)  # the same gradient everywhere
    _, (updates,) = _run(tx, params, [grads])
    u = _flat(updates)
    # First Adam step: lr_t * g / (|g| + eps) ≈ -lr_t elementwise.
    np.testing.assert_allclose(u["proj_global/fc1/kernel"], -lr, rtol=1e-5)
    np.testing.assert_allclose(u["clip/layers/mlp/fc1/kernel"], -0.1 * lr, rtol=1e-5)
    ratio = np.abs(u["clip/layers/mlp/fc1/kernel"]).mean() / np.abs(u["proj_global/fc1/kernel"]).mean()
    assert ratio == pytest.approx(0.1, rel=1e-5)


def test_bad_lr_multipliers_raise(params):
    with pytest.raises(ValueError, match=re.escape("'clipp/.*'")):
        optim.lr_multiplier_tree(params, {"clipp/.*": 0.1})
    with pytest.raises(ValueError, match="taken by an earlier pattern"):
        optim.lr_multiplier_tree(params, {".*": 1.0, "clip/.*": 0.1})
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="> 0"):
            optim.lr_multiplier_tree(params, {"clip/.*": bad})
    mults = _flat(optim.lr_multiplier_tree(params, {"clip/layers/.*": 0.5, "clip/.*": 0.1}))
    assert mults["clip/layers/q/kernel"] == 0.5 and mults["clip/cls"] == 0.1 and mults["llm/embed"] == 1.0


def test_clipping_uses_the_trainable_global_norm(params):
    # Adam divides by |g|, so with the usual tiny eps it hides any rescaling of the gradients.
    # With eps = 1 the first step is -lr * g / (|g| + 1): its size shows whether g was clipped,
    # and by which norm. Trainable grads have norm ~1e3; frozen ones are 1e6 and must not count.
    lr, eps, clip = 1.0, 1.0, 1.0
    mask = optim.trainable_mask(params, STAGES[1][0])
    grads = jax.tree.map(lambda g, t: g if t else 1e6 * jnp.sign(g), _random_like(params, 1, scale=30.0), mask)
    g = _flat(grads)["proj_global/fc2/kernel"]
    norm = np.sqrt(sum(float(jnp.sum(x**2)) for x, t in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)) if t))
    assert norm > 100 * clip

    def first_update(clip_norm):
        tx, _ = optim.make_optimizer(params, trainable=STAGES[1][0], lr=lr, total_steps=10, warmup_steps=0,
                                     eps=eps, clip_norm=clip_norm)
        _, (updates,) = _run(tx, params, [grads])
        return np.asarray(_flat(updates)["proj_global/fc2/kernel"])

    gc = g * (clip / norm)
    np.testing.assert_allclose(first_update(clip), -lr * gc / (np.abs(gc) + eps), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(first_update(None), -lr * g / (np.abs(g) + eps), rtol=1e-4)


def test_param_table_counts_add_up(params):
    mask = optim.trainable_mask(params, STAGES[2][0])
    table = optim.param_table(params, mask)
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 4 and cells[1].replace(",", "").isdigit():
            rows[cells[0]] = tuple(int(c.replace(",", "")) for c in cells[1:])
    assert set(rows) == set(SUBTREES) | {"total"}
    for name, (t, f, total) in rows.items():
        assert t + f == total, name
    sums = tuple(sum(rows[n][i] for n in SUBTREES) for i in range(3))
    assert sums == rows["total"]
    assert rows["total"][2] == sum(p.size for p in jax.tree.leaves(params))
    counts = optim.count_params(params, mask)
    assert all(rows[n][:2] == counts[n] for n in SUBTREES)
    assert rows["clip"][0] == 0 and rows["sampler"][1] == 0 and rows["proj_local"][0] > 0
    # Aligned: every line has its column separators at the same offsets.
    lines = [ln for ln in table.splitlines() if "|" in ln]
    assert len({tuple(i for i, c in enumerate(ln) if c == "|") for ln in lines}) == 1
