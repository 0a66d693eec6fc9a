"""HF safetensors checkpoints -> ferret_jax params (CLIP, DINOv2, LLaMA), and the saved result.

`python -m ferret_jax.convert --clip DIR --dinov2 DIR --llm DIR --out DIR` writes an Orbax params
checkpoint `OUT/params` with the subtrees `clip`, `dino`, `llm` and `OUT/backbones.json` with their
configs: the `pretrained` init of training. The CPU demo's warm-ups write the same layout, with a
warmed `sampler` and both projectors beside them.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from ferret_jax.convert.clip import convert_clip
from ferret_jax.convert.dinov2 import convert_dinov2
from ferret_jax.convert.llama import convert_llama
from ferret_jax.convert.safetensors_io import CheckpointError, TensorSource
from ferret_jax.models.clip import ClipConfig
from ferret_jax.models.dinov2 import Dinov2Config
from ferret_jax.models.ferret import ProjectorConfig
from ferret_jax.models.llama import LlamaConfig
from ferret_jax.models.sampler import SamplerConfig

__all__ = [
    "CheckpointError",
    "TensorSource",
    "convert_clip",
    "convert_dinov2",
    "convert_llama",
    "converted_configs",
    "load_converted",
    "save_converted",
]

CONFIG_TYPES = {"clip": ClipConfig, "dino": Dinov2Config, "llm": LlamaConfig, "sampler": SamplerConfig,
                "proj_global": ProjectorConfig, "proj_local": ProjectorConfig}
PARAMS_DIR = "params"
CONFIGS_FILE = "backbones.json"


def save_converted(out_dir: str, configs: dict, params: dict, report: dict | None = None) -> str:
    """Writes `params` (nested dicts of arrays) as an Orbax checkpoint plus the configs as JSON."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, PARAMS_DIR)
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose another --out")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)
        ckptr.wait_until_finished()
    meta = {"configs": {k: dataclasses.asdict(v) for k, v in configs.items()}, "report": report or {}}
    with open(os.path.join(out_dir, CONFIGS_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return path


def converted_configs(out_dir: str) -> dict:
    """The backbone configs (`{'clip': ClipConfig, ...}`, only those converted) of a `save_converted` dir."""
    path = os.path.join(out_dir, CONFIGS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {out_dir} is not a `python -m ferret_jax.convert` output")
    with open(path) as f:
        meta = json.load(f)
    return {k: CONFIG_TYPES[k](**v) for k, v in meta["configs"].items()}


def load_converted(out_dir: str, abstract_params=None) -> tuple[dict, dict]:
    """(configs, params) written by `save_converted`. Pass `abstract_params` (ShapeDtypeStructs
    with shardings, for the subtrees the dir holds) to restore directly onto a mesh."""
    import orbax.checkpoint as ocp

    configs = converted_configs(out_dir)
    with ocp.StandardCheckpointer() as ckptr:
        path = os.path.join(os.path.abspath(out_dir), PARAMS_DIR)
        params = ckptr.restore(path, abstract_params) if abstract_params is not None else ckptr.restore(path)
    return configs, params


def convert_all(
    clip: str | None = None,
    dinov2: str | None = None,
    llm: str | None = None,
    added_tokens: int = 1,
    dtype=np.float32,
    log=print,
) -> tuple[dict, dict, dict]:
    """Converts the given backbone folders; returns (configs, params, report of skipped tensors)."""
    configs, params, report = {}, {}, {}
    jobs = [
        ("clip", clip, lambda d: convert_clip(d, dtype)),
        ("dino", dinov2, lambda d: convert_dinov2(d, dtype)),
        ("llm", llm, lambda d: convert_llama(d, added_tokens, dtype)),
    ]
    if not any(d for _, d, _ in jobs):
        raise ValueError("nothing to convert: give at least one of clip, dinov2, llm")
    for key, directory, fn in jobs:
        if not directory:
            continue
        log(f"[convert] {key}: reading {directory}")
        configs[key], params[key], skipped = fn(directory)
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params[key]))
        log(f"[convert] {key}: {n:,} params; {len(skipped)} tensors deliberately unused")
        report[key] = {"source": os.path.abspath(directory), "params": n, "unused_tensors": skipped}
    return configs, params, report

