"""DINOv2 (LayerScale, optional register tokens): the high-resolution tile encoder of Ferret-v2.

Any input size whose sides are multiples of the patch size works: the pretrained position table
(37x37 for the released checkpoints) is resized bicubically exactly as HF transformers does
(`pos_interpolation='hf'`), as HF's Dinov2WithRegisters does (`'hf_antialias'`), or as Meta's
original code does with its 0.1 offset (`'meta'`). `mask_token` (masked-image pretraining only)
is not a parameter here.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ferret_jax.models import layers


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    image_size: int = 518  # pretraining size: fixes the position table (37x37 + CLS)
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"
    layerscale_value: float = 1.0
    num_register_tokens: int = 0
    pos_interpolation: str = "hf"  # 'hf' | 'hf_antialias' | 'meta'
    final_norm: bool = True  # apply the final LayerNorm (HF `last_hidden_state`)
    dtype: str = "float32"
    remat: str = "none"
    scan_unroll: int = 1  # layers per scan iteration; num_layers unrolls the stack (faster for a few layers, slower to compile for many)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "Dinov2Config":
        """From a HF `Dinov2Config` / `Dinov2WithRegistersConfig` dict."""
        if hf.get("use_swiglu_ffn", False):
            raise ValueError("DINOv2 checkpoints with a SwiGLU FFN (ViT-g) are not supported")
        registers = hf.get("num_register_tokens", 0)
        hidden = hf.get("hidden_size", 768)
        kw = dict(
            image_size=hf.get("image_size", 518),
            patch_size=hf.get("patch_size", 14),
            hidden_size=hidden,
            num_layers=hf.get("num_hidden_layers", 12),
            num_heads=hf.get("num_attention_heads", 12),
            mlp_dim=int(hidden * hf.get("mlp_ratio", 4)),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
            activation=hf.get("hidden_act", "gelu"),
            layerscale_value=hf.get("layerscale_value", 1.0),
            num_register_tokens=registers,
            pos_interpolation="hf_antialias" if registers else "hf",
        )
        kw.update(overrides)
        return cls(**kw)


class Dinov2(nn.Module):
    """`[B, H, W, 3]` ImageNet-normalized images -> `[B, H/p, W/p, C]` patch tokens."""

    config: Dinov2Config

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        d = cfg.hidden_size
        cls_token, patches, (gh, gw) = layers.vit_embed(
            self, images, patch_size=cfg.patch_size, pretrained_grid=cfg.grid, patch_bias=True,
            pos_interpolation=cfg.pos_interpolation, dtype=dtype,
        )
        b = images.shape[0]
        tokens = [cls_token]
        if cfg.num_register_tokens:
            reg = self.param(
                "registers",
                layers.partitioned(nn.initializers.normal(0.02), ("pos", "embed")),
                (cfg.num_register_tokens, d),
                jnp.float32,
            )
            tokens.append(jnp.broadcast_to(reg.astype(dtype), (b, cfg.num_register_tokens, d)))
        tokens.append(patches)
        x = jnp.concatenate(tokens, axis=1)
        block = layers.stacked(layers.ViTBlock, cfg.num_layers, cfg.remat, unroll=cfg.scan_unroll)
        x, _ = block(
            num_heads=cfg.num_heads,
            mlp_dim=cfg.mlp_dim,
            activation=cfg.activation,
            layer_norm_eps=cfg.layer_norm_eps,
            layer_scale=cfg.layerscale_value,
            dtype=dtype,
            name="layers",
        )(x, None)
        if cfg.final_norm:
            x = layers.LayerNorm(cfg.layer_norm_eps, dtype, name="final_ln")(x)
        return x[:, 1 + cfg.num_register_tokens :].reshape(b, gh, gw, d)
