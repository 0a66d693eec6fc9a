"""ferret_jax: Ferret-v2 (refer and ground at any resolution) in JAX/Flax Linen."""

__version__ = "0.1.0"
