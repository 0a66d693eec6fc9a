"""Train one stage: `python -m ferret_jax.train --config=configs/stageN.py[:arg] --workdir=DIR`.

The run, in order: (multi-host init) -> config checks -> mesh -> tokenizer -> data -> abstract
params and their shardings -> optimizer with the stage's frozen subtrees -> state, from the first
of: the workdir's latest checkpoint, `init.resume`, `init.init_from`, `init.pretrained`, random
init -> the jitted step (donated state, fp32 masked cross-entropy, gradients only for trainable
leaves, non-finite updates skipped and counted) -> metrics (JSONL, TensorBoard, a console line
with ETA) -> periodic held-out loss and checkpoints -> a final checkpoint. SIGTERM (preemption)
makes the run save at the next step boundary and exit 0; rerunning the same command resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from etils import epath
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from data_pipelines import example as ex
from data_pipelines import mixture, pipeline, text
from ferret_jax import checkpoint, compiler, config_lib, optim, sharding
from ferret_jax.losses import supervised_token_loss, token_cross_entropy
from ferret_jax.models.ferret import Ferret, FerretConfig, copy_global_projector, example_batch

BATCH_AXES = ("data", "fsdp")
HOST_ONLY = ("skips", "repairs")  # per-example data statistics, logged, never sent to devices
TOKENIZER_FILE = checkpoint.TOKENIZER_FILE
METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------------------------
# Setup


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` when the launcher asks for it (FERRET_DISTRIBUTED=1).

    On TPU pods and SLURM, JAX finds the coordinator itself; elsewhere set FERRET_COORDINATOR
    (host:port), FERRET_NUM_PROCESSES and FERRET_PROCESS_ID.
    """
    if os.environ.get("FERRET_DISTRIBUTED") != "1":
        return
    kwargs = {}
    if "FERRET_COORDINATOR" in os.environ:
        kwargs = dict(
            coordinator_address=os.environ["FERRET_COORDINATOR"],
            num_processes=int(os.environ["FERRET_NUM_PROCESSES"]),
            process_id=int(os.environ["FERRET_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)


def model_config(config) -> FerretConfig:
    return config_lib.ferret_config(config.size, **dict(config.model))


def check_config(config) -> None:
    """Cheap checks that catch mistakes before anything heavy starts."""
    if config.total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {config.total_steps}")
    for key in ("log_every", "ckpt_every", "eval_every"):
        if config[key] <= 0:
            raise ValueError(f"{key} must be positive, got {config[key]}")
    if config.optim.grad_accum_steps < 1:
        raise ValueError(f"optim.grad_accum_steps must be >= 1, got {config.optim.grad_accum_steps}")
    if config.data.batch_size % (jax.process_count() * config.optim.grad_accum_steps):
        raise ValueError(
            f"data.batch_size {config.data.batch_size} must divide by process_count ({jax.process_count()}) x "
            f"optim.grad_accum_steps ({config.optim.grad_accum_steps})"
        )


def is_remote(path: str) -> bool:
    return "://" in path


def log_dir(workdir: str) -> str:
    """Where metrics.jsonl and TensorBoard events go: the workdir, or for a bucket workdir
    (gs://...) a local `ferret_logs/<bucket path>` beside the process (appending to objects in a
    bucket is not possible)."""
    if not is_remote(workdir):
        return workdir
    return os.path.join(os.getcwd(), "ferret_logs", workdir.split("://", 1)[1].strip("/"))


def example_config(config, model_config) -> ex.ExampleConfig:
    """The shapes and text format of a stage config's examples (the batch contract)."""
    return ex.ExampleConfig.for_model(model_config, config.data.max_length, config.data.max_regions, config.data.system_prompt)


def load_tokenizer(config, workdir: str, vocab_size: int) -> bytes:
    """The run's SentencePiece model: kept in the workdir so a resumed run tokenizes identically.

    A generated one (`data.tokenizer='synthetic'`) comes from the directory of the weights the run
    starts from (`init.resume`, `init_from`, `pretrained`, in that order) when it holds one: those
    weights learned its ids, and a corpus changed since would generate another."""
    path = epath.Path(workdir) / TOKENIZER_FILE
    starts_from = [epath.Path(d) / TOKENIZER_FILE for d in (config.init.resume, config.init.init_from, config.init.pretrained) if d]
    inherited = [p for p in starts_from if p.exists()]
    if path.exists():
        proto = path.read_bytes()
    elif config.data.tokenizer == "synthetic" and inherited:
        proto = inherited[0].read_bytes()
    elif config.data.tokenizer == "synthetic":
        proto = mixture.synthetic_tokenizer(vocab_size - 1)
    elif config.data.tokenizer and os.path.isfile(config.data.tokenizer):
        with open(config.data.tokenizer, "rb") as f:
            proto = f.read()
    else:
        raise FileNotFoundError(
            f"data.tokenizer {config.data.tokenizer!r}: give the LLM's tokenizer.model (or 'synthetic' for the shapes world)"
        )
    region_id = text.Tokenizer(model_proto=proto).region_id
    if region_id >= vocab_size:
        raise ValueError(f"the tokenizer needs {region_id + 1} ids (with <region_fea>), the LLM vocab has {vocab_size}")
    if jax.process_index() == 0 and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(proto)
    return proto


# ----------------------------------------------------------------------------------------------
# State and step


def _split(tree: Any, mask: Any) -> tuple[dict, dict]:
    """(trainable, frozen) flat dicts keyed by path tuples."""
    flat, flat_mask = traverse_util.flatten_dict(tree), traverse_util.flatten_dict(mask)
    return {k: v for k, v in flat.items() if flat_mask[k]}, {k: v for k, v in flat.items() if not flat_mask[k]}


def _merge(trainable: dict, frozen: dict) -> dict:
    return traverse_util.unflatten_dict({**trainable, **frozen})


def init_state(params: Any, tx: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "nonfinite": jnp.zeros((), jnp.int32)}


def state_shardings(abstract_state: dict, param_shardings: Any, mesh) -> dict:
    """Optimizer moments shard like their params (matched by path and shape); scalars and anything
    else are replicated."""
    replicated = NamedSharding(mesh, P())
    by_path = traverse_util.flatten_dict(param_shardings)
    shapes = {k: v.shape for k, v in traverse_util.flatten_dict(abstract_state["params"]).items()}

    def pick(key_path, leaf):
        keys = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
        for i in range(len(keys)):  # mu/nu trees end with the param's own path
            if keys[i:] in by_path and shapes[keys[i:]] == leaf.shape:
                return by_path[keys[i:]]
        return replicated

    opt = jax.tree_util.tree_map_with_path(pick, abstract_state["opt_state"])
    return {"step": replicated, "params": param_shardings, "opt_state": opt, "nonfinite": replicated}


def make_train_step(
    model: Ferret, tx: optax.GradientTransformation, mask: Any, schedule: Callable, accum: int, seed: int,
    loss_positions: int = 0,
):
    """`(state, batch) -> (state, metrics)`: one update on a global batch of the contract.

    The loss is the masked token cross-entropy summed over the batch's supervised tokens and
    divided by their count; with `accum` > 1 micro-batches add up to exactly that. Only trainable
    leaves are differentiated. A non-finite loss or gradient keeps params and optimizer state as
    they were and increments `nonfinite` (reset by the next good step). `loss_positions` as in
    `losses.supervised_token_loss` (a speed setting: the loss is the same).
    """

    def loss_fn(trainable, frozen, micro, key, denom):
        variables = {"params": _merge(trainable, frozen)}
        hidden = model.apply(variables, micro, rngs={"sampler": key}, method=Ferret.hidden_states)
        head = functools.partial(model.apply, variables, method=Ferret.logits)
        loss, correct = supervised_token_loss(head, hidden, micro["targets"], micro["loss_mask"], loss_positions)
        return loss / denom, correct

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        trainable, frozen = _split(state["params"], mask)
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        denom = jnp.maximum(batch["loss_mask"].sum(), 1.0)
        if accum == 1:  # no loop: XLA fuses across the whole step
            (loss, correct), grads = grad_fn(trainable, frozen, batch, key, denom)
        else:

            def one(carry, xs):
                grads, loss, correct = carry
                mb, k = xs
                (l, c), g = grad_fn(trainable, frozen, mb, k, denom)
                return (jax.tree.map(jnp.add, grads, g), loss + l, correct + c), None

            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
            zeros = jax.tree.map(jnp.zeros_like, trainable)
            keys = jax.random.split(key, accum)
            (grads, loss, correct), _ = jax.lax.scan(one, (zeros, 0.0, 0.0), (micro, keys))
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        full_grads = _merge(grads, jax.tree.map(jnp.zeros_like, frozen))  # set_to_zero ignores these
        updates, opt_state = tx.update(full_grads, state["opt_state"], state["params"])
        flat_p, flat_u = traverse_util.flatten_dict(state["params"]), traverse_util.flatten_dict(updates)
        flat_m = traverse_util.flatten_dict(mask)
        new_params = traverse_util.unflatten_dict(
            {k: (jnp.where(ok, p + flat_u[k].astype(p.dtype), p) if flat_m[k] else p) for k, p in flat_p.items()}
        )
        opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), opt_state, state["opt_state"])
        new_state = {
            "step": state["step"] + 1,
            "params": new_params,
            "opt_state": opt_state,
            "nonfinite": jnp.where(ok, 0, state["nonfinite"] + 1),
        }
        metrics = {
            "loss": loss, "accuracy": correct / denom, "grad_norm": grad_norm, "lr": schedule(state["step"]),
            "supervised_tokens": denom, "skipped_update": 1 - ok.astype(jnp.int32), "nonfinite_in_a_row": new_state["nonfinite"],
        }
        return new_state, metrics

    return step


def make_eval_step(model: Ferret):
    def step(params, batch):
        logits = model.apply({"params": params}, batch)
        loss, correct = token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
        return {"loss_sum": loss.sum(), "correct_sum": correct.sum(), "tokens": batch["loss_mask"].sum()}

    return step


# ----------------------------------------------------------------------------------------------
# Data on devices


def device_batch(local: dict, batch_sharding: NamedSharding) -> tuple[dict, dict]:
    """(global jax arrays of the contract, host statistics) from this process's numpy batch."""
    stats = {k: local[k].sum(0) for k in HOST_ONLY if k in local}
    arrays = {
        k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)) for k, v in local.items() if k not in HOST_ONLY
    }
    return arrays, stats


