"""Shared layers: attention variants agree; the fp32 token loss is the textbook cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferret_jax.losses import supervised_token_loss, token_cross_entropy
from ferret_jax.models import layers


def _qkv(seed, b=2, length=37, h=4, hkv=2, dh=8):
    r = np.random.RandomState(seed)
    return (jnp.asarray(r.randn(b, length, h, dh), jnp.float32),
            jnp.asarray(r.randn(b, length, hkv, dh), jnp.float32),
            jnp.asarray(r.randn(b, length, hkv, dh), jnp.float32))


def _reference_attention(q, k, v, mask):
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, 2), np.repeat(v, g, 2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[:, None], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def test_gqa_attention_matches_reference():
    q, k, v = _qkv(0)
    mask = np.random.RandomState(1).rand(2, 37, 37) > 0.3
    mask[:, :, 0] = True
    out = layers.dot_product_attention(q, k, v, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), _reference_attention(*map(np.asarray, (q, k, v)), mask), atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 3, 8, 36, 37, 64])
def test_block_causal_equals_full_causal(chunk):
    q, k, v = _qkv(2)
    causal = np.tril(np.ones((37, 37), bool))[None]
    pad = np.ones((2, 37), bool)
    pad[1, 30:] = False  # a padded tail must not change the valid rows
    mask = jnp.asarray(causal & pad[:, None, :])
    full = jax.jit(layers.dot_product_attention)
    blocked = jax.jit(layers.causal_attention, static_argnums=4)
    np.testing.assert_allclose(np.asarray(blocked(q, k, v, mask, chunk)), np.asarray(full(q, k, v, mask)), atol=1e-6)
    # gradients agree too, for queries, keys and values (the block path is what training
    # differentiates; keys and values are shared by blocks of different lengths)
    grad = lambda fn: jax.jit(jax.grad(lambda *qkv: (fn(*qkv) ** 2).sum(), argnums=(0, 1, 2)))(q, k, v)  # noqa: E731
    blocked_grads = grad(lambda q, k, v: layers.causal_attention(q, k, v, mask, chunk))
    full_grads = grad(lambda q, k, v: layers.dot_product_attention(q, k, v, mask))
    for name, g_blocked, g_full in zip("qkv", blocked_grads, full_grads):
        np.testing.assert_allclose(np.asarray(g_blocked), np.asarray(g_full), atol=1e-5, err_msg=f"d{name}")


def _attention_grads(fn, q, k, v, g):
    """(dq, dk, dv) of sum(fn(q, k, v) * g), jitted."""
    return jax.jit(jax.grad(lambda *qkv: (fn(*qkv) * g).sum(), argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("chunk", [0, 4])
def test_causal_attention_row_with_no_allowed_key(chunk):
    """The blocks' own backward (`_softmax_attention`) keeps `dot_product_attention`'s contract
    for a query that may attend nothing: finite output (in one block, the mean of the values)
    and no gradient through its masked logits; the other rows and all gradients as the full
    attention's autodiff (in blocks the empty row's uniform weights cover its block's keys only,
    so its own output and its share of dv differ from the full attention's)."""
    q, k, v = _qkv(5, b=2, length=12, h=2, hkv=2, dh=4)
    mask = np.tril(np.ones((12, 12), bool))[None].repeat(2, 0)
    mask[0, 7] = False  # example 0, query 7: no key
    mask[1, :, 0] = False  # example 1: key 0 hidden from all, so query 0 has none
    mask = jnp.asarray(mask)
    out = np.asarray(jax.jit(layers.causal_attention, static_argnums=4)(q, k, v, mask, chunk))
    full_out = np.asarray(layers.dot_product_attention(q, k, v, mask))
    assert np.isfinite(out).all()
    if chunk == 0:
        np.testing.assert_allclose(out[0, 7], np.asarray(v).mean(1)[0], atol=1e-6)
        np.testing.assert_allclose(out[1, 0], np.asarray(v).mean(1)[1], atol=1e-6)
    g = np.random.RandomState(6).randn(*q.shape).astype(np.float32)
    g[0, 7] = g[1, 0] = 0.0  # callers ignore empty rows: their cotangent is zero
    g = jnp.asarray(g)
    keep = np.ones(out.shape[:2], bool)
    keep[0, 7] = keep[1, 0] = False
    np.testing.assert_allclose(out[keep], full_out[keep], atol=1e-6)
    blocked = _attention_grads(lambda q, k, v: layers.causal_attention(q, k, v, mask, chunk), q, k, v, g)
    full = _attention_grads(lambda q, k, v: layers.dot_product_attention(q, k, v, mask), q, k, v, g)
    for name, a, b in zip("qkv", blocked, full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=f"d{name}")
    # with a cotangent on the empty row: still nothing to q or k through its masked logits
    g_empty = jnp.zeros_like(q).at[0, 7].set(1.0).at[1, 0].set(1.0)
    dq, dk, _ = _attention_grads(lambda q, k, v: layers.causal_attention(q, k, v, mask, chunk), q, k, v, g_empty)
    assert not np.asarray(dq).any() and not np.asarray(dk).any()


