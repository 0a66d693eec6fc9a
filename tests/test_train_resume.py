"""Trainer robustness on the tiny config: exact resume (in process, and after SIGKILL and SIGTERM
of a real process), restore onto other meshes, the non-finite guard, configurations that fail fast."""

import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import mixture
from ferret_jax import checkpoint, config_lib, optim, sharding, train
from ferret_jax.models.ferret import Ferret, example_batch
from tests import train_helpers as th


@pytest.fixture(scope="module")
def proto():
    return th.tokenizer_proto()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, proto):
    """Stage II, 6 steps in one go: the reference losses."""
    workdir = th.prepare(tmp_path_factory.mktemp("full"), proto)
    train.train(th.config(2, total_steps=6), workdir)
    return workdir, th.losses(workdir)


def test_resume_equals_uninterrupted(tmp_path, proto, uninterrupted):
    _, full = uninterrupted
    workdir = th.prepare(tmp_path / "run", proto)
    train.train(th.config(2, total_steps=6), workdir, stop_requested=lambda step: step == 3)
    assert checkpoint.latest_step(workdir) == 3 and sorted(th.losses(workdir)) == [1, 2, 3]
    train.train(th.config(2, total_steps=6), workdir)
    resumed = th.losses(workdir)
    assert sorted(resumed) == list(range(1, 7))
    assert [resumed[s] for s in range(1, 7)] == [full[s] for s in range(1, 7)]  # identical, not close


