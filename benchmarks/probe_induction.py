"""Can the demo's decoder form a copying circuit that needs two attention steps? A control probe.

`probe_name_lookup.py` finds the demo-sized LLaMA slow to learn lookups where the token that
writes a box must first fetch the name from the tokens before it. This control gives the same
model (3 layers, 4 heads, hidden 128, MLP 352) the classic induction task: a random sequence of
`--length` tokens, a random filler, then the sequence again at a random offset. Predicting the
repeat needs a previous-token head and a head matching on it (two attention steps, as the
lookup does), but every token of the repeat is such a decision (`--length` per sequence, against
one per scene in the grounding turn). Reports the repeat's next-token accuracy as it trains.

  python benchmarks/probe_induction.py [--steps 2000 --batch 16 --length 24]

The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ferret_jax.models.llama import Llama, LlamaConfig

VOCAB, FILLER = 64, 12


def sequences(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """`[B, 2 * length + FILLER]`: a random filler of 0..FILLER-1 tokens, the sequence, the rest of
    the filler, the sequence again (so the repeat's offset differs per row)."""
    rows = []
    for _ in range(batch):
        seq = rng.integers(1, VOCAB, length)
        before = int(rng.integers(0, FILLER))
        rows.append(np.concatenate([rng.integers(1, VOCAB, before), seq, rng.integers(1, VOCAB, FILLER - before), seq]))
    return np.stack(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    repeat = args.length + FILLER  # the repeat's first token (not predictable); scored from the next on
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_layers=3, num_heads=4,
                         num_kv_heads=4, max_position_embeddings=128, scan_unroll=3)
    model = Llama(config)
    rng = np.random.default_rng(args.seed)
    params = model.init(jax.random.PRNGKey(args.seed), sequences(rng, 1, args.length)[:, :-1])
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 20), args.steps)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = opt.init(params)

    def loss_fn(params, tokens):
        logits = model.apply(params, tokens[:, :-1])[0][:, repeat:]
        targets = tokens[:, repeat + 1 :]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return loss, (jnp.argmax(logits, -1) == targets).mean()

    @jax.jit
    def step(params, opt_state, tokens):
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    held_out = sequences(np.random.default_rng(10_000 + args.seed), 256, args.length)
    evaluate = jax.jit(lambda params: loss_fn(params, held_out)[1])
    start, first_above = time.time(), None
    for i in range(1, args.steps + 1):
        params, opt_state, loss, _ = step(params, opt_state, sequences(rng, args.batch, args.length))
        if i % max(1, args.steps // 20) == 0 or i == args.steps:
            accuracy = float(evaluate(params))
            if first_above is None and accuracy >= 0.9:
                first_above = i
            print(f"step {i}/{args.steps} loss {float(loss):.3f} | repeat tokens right {accuracy:.3f} "
                  f"(chance {1 / (VOCAB - 1):.3f}) | {time.time() - start:.0f}s", flush=True)
    print(json.dumps({**vars(args), "held_out_accuracy": accuracy, "first_step_at_0.9": first_above,
                      "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
