"""Model size presets and the `file.py:key=value,...` argument parser used by configs/.

Presets give the three backbones of a size: `tiny` (unit tests), `demo` (CPU demo on the
synthetic world), `7b` and `13b` (CLIP ViT-L/14-336 + DINOv2 ViT-L/14 + Vicuna v1.5, vocab 32000
plus `<region_fea>`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ferret_jax.models.clip import ClipConfig
from ferret_jax.models.dinov2 import Dinov2Config
from ferret_jax.models.ferret import FerretConfig
from ferret_jax.models.llama import LlamaConfig
from ferret_jax.models.sampler import SamplerConfig

VICUNA_VOCAB = 32000
ADDED_TOKENS = ("<region_fea>",)

CLIP_L14_336 = ClipConfig(
    image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096, select_layer=-2
)
DINOV2_L14 = Dinov2Config(
    image_size=518, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096
)
VICUNA_7B_V15 = LlamaConfig(
    vocab_size=VICUNA_VOCAB + len(ADDED_TOKENS),
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=4096,
)
VICUNA_13B_V15 = dataclasses.replace(
    VICUNA_7B_V15, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40
)

TINY = dict(
    clip=ClipConfig(image_size=28, patch_size=14, hidden_size=32, num_layers=3, num_heads=2, mlp_dim=64),
    dino=Dinov2Config(image_size=42, patch_size=14, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64),
    llm=LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        max_position_embeddings=1024,
    ),
)
# CPU-sized: trains all three stages on the synthetic world in minutes.
DEMO = dict(
    clip=ClipConfig(image_size=112, patch_size=14, hidden_size=128, num_layers=3, num_heads=4, mlp_dim=256, select_layer=-1),
    dino=Dinov2Config(image_size=112, patch_size=14, hidden_size=128, num_layers=2, num_heads=4, mlp_dim=256),
    llm=LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=3, num_heads=4, num_kv_heads=4,
        max_position_embeddings=2048,
    ),
)
_ACCEL = dict(dtype="bfloat16", remat="full")
SIZES = {
    "tiny": TINY,
    "demo": DEMO,
    "7b": dict(
        clip=dataclasses.replace(CLIP_L14_336, **_ACCEL),
        dino=dataclasses.replace(DINOV2_L14, **_ACCEL),
        llm=dataclasses.replace(VICUNA_7B_V15, **_ACCEL),
    ),
    "13b": dict(
        clip=dataclasses.replace(CLIP_L14_336, **_ACCEL),
        dino=dataclasses.replace(DINOV2_L14, **_ACCEL),
        llm=dataclasses.replace(VICUNA_13B_V15, **_ACCEL),
    ),
}


def backbones(size: str) -> dict[str, Any]:
    """`{'clip': ClipConfig, 'dino': Dinov2Config, 'llm': LlamaConfig}` of a preset size."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    return dict(SIZES[size])


# Image sides and sampler sizes per preset; the 7B/13B values are the paper defaults (SPEC App. B).
_FERRET = {
    "tiny": dict(global_size=28, cell=28, max_tiles=4, sampler=SamplerConfig(num_points=64, stages=((16, 8), (8, 8)))),
    "demo": dict(global_size=112, cell=112, max_tiles=4, sampler=SamplerConfig(num_points=128, stages=((32, 12), (8, 8)))),
    "7b": dict(global_size=336, cell=336, max_tiles=6),
    "13b": dict(global_size=336, cell=336, max_tiles=6),
}


def ferret_config(size: str, **overrides: Any) -> FerretConfig:
    """The Ferret-v2 model config of a preset size; `overrides` replace FerretConfig fields."""
    return FerretConfig(**backbones(size), **{**_FERRET[size], **overrides})


def _parse_value(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected a boolean, got {text!r}")
        return text.lower() in ("true", "1")
    if default is None or isinstance(default, str):
        return text
    return type(default)(text)


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
    """Parses a config file's arg string like big_vision: `"size=13b,steps=10"` or `"demo"`.

    A bare word `w` means `size=w` when `size` is a known key, else `w=True`. Values take the
    type of their default; unknown keys are an error naming the known ones.
    """
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            if "size" in defaults and key in SIZES:
                key, value = "size", key
            else:
                value = "true"
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        out[key] = _parse_value(value, defaults[key])
    return out