def test_sigkill_after_a_save_then_sigterm_then_resume(tmp_path, proto, uninterrupted):
    """A real process killed hard after its step-2 checkpoint, restarted, preempted with SIGTERM,
    restarted again: exit code 0 on SIGTERM, and the losses of the uninterrupted run."""
    _, full = uninterrupted
    workdir = th.prepare(tmp_path / "run", proto)
    args = th.cli_flags(2, total_steps=6, ckpt_every=2) + [f"--workdir={workdir}"]
    proc = th.trainer_process(args, str(tmp_path / "first.log"))
    th.wait_for(lambda: (checkpoint.latest_step(workdir) or 0) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = th.metric_lines(workdir)
    proc = th.trainer_process(args, str(tmp_path / "second.log"))
    th.wait_for(lambda: th.metric_lines(workdir) > logged, proc)  # the restarted run is stepping
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    out = th.output(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "[stopped] SIGTERM" in out
    stopped_at = checkpoint.latest_step(workdir)
    assert stopped_at >= 3
    if stopped_at < 6:
        train.train(th.config(2, total_steps=6, ckpt_every=2), workdir)
    resumed = th.losses(workdir)
    for step in range(1, 7):
        assert resumed[step] == full[step], (step, resumed[step], full[step])


def test_checkpoint_restores_onto_another_mesh(uninterrupted):
    workdir, _ = uninterrupted
    cfg = config_lib.ferret_config("tiny")
    boxed = jax.eval_shape(Ferret(cfg).init, jax.random.key(0), example_batch(cfg))["params"]
    abstract = train._values(boxed)
    reference, _ = th.params_of(workdir, 2)
    for shape in ((2, 4, 1), (1, 4, 2)):
        mesh = sharding.make_mesh(shape)
        shards = sharding.param_shardings(boxed, mesh)
        params, meta = checkpoint.load_params(workdir, train._abstract(abstract, shards))
        assert meta["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}  # saved on another mesh
        for got, want, s in zip(jax.tree.leaves(params), jax.tree.leaves(reference), jax.tree.leaves(shards)):
            assert got.sharding.is_equivalent_to(s, got.ndim)
            np.testing.assert_array_equal(np.asarray(got), want)
        gate = params["llm"]["layers"]["gate"]["kernel"]
        assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor" if shape[2] == 2 else None)


def _tiny_model_and_batch(proto, stage: int, batch_size: int):
    """(config, model, one device batch of the stage's data, initial params) of the tiny config."""
    config = th.config(stage)
    mcfg = config_lib.ferret_config("tiny", **dict(config.model))
    model = Ferret(mcfg)
    ecfg = train.example_config(config, mcfg)
    batch = next(iter(mixture.build_stage_dataset(config.data, stage, proto, ecfg, batch_size, 0)))
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k not in train.HOST_ONLY}
    params = jax.jit(lambda k: train._values(model.init(k, batch)["params"]))(jax.random.key(0))
    return config, model, batch, params


def test_nonfinite_updates_are_skipped_and_counted(proto):
    """A batch with a NaN pixel: the update is skipped and counted, params stay bit-identical; the
    next good batch trains and resets the count; too many in a row stop the run."""
    config, model, batch, params = _tiny_model_and_batch(proto, 2, 2)
    mask = optim.trainable_mask(params, config.optim.trainable)
    tx, _ = optim.make_optimizer(params, trainable=config.optim.trainable, lr=1e-2, total_steps=10, warmup_steps=0)
    step = jax.jit(train.make_train_step(model, tx, mask, optim.lr_schedule(1e-2, 10, 0), 1, 0))
    state = train.init_state(params, tx)
    bad = {**batch, "global_image": batch["global_image"].at[0, 0, 0, 0].set(jnp.nan)}
    after_bad, m = step(state, bad)
    assert int(m["skipped_update"]) == 1 and int(after_bad["nonfinite"]) == 1 and int(after_bad["step"]) == 1
    for a, b in zip(jax.tree.leaves(after_bad["params"]), jax.tree.leaves(params)):
        assert th.same_bits(np.asarray(a), np.asarray(b))
    after_good, m = step(after_bad, batch)
    assert int(m["skipped_update"]) == 0 and int(after_good["nonfinite"]) == 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(after_good["params"]))
    assert all(not th.same_bits(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(after_good["params"]["proj_local"]), jax.tree.leaves(params["proj_local"])))
    metrics = {"nonfinite_in_a_row": np.int32(5), "lr": np.float32(1e-3)}
    with pytest.raises(FloatingPointError, match="5 updates in a row"):
        train._finish((7, metrics, {}), config, None, {"step_s": 0.0, "data_s": 0.0, "tokens": 0, "done": time.time()})


def test_gradient_accumulation_equals_one_full_batch(proto):
    """`grad_accum_steps` 2 and 4 (a `lax.scan` over micro-batches) give the full batch's loss,
    accuracy and update. Stage I batches carry no region, so the sampler's per-micro-batch keys
    cannot change the loss; plain SGD makes the update the gradient itself."""
    import optax

    _, model, batch, params = _tiny_model_and_batch(proto, 1, 8)
    assert not batch["region_valid"].any() and len(set(np.asarray(batch["loss_mask"]).sum(1))) > 1
    mask = jax.tree.map(lambda _: True, params)
    tx = optax.sgd(1.0)
    results = {}
    for accum in (1, 2, 4):
        step = jax.jit(train.make_train_step(model, tx, mask, optim.lr_schedule(1.0, 10, 0), accum, 0))
        state, metrics = step(train.init_state(params, tx), batch)
        results[accum] = jax.device_get((state["params"], metrics))
    (want_params, want), moved = results[1], False
    for accum in (2, 4):
        got_params, got = results[accum]
        for key in ("loss", "accuracy", "grad_norm", "supervised_tokens"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=f"{key}, accum {accum}")
        for g, w, p in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params), jax.tree.leaves(params)):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
            moved |= not np.allclose(w, np.asarray(p))
    assert moved


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"mesh.shape": (3, 1, 1)}, ValueError, "needs 3 devices, have 8"),
        ({"optim.trainable": ("proj_globl/.*",)}, ValueError, "proj_globl"),
        ({"data.batch_size": 6}, ValueError, "must divide by the 8 devices"),
        ({"total_steps": 0}, ValueError, "total_steps must be positive"),
        ({"data.tokenizer": "/no/tokenizer.model"}, FileNotFoundError, "tokenizer"),
        ({"data.weights": {"shapes": 1.0, "grit": 1.0}}, ValueError, r"unknown \['grit'\]"),
    ],
)
def test_bad_configs_fail_fast(tmp_path, overrides, error, message):
    start = time.time()
    with pytest.raises(error, match=message):
        train.train(th.config(1, **overrides), str(tmp_path / "run"))
    assert time.time() - start < 30  # before any compilation


def test_unknown_config_key_fails_on_the_command_line(tmp_path):
    proc = th.trainer_process(th.cli_flags(1) + ["--config.total_stepz=3", f"--workdir={tmp_path}"], str(tmp_path / "log"))
    proc.wait(timeout=120)
    assert proc.returncode != 0 and "total_stepz" in th.output(proc)
