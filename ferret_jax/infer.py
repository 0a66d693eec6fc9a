"""Ask a trained Ferret-v2 about one image: refer to regions, get an answer grounded with boxes.

    python -m ferret_jax.infer --checkpoint=DIR --image=PHOTO --prompt="What is <region> holding?" \
        [--box=x1,y1,x2,y2]... [--point=x,y]... [--mask=MASK.png]... [--out=answer.png] \
        [--max_new_tokens=128] [--temperature=0 --top_p=1] [--seed=0] [--max_length=N]
    python -m ferret_jax.infer --checkpoint=DIR --requests=REQUESTS.jsonl --out_dir=DIR

`--checkpoint` is a training workdir (its latest checkpoint) or a `ferret_jax.export` directory.
One request prints the answer, then one line per grounded phrase with its boxes and points in
pixels, and draws the input regions and the grounded boxes on the image (`--out`).

Regions are in pixels of the image (x right, y down; box corners inclusive):
- `--box=x1,y1,x2,y2`, `--point=x,y`, `--mask=PNG` (non-zero pixels are the region; the PNG has
  the image's size). Each flag may repeat.
- Order: all boxes, then all points, then all masks, each kind in the order given. The k-th
  `<region>` placeholder of the prompt refers to the k-th region of that order.
- Placeholders: `<region>` (or Ferret's own `<region_fea>`) is written as Ferret does,
  `[x1, y1, x2, y2] <region_fea>` for a box or mask (its box) and `[x, y] <region_fea>` for a
  point, on the 0..999 canvas. Coordinates already written before a placeholder are rewritten
  from its region, so a filled prompt fills to itself.
- There must be exactly one placeholder per region: a prompt without any is refused rather than
  given a guessed phrase, since where the region goes changes the question.

Batch mode reads one JSON object per line,
`{"image": PATH, "prompt": STR, "boxes": [[x1, y1, x2, y2]], "points": [[x, y]], "masks": [PNG]}`
(optional "id"; relative paths are relative to the requests file), checks every request before
loading the model, and writes `OUT_DIR/answers.jsonl` (the answer and its parsed groundings per
request) and one picture per request, `OUT_DIR/NNNN_<image name>.png`.

Errors in the input (missing checkpoint, unreadable image, a region outside the image, a
placeholder count that does not match the regions, a malformed flag) end the command with exit
code 1 and a one-line message.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

import numpy as np
from PIL import Image

from data_pipelines import regions as R, text
from data_pipelines.example import ExampleConfig, ExampleError, build_prompt, region_prompt
from data_pipelines.sources.files import load_image

ANSWERS_FILE = "answers.jsonl"
TITLE_CHARS = 80  # longer prompts are cut in the picture's caption

# A placeholder, with the coordinates a filled prompt already holds before it ("[1, 2] <region>").
_COORDS = r"\[\s*\d+\s*,\s*\d+\s*(?:,\s*\d+\s*,\s*\d+\s*)?\]"
PLACEHOLDER = re.compile(rf"(?:{_COORDS}\s*)?<region(?:_fea)?>")


class InferError(ValueError):
    """A request that cannot be answered as given (the message says what to change)."""


# ----------------------------------------------------------------------------------------------
# Regions


def _numbers(value: str, count: int, kind: str, form: str) -> list[float]:
    """`count` comma-separated numbers of a flag value ("10,20" or "[10, 20]")."""
    parts = value.strip().strip("[]()").split(",")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) != count or not all(np.isfinite(numbers)):
        raise InferError(f"{kind} {value!r}: expected {form} ({count} comma-separated numbers, pixels)")
    return numbers


def parse_box(value: str) -> R.Box:
    """"x1,y1,x2,y2" (pixels, corners inclusive) -> `regions.Box`."""
    x1, y1, x2, y2 = _numbers(value, 4, "box", "x1,y1,x2,y2")
    if x2 < x1 or y2 < y1:
        raise InferError(f"box {value!r}: corners inverted (need x1 <= x2 and y1 <= y2)")
    return R.Box(x1, y1, x2, y2)


def parse_point(value: str) -> R.Point:
    """"x,y" (pixels) -> `regions.Point`."""
    return R.Point(*_numbers(value, 2, "point", "x,y"))


def load_mask(path: str, width: int, height: int) -> R.Mask:
    """A PNG whose non-zero pixels are the region -> `regions.Mask` of a `width` x `height` image.

    Colour channels count, alpha does not (an opaque black pixel is outside); a palette image is
    read through its colours.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA"):
                im = im.convert("RGBA")
            pixels = np.asarray(im)
            has_alpha = "A" in im.getbands()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InferError(f"cannot read mask {path}: {e}") from e
    if pixels.ndim == 3:
        pixels = (pixels[..., :-1] if has_alpha else pixels).any(axis=-1)
    mask = pixels != 0
    if mask.shape != (height, width):
        raise InferError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is {width}x{height}")
    if not mask.any():
        raise InferError(f"mask {path} has no non-zero pixel")
    return R.Mask(mask)


