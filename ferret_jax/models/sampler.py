"""Ferret's spatial-aware visual sampler (SPEC §4) and the region feature lookup it starts from.

Per region: 512 points sampled inside its mask (on the host) -> bilinear features from the fused
high-resolution map -> [FPS 128 -> kNN 24 -> relative encoding -> Linear -> ReLU -> LayerNorm ->
max-pool] -> [FPS 32 -> kNN 24 -> ...] -> flatten (FPS order) -> Linear -> Linear -> one D-vector.

The fused map is never materialized: `lookup_fused` reads the 4 bilinear neighbours of a point
straight from the stacked DINOv2 tiles `[T, t, t, C]` (tile = data-dependent function of the
grid) and from the global CLIP map (nearest-upsampled onto the merged grid), so any-resolution
grids need no dynamic shapes and no padded giant map. Geometry (points, FPS, kNN, bilinear
weights) runs in fp32.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ferret_jax.models import layers


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    num_points: int = 512  # points per region from the host pipeline
    stages: tuple[tuple[int, int], ...] = ((128, 24), (32, 24))  # (FPS points, kNN neighbours)
    layer_norm_eps: float = 1e-5  # PyTorch's default, as in the reference sampler


# ----------------------------------------------------------------------------------------------
# Feature lookup


def _bilinear(points: jax.Array, height, width, fetch) -> jax.Array:
    """align_corners=True bilinear sampling of a `height x width` map at normalized points.

    `fetch(rows, cols)` returns the map values at integer cells (`[P] -> [P, C]`). Point (x, y) in
    [0, 1] maps to column x*(width-1), row y*(height-1): 0 is the first cell centre, 1 the last.
    """
    pts = points.astype(jnp.float32)
    u = jnp.clip(pts[:, 0], 0.0, 1.0) * (width - 1)
    v = jnp.clip(pts[:, 1], 0.0, 1.0) * (height - 1)
    u0 = jnp.floor(u).astype(jnp.int32)
    v0 = jnp.floor(v).astype(jnp.int32)
    u1 = jnp.minimum(u0 + 1, width - 1)
    v1 = jnp.minimum(v0 + 1, height - 1)
    du = (u - u0)[:, None]
    dv = (v - v0)[:, None]
    f = lambda r, c: fetch(r, c).astype(jnp.float32)  # noqa: E731
    return (
        f(v0, u0) * (1 - du) * (1 - dv)
        + f(v0, u1) * du * (1 - dv)
        + f(v1, u0) * (1 - du) * dv
        + f(v1, u1) * du * dv
    )


def tile_cell_index(row: jax.Array, col: jax.Array, cols: jax.Array, t: int) -> jax.Array:
    """Cell (row, col) of the merged local map -> flat index into stacked tiles `[T * t * t]`.

    Tiles are row-major on a grid `cols` wide, each `t x t`: the one place that layout is decoded.
    """
    tile = (row // t) * cols + col // t
    return tile * (t * t) + (row % t) * t + col % t


def lookup_global(points: jax.Array, global_map: jax.Array) -> jax.Array:
    """Bilinear features of the global map alone. points `[P, 2]`, map `[g, g, C]` -> `[P, C]`."""
    gh, gw, c = global_map.shape
    flat = global_map.reshape(gh * gw, c)
    return _bilinear(points, gh, gw, lambda r, col: flat[r * gw + col])


def lookup_fused(
    points: jax.Array, tiles: jax.Array, global_map: jax.Array, grid: jax.Array, fusion: str
) -> jax.Array:
    """Bilinear features of the fused high-resolution map at normalized points.

    The fused map is the merged local map (tiles row-major on a `rows x cols` grid, `rows*t` by
    `cols*t` cells) plus / concatenated with the global map nearest-upsampled to that size.

    Args:
      points: `[P, 2]` normalized (x, y).
      tiles: `[T, t, t, C]` local features; tiles beyond `cols*rows` are never read.
      global_map: `[g, g, Cg]`.
      grid: int `[2]` = (cols, rows), data (not static).
      fusion: 'add' (C == Cg) or 'concat' (`[P, C + Cg]`).

    Returns:
      `[P, C]` ('add') or `[P, C + Cg]` ('concat'), fp32.
    """
    _, t, _, c = tiles.shape
    g = global_map.shape[0]
    cols = jnp.maximum(grid[0], 1)
    rows = jnp.maximum(grid[1], 1)
    height, width = rows * t, cols * t
    local_flat = tiles.reshape(-1, c)
    global_flat = global_map.reshape(g * g, global_map.shape[-1])

    def fetch(r, col):
        local = local_flat[tile_cell_index(r, col, cols, t)]
        # nearest upsampling g -> merged size: source cell floor(dst * g / size)
        glob = global_flat[((r * g) // height) * g + (col * g) // width]
        if fusion == "add":
            return local + glob
        if fusion == "concat":
            return jnp.concatenate([local, glob], axis=-1)
        raise ValueError(f"unknown fusion {fusion!r}; choose 'add' or 'concat'")

    return _bilinear(points, height, width, fetch)


# ----------------------------------------------------------------------------------------------
# Point-cloud geometry (per region; vmapped by the caller)


def farthest_point_sample(points: jax.Array, num: int, key: jax.Array) -> jax.Array:
    """Indices `[num]` of FPS over `[N, 2]` points, starting from a random point."""
    n = points.shape[0]
    start = jax.random.randint(key, (), 0, n)

    def body(i, state):
        idx, dist = state
        d = jnp.sum(jnp.square(points - points[idx[i - 1]]), axis=-1)
        dist = jnp.minimum(dist, d)
        return idx.at[i].set(jnp.argmax(dist).astype(jnp.int32)), dist

    idx = jnp.zeros((num,), jnp.int32).at[0].set(start)
    idx, _ = jax.lax.fori_loop(1, num, body, (idx, jnp.full((n,), jnp.inf, jnp.float32)))
    return idx


def knn(anchors: jax.Array, points: jax.Array, k: int) -> jax.Array:
    """Indices `[M, k]` of the k nearest `points [N, 2]` of each anchor `[M, 2]` (squared L2)."""
    d2 = jnp.sum(jnp.square(anchors[:, None, :] - points[None, :, :]), axis=-1)
    return jax.lax.top_k(-d2, k)[1]


# ----------------------------------------------------------------------------------------------
# The learned part


def torch_kernel_init():
    """PyTorch Linear/Conv1d default weights: U(±1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """PyTorch Linear default bias: U(±1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_dense(features: int, fan_in: int, axes, dtype, name: str) -> layers.Dense:
    return layers.Dense(
        features, axes, dtype=dtype, kernel_init=torch_kernel_init(), bias_init=torch_bias_init(fan_in), name=name
    )


class BroadcastPairDense(nn.Module):
    """`Dense` over `concat([a, broadcast(b)], -1)` without building the concatenation:
    `a @ W[:Da] + b @ W[Da:] + bias`, so `b`'s part is computed once per row of `b`, not once per
    broadcast copy. a `[..., k, Da]`, b `[..., 1, Db]` -> `[..., k, features]`. Params are those of
    a `layers.Dense` over Da + Db inputs (kernel `[Da + Db, features]`, bias `[features]`)."""

    features: int
    axes: tuple[str | None, str | None]
    dtype: layers.Dtype
    kernel_init: layers.Initializer
    bias_init: layers.Initializer

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        da = a.shape[-1]
        kernel = self.param("kernel", layers.partitioned(self.kernel_init, self.axes), (da + b.shape[-1], self.features),
                            jnp.float32).astype(self.dtype)
        bias = self.param("bias", layers.partitioned(self.bias_init, self.axes[1:]), (self.features,), jnp.float32)
        return (layers.matmul(a.astype(self.dtype), kernel[:da], 1) + layers.matmul(b.astype(self.dtype), kernel[da:], 1)
                + bias.astype(self.dtype))


class SamplerStage(nn.Module):
    """One sample-group-aggregate stage. points `[..., N, 2]`, feats `[..., N, C]`, anchor and
    neighbour indices -> (anchor points `[..., M, 2]`, pooled feats `[..., M, C]`)."""

    eps: float
    dtype: layers.Dtype

    @nn.compact
    def __call__(self, points, feats, anchor_idx, neighbour_idx):
        c = feats.shape[-1]
        take = jax.vmap(jax.vmap(lambda x, i: x[i]))  # over the leading [B, R] dims
        anchors = take(points, anchor_idx)  # [B, R, M, 2]
        anchor_feats = take(feats, anchor_idx)  # [B, R, M, C]
        nb_points = take(points, neighbour_idx)  # [B, R, M, k, 2]
        nb_feats = take(feats, neighbour_idx)  # [B, R, M, k, C]
        anc = jnp.concatenate([anchor_feats, anchors.astype(anchor_feats.dtype)], axis=-1)[..., None, :]
        local = jnp.concatenate([nb_feats, nb_points.astype(nb_feats.dtype)], axis=-1)
        diff = torch_dense(c + 2, c + 2, (None, None), self.dtype, "diff")(local - anc)
        # Linear over [diff, anchor] per neighbour (SPEC Appendix A), the anchor's half once per anchor
        h = BroadcastPairDense(c, (None, "embed"), self.dtype, torch_kernel_init(), torch_bias_init(2 * c + 4),
                               name="agg")(diff, anc)
        h = layers.LayerNorm(self.eps, self.dtype, name="norm")(jax.nn.relu(h))
        return anchors, jnp.max(h, axis=-2)


class Sampler(nn.Module):
    """Region features from sampled points and their looked-up features.

    points `[B, R, P, 2]` (fp32), feats `[B, R, P, C]`, valid bool `[B, R]` -> `[B, R, D]`; rows
    of invalid regions are zeros. FPS start points come from the 'sampler' rng stream when given
    (training), else from a fixed key (deterministic evaluation).
    """

    config: SamplerConfig
    out_features: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, points: jax.Array, feats: jax.Array, valid: jax.Array) -> jax.Array:
        cfg = self.config
        b, r, p, c = feats.shape
        key = self.make_rng("sampler") if self.has_rng("sampler") else jax.random.key(0)
        points = points.astype(jnp.float32)
        feats = feats.astype(self.dtype)
        per_region = lambda f: jax.vmap(jax.vmap(f))  # noqa: E731
        for s, (num, k) in enumerate(cfg.stages):
            keys = jax.random.split(jax.random.fold_in(key, s), b * r).reshape(b, r)
            anchor_idx = per_region(lambda x, kk: farthest_point_sample(x, num, kk))(points, keys)
            anchors = per_region(lambda x, i: x[i])(points, anchor_idx)
            neighbour_idx = per_region(lambda a, x: knn(a, x, k))(anchors, points)
            points, feats = SamplerStage(cfg.layer_norm_eps, self.dtype, name=f"stage{s}")(
                points, feats, anchor_idx, neighbour_idx
            )
        flat = feats.reshape(b, r, -1)  # point-major, in FPS order
        x = torch_dense(c, flat.shape[-1], ("mlp", "embed"), self.dtype, "flatten")(flat)
        x = torch_dense(self.out_features, c, (None, "embed"), self.dtype, "out")(x)
        return jnp.where(valid[..., None], x, 0).astype(self.dtype)
