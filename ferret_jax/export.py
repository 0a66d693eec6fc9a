"""Params-only export of a training run, for inference and for the next stage's `init_from`.

    python -m ferret_jax.export --workdir=RUN --out=OUT [--dtype=bfloat16|float32] [--step=N]

Writes `OUT/params` (Orbax; no optimizer state), `OUT/export.json` (stage, step, size, model
config, dtype) and `OUT/tokenizer.model` (the run's tokenizer). Reads on one host, on CPU.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import app, flags, logging

from ferret_jax import checkpoint

DTYPES = ("float32", "bfloat16")


def export(workdir: str, out: str, dtype: str = "float32", step: int | None = None) -> str:
    """Exports the run's checkpoint `step` (default: latest); returns the params path."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    step = checkpoint.latest_step(workdir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}")
    path = os.path.join(checkpoint.checkpoint_dir(workdir), str(step), "state")
    with ocp.PyTreeCheckpointer() as c:
        tree = c.metadata(path).item_metadata.tree
        target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])}
        restored = c.restore(path, args=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                                               restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(dtype)), restored["params"])
    meta = {**checkpoint.read_meta(workdir, step), "dtype": dtype, "source": os.path.abspath(workdir)}
    out_path = checkpoint.save_params(out, params, meta)
    tokenizer = os.path.join(workdir, checkpoint.TOKENIZER_FILE)
    if os.path.exists(tokenizer):
        shutil.copy(tokenizer, os.path.join(out, checkpoint.TOKENIZER_FILE))
    return out_path


def main() -> None:
    """The command line; flags are defined here so importing this module defines none."""
    workdir = flags.DEFINE_string("workdir", None, "training run directory")
    out = flags.DEFINE_string("out", None, "output directory (must not hold an export yet)")
    dtype = flags.DEFINE_enum("dtype", "float32", DTYPES, "dtype of the exported params")
    step = flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
    flags.mark_flags_as_required(["workdir", "out"])

    def run(argv) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        logging.set_verbosity(logging.WARNING)
        print(json.dumps({"exported": export(workdir.value, out.value, dtype.value, step.value), "dtype": dtype.value}))

    app.run(run)


if __name__ == "__main__":
    main()
