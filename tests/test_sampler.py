"""Spatial-aware visual sampler: fused-map lookup across tiles, geometry, the learned stages."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferret_jax.convert.mapping import abstract_params
from ferret_jax.models import sampler as S


def _merge(tiles, cols, rows):
    """Explicit merged map `[rows*t, cols*t, C]` from row-major tiles (independent of the lookup)."""
    t = tiles.shape[1]
    out = np.zeros((rows * t, cols * t, tiles.shape[-1]), tiles.dtype)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        out[r * t : (r + 1) * t, c * t : (c + 1) * t] = tiles[i]
    return out


def _upsample_nearest(global_map, height, width):
    g = global_map.shape[0]
    rows = (np.arange(height) * g) // height
    cols = (np.arange(width) * g) // width
    return global_map[rows][:, cols]


def _bilinear_reference(fmap, points):
    """align_corners=True bilinear on an explicit map, loop by loop."""
    h, w, _ = fmap.shape
    out = []
    for x, y in points:
        u, v = x * (w - 1), y * (h - 1)
        u0, v0 = int(np.floor(u)), int(np.floor(v))
        u1, v1 = min(u0 + 1, w - 1), min(v0 + 1, h - 1)
        du, dv = u - u0, v - v0
        out.append(
            fmap[v0, u0] * (1 - du) * (1 - dv) + fmap[v0, u1] * du * (1 - dv)
            + fmap[v1, u0] * (1 - du) * dv + fmap[v1, u1] * du * dv
        )
    return np.stack(out)


@pytest.mark.parametrize("grid", [(2, 3), (3, 2), (1, 1), (1, 4), (6, 1)])
@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_fused_lookup_equals_bilinear_on_explicit_merged_map(grid, fusion):
    cols, rows = grid
    r = np.random.RandomState(cols * 10 + rows)
    t, g, c = 4, 3, 5
    tiles = r.randn(6, t, t, c).astype(np.float32)  # tiles past cols*rows are garbage, never read
    global_map = r.randn(g, g, c).astype(np.float32)
    merged = _merge(tiles, cols, rows)
    up = _upsample_nearest(global_map, rows * t, cols * t)
    fused = merged + up if fusion == "add" else np.concatenate([merged, up], -1)
    h, w = rows * t, cols * t
    # random points, cell centres, every tile border (half-way between cells of adjacent tiles), corners
    pts = [r.rand(2) for _ in range(40)]
    pts += [((k * t - 0.5) / (w - 1), r.rand()) for k in range(1, cols)] if w > 1 else []
    pts += [(r.rand(), (k * t - 0.5) / (h - 1)) for k in range(1, rows)] if h > 1 else []
    pts += [(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0)]
    pts = np.array(pts, np.float32)
    ours = S.lookup_fused(jnp.asarray(pts), jnp.asarray(tiles), jnp.asarray(global_map), jnp.asarray(grid), fusion)
    np.testing.assert_allclose(np.asarray(ours), _bilinear_reference(fused, pts), atol=1e-5)


def test_point_on_tile_border_blends_both_tiles():
    """Half-way between the last column of tile 0 and the first of tile 1: the mean of the two cells,
    whichever tile one would say holds the point (a per-tile lookup would clamp to one side)."""
    t = 4
    tiles = np.zeros((2, t, t, 1), np.float32)
    tiles[0, :, -1] = 1.0
    tiles[1, :, 0] = 3.0
    x = (t - 0.5) / (2 * t - 1)
    pts = jnp.asarray([[x, 0.3], [x, 0.9]], jnp.float32)
    out = S.lookup_fused(pts, jnp.asarray(tiles), jnp.zeros((2, 2, 1)), jnp.asarray([2, 1]), "add")
    np.testing.assert_allclose(np.asarray(out)[:, 0], [2.0, 2.0], atol=1e-6)


def test_linear_map_returns_the_linear_function():
    cols, rows, t = 3, 2, 5
    a, b, d = 0.7, -1.3, 2.0
    rr, cc = np.meshgrid(np.arange(rows * t), np.arange(cols * t), indexing="ij")
    merged = (a * cc + b * rr + d)[..., None].astype(np.float32)
    tiles = np.stack([merged[i // cols * t : (i // cols + 1) * t, i % cols * t : (i % cols + 1) * t] for i in range(6)])
    pts = np.random.RandomState(0).rand(50, 2).astype(np.float32)
    out = S.lookup_fused(jnp.asarray(pts), jnp.asarray(tiles), jnp.zeros((4, 4, 1)), jnp.asarray([cols, rows]), "add")
    expected = a * pts[:, 0] * (cols * t - 1) + b * pts[:, 1] * (rows * t - 1) + d
    np.testing.assert_allclose(np.asarray(out)[:, 0], expected, atol=1e-4)


def test_global_lookup_layout_is_row_y():
    """Value = column index: x moves along columns (the released Ferret transposed this, SPEC §4.2)."""
    g = 24
    fmap = np.tile(np.arange(g, dtype=np.float32)[None, :, None], (g, 1, 1))
    out = S.lookup_global(jnp.asarray([[0.2, 0.8]], jnp.float32), jnp.asarray(fmap))
    np.testing.assert_allclose(float(out[0, 0]), 0.2 * 23, atol=1e-5)


def test_farthest_point_sampling_matches_reference():
    pts = np.random.RandomState(1).rand(60, 2).astype(np.float32)
    key = jax.random.key(3)
    idx = np.asarray(S.farthest_point_sample(jnp.asarray(pts), 10, key))
    ref = [int(jax.random.randint(key, (), 0, 60))]
    dist = np.full(60, np.inf)
    for _ in range(9):
        dist = np.minimum(dist, ((pts - pts[ref[-1]]) ** 2).sum(-1))
        ref.append(int(dist.argmax()))
    assert idx.tolist() == ref
    assert len(set(ref)) == 10


def test_knn_matches_argsort():
    r = np.random.RandomState(2)
    pts = r.rand(50, 2).astype(np.float32)  # random floats: no distance ties
    anchors = pts[:7]
    idx = np.asarray(S.knn(jnp.asarray(anchors), jnp.asarray(pts), 5))
    d2 = ((anchors[:, None] - pts[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.sort(idx, 1), np.sort(np.argsort(d2, 1)[:, :5], 1))
    assert (idx[:, 0] == np.arange(7)).all()  # each anchor is its own nearest neighbour


def _stage_reference(params, points, feats, anchor_idx, nb_idx, eps=1e-5):
    """SPEC Appendix A, one stage, in numpy (x @ W layout)."""
    A, FA = points[anchor_idx], feats[anchor_idx]
    PN, FN = points[nb_idx], feats[nb_idx]
    anc = np.concatenate([FA, A], -1)[:, None]
    diff = np.concatenate([FN, PN], -1) - anc
    diff = diff @ params["diff"]["kernel"] + params["diff"]["bias"]
    g = np.concatenate([diff, np.broadcast_to(anc, diff.shape)], -1)
    h = np.maximum(g @ params["agg"]["kernel"] + params["agg"]["bias"], 0)
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / np.sqrt(var + eps) * params["norm"]["scale"] + params["norm"]["bias"]
    return A, h.max(1)


def test_stage_matches_appendix_a_reference():
    r = np.random.RandomState(4)
    n, m, k, c = 40, 12, 6, 8
    points = r.rand(1, 1, n, 2).astype(np.float32)
    feats = r.randn(1, 1, n, c).astype(np.float32)
    anchor_idx = r.choice(n, m, replace=False)[None, None].astype(np.int32)
    nb_idx = r.randint(0, n, (1, 1, m, k)).astype(np.int32)
    stage = S.SamplerStage(1e-5, jnp.float32)
    params = nn.meta.unbox(stage.init(jax.random.key(0), points, feats, anchor_idx, nb_idx)["params"])
    # non-symmetric weights everywhere, so a missing transpose cannot hide (SPEC §4.6 item 4)
    params = jax.tree.map(lambda x: jnp.asarray(r.randn(*x.shape).astype(np.float32) * 0.3), params)
    anchors, pooled = stage.apply({"params": params}, points, feats, anchor_idx, nb_idx)
    ref_a, ref_h = _stage_reference(jax.tree.map(np.asarray, params), points[0, 0], feats[0, 0], anchor_idx[0, 0], nb_idx[0, 0])
    np.testing.assert_allclose(np.asarray(anchors)[0, 0], ref_a)
    np.testing.assert_allclose(np.asarray(pooled)[0, 0], ref_h, atol=1e-4)


def _small_sampler():
    cfg = S.SamplerConfig(num_points=64, stages=((16, 8), (8, 8)))
    return S.Sampler(cfg, out_features=12)


def test_sampler_masks_invalid_regions_and_is_seeded():
    model = _small_sampler()
    r = np.random.RandomState(5)
    points = jnp.asarray(r.rand(2, 3, 64, 2), jnp.float32)
    feats = jnp.asarray(r.randn(2, 3, 64, 6), jnp.float32)
    valid = jnp.asarray([[True, False, True], [False, False, True]])
    params = jax.jit(model.init)(jax.random.key(0), points, feats, valid)
    apply = jax.jit(lambda p, k: model.apply(p, points, feats, valid, rngs={"sampler": k}))
    out = np.asarray(apply(params, jax.random.key(1)))
    assert out.shape == (2, 3, 12)
    assert (out[~np.asarray(valid)] == 0).all() and (np.abs(out[np.asarray(valid)]).sum(-1) > 0).all()
    np.testing.assert_array_equal(out, np.asarray(apply(params, jax.random.key(1))))
    assert np.abs(out - np.asarray(apply(params, jax.random.key(2)))).max() > 1e-4  # FPS start matters
    # without an rng stream: a fixed key, so evaluation is deterministic
    fixed = jax.jit(lambda p: model.apply(p, points, feats, valid))
    np.testing.assert_array_equal(np.asarray(fixed(params)), np.asarray(fixed(params)))


def test_pytorch_default_init():
    model = S.Sampler(S.SamplerConfig(), out_features=64)
    params = nn.meta.unbox(
        jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1, 512, 2)), jnp.zeros((1, 1, 512, 32)), jnp.ones((1, 1), bool))["params"]
    )
    for name, fan_in in [("flatten", 32 * 32), ("out", 32)]:
        bound = 1 / math.sqrt(fan_in)
        for leaf in ("kernel", "bias"):
            x = np.asarray(params[name][leaf])
            assert np.abs(x).max() <= bound and np.abs(x).max() > 0.9 * bound
            assert abs(x.std() - bound / math.sqrt(3)) < 0.15 * bound  # uniform, not normal/zeros
    assert (np.asarray(params["stage0"]["norm"]["scale"]) == 1).all()


@pytest.mark.parametrize("d,expected", [(4096, 44_069_900), (5120, 45_119_500)])
def test_parameter_count_equals_spec_arithmetic(d, expected):
    """SPEC §4.2/§4.6: C = 1024, two stages + flatten projector + final projection."""
    model = S.Sampler(S.SamplerConfig(), out_features=d)
    shapes = abstract_params(model, jnp.zeros((1, 1, 512, 2)), jnp.zeros((1, 1, 512, 1024)), jnp.ones((1, 1), bool))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == expected
