"""Host data-pipeline throughput: one stage III example at the 7B geometry, ours vs HF transformers.

Per example, on one process (= one data worker):

  ours: decode a 1024x768 JPEG (PIL), write the 4 referred regions (box, point, polygon, COCO-RLE
        free-form) into a multi-turn grounded conversation with `region_prompt`, then
        `build_example`: any-res views (global 336 CLIP-normalized + 3x2 tiles of 336
        ImageNet-normalized), tokenization with loss mask (32000-piece LLaMA-style SentencePiece),
        visual/region slots, 512 points per region, padded to max_length.
  HF:   decode the same JPEG (PIL), then `LlavaNextImageProcessor(...)(image, return_tensors="np")`
        with the same any-res grids: global 336 + 3x2 patches of 336. The image part only: no
        text, no regions.

The two run alternately (interleaved repeats) with a 0.5 s idle before each timed call, as in
bench_backbones.py; the median over repeats is reported as examples/s. Outputs are checked
(grid 3x2 for ours, 1 + 6 patches for HF) before anything is timed. The last output line is
one JSON object.

  python benchmarks/bench_data.py [--examples 8] [--repeats 5] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import json
import os
import platform
import pstats
import re
import statistics
import sys
import time

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import data as skdata

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from data_pipelines import anyres, text  # noqa: E402
from data_pipelines import regions as R  # noqa: E402
from data_pipelines.example import PAD_ID, ExampleConfig, build_example, region_prompt  # noqa: E402

WIDTH, HEIGHT = 1024, 768
JPEG_QUALITY = 90
# 7B geometry (config_lib "7b": global 336, cell 336, up to 6 tiles, 24x24 patches per view).
# 1024x768 -> 3x2 tiles: 576 + 6 * 576 = 4032 visual slots, so the text does not fit in 4096.
CONFIG = ExampleConfig(
    max_length=8192, max_regions=8, global_size=336, cell=336, max_tiles=6, global_grid=24, tile_grid=24,
    num_points=512, use_local=True,
)
SETTLE_S = 0.5  # idle before each timed call, as in bench_backbones.py


# --- inputs --------------------------------------------------------------------------------------


def make_jpegs() -> list[bytes]:
    """Three real photographs stretched to 1024x768, JPEG quality 90, as in-memory bytes."""
    out = []
    for array in (skdata.astronaut(), skdata.chelsea(), skdata.coffee()):
        img = Image.fromarray(array).convert("RGB").resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
        out.append(buf.getvalue())
    return out


def load_tokenizer() -> tuple[text.Tokenizer, str]:
    """The 32000-piece LLaMA-style SentencePiece model shipped with mistral-common (as tests/test_text.py
    finds it); a small trained model only when that package or file is missing."""
    try:
        import mistral_common

        path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
        if os.path.exists(path):
            return text.Tokenizer(model_file=path), f"mistral-common tokenizer.model.v1 (32000 pieces, {path})"
    except ImportError:
        pass
    corpus = [text.SYSTEM_PROMPT] + [t for _, t in make_turns(WIDTH, HEIGHT)]
    proto = text.train_tiny_tokenizer(corpus, vocab_size=1000)
    tok = text.Tokenizer(model_proto=proto)
    return tok, f"fallback: train_tiny_tokenizer ({tok.sp.get_piece_size()} pieces)"


def _ellipse_rle(cx: float, cy: float, rx: float, ry: float) -> dict:
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


# The record as a loader would hold it: pixel regions (the free-form one as COCO RLE, as stored in
# COCO/LVIS/SAM annotations); a segmentation for the point (its object's box, as tasks.py does).
REGIONS = [
    R.Box(112.0, 64.0, 540.0, 700.0),
    R.Point(742.0, 388.0),
    R.Polygon(((600.0, 96.0), (905.0, 140.0), (948.0, 470.0), (820.0, 520.0), (642.0, 430.0))),
    R.Rle(_ellipse_rle(300.0, 560.0, 180.0, 120.0)),
]
POINT_OBJECT_BOX = (660.0, 300.0, 830.0, 480.0)
GROUNDED = {  # pixel boxes the answers mention
    "person": (112, 64, 540, 700),
    "helmet": (180, 70, 420, 300),
    "flag": (600, 96, 948, 520),
    "panel": (660, 300, 830, 480),
    "table": (120, 440, 480, 680),
    "window": (700, 20, 1010, 260),
}

# Multi-turn grounded conversation: {r0}..{r3} become `[x1, y1, x2, y2] <region_fea>` (or `[x, y]
# <region_fea>` for the point), {b:name} the grounded boxes of the answers.
QA = [
    (
        "What is the object in the region {r0}? Describe it in detail, including its colour, what it is "
        "made of, and what it seems to be doing in the scene. "
        + text.GROUNDING_SUFFIX,
        "The region shows a person {b:person} standing upright and facing the camera. They wear a "
        "white suit with several patches sewn on the chest and sleeves, and a helmet {b:helmet} rests in "
        "their arms. The fabric looks thick and layered, the kind used for protective clothing, and the "
        "folds around the elbows and knees suggest it is stiff. The person seems to be posing for an "
        "official portrait rather than working: the posture is relaxed, the hands are still and the gaze "
        "is directed straight at the viewer. Behind them a flag {b:flag} hangs from a pole, and part of a "
        "control panel {b:panel} is visible on the right.",
    ),
    (
        "Now look at the point {r1}. What is located there, and how does it relate to the object in "
        "{r0}? Is it in front of or behind it?",
        "At that point there is a control panel {b:panel}. It is mounted on the wall behind the person "
        "{b:person}, so it is farther from the camera. It has a grid of small square buttons and a narrow "
        "display strip along its top edge, partly covered by the folds of the flag {b:flag}. The panel is "
        "out of focus compared with the person, which confirms that it stands some distance behind them.",
    ),
    (
        "Please describe the area outlined by {r2} and tell me whether it overlaps with the point {r1} "
        "mentioned before. " + text.GROUNDING_SUFFIX,
        "The outlined area covers most of the flag {b:flag} hanging behind the person. The stripes run "
        "horizontally and the upper left corner holds a field of small stars. The fabric is draped in "
        "soft vertical folds, so the stripes bend slightly where the cloth gathers near the pole. The "
        "outline does overlap with the point you asked about earlier: the lower right part of the flag "
        "falls in front of the upper left corner of the control panel {b:panel}. Above the flag a window "
        "{b:window} lets in some daylight, which makes the top edge of the cloth brighter than the rest.",
    ),
    (
        "What about the shape {r3}? List every object that you can see inside it, and give the location "
        "of each one. " + text.GROUNDING_SUFFIX,
        "The shape covers the lower left part of the image. Inside it I can see a table {b:table} with a "
        "few objects on it, the lower part of the person's suit {b:person}, and the bottom of the helmet "
        "{b:helmet} that the person holds against their side. The table top is light brown wood with a "
        "visible grain, and its front edge is slightly rounded.",
    ),
]


_REGION_REF = re.compile(r"\{r(\d)\}")
_BOX_REF = re.compile(r"\{b:(\w+)\}")


def make_turns(width: int, height: int) -> list[tuple[str, str]]:
    """The stage III conversation of one record, regions written with `region_prompt`.

    The first mention of each region carries its `<region_fea>`; later mentions are its plain
    coordinates, so the conversation holds exactly one slot per region, in the order of REGIONS.
    """
    prompts = [region_prompt(r, width, height) for r in REGIONS]
    plain = [p.removesuffix(f" {text.REGION_TOKEN}") for p in prompts]
    boxes = {name: text.box_text(box, width, height) for name, box in GROUNDED.items()}
    seen: set[int] = set()

    def region(m: re.Match) -> str:
        k = int(m.group(1))
        first = k not in seen
        seen.add(k)
        return prompts[k] if first else plain[k]

    turns = []
    for q, a in QA:
        turns.append(("human", _REGION_REF.sub(region, q)))
        turns.append(("gpt", _BOX_REF.sub(lambda m: boxes[m.group(1)], a)))
    turns[0] = ("human", f"{text.IMAGE_TOKEN}\n{turns[0][1]}")
    return turns


# --- the two pipelines ---------------------------------------------------------------------------


def ours_one(jpeg: bytes, tokenizer: text.Tokenizer, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = Image.open(io.BytesIO(jpeg))
    image.load()
    width, height = image.size
    turns = make_turns(width, height)
    segmentations = [None, R.box_mask(*POINT_OBJECT_BOX, width, height), None, None]
    return build_example(image, turns, REGIONS, tokenizer, CONFIG, rng, segmentations)


def make_hf_processor():
    """`transformers.LlavaNextImageProcessor` (whatever class that name gives a user by default) with
    Ferret's 14 grids as pinpoints; HF pinpoints are [height, width], ours (cols, rows)."""
    import transformers

    pinpoints = [[rows * CONFIG.cell, cols * CONFIG.cell] for cols, rows in anyres.GRIDS]
    return transformers.LlavaNextImageProcessor(
        image_grid_pinpoints=pinpoints, size={"shortest_edge": CONFIG.cell},
        crop_size={"height": CONFIG.cell, "width": CONFIG.cell}, do_pad=True,
    )


