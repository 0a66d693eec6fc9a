"""Declarative HF-name -> param-path mapping, checked in full before any tensor is read.

A backbone's conversion is a list of `Rule`s. `convert` first compares the checkpoint's headers
with the rules and the model's abstract params, and raises one `CheckpointError` naming every
missing, unexpected and misshaped tensor; only then does it fill the params, one source tensor
at a time, into preallocated arrays (one full copy of the model in RAM, never two).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from ferret_jax.convert.safetensors_io import CheckpointError, TensorSource

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """How a source tensor becomes a target param (and which source shape that requires)."""

    name: str
    apply: Callable[[np.ndarray, Shape], np.ndarray]
    source_shape: Callable[[Shape], Shape]


IDENTITY = Transform("identity", lambda w, t: w, lambda t: t)
# torch Linear stores [out, in]; we compute x @ W with W [in, out].
LINEAR = Transform("linear", lambda w, t: w.T, lambda t: (t[1], t[0]))
# q/k/v: [H*Dh, D] -> [D, H, Dh]
LINEAR_TO_HEADS = Transform("linear_to_heads", lambda w, t: w.T.reshape(t), lambda t: (t[1] * t[2], t[0]))
BIAS_TO_HEADS = Transform("bias_to_heads", lambda w, t: w.reshape(t), lambda t: (t[0] * t[1],))
# attention output: [D, H*Dh] -> [H, Dh, D]
HEADS_TO_LINEAR = Transform("heads_to_linear", lambda w, t: w.T.reshape(t), lambda t: (t[2], t[0] * t[1]))
# conv [out, in, kh, kw] -> [kh, kw, in, out]
CONV = Transform("conv", lambda w, t: w.transpose(2, 3, 1, 0), lambda t: (t[3], t[2], t[0], t[1]))


def squeeze_leading(n: int) -> Transform:
    """Drops n leading singleton dims (e.g. DINOv2's cls_token `[1, 1, D]` -> `[D]`)."""
    return Transform(f"squeeze{n}", lambda w, t: w.reshape(t), lambda t: (1,) * n + tuple(t))


def append_mean_rows(added: int, transpose: bool) -> Transform:
    """Vocabulary growth: `[V, D]` source -> `[V + added, D]` (or its transpose, for lm_head).

    New rows (e.g. `<region_fea>`) start at the mean of the existing rows: deterministic, and of
    the same scale as the trained rows.
    """

    def apply(w, t):
        w = np.asarray(w, np.float32)
        w = np.concatenate([w, np.repeat(w.mean(0, keepdims=True), added, 0)], 0)
        return w.T if transpose else w

    def source_shape(t):
        v, d = (t[1], t[0]) if transpose else t
        return (v - added, d)

    return Transform(f"append_mean_rows{added}", apply, source_shape)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Target `path` ('/'-joined) <- source `name`; `{i}` in the name indexes a stacked layer."""

    path: str
    name: str
    transform: Transform = IDENTITY

    @property
    def is_stacked(self) -> bool:
        return "{i}" in self.name


def _listing(title: str, items: list[str], limit: int = 25) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}):\n  {shown}{more}"


def convert(
    source: TensorSource,
    rules: list[Rule],
    abstract_params,
    ignore: tuple[str, ...] = (),
    dtype=np.float32,
    what: str = "checkpoint",
) -> tuple[dict, list[str]]:
    """Fills `abstract_params` (a tree of ShapeDtypeStructs) from `source` by `rules`.

    Args:
      ignore: regexes (full match) of source names that are deliberately not used.
      dtype: numpy dtype of the produced params.

    Returns:
      (params as nested dicts of numpy arrays, sorted names of the ignored source tensors).

    Raises:
      CheckpointError listing every missing, unexpected and misshaped tensor.
    """
    targets = {"/".join(k): v for k, v in traverse_util.flatten_dict(abstract_params).items()}
    by_path = {r.path: r for r in rules}
    unmapped = sorted(set(targets) - set(by_path))
    unknown = sorted(set(by_path) - set(targets))
    if unmapped or unknown:  # a bug in the rules, not in the checkpoint
        raise AssertionError(f"conversion rules out of sync: unmapped params {unmapped}, unknown {unknown}")

    plan: list[tuple[Rule, list[str]]] = []
    missing, misshaped, used = [], [], set()
    for path, rule in by_path.items():
        shape = tuple(targets[path].shape)
        if rule.is_stacked:
            names, per_layer = [rule.name.format(i=i) for i in range(shape[0])], shape[1:]
        else:
            names, per_layer = [rule.name], shape
        expected = tuple(rule.transform.source_shape(per_layer))
        for name in names:
            if name not in source.tensors:
                missing.append(f"{name} (for {path}, expected shape {expected})")
            elif source.shape(name) != expected:
                misshaped.append(f"{name}: has {source.shape(name)}, expected {expected} (for {path})")
            used.add(name)
        plan.append((rule, names))
    ignored = sorted(n for n in source.tensors if n not in used and any(re.fullmatch(p, n) for p in ignore))
    unexpected = sorted(set(source.tensors) - used - set(ignored))
    if missing or unexpected or misshaped:
        parts = [f"{what} at {source.directory!r} does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
            if items:
                parts.append(_listing(title, sorted(items)))
        raise CheckpointError("\n".join(parts))

    flat = {}
    for rule, names in plan:
        shape = tuple(targets[rule.path].shape)
        if rule.is_stacked:
            out = np.empty(shape, dtype)
            for i, name in enumerate(names):
                out[i] = rule.transform.apply(source.read(name), shape[1:])
        else:
            out = np.asarray(rule.transform.apply(source.read(names[0]), shape), dtype)
        flat[tuple(rule.path.split("/"))] = out
    return traverse_util.unflatten_dict(flat), ignored


def abstract_params(module, *example_args) -> dict:
    """Unboxed `{path: ShapeDtypeStruct}` tree of `module`'s params, nothing allocated."""
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args))
    return nn.meta.unbox(variables["params"])
