"""HF CLIPVisionModel / CLIPModel safetensors -> `ClipVision` params."""

from __future__ import annotations

import numpy as np

from ferret_jax.convert import mapping
from ferret_jax.convert.mapping import CONV, Rule
from ferret_jax.convert.safetensors_io import TensorSource
from ferret_jax.convert.vit_rules import vit_block_rules
from ferret_jax.models.clip import ClipConfig, ClipVision

# CLIPModel checkpoints also hold the text tower and the contrastive heads; Ferret uses neither.
_OTHER_TOWERS = (r"text_model\..*", r"text_projection\..*", r"visual_projection\..*", r"logit_scale", r"embeddings\.position_ids")


def rules(config: ClipConfig) -> list[Rule]:
    p = "encoder.layers.{i}."
    return [
        Rule("patch_embed/kernel", "embeddings.patch_embedding.weight", CONV),
        Rule("cls", "embeddings.class_embedding"),
        Rule("pos_embed", "embeddings.position_embedding.weight"),
        Rule("pre_ln/scale", "pre_layrnorm.weight"),
        Rule("pre_ln/bias", "pre_layrnorm.bias"),
    ] + (
        vit_block_rules(
            dict(
                ln1=p + "layer_norm1", ln2=p + "layer_norm2", q=p + "self_attn.q_proj", k=p + "self_attn.k_proj",
                v=p + "self_attn.v_proj", o=p + "self_attn.out_proj", fc1=p + "mlp.fc1", fc2=p + "mlp.fc2",
            )
        )
        if config.layers_used
        else []
    )


def ignored(config: ClipConfig) -> tuple[str, ...]:
    """Tensors that cannot influence the selected layer's output, plus the other CLIPModel parts."""
    later = "|".join(str(i) for i in range(config.layers_used, config.num_layers))
    skip = (r"post_layernorm\..*",) + ((rf"encoder\.layers\.({later})\..*",) if later else ())
    return skip + _OTHER_TOWERS


def convert_clip(directory: str, dtype=np.float32, **overrides) -> tuple[ClipConfig, dict, list[str]]:
    """Returns (config from the folder's config.json + overrides, params, ignored tensor names)."""
    source = TensorSource(directory, strip_prefixes=("vision_model.",))
    config = ClipConfig.from_hf(source.config, **overrides)
    images = np.zeros((1, config.image_size, config.image_size, 3), np.float32)
    target = mapping.abstract_params(ClipVision(config), images)
    params, skipped = mapping.convert(source, rules(config), target, ignored(config), dtype, "CLIP checkpoint")
    return config, params, skipped