def hf_one(jpeg: bytes, processor) -> dict[str, np.ndarray]:
    image = Image.open(io.BytesIO(jpeg))
    image.load()
    return processor(image, return_tensors="np")


# --- timing --------------------------------------------------------------------------------------


def _time(fn) -> float:
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, alternating between them each repeat, after one warm-up call."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_time(fn))
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=8, help="examples per timed call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile our pipeline and print the top entries")
    args = parser.parse_args()

    import torch
    import transformers

    jpegs = make_jpegs()
    tokenizer, tok_desc = load_tokenizer()
    processor = make_hf_processor()
    hf_class = type(processor).__name__
    print(f"tokenizer: {tok_desc}")
    torchvision = importlib.util.find_spec("torchvision") is not None
    print(f"HF processor: transformers {transformers.__version__}: LlavaNextImageProcessor -> {hf_class} "
          f"(torchvision {'installed' if torchvision else 'not installed'}; this is the class a user gets by default)")
    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()} (left at its default)")
    print(f"JPEG sizes (bytes): {[len(j) for j in jpegs]}")

    # Check the outputs before timing.
    out = ours_one(jpegs[0], tokenizer, np.random.default_rng(0))
    grid = [int(v) for v in out["grid"]]
    assert grid == [3, 2], grid
    num_visual = CONFIG.num_visual_tokens(*grid)
    # Text tokens: bos, system prompt, turns and eos tokens, without the `<image>` placeholder.
    tokens_text = len(text.tokenize_conversation(make_turns(WIDTH, HEIGHT), tokenizer)[0]) - 1
    tokens_total = tokens_text + num_visual
    assert int((out["tokens"] != PAD_ID).sum()) == tokens_total  # the padding starts right after
    assert int((out["visual_index"] >= 0).sum()) == num_visual
    assert int((out["region_index"] >= 0).sum()) == len(REGIONS) and out["region_valid"].sum() == len(REGIONS)
    supervised = int((out["loss_mask"] > 0).sum())
    print("ours:", {k: (tuple(v.shape), str(v.dtype)) for k, v in out.items()})
    print(f"ours: grid {grid}, {num_visual} visual slots + {tokens_text} text tokens = {tokens_total} tokens "
          f"(padded to max_length {CONFIG.max_length}), {supervised} supervised, {len(REGIONS)} regions")
    hf = hf_one(jpegs[0], processor)
    pv = np.asarray(hf["pixel_values"])
    print(f"HF:   pixel_values {pv.shape} {pv.dtype}, image_sizes {np.asarray(hf['image_sizes']).tolist()}")
    assert pv.shape == (1, 7, 3, CONFIG.cell, CONFIG.cell), pv.shape  # global + 3x2 patches

    n = args.examples

    def ours():
        for i in range(n):
            ours_one(jpegs[i % len(jpegs)], tokenizer, np.random.default_rng(i))

    def theirs():
        for i in range(n):
            hf_one(jpegs[i % len(jpegs)], processor)

    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(ours)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)

    times = interleaved({"ours": ours, "hf": theirs}, args.repeats)
    t_ours, t_hf = statistics.median(times["ours"]), statistics.median(times["hf"])
    for k, v in times.items():
        print(f"{k:4s} s per {n} examples: " + " ".join(f"{t:.3f}" for t in v))
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
        f"transformers {transformers.__version__}, torch {torch.__version__}",
        "examples_per_call": n,
        "repeats": args.repeats,
        "ours_examples_per_s": n / t_ours,
        "hf_examples_per_s": n / t_hf,
        "speedup": t_hf / t_ours,
        "ours_ms_per_example": 1e3 * t_ours / n,
        "hf_ms_per_example": 1e3 * t_hf / n,
        "hf_class": hf_class,
        "hf_pixel_values": list(pv.shape),
        "tokenizer": "mistral-common v1 (32000)" if tok_desc.startswith("mistral") else "tiny (fallback)",
        "tokens_text": tokens_text,
        "tokens_visual": num_visual,
        "tokens_total": tokens_total,
        "max_length": CONFIG.max_length,
        "grid": grid,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"ours {result['ours_examples_per_s']:.2f} ex/s   HF {result['hf_examples_per_s']:.2f} ex/s   "
          f"speedup {result['speedup']:.2f}", flush=True)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
