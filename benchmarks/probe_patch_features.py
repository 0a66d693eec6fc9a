"""What a demo checkpoint's encoder patches tell about the object under them. A probe.

For the two-object grounding question the LLM must find the asked object's patches by its name
(DEMO_RUNS.md). This probe runs a trained checkpoint's encoders (`evaluate.load_model`)
on held-out scenes of its world, labels every CLIP global-view and DINOv2 tile patch with the
object under its centre (`warmup.dense_example`, as the dense warm-up does), fits linear
(softmax-regression) probes for the category, the shape and the colour (background a class of
each) on all patches of half of the views, and scores them on the other half's object patches,
interior ones (their four neighbours show the same object) and edge ones apart.

  python benchmarks/probe_patch_features.py --checkpoint RUN/stage3 [--scenes 300]

The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import anyres, synthetic
from ferret_jax import evaluate, warmup
from ferret_jax.models.ferret import Ferret

BATCH, SEED = 16, 99
PROBE_STEPS, PROBE_LR, PROBE_DECAY = 500, 0.05, 1e-3


def interior(label: np.ndarray) -> np.ndarray:
    """bool `[p, p]`: patches whose four neighbours carry the same label (outside counts as other)."""
    p = np.pad(label, 1, constant_values=-1)
    c = p[1:-1, 1:-1]
    return (c == p[:-2, 1:-1]) & (c == p[2:, 1:-1]) & (c == p[1:-1, :-2]) & (c == p[1:-1, 2:])


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, classes: int) -> np.ndarray:
    """Predicted classes of `x_test` `[N, D]` by a softmax-regression probe fit on `x_train`
    (standardized features, full-batch Adam, a little weight decay)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x, xt = jnp.asarray((x_train - mean) / std), jnp.asarray((x_test - mean) / std)
    y = jnp.asarray(y_train)
    params = {"w": jnp.zeros((x.shape[1], classes)), "b": jnp.zeros(classes)}
    tx = optax.adamw(PROBE_LR, weight_decay=PROBE_DECAY)

    @jax.jit
    def step(params, state):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()  # noqa: E731
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(PROBE_STEPS):
        params, state = step(params, state)
    return np.asarray(jnp.argmax(xt @ params["w"] + params["b"], 1))


def patches(model, params, examples: list[dict]) -> dict:
    """{'clip' | 'dino': (features `[N, p, p, D]`, labels `[N, p, p]`)}, one entry per view."""
    encode = jax.jit(lambda p, g, t: model.apply({"params": p}, g, t, method=Ferret.encode_images)[:2])
    out = {"clip": ([], []), "dino": ([], [])}
    for start in range(0, len(examples), BATCH):
        batch = examples[start : start + BATCH]
        f_g, f_l = (np.asarray(f) for f in encode(params, jnp.stack([e["global_image"] for e in batch]),
                                                  jnp.stack([e["tiles"] for e in batch])))
        for j, e in enumerate(batch):
            out["clip"][0].append(f_g[j])
            out["clip"][1].append(e["global_label"])
            for t in np.flatnonzero(e["tile_valid"]):
                out["dino"][0].append(f_l[j, t])
                out["dino"][1].append(e["tile_label"][t])
    return {k: (np.stack(f), np.stack(lab)) for k, (f, lab) in out.items()}


def probe_views(views: dict, names: tuple[str, ...]) -> dict:
    """Linear (softmax-regression) probes of the category, shape and colour per view ({'clip' | 'dino': (features
    `[N, p, p, D]`, labels `[N, p, p]`)}), fit on the first half of the views, scored on the rest,
    interior and edge object patches apart. Returns flat `{view}_{part}_{what}` accuracies and
    `{view}_{part}_patches` counts."""
    shape_of = np.array([0] + [1 + synthetic.SHAPES.index(n.split()[-1]) for n in names])
    colour_of = np.array([0] + [1 + list(synthetic.COLOURS).index(n.split()[-2]) for n in names])
    result = {}
    for view, (features, labels) in views.items():
        half = len(features) // 2
        x = features.reshape(len(features), -1, features.shape[-1])
        y = labels.reshape(len(labels), -1)
        inner = np.stack([interior(lab) for lab in labels]).reshape(len(labels), -1)
        x_train, y_train = x[:half].reshape(-1, x.shape[-1]), y[:half].reshape(-1)
        x_test, y_test, inner_test = x[half:].reshape(-1, x.shape[-1]), y[half:].reshape(-1), inner[half:].reshape(-1)
        parts = {"interior": (y_test > 0) & inner_test, "edge": (y_test > 0) & ~inner_test}
        result.update({f"{view}_{part}_patches": int(mask.sum()) for part, mask in parts.items()})
        for what, of, classes in (("category", np.arange(len(names) + 1), len(names) + 1),
                                  ("shape", shape_of, len(synthetic.SHAPES) + 1), ("colour", colour_of, len(synthetic.COLOURS) + 1)):
            predicted = linear_probe(x_train, of[y_train], x_test, classes)
            for part, mask in parts.items():
                result[f"{view}_{part}_{what}"] = round(float(np.mean(predicted[mask] == of[y_test][mask])), 3) if mask.any() else None
        print(f"{view}: object patches {result[f'{view}_interior_patches']} interior, {result[f'{view}_edge_patches']} edge; "
              + "; ".join(f"{what} {result[f'{view}_interior_{what}']} / {result[f'{view}_edge_{what}']}"
                          for what in ("category", "shape", "colour")) + " (interior / edge)")
    return result


def held_out_examples(world: dict, config, scenes: int) -> tuple[list[dict], tuple[str, ...]]:
    """`warmup.dense_example`s of `scenes` held-out scenes of `world`, and the world's names."""
    source = synthetic.SyntheticSource("val", scenes, SEED, **world)
    rng = np.random.default_rng(0)
    names = source.categories
    return [warmup.dense_example(source[i]["scene"], names, config, world.get("grids", anyres.GRIDS), 1, rng) for i in range(scenes)], names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a demo stage's workdir or an export")
    p.add_argument("--scenes", type=int, default=300)
    args = p.parse_args()

    model, params, _, _ = evaluate.load_model(args.checkpoint)
    world = evaluate.synthetic_world(evaluate.source_meta(args.checkpoint)) or {}
    examples, names = held_out_examples(world, model.config, args.scenes)
    result = {"checkpoint": args.checkpoint, "scenes": args.scenes, **probe_views(patches(model, params, examples), names)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
