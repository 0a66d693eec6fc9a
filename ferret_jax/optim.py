"""Optimizer, learning-rate schedule and per-stage parameter masks.

Every function here is pure and looks only at parameter *paths* and *shapes*, so `params`
may be real arrays or an abstract tree of `jax.ShapeDtypeStruct` (from `jax.eval_shape`).
Params must be unboxed nested dicts (`nn.meta.unbox`); a leaf's path is its dict keys
joined by '/', e.g. 'llm/layers/q/kernel' (scanned layers are one stacked leaf `[L, ...]`).

Masks and patterns use `re.fullmatch` on those paths. Each stage of the Ferret-v2 recipe
(SPEC §6.2) is a tuple of patterns:

  stage 1: ('proj_global/.*',)
  stage 2: ('proj_global/.*', 'proj_local/.*', 'sampler/.*')
  stage 3: ('.*',)

A pattern that matches no parameter is an error: a typo would otherwise silently freeze
(or train) part of the model.

Freezing uses `optax.partition` with `optax.set_to_zero()` for the frozen group, so frozen
leaves have no optimizer state (`optax.MaskedNode` in the Adam moments). `optax.masked` is
used only to *restrict* a transform (clipping, weight decay): its masked-out leaves pass
through unchanged, so on its own it never freezes anything.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax

PyTree = Any

FROZEN = "frozen"

# Path components that name embedding-like tables or learned tokens: never weight-decayed.
# 'patch_embed' (a conv kernel) and 'lm_head' (an untied projection) are not in this set.
NO_DECAY_TABLES = frozenset({"embed", "pos_embed", "cls", "registers", "register_tokens", "mask_token"})
# Leaf names of per-channel vectors: biases, norm scales, DINOv2 LayerScale gammas. Checked by
# name because scanned layers stack them to `[L, D]`, so `ndim == 1` alone misses them.
NO_DECAY_LEAVES = frozenset({"bias", "scale"})


# ----------------------------------------------------------------------------------------------
# Paths


def _key_name(key) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    raise ValueError(
        f"params must be nested dicts of arrays, found path entry {key!r}; "
        "unbox flax metadata first with nn.meta.unbox(params)"
    )


def _flat(params: PyTree) -> tuple[list[tuple[str, Any]], Any]:
    """[(path, leaf)] in tree order, and the treedef."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    return [("/".join(_key_name(k) for k in path), leaf) for path, leaf in leaves], treedef


def _shape(leaf) -> tuple[int, ...]:
    if not hasattr(leaf, "shape"):
        raise ValueError(f"param leaf {leaf!r} has no shape (expected an array or jax.ShapeDtypeStruct)")
    return tuple(leaf.shape)


def param_paths(params: PyTree) -> PyTree:
    """Same structure as `params`, each leaf replaced by its '/'-joined path."""
    flat, treedef = _flat(params)
    return jax.tree_util.tree_unflatten(treedef, [path for path, _ in flat])


