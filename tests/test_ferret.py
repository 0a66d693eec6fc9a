"""The Ferret-v2 model on hand-built batches of the DESIGN §5 contract, and the real presets' shapes."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferret_jax import config_lib
from ferret_jax.convert.mapping import abstract_params
from ferret_jax.losses import token_cross_entropy
from ferret_jax.models import ClipVision, Dinov2, Llama
from ferret_jax.models.ferret import Ferret, copy_global_projector, example_batch

REGION_ID, IMAGE_ID = 300, 301  # any ids: slots are found through the index arrays


def _batch(cfg, seed=0, length=30):
    """Two examples: grid (2, 1) with one valid region of two, grid (1, 2) with two regions."""
    r = np.random.RandomState(seed)
    g2, t2 = cfg.global_grid**2, cfg.tile_grid**2
    b = {k: np.array(v) for k, v in example_batch(cfg, batch=2, length=length, regions=2).items()}
    b["global_image"] = r.randn(*b["global_image"].shape).astype(np.float32)
    b["tiles"] = r.randn(*b["tiles"].shape).astype(np.float32)
    b["grid"] = np.array([[2, 1], [1, 2]], np.int32)
    b["region_points"] = r.rand(*b["region_points"].shape).astype(np.float32)
    b["region_valid"] = np.array([[True, False], [True, True]])
    for i, n_regions in enumerate([1, 2]):
        n_vis = cfg.num_visual_tokens(*b["grid"][i])
        assert n_vis == g2 + 2 * t2
        tokens = list(r.randint(3, 200, 2)) + [IMAGE_ID] * n_vis + list(r.randint(3, 200, 3))
        region_slots = []
        for k in range(n_regions):
            region_slots.append(len(tokens))
            tokens += [REGION_ID] + list(r.randint(3, 200, 2))
        n = len(tokens)
        b["tokens"][i, :n] = tokens
        b["visual_index"][i, 2 : 2 + n_vis] = np.arange(n_vis)
        for k, s in enumerate(region_slots):
            b["region_index"][i, s] = k
        b["targets"][i, : n - 1] = tokens[1:]
        b["loss_mask"][i, n_vis + 2 : n - 1] = 1.0
    return {k: jnp.asarray(v) for k, v in b.items()}


@pytest.fixture(scope="module")
def tiny():
    cfg = config_lib.ferret_config("tiny")
    model = Ferret(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), _batch(cfg))["params"])
    return cfg, model, params


def _apply(model, params, batch, **kw):
    return jax.jit(lambda p, b: model.apply({"params": p}, b, **kw))(params, batch)


def test_param_tree_is_the_contract(tiny):
    _, _, params = tiny
    assert set(params) == {"clip", "dino", "proj_global", "proj_local", "sampler", "llm"}


def test_slots_hold_visual_tokens_and_region_features(tiny):
    cfg, model, params = tiny
    batch = _batch(cfg, seed=1)
    emb = np.asarray(jax.jit(lambda p, b: model.apply({"params": p}, b, method=Ferret.embed_inputs))(params, batch))
    f_g, f_l, h_g, h_l = jax.jit(
        lambda p, b: model.apply({"params": p}, b["global_image"], b["tiles"], method=Ferret.encode_images)
    )(params, batch)
    regions = np.asarray(jax.jit(lambda p, b: model.apply(
        {"params": p}, b, f_g, f_l, h_g, h_l, method=Ferret.region_features))(params, batch))
    text = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t, method=lambda m, t: m.llm.embed(t)))(params, batch["tokens"]))
    t = cfg.tile_grid
    for i in range(2):
        cols, rows = np.asarray(batch["grid"][i])
        tiles = np.asarray(h_l[i]).reshape(cfg.max_tiles, t, t, -1)
        merged = np.concatenate(
            [np.concatenate([tiles[rr * cols + cc] for cc in range(cols)], axis=1) for rr in range(rows)], axis=0
        )
        expected_visual = np.concatenate([np.asarray(h_g[i]), merged.reshape(-1, merged.shape[-1])])
        vi, ri = np.asarray(batch["visual_index"][i]), np.asarray(batch["region_index"][i])
        np.testing.assert_allclose(emb[i][vi >= 0], expected_visual[vi[vi >= 0]], atol=1e-6)
        np.testing.assert_allclose(emb[i][ri >= 0], regions[i][ri[ri >= 0]], atol=1e-6)
        plain = (vi < 0) & (ri < 0)
        np.testing.assert_allclose(emb[i][plain], text[i][plain], atol=1e-6)
    assert (regions[0, 1] == 0).all() and np.abs(regions[1]).sum() > 0  # invalid region row is zero


def test_padding_tiles_change_nothing(tiny):
    cfg, model, params = tiny
    batch = _batch(cfg, seed=2)
    base = np.asarray(_apply(model, params, batch))
    tiles = np.array(batch["tiles"])
    tiles[:, 2:] = np.random.RandomState(9).randn(*tiles[:, 2:].shape)  # both grids use 2 tiles
    tiles[:, [2, 3]] = tiles[:, [3, 2]]
    changed = np.asarray(_apply(model, params, {**batch, "tiles": jnp.asarray(tiles)}))
    np.testing.assert_allclose(changed, base, atol=1e-6)
    tiles[:, 1] += 1.0  # a used tile does matter
    assert np.abs(np.asarray(_apply(model, params, {**batch, "tiles": jnp.asarray(tiles)})) - base).max() > 1e-3


def _loss(model, params, batch):
    logits = model.apply({"params": params}, batch)
    loss, _ = token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return loss.sum() / batch["loss_mask"].sum()


def test_padded_positions_do_not_affect_the_loss(tiny):
    cfg, model, params = tiny
    batch = _batch(cfg, seed=3)
    loss = jax.jit(lambda p, b: _loss(model, p, b))
    base = float(loss(params, batch))
    pad = np.asarray(batch["tokens"]) == 0
    noisy = np.where(pad, np.random.RandomState(4).randint(3, 200, pad.shape), np.asarray(batch["tokens"]))
    assert pad.sum() > 0
    assert float(loss(params, {**batch, "tokens": jnp.asarray(noisy)})) == pytest.approx(base, abs=1e-6)


def test_sampler_gets_gradients_only_with_a_region(tiny):
    cfg, model, params = tiny
    batch = _batch(cfg, seed=5)
    grad = jax.jit(jax.grad(lambda p, b: _loss(model, p, b)))
    norm = lambda tree: sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(tree))  # noqa: E731
    assert norm(grad(params, batch)["sampler"]) > 0
    no_regions = {**batch, "region_valid": jnp.zeros_like(batch["region_valid"]),
                  "region_index": jnp.full_like(batch["region_index"], -1)}
    g = grad(params, no_regions)
    assert norm(g["sampler"]) == 0.0
    assert norm(g["proj_local"]) > 0 and norm(g["llm"]) > 0


def test_global_only_path_ignores_tiles():
    cfg = config_lib.ferret_config("tiny", use_local=False)
    model = Ferret(cfg)
    batch = _batch(config_lib.ferret_config("tiny"), seed=6)
    g2 = cfg.global_grid**2
    vi = np.where(np.asarray(batch["visual_index"]) >= g2, -1, np.asarray(batch["visual_index"]))
    batch = {**batch, "visual_index": jnp.asarray(vi)}
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    assert set(params) == {"clip", "dino", "proj_global", "proj_local", "sampler", "llm"}
    base = np.asarray(_apply(model, params, batch))
    other = np.asarray(_apply(model, params, {**batch, "tiles": batch["tiles"] + 5.0, "grid": jnp.ones_like(batch["grid"])}))
    np.testing.assert_array_equal(base, other)
    assert cfg.num_visual_tokens(3, 2) == g2


@pytest.mark.parametrize("overrides", [dict(fusion="concat"), dict(sampler_input="projected")])
def test_switches_run_and_change_the_sampler_width(overrides):
    cfg = config_lib.ferret_config("tiny", **overrides)
    model = Ferret(cfg)
    batch = _batch(cfg, seed=7)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    width = params["sampler"]["stage0"]["agg"]["kernel"].shape[1]
    expected = cfg.clip.hidden_size + cfg.dino.hidden_size if "fusion" in overrides else cfg.llm.hidden_size
    assert width == cfg.sampler_width == expected != config_lib.ferret_config("tiny").sampler_width
    assert np.isfinite(np.asarray(_apply(model, params, batch))).all()


def test_bad_switches_are_rejected():
    with pytest.raises(ValueError, match="fusion="):
        config_lib.ferret_config("tiny", fusion="mul")
    with pytest.raises(ValueError, match="sampler_input="):
        config_lib.ferret_config("tiny", sampler_input="both")


def test_copy_global_projector(tiny):
    _, _, params = tiny
    copied = copy_global_projector(params)
    jax.tree.map(np.testing.assert_array_equal, copied["proj_local"], params["proj_global"])
    assert copied["llm"] is params["llm"]
    assert np.abs(np.asarray(params["proj_local"]["fc1"]["kernel"]) - np.asarray(params["proj_global"]["fc1"]["kernel"])).max() > 0


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("size,sampler_count", [("7b", 44_069_900), ("13b", 45_119_500)])
def test_preset_parameter_counts(size, sampler_count, capsys):
    cfg = config_lib.ferret_config(size)
    shapes = abstract_params(Ferret(cfg), example_batch(cfg))
    counts = {k: _count(v) for k, v in shapes.items()}
    d = cfg.llm.hidden_size
    assert counts["sampler"] == sampler_count  # SPEC §4.2 arithmetic
    assert counts["proj_global"] == counts["proj_local"] == 1024 * d + d + d * d + d
    assert counts["clip"] == _count(abstract_params(ClipVision(cfg.clip), jnp.zeros((1, 336, 336, 3))))
    assert counts["dino"] == _count(abstract_params(Dinov2(cfg.dino), jnp.zeros((1, 336, 336, 3))))
    assert counts["llm"] == _count(abstract_params(Llama(cfg.llm), jnp.zeros((1, 1), jnp.int32)))
    with capsys.disabled():
        print(f"\nFerret-v2 {size}: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())
              + f", total {sum(counts.values()) / 1e9:.3f}B")
