"""Training losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-token next-token cross-entropy in fp32.

    Args:
      logits: `[B, L, V]`; targets: int `[B, L]`; mask: `[B, L]` weights (1 = supervised).

    Returns:
      (loss `[B, L]` already multiplied by the mask, token accuracy `[B, L]` likewise).
      logsumexp minus the target logit: no `[B, L, V]` log-probability array is materialized,
      which matters on CPU and for large vocabularies. A token counts as correct when its logit
      is the maximum (a max, where XLA:CPU computes an argmax's (value, index) pair slowly).
    """
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = jax.nn.logsumexp(logits, axis=-1) - target_logit
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    if mask is not None:
        mask = mask.astype(jnp.float32)
        loss, correct = loss * mask, correct * mask
    return loss, correct