def collect_regions(
    boxes: Sequence[str], points: Sequence[str], masks: Sequence[str], width: int, height: int
) -> list[R.Region]:
    """Flag values -> regions in the documented order: boxes, then points, then masks."""
    out: list[R.Region] = [parse_box(b) for b in boxes]
    out += [parse_point(p) for p in points]
    out += [load_mask(m, width, height) for m in masks]
    return out


def fill_regions(prompt: str, regions: Sequence[R.Region], width: int, height: int) -> tuple[str, tuple]:
    """(prompt with the k-th placeholder written as region k in Ferret's format, the regions).

    Raises InferError when the placeholders and the regions differ in number, RegionError when a
    region has no pixel inside the `width` x `height` image.
    """
    slots = PLACEHOLDER.findall(prompt)
    if len(slots) != len(regions):
        raise InferError(
            f"the prompt has {len(slots)} <region> placeholder(s) for {len(regions)} region(s): write one "
            f"<region> per --box/--point/--mask, taken in the order boxes, points, masks"
        )
    written = iter([region_prompt(r, width, height) for r in regions])  # RegionError here
    return PLACEHOLDER.sub(lambda _: next(written), prompt), tuple(regions)


# ----------------------------------------------------------------------------------------------
# Answering


@functools.lru_cache(maxsize=4)
def _generate_fn(model, sampling) -> Callable[..., dict]:
    """One jitted generate per (model, sampling): repeated answers compile once."""
    from ferret_jax.generate import make_generate

    return make_generate(model, sampling)


def answer(
    model,
    params,
    tokenizer: text.Tokenizer,
    example_config: ExampleConfig,
    image,
    prompt: str,
    regions: Sequence[R.Region],
    sampling,
    seed: int = 0,
) -> tuple[str, list[text.Grounding]]:
    """(answer text, its groundings in pixels) for one image and one question.

    `prompt` holds one placeholder per region (`fill_regions`); it becomes a single human turn
    (`build_prompt` adds the image). `sampling.eos_id` should be the tokenizer's. `seed` picks the
    region point subsets and, when sampling, the tokens. Raises ExampleError for a prompt the
    model's shapes cannot hold (too long, more regions than `example_config.max_regions`).
    """
    import jax
    import jax.numpy as jnp

    from ferret_jax.evaluate import decode_output, stack_prompts

    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    question, regions = fill_regions(prompt, regions, width, height)
    built = build_prompt(pixels, [(text.HUMAN_ROLE, question)], regions, tokenizer, example_config,
                         np.random.default_rng(seed))
    batch = {k: jnp.asarray(v) for k, v in stack_prompts([built]).items()}
    out = jax.device_get(_generate_fn(model, sampling)(params, batch, jax.random.key(seed)))
    reply = decode_output(out["tokens"][0], out["lengths"][0], tokenizer)
    return reply, text.parse_groundings(reply, width, height)


def grounding_line(g: text.Grounding) -> str:
    """One grounded phrase: `phrase: boxes [(x1, y1, x2, y2), ...] points [(x, y), ...]` (pixels)."""
    boxes = ", ".join(str(tuple(b)) for b in g.boxes)
    points = ", ".join(str(tuple(p)) for p in g.points)
    return f"{g.phrase or '?'}: boxes [{boxes}] points [{points}]"


def report(reply: str, groundings: Sequence[text.Grounding]) -> str:
    """What the command prints: the answer, then one line per grounded phrase."""
    return "\n".join([reply, *(grounding_line(g) for g in groundings)])


def grounding_json(g: text.Grounding) -> dict:
    return {"phrase": g.phrase, "boxes": [list(b) for b in g.boxes], "points": [list(p) for p in g.points]}


def picture(image, regions: Sequence[R.Region], groundings: Sequence[text.Grounding], prompt: str) -> Image.Image:
    """The image with the input regions and the grounded answer, the prompt as caption."""
    from ferret_jax import draw

    title = prompt if len(prompt) <= TITLE_CHARS else prompt[: TITLE_CHARS - 3] + "..."
    return draw.draw_answer(image, regions, groundings, title)


