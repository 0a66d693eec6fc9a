"""The trainer end to end on the tiny config and the synthetic world (8 forced CPU devices):
stages 1 -> 2 -> 3 handing over through `init_from`, what each stage freezes, metrics, the same
losses on other meshes and with two processes, and the params-only export."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipelines import mixture, pipeline
from ferret_jax import checkpoint, config_lib, export, train
from tests import train_helpers as th


@pytest.fixture(scope="module")
def proto():
    return th.tokenizer_proto()


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory, proto):
    """Stage 1 -> 2 -> 3, two steps each, each starting from the previous run; stage 3 on a pure
    data-parallel mesh (8, 1, 1)."""
    root = tmp_path_factory.mktemp("stages")
    dirs, init_from = {}, ""
    for stage in (1, 2, 3):
        dirs[stage] = th.prepare(root / f"stage{stage}", proto)
        mesh = {"mesh.shape": (8, 1, 1)} if stage == 3 else {}
        train.train(th.config(stage, total_steps=2, **{"init.init_from": init_from}, **mesh), dirs[stage])
        init_from = dirs[stage]
    return dirs


def _moved(a_tree, b_tree):
    return [not th.same_bits(a, b) for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree))]


def test_each_stage_trains_and_hands_over(stage_runs):
    for stage, workdir in stage_runs.items():
        losses = th.losses(workdir)
        assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
        assert checkpoint.read_meta(workdir)["stage"] == stage
    p1, _ = th.params_of(stage_runs[1], 1)
    p2, _ = th.params_of(stage_runs[2], 2)
    p3, _ = th.params_of(stage_runs[3], 3)
    # Stage II starts proj_local from stage I's proj_global: two Adam steps (lr <= 3e-3) away from
    # it, far from the run's own random init.
    for a, b in zip(jax.tree.leaves(p2["proj_local"]), jax.tree.leaves(p1["proj_global"])):
        assert np.abs(a - b).max() < 0.01
    fresh = jax.tree.leaves(th.init_params()["proj_local"])
    assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(p2["proj_local"]), fresh)) > 0.05
    # What a stage freezes is bit-identical; what it trains moved.
    # Frozen in stage I: still the init (up to the last bit: the run initialised sharded, this
    # test on one device); the trained projector moved by ~lr.
    fresh_all = th.init_params()
    for name in ("clip", "dino", "llm", "proj_local", "sampler"):
        for a, b in zip(jax.tree.leaves(p1[name]), jax.tree.leaves(fresh_all[name])):
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)
    assert min(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(p1["proj_global"]), jax.tree.leaves(fresh_all["proj_global"]))) > 1e-4
    for name in ("clip", "dino", "llm"):  # frozen in stage II
        assert not any(_moved(p1[name], p2[name])), name
    for name in ("proj_global", "proj_local", "sampler"):
        assert np.mean(_moved(p1[name], p2[name])) > 0.5, name
    for name in ("clip", "dino", "proj_global", "proj_local", "sampler", "llm"):  # stage III trains everything
        assert np.mean(_moved(p2[name], p3[name])) > 0.5, name


def test_frozen_leaves_have_no_optimizer_state_in_the_checkpoint(stage_runs):
    step = checkpoint.latest_step(stage_runs[1])
    path = os.path.join(checkpoint.checkpoint_dir(stage_runs[1]), str(step), "state")
    with ocp.PyTreeCheckpointer() as c:
        tree = c.metadata(path).item_metadata.tree
    stored = [jax.tree_util.keystr(kp, simple=True, separator="/")
              for kp, _ in jax.tree_util.tree_flatten_with_path(tree["opt_state"])[0]]
    moments = [p for p in stored if not p.endswith("count")]
    assert moments and all("proj_global" in p for p in moments), moments[:5]


def test_metrics_are_logged(stage_runs):
    with open(os.path.join(stage_runs[2], train.METRICS_FILE)) as f:
        first = json.loads(f.readline())
    for key in ("train/loss", "train/accuracy", "train/grad_norm", "train/lr", "tokens_per_s", "data_wait_share"):
        assert np.isfinite(first[key]), key
    assert first["tokens_per_s"] > 0 and 0 <= first["data_wait_share"] <= 1
    assert set(first["data/skips"]) == set(pipeline.SKIP_REASONS)
    assert set(first["data/repairs"]) == set(pipeline.REPAIR_REASONS)


@pytest.mark.parametrize("mesh", [(2, 4, 1), (1, 4, 2)])
def test_meshes_give_the_same_losses(tmp_path, proto, stage_runs, mesh):
    """Stage III from the stage-II run on other meshes equals the fixture's (8, 1, 1) run."""
    workdir = th.prepare(tmp_path / "run", proto)
    train.train(th.config(3, total_steps=2, **{"init.init_from": stage_runs[2], "mesh.shape": mesh}), workdir)
    want, got = th.losses(stage_runs[3]), th.losses(workdir)
    np.testing.assert_allclose([got[1], got[2]], [want[1], want[2]], rtol=2e-5)