def _compile(pattern: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ValueError(f"pattern {pattern!r} is not a string")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid regex {pattern!r}: {e}") from None


def _matches(rx: re.Pattern, path: str) -> bool:
    # fullmatch: 'proj_global' must not select 'proj_global/fc1/kernel', nor 'fc1/.*' any path.
    return rx.fullmatch(path) is not None


def _examples(paths: Sequence[str], n: int = 6) -> str:
    """A few paths, spread over the top-level subtrees, for error messages."""
    by_top: dict[str, str] = {}
    for p in paths:
        by_top.setdefault(p.split("/", 1)[0], p)
    picked = list(by_top.values())[:n]
    return ", ".join(repr(p) for p in picked)


def _check_patterns(patterns) -> tuple[str, ...]:
    # A bare string would be iterated character by character: ('.*') is a str, not a tuple.
    if isinstance(patterns, (str, bytes)):
        raise ValueError(f"expected a sequence of regexes, got the single string {patterns!r}; write ({patterns!r},)")
    return tuple(patterns)


# ----------------------------------------------------------------------------------------------
# Masks


def trainable_mask(params: PyTree, patterns: Sequence[str]) -> PyTree:
    """Tree of bool: True where any regex in `patterns` fullmatches the leaf's path.

    Raises ValueError for an invalid regex, or for a pattern that matches no leaf (the
    message names the pattern and some real paths).
    """
    patterns = _check_patterns(patterns)
    compiled = [_compile(p) for p in patterns]
    flat, treedef = _flat(params)
    paths = [path for path, _ in flat]
    for pattern, rx in zip(patterns, compiled):
        if not any(_matches(rx, p) for p in paths):
            raise ValueError(
                f"trainable pattern {pattern!r} matches no parameter (fullmatch on '/'-joined paths); "
                f"example paths: {_examples(paths)}"
            )
    mask = [any(_matches(rx, p) for rx in compiled) for p in paths]
    return jax.tree_util.tree_unflatten(treedef, mask)


def lr_multiplier_tree(params: PyTree, multipliers: Mapping[str, float] | None) -> PyTree:
    """Tree of float: the multiplier of the first regex (in mapping order) that fullmatches.

    Leaves no pattern matches get 1.0. Multipliers must be finite and > 0 (freeze with
    `trainable_mask` instead). A pattern that matches no leaf, or whose every match is taken
    by an earlier pattern, raises ValueError. Frozen leaves count as matches, so one mapping
    can serve every stage.
    """
    multipliers = dict(multipliers or {})
    for pattern, m in multipliers.items():
        try:
            ok = math.isfinite(float(m)) and float(m) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"lr multiplier for {pattern!r} must be a finite number > 0, got {m!r}")
    compiled = [(p, _compile(p), float(m)) for p, m in multipliers.items()]
    flat, treedef = _flat(params)
    paths = [path for path, _ in flat]
    won = {p: 0 for p in multipliers}
    out = []
    for path in paths:
        value = 1.0
        for pattern, rx, m in compiled:
            if _matches(rx, path):
                value = m
                won[pattern] += 1
                break
        out.append(value)
    for pattern, rx, _ in compiled:
        if won[pattern]:
            continue
        if any(_matches(rx, p) for p in paths):
            raise ValueError(f"lr multiplier pattern {pattern!r}: every path it matches is taken by an earlier pattern")
        raise ValueError(
            f"lr multiplier pattern {pattern!r} matches no parameter (fullmatch on '/'-joined paths); "
            f"example paths: {_examples(paths)}"
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def _decays(path: str, leaf) -> bool:
    names = path.split("/")
    if names[-1] in NO_DECAY_LEAVES or NO_DECAY_TABLES.intersection(names):
        return False
    return len(_shape(leaf)) > 1


def decay_mask(params: PyTree) -> PyTree:
    """Tree of bool: True for the leaves that get weight decay (kernels and other matrices).

    Excluded (False):
      * leaves named 'bias' or 'scale': biases, LayerNorm/RMSNorm scales, DINOv2 LayerScale
        (`dino/layers/ls1/scale`); scanned stacks make these `[L, ...]`, hence by name;
      * embedding tables and learned tokens, i.e. any path component in `NO_DECAY_TABLES`:
        'llm/embed', 'clip/pos_embed', 'dino/pos_embed', 'clip/cls', 'dino/cls', and DINOv2
        'registers' / 'mask_token' when present;
      * any other leaf with ndim <= 1.
    Included: every kernel (incl. the conv 'patch_embed/kernel') and 'llm/lm_head'.
    """
    flat, treedef = _flat(params)
    return jax.tree_util.tree_unflatten(treedef, [_decays(path, leaf) for path, leaf in flat])


# ----------------------------------------------------------------------------------------------
# Schedule and optimizer


def lr_schedule(peak_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> optax.Schedule:
    """Linear warmup 0 -> `peak_lr` over `warmup_steps`, then cosine to `peak_lr * min_lr_ratio`.

    The value is 0 at step 0 (peak at once when `warmup_steps == 0`), `peak_lr` at
    `warmup_steps`, the minimum at `total_steps`, and constant after that.
    """
    if not peak_lr > 0:
        raise ValueError(f"peak_lr must be > 0, got {peak_lr}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"need total_steps > warmup_steps >= 0, got total_steps={total_steps}, warmup_steps={warmup_steps}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    # decay_steps counts the warmup too: the cosine spans total_steps - warmup_steps.
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=int(warmup_steps),
        decay_steps=int(total_steps),
        end_value=peak_lr * min_lr_ratio,
    )


def _label(multiplier: float) -> str:
    return f"lr_x{multiplier:.6g}"


def _scaled(schedule: optax.Schedule, multiplier: float) -> optax.Schedule:
    if multiplier == 1.0:
        return schedule
    return lambda step: multiplier * schedule(step)


def make_optimizer(
    params: PyTree,
    *,
    trainable: Sequence[str],
    lr: float,
    total_steps: int,
    warmup_steps: int,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    min_lr_ratio: float = 0.0,
    lr_multipliers: Mapping[str, float] | None = None,
) -> tuple[optax.GradientTransformation, PyTree]:
    """AdamW over the trainable leaves, nothing (no state, zero updates) for the frozen ones.

    The chain is

      masked(clip_by_global_norm(clip_norm), trainable)      # skipped if clip_norm is None/0
      partition({'frozen': set_to_zero(),
                 'lr_x<m>': adamw(m * lr_schedule(...), mask=decay_mask & group), ...}, labels)

    Trainable leaves are grouped by `lr_multiplier_tree(params, lr_multipliers)`; the group
    of multiplier m gets label `'lr_x{m:.6g}'` ('lr_x1', 'lr_x0.1'). The clip is masked to
    the trainable leaves, so its global norm is the trainable one even if the caller passes
    nonzero gradients for frozen leaves.

    Gradient accumulation belongs to the train step (summing trainable gradients over
    micro-batches), not to this optimizer, so frozen leaves never get accumulator buffers.
    The train step also differentiates only the trainable subtree; `set_to_zero` does not
    save the backward pass of a frozen tower by itself.

    Args:
      params: the param tree, real or abstract (`jax.ShapeDtypeStruct`); only paths and
        shapes are read.
      trainable: regexes for `trainable_mask`.
      lr, total_steps, warmup_steps, min_lr_ratio: see `lr_schedule` (lr is the peak).
      b1, b2, eps, weight_decay: AdamW's; decay follows `decay_mask`.
      clip_norm: global-norm clip of the trainable gradients.
      lr_multipliers: {regex: multiplier} for `lr_multiplier_tree`.

    Returns:
      (the transformation, the labels tree: 'frozen' or 'lr_x<m>' per leaf).
    """
    mask = trainable_mask(params, trainable)
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"trainable patterns {tuple(trainable)!r} leave no parameter to train")
    mults = lr_multiplier_tree(params, lr_multipliers)
    decay = decay_mask(params)
    schedule = lr_schedule(lr, total_steps, warmup_steps, min_lr_ratio)

    labels = jax.tree.map(lambda t, m: _label(m) if t else FROZEN, mask, mults)
    groups: dict[str, float] = {}
    for t, m in zip(jax.tree.leaves(mask), jax.tree.leaves(mults)):
        label = _label(m)
        if t and groups.setdefault(label, m) != m:
            raise ValueError(f"lr multipliers {groups[label]} and {m} share the label {label!r}; make them differ more")

    transforms: dict[str, optax.GradientTransformation] = {}
    if not all(jax.tree.leaves(mask)):
        transforms[FROZEN] = optax.set_to_zero()
    for label, m in groups.items():
        # Restricted to the group so the mask says exactly which of its leaves decay.
        group_decay = jax.tree.map(lambda d, lab, label=label: bool(d and lab == label), decay, labels)
        transforms[label] = optax.adamw(
            _scaled(schedule, m), b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=group_decay
        )

    parts = []
    if clip_norm:
        if clip_norm < 0:
            raise ValueError(f"clip_norm must be > 0 (or None/0 to skip), got {clip_norm}")
        parts.append(optax.masked(optax.clip_by_global_norm(clip_norm), mask))
    parts.append(optax.partition(transforms, labels))
    return optax.chain(*parts), labels


# ----------------------------------------------------------------------------------------------
# Reporting


def count_params(params: PyTree, mask: PyTree) -> dict[str, tuple[int, int]]:
    """{top-level subtree: (trainable, frozen) element counts}, in the params' key order."""
    flat, _ = _flat(params)
    flags = jax.tree.leaves(mask)
    if len(flags) != len(flat):
        raise ValueError(f"mask has {len(flags)} leaves, params have {len(flat)}")
    counts: dict[str, list[int]] = {k: [0, 0] for k in params}
    for (path, leaf), t in zip(flat, flags):
        counts[path.split("/", 1)[0]][0 if t else 1] += math.prod(_shape(leaf))
    return {k: (t, f) for k, (t, f) in counts.items()}


def param_table(params: PyTree, mask: PyTree) -> str:
    """Aligned text table, one row per top-level subtree plus 'total':

      subtree     |  trainable |     frozen |      total
      ------------+------------+------------+-----------
      clip        |          0 |     29,664 |     29,664
      ...
    """
    counts = count_params(params, mask)
    rows = [(k, t, f, t + f) for k, (t, f) in counts.items()]
    total = tuple(sum(r[i] for r in rows) for i in (1, 2, 3))
    rows.append(("total", *total))
    header = ("subtree", "trainable", "frozen", "total")
    cells = [header] + [(name, *(f"{n:,}" for n in nums)) for name, *nums in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]

    def line(c):
        return " | ".join([c[0].ljust(widths[0])] + [c[i].rjust(widths[i]) for i in (1, 2, 3)])

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:-1]), rule, line(cells[-1])])


def optimizer_state_bytes(opt_state: PyTree) -> int:
    """Total bytes of the array leaves of `opt_state` (global size, not per device).

    Works on real or abstract (`jax.eval_shape(tx.init, params)`) states; `MaskedNode`s and
    `EmptyState`s have no leaves and count 0.
    """
    total = 0
    for leaf in jax.tree.leaves(opt_state):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    return total
