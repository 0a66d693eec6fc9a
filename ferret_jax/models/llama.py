"""LLaMA / Vicuna decoder: RMSNorm, RoPE (HF rotate-half layout), SwiGLU, grouped-query attention.

Ferret feeds the decoder embeddings (text embeddings with visual and region features scattered
in), so the main entry takes `embeddings` as readily as `tokens`. Decoding uses an explicit
KV cache pytree (see `init_kv_cache`): the same call does prefill (T prompt tokens) and single
steps (T = 1); nothing is stored in Flax collections, so the model stays a pure function.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ferret_jax.models import layers

KVCache = dict  # {'k': [layers, B, Hkv, Dh, S], 'v': same}; slots S minor (see init_kv_cache)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32001  # Vicuna's 32000 + <region_fea>
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # default hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    attention_chunk: int = 64  # query rows per causal block (no cache); 0 = one full block
    dtype: str = "float32"
    remat: str = "none"
    scan_unroll: int = 1  # layers per scan iteration; num_layers unrolls the stack (faster for a few layers, slower to compile for many)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "LlamaConfig":
        """From a HF `LlamaConfig` dict (transformers 4 `rope_theta` or 5 `rope_parameters`)."""
        if hf.get("tie_word_embeddings", False):
            raise ValueError("tied input/output embeddings are not supported (LLaMA/Vicuna are untied)")
        if hf.get("attention_bias", False) or hf.get("mlp_bias", False):
            raise ValueError("LLaMA variants with attention or MLP biases are not supported")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"RoPE scaling {rope} is not supported (only the default rotary embedding)")
        heads = hf.get("num_attention_heads", 32)
        kw = dict(
            vocab_size=hf.get("vocab_size", 32000),
            hidden_size=hf.get("hidden_size", 4096),
            intermediate_size=hf.get("intermediate_size", 11008),
            num_layers=hf.get("num_hidden_layers", 32),
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
        )
        kw.update(overrides)
        return cls(**kw)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, T, 1, Dh]` of HF's rotate-half RoPE for `[B, T]` positions (angles in fp32)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`x * cos + rotate_half(x) * sin` for x `[B, T, H, Dh]`; HF-layout checkpoints need no
    q/k permutation."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention_mask(t: int, cache_len: int | None, cache_index, kv_mask: jax.Array | None) -> jax.Array:
    """bool `[B or 1, T, S]`: query t (slot cache_index + t) sees key slots <= its own that
    kv_mask allows. S = T without a cache, the cache length with one."""
    q_slot = cache_index + jnp.arange(t)
    k_slot = jnp.arange(t if cache_len is None else cache_len)
    mask = (k_slot[None, :] <= q_slot[:, None])[None]
    return mask if kv_mask is None else mask & kv_mask[:, None, :]


def init_kv_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Zeroed cache for `max_len` slots: `{'k', 'v'}` each `[layers, B, Hkv, Dh, max_len]`.

    Slots are the minor axis: a layer's keys and values then feed the attention dots as they lie
    (slot-major, XLA:CPU would transpose a layer's whole cache at every decoding step).
    """
    shape = (config.num_layers, batch, config.num_kv_heads, config.dim_per_head, max_len)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class LlamaBlock(nn.Module):
    """One decoder layer, scan-compatible: `((x, cache), layer, ...) -> ((x, cache), None)`.

    The whole cache rides in the scan carry and each layer writes its T new slots in place at
    `[layer, ..., cache_index:]`; as per-layer scan inputs/outputs it would be copied every step.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, carry, layer, rope, mask, cache_index):
        x, cache = carry
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        dh = cfg.dim_per_head
        h = layers.RMSNorm(cfg.rms_norm_eps, dtype, name="attn_norm")(x)
        q = layers.HeadsProjection(cfg.num_heads, dh, use_bias=False, dtype=dtype, name="q")(h)
        k = layers.HeadsProjection(cfg.num_kv_heads, dh, "kv_heads", use_bias=False, dtype=dtype, name="k")(h)
        v = layers.HeadsProjection(cfg.num_kv_heads, dh, "kv_heads", use_bias=False, dtype=dtype, name="v")(h)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is None:
            keys, values = k, v
        else:
            start = (layer, 0, 0, 0, cache_index)
            new = {"k": k, "v": v}  # [B, T, Hkv, Dh] -> [1, B, Hkv, Dh, T] at this layer's slots
            cache = {
                name: jax.lax.dynamic_update_slice(c, new[name].transpose(0, 2, 3, 1)[None].astype(c.dtype), start)
                for name, c in cache.items()
            }
            keys, values = (
                jax.lax.dynamic_index_in_dim(cache[name], layer, 0, False).transpose(0, 3, 1, 2).astype(dtype)
                for name in ("k", "v")
            )
        if cache is None:
            attn = layers.causal_attention(q, keys, values, mask, cfg.attention_chunk)
        else:
            attn = layers.dot_product_attention(q, keys, values, mask)
        x = x + layers.HeadsOutput(cfg.hidden_size, use_bias=False, dtype=dtype, name="o")(attn)
        h = layers.RMSNorm(cfg.rms_norm_eps, dtype, name="mlp_norm")(x)
        gate = layers.Dense(cfg.intermediate_size, ("embed", "mlp"), use_bias=False, dtype=dtype, name="gate")(h)
        up = layers.Dense(cfg.intermediate_size, ("embed", "mlp"), use_bias=False, dtype=dtype, name="up")(h)
        x = x + layers.Dense(cfg.hidden_size, ("mlp", "embed"), use_bias=False, dtype=dtype, name="down")(
            jax.nn.silu(gate) * up
        )
        x = nn.with_logical_constraint(x, ("batch", "length", "embed_act"))
        return (x, cache), None


class Llama(nn.Module):
    """Decoder-only LM. Param tree: `embed [V, D]`, `layers/...` (stacked), `final_norm`, `lm_head [D, V]`."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embedding = self.param(
            "embed",
            layers.partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size),
            jnp.float32,
        )
        block = layers.stacked(
            LlamaBlock, cfg.num_layers, cfg.remat, in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), unroll=cfg.scan_unroll
        )
        self.layers = block(cfg)
        self.final_norm = layers.RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype))
        self.lm_head = self.param(
            "lm_head",
            layers.partitioned(nn.initializers.normal(0.02), ("embed", "vocab")),
            (cfg.hidden_size, cfg.vocab_size),
            jnp.float32,
        )

    def embed(self, tokens: jax.Array) -> jax.Array:
        """`[B, T]` ids -> `[B, T, D]` input embeddings in the compute dtype."""
        return jnp.take(self.embedding, tokens, axis=0).astype(jnp.dtype(self.config.dtype))

    def hidden_states(
        self,
        tokens: jax.Array | None = None,
        *,
        embeddings: jax.Array | None = None,
        positions: jax.Array | None = None,
        kv_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, KVCache | None]:
        """The decoder layers over T new tokens: `[B, T, D]` hidden states before the final norm
        and the updated cache (None without one). Arguments as `__call__`'s."""
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens or embeddings")
        x = self.embed(tokens) if embeddings is None else embeddings.astype(jnp.dtype(self.config.dtype))
        b, t, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(cache_index + jnp.arange(t), (b, t))
        # RoPE tables and the mask are shared by all layers: built once, outside the scan.
        rope = rotary_tables(positions, self.config.dim_per_head, self.config.rope_theta, x.dtype)
        mask = attention_mask(t, None if cache is None else cache["k"].shape[-1], cache_index, kv_mask)
        (x, cache), _ = self.layers((x, cache), jnp.arange(self.config.num_layers), rope, mask, cache_index)
        return x, cache

    def head(self, x: jax.Array) -> jax.Array:
        """Final norm and lm_head: `[..., D]` hidden states -> fp32 logits `[..., V]`."""
        x = self.final_norm(x)
        return layers.matmul(x, self.lm_head.astype(x.dtype), 1, out_dtype=jnp.float32)

    def __call__(
        self,
        tokens: jax.Array | None = None,
        *,
        embeddings: jax.Array | None = None,
        positions: jax.Array | None = None,
        kv_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        logits_to_keep: int = 0,
    ) -> tuple[jax.Array, KVCache | None]:
        """Causal forward over T new tokens.

        Args:
          tokens: `[B, T]` ids, or
          embeddings: `[B, T, D]` input embeddings (exactly one of the two).
          positions: `[B, T]` RoPE positions; default `cache_index + arange(T)`.
          kv_mask: bool `[B, S]`, False for key slots to ignore (padding); S = T without a cache,
            the cache length with one.
          cache: KV cache from `init_kv_cache`; the new keys/values are written at slots
            `[cache_index, cache_index + T)` and every query attends slots `<=` its own.
          cache_index: scalar slot of the first new token.
          logits_to_keep: > 0: logits of the last `logits_to_keep` positions only (a decoding
            prefill needs one; the lm_head dominates its cost otherwise); 0: all T.

        Returns:
          fp32 logits `[B, T, V]` (`[B, logits_to_keep, V]`) and the updated cache (None without one).
        """
        x, cache = self.hidden_states(
            tokens, embeddings=embeddings, positions=positions, kv_mask=kv_mask, cache=cache, cache_index=cache_index
        )
        return self.head(x if logits_to_keep <= 0 else x[:, -logits_to_keep:]), cache
