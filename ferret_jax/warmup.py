"""Warm-ups on the synthetic world: what stands in for the pretrained backbones of the paper.

Dense encoder warm-up (`warm_up`). Ferret-v2 starts from pretrained encoders whose patch features
already say what is where; the CPU demo's encoders start from random weights. This short
supervised run gives them that property on the synthetic world before stage I: every patch of
every view (CLIP's global view, DINOv2's tiles) predicts, through a linear head, the category of
the object under its centre (or background) and that object's box in the view's coordinates,
quantized like Pix2Seq: the leading (hundreds) digit of each 0-999 coordinate as a 10-way class;
a background patch, which has no box, has its digit logits pushed flat (KL to uniform), so the box
code below is ~0 off the objects and an average over the image is the objects' code. The
sampler learns alongside, on the encoders' raw features, to tell each object's category from a
point, box or free-form region on it: trained only through the LLM in the stages, its region
features had not encoded the shape at all (a linear probe read it at chance after stage III).
The dense heads' box-digit halves become the first layers of the projectors
(`projector_from_head`): each projector's GELU then starts on its encoder's box-digit logits, a
sparse code of where the patch's object is, instead of on a random mix of its features (the
category logits stay out: with them too, the stage-III models stopped reading the referred
region's feature; DEMO_RUNS.md). CLIP, DINOv2, the sampler and the two
projectors are written in the `python -m ferret_jax.convert` layout (with the warmed LLM, by
`demo.warm_up_backbones`), so a stage config picks them up with `init.pretrained=DIR`.

Targets come from the same any-res preprocessing the training batches use, so a patch's label is
the object it really shows in that view.

Language warm-up (`language_warm_up`), the stand-in for the pretrained LLM: the LLM alone learns
the answers of the world's stage-III conversations and stage-I captions from their text (no
image, coordinates scrambled): the answer formats, and to take the object's name from the
question, which the random LLM otherwise did not learn within the demo's stages. The referring
questions' region slots carry real region features of the warmed sampler (`region_feature_bank`),
so the LLM also comes to the stages reading the referred object's category from its region.
"""

from __future__ import annotations

import collections
import functools
import itertools
import re
import time
from typing import Callable, Iterator, Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import anyres, pipeline, regions, synthetic, tasks, text
from data_pipelines.example import ExampleError
from ferret_jax import compiler, losses, train
from ferret_jax.models.clip import ClipVision
from ferret_jax.models.dinov2 import Dinov2
from ferret_jax.models.ferret import FerretConfig, Projector, region_point_features
from ferret_jax.models.llama import Llama, LlamaConfig
from ferret_jax.models.sampler import Sampler

MAX_TEXT_REGIONS = 4  # `<region_fea>` slots per language warm-up conversation that can carry a feature
# Leading digits of each 0-999 coordinate predicted per patch: the hundreds alone. A tens digit is
# under a pixel of the demo's views (48-64 pixels); predicting it too left the heads' first digit 61-76%
# right (70-89% without) and put 40 near-noise logits into the projectors' box code (DEMO_RUNS.md).
DIGITS = 1


