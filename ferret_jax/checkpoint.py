"""Orbax checkpoints of a training run: items `state`, `data_iter`, `meta` (DESIGN §9).

    WORKDIR/checkpoints/<step>/state      params, optimizer state, step (+ counters)
                              /data_iter  the grain iterator position (one file per process)
                              /meta       JSON: stage, step, size, model config, mesh

Saves are asynchronous; `wait` before reading a checkpoint back, before evaluation and at exit.
Restores take abstract targets (`jax.ShapeDtypeStruct` with the *current* shardings), so a run
resumes on any mesh. `load_params` reads only the params of a run or of an export (stage
hand-over, inference).
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINTS = "checkpoints"
EXPORT_PARAMS = "params"  # `ferret_jax.export` output: OUT/params + OUT/export.json
EXPORT_META = "export.json"
TOKENIZER_FILE = "tokenizer.model"  # the run's SentencePiece model, in workdirs and exports


def checkpoint_dir(workdir: str) -> str:
    """WORKDIR/checkpoints; bucket paths (gs://...) are kept as they are."""
    return os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir, CHECKPOINTS)


def manager(workdir: str, max_to_keep: int | None = 3, async_save: bool = True, with_data: bool = True) -> ocp.CheckpointManager:
    """The run's checkpoint manager (created on first save). `with_data=False` reads runs whose
    iterator cannot be restored here (another host count) or is not needed (params only)."""
    items = ("state", "data_iter", "meta") if with_data else ("state", "meta")
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        item_names=items,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True),
    )


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, meta: dict) -> None:
    """Starts an (async) save of step `step`; `force` so the final/preemption save always lands."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )


def latest_step(workdir: str) -> int | None:
    """The newest complete checkpoint step of a run, or None."""
    directory = checkpoint_dir(workdir)
    if not epath.Path(directory).exists():
        return None
    with ocp.CheckpointManager(directory, item_names=("state", "meta"), options=ocp.CheckpointManagerOptions(create=False)) as m:
        return m.latest_step()


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, dict]:
    """(state, meta) of `step` onto the shardings of `abstract_state`; `data_iter` is restored in place."""
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iter=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return out["state"], dict(out["meta"])


def read_meta(workdir: str, step: int | None = None) -> dict:
    """The `meta` item of a run's checkpoint (latest by default)."""
    step = latest_step(workdir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
    with ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("meta",), options=ocp.CheckpointManagerOptions(create=False)) as m:
        return dict(m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def _restore_args(abstract: Any) -> Any:
    return ocp.checkpoint_utils.construct_restore_args(abstract)


def load_params(source: str, abstract_params: Any) -> tuple[Any, dict]:
    """(params, meta) from a training run's latest checkpoint or from an export directory.

    `abstract_params` (ShapeDtypeStructs with shardings) selects and places what is read: only
    the params are restored, never the optimizer state.
    """
    export = os.path.join(source, EXPORT_PARAMS)
    if epath.Path(export).exists():
        meta = json.loads((epath.Path(source) / EXPORT_META).read_text())
        with ocp.PyTreeCheckpointer() as c:
            params = c.restore(export, args=ocp.args.PyTreeRestore(item=abstract_params, restore_args=_restore_args(abstract_params)))
        return params, meta
    step = latest_step(source)
    if step is None:
        raise FileNotFoundError(f"{source}: neither a training run with checkpoints nor an export (no {export})")
    path = os.path.join(checkpoint_dir(source), str(step), "state")
    target = {"params": abstract_params}
    with ocp.PyTreeCheckpointer() as c:
        restored = c.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=_restore_args(target), partial_restore=True))
    return restored["params"], read_meta(source, step)


def save_params(out_dir: str, params: Any, meta: dict) -> str:
    """A params-only checkpoint `OUT/params` plus `OUT/export.json` (for inference and init_from)."""
    out_dir = out_dir if "://" in out_dir else os.path.abspath(out_dir)
    path = os.path.join(out_dir, EXPORT_PARAMS)
    if epath.Path(path).exists():
        raise FileExistsError(f"{path} already exists; choose another output directory")
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as c:
        c.save(path, params)
        c.wait_until_finished()
    if jax.process_index() == 0:
        (epath.Path(out_dir) / EXPORT_META).write_text(json.dumps(meta, indent=2))
    return path
