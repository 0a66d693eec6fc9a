"""How well a demo run's projectors still carry the warm-up's box code, stage by stage. A probe.

The demo's dense warm-up teaches linear heads on CLIP's and DINOv2's patches to tell the
hundreds digit of each coordinate of the object under a patch, and each projector's first layer
(`fc1`) starts as its encoder's head (`warmup.projectors_from_heads`): 40 of its outputs are then
that box code, the input the stage-III LLM reads boxes from. This probe runs each checkpoint's
encoder and the projector's `fc1` on held-out scenes of the run's world and scores, on the object
patches, how often each coordinate's 10-logit group has its maximum at the true digit (no fitting:
the code as the checkpoint holds it). The warm-up's own params (`RUN/warmup`) are the reference;
the stages show what training them did to the code.

  python benchmarks/probe_box_code.py --run RUN [--run RUN2 ...] [--scenes 200]

Each row: run, checkpoint, view (global / tiles), accuracy of x1, y1, x2, y2 and their mean. The
last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import synthetic
from ferret_jax import config_lib, evaluate, train, warmup
from ferret_jax.convert import load_converted
from ferret_jax.models.ferret import Ferret

SEED = 99
CHECKPOINTS = ("warmup", "stage1", "stage2", "stage3")


def held_out_views(model_config, world: dict, scenes: int) -> dict[str, np.ndarray]:
    """Dense examples of `scenes` held-out scenes, stacked (`warmup.dense_example`'s keys)."""
    source = synthetic.SyntheticSource("test", scenes, SEED, **world)
    rng = np.random.default_rng(SEED)
    rows = [warmup.dense_example(source[i]["scene"], source.categories, model_config, world["grids"], 1, rng)
            for i in range(len(source))]
    return {k: np.stack([r[k] for r in rows]) for k in ("global_image", "global_label", "global_box", "tiles",
                                                        "tile_label", "tile_box", "tile_valid")}


def code_accuracy(features: jax.Array, fc1: dict, label: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Per-coordinate share of object patches (`label > 0`) whose fc1 digit group peaks at the
    true hundreds digit. features `[..., C]`, label `[...]`, box `[..., 4]` -> `[4]`."""
    code = np.asarray(features @ fc1["kernel"] + fc1["bias"])[..., : 40 * warmup.DIGITS]
    code = code.reshape(*code.shape[:-1], 4, warmup.DIGITS, 10)[..., 0, :]
    digits = np.asarray(warmup.box_digits(jnp.asarray(box)))[..., 0]
    return (code.argmax(-1) == digits)[label > 0].mean(0)


def load(run: str, name: str, max_length: int) -> dict | None:
    path = os.path.join(run, name)
    if not os.path.isdir(path):
        return None
    if name == "warmup":
        return load_converted(path)[1]
    return evaluate.load_model(path, max_length)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, help="a `python -m ferret_jax.demo --out` directory")
    parser.add_argument("--scenes", type=int, default=200)
    args = parser.parse_args()

    config = config_lib.stage_config(3, "demo")
    world = evaluate.synthetic_world({"config": {"data": config.data.to_dict()}})
    model_config = train.model_config(config)
    views = held_out_views(model_config, world, args.scenes)
    tile_label = np.where(views["tile_valid"][..., None, None], views["tile_label"], 0)
    encode = jax.jit(lambda p: Ferret(model_config).apply(
        {"params": p}, jnp.asarray(views["global_image"]), jnp.asarray(views["tiles"]), method=Ferret.encode_images)[:2])
    results = {}
    for run in args.run:
        for name in CHECKPOINTS:
            params = load(run, name, config.data.max_length)
            if params is None:
                continue
            f_g, f_l = encode(params)
            for view, feats, proj, label, box in (
                ("global", f_g, "proj_global", views["global_label"], views["global_box"]),
                ("tiles", f_l, "proj_local", tile_label, views["tile_box"]),
            ):
                acc = code_accuracy(feats, params[proj]["fc1"], label, box)
                results[f"{run}:{name}:{view}"] = [round(float(a), 3) for a in acc]
                print(f"{run:32s} {name:8s} {view:7s} x1 {acc[0]:.3f}  y1 {acc[1]:.3f}  x2 {acc[2]:.3f}  "
                      f"y2 {acc[3]:.3f}  mean {acc.mean():.3f}", flush=True)
    print(json.dumps({"scenes": args.scenes, "accuracy_x1_y1_x2_y2": results}))


if __name__ == "__main__":
    main()