# ----------------------------------------------------------------------------------------------
# Logging


class MetricsWriter:
    """JSONL + TensorBoard on process 0; a console progress line with ETA."""

    def __init__(self, directory: str, total_steps: int, stage: int, tensorboard: bool):
        self.primary = jax.process_index() == 0
        self.total, self.stage = total_steps, stage
        self._jsonl, self._tb = None, None
        if self.primary:
            os.makedirs(directory, exist_ok=True)
            self._jsonl = open(os.path.join(directory, METRICS_FILE), "a")
        if self.primary and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))
        self._start, self._start_step = time.time(), None

    def write(self, step: int, metrics: dict) -> None:
        if not self.primary:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
                elif isinstance(v, dict):
                    for kk, vv in v.items():
                        self._tb.add_scalar(f"{k}/{kk}", vv, step)
            self._tb.flush()

    def progress(self, step: int, m: dict) -> None:
        if not self.primary:
            return
        if self._start_step is None:
            self._start_step, self._start = step - 1, time.time() - m.get("step_time_s", 0.0)
        done = step - self._start_step
        rate = done / max(time.time() - self._start, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        print(
            f"[stage {self.stage}] step {step}/{self.total} loss {m['train/loss']:.4f} acc {m['train/accuracy']:.3f} "
            f"gnorm {m['train/grad_norm']:.3g} lr {m['train/lr']:.2e} | {m['tokens_per_s']:.0f} tok/s "
            f"data {100 * m['data_wait_share']:.0f}% | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
            flush=True,
        )

    def log(self, text_: str) -> None:
        if self.primary:
            print(text_, flush=True)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


# ----------------------------------------------------------------------------------------------
# The run


class _Preemption:
    """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._old)


def _values(boxed: Any) -> Any:
    """Params without their logical-axis boxes; placement comes from the jit's out_shardings
    (`nn.meta.unbox` would add sharding constraints that repeat-named dims cannot express)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, boxed,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _initial_params(config, abstract_params, shardings, init_fn, log) -> tuple[Any, str]:
    """Params for a fresh run (DESIGN §9 order after the workdir and `resume`): `init_from` (all
    six subtrees; stage II from stage I copies proj_global to proj_local unless
    `init.copy_global_projector` is off) -> `pretrained` (the subtrees the directory holds, of clip,
    dino, llm and the demo warm-up's sampler and projectors; the rest keep their random init) ->
    random init. `init_fn(names)` returns the random init of the top-level subtrees `names`."""
    target = _abstract(abstract_params, shardings)
    if config.init.init_from:
        params, meta = checkpoint.load_params(config.init.init_from, target)
        if meta.get("stage") == 1 and config.stage == 2 and config.init.copy_global_projector:
            params = jax.jit(copy_global_projector, out_shardings=shardings)(params)
            log("[init] proj_local <- proj_global (stage I -> II)")
        return params, f"init_from {config.init.init_from} (stage {meta.get('stage')}, step {meta.get('step')})"
    if config.init.pretrained:
        from ferret_jax.convert import converted_configs, load_converted

        held = sorted(converted_configs(config.init.pretrained))
        _, loaded = load_converted(config.init.pretrained, {k: target[k] for k in held})
        params = {**init_fn(tuple(k for k in abstract_params if k not in loaded)), **loaded}
        return params, f"pretrained {config.init.pretrained} ({', '.join(held)})"
    return init_fn(tuple(abstract_params)), "random init"


def train(config, workdir: str, stop_requested: Callable[[int], bool] | None = None) -> dict:
    """Runs (or resumes) the stage; returns the last logged metrics.

    `stop_requested(step)` is asked after every step, like SIGTERM: True saves a checkpoint and
    returns (a notebook's stop button; the same command later resumes). SIGTERM is caught from the
    start, so a preemption during start-up also ends in a checkpoint after the next step.
    """
    with _Preemption() as preemption:
        return _train(config, workdir, stop_requested, preemption)


def _train(config, workdir: str, stop_requested, preemption: "_Preemption") -> dict:
    check_config(config)
    workdir = workdir if is_remote(workdir) else os.path.abspath(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.sharding_rules)
    batch_devices = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if config.data.batch_size % batch_devices or (config.data.batch_size // config.optim.grad_accum_steps) % batch_devices:
        raise ValueError(
            f"data.batch_size {config.data.batch_size} (/ grad_accum_steps {config.optim.grad_accum_steps}) must divide "
            f"by the {batch_devices} devices of the mesh's data x fsdp axes {dict(mesh.shape)}"
        )
    mcfg = model_config(config)
    model = Ferret(mcfg)

    # Parameters: abstract first, so nothing full-size ever lives on one host.
    sample = example_batch(mcfg, batch=1, length=config.data.max_length, regions=config.data.max_regions)
    boxed = jax.eval_shape(model.init, jax.random.key(config.seed), sample)["params"]
    param_shards = sharding.param_shardings(boxed, mesh, rules)
    abstract_params = _values(boxed)
    mask = optim.trainable_mask(abstract_params, config.optim.trainable)
    tx, _ = optim.make_optimizer(
        abstract_params, trainable=config.optim.trainable, lr=config.optim.lr, total_steps=config.total_steps,
        warmup_steps=config.optim.warmup_steps, b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps,
        weight_decay=config.optim.weight_decay, clip_norm=config.optim.clip_norm, min_lr_ratio=config.optim.min_lr_ratio,
        lr_multipliers=dict(config.optim.lr_multipliers) or None,
    )
    schedule = optim.lr_schedule(config.optim.lr, config.total_steps, config.optim.warmup_steps, config.optim.min_lr_ratio)
    abstract_state = jax.eval_shape(lambda p: init_state(p, tx), abstract_params)
    shards = state_shardings(abstract_state, param_shards, mesh)
    batch_sharding = NamedSharding(mesh, P(BATCH_AXES))

    # Data: this process's share of every global batch.
    proto = load_tokenizer(config, workdir, mcfg.llm.vocab_size)
    ecfg = example_config(config, mcfg)
    local_batch = config.data.batch_size // jax.process_count()
    dataset = mixture.build_stage_dataset(
        config.data, config.stage, proto, ecfg, local_batch, config.seed, jax.process_index(), jax.process_count(),
        read_options=grain.ReadOptions(num_threads=config.data.read_threads, prefetch_buffer_size=config.data.prefetch_batches),
    )
    if config.data.worker_count > 0:
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.data.worker_count, per_worker_buffer_size=config.data.worker_buffer_size)
        )
    data_iter = iter(dataset)

    writer = MetricsWriter(log_dir(workdir), config.total_steps, config.stage, config.tensorboard)
    log = writer.log
    mngr = checkpoint.manager(workdir, config.checkpoint.max_to_keep, config.checkpoint.async_save)
    meta = {"stage": config.stage, "size": config.size, "model": dataclasses.asdict(mcfg), "mesh": dict(mesh.shape),
            "config": json.loads(config.to_json_best_effort())}

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        def init_params(names: tuple[str, ...]) -> dict:
            # Only the returned subtrees are computed (XLA drops the rest): a stage that loads
            # pretrained backbones never materializes, nor compiles, their random init.
            init = lambda k: {n: v for n, v in _values(model.init(k, sample)["params"]).items() if n in names}
            return jax.jit(init, out_shardings={n: param_shards[n] for n in names})(jax.random.key(config.seed))

        own = mngr.latest_step()
        if own is not None or config.init.resume:
            source_mngr = mngr if own is not None else checkpoint.manager(config.init.resume, None, False)
            step0 = own if own is not None else source_mngr.latest_step()
            if step0 is None:
                raise FileNotFoundError(f"init.resume {config.init.resume!r} has no checkpoint")
            state, _ = checkpoint.restore(source_mngr, step0, _abstract(abstract_state, shards), data_iter)
            origin = f"resumed from step {step0} of {'this workdir' if own is not None else config.init.resume}"
        else:
            params, origin = _initial_params(
                config, abstract_params, param_shards, init_params, log
            )
            state = jax.jit(lambda p: init_state(p, tx), out_shardings=shards)(params)
        step = start_step = int(jax.device_get(state["step"]))
        log(f"[init] {origin}; mesh {dict(mesh.shape)} on {jax.device_count()} devices, {jax.process_count()} process(es)")
        log(optim.param_table(abstract_params, mask))
        log(f"[init] optimizer state {optim.optimizer_state_bytes(abstract_state['opt_state']) / 2**20:.1f} MiB (frozen leaves hold none)")

        train_step = jax.jit(
            make_train_step(model, tx, mask, schedule, config.optim.grad_accum_steps, config.seed, config.loss_positions),
            in_shardings=(shards, batch_sharding), out_shardings=(shards, NamedSharding(mesh, P())), donate_argnums=0,
            compiler_options=compiler.step_options(),
        )
        eval_step = jax.jit(
            make_eval_step(model), in_shardings=(param_shards, batch_sharding), compiler_options=compiler.step_options()
        )
        evaluate = _evaluator(config, proto, ecfg, local_batch, eval_step, batch_sharding)

        last: dict = {}
        pending = None  # (step, metrics on device, host stats) of the step before
        # "done": when the last step's metrics arrived; a step's time is the gap between arrivals
        # (the device runs one step behind the host loop, so host timestamps would count two).
        window = {"data_s": 0.0, "step_s": 0.0, "tokens": 0, "done": time.time()}
        while step < config.total_steps:
            t0 = time.time()
            local = next(data_iter)
            t_data = time.time() - t0
            batch, stats = device_batch(local, batch_sharding)
            state, metrics = train_step(state, batch)
            step += 1
            if pending is not None:
                last = _finish(pending, config, writer, window) or last
            window["data_s"] += t_data
            window["tokens"] += int((local["tokens"] != ex.PAD_ID).sum()) * jax.process_count()
            pending = (step, metrics, stats)
            if preemption.requested or (stop_requested is not None and stop_requested(step)):
                last = _finish(pending, config, writer, window, force=True) or last
                pending = None
                checkpoint.save(mngr, step, state, data_iter, {**meta, "step": step})
                mngr.wait_until_finished()
                why = "SIGTERM" if preemption.requested else "stop requested"
                log(f"[stopped] {why}: saved step {step} in {checkpoint.checkpoint_dir(workdir)}; rerun to resume")
                break
            if step % config.ckpt_every == 0 and step < config.total_steps:
                checkpoint.save(mngr, step, state, data_iter, {**meta, "step": step})
            if evaluate is not None and step % config.eval_every == 0:
                last = _finish(pending, config, writer, window) or last  # the eval waits for this step anyway
                pending = None
                mngr.wait_until_finished()
                eval_metrics = evaluate(state["params"])
                window["done"] = time.time()  # the eval's time is no training step's
                writer.write(step, eval_metrics)
                log(f"[eval] step {step} held-out loss {eval_metrics['eval/loss']:.4f} acc {eval_metrics['eval/accuracy']:.3f}")
                last.update(eval_metrics)
        else:
            if pending is not None:
                last = _finish(pending, config, writer, window, force=True) or last
            if step > start_step:  # a run resumed at its last step has nothing new to save
                checkpoint.save(mngr, step, state, data_iter, {**meta, "step": step})
        mngr.wait_until_finished()
        mngr.close()
    writer.close()
    return last


