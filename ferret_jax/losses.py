"""Training losses."""

from __future__ import annotations

import functools
from typing import Callable

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


def supervised_token_loss(
    head: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array, mask: jax.Array, positions: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Sums of `token_cross_entropy` over a batch, with logits `head(hidden)`.

    Args:
      head: `[B, K, D] -> [B, K, V]` logits (the final norm and lm_head).
      hidden: `[B, L, D]` decoder outputs; targets: int `[B, L]`; mask: `[B, L]` weights.
      positions: > 0: the head runs only at each row's first `positions` supervised positions
        (in a stage-III batch of the demo ~10% of L carry a loss; the lm_head and the loss over
        all L were ~5% of the training step). A batch where some row has more runs the head
        everywhere: the sums are the same either way. 0: everywhere.

    Returns:
      (loss sum, correct-token sum), scalars.
    """

    def at_all_positions():
        loss, correct = token_cross_entropy(head(hidden), targets, mask)
        return loss.sum(), correct.sum()

    if positions <= 0 or positions >= hidden.shape[1]:
        return at_all_positions()
    supervised = mask > 0
    index = jnp.argsort(~supervised, axis=1, stable=True)[:, :positions]  # supervised first, in order

    def at_supervised_positions():
        take = functools.partial(jnp.take_along_axis, indices=index, axis=1)
        logits = head(jnp.take_along_axis(hidden, index[..., None], axis=1))
        loss, correct = token_cross_entropy(logits, take(targets), take(mask))
        return loss.sum(), correct.sum()

    fits = jnp.all(supervised.sum(1) <= positions)
    return jax.lax.cond(fits, at_supervised_positions, at_all_positions)
