"""Ferret-v2: CLIP global view + DINOv2 any-resolution tiles + spatial-aware sampler + LLaMA.

Param tree (the contract for freezing, sharding, conversion and checkpoints):
`clip, dino, proj_global, proj_local, sampler, llm`. All six exist whatever the switches, so a
stage-I checkpoint (global only) hands every subtree to stage II.

Forward pass on a batch of the DESIGN §5 contract (B examples, L tokens, T tiles, R regions):
1. `clip(global_image)` -> F_g `[B, g, g, Cg]`; `dino(tiles)` -> F_l `[B, T, t, t, Cl]`.
2. `proj_global(F_g)`, `proj_local(F_l)` (2-layer GELU MLPs) -> visual tokens of width D; slot i
   of the sequence takes token `visual_index[i]` of [global g*g raster, merged local raster].
3. Region features: the sampler reads its map (`sampler_input`: raw encoder features or the
   projected ones; `fusion`: merged local + nearest-upsampled global, added or concatenated)
   at `region_points` and emits one D-vector per region; slot i with `region_index[i] = r`
   takes region r's feature.
4. Everything else is the token embedding; the decoder returns fp32 logits `[B, L, V]`.

`use_local=False` is the global-only path (stage I, Ferret-v1 layout): tiles are ignored, visual
indices address only the g*g global tokens, and the sampler reads the global map.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ferret_jax.models import layers
from ferret_jax.models.clip import ClipConfig, ClipVision
from ferret_jax.models.dinov2 import Dinov2, Dinov2Config
from ferret_jax.models.llama import Llama, LlamaConfig
from ferret_jax.models.sampler import (
    Sampler,
    SamplerConfig,
    lookup_fused,
    lookup_global,
    tile_cell_index,
    torch_dense,
)

FUSIONS = ("add", "concat")
SAMPLER_INPUTS = ("raw", "projected")


@dataclasses.dataclass(frozen=True)
class FerretConfig:
    clip: ClipConfig
    dino: Dinov2Config
    llm: LlamaConfig
    sampler: SamplerConfig = SamplerConfig()
    global_size: int = 336  # CLIP input side
    cell: int = 336  # DINOv2 tile side
    max_tiles: int = 6  # T: tiles per example (any-res grids of up to 6 cells)
    use_local: bool = True
    fusion: str = "add"  # 'add' (paper, Ferret-UI) | 'concat'
    sampler_input: str = "raw"  # 'raw' (Ferret's code) | 'projected' (paper notation)

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion={self.fusion!r}; choose from {FUSIONS}")
        if self.sampler_input not in SAMPLER_INPUTS:
            raise ValueError(f"sampler_input={self.sampler_input!r}; choose from {SAMPLER_INPUTS}")
        if self.global_size % self.clip.patch_size or self.cell % self.dino.patch_size:
            raise ValueError("global_size / cell must be multiples of the CLIP / DINOv2 patch sizes")
        if self.use_local and self.fusion == "add" and self.sampler_width_parts[0] != self.sampler_width_parts[1]:
            raise ValueError(
                f"fusion='add' needs equal widths of the global and local sampler maps, got "
                f"{self.sampler_width_parts}; use fusion='concat' or sampler_input='projected'"
            )

    @property
    def global_grid(self) -> int:
        return self.global_size // self.clip.patch_size

    @property
    def tile_grid(self) -> int:
        return self.cell // self.dino.patch_size

    @property
    def sampler_width_parts(self) -> tuple[int, int]:
        if self.sampler_input == "projected":
            return self.llm.hidden_size, self.llm.hidden_size
        return self.clip.hidden_size, self.dino.hidden_size

    @property
    def sampler_width(self) -> int:
        """Channels the sampler reads (its param shapes); the same with and without use_local."""
        g, l = self.sampler_width_parts
        return g + l if self.fusion == "concat" else g

    def num_visual_tokens(self, cols: int, rows: int) -> int:
        """Visual slots of an example with a (cols, rows) grid: g*g global + cols*rows*t*t local."""
        local = cols * rows * self.tile_grid**2 if self.use_local else 0
        return self.global_grid**2 + local


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """A `Projector`'s shape, as a `save_converted` directory records it beside the backbones."""

    in_features: int  # the encoder's width
    features: int  # the LLM's width