def save_picture(image: Image.Image, path: str) -> str:
    """Writes the picture (format from the extension), creating its directory; returns `path`."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        image.save(path)
    except (OSError, ValueError) as e:  # ValueError: an extension PIL has no format for
        raise InferError(f"cannot write picture {path}: {e}") from e
    return path


# ----------------------------------------------------------------------------------------------
# Requests


@dataclasses.dataclass(frozen=True)
class Request:
    """One question about one image; regions as flag strings, JSON lists or mask paths."""

    image: str
    prompt: str
    boxes: tuple = ()
    points: tuple = ()
    masks: tuple = ()
    id: Any = None


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A checked request: pixels, the regions in placeholder order, the filled question."""

    request: Request
    image: np.ndarray
    regions: tuple
    question: str


def _coords_text(value: Any) -> str:
    """A JSON box/point ([10, 20, 30, 40]) or a flag string as the flag string."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)
    raise InferError(f"expected a list of numbers, got {value!r}")


def prepare(request: Request) -> Prepared:
    """Reads the image and masks and fills the prompt; every input error surfaces here."""
    if not isinstance(request.prompt, str) or not request.prompt.strip():
        raise InferError("the prompt is empty")
    image = load_image(request.image)  # ExampleError naming the file
    height, width = image.shape[:2]
    regions = collect_regions([_coords_text(b) for b in request.boxes], [_coords_text(p) for p in request.points],
                              request.masks, width, height)
    question, regions = fill_regions(request.prompt, regions, width, height)
    return Prepared(request, image, regions, question)


_REQUEST_KEYS = {"image", "prompt", "boxes", "points", "masks", "id"}


def parse_request(obj: Any, base_dir: str = "") -> Request:
    """A JSON object -> Request; relative image and mask paths are taken from `base_dir`."""
    if not isinstance(obj, dict):
        raise InferError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _REQUEST_KEYS)
    if unknown:
        raise InferError(f"unknown keys {unknown}; a request has {sorted(_REQUEST_KEYS)}")
    for key in ("image", "prompt"):
        if not isinstance(obj.get(key), str):
            raise InferError(f"{key!r} must be a string")
    lists = {}
    for key in ("boxes", "points", "masks"):
        value = obj.get(key, [])
        if not isinstance(value, list):
            raise InferError(f"{key!r} must be a list, got {value!r}")
        lists[key] = tuple(value)
    if not all(isinstance(m, str) for m in lists["masks"]):
        raise InferError("'masks' must be a list of PNG paths")

    def path(p: str) -> str:
        return os.path.join(base_dir, p)  # an absolute p stays as it is

    return Request(path(obj["image"]), obj["prompt"], lists["boxes"], lists["points"],
                   tuple(path(m) for m in lists["masks"]), obj.get("id"))


def read_requests(path: str) -> list[Request]:
    """The requests of a JSONL file (blank lines skipped); errors name the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"requests file {path!r}: no such file")
    base_dir = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(parse_request(json.loads(line), base_dir))
            except (json.JSONDecodeError, InferError) as e:
                raise InferError(f"{path} line {number}: {e}") from e
    if not out:
        raise InferError(f"{path} holds no request")
    return out


def check_requests(requests: Sequence[Request]) -> int:
    """Prepares each request once, before the model loads, so a bad one fails at once; returns
    the most regions one request refers to (the model's region slots)."""
    most = 0
    for index, request in enumerate(requests):
        try:
            most = max(most, len(prepare(request).regions))
        except ValueError as e:  # InferError, RegionError, ExampleError (unreadable image)
            raise InferError(f"request {index} ({request.image}): {e}") from e
    return most


def picture_name(index: int, request: Request) -> str:
    stem = os.path.splitext(os.path.basename(request.image))[0]
    return f"{index:04d}_{stem}.png"


