"""Shared pieces of the trainer, inference and evaluation tests: tiny stage configs (also as
command-line flags), workdirs with the synthetic tokenizer, metrics and checkpoint readers,
trainer subprocesses, a tiny random export."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from data_pipelines import mixture
from ferret_jax import checkpoint, config_lib, train
from ferret_jax.models.ferret import Ferret, example_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Overrides every run here shares; written as CLI flags so subprocess runs are the same runs.
COMMON = {"eval_every": 1000, "ckpt_every": 1000, "tensorboard": False}


def tokenizer_proto():
    return mixture.synthetic_tokenizer(config_lib.backbones("tiny")["llm"].vocab_size - 1)


def config(stage, **overrides):
    c = config_lib.stage_config(stage, "tiny")
    for key, value in {**COMMON, **overrides}.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def cli_flags(stage, **overrides):
    out = [f"--config={ROOT}/configs/stage{stage}.py:tiny"]
    for key, value in {**COMMON, **overrides}.items():
        out.append(f"--config.{key}={value}")
    return out


def prepare(workdir, proto):
    os.makedirs(workdir, exist_ok=True)  # the synthetic tokenizer is trained once per module
    with open(os.path.join(workdir, train.TOKENIZER_FILE), "wb") as f:
        f.write(proto)
    return str(workdir)


def losses(workdir):
    out = {}
    with open(os.path.join(workdir, train.METRICS_FILE)) as f:
        for line in f:
            m = json.loads(line)
            if "train/loss" in m:
                out[m["step"]] = m["train/loss"]
    return out


def init_params(seed=0):
    cfg = config_lib.ferret_config("tiny")
    return jax.jit(lambda k: train._values(Ferret(cfg).init(k, example_batch(cfg))["params"]))(jax.random.key(seed))


def params_of(workdir, stage):
    """The latest checkpoint's params (host numpy)."""
    cfg = config_lib.ferret_config("tiny", **dict(config(stage).model))
    abstract = train._values(jax.eval_shape(Ferret(cfg).init, jax.random.key(0), example_batch(cfg))["params"])
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single), abstract)
    params, meta = checkpoint.load_params(workdir, target)
    return jax.tree.map(np.asarray, params), meta


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def metric_lines(workdir) -> int:
    path = os.path.join(workdir, train.METRICS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def trainer_process(args, log_path, env=None):
    """`python -m ferret_jax.train ARGS` with its output in `log_path` (a pipe could fill and block it)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", **(env or {})}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "ferret_jax.train", *args], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log_path
    return proc


def output(proc) -> str:
    with open(proc.log_path) as f:
        return f.read()


def wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}):\n{output(proc)[-3000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def write_tiny_export(out: str, max_length: int, system_prompt: bool | None = None) -> str:
    """A tiny random model exported with its synthetic tokenizer (random params straight from the
    abstract shapes: no slow init); `system_prompt` None leaves the key out of the meta."""
    import dataclasses

    cfg = config_lib.ferret_config("tiny")
    abstract = train._values(jax.eval_shape(Ferret(cfg).init, jax.random.key(0), example_batch(cfg))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(0.0, 0.05, a.shape).astype(a.dtype), abstract)
    data = {"max_length": max_length} | ({} if system_prompt is None else {"system_prompt": system_prompt})
    meta = {"stage": 3, "size": "tiny", "model": dataclasses.asdict(cfg), "config": {"data": data}}
    checkpoint.save_params(out, params, meta)
    with open(os.path.join(out, train.TOKENIZER_FILE), "wb") as f:
        f.write(mixture.synthetic_tokenizer(cfg.llm.vocab_size - 1, scenes=20))
    return out