def test_two_processes_equal_one(tmp_path, proto, stage_runs):
    """Two processes with 4 CPU devices each (jax.distributed on localhost) = one with 8."""
    workdir = th.prepare(tmp_path / "run", proto)
    port = th.free_port()
    procs = [
        th.trainer_process(th.cli_flags(1, total_steps=2) + [f"--workdir={workdir}"], str(tmp_path / f"p{i}.log"), env={
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "FERRET_DISTRIBUTED": "1",
            "FERRET_COORDINATOR": f"localhost:{port}", "FERRET_NUM_PROCESSES": "2", "FERRET_PROCESS_ID": str(i)})
        for i in range(2)
    ]
    for p in procs:
        p.wait(timeout=600)
        assert p.returncode == 0, th.output(p)[-3000:]
    assert "2 process(es)" in th.output(procs[0])
    want, got = th.losses(stage_runs[1]), th.losses(workdir)
    np.testing.assert_allclose([got[1], got[2]], [want[1], want[2]], rtol=2e-5)


def test_export_params_only(tmp_path, stage_runs):
    out = tmp_path / "export"
    export.export(stage_runs[3], str(out), "bfloat16")
    want, _ = th.params_of(stage_runs[3], 3)
    meta = json.loads((out / "export.json").read_text())
    assert meta["stage"] == 3 and meta["dtype"] == "bfloat16" and (out / "tokenizer.model").exists()
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16, sharding=single), want)
    got, _ = checkpoint.load_params(str(out), target)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(g), np.asarray(jnp.asarray(w, jnp.bfloat16)))
    with pytest.raises(FileExistsError):
        export.export(stage_runs[3], str(out))


def test_a_generated_tokenizer_comes_with_the_weights_it_starts_from(tmp_path, proto):
    """A synthetic run starting from a directory that holds a tokenizer uses that one (its weights
    learned those ids), not a freshly generated one; the workdir's own tokenizer wins on resume."""
    vocab = config_lib.backbones("tiny")["llm"].vocab_size
    other = mixture.synthetic_tokenizer(vocab - 1, scenes=30)  # another corpus of the same world: other pieces
    assert other != proto
    start = th.prepare(tmp_path / "warmup", other)
    for key in ("init.pretrained", "init.init_from", "init.resume"):
        workdir = tmp_path / key
        assert train.load_tokenizer(th.config(1, **{key: start}), str(workdir), vocab) == other, key
        assert (workdir / train.TOKENIZER_FILE).read_bytes() == other  # kept for a resumed run
    assert train.load_tokenizer(th.config(1), str(tmp_path / "fresh"), vocab) == proto  # nothing to start from: generated
    own = th.prepare(tmp_path / "own", proto)
    assert train.load_tokenizer(th.config(1, **{"init.pretrained": start}), own, vocab) == proto