def _finish(pending, config, writer: MetricsWriter, window: dict, force: bool = False) -> dict | None:
    """Reads the metrics of a dispatched step (one step late, so the device stays busy), enforces
    the non-finite limit, and logs every `log_every` steps."""
    step, metrics, stats = pending
    m = jax.device_get(metrics)
    now = time.time()
    window["step_s"] += now - window["done"]
    window["done"] = now
    if int(m["nonfinite_in_a_row"]) >= config.max_nonfinite_in_a_row:
        raise FloatingPointError(
            f"step {step}: {int(m['nonfinite_in_a_row'])} updates in a row had a non-finite loss or gradient "
            f"(max_nonfinite_in_a_row={config.max_nonfinite_in_a_row}); last lr {float(m['lr']):.3g}"
        )
    if step % config.log_every and not force:
        return None
    out = {f"train/{k}": float(v) for k, v in m.items()}
    out["data/skips"] = dict(zip(pipeline.SKIP_REASONS, (int(v) for v in stats.get("skips", []))))
    out["data/repairs"] = dict(zip(pipeline.REPAIR_REASONS, (int(v) for v in stats.get("repairs", []))))
    out["tokens_per_s"] = window["tokens"] / max(window["step_s"], 1e-9)
    out["data_wait_share"] = window["data_s"] / max(window["step_s"], 1e-9)
    out["step_time_s"] = window["step_s"] / config.log_every
    writer.write(step, out)
    writer.progress(step, out)
    window.update(data_s=0.0, step_s=0.0, tokens=0)  # 'done' carries over
    return out


