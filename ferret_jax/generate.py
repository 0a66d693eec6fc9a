"""Autoregressive decoding with a KV cache: greedy, temperature and nucleus (top-p) sampling.

Prompts arrive right-padded, as the batch contract has them (`tokens [B, L]` with a per-row
`prompt_length`). Inside the jit every row is rolled so its prompt ends at slot L-1 (left
padding): one prefill over the L slots then serves all rows, and step t writes slot L-1+t for
every row alike. Per row, RoPE positions start at 0 on its first real token and `kv_mask` hides
the left pad, so a row decodes exactly as it would alone.

  prefill  slots [0, L)        positions max(slot - pad, 0)    -> token 0
  step t   slot L-1+t (t >= 1) position prompt_length-1+t      -> token t

Everything is static-shaped: one `jax.lax.while_loop` over at most `max_new_tokens` steps, which
stops early once every row has emitted eos. Finished rows emit pad (0) and keep their length.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ferret_jax.models.ferret import Ferret
from ferret_jax.models.llama import Llama, init_kv_cache

PAD_ID = 0  # what a finished row emits (LLaMA's unk, Ferret's pad)
BATCH_AXES = ("data", "fsdp")  # the trainer's batch sharding
# The keys of the batch contract that `Ferret.embed_inputs` reads, plus the prompt lengths.
PROMPT_KEYS = (
    "global_image", "tiles", "grid", "tokens", "visual_index", "region_index", "region_points", "region_valid",
    "prompt_length",
)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How tokens are picked. Hashable: it is a static argument of the jitted loop."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    eos_id: int = 2  # end-of-turn token (</s>); negative: never stop early

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)):
            raise ValueError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.eos_id, bool) or not isinstance(self.eos_id, (int, np.integer)):
            raise ValueError(f"eos_id must be an int, got {self.eos_id!r}")


# ----------------------------------------------------------------------------------------------
# Token choice


def nucleus_logits(logits: jax.Array, top_p: float) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose probability mass reaches `top_p` (at
    least the most likely one); the others get -inf. fp32 `[B, V] -> [B, V]`."""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: the first has mass 0 before it
    threshold = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def argmax(logits: jax.Array) -> jax.Array:
    """`jnp.argmax` over the last axis (first index of the maximum), int32 `[B, V] -> [B]`.

    As a max and a min over the matching indices: two plain reductions, which XLA:CPU vectorizes;
    argmax's (value, index) pair reduction is not, and cost 4x more at V = 32000.
    """
    vocab = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.min(jnp.where(logits == top, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
    return jnp.minimum(index, vocab - 1)  # NaN logits match nothing: stay in the vocabulary


def choose_tokens(logits: jax.Array, sampling: Sampling, rng: jax.Array) -> jax.Array:
    """fp32 logits `[B, V]` -> int32 token ids `[B]`: argmax at temperature 0, else a sample of
    softmax(logits / temperature), restricted to the top-p nucleus when top_p < 1."""
    if sampling.temperature == 0.0:
        return argmax(logits)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1.0:
        logits = nucleus_logits(logits, sampling.top_p)
    # Gumbel-max, as jax.random.categorical samples, with the vectorized argmax.
    return argmax(logits + jax.random.gumbel(rng, logits.shape, jnp.float32))


# ----------------------------------------------------------------------------------------------
# The loop


def left_align(x: jax.Array, prompt_lengths: jax.Array) -> jax.Array:
    """Rolls each right-padded row of `x [B, L, ...]` right by its padding, so its prompt ends at
    slot L-1 and the padding comes first. `prompt_lengths [B]` in [1, L]."""
    length = x.shape[1]
    pad = length - prompt_lengths
    index = (jnp.arange(length)[None, :] - pad[:, None]) % length  # [B, L]
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _concrete(x) -> np.ndarray | None:
    """x as a numpy array, or None while it is being traced (values unknown)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_prompts(length: int, prompt_lengths, batch: int | None = None) -> None:
    """Raises ValueError unless `prompt_lengths` is `[B]` with values in [1, L] (values are only
    checked when known, i.e. outside a jit)."""
    shape = np.shape(prompt_lengths)
    if len(shape) != 1 or (batch is not None and shape[0] != batch):
        want = f"[{batch}]" if batch is not None else "[B]"
        raise ValueError(f"prompt_lengths must have shape {want}, got {list(shape)}")
    if not jnp.issubdtype(jnp.result_type(prompt_lengths), jnp.integer):
        raise ValueError(f"prompt_lengths must be integers, got {jnp.result_type(prompt_lengths)}")
    values = _concrete(prompt_lengths)
    if values is not None and values.size and (values.min() < 1 or values.max() > length):
        raise ValueError(f"prompt_lengths must be in [1, {length}] (the padded prompt length), got {values.tolist()}")


def decode(
    llm_apply: Callable[..., tuple[jax.Array, Any]],
    embeddings: jax.Array,
    prompt_lengths: jax.Array,
    sampling: Sampling,
    rng: jax.Array,
    cache_init: Callable[[int, int], Any],
) -> dict[str, jax.Array]:
    """Generates up to `sampling.max_new_tokens` tokens after each prompt.

    Args:
      llm_apply: the decoder, `llm_apply(tokens=None, *, embeddings=None, positions, kv_mask,
        cache, cache_index, logits_to_keep=0) -> (fp32 logits [B, T, V], cache)` as
        `Llama.__call__` with its params bound.
      embeddings: `[B, L, D]` right-padded prompt embeddings.
      prompt_lengths: int `[B]`, tokens of each prompt before its padding, in [1, L].
      sampling: the static decoding settings.
      rng: PRNG key (unused when greedy); step t samples with `fold_in(rng, t)`.
      cache_init: `(batch, slots) -> empty KV cache`.

    Returns:
      `tokens` int32 `[B, N]` (N = max_new_tokens; PAD_ID after a row's eos), `lengths` int32 `[B]`
      (tokens generated per row, eos included), `finished` bool `[B]` (the row emitted eos),
      `steps` int32 scalar (decoder calls after the prefill).
    """
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be [B, L, D], got shape {list(embeddings.shape)}")
    b, length, _ = embeddings.shape
    check_prompts(length, prompt_lengths, b)
    n = sampling.max_new_tokens
    prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)

    # Slots: [0, L) the left-aligned prompts, then one per fed-back token (the last is never fed).
    slots = length + n - 1
    pad = length - prompt_lengths  # [B]
    kv_mask = jnp.arange(slots)[None, :] >= pad[:, None]  # [B, S]
    positions = jnp.maximum(jnp.arange(length)[None, :] - pad[:, None], 0)  # [B, L]

    logits, cache = llm_apply(
        embeddings=left_align(embeddings, prompt_lengths), positions=positions, kv_mask=kv_mask,
        cache=cache_init(b, slots), cache_index=0, logits_to_keep=1,
    )
    vocab = logits.shape[-1]
    if sampling.eos_id >= vocab:
        raise ValueError(f"eos_id {sampling.eos_id} is outside the vocabulary (size {vocab})")
    first = choose_tokens(logits[:, -1], sampling, jax.random.fold_in(rng, 0))
    finished = first == sampling.eos_id
    tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(first)

    def cond(carry):
        t, _, _, finished, _, _ = carry
        return (t < n) & ~jnp.all(finished)

    def step(carry):
        t, cache, last, finished, tokens, lengths = carry
        logits, cache = llm_apply(
            last[:, None], positions=(prompt_lengths + t - 1)[:, None], kv_mask=kv_mask, cache=cache,
            cache_index=length + t - 1,
        )
        new = choose_tokens(logits[:, 0], sampling, jax.random.fold_in(rng, t))
        new = jnp.where(finished, PAD_ID, new)
        tokens = jax.lax.dynamic_update_slice(tokens, new[:, None], (0, t))
        lengths = lengths + (~finished).astype(jnp.int32)
        return t + 1, cache, new, finished | (new == sampling.eos_id), tokens, lengths

    carry = (jnp.int32(1), cache, first, finished, tokens, jnp.ones((b,), jnp.int32))
    t, _, _, finished, tokens, lengths = jax.lax.while_loop(cond, step, carry)
    return {"tokens": tokens, "lengths": lengths, "finished": finished, "steps": t - 1}


# ----------------------------------------------------------------------------------------------
# Entry points


def _rng(rng) -> jax.Array:
    return jax.random.key(0) if rng is None else rng


def _cache_init(llm: Llama, sharding: NamedSharding | None = None) -> Callable[[int, int], Any]:
    """Cache in the decoder's compute dtype; with a sharding, pinned to it (batch-sharded)."""

    def init(batch: int, slots: int):
        cache = init_kv_cache(llm.config, batch, slots, jnp.dtype(llm.config.dtype))
        if sharding is not None:
            cache = jax.lax.with_sharding_constraint(cache, sharding)
        return cache

    return init


def _llm_apply(llm: Llama, llm_params) -> Callable[..., tuple[jax.Array, Any]]:
    return functools.partial(llm.apply, {"params": llm_params})


def _decode_llama(llm: Llama, llm_params, tokens, prompt_lengths, sampling: Sampling, rng) -> dict:
    embeddings = llm.apply({"params": llm_params}, tokens, method=Llama.embed)
    return decode(_llm_apply(llm, llm_params), embeddings, prompt_lengths, sampling, rng, _cache_init(llm))


_decode_llama_jit = jax.jit(_decode_llama, static_argnums=(0, 4))


def llama_generate(llm: Llama, llm_params, tokens, prompt_lengths, sampling: Sampling, rng=None) -> dict:
    """`decode` for a bare decoder on token prompts, jitted (one compile per shape and Sampling).

    Args:
      tokens: int `[B, L]` right-padded prompts; prompt_lengths: int `[B]` in [1, L].

    Returns:
      As `decode`.
    """
    if np.ndim(tokens) != 2:
        raise ValueError(f"tokens must be [B, L], got shape {list(np.shape(tokens))}")
    check_prompts(np.shape(tokens)[1], prompt_lengths, np.shape(tokens)[0])
    return _decode_llama_jit(llm, llm_params, tokens, prompt_lengths, sampling, _rng(rng))


def _prompt_batch(batch: dict) -> dict:
    """The arrays of a prompt batch the model reads; checks that they are there and agree."""
    missing = [k for k in PROMPT_KEYS if k not in batch]
    if missing:
        raise ValueError(f"prompt batch lacks {missing} (build prompts with data_pipelines.example.build_prompt)")
    if np.ndim(batch["tokens"]) != 2:
        raise ValueError(f"batch['tokens'] must be [B, L], got shape {list(np.shape(batch['tokens']))}")
    b, length = np.shape(batch["tokens"])
    check_prompts(length, batch["prompt_length"], b)
    return {k: batch[k] for k in PROMPT_KEYS}


def generate(model: Ferret, params, batch: dict, sampling: Sampling, rng=None, cache_sharding=None) -> dict:
    """Ferret-v2 decoding on a prompt batch of the contract (stacked `build_prompt` outputs).

    The prompt embeddings (visual tokens and region features included) come from
    `Ferret.embed_inputs`; the generated tokens are embedded by the `llm` submodule (params
    `params['llm']`). `cache_sharding` optionally pins the KV cache (`init_kv_cache`, batch on axis 1).

    Returns:
      As `decode`: `tokens [B, N]`, `lengths [B]`, `finished [B]`, `steps`.
    """
    batch = _prompt_batch(batch)
    embeddings = model.apply({"params": params}, batch, method=Ferret.embed_inputs)
    llm = Llama(model.config.llm)
    return decode(
        _llm_apply(llm, params["llm"]), embeddings, batch["prompt_length"], sampling, _rng(rng),
        _cache_init(llm, cache_sharding),
    )


# Model and sampling are static: every `make_generate` without a mesh shares one compiled program
# per (config, sampling, batch shape), e.g. the evaluations of one checkpoint on several tasks.
_generate_jit = jax.jit(generate, static_argnums=(0, 3))


def make_generate(
    model: Ferret, sampling: Sampling, mesh=None, param_shardings=None
) -> Callable[..., dict]:
    """A jitted `generate`: `fn(params, batch, rng=None) -> dict` (one compile per batch shape).

    With a mesh, the batch (and the KV cache) is split over the ('data', 'fsdp') axes as in the
    trainer, and params keep `param_shardings` (the trainer's; replicated when None), so a model
    that only fits sharded never gathers on one device.
    """
    if param_shardings is not None and mesh is None:
        raise ValueError("param_shardings need the mesh they refer to")
    if mesh is None:
        def jitted(p, b, r):
            return _generate_jit(model, p, b, sampling, r)
        batch_devices = 1
    else:
        batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
        replicated = NamedSharding(mesh, P())
        cache_sharding = NamedSharding(mesh, P(None, BATCH_AXES))
        jitted = jax.jit(
            lambda p, b, r: generate(model, p, b, sampling, r, cache_sharding),
            in_shardings=(replicated if param_shardings is None else param_shardings, batch_sharding, replicated),
            out_shardings={"tokens": batch_sharding, "lengths": batch_sharding, "finished": batch_sharding,
                           "steps": replicated},
        )
        batch_devices = math.prod(mesh.shape[a] for a in BATCH_AXES)

    def run(params, batch: dict, rng=None) -> dict:
        batch = _prompt_batch(batch)
        b = np.shape(batch["tokens"])[0]
        if b % batch_devices:
            raise ValueError(f"batch of {b} prompts is not divisible by the {batch_devices} devices of the mesh's "
                             f"data x fsdp axes")
        return jitted(params, batch, _rng(rng))

    return run