def view_windows(grid: Sequence[int], max_tiles: int) -> np.ndarray:
    """Normalized image windows `[1 + max_tiles, 4]` (x1, y1, x2, y2) seen by the global view and
    by each tile of a (cols, rows) grid, row-major; unused tile rows are zeros."""
    cols, rows = int(grid[0]), int(grid[1])
    windows = np.zeros((1 + max_tiles, 4), np.float64)
    windows[0] = (0, 0, 1, 1)
    for t in range(cols * rows):
        r, c = divmod(t, cols)
        windows[1 + t] = (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
    return windows


def patch_targets(
    object_index: np.ndarray, boxes: np.ndarray, window: np.ndarray, patches: int
) -> tuple[np.ndarray, np.ndarray]:
    """Targets of one square view split into `patches x patches` patches.

    object_index: int `[H, W]`, 0 = background, k = object k-1 (the image's pixels).
    boxes: float `[N, 4]` normalized object boxes (x1, y1, x2, y2) in the image (inclusive pixel
      box / image size, so that 1000x gives the text coordinates of `text.box_text`).
    window: the normalized image window (x1, y1, x2, y2) the view shows (stretched to a square).
    Returns (object `[p, p]` int32 with 0 = background, box `[p, p, 4]` float32 of that object in
    the view's normalized coordinates, clipped to [0, 1]; zeros on background).
    """
    h, w = object_index.shape
    centres = (np.arange(patches) + 0.5) / patches
    xs = window[0] + centres * (window[2] - window[0])
    ys = window[1] + centres * (window[3] - window[1])
    cols = np.clip((xs * w).astype(int), 0, w - 1)
    rows = np.clip((ys * h).astype(int), 0, h - 1)
    obj = object_index[rows[:, None], cols[None, :]].astype(np.int32)  # [p(y), p(x)]
    size = np.array([window[2] - window[0], window[3] - window[1]] * 2)
    in_view = np.clip((boxes - np.array([window[0], window[1]] * 2)) / size, 0.0, 1.0)
    box = np.where((obj > 0)[..., None], in_view[np.maximum(obj - 1, 0)], 0.0).astype(np.float32)
    return obj, box


def dense_example(scene: synthetic.Scene, categories: Sequence[str], config: FerretConfig, grids, max_regions: int,
                  rng: np.random.Generator) -> dict:
    """One scene -> the encoders' inputs (as in training batches) and their dense targets:
    `global_image [S, S, 3]`, `tiles [T, c, c, 3]`, `grid [2]`, `global_label [g, g]`,
    `global_box [g, g, 4]`, `tile_label [T, t, t]`, `tile_box [T, t, t, 4]`, `tile_valid [T]`;
    and the first `max_regions` objects as referred regions (a point, box or free-form shape at
    random, sampled as in training batches): `region_points [R, P, 2]`, `region_valid [R]`,
    `region_label [R]`. Labels are 0 for background (and unused regions), 1 + the category's index
    otherwise."""
    views = anyres.preprocess(scene.image, global_size=config.global_size, cell=config.cell,
                              max_tiles=config.max_tiles, grids=grids)
    w, h = scene.size
    object_index = np.zeros((h, w), np.int32)
    for k, o in enumerate(scene.objects):
        object_index[o.mask] = k + 1
    boxes = np.array([(o.box[0] / w, o.box[1] / h, o.box[2] / w, o.box[3] / h) for o in scene.objects])
    category = np.array([0] + [1 + categories.index(o.name) for o in scene.objects], np.int32)
    windows = view_windows(views["grid"], config.max_tiles)
    g, t = config.global_grid, config.tile_grid
    global_obj, global_box = patch_targets(object_index, boxes, windows[0], g)
    used = int(np.prod(views["grid"]))
    tile_label = np.zeros((config.max_tiles, t, t), np.int32)
    tile_box = np.zeros((config.max_tiles, t, t, 4), np.float32)
    for i in range(used):
        obj, tile_box[i] = patch_targets(object_index, boxes, windows[1 + i], t)
        tile_label[i] = category[obj]
    points = np.zeros((max_regions, config.sampler.num_points, 2), np.float32)
    region_label = np.zeros(max_regions, np.int32)
    for k, o in enumerate(scene.objects[:max_regions]):
        kind = tasks.REFERRING_KINDS[rng.integers(len(tasks.REFERRING_KINDS))]
        region, seg, _ = tasks.referring_region(tasks.Annotation(o.name, o.box, o.mask), kind, rng, w, h)
        points[k] = regions.region_points(region, w, h, rng, seg, config.sampler.num_points)
        region_label[k] = category[k + 1]
    return {
        "global_image": views["global_image"], "tiles": views["tiles"], "grid": np.asarray(views["grid"], np.int32),
        "global_label": category[global_obj], "global_box": global_box,
        "tile_label": tile_label, "tile_box": tile_box, "tile_valid": np.arange(config.max_tiles) < used,
        "region_points": points, "region_valid": region_label > 0, "region_label": region_label,
    }


def box_digits(box: jax.Array) -> jax.Array:
    """Normalized coordinates `[..., 4]` -> their 0-999 canvas integers' leading digits
    `[..., 4, DIGITS]` (hundreds first)."""
    canvas = jnp.clip(jnp.floor(box * 1000), 0, 999).astype(jnp.int32)
    return jnp.stack([(canvas // 10 ** (2 - i)) % 10 for i in range(DIGITS)], axis=-1)


class DenseHeads(nn.Module):
    """CLIP, DINOv2 and the sampler (param subtrees `clip`, `dino`, `sampler`, as in Ferret) with
    linear heads on a batch of `dense_example`s: `[B, g, g, K + 40 * DIGITS]` for the global view,
    `[B, T, t, t, K + 40 * DIGITS]` for the tiles (K label logits, then 10 logits per digit of each
    coordinate) and `[B, R, K]` for the referred regions (the sampler on the encoders' raw features,
    as Ferret's `sampler_input='raw'`); last, the region features themselves `[B, R, D]`."""

    config: FerretConfig
    num_labels: int  # categories + background

    @nn.compact
    def __call__(self, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.config
        if cfg.sampler_input != "raw":
            raise ValueError(f"the warm-up trains the sampler on raw encoder features, got sampler_input={cfg.sampler_input!r}")
        tiles = batch["tiles"]
        b, t = tiles.shape[:2]
        f_g = ClipVision(cfg.clip, name="clip")(batch["global_image"])
        f_l = Dinov2(cfg.dino, name="dino")(tiles.reshape(b * t, *tiles.shape[2:]))
        f_l = f_l.reshape(b, t, *f_l.shape[1:])
        points = batch["region_points"]
        feats = region_point_features(points, batch["grid"], f_g, f_l, cfg.fusion)
        region_feats = Sampler(cfg.sampler, cfg.llm.hidden_size, name="sampler")(points, feats, batch["region_valid"])
        head = lambda name, n: nn.Dense(n, dtype=jnp.float32, name=name)  # noqa: E731
        dense = self.num_labels + 40 * DIGITS
        return (head("clip_head", dense)(f_g.astype(jnp.float32)), head("dino_head", dense)(f_l.astype(jnp.float32)),
                head("region_head", self.num_labels)(region_feats.astype(jnp.float32)), region_feats)


def _view_loss(out: jax.Array, label: jax.Array, box: jax.Array, weight: jax.Array, num_labels: int) -> tuple[jax.Array, dict]:
    """Cross-entropy of the labels on all weighted patches + of the box digits on object patches
    + KL(uniform || digit softmax) on background patches.
    out `[..., p, p, K + 40 * DIGITS]`, weight `[..., p, p]`."""
    logits = out[..., :num_labels]
    digit_logits = out[..., num_labels:].reshape(*out.shape[:-1], 4, DIGITS, 10)
    digits = box_digits(box)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, label)
    digit_ce = optax.softmax_cross_entropy_with_integer_labels(digit_logits, digits).mean((-1, -2))
    on_object = weight * (label > 0)
    on_background = weight * (label == 0)
    n, n_obj = jnp.maximum(weight.sum(), 1.0), jnp.maximum(on_object.sum(), 1.0)
    # background patches: no box, so their digit logits are pushed flat (KL to uniform)
    flat = (-jax.nn.log_softmax(digit_logits, -1).mean(-1) - jnp.log(10.0)).mean((-1, -2))
    flat_kl = (flat * on_background).sum() / jnp.maximum(on_background.sum(), 1.0)
    correct = jnp.argmax(logits, -1) == label
    first_digit = (jnp.argmax(digit_logits[..., 0, :], -1) == digits[..., 0]).mean(-1)
    metrics = {"ce": (ce * weight).sum() / n, "digit_ce": (digit_ce * on_object).sum() / n_obj,
               "acc": (correct * weight).sum() / n, "object_acc": (correct * on_object).sum() / n_obj,
               "first_digit_acc": (first_digit * on_object).sum() / n_obj, "background_kl": flat_kl}
    return metrics["ce"] + metrics["digit_ce"] + flat_kl, metrics


def dense_loss(params, batch: dict, model: DenseHeads) -> tuple[jax.Array, dict]:
    """Mean of the CLIP and DINOv2 view losses of a batch of `dense_example`s, plus the
    cross-entropy of the referred regions' categories."""
    out_g, out_l, out_r, _ = model.apply({"params": params}, batch)
    labels = model.num_labels
    loss_g, m_g = _view_loss(out_g, batch["global_label"], batch["global_box"], jnp.ones(batch["global_label"].shape), labels)
    tile_weight = jnp.broadcast_to(batch["tile_valid"][..., None, None], batch["tile_label"].shape).astype(jnp.float32)
    loss_l, m_l = _view_loss(out_l, batch["tile_label"], batch["tile_box"], tile_weight, labels)
    valid = batch["region_valid"].astype(jnp.float32)
    n = jnp.maximum(valid.sum(), 1.0)
    region_ce = (optax.softmax_cross_entropy_with_integer_labels(out_r, batch["region_label"]) * valid).sum() / n
    region_acc = ((jnp.argmax(out_r, -1) == batch["region_label"]) * valid).sum() / n
    loss = (loss_g + loss_l) / 2 + region_ce
    metrics = {"loss": loss, **{f"clip_{k}": v for k, v in m_g.items()}, **{f"dino_{k}": v for k, v in m_l.items()},
               "region_ce": region_ce, "region_acc": region_acc}
    return loss, metrics


def dense_dataset(world: dict, config: FerretConfig, batch_size: int, seed: int, split: str = "train") -> grain.IterDataset:
    """Endless shuffled batches of `dense_example`s of the synthetic `world` (make_scene options),
    with a region slot for each of the world's `max_objects`."""
    source = synthetic.SyntheticSource(split, 100_000, seed=seed, **world)
    max_regions = world.get("max_objects", synthetic.MAX_OBJECTS)
    categories = list(source.categories)
    grids = world.get("grids", anyres.GRIDS)
    return (grain.MapDataset.source(source).shuffle(seed=seed).repeat()
            .random_map(lambda r, rng: dense_example(r["scene"], categories, config, grids, max_regions, rng), seed=seed)
            .batch(batch_size, drop_remainder=True)
            .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def adamw_fit(
    loss_fn: Callable, init_fn: Callable, batches: Iterator[dict], *, steps: int, lr: float, seed: int, tag: str,
    describe: Callable[[dict], str], log_every: int, log: Callable[[str], None],
) -> tuple[dict, dict]:
    """`steps` AdamW steps (warmup + cosine, global-norm clipping) of `loss_fn(params, batch) ->
    (loss, metrics)` from `init_fn(key, first_batch)` (a Linen `init`'s params), logging
    `[tag] step i/n <describe(metrics)> <seconds>`. Returns the params and the last step's metrics
    with `initial_loss` (step 1's), `steps` and `seconds`."""
    first = next(batches)
    params = jax.jit(lambda k: train._values(init_fn(k, first)))(jax.random.key(seed))
    batches = itertools.chain([first], batches)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = tx.init(params)

    @functools.partial(jax.jit, compiler_options=compiler.step_options())
    def step(params, opt_state, batch):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    start, metrics, initial_loss = time.time(), {}, None
    for i in range(1, steps + 1):
        params, opt_state, metrics = step(params, opt_state, next(batches))
        if i == 1:
            initial_loss = float(metrics["loss"])
        if i % log_every == 0 or i == steps:
            log(f"[{tag}] step {i}/{steps}  {describe(jax.device_get(metrics))}  {time.time() - start:.0f}s")
    result = {k: float(v) for k, v in jax.device_get(metrics).items()}
    return params, result | {"initial_loss": initial_loss, "steps": steps, "seconds": time.time() - start}


def warm_up(
    config: FerretConfig, world: dict, *, steps: int, batch_size: int, lr: float, seed: int = 0,
    log_every: int = 50, log: Callable[[str], None] = print,
) -> tuple[dict, dict, np.ndarray]:
    """Trains CLIP + DINOv2 with dense heads and the sampler with a region head for `steps` steps.
    Returns (`{'clip', 'dino', 'sampler', 'proj_global', 'proj_local'}` params for
    `save_converted`, the projectors started from the dense heads' box-digit logits, left out when
    those are more than the LLM's width; the `adamw_fit` metrics and `projectors_from_heads`; the
    warmed sampler's `region_feature_bank` for `language_warm_up`)."""
    num_labels = 1 + len(synthetic.category_names(world.get("name_sizes", True)))
    model = DenseHeads(config, num_labels)
    init = lambda k, b: model.init(k, jax.tree.map(lambda x: x[:1], b))["params"]  # noqa: E731
    describe = lambda m: (f"object-patch acc clip {m['clip_object_acc']:.3f} dino {m['dino_object_acc']:.3f}  "  # noqa: E731
                          f"first box digit clip {m['clip_first_digit_acc']:.3f} dino {m['dino_first_digit_acc']:.3f}  "
                          f"region acc {m['region_acc']:.3f}")
    batches = iter(dense_dataset(world, config, batch_size, seed))
    params, result = adamw_fit(functools.partial(dense_loss, model=model), init, batches,
                               steps=steps, lr=lr, seed=seed, tag="warmup", describe=describe, log_every=log_every, log=log)
    # the projectors' random part: a key apart from the warm-up's init (seed)
    projectors = projectors_from_heads(params, num_labels, config.llm.hidden_size, jax.random.key(seed + 7))
    if not projectors:
        log(f"[warmup] the dense heads' {40 * DIGITS} digit logits do not fit the LLM width {config.llm.hidden_size}: "
            "the projectors keep their random init")
    result["projectors_from_heads"] = bool(projectors)
    # the bank's scenes: a data order apart from the warm-up's own (seed)
    bank = region_feature_bank(params, model, dense_dataset(world, config, batch_size, seed + 11), num_labels)
    log(f"[warmup] region feature bank: {int((np.abs(bank).sum((1, 2)) > 0).sum())} of {num_labels - 1} categories")
    return jax.device_get({**{k: params[k] for k in ("clip", "dino", "sampler")}, **projectors}), result, bank


def region_feature_bank(params: dict, model: DenseHeads, batches: Iterator[dict], num_labels: int,
                        num_batches: int = 20, per_category: int = 16) -> np.ndarray:
    """`[num_labels, per_category, D]` region features of the warmed sampler, by category: the
    first `per_category` regions of each category in `num_batches` batches of `dense_example`s
    (repeated when fewer were drawn; row 0, background, and categories never drawn stay zero).
    The language warm-up shows them to the LLM in the referring questions' region slots."""
    features = jax.jit(lambda p, b: model.apply({"params": p}, b)[3])
    feats, labels = [], []
    for batch in itertools.islice(iter(batches), num_batches):
        valid = np.asarray(batch["region_valid"])
        feats.append(np.asarray(features(params, batch))[valid])
        labels.append(np.asarray(batch["region_label"])[valid])
    feats, labels = np.concatenate(feats), np.concatenate(labels)
    bank = np.zeros((num_labels, per_category, feats.shape[-1]), np.float32)
    for c in range(1, num_labels):
        rows = feats[labels == c]
        if len(rows):
            bank[c] = rows[np.arange(per_category) % len(rows)]
    return bank


def projector_from_head(head: dict, groups: Sequence[int], features: int, key: jax.Array) -> dict:
    """Params of a `Projector` (C -> `features`) whose fc1 starts as a linear head
    `{'kernel' [C, N], 'bias' [N]}` with each group of its logits (`groups` sizes, summing to
    N <= features) centred on the group's mean: the GELU after fc1 then passes each group's
    above-average classes, a sparse code of the head's prediction. The other fc1 columns and fc2
    keep the projector's random init from `key`."""
    kernel, bias = head["kernel"], head["bias"]
    n = sum(groups)
    if kernel.shape[1] != n or n > features:
        raise ValueError(f"head of {kernel.shape[1]} outputs for groups summing to {n}, projector width {features}")
    params = train._values(Projector(features).init(key, jnp.zeros((1, kernel.shape[0])))["params"])
    ends = np.cumsum(groups)
    centred = lambda x: jnp.concatenate([g - g.mean(-1, keepdims=True) for g in jnp.split(x, ends[:-1], -1)], -1)  # noqa: E731
    params["fc1"]["kernel"] = params["fc1"]["kernel"].at[:, :n].set(centred(kernel))
    params["fc1"]["bias"] = params["fc1"]["bias"].at[:n].set(centred(bias))
    return params


def projectors_from_heads(params: dict, num_labels: int, width: int, key: jax.Array) -> dict:
    """`proj_global` and `proj_local` params (C -> `width`) started from the box-digit logits of
    the warmed `clip_head` and `dino_head` (`projector_from_head`; the `num_labels` category
    logits before them are left out); {} when those 40 * DIGITS logits are more than `width`."""
    groups = (10,) * (4 * DIGITS)
    if sum(groups) > width:
        return {}
    digit_head = lambda h: {"kernel": h["kernel"][:, num_labels:], "bias": h["bias"][num_labels:]}  # noqa: E731
    return {name: projector_from_head(digit_head(params[head]), groups, width, key)
            for name, head in (("proj_global", "clip_head"), ("proj_local", "dino_head"))}


# ----------------------------------------------------------------------------------------------
# Language warm-up: what stands in for the pretrained LLM (Vicuna) the paper starts from.


def scramble_coordinates(turns: Sequence[tuple[str, str]], rng: np.random.Generator) -> list[tuple[str, str]]:
    """The turns with every number (a 0-999 coordinate) replaced through one random permutation of
    0-999: a coordinate repeated in the conversation stays repeated, what the boxes of the world
    look like is gone."""
    permutation = rng.permutation(text.CANVAS)
    return [(role, re.sub(r"\d+", lambda m: str(permutation[int(m.group())]), value)) for role, value in turns]


def text_example(turns: Sequence[tuple[str, str]], tokenizer: text.Tokenizer, max_length: int, system_prompt: bool = True) -> dict:
    """A conversation without its image -> next-token arrays `tokens [L]`, `targets [L]`,
    `loss_mask [L]` (the answers, as in training batches), zero-padded. Raises
    ExampleError('too_long') when it does not fit."""
    ids, weights = text.tokenize_conversation(turns, tokenizer, system_prompt)
    n = len(ids) - 1
    if n > max_length:
        raise ExampleError("too_long", f"{n} tokens > max_length {max_length}")
    out = {"tokens": np.zeros(max_length, np.int32), "targets": np.zeros(max_length, np.int32),
           "loss_mask": np.zeros(max_length, np.float32)}
    out["tokens"][:n], out["targets"][:n], out["loss_mask"][:n] = ids[:-1], ids[1:], weights[1:]
    return out


def language_dataset(world: dict, tokenizer: text.Tokenizer, batch_size: int, max_length: int, seed: int,
                     system_prompt: bool = True, skipped: collections.Counter | None = None,
                     caption_share: float = 0.0) -> grain.IterDataset:
    """Endless shuffled batches of `text_example`s of the synthetic world's stage-III conversations
    (grounding and binary-choice referring questions), their images left out and their coordinates
    scrambled (`scramble_coordinates`). Without the image a box can only be guessed, and a learned
    guess of the world's typical box is what the stages would have to unlearn (with the real
    coordinates the stage-III model kept answering it); without the coordinates' digits in the loss
    the heads that take names from the question did not form in 400 steps. Conversations longer
    than `max_length` are skipped and counted in `skipped['too_long']`. A `caption_share` of the
    conversations are the world's stage-I captions instead: a frozen LLM that knows their format is
    what lets stage I align the projector (the names are then all it has to bring)."""
    if not 0.0 <= caption_share <= 1.0:
        raise ValueError(f"caption_share must be in [0, 1], got {caption_share}")
    source = synthetic.SyntheticSource("train", 100_000, seed=seed, **world)
    task, caption_task = pipeline.synthetic_task(3), pipeline.synthetic_task(1)
    skipped = collections.Counter() if skipped is None else skipped

    categories = list(source.categories)

    def example(record: dict, rng: np.random.Generator) -> dict | None:
        fn = caption_task if rng.random() < caption_share else task
        try:
            turns = fn(record, rng)[1].turns
            ex = text_example(scramble_coordinates(turns, rng), tokenizer, max_length, system_prompt)
        except ExampleError as e:
            skipped[e.reason] += 1
            return None
        labels = region_categories(turns, categories)[:MAX_TEXT_REGIONS]
        ex["region_label"] = np.zeros(MAX_TEXT_REGIONS, np.int32)
        ex["region_label"][: len(labels)] = labels
        ex["region_pick"] = rng.integers(0, 1 << 20, MAX_TEXT_REGIONS).astype(np.int32)
        return ex

    return (grain.MapDataset.source(source).shuffle(seed=seed).repeat().random_map(example, seed=seed)
            .filter(lambda ex: ex is not None)
            .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * batch_size))
            .batch(batch_size, drop_remainder=True))


def region_categories(turns: Sequence[tuple[str, str]], categories: Sequence[str]) -> list[int]:
    """1 + the category index of each `<region_fea>` of the turns, in order: the category the
    answer after its question names (`tasks.referring_answer`, the world's referring answers); 0
    where that answer names none of `categories`."""
    labels = []
    for i, (_, value) in enumerate(turns):
        named = tasks.referred_name(turns[i + 1][1]) if i + 1 < len(turns) else None
        label = 1 + categories.index(named) if named in categories else 0
        labels += [label] * value.count(text.REGION_TOKEN)
    return labels


def with_region_features(embeddings: jax.Array, batch: dict, bank: jax.Array, region_id: int) -> jax.Array:
    """`[B, L, D]` token embeddings with the k-th `<region_fea>` of each example replaced by a
    feature of its category from `bank [K, M, D]` (`batch['region_label'] [B, R]`, the feature
    picked by `batch['region_pick'] [B, R]`); slots of label 0, and any after the R-th, keep the
    token's embedding."""
    tokens = batch["tokens"]
    is_region = tokens == region_id
    r = batch["region_label"].shape[1]
    k = jnp.cumsum(is_region, axis=1) - 1
    slot = jnp.clip(k, 0, r - 1)
    label = jnp.where(k < r, jnp.take_along_axis(batch["region_label"], slot, axis=1), 0)
    pick = jnp.take_along_axis(batch["region_pick"], slot, axis=1) % bank.shape[1]
    return jnp.where((is_region & (label > 0))[..., None], bank[label, pick].astype(embeddings.dtype), embeddings)


def induction_batches(ids: np.ndarray, batch_size: int, seed: int, length: int = 24, filler: int = 12) -> Iterator[dict]:
    """Endless batches of the induction task over `ids`: a random filler (0..`filler` ids), a random
    sequence of `length` ids, the rest of the filler, then the same sequence again, whose tokens
    from the second one on (what a copy of the first occurrence predicts) are in the loss.
    `tokens`, `targets`, `loss_mask` `[B, 2 * length + filler]`, as `text_example`'s."""
    rng = np.random.default_rng(seed + 23)
    while True:
        rows = []
        for _ in range(batch_size):
            sequence = rng.choice(ids, length)
            before = int(rng.integers(0, filler))
            rows.append(np.concatenate([rng.choice(ids, before), sequence, rng.choice(ids, filler - before), sequence]))
        tokens = np.stack(rows).astype(np.int32)
        targets = np.concatenate([tokens[:, 1:], np.zeros((batch_size, 1), np.int32)], 1)
        loss_mask = np.zeros(tokens.shape, np.float32)
        loss_mask[:, length + filler : -1] = 1.0  # position i predicts token i + 1
        yield {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}


def language_loss(params, batch: dict, model: Llama, region_bank: jax.Array | None = None,
                  region_id: int = -1) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy over the answer tokens, and their accuracy; with a
    `region_bank`, the `<region_fea>` slots (`region_id`) carry region features (`with_region_features`)."""
    if region_bank is None:
        logits, _ = model.apply({"params": params}, batch["tokens"])
    else:
        embeddings = model.apply({"params": params}, batch["tokens"], method=Llama.embed)
        embeddings = with_region_features(embeddings, batch, region_bank, region_id)
        logits, _ = model.apply({"params": params}, embeddings=embeddings)
    loss, correct = losses.token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    n = jnp.maximum(batch["loss_mask"].sum(), 1.0)
    return loss.sum() / n, {"loss": loss.sum() / n, "accuracy": correct.sum() / n}


def language_warm_up(
    config: LlamaConfig, world: dict, tokenizer: text.Tokenizer, *, steps: int, batch_size: int, lr: float, max_length: int,
    system_prompt: bool, caption_share: float = 0.0, region_bank: np.ndarray | None = None, seed: int = 0,
    log_every: int = 50, log: Callable[[str], None] = print, induction_steps: int = 0, induction_lr: float = 1e-3,
) -> tuple[dict, dict]:
    """Trains the LLM alone on the answers of the world's stage-III conversations (no images,
    scrambled coordinates; a `caption_share` of stage-I captions) for `steps` steps: it learns the answer formats and to take names from
    the question, which a pretrained LLM brings. `system_prompt` as in the stages' examples.
    Conversations are padded to `max_length` tokens; longer ones are skipped and counted
    (`skipped_too_long`). With a `region_bank` (`warm_up`'s), each referring question's
    `<region_fea>` carries a warmed sampler's feature of the referred category, so the LLM learns
    to read the region from it before any stage. With `induction_steps`, it first trains that many
    steps at `induction_lr` on `induction_batches` over the ids of the world's texts: the
    induction heads (continue a sequence as it went before) a pretrained LLM has and a small one
    forms only after a plateau of several hundred steps. Returns (`{'llm'}` params for
    `save_converted`, the `adamw_fit` metrics, with the induction phase's last token accuracy)."""
    model = Llama(config)
    skipped = collections.Counter()
    batches = language_dataset(world, tokenizer, batch_size, max_length, seed, system_prompt, skipped, caption_share)
    bank = None if region_bank is None else jnp.asarray(region_bank)
    init = lambda k, b: model.init(k, b["tokens"][:1])["params"]  # noqa: E731
    induction = {}
    if induction_steps:
        # the ids of the world's texts (a fresh iterator: the conversations' own order is unchanged)
        first = iter(batches)
        ids = np.unique(np.concatenate([np.asarray(next(first)["tokens"]).ravel() for _ in range(30)]))
        ids = ids[ids > 0]
        inducted, induction = adamw_fit(
            functools.partial(language_loss, model=model), init, induction_batches(ids, batch_size, seed),
            steps=induction_steps, lr=induction_lr, seed=seed, tag="llm induction", log_every=log_every, log=log,
            describe=lambda m: f"repeat loss {m['loss']:.3f} token acc {m['accuracy']:.3f}")
        induction = {"induction_accuracy": induction["accuracy"], "induction_ids": len(ids),
                     "induction_seconds": induction["seconds"]}
        init = lambda k, b: inducted  # noqa: E731
    params, result = adamw_fit(functools.partial(language_loss, model=model, region_bank=bank, region_id=tokenizer.region_id),
                               init, iter(batches),
                               steps=steps, lr=lr, seed=seed, tag="llm warmup", log_every=log_every, log=log,
                               describe=lambda m: f"answer loss {m['loss']:.3f} token acc {m['accuracy']:.3f}")
    seconds = result["seconds"] + induction.get("induction_seconds", 0.0)  # both phases
    return {"llm": jax.device_get(params)}, result | induction | {"seconds": seconds, "skipped_too_long": skipped["too_long"]}
