"""Building blocks shared by the CLIP, DINOv2 and LLaMA towers.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); `ferret_jax.sharding`
maps them onto the mesh. Logical names used here:

  embed     model width D                 mlp       MLP hidden width F
  heads     query heads H                 kv_heads  key/value heads Hkv
  head_dim  per-head width Dh             vocab     vocabulary V
  layers    the stacked axis added by nn.scan
  patch     conv kernel spatial / input-channel dims (never sharded)
  pos       position-table rows (never sharded)

Shapes in docstrings: B batch, L sequence, D width, H heads, Dh head width.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def partitioned(init: Initializer, names: tuple[str | None, ...]) -> Initializer:
    return nn.with_logical_partitioning(init, names)


# ----------------------------------------------------------------------------------------------
# Activations


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # torch's default (erf) form
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


# ----------------------------------------------------------------------------------------------
# Norms


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, statistics in fp32. `[..., D] -> [..., D]`."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, ("embed",)), (d,), jnp.float32)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (d,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm as HF computes it: normalize in fp32, cast, then scale. `[..., D]`."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, ("embed",)), (d,), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (scale * y.astype(self.dtype)).astype(self.dtype)


# ----------------------------------------------------------------------------------------------
# Linear layers with logical axes


def matmul(x: jax.Array, kernel: jax.Array, contract: int, out_dtype=None) -> jax.Array:
    """Contracts the last `contract` dims of x with the first of kernel, as one 2-D GEMM.

    `[..., *k_in] x [*k_in, *k_out] -> [..., *k_out]`. Flattening the leading dims first is
    markedly faster on XLA:CPU (forward and backward) than the equivalent batched einsum.
    """
    lead, k_in = x.shape[: x.ndim - contract], kernel.shape[:contract]
    k_out = kernel.shape[contract:]
    y = jnp.matmul(
        x.reshape(-1, int(np.prod(k_in))), kernel.reshape(int(np.prod(k_in)), -1), preferred_element_type=out_dtype
    )
    return y.reshape(*lead, *k_out)


class Dense(nn.Module):
    """`x @ W + b` over the last axis with named axes. `[..., Din] -> [..., features]`."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", partitioned(self.kernel_init, self.axes), (x.shape[-1], self.features), jnp.float32
        )
        y = matmul(x.astype(self.dtype), kernel.astype(self.dtype), 1)
        if self.use_bias:
            bias = self.param("bias", partitioned(self.bias_init, self.axes[1:]), (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class HeadsProjection(nn.Module):
    """Projects to per-head vectors. `[B, L, D] -> [B, L, heads, head_dim]`."""

    heads: int
    head_dim: int
    heads_axis: str = "heads"
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1], self.heads, self.head_dim)
        kernel = self.param(
            "kernel", partitioned(self.kernel_init, ("embed", self.heads_axis, "head_dim")), shape, jnp.float32
        )
        y = matmul(x.astype(self.dtype), kernel.astype(self.dtype), 1)
        if self.use_bias:
            bias = self.param(
                "bias",
                partitioned(nn.initializers.zeros, (self.heads_axis, "head_dim")),
                shape[1:],
                jnp.float32,
            )
            y = y + bias.astype(self.dtype)
        return y