class Projector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu`: Linear -> GELU (erf) -> Linear. `[..., C] -> [..., D]`."""

    features: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = torch_dense(self.features, x.shape[-1], (None, "embed"), self.dtype, "fc1")(x)
        x = jax.nn.gelu(x, approximate=False)
        return torch_dense(self.features, self.features, ("mlp", "embed"), self.dtype, "fc2")(x)


def _merged_to_tile_index(merged: jax.Array, grid: jax.Array, t: int) -> jax.Array:
    """Merged-map raster index `[L]` -> flat index into the stacked tiles `[T * t * t]`."""
    cols = jnp.maximum(grid[0], 1)
    return tile_cell_index(merged // (cols * t), merged % (cols * t), cols, t)


def region_point_features(points: jax.Array, grid: jax.Array, global_map: jax.Array, local_map: jax.Array | None,
                          fusion: str) -> jax.Array:
    """The sampler's input: features at each region point, `points [B, R, P, 2]` -> `[B, R, P, C]`
    (`[B, R, P, 2C]` for 'concat'), looked up in the global map `[B, g, g, C]` and, when given, in
    the local tiles `[B, T, t, t, C]` of a (cols, rows) `grid [B, 2]`, fused by `fusion`."""
    b, r, p, _ = points.shape
    flat_points = points.reshape(b, r * p, 2)
    if local_map is not None:
        feats = jax.vmap(lambda pt, ti, gm, gr: lookup_fused(pt, ti, gm, gr, fusion))(flat_points, local_map, global_map, grid)
    else:
        feats = jax.vmap(lookup_global)(flat_points, global_map)
        if fusion == "concat":  # no local half in global-only mode
            feats = jnp.concatenate([feats, jnp.zeros_like(feats)], axis=-1)
    return feats.reshape(b, r, p, feats.shape[-1])


class Ferret(nn.Module):
    config: FerretConfig

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.llm.dtype)
        self.clip = ClipVision(cfg.clip)
        self.dino = Dinov2(cfg.dino)
        self.proj_global = Projector(cfg.llm.hidden_size, dtype)
        self.proj_local = Projector(cfg.llm.hidden_size, dtype)
        self.sampler = Sampler(cfg.sampler, cfg.llm.hidden_size, dtype)
        self.llm = Llama(cfg.llm)

    def encode_images(self, global_image: jax.Array, tiles: jax.Array):
        """-> (F_g `[B, g, g, Cg]`, F_l `[B, T, t, t, Cl]` or None, H_g `[B, g*g, D]`, H_l `[B, T*t*t, D]` or None)."""
        cfg = self.config
        f_g = self.clip(global_image)
        h_g = self.proj_global(f_g)
        b = f_g.shape[0]
        h_g = h_g.reshape(b, -1, h_g.shape[-1])
        if not cfg.use_local and not self.is_initializing():
            return f_g, None, h_g, None
        n_tiles = tiles.shape[1]
        f_l = self.dino(tiles.reshape(b * n_tiles, *tiles.shape[2:]))
        f_l = f_l.reshape(b, n_tiles, *f_l.shape[1:])
        h_l = self.proj_local(f_l)
        return f_g, f_l, h_g, h_l.reshape(b, -1, h_l.shape[-1])

    def region_features(self, batch, f_g, f_l, h_g, h_l) -> jax.Array:
        """`[B, R, D]` sampler outputs (zeros for invalid regions)."""
        cfg = self.config
        if cfg.sampler_input == "projected":
            g = cfg.global_grid
            global_map = h_g.reshape(h_g.shape[0], g, g, -1)
            local_map = None if h_l is None else h_l.reshape(*f_l.shape[:-1], -1)
        else:
            global_map, local_map = f_g, f_l
        points = batch["region_points"]  # [B, R, P, 2]
        feats = region_point_features(points, batch["grid"], global_map, local_map if cfg.use_local else None, cfg.fusion)
        return self.sampler(points, feats, batch["region_valid"])

    def embed_inputs(self, batch) -> jax.Array:
        """Token embeddings with visual tokens and region features scattered in. `[B, L, D]`."""
        cfg = self.config
        f_g, f_l, h_g, h_l = self.encode_images(batch["global_image"], batch["tiles"])
        emb = self.llm.embed(jnp.maximum(batch["tokens"], 0))
        g2 = cfg.global_grid**2
        vi = batch["visual_index"]
        if h_l is None:
            visual = jax.vmap(lambda h, i: h[jnp.clip(i, 0, g2 - 1)])(h_g, vi)
        else:
            def gather(hg, hl, idx, grid):
                local_idx = _merged_to_tile_index(jnp.maximum(idx - g2, 0), grid, cfg.tile_grid)
                return jnp.where((idx < g2)[:, None], hg[jnp.clip(idx, 0, g2 - 1)], hl[local_idx])

            visual = jax.vmap(gather)(h_g, h_l, vi, batch["grid"])
        emb = jnp.where((vi >= 0)[..., None], visual.astype(emb.dtype), emb)
        regions = self.region_features(batch, f_g, f_l, h_g, h_l)  # [B, R, D]
        ri = batch["region_index"]
        picked = jax.vmap(lambda feats, i: feats[jnp.maximum(i, 0)])(regions, ri)
        return jnp.where((ri >= 0)[..., None], picked.astype(emb.dtype), emb)

    def hidden_states(self, batch) -> jax.Array:
        """`[B, L, D]` decoder outputs before the final norm, for a batch of the DESIGN §5 contract."""
        return self.llm.hidden_states(embeddings=self.embed_inputs(batch))[0]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`[..., D]` decoder outputs -> fp32 logits `[..., V]` (final norm and lm_head)."""
        return self.llm.head(hidden)

    def __call__(self, batch) -> jax.Array:
        """fp32 logits `[B, L, V]` for a batch of the DESIGN §5 contract."""
        return self.logits(self.hidden_states(batch))


def copy_global_projector(params: dict) -> dict:
    """Stage II init: `proj_local` becomes a copy of the (stage I trained) `proj_global`."""
    return {**params, "proj_local": jax.tree.map(lambda x: x, params["proj_global"])}


def example_batch(config: FerretConfig, batch: int = 1, length: int | None = None, regions: int = 1) -> dict:
    """All-zero batch of the DESIGN §5 contract with the config's shapes (for init and eval_shape)."""
    length = length or config.num_visual_tokens(1, 1) + 8
    st, sg, p = config.cell, config.global_size, config.sampler.num_points
    return {
        "global_image": jnp.zeros((batch, sg, sg, 3), jnp.float32),
        "tiles": jnp.zeros((batch, config.max_tiles, st, st, 3), jnp.float32),
        "grid": jnp.ones((batch, 2), jnp.int32),
        "tokens": jnp.zeros((batch, length), jnp.int32),
        "visual_index": jnp.full((batch, length), -1, jnp.int32),
        "region_index": jnp.full((batch, length), -1, jnp.int32),
        "region_points": jnp.zeros((batch, regions, p, 2), jnp.float32),
        "region_valid": jnp.zeros((batch, regions), bool),
        "targets": jnp.zeros((batch, length), jnp.int32),
        "loss_mask": jnp.zeros((batch, length), jnp.float32),
    }
