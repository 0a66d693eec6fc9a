"""HF Dinov2Model / Dinov2WithRegistersModel safetensors -> `Dinov2` params."""

from __future__ import annotations

import numpy as np

from ferret_jax.convert import mapping
from ferret_jax.convert.mapping import CONV, Rule, squeeze_leading
from ferret_jax.convert.safetensors_io import TensorSource
from ferret_jax.convert.vit_rules import vit_block_rules
from ferret_jax.models.dinov2 import Dinov2, Dinov2Config


def rules(config: Dinov2Config) -> list[Rule]:
    p = "encoder.layer.{i}."
    out = [
        Rule("patch_embed/kernel", "embeddings.patch_embeddings.projection.weight", CONV),
        Rule("patch_embed/bias", "embeddings.patch_embeddings.projection.bias"),
        Rule("cls", "embeddings.cls_token", squeeze_leading(2)),
        Rule("pos_embed", "embeddings.position_embeddings", squeeze_leading(1)),
    ]
    if config.num_register_tokens:
        out.append(Rule("registers", "embeddings.register_tokens", squeeze_leading(1)))
    if config.final_norm:
        out += [Rule("final_ln/scale", "layernorm.weight"), Rule("final_ln/bias", "layernorm.bias")]
    return out + vit_block_rules(
        dict(
            ln1=p + "norm1", ln2=p + "norm2", q=p + "attention.attention.query", k=p + "attention.attention.key",
            v=p + "attention.attention.value", o=p + "attention.output.dense", fc1=p + "mlp.fc1", fc2=p + "mlp.fc2",
            ls1=p + "layer_scale1.lambda1", ls2=p + "layer_scale2.lambda1",
        )
    )


def ignored(config: Dinov2Config) -> tuple[str, ...]:
    # mask_token only serves masked-image pretraining.
    return (r"embeddings\.mask_token",) + (() if config.final_norm else (r"layernorm\.(weight|bias)",))


def convert_dinov2(directory: str, dtype=np.float32, **overrides) -> tuple[Dinov2Config, dict, list[str]]:
    """Returns (config from the folder's config.json + overrides, params, ignored tensor names)."""
    source = TensorSource(directory)
    config = Dinov2Config.from_hf(source.config, **overrides)
    images = np.zeros((1, config.patch_size, config.patch_size, 3), np.float32)
    target = mapping.abstract_params(Dinov2(config), images)
    params, skipped = mapping.convert(source, rules(config), target, ignored(config), dtype, "DINOv2 checkpoint")
    return config, params, skipped