class HeadsOutput(nn.Module):
    """Merges heads back into the model width. `[B, L, H, Dh] -> [B, L, features]`."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-2], x.shape[-1], self.features)
        kernel = self.param(
            "kernel", partitioned(self.kernel_init, ("heads", "head_dim", "embed")), shape, jnp.float32
        )
        y = matmul(x.astype(self.dtype), kernel.astype(self.dtype), 2)
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


# ----------------------------------------------------------------------------------------------
# Attention


def _shared_kv(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """GQA: each key/value head `[B, L, Hkv, Dh]` repeated for its group of q's H heads (cheap
    next to the matmuls)."""
    h, hkv = q.shape[2], k.shape[2]
    if h % hkv:
        raise ValueError(f"query heads {h} not a multiple of key/value heads {hkv}")
    if h == hkv:
        return k, v
    return jnp.repeat(k, h // hkv, axis=2), jnp.repeat(v, h // hkv, axis=2)


def _masked_softmax(logits: jax.Array, mask: jax.Array | None, dtype) -> jax.Array:
    """fp32 logits `[B, H, Lq, Lk]`, bool mask broadcastable to `[B, Lq, Lk]` -> weights in `dtype`."""
    if mask is not None:
        logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1).astype(dtype)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Softmax attention with grouped key/value heads.

    Args:
      q: `[B, Lq, H, Dh]` queries.
      k, v: `[B, Lk, Hkv, Dh]` keys and values, H a multiple of Hkv (GQA; Hkv == H is plain MHA).
      mask: bool, broadcastable to `[B, Lq, Lk]`; True where a query may attend a key. A query
        with no allowed key gets the mean of the values (finite; callers ignore such rows).

    Returns:
      `[B, Lq, H, Dh]` in q's dtype. Logits and softmax are computed in fp32.
    """
    b, lq, _, dh = q.shape
    k, v = _shared_kv(q, k, v)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (1.0 / np.sqrt(dh))
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, lq, k.shape[1]))
    return jnp.einsum("bhqk,bkhd->bqhd", _masked_softmax(logits, mask, v.dtype), v)


