"""CLIP vision tower (pre-LN ViT, quick-GELU): the global-view encoder of Ferret-v2.

Returns the hidden states of one layer (default -2, as LLaVA and Ferret use) without the CLS
token. Only the layers up to the selected one exist as parameters: the later layers and
`post_layernorm` of a HF checkpoint never influence the output, so the converter skips them
(and says so) instead of carrying dead weights through training.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ferret_jax.models import layers


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24  # layers of the pretrained tower; see `layers_used`
    num_heads: int = 16
    mlp_dim: int = 4096
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"
    select_layer: int = -2  # HF `hidden_states` index: 0 = embeddings, -1 = last layer
    dtype: str = "float32"
    remat: str = "none"
    scan_unroll: int = 1  # layers per scan iteration; num_layers unrolls the stack (faster for a few layers, slower to compile for many)

    @property
    def layers_used(self) -> int:
        n = self.num_layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"select_layer={self.select_layer} out of range for {self.num_layers} layers")
        return n

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "ClipConfig":
        """From a HF `CLIPVisionConfig` dict (or a `CLIPConfig` dict with `vision_config`)."""
        hf = hf.get("vision_config", hf)
        kw = dict(
            image_size=hf.get("image_size", 224),
            patch_size=hf.get("patch_size", 32),
            hidden_size=hf.get("hidden_size", 768),
            num_layers=hf.get("num_hidden_layers", 12),
            num_heads=hf.get("num_attention_heads", 12),
            mlp_dim=hf.get("intermediate_size", 3072),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            activation=hf.get("hidden_act", "quick_gelu"),
        )
        kw.update(overrides)
        return cls(**kw)


class ClipVision(nn.Module):
    """`[B, H, W, 3]` CLIP-normalized images -> `[B, H/p, W/p, C]` patch features of `select_layer`.

    Inputs at another size than `image_size` get HF's bicubic position interpolation.
    """

    config: ClipConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        d = cfg.hidden_size
        cls_token, patches, (gh, gw) = layers.vit_embed(
            self, images, patch_size=cfg.patch_size, pretrained_grid=cfg.grid, patch_bias=False,
            pos_interpolation="hf", dtype=dtype,
        )
        x = jnp.concatenate([cls_token, patches], axis=1)
        x = layers.LayerNorm(cfg.layer_norm_eps, dtype, name="pre_ln")(x)
        if cfg.layers_used:
            block = layers.stacked(layers.ViTBlock, cfg.layers_used, cfg.remat, unroll=cfg.scan_unroll)
            x, _ = block(
                num_heads=cfg.num_heads,
                mlp_dim=cfg.mlp_dim,
                activation=cfg.activation,
                layer_norm_eps=cfg.layer_norm_eps,
                dtype=dtype,
                name="layers",
            )(x, None)
        return x[:, 1:].reshape(x.shape[0], gh, gw, d)
