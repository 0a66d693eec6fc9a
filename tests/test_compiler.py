"""The trainer's XLA compiler options: CPU only, and they change memory layout, never numbers."""

import itertools

import jax
import numpy as np
import pytest

from data_pipelines import mixture
from ferret_jax import compiler, config_lib, optim, train
from ferret_jax.models.ferret import Ferret


def test_step_options_only_on_cpu_without_a_persistent_cache(monkeypatch):
    monkeypatch.setattr(compiler, "_persistent_cache", lambda: False)
    assert compiler.step_options("cpu") == {"xla_multiheap_size_constraint_per_heap": 16 << 20}
    assert compiler.step_options("gpu") is None
    assert compiler.step_options("tpu") is None
    monkeypatch.setattr(compiler, "_persistent_cache", lambda: True)
    assert compiler.step_options("cpu") is None


def test_the_tests_persistent_cache_is_seen():
    assert jax.config.jax_compilation_cache_dir  # conftest.py sets it
    assert compiler.step_options() is None


# An executable with several temporary allocations cannot go to the tests' persistent cache.
@pytest.mark.filterwarnings("ignore:Error writing persistent compilation cache entry")
def test_split_temp_heaps_compute_the_same_steps():
    """The tiny stage-III train step (~140 MB of temporaries) compiled with XLA's single
    temporary allocation and with the trainer's 16 MiB heaps: the same losses and params, bit
    for bit, after two steps."""
    cfg = config_lib.stage_config(3, "tiny")
    mcfg = train.model_config(cfg)
    model = Ferret(mcfg)
    proto = mixture.synthetic_tokenizer(mcfg.llm.vocab_size - 1)
    data = mixture.build_stage_dataset(cfg.data, 3, proto, train.example_config(cfg, mcfg), cfg.data.batch_size, cfg.seed)
    batches = [{k: np.asarray(v) for k, v in b.items() if k not in train.HOST_ONLY} for b in itertools.islice(data, 2)]
    params = train._values(jax.jit(model.init)(jax.random.key(0), batches[0])["params"])
    o = cfg.optim
    tx, _ = optim.make_optimizer(params, trainable=o.trainable, lr=o.lr, total_steps=cfg.total_steps, warmup_steps=0)
    step_fn = train.make_train_step(
        model, tx, optim.trainable_mask(params, o.trainable), optim.lr_schedule(o.lr, cfg.total_steps, 0), 1, cfg.seed
    )
    variants = {
        "xla_default": None,
        "16m_heaps": {"xla_multiheap_size_constraint_per_heap": compiler.CPU_TEMP_HEAP_BYTES},
    }
    results, temp_bytes = {}, {}
    for name, options in variants.items():
        state = train.init_state(params, tx)
        step = jax.jit(step_fn, compiler_options=options).lower(state, batches[0]).compile()
        temp_bytes[name] = step.memory_analysis().temp_size_in_bytes
        losses = []
        for batch in batches:
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        results[name] = (losses, jax.device_get(state["params"]))
    # The heaps did take effect: buffer assignment changed (its total moves with the split).
    assert temp_bytes["16m_heaps"] != temp_bytes["xla_default"], temp_bytes
    ref_losses, ref_params = results["xla_default"]
    assert np.isfinite(ref_losses).all()
    for name, (losses, p) in results.items():
        assert losses == ref_losses, (name, losses, ref_losses)
        same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), p, ref_params)
        assert all(jax.tree.leaves(same)), name