def _evaluator(config, proto, ecfg, local_batch, eval_step, batch_sharding):
    """Held-out loss over the first `eval_batches` batches of `data.eval_sources` (same every time)."""
    if not config.data.eval_sources:
        return None
    eval_data = {"sources": config.data.eval_sources, "weights": {k: 1.0 for k in config.data.eval_sources}}
    batches = mixture.build_stage_batches(
        eval_data, config.stage, proto, ecfg, local_batch, config.seed + 1, jax.process_index(), jax.process_count()
    )

    def run(params) -> dict:
        totals = {"loss_sum": 0.0, "correct_sum": 0.0, "tokens": 0.0}
        for i in range(config.eval_batches):  # random access: no prefetch threads left running
            batch, _ = device_batch(batches[i], batch_sharding)
            for k, v in jax.device_get(eval_step(params, batch)).items():
                totals[k] += float(v)
        n = max(totals["tokens"], 1.0)
        return {"eval/loss": totals["loss_sum"] / n, "eval/accuracy": totals["correct_sum"] / n}

    return run


# ----------------------------------------------------------------------------------------------
# CLI

def main() -> None:
    """The command line; flags are defined here so importing this module defines none."""
    config_flag = config_flags.DEFINE_config_file("config", None, "configs/stageN.py[:arg]", lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, tokenizer")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(argv) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:  # checkpoint libraries log every save at INFO
            logging.set_verbosity(logging.WARNING)
        maybe_initialize_distributed()
        train(config_flag.value, workdir_flag.value)

    app.run(run)


if __name__ == "__main__":
    main()
