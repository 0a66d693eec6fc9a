"""Device mesh and parameter shardings from logical axis names.

Mesh axes are `('data', 'fsdp', 'tensor')`. Every param carries logical names (see
`ferret_jax.models.layers`); `RULES` map them to mesh axes. A mapping that does not divide the
dimension is dropped for that dimension, and a large param that ends up unsharded falls back to
FSDP on its largest divisible dimension, so no big tensor stays replicated by accident.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Pure FSDP by default: params shard their width over 'fsdp',
# matmul-heavy dims go to 'tensor' when a config sets that axis > 1.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed_act", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
    ("pos", None),
)
FALLBACK_MIN_BYTES = 1 << 20


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES, devices=None) -> Mesh:
    """A mesh over all (or the given) devices; one entry of `shape` may be -1 (the rest).

    Axes are `AxisType.Auto`: the GSPMD-style mode that logical-axis rules and
    `with_sharding_constraint` are written for (jax.make_mesh defaults to Explicit).
    """
    devices = jax.devices() if devices is None else devices
    shape = list(shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {shape} does not name all axes {tuple(axis_names)}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide the {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {len(devices)}")
    return jax.make_mesh(
        tuple(shape), tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape), devices=devices
    )


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=RULES) -> P:
    """PartitionSpec for one array: each dim's logical name through `rules`, keeping only mesh
    axes that exist, are > 1, are not used by an earlier dim, and divide the dim."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        chosen = []
        for axis in _as_tuple(table.get(name)) if name is not None else ():
            size = mesh.shape.get(axis, 1)
            if size > 1 and axis not in used and dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*spec)


def _fallback(spec: P, shape: Sequence[int], itemsize: int, mesh: Mesh) -> P:
    """Large and still fully replicated: shard the largest dim that 'fsdp' divides."""
    fsdp = mesh.shape.get("fsdp", 1)
    if any(s is not None for s in spec) or fsdp == 1 or math.prod(shape) * itemsize < FALLBACK_MIN_BYTES:
        return spec
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
    return spec


def _names_and_value(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
        return leaf.names, leaf.value
    return (None,) * np.ndim(leaf), leaf


def param_shardings(boxed_params, mesh: Mesh, rules=RULES):
    """NamedSharding tree (unboxed structure) for a tree of `nn.LogicallyPartitioned` params.

    Works on abstract params from `jax.eval_shape(model.init, ...)`; nothing is allocated.
    """

    def one(leaf):
        names, value = _names_and_value(leaf)
        spec = logical_to_spec(names, value.shape, mesh, rules)
        spec = _fallback(spec, value.shape, np.dtype(value.dtype).itemsize, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def replicated_fraction(abstract_params, shardings) -> float:
    """Share of parameter bytes that every device holds in full."""
    total = replicated = 0
    for a, s in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(shardings)):
        nbytes = math.prod(a.shape) * np.dtype(a.dtype).itemsize
        total += nbytes
        if s.is_fully_replicated:
            replicated += nbytes
    return replicated / max(total, 1)