def run_requests(
    model,
    params,
    tokenizer: text.Tokenizer,
    example_config: ExampleConfig,
    requests: Sequence[Request],
    sampling,
    out_dir: str,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Answers each request in turn (one compiled generate), writing `out_dir/answers.jsonl` and
    one picture per request; returns the answer lines. Request i uses seed `seed + i`."""
    os.makedirs(out_dir, exist_ok=True)
    lines = []
    with open(os.path.join(out_dir, ANSWERS_FILE), "w") as f:
        for index, request in enumerate(requests):
            job = prepare(request)
            reply, groundings = answer(model, params, tokenizer, example_config, job.image, job.question,
                                       job.regions, sampling, seed + index)
            name = picture_name(index, request)
            save_picture(picture(job.image, job.regions, groundings, request.prompt), os.path.join(out_dir, name))
            line = {"index": index, "id": request.id, "image": request.image, "prompt": request.prompt,
                    "question": job.question, "answer": reply, "groundings": [grounding_json(g) for g in groundings],
                    "picture": name}
            f.write(json.dumps(line) + "\n")
            f.flush()  # a long batch shows its progress on disk
            lines.append(line)
            log(f"[{index + 1}/{len(requests)}] {request.image}: {reply}")
    return lines


# ----------------------------------------------------------------------------------------------
# CLI


def _fail(error: BaseException) -> NoReturn:
    sys.exit(f"error: {' '.join(str(error).split())}")


def check_mode(image: str | None, prompt: str | None, has_regions: bool, requests: str | None,
               out_dir: str | None) -> None:
    """One request (--image, --prompt) or a batch (--requests, --out_dir), not a mix."""
    if requests:
        if image or prompt or has_regions:
            raise InferError("--requests takes the images, prompts and regions from its file: drop --image, "
                             "--prompt, --box, --point and --mask")
        if not out_dir:
            raise InferError("--requests needs --out_dir")
    elif not image or not prompt:
        raise InferError("give --image and --prompt (or --requests and --out_dir)")


def check_picture_path(path: str) -> None:
    """Refuses an --out whose extension names no image format, before any work is done."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in Image.registered_extensions():
        raise InferError(f"--out {path!r}: the extension must name an image format, e.g. .png or .jpg")


def main() -> None:
    """The command line; flags are defined here so importing this module defines none."""
    from absl import app, flags, logging

    checkpoint = flags.DEFINE_string("checkpoint", None, "training workdir or export directory")
    image = flags.DEFINE_string("image", None, "the image to ask about")
    prompt = flags.DEFINE_string("prompt", None, "the question; <region> stands for each region in turn")
    boxes = flags.DEFINE_multi_string("box", [], "x1,y1,x2,y2 in pixels (repeatable); regions: boxes, points, masks")
    points = flags.DEFINE_multi_string("point", [], "x,y in pixels (repeatable)")
    masks = flags.DEFINE_multi_string("mask", [], "PNG of the image's size, non-zero pixels = region (repeatable)")
    out = flags.DEFINE_string("out", "answer.png", "the picture of the answer")
    requests = flags.DEFINE_string("requests", None, "batch mode: a JSONL file of requests")
    out_dir = flags.DEFINE_string("out_dir", None, "batch mode: where answers.jsonl and the pictures go")
    max_new_tokens = flags.DEFINE_integer("max_new_tokens", 128, "generated tokens per answer at most")
    temperature = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
    top_p = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass when temperature > 0")
    seed = flags.DEFINE_integer("seed", 0, "region point subsets and sampling")
    max_length = flags.DEFINE_integer("max_length", None, "prompt length (default: the training config's)")
    flags.mark_flags_as_required(["checkpoint"])

    def run(argv) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:  # checkpoint libraries log every read at INFO
            logging.set_verbosity(logging.WARNING)
        # Everything the user typed is checked before JAX starts and the model loads.
        try:
            check_mode(image.value, prompt.value, bool(boxes.value or points.value or masks.value), requests.value,
                       out_dir.value)
            if not os.path.isdir(checkpoint.value):
                raise FileNotFoundError(f"checkpoint {checkpoint.value!r}: no such directory (a training workdir "
                                        f"or an export)")
            if requests.value:
                batch = read_requests(requests.value)
                slots = check_requests(batch)
            else:
                check_picture_path(out.value)
                job = prepare(Request(image.value, prompt.value, tuple(boxes.value), tuple(points.value),
                                      tuple(masks.value)))
                slots = len(job.regions)
            from ferret_jax.evaluate import load_model
            from ferret_jax.generate import Sampling

            sampling = Sampling(max_new_tokens=max_new_tokens.value, temperature=temperature.value, top_p=top_p.value)
            model, params, tokenizer, ecfg = load_model(checkpoint.value, max_length.value, max(1, slots))
        except (ValueError, OSError) as e:
            _fail(e)
        sampling = dataclasses.replace(sampling, eos_id=tokenizer.eos_id)

        try:
            if requests.value:
                run_requests(model, params, tokenizer, ecfg, batch, sampling, out_dir.value, seed.value,
                             log=lambda m: print(m, file=sys.stderr))
                print(f"wrote {os.path.join(out_dir.value, ANSWERS_FILE)} and {len(batch)} pictures", file=sys.stderr)
                return
            reply, groundings = answer(model, params, tokenizer, ecfg, job.image, job.question, job.regions, sampling,
                                       seed.value)
            print(report(reply, groundings))
            save_picture(picture(job.image, job.regions, groundings, prompt.value), out.value)
            print(f"wrote {out.value}", file=sys.stderr)
        except (InferError, R.RegionError, ExampleError, OSError) as e:  # ExampleError: e.g. a prompt too long
            _fail(e)

    app.run(run)


if __name__ == "__main__":
    main()
