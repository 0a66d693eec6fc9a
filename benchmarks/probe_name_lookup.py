"""Can the demo's decoder learn to pick the named object's box among two? An isolated probe.

Grounding in the CPU demo fails on two-object scenes (DEMO_RUNS.md). This probe takes
the encoders out of the question: the demo-sized LLaMA (`ferret_jax.models.llama.Llama`) reads a
prefix of 36 *clean* patch features (a 6x6 grid), each the one-hot category of the object under
it (24 colour x shape names, or background) and the one-hot hundreds and tens digits of that
object's four box coordinates, through a trainable linear projector. Scenes hold one or two
objects of different names, each a rectangle of 2-4 x 2-4 patches. The text is the demo's
grounding turn in a small vocabulary, digits one token each as the demo's tokenizer splits them:

    what is the location of <colour> <shape> in the image ? <colour> <shape> [ d d d , d d d , ... ]

Trained with teacher forcing and AdamW (warmup + cosine), then scored teacher-forced on 512
held-out scenes: the first two digits of each coordinate (single- and two-object scenes), and,
per coordinate, how often the predicted hundreds digit on a two-object scene is the asked
object's rather than the other's (only where the two differ; 0.5 = picks at random).

Options: `--loss x1` supervises only the first coordinate's hundreds digit; `--query category`
replaces the name by one category token, repeats it in place of "[" (the position that predicts
the first digit) and adds its embedding to the object's patches (the easiest selection there is);
`--query name-tied` keeps the two-word name and adds both words' embeddings to the patches;
`--first-weight W` weights the tokens of x1 and y1 by W in the loss; `--x1-share P` gives a share P
of the two-object training scenes the loss of `--loss x1` (the rest keep the whole answer's); `--text-warmup N` first
trains N steps with the objects written out as text in place of the features ("<name> [box]" for
each: finding the asked name in the text and copying its box is the same choice
made over tokens), then `--steps` on the features. `--curriculum N` first trains N steps of
`--query category-untied --loss x1` (the category token as the query, its embedding *not* added
to the patches), then `--steps` in the given setting.
`--opener` picks the token before x1's first digit (the position that writes it): by default the
category token itself with a category query and "[" with a name; `bracket` is "[" always; `shape`
writes a name's shape word and "[" as one token ("red", "circle [", ...), so the name's own last
token opens the box. `--distinct shape` (or `colour-and-shape`) keeps two objects of a scene from
sharing a shape (or either word); `--noise P` shows a random category in a share P of the object
patches' features, as an imperfectly warmed encoder would.
`--opener name` writes the whole name and "[" as one token ("red circle ["; the question keeps
the two words), `--opener colour` the shape word, then the colour word and "[" as one token;
`--distinct colour` keeps two objects from sharing a colour; `--features factored` shows a
patch's colour and shape one-hot apart instead of its category, as the demo's patches tell the
colour far better than the shape. `--ask colour` names only the colour in the question (the
answer writes colour and shape: the shape word must come from the image). `--questions N` asks
N questions about the same scene in turn (the first is scored). `--dense-text N` first trains N
steps on a dense text lookup: `--dense-objects` named boxes written out, then the same again in
another order, every box of the second list a lookup of its name in the first.
`--induction N` first trains N steps of the classic induction task (a random sequence of 24
tokens, a random filler, the sequence again; the repeat in the loss), which forms the
previous-token heads a lookup by the tokens before "[" needs; `--pairs N` N steps of a two-token
key recall ("a b [ v" eight times, then again in another order, the values in the loss; the keys
colour-shape names, or with `--pairs-generic` any two tokens). `--question-first` puts the
question before the patch features (the answer after them), so each patch can see the name.
`--features checkpoint --checkpoint DIR` replaces the clean features by a trained model's own: the
36 projected global visual tokens (`proj_global` of CLIP's 6x6 patches, frozen) of scenes of the
world it was trained on (8000 training scenes, 600 held-out ones), the asked object and its box
(on the 0..999 canvas) from the scene; `--clean-boxes` (`--clean-colours`) appends to each of those
tokens the clean box digits (colour one-hot) of the object under the patch's centre, as the
clean features show them.

  python benchmarks/probe_name_lookup.py [--layers 3 --heads 4 --hidden 128 --steps 1800 --batch 8]

The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ferret_jax.models.llama import Llama, LlamaConfig

GRID = 6
COLOURS, SHAPES = 6, 4
CATEGORIES = COLOURS * SHAPES
WORDS = ("<pad>", "what", "is", "the", "location", "of", "in", "image", "?", "[", ",", "]", "<eos>")
COLOUR0 = len(WORDS)
SHAPE0 = COLOUR0 + COLOURS
DIGIT0 = SHAPE0 + SHAPES
CATEGORY0 = DIGIT0 + 10
SHAPE_BRACKET0 = CATEGORY0 + CATEGORIES  # "<shape> [" as one token (`--opener shape`)
VOCAB = 64
NAME_BRACKET0 = SHAPE_BRACKET0 + SHAPES  # "<colour> <shape> [" as one token (`--opener name`)
COLOUR_BRACKET0 = NAME_BRACKET0 + CATEGORIES  # "<colour> [" after the shape word (`--opener colour`)
WIDE_VOCAB = 96  # the vocabulary of the two openers above (the others keep 64: the same init as before)
FEATURES = 1 + CATEGORIES + 4 * 20  # background/category one-hot, then hundreds + tens per coordinate
QUESTION = 11
FIRST_DIGIT = QUESTION + 3  # token index of x1's hundreds digit; coordinate c's is 4 c later
ENTRY = 19  # one object written out: "<colour> <shape> [ d d d , d d d , d d d , d d d ]"
TEXT_PREFIX = 2 * ENTRY  # two objects written out


def place_objects(rng: np.random.Generator, distinct: str = "name") -> list[tuple[int, tuple[int, int, int, int]]]:
    """1-2 objects as (category, (col, row, w, h)) patch rectangles, of different names, or with
    `distinct="shape"` of different shapes, with `"colour-and-shape"` of different colours and shapes."""
    while True:  # a crowded draw starts the whole scene again
        n = int(rng.integers(1, 3))
        taken = np.zeros((GRID, GRID), bool)
        objects = []
        for _ in range(n):
            w, h = (int(v) for v in rng.integers(2, 5, 2))
            c, r = int(rng.integers(0, GRID - w + 1)), int(rng.integers(0, GRID - h + 1))
            category = int(rng.integers(CATEGORIES))
            if taken[r : r + h, c : c + w].any() or any(same(category, o[0], distinct) for o in objects):
                break
            taken[r : r + h, c : c + w] = True
            objects.append((category, (c, r, w, h)))
        if len(objects) == n:
            return objects


def same(a: int, b: int, distinct: str) -> bool:
    """Whether categories `a` and `b` may not share a scene."""
    if distinct == "name":
        return a == b
    if distinct == "shape":
        return a % SHAPES == b % SHAPES
    if distinct == "colour":
        return a // SHAPES == b // SHAPES
    return a // SHAPES == b // SHAPES or a % SHAPES == b % SHAPES


def name_tokens(category: int, query: str, opener: str = "default") -> tuple[list[int], int]:
    """The name's ids (colour, shape; or the one category token) and the id that opens its box:
    by default the category token itself for a category query, "[" for a name."""
    name = [CATEGORY0 + category] if query.startswith("category") else [COLOUR0 + category // SHAPES, SHAPE0 + category % SHAPES]
    if opener == "shape":  # the shape word and "[" are one token: the name's last token opens the box
        return name[:-1], SHAPE_BRACKET0 + category % SHAPES
    if opener == "name":  # the whole name and "[" are one token
        return [], NAME_BRACKET0 + category
    if opener == "colour":  # the shape word, then the colour word and "[" as one token
        return name[1:], COLOUR_BRACKET0 + category // SHAPES
    if opener == "bracket" or (opener == "default" and not query.startswith("category")):
        return name, WORDS.index("[")
    return name, CATEGORY0 + category


def box_tokens(box: list[int]) -> list[int]:
    """`d d d , d d d , d d d , d d d ]`: one id per digit, as the demo's tokenizer splits them."""
    out = []
    for i, v in enumerate(box):
        out += [DIGIT0 + v // 100, DIGIT0 + (v // 10) % 10, DIGIT0 + v % 10, WORDS.index("," if i < 3 else "]")]
    return out


def x1_only(weights: np.ndarray) -> np.ndarray:
    """The loss weights `[T]` of `--loss x1`: x1's hundreds digit alone."""
    out = np.zeros_like(weights)
    out[FIRST_DIGIT] = 1
    return out


def checkpoint_scenes(checkpoint: str, split: str, count: int, seed: int) -> dict:
    """`--features checkpoint`: `count` scenes of 1-2 objects of different names from the world the
    checkpoint was trained on; per scene its projected global visual tokens `features [36, D]`, the
    asked object's `category` and `box`, and the other object's box (`other`, -1 where none)."""
    from data_pipelines import example as ex
    from data_pipelines import synthetic, text
    from ferret_jax import evaluate

    model, params, tokenizer, example_config = evaluate.load_model(checkpoint)
    world = evaluate.synthetic_world(evaluate.source_meta(checkpoint)) or {}
    if model.config.global_grid != GRID:
        raise ValueError(f"{checkpoint}: a {model.config.global_grid}x{model.config.global_grid} global grid, the probe needs {GRID}x{GRID}")
    encode = jax.jit(lambda p, images: model.apply({"params": p}, images, images[:, None], method=model.encode_images)[2])
    source = synthetic.SyntheticSource(split, 4 * count, seed, **world)
    rng = np.random.default_rng(seed)
    images, category, box, other, other_category = [], [], [], [], []
    for i in range(len(source)):
        scene = source[i]["scene"]
        objects = scene.objects
        if len(objects) > 2 or len({o.name for o in objects}) < len(objects):
            continue
        width, height = scene.size

        def canvas(b):
            return [text.to_canvas(b[0], width), text.to_canvas(b[1], height), text.to_canvas(b[2], width), text.to_canvas(b[3], height)]

        k = int(rng.integers(len(objects)))
        category_of = [list(synthetic.COLOURS).index(o.colour) * SHAPES + synthetic.SHAPES.index(o.shape) for o in objects]
        category.append(category_of[k])
        box.append(canvas(objects[k].box))
        other.append(canvas(objects[1 - k].box) if len(objects) == 2 else [-1] * 4)
        other_category.append(category_of[1 - k] if len(objects) == 2 else -1)
        built = ex.build_example(scene.image, [("human", "x"), ("gpt", "y")], [], tokenizer, example_config, rng)
        images.append(built["global_image"])
        if len(images) == count:
            break
    images = np.stack(images)
    features = np.concatenate([np.asarray(encode(params, images[i : i + 64])) for i in range(0, len(images), 64)])
    return {"features": features, "category": np.array(category), "box": np.array(box), "other": np.array(other),
            "other_category": np.array(other_category)}


def checkpoint_example(rng: np.random.Generator, args, pool: dict) -> dict:
    """`--features checkpoint`: one scene of `pool` (`checkpoint_scenes`) in `example`'s fields."""
    i = int(rng.integers(len(pool["category"])))
    category, box = int(pool["category"][i]), [int(v) for v in pool["box"][i]]
    other = None if pool["other"][i][0] < 0 else [int(v) for v in pool["other"][i]]
    features = pool["features"][i]
    if args.clean_boxes or args.clean_colours:  # clean facts of the object under each patch's centre
        centres = (np.arange(GRID) + 0.5) / GRID * 1000
        cx, cy = np.meshgrid(centres, centres)  # [row, col], raster order as the tokens
        clean = np.zeros((GRID, GRID, 4 * 20 + COLOURS), np.float32)
        objects = [(category, box)] + ([(int(pool["other_category"][i]), other)] if other else [])
        for c_object, b in objects:
            inside = (cx >= b[0]) & (cx <= b[2]) & (cy >= b[1]) & (cy <= b[3])
            if args.clean_boxes:
                for c, v in enumerate(b):
                    clean[inside, 20 * c + v // 100] = clean[inside, 20 * c + 10 + (v // 10) % 10] = 1
            if args.clean_colours:
                clean[inside, 4 * 20 + c_object // SHAPES] = 1
        features = np.concatenate([features, 10 * clean.reshape(GRID * GRID, -1)], -1)
    tokens, weights = grounding_turn(category, box, args)
    return dict(features=features, patch_ids=np.zeros((GRID * GRID, 2), np.int32), prefix=np.zeros(TEXT_PREFIX, np.int32),
                tokens=np.array(tokens, np.int32), weights=loss_weights(weights, args), box=box, other=other)


def grounding_turn(category: int, box: list[int], args) -> tuple[list[int], list[float]]:
    """The question about one object and its answer: tokens and loss weights (the answer's)."""
    name, opener = name_tokens(category, args.query, args.opener)
    asked = name_tokens(category, args.query)[0]
    if args.ask == "colour":  # the question names the colour alone; the answer's shape word comes from the image
        asked = asked[:1]
    question = [1, 2, 3, 4, 5] + asked + [6, 3, 7, 8]
    question = question + [0] * (QUESTION - len(question))  # one name token: pad to the same layout
    answer = [0] * (2 - len(name)) + name + [opener] + box_tokens(box) + [WORDS.index("<eos>")]
    weights = [0.0] * QUESTION + [1.0] * len(answer)
    weights[QUESTION : QUESTION + 2 - len(name)] = [0.0] * (2 - len(name))  # the padding before a one-token name
    return question + answer, weights


def loss_weights(weights: list[float], args) -> np.ndarray:
    """`--loss x1` or `--first-weight` applied to a scene's answer weights."""
    weights = np.array(weights, np.float32)
    if args.loss == "x1":
        return x1_only(weights)
    weights[[FIRST_DIGIT + o for o in (0, 1, 2, 4, 5, 6)]] *= args.first_weight
    return weights


def example(rng: np.random.Generator, args) -> dict:
    """One scene: features `[36, FEATURES]`, patch ids `[36, 2]` (added to the patches with `--query
    category`), the objects written as text `[38]` (`--text-warmup`), tokens `[T]`, loss weights
    `[T]`, the asked box and the other object's (or None)."""
    if args.features == "checkpoint":
        return checkpoint_example(rng, args, args.scenes)
    objects = place_objects(rng, args.distinct)
    features = np.zeros((GRID, GRID, FEATURES), np.float32)
    features[..., 0] = 1
    patch_ids = np.zeros((GRID, GRID, 2), np.int32)
    boxes = []
    for category, (c, r, w, h) in objects:
        jitter = rng.uniform(0, 0.4, 4)
        box = [(c + jitter[0]) / GRID, (r + jitter[1]) / GRID, (c + w - jitter[2]) / GRID, (r + h - jitter[3]) / GRID]
        box = [min(999, int(v * 1000)) for v in box]
        boxes.append(box)
        cell = features[r : r + h, c : c + w]
        cell[..., 0] = 0
        # --noise: a share of the object's patches shows a random category, as a warmed encoder's do
        shown = np.full((h, w), category)
        if args.noise:  # drawn only then, so runs without it see the scenes they always did
            shown = np.where(rng.uniform(size=(h, w)) < args.noise, rng.integers(CATEGORIES, size=(h, w)), category)
        if args.features == "factored":  # colour and shape one-hot apart, in the category slots
            np.put_along_axis(cell, 1 + (shown // SHAPES)[..., None], 1, axis=-1)
            np.put_along_axis(cell, 1 + COLOURS + (shown % SHAPES)[..., None], 1, axis=-1)
        else:
            np.put_along_axis(cell, 1 + shown[..., None], 1, axis=-1)
        for i, v in enumerate(box):
            cell[..., 1 + CATEGORIES + 20 * i + v // 100] = 1
            cell[..., 1 + CATEGORIES + 20 * i + 10 + (v // 10) % 10] = 1
        if args.query == "category":
            patch_ids[r : r + h, c : c + w, 0] = CATEGORY0 + category
        if args.query == "name-tied":
            patch_ids[r : r + h, c : c + w] = name_tokens(category, args.query)[0]
    # The text stand-in for the image (--text-warmup): each object's name and box, in the order
    # they were placed (random, and independent of which one is asked).
    prefix = []
    for (category, _), box in zip(objects, boxes):
        name, opener = name_tokens(category, args.query, args.opener)
        prefix += [0] * (2 - len(name)) + name + [opener] + box_tokens(box)
    prefix += [0] * (TEXT_PREFIX - len(prefix))
    tokens, weights = [], []
    # --questions: more question-answer turns about randomly chosen objects of the same scene
    # follow the first (the one scored), each a choice of its own
    turns = [int(rng.integers(len(objects))) for _ in range(args.questions)]
    for k in turns:
        turn_tokens, turn_weights = grounding_turn(objects[k][0], boxes[k], args)
        tokens += turn_tokens
        weights += turn_weights
    k = turns[0]
    return dict(features=features.reshape(-1, FEATURES), patch_ids=patch_ids.reshape(-1, 2), prefix=np.array(prefix, np.int32),
                tokens=np.array(tokens, np.int32), weights=loss_weights(weights, args), box=boxes[k],
                other=boxes[1 - k] if len(objects) == 2 else None)


def dense_text_batch(rng: np.random.Generator, n: int, k: int) -> dict:
    """`--dense-text K`: K objects of different names written out with random boxes ("<name> [box]"
    each, the prefix), then the same K again in another order (the tokens, all in the loss): every
    box of the second list is a lookup of its name in the first, K choices per sequence."""
    prefix, tokens = [], []
    for _ in range(n):
        categories = rng.choice(CATEGORIES, k, replace=False)
        boxes = [sorted(rng.integers(0, 1000, 2)) + sorted(rng.integers(0, 1000, 2)) for _ in range(k)]
        boxes = [[b[0], b[2], b[1], b[3]] for b in boxes]  # x1 <= x2, y1 <= y2
        written = [name_tokens(int(c), "name")[0] + [WORDS.index("[")] + box_tokens(b) for c, b in zip(categories, boxes)]
        prefix.append(sum(written, []))
        tokens.append(sum((written[i] for i in rng.permutation(k)), []))
    tokens = np.array(tokens, np.int32)
    return {"prefix": np.array(prefix, np.int32), "tokens": tokens, "weights": np.ones(tokens.shape, np.float32)}


def induction_batch(rng: np.random.Generator, n: int, length: int = 24, filler: int = 12) -> dict:
    """`--induction N`: a random filler of 0..`filler` tokens, a random sequence of `length`, the
    rest of the filler (the prefix), then the sequence again (the tokens, all in the loss)."""
    rows = []
    for _ in range(n):
        seq = rng.integers(1, VOCAB, length)
        before = int(rng.integers(0, filler))
        rows.append(np.concatenate([rng.integers(1, VOCAB, before), seq, rng.integers(1, VOCAB, filler - before), seq]))
    rows = np.stack(rows).astype(np.int32)
    cut = length + filler
    return {"prefix": rows[:, :cut], "tokens": rows[:, cut:], "weights": np.ones(rows[:, cut:].shape, np.float32)}


def pairs_batch(rng: np.random.Generator, n: int, generic: bool, m: int = 8) -> dict:
    """`--pairs N`: `m` entries "a b [ v" (a two-token key, a one-token value), then the same `m`
    in another order with the values in the loss: each a lookup keyed by the two tokens before "["."""
    prefix, tokens = [], []
    for _ in range(n):
        if generic:
            keys = set()
            while len(keys) < m:
                keys.add(tuple(int(v) for v in rng.integers(1, VOCAB, 2)))
            keys, values = list(keys), rng.integers(1, VOCAB, m)
        else:
            names = rng.choice(CATEGORIES, m, replace=False)
            keys, values = [(COLOUR0 + c // SHAPES, SHAPE0 + c % SHAPES) for c in names], DIGIT0 + rng.integers(0, 10, m)
        entries = [[a, b, WORDS.index("["), int(v)] for (a, b), v in zip(keys, values)]
        prefix.append(sum(entries, []))
        tokens.append(sum((entries[i] for i in rng.permutation(m)), []))
    return {"prefix": np.array(prefix, np.int32), "tokens": np.array(tokens, np.int32),
            "weights": np.tile(np.array([0, 0, 0, 1], np.float32), (n, m))}


def batch(rng: np.random.Generator, n: int, args, x1_rng: np.random.Generator | None = None) -> tuple[dict, list[dict]]:
    """`n` scenes; with `x1_rng`, a share `args.x1_share` of the two-object ones get `x1_only` weights
    (drawn from `x1_rng`, so the scenes are the same whatever the share)."""
    examples = [example(rng, args) for _ in range(n)]
    if x1_rng is not None and args.x1_share > 0:
        for e in examples:
            if e["other"] is not None and x1_rng.uniform() < args.x1_share:
                e["weights"] = x1_only(e["weights"])
    arrays = {key: np.stack([e[key] for e in examples]) for key in ("features", "patch_ids", "prefix", "tokens", "weights")}
    return arrays, examples


class Probe(nn.Module):
    """Projected patch features `[B, 36, F]` (or, with `text`, the objects written out `[B, 38]`)
    then text `[B, T]` through the LLM; text logits `[B, T, V]`."""

    config: LlamaConfig
    question_first: bool = False  # the question's QUESTION tokens before the features

    @nn.compact
    def __call__(self, b, tokens, text: bool = False):
        llm = Llama(self.config, name="llm")
        if text:
            head = llm.embed(b["prefix"])
        else:
            head = nn.Dense(self.config.hidden_size, name="projector")(b["features"])
            head = head + (llm.embed(b["patch_ids"]) * (b["patch_ids"] > 0)[..., None]).sum(-2)
        if self.question_first and not text:
            q, f = QUESTION, head.shape[1]
            logits, _ = llm(embeddings=jnp.concatenate([llm.embed(tokens[:, :q]), head, llm.embed(tokens[:, q:])], axis=1))
            # the text's next-token logits: the question's, then from the last feature on
            return jnp.concatenate([logits[:, : q - 1], logits[:, q - 1 + f :]], axis=1)
        logits, _ = llm(embeddings=jnp.concatenate([head, llm.embed(tokens)], axis=1))
        return logits[:, head.shape[1] :]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss", choices=("answer", "x1"), default="answer")
    p.add_argument("--query", choices=("name", "name-tied", "category", "category-untied"), default="name")
    p.add_argument("--distinct", choices=("name", "shape", "colour", "colour-and-shape"), default="name",
                   help="what two objects of a scene never share")
    p.add_argument("--opener", choices=("default", "bracket", "shape", "name", "colour"), default="default",
                   help="the token before x1 (it writes x1's first digit): the category token for a category query "
                        "and '[' for a name (default), always '[' (bracket), '<shape> [' as one token (shape), "
                        "'<colour> <shape> [' as one token (name), or the shape word then '<colour> [' (colour)")
    p.add_argument("--features", choices=("category", "factored", "checkpoint"), default="category",
                   help="a patch shows its object's category one-hot, or its colour and its shape one-hot apart, or "
                        "is a trained model's projected global visual token (--checkpoint)")
    p.add_argument("--checkpoint", default="", help="a demo-world training workdir (--features checkpoint)")
    p.add_argument("--clean-boxes", action="store_true",
                   help="--features checkpoint: append each patch's clean box digits to the model's tokens")
    p.add_argument("--clean-colours", action="store_true",
                   help="--features checkpoint: append each patch's clean colour one-hot to the model's tokens")
    p.add_argument("--noise", type=float, default=0.0, help="share of object patches whose category feature is random")
    p.add_argument("--first-weight", type=float, default=1.0)
    p.add_argument("--x1-share", type=float, default=0.0,
                   help="share of the two-object training scenes whose loss is x1's hundreds digit alone")
    p.add_argument("--text-warmup", type=int, default=0,
                   help="steps on the text stand-in (names and boxes written out) before --steps on the features")
    p.add_argument("--dense-text", type=int, default=0, metavar="STEPS",
                   help="steps of the dense text lookup (--dense-objects objects listed twice) before --steps on the features")
    p.add_argument("--dense-objects", type=int, default=4)
    p.add_argument("--curriculum", type=int, default=0,
                   help="steps with --query category-untied --loss x1 before --steps in the given setting")
    p.add_argument("--ask", choices=("name", "colour"), default="name",
                   help="what the question names: the whole name, or (colour) its colour word alone")
    p.add_argument("--questions", type=int, default=1, help="question-answer turns per scene (the first is scored)")
    p.add_argument("--induction", type=int, default=0, metavar="STEPS",
                   help="steps of induction sequences (batch 16) before anything else")
    p.add_argument("--pairs", type=int, default=0, metavar="STEPS",
                   help="steps of a two-token key recall (batch 16) before the features")
    p.add_argument("--pairs-generic", action="store_true", help="--pairs keys of any two tokens, not names")
    p.add_argument("--question-first", action="store_true", help="the question before the patch features")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.opener in ("shape", "name", "colour") and args.query != "name":
        p.error(f"--opener {args.opener} rewrites a two-word name: use it with --query name")
    if (args.features == "checkpoint") != bool(args.checkpoint):
        p.error("--features checkpoint and --checkpoint DIR go together")
    if args.features == "checkpoint" and (args.query != "name" or args.text_warmup or args.curriculum or args.questions > 1):
        p.error("--features checkpoint asks one two-word name per scene: no --query, --text-warmup, --curriculum, --questions")

    vocab = WIDE_VOCAB if args.opener in ("name", "colour") else VOCAB
    positions = max(128, 40 + 32 * args.questions, 2 * ENTRY * args.dense_objects)
    config = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads,
                         max_position_embeddings=positions, scan_unroll=args.layers)
    model = Probe(config, args.question_first)
    rng = np.random.default_rng(args.seed)
    x1_rng = np.random.default_rng(args.seed + 1)
    if args.features == "checkpoint":
        t0 = time.time()
        args.scenes = checkpoint_scenes(args.checkpoint, "train", 8000, args.seed)
        held_out_scenes = checkpoint_scenes(args.checkpoint, "test", 600, 0)
        print(f"checkpoint features of 8000 + 600 scenes in {time.time() - t0:.0f}s", flush=True)

    def held_out_set(phase_args):  # the same 512 scenes in each phase's format
        if args.features == "checkpoint":
            phase_args = argparse.Namespace(**{**vars(phase_args), "scenes": held_out_scenes})
        return batch(np.random.default_rng(10_000 + args.seed), 512, phase_args)

    sample, _ = batch(np.random.default_rng(0), 1, args)
    params = model.init(jax.random.PRNGKey(args.seed), sample, sample["tokens"][:, :-1])

    def optimizer(steps: int):
        schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, steps // 20), steps)
        return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))

    def loss_fn(params, b, text):
        logits = model.apply(params, b, b["tokens"][:, :-1], text)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["tokens"][:, 1:])
        return (ce * b["weights"][:, 1:]).sum() / b["weights"][:, 1:].sum()

    @functools.partial(jax.jit, static_argnums=(3, 4))
    def step(params, opt_state, b, text, opt):
        loss, grads = jax.value_and_grad(loss_fn)(params, b, text)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @functools.partial(jax.jit, static_argnums=2)
    def predict(params, b, text):  # predicted id of every next token, teacher-forced
        return jnp.argmax(model.apply(params, b, b["tokens"][:, :-1], text), -1)

    def score(params, held_out, held_out_examples, text=False) -> dict:
        pred = np.asarray(predict(params, held_out, text))
        single, two, picks = [], [], {c: [] for c in range(4)}
        for i, e in enumerate(held_out_examples):
            at = [FIRST_DIGIT + 4 * c for c in range(4)]
            hundreds = [int(pred[i, j - 1]) - DIGIT0 for j in at]
            tens = [int(pred[i, j]) - DIGIT0 for j in at]
            box, other = e["box"], e["other"]
            right = np.mean([hundreds[c] == box[c] // 100 and tens[c] == box[c] // 10 % 10 for c in range(4)])
            (single if other is None else two).append(right)
            for c in range(4):
                if other is not None and box[c] // 100 != other[c] // 100:
                    picks[c].append(hundreds[c] == box[c] // 100)
        return {"two_digits_single": float(np.mean(single)), "two_digits_two_objects": float(np.mean(two)),
                "asked_object_picked": {n: round(float(np.mean(picks[c])), 3) for c, n in enumerate(("x1", "y1", "x2", "y2"))}}

    print(f"probe: {args.layers} layers, {args.heads} heads, hidden {args.hidden}; {args.steps} steps of "
          f"{args.batch}; loss {args.loss}{f' (x1 alone on {args.x1_share:.0%} of two-object scenes)' if args.x1_share else ''}, query {args.query}, first-weight {args.first_weight}; "
          f"text warm-up {args.text_warmup} steps", flush=True)
    start = time.time()
    curriculum = argparse.Namespace(**{**vars(args), "query": "category-untied", "loss": "x1"})
    phases = [("text ", True, args.text_warmup, args), ("curriculum ", False, args.curriculum, curriculum),
              ("", False, args.steps, args)]
    earlier = {}

    def text_phase(label: str, steps: int, draw, held_out: dict, at: np.ndarray, what: str) -> float:
        """`steps` steps on text batches `draw()`; logs and returns how often the held-out tokens
        at positions `at` are predicted right (teacher-forced)."""
        nonlocal params
        opt = optimizer(steps)
        opt_state = opt.init(params)
        for i in range(1, steps + 1):
            params, opt_state, loss = step(params, opt_state, draw(), True, opt)
            if i % max(1, steps // 6) == 0 or i == steps:
                pred = np.asarray(predict(params, held_out, True))
                right = float((pred[:, at - 1] == held_out["tokens"][:, at]).mean())
                print(f"{label} step {i}/{steps} loss {float(loss):.3f} | {what} right {right:.3f} | "
                      f"{time.time() - start:.0f}s", flush=True)
        return right

    if args.induction:
        held_out = induction_batch(np.random.default_rng(20_000), 256)
        earlier["induction_repeat_right"] = text_phase(
            "induction", args.induction, lambda: induction_batch(rng, 16), held_out,
            np.arange(1, held_out["tokens"].shape[1]), "repeated tokens")
    if args.pairs:
        held_out = pairs_batch(np.random.default_rng(20_000), 256, args.pairs_generic)
        earlier["pairs_value_right"] = text_phase(
            "pairs", args.pairs, lambda: pairs_batch(rng, 16, args.pairs_generic), held_out,
            np.arange(3, held_out["tokens"].shape[1], 4), "recalled values")
    if args.dense_text:
        held_out = dense_text_batch(np.random.default_rng(20_000), 256, args.dense_objects)
        x1_at = np.array([ENTRY * i + 3 for i in range(args.dense_objects)])  # x1's hundreds digit of each listed box
        digits = held_out["tokens"][:, x1_at]
        # a box of the list copied at random: right as often as the list shares the digit
        earlier["dense_text_x1_at_random"] = float((digits[:, :, None] == digits[:, None, :]).mean())
        earlier["dense_text_x1_right"] = text_phase(
            "dense text", args.dense_text, lambda: dense_text_batch(rng, args.batch, args.dense_objects), held_out,
            x1_at, f"x1 hundreds digit (a listed box at random: {earlier['dense_text_x1_at_random']:.2f})")
    for label, text, steps, phase_args in phases:
        if not steps:
            continue
        opt = optimizer(steps)
        opt_state = opt.init(params)
        phase_held_out = held_out_set(phase_args)
        for i in range(1, steps + 1):
            b, _ = batch(rng, args.batch, phase_args, x1_rng)
            params, opt_state, loss = step(params, opt_state, b, text, opt)
            if i % max(1, steps // 6) == 0 or i == steps:
                s = score(params, *phase_held_out, text)
                print(f"{label}step {i}/{steps} loss {float(loss):.3f} | first two digits right: "
                      f"single {s['two_digits_single']:.2f}, two objects {s['two_digits_two_objects']:.2f} | "
                      f"asked object picked {s['asked_object_picked']} | {time.time() - start:.0f}s", flush=True)
        if label:
            earlier[f"{label.strip()}_scores"] = s
    print(json.dumps({**{k: v for k, v in vars(args).items() if k != "scenes"}, **s, **earlier, "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
