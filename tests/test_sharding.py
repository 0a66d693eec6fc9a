"""Sharding on 8 forced CPU devices: FSDP shards every big param; sharded init and forward work."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ferret_jax import config_lib, sharding
from ferret_jax.models import ClipVision, Dinov2, Llama

MIB = 1 << 20


def _boxed_abstract(module, *example):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *example))["params"]


def _bytes(x):
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_fsdp_shards_every_param_above_1mib(size):
    mesh = sharding.make_mesh((1, -1, 1))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    cfgs = config_lib.backbones(size)
    towers = {
        "clip": _boxed_abstract(ClipVision(cfgs["clip"]), np.zeros((1, 336, 336, 3), np.float32)),
        "dino": _boxed_abstract(Dinov2(cfgs["dino"]), np.zeros((1, 336, 336, 3), np.float32)),
        "llm": _boxed_abstract(Llama(cfgs["llm"]), np.zeros((1, 1), np.int32)),
    }
    shardings = sharding.param_shardings(towers, mesh)
    abstract = nn.meta.unbox(towers)
    flat_a = jax.tree_util.tree_flatten_with_path(abstract)[0]
    flat_s = jax.tree.leaves(shardings)
    big_unsharded = [jax.tree_util.keystr(k) for (k, a), s in zip(flat_a, flat_s) if _bytes(a) > MIB and s.is_fully_replicated]
    assert big_unsharded == []
    assert sharding.replicated_fraction(abstract, shardings) < 0.001
    per_device = sum(
        math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for (_, a), s in zip(flat_a, flat_s)
    )
    total = sum(_bytes(a) for _, a in flat_a)
    assert per_device < 1.01 * total / 8


def test_tensor_axis_shards_heads_and_mlp():
    mesh = sharding.make_mesh((2, 2, 2))
    cfg = config_lib.backbones("7b")["llm"]
    shardings = sharding.param_shardings(_boxed_abstract(Llama(cfg), np.zeros((1, 1), np.int32)), mesh)
    assert shardings["layers"]["q"]["kernel"].spec == P(None, "fsdp", "tensor", None)
    assert shardings["layers"]["down"]["kernel"].spec == P(None, "tensor", "fsdp")
    # 32001 rows (Vicuna + <region_fea>) do not divide the tensor axis: vocab stays whole there.
    assert shardings["lm_head"].spec == P("fsdp", None)
    assert shardings["embed"].spec == P(None, "fsdp")


def test_indivisible_dims_are_left_unsharded_then_fallback():
    mesh = sharding.make_mesh((1, 8, 1))
    assert sharding.logical_to_spec(("embed", "mlp"), (12, 64), mesh) == P(None, None)
    assert sharding.logical_to_spec(("embed", "mlp"), (16, 64), mesh) == P("fsdp", None)
    # An unannotated 4 MiB array falls back to FSDP on its largest divisible dim.
    boxed = {"w": jax.ShapeDtypeStruct((1000, 1024), jnp.float32), "b": jax.ShapeDtypeStruct((1024,), jnp.float32)}
    s = sharding.param_shardings(boxed, mesh)
    assert s["w"].spec == P(None, "fsdp") and s["b"].is_fully_replicated


def test_sharded_init_and_forward_match_single_device():
    cfg = config_lib.backbones("tiny")["llm"]
    model = Llama(cfg)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 16)))
    mesh = sharding.make_mesh((2, 4, 1))
    boxed = _boxed_abstract(model, ids)
    shardings = sharding.param_shardings(boxed, mesh)
    init = jax.jit(lambda k: nn.meta.unbox(model.init(k, ids)["params"]), out_shardings=shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        params = init(jax.random.key(0))
        logits_sharded = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])(params, ids)
    for arr, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        assert arr.sharding.is_equivalent_to(s, arr.ndim)
    assert params["layers"]["gate"]["kernel"].sharding.spec == P(None, "fsdp", None)
    assert len(params["layers"]["gate"]["kernel"].addressable_shards) == 8
    host = jax.tree.map(np.asarray, params)
    logits_single, _ = model.apply({"params": host}, ids)
    np.testing.assert_allclose(np.asarray(logits_sharded), np.asarray(logits_single), atol=1e-5)


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="needs 6 devices, have 8"):
        sharding.make_mesh((1, 3, 2))
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.make_mesh((-1, -1, 1))
    with pytest.raises(ValueError, match="does not divide"):
        sharding.make_mesh((3, -1, 1))


def test_ferret_7b_is_almost_entirely_sharded():
    """The whole model (sampler and projectors included) on a (2, 4, 1) mesh."""
    from ferret_jax.models.ferret import Ferret, example_batch

    cfg = config_lib.ferret_config("7b")
    boxed = _boxed_abstract(Ferret(cfg), example_batch(cfg))
    mesh = sharding.make_mesh((2, 4, 1))
    shardings = sharding.param_shardings(boxed, mesh)
    abstract = nn.meta.unbox(boxed)
    assert sharding.replicated_fraction(abstract, shardings) < 0.001
    assert shardings["sampler"]["flatten"]["kernel"].spec == P(None, "fsdp")
    assert shardings["proj_local"]["fc2"]["kernel"].spec == P(None, "fsdp")