@pytest.mark.parametrize("policy", sorted(p for p, fn in layers.REMAT_POLICIES.items() if fn is not None))
def test_causal_attention_gradients_under_remat(policy):
    """Under each remat policy the stacked layers use, the blocks' custom backward gives the
    full attention's autodiff gradients."""
    q, k, v = _qkv(7, b=2, length=20, h=4, hkv=2, dh=8)
    mask = jnp.asarray(np.tril(np.ones((20, 20), bool))[None])
    g = jnp.asarray(np.random.RandomState(8).randn(*q.shape), jnp.float32)
    rematted = jax.checkpoint(lambda q, k, v: layers.causal_attention(q, k, v, mask, 8), policy=layers.REMAT_POLICIES[policy])
    full = _attention_grads(lambda q, k, v: layers.dot_product_attention(q, k, v, mask), q, k, v, g)
    for name, a, b in zip("qkv", _attention_grads(rematted, q, k, v, g), full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=f"d{name}")


def test_causal_attention_bf16():
    """bf16 in, bf16 out and bf16 gradients (weights, their sums and the softmax backward in
    fp32 inside), all within bf16 rounding of the fp32 attention's."""
    q, k, v = _qkv(9, b=2, length=24, h=4, hkv=4, dh=8)
    mask = jnp.asarray(np.tril(np.ones((24, 24), bool))[None])
    g = jnp.asarray(np.random.RandomState(10).randn(*q.shape), jnp.float32)
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = layers.causal_attention(*half, mask, 8)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(layers.dot_product_attention(q, k, v, mask)), atol=3e-2)
    grads = _attention_grads(lambda q, k, v: layers.causal_attention(q, k, v, mask, 8).astype(jnp.float32), *half, g)
    full = _attention_grads(lambda q, k, v: layers.dot_product_attention(q, k, v, mask), q, k, v, g)
    for name, a, b in zip("qkv", grads, full):
        assert a.dtype == jnp.bfloat16, name
        err = np.abs(np.asarray(a, np.float32) - np.asarray(b)).max()
        assert err <= 0.03 * np.abs(np.asarray(b)).max(), f"d{name}: {err}"


def test_token_cross_entropy():
    r = np.random.RandomState(3)
    logits = r.randn(2, 5, 11).astype(np.float32) * 3
    targets = r.randint(0, 11, (2, 5))
    mask = (r.rand(2, 5) > 0.5).astype(np.float32)
    loss, correct = token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask
    np.testing.assert_allclose(np.asarray(loss), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(correct), (logits.argmax(-1) == targets) * mask)
    # bf16 logits still give an fp32 loss
    loss16, _ = token_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
    assert loss16.dtype == jnp.float32


@pytest.mark.parametrize("row_counts", [(3, 5, 0), (3, 9, 2)], ids=["rows_fit", "one_row_over"])
def test_supervised_token_loss_equals_the_loss_at_all_positions(row_counts):
    """The head at each row's first K supervised positions (K = 6; when a row has more, at all
    of them): the same loss and correct-token sums, and the same gradients, as at all positions."""
    r = np.random.RandomState(4)
    b, length, d, v = 3, 20, 8, 13
    hidden = jnp.asarray(r.randn(b, length, d), jnp.float32)
    w = jnp.asarray(r.randn(d, v), jnp.float32)
    targets = jnp.asarray(r.randint(0, v, (b, length)))
    mask = np.zeros((b, length), np.float32)
    for row, n in enumerate(row_counts):
        mask[row, r.choice(length, n, replace=False)] = 1.0
    mask = jnp.asarray(mask)

    def sums(w, hidden, positions):
        return supervised_token_loss(lambda h: jnp.tanh(h) @ w, hidden, targets, mask, positions)

    ref_loss, ref_correct = sums(w, hidden, 0)
    loss, correct = sums(w, hidden, 6)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    assert float(correct) == float(ref_correct)
    ref_loss_manual, _ = token_cross_entropy(jnp.tanh(hidden) @ w, targets, mask)
    np.testing.assert_allclose(float(ref_loss), float(ref_loss_manual.sum()), rtol=1e-6)
    grads = jax.grad(lambda w, h: sums(w, h, 6)[0], argnums=(0, 1))(w, hidden)
    ref_grads = jax.grad(lambda w, h: sums(w, h, 0)[0], argnums=(0, 1))(w, hidden)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(ref_grads[1]).sum()) > 0


def test_sincos_position_init_encodes_row_and_column():
    from ferret_jax.models.layers import sincos_position_init

    grid, d = 5, 16
    table = np.asarray(sincos_position_init(grid)(jax.random.key(0), (grid * grid + 1, d)))
    assert (table[0] == 0).all()  # CLS
    patches = table[1:].reshape(grid, grid, d)
    # the first half depends on the row only, the second on the column only
    assert np.allclose(patches[:, :1, : d // 2], patches[:, :, : d // 2]) and np.allclose(patches[:1, :, d // 2 :], patches[:, :, d // 2 :])
    flat = table[1:]
    assert len({tuple(np.round(r, 6)) for r in flat}) == grid * grid  # every patch distinct
    with pytest.raises(ValueError, match="sin-cos"):
        sincos_position_init(grid)(jax.random.key(0), (grid * grid, d))