@jax.custom_vjp
def _softmax_attention(q: jax.Array, kt: jax.Array, vt: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T, masked) v in the heads-major layout, with a backward that never reduces
    over the `[Lq, Lk]` weights: it saves the unnormalized weights and their row sums, divides
    the `[Lq, Dh]` output instead of the weights, and takes the softmax's backward through
    `rowsum(dO * O)` (as FlashAttention does). The same math as `_masked_softmax` and two
    einsums; at the demo's shapes ~0.4x their autodiff's time forward + backward (BENCHMARKS.md).

    Keys and values come transposed, `[Dh, Lk]` per head, so that the backward's dK^T = Q^T dS
    and dV^T = dO^T P come out in their own layout, with the `[Lq, Lk]` operand on the right;
    written for `[Lk, Dh]` it is a transposed left operand, and XLA:CPU's batched matmuls ran
    ~1.8x as long (at the demo's shapes).
    The mask enters the forward as an additive bias (0 or the fp32 minimum), which XLA:CPU fuses
    into the logits' matmul; `where(mask, logits, min)` was one more pass over `[Lq, Lk]` there,
    and both give the same logits (adding the minimum to any logit under ~1e31 rounds to it).

    Args:
      q: `[B, H, Lq, Dh]` queries, already scaled by 1 / sqrt(Dh).
      kt, vt: `[B, H, Dh, Lk]` keys and values, transposed; q's dtype.
      mask: bool `[B or 1, Lq, Lk]`; a query with no allowed key gets the mean of the values.

    Returns:
      `[B, H, Lq, Dh]` in q's dtype. Logits, weights, their sums and the softmax's backward are
      fp32; the matmuls take operands in q's dtype and accumulate in fp32, both ways.
    """
    return _softmax_attention_fwd(q, kt, vt, mask)[0]


def _dot(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _softmax_attention_fwd(q, kt, vt, mask):
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # [B or 1, 1, Lq, Lk]
    logits = _dot("bhqd,bhdk->bhqk", q, kt, q.dtype) + bias
    weights = jnp.exp(logits - logits.max(-1, keepdims=True))  # unnormalized
    total = weights.sum(-1, keepdims=True)  # [B, H, Lq, 1]
    out = (_dot("bhqk,bhdk->bhqd", weights, vt, q.dtype) / total).astype(q.dtype)
    return out, (q, kt, vt, mask, weights, total, out)


def _softmax_attention_bwd(residuals, grad_out):
    q, kt, vt, mask, weights, total, out = residuals
    dtype = q.dtype
    grad_scaled = grad_out.astype(jnp.float32) / total  # dO / rowsum: the weights' normalization
    grad_vt = _dot("bhqd,bhqk->bhdk", grad_scaled, weights, dtype)
    grad_weights = _dot("bhqd,bhdk->bhqk", grad_scaled, vt, dtype)
    # softmax backward: dS = P * (dP - rowsum(P * dP)), and rowsum(P * dP) = rowsum(dO * O).
    delta = (grad_scaled * out.astype(jnp.float32)).sum(-1, keepdims=True)
    # Masked keys get no gradient (as through `where`), also in a row with no allowed key.
    grad_logits = jnp.where(mask[:, None], weights * (grad_weights - delta), 0.0)
    grad_q = _dot("bhqk,bhdk->bhqd", grad_logits, kt, dtype)
    grad_kt = _dot("bhqd,bhqk->bhdk", q, grad_logits, dtype)
    return grad_q.astype(dtype), grad_kt.astype(dtype), grad_vt.astype(dtype), None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, chunk: int
) -> jax.Array:
    """`dot_product_attention` for causal self-attention (Lq == Lk, query i at key slot i) that
    skips the all-masked upper blocks: query rows go in chunks of `chunk`, each attending only
    to the keys up to its last row. Same result (except in a row with no allowed key: the mean
    of its block's keys' values), about half the attention FLOPs at long L; each block through
    `_softmax_attention`.

    Shapes as in `dot_product_attention`; `mask` `[B or 1, L, L]`. chunk <= 0 or >= L: one block.
    """
    length, dh = q.shape[1], q.shape[3]
    if chunk <= 0 or chunk >= length:
        chunk = length
    k, v = _shared_kv(q, k, v)
    # Heads-major once for all chunks: each chunk's dots in the `[B, L, H, Dh]` layout made XLA:CPU
    # transpose its query rows and all its keys and values again, forward and backward (at the
    # demo's shapes the attention took ~1.7x as long; BENCHMARKS.md).
    q = q.transpose(0, 2, 1, 3) * jnp.asarray(1.0 / np.sqrt(dh), q.dtype)  # [B, H, L, Dh]
    kt, vt = (x.transpose(0, 2, 3, 1) for x in (k, v))  # [B, H, Dh, L]
    outs = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        outs.append(_softmax_attention(q[:, :, start:end], kt[..., :end], vt[..., :end], mask[:, start:end, :end]))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------------------------
# Pre-LN ViT encoder block (CLIP and DINOv2)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2. `[..., D] -> [..., D]`."""

    hidden: int
    activation: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        x = ACTIVATIONS[self.activation](x)
        return Dense(d, ("mlp", "embed"), dtype=self.dtype, name="fc2")(x)


class LayerScale(nn.Module):
    """DINOv2's per-channel residual-branch scale. `[..., D]`."""

    init_value: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param(
            "scale", partitioned(nn.initializers.constant(self.init_value), ("embed",)), (x.shape[-1],), jnp.float32
        )
        return x * gamma.astype(x.dtype)


class ViTBlock(nn.Module):
    """Pre-LN transformer encoder block, scan-compatible: `(x, _) -> (x, None)`, x `[B, L, D]`."""

    num_heads: int
    mlp_dim: int
    activation: str
    layer_norm_eps: float
    layer_scale: float | None = None  # None: no LayerScale (CLIP); a value: its init (DINOv2)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, _=None):
        d = x.shape[-1]
        hd = d // self.num_heads
        y = LayerNorm(self.layer_norm_eps, self.dtype, name="ln1")(x)
        q = HeadsProjection(self.num_heads, hd, dtype=self.dtype, name="q")(y)
        k = HeadsProjection(self.num_heads, hd, dtype=self.dtype, name="k")(y)
        v = HeadsProjection(self.num_heads, hd, dtype=self.dtype, name="v")(y)
        y = HeadsOutput(d, dtype=self.dtype, name="o")(dot_product_attention(q, k, v))
        if self.layer_scale is not None:
            y = LayerScale(self.layer_scale, name="ls1")(y)
        x = x + y
        y = LayerNorm(self.layer_norm_eps, self.dtype, name="ln2")(x)
        y = Mlp(self.mlp_dim, self.activation, self.dtype, name="mlp")(y)
        if self.layer_scale is not None:
            y = LayerScale(self.layer_scale, name="ls2")(y)
        x = x + y
        x = nn.with_logical_constraint(x, ("batch", "length", "embed_act"))
        return x, None


def stacked(block_cls: type[nn.Module], num_layers: int, remat: str, in_axes=0, unroll: int = 1) -> type[nn.Module]:
    """Wraps a `(carry, xs, ...) -> (carry, ys)` block in nn.remat and nn.scan over `num_layers`.

    Stacked params gain a leading `layers` axis. `remat` is a key of REMAT_POLICIES; `in_axes`
    as in nn.scan (0 for per-layer inputs, nn.broadcast for inputs shared by all layers).
    `unroll` layers run per loop iteration; the params keep the stacked layout either way. A
    rolled scan zero-fills its stacked residual buffers on every call, which for a few small
    layers on CPU costs more than the unrolled code it saves.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose from {sorted(REMAT_POLICIES)}")
    if remat != "none":
        block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=in_axes,
        length=num_layers,
        unroll=max(1, min(unroll, num_layers)),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


# ----------------------------------------------------------------------------------------------
# Position-table interpolation (torch's bicubic, as HF transformers applies it)


def _cubic(x: float, a: float) -> float:
    """Keys' cubic convolution kernel with parameter a."""
    x = abs(x)
    if x < 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2.0:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def bicubic_matrix(in_size: int, out_size: int, scale: float | None = None) -> np.ndarray:
    """`[out, in]` matrix M with `M @ x` == torch `interpolate(x, mode='bicubic', align_corners=False)`.

    `scale` is torch's source step per output pixel: `in/out` for `size=` (HF's mode), or
    `1/scale_factor` when a scale factor is given (Meta DINOv2's offset mode). Border taps are
    clamped and the kernel is Keys' with a=-0.75, as torch does; no antialiasing.
    """
    scale = in_size / out_size if scale is None else scale
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        x = (i + 0.5) * scale - 0.5
        x0 = int(np.floor(x))
        t = x - x0
        for k in range(-1, 3):
            m[i, min(max(x0 + k, 0), in_size - 1)] += _cubic(k - t, -0.75)
    return m


def bicubic_antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out, in]` matrix of torch's `interpolate(..., mode='bicubic', antialias=True)` (`size=`).

    torch's antialiased path follows PIL: Keys' kernel with a=-0.5, widened by the downscale
    factor, taps normalized to sum to one.
    """
    scale = in_size / out_size
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = np.array([_cubic((j + lo - center + 0.5) * inv, -0.5) for j in range(hi - lo)])
        m[i, lo:hi] = w / w.sum()
    return m


POS_INTERPOLATIONS = ("hf", "hf_antialias", "meta")


def pos_interpolation_matrix(n: int, out: int, mode: str) -> np.ndarray:
    """`[out, n]` resize matrix for one axis of a position grid.

    hf: HF transformers' Dinov2/CLIP (`size=`, bicubic); hf_antialias: HF's Dinov2WithRegisters
    (same with antialias=True); meta: Meta's DINOv2 (`scale_factor=(out+0.1)/n`).
    """
    if mode == "hf":
        return bicubic_matrix(n, out)
    if mode == "hf_antialias":
        return bicubic_antialias_matrix(n, out)
    if mode == "meta":
        return bicubic_matrix(n, out, n / (out + 0.1))
    raise ValueError(f"unknown position interpolation {mode!r}; choose from {POS_INTERPOLATIONS}")


def interpolate_pos_table(table: jax.Array, new_hw: tuple[int, int], mode: str = "hf") -> jax.Array:
    """Resizes a square position table `[n*n, D]` to `[h*w, D]` (row-major grid), bicubic.

    The resize matrices are host constants, so the op is two small matmuls and gradients reach the
    table. Identity when the grid already matches (as in HF and Meta).
    """
    n = int(round(np.sqrt(table.shape[0])))
    if n * n != table.shape[0]:
        raise ValueError(f"position table of {table.shape[0]} rows is not a square grid")
    h, w = new_hw
    if (h, w) == (n, n):
        return table
    mh = jnp.asarray(pos_interpolation_matrix(n, h, mode), jnp.float32)
    mw = jnp.asarray(pos_interpolation_matrix(n, w, mode), jnp.float32)
    grid = table.astype(jnp.float32).reshape(n, n, -1)
    out = jnp.einsum("oh,hwd,pw->opd", mh, grid, mw, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(h * w, -1).astype(table.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv. `[B, H, W, 3] -> [B, H/p, W/p, D]`."""

    patch_size: int
    features: int
    use_bias: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        b, h, w, c = images.shape
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        kernel = self.param(
            "kernel",
            partitioned(nn.initializers.lecun_normal(), ("patch_h", "patch_w", "channels", "embed")),
            (p, p, c, self.features),
            jnp.float32,
        )
        # A stride-p conv is a matmul over flattened patches: cheaper to compile and exact.
        x = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
        y = jnp.einsum("bhpwqc,pqcd->bhwd", x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def sincos_position_init(grid: int) -> Initializer:
    """Initializer of a `[grid**2 + 1, D]` ViT position table: a zero CLS row, then the 2-D sin-cos
    table of MAE / big_vision's `posemb_sincos_2d` (half the channels encode the row, half the
    column, each as sines and cosines of geometric frequencies). Models trained from scratch then
    know where every patch is from the first step; pretrained weights replace it anyway."""

    def init(key, shape, dtype=jnp.float32):
        rows, d = shape
        if rows != grid * grid + 1 or d % 4:
            raise ValueError(f"sin-cos table needs shape ({grid * grid + 1}, 4k), got {shape}")
        omega = 1.0 / 10000.0 ** (np.arange(d // 4) / (d // 4))
        y, x = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
        parts = [f(c.reshape(-1)[:, None] * omega[None]) for c in (y, x) for f in (np.sin, np.cos)]
        table = np.concatenate([np.zeros((1, d)), np.concatenate(parts, axis=1)], axis=0)
        return jnp.asarray(table, dtype)

    return init


def vit_embed(
    module: nn.Module,
    images: jax.Array,
    *,
    patch_size: int,
    pretrained_grid: int,
    patch_bias: bool,
    pos_interpolation: str,
    dtype: Dtype,
) -> tuple[jax.Array, jax.Array, tuple[int, int]]:
    """ViT input tokens, created inside `module`'s compact scope (params `patch_embed`, `cls`,
    `pos_embed` of `module`, the names the converters map HF tensors onto).

    `[B, H, W, 3]` -> (CLS token with its position `[B, 1, D]`, patch tokens with positions
    resized to the `(H/p, W/p)` grid `[B, N, D]`, that grid).
    """
    d = module.config.hidden_size
    x = PatchEmbed(patch_size, d, use_bias=patch_bias, dtype=dtype, name="patch_embed")(images)
    b, gh, gw, _ = x.shape
    normal = nn.initializers.normal(0.02)
    cls = module.param("cls", partitioned(normal, ("embed",)), (d,), jnp.float32)
    pos_init = sincos_position_init(pretrained_grid)
    pos = module.param("pos_embed", partitioned(pos_init, ("pos", "embed")), (pretrained_grid**2 + 1, d), jnp.float32)
    patch_pos = interpolate_pos_table(pos[1:], (gh, gw), pos_interpolation)
    cls_token = jnp.broadcast_to((cls + pos[0]).astype(dtype), (b, 1, d))
    return cls_token, x.reshape(b, gh * gw, d) + patch_pos.astype(dtype), (gh, gw)
