"""Flax Linen modules of ferret_jax: the three backbones and (later) the Ferret-v2 model."""

from ferret_jax.models.clip import ClipConfig, ClipVision
from ferret_jax.models.dinov2 import Dinov2, Dinov2Config
from ferret_jax.models.llama import Llama, LlamaConfig, init_kv_cache

__all__ = ["ClipConfig", "ClipVision", "Dinov2", "Dinov2Config", "Llama", "LlamaConfig", "init_kv_cache"]
