"""Model size presets and the `file.py:key=value,...` argument parser used by configs/.

Presets give the three backbones of a size: `tiny` (unit tests), `demo` (CPU demo on the
synthetic world), `7b` and `13b` (CLIP ViT-L/14-336 + DINOv2 ViT-L/14 + Vicuna v1.5, vocab 32000
plus `<region_fea>`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ferret_jax.models.clip import ClipConfig
from ferret_jax.models.dinov2 import Dinov2Config
from ferret_jax.models.ferret import FerretConfig
from ferret_jax.models.llama import LlamaConfig
from ferret_jax.models.sampler import SamplerConfig

VICUNA_VOCAB = 32000
ADDED_TOKENS = ("<region_fea>",)

CLIP_L14_336 = ClipConfig(
    image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096, select_layer=-2
)
DINOV2_L14 = Dinov2Config(
    image_size=518, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096
)
VICUNA_7B_V15 = LlamaConfig(
    vocab_size=VICUNA_VOCAB + len(ADDED_TOKENS),
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=4096,
)
VICUNA_13B_V15 = dataclasses.replace(
    VICUNA_7B_V15, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40
)

TINY = dict(
    clip=ClipConfig(image_size=28, patch_size=14, hidden_size=32, num_layers=3, num_heads=2, mlp_dim=64),
    dino=Dinov2Config(image_size=42, patch_size=14, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64),
    llm=LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        max_position_embeddings=1024,
    ),
)
# CPU-sized: trains all three stages on the synthetic world in minutes. Patch 8 keeps the visual
# token count small (8x8 on the 64-pixel global view, 6x6 per 48-pixel tile). The decoder reads
# boxes from the global view, and 64 pixels box single objects better than 48 (Acc@0.5 0.62
# against 0.56, mean of four seeds; DEMO_RUNS.md) for ~1 minute more of the demo. The few layers
# run unrolled (`scan_unroll`): about 7% faster a step on CPU (BENCHMARKS.md). The decoder's causal
# attention goes in query blocks of 96 rows, 3 at stage III's 284 tokens: with the heads-major
# blocks, a stage-III step ~3% faster than with 64 rows (~4% with the blocks' own backward;
# BENCHMARKS.md). The decoder's 128 wide attention is cut in 8 heads of 16, not 4 of 32 (the same
# parameters): four seeds ground at Acc@0.5 0.505-0.565 instead of 0.490-0.535, and refer
# 0.95-0.985 instead of 0.89-0.98, for a stage-III step ~1.2x as long (DEMO_RUNS.md).
DEMO = dict(
    clip=ClipConfig(image_size=64, patch_size=8, hidden_size=128, num_layers=2, num_heads=4, mlp_dim=256, select_layer=-1,
                    scan_unroll=2),
    dino=Dinov2Config(image_size=48, patch_size=8, hidden_size=128, num_layers=2, num_heads=4, mlp_dim=256, scan_unroll=2),
    llm=LlamaConfig(
        vocab_size=1024, hidden_size=128, intermediate_size=352, num_layers=3, num_heads=8, num_kv_heads=8,
        max_position_embeddings=2048, scan_unroll=3, attention_chunk=96,
    ),
)
_ACCEL = dict(dtype="bfloat16", remat="full")
SIZES = {
    "tiny": TINY,
    "demo": DEMO,
    "7b": dict(
        clip=dataclasses.replace(CLIP_L14_336, **_ACCEL),
        dino=dataclasses.replace(DINOV2_L14, **_ACCEL),
        llm=dataclasses.replace(VICUNA_7B_V15, **_ACCEL),
    ),
    "13b": dict(
        clip=dataclasses.replace(CLIP_L14_336, **_ACCEL),
        dino=dataclasses.replace(DINOV2_L14, **_ACCEL),
        llm=dataclasses.replace(VICUNA_13B_V15, **_ACCEL),
    ),
}


def backbones(size: str) -> dict[str, Any]:
    """`{'clip': ClipConfig, 'dino': Dinov2Config, 'llm': LlamaConfig}` of a preset size."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    return dict(SIZES[size])


# Image sides and sampler sizes per preset; the 7B/13B values are the paper defaults (SPEC App. B).
_FERRET = {
    "tiny": dict(global_size=28, cell=28, max_tiles=4, sampler=SamplerConfig(num_points=64, stages=((16, 8), (8, 8)))),
    "demo": dict(global_size=64, cell=48, max_tiles=2, sampler=SamplerConfig(num_points=64, stages=((16, 8), (4, 8)))),
    "7b": dict(global_size=336, cell=336, max_tiles=6),
    "13b": dict(global_size=336, cell=336, max_tiles=6),
}


def ferret_config(size: str, **overrides: Any) -> FerretConfig:
    """The Ferret-v2 model config of a preset size; `overrides` replace FerretConfig fields."""
    return FerretConfig(**backbones(size), **{**_FERRET[size], **overrides})


def _parse_value(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected a boolean, got {text!r}")
        return text.lower() in ("true", "1")
    if default is None or isinstance(default, str):
        return text
    return type(default)(text)


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
    """Parses a config file's arg string like big_vision: `"size=13b,steps=10"` or `"demo"`.

    A bare word `w` means `size=w` when `size` is a known key, else `w=True`. Values take the
    type of their default; unknown keys are an error naming the known ones.
    """
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            if "size" in defaults and key in SIZES:
                key, value = "size", key
            else:
                value = "true"
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        out[key] = _parse_value(value, defaults[key])
    return out


# ----------------------------------------------------------------------------------------------
# Stage configs (configs/stageN.py call `stage_config(N, arg)`)

TRAINABLE = {  # regexes over param paths like 'llm/layers/q/kernel' (DESIGN §7)
    1: ("proj_global/.*",),
    2: ("proj_global/.*", "proj_local/.*", "sampler/.*"),
    3: (".*",),
}
# Suggested hyperparameters (SPEC §6.2: stage I LLaVA-1.5 pretrain, stage III Ferret/LLaVA-1.5).
_OPTIM = {
    1: dict(lr=1e-3, batch_size=256, total_steps=5500, max_length=2048),
    2: dict(lr=2e-4, batch_size=128, total_steps=2000, max_length=6144),
    3: dict(lr=2e-5, batch_size=128, total_steps=10200, max_length=6144),
}
# Full-size data: paths left empty on purpose, set them with --config.data.sources.<name>.<key>=...
_REAL_DATA = {
    1: {"sharegpt4v": {"type": "conversation", "annotations": "", "image_root": ""}},
    2: {"lvis": {"type": "detection", "annotations": "", "image_root": ""}},
    3: {
        "grit": {"type": "grit", "annotations": "", "image_root": ""},
        "vqa": {"type": "grounded_conversation", "annotations": "", "image_root": "", "detections": "", "ocr": None},
    },
}
_REAL_WEIGHTS = {1: {"sharegpt4v": 1.0}, 2: {"lvis": 1.0}, 3: {"grit": 3.0, "vqa": 1.0}}

# CPU sizes: the synthetic world; `tiny` keeps scenes small so every stage fits a short sequence.
# The demo world has 1-2 large objects named by colour and shape ('red circle') on 1x1, 2x1 and
# 1x2 grids of ~48-pixel cells: small enough to learn grounding in minutes on a CPU, still
# any-resolution.
_DEMO_SCENE = dict(
    max_objects=2, cell_range=(44, 56), grids=((1, 1), (2, 1), (1, 2)),
    sizes={"small": (0.3, 0.42), "large": (0.42, 0.6)}, name_sizes=False,
)
_SMALL = {
    # The tests' loss_positions: stage I's batches fit (16 supervised tokens at most), most of
    # stage II's and III's do not (up to 110), so both of the loss's paths run.
    "tiny": dict(batch_size=8, max_length=384, max_regions=3, total_steps=4, lr=2e-3, grounding_share=0.5,
                 scene=dict(max_objects=3, cell_range=(28, 56)), loss_positions=32),
    # max_length: stage I's longest example is 100 tokens, stage II's 320; stage III's 284 hold
    # >99% of its examples (longer ones are redrawn and counted as too_long). Most steps go to
    # stage III, whose tasks the targets measure: three grounding questions in four (its answers
    # are where the demo lags most), at half the earlier stages' lr (DEMO_RUNS.md). Stage I's
    # steps are cheap (~0.03 s): 500 of them take its caption loss from ~2.7 to ~0.5.
    # loss_positions: stage I's examples carry at most 10 supervised tokens, stage II's 73 and
    # stage III's 50 (800 examples each; mean 8, 56, 27).
    # box_quantum: the answers write each coordinate as the centre of its 100-wide bin of the
    # 0..999 canvas ("[450, 250, 850, 650]"). The encoders' box code tells the hundreds digit (the
    # global view's patches are 125 wide), so the decoder had nothing to write the last two digits
    # from and wrote the most common ("400" where the bin centre errs by 25 on average, not 50).
    # The true boxes at bin centres still score Acc@0.5 0.975; four seeds' grounding rose from
    # mean 0.424 to 0.510, single objects from 0.70 to 0.81 (DEMO_RUNS.md).
    "demo": dict(batch_size=8, max_length={1: 108, 2: 324, 3: 284}, max_regions=3, total_steps={1: 500, 2: 250, 3: 1800},
                 lr={1: 2e-3, 2: 2e-3, 3: 1e-3}, grounding_share=0.75, box_quantum=100, scene=_DEMO_SCENE,
                 loss_positions={1: 16, 2: 80, 3: 64}),
}
# The demo starts from random backbones. Before stage I it warms them up on the same world
# (`ferret_jax.warmup`), the stand-ins for the pretrained backbones the paper starts from: CLIP and
# DINOv2 on dense patch targets ("dense"), then the LLM on the stage-III conversations and stage-I
# captions without their images ("language": the answer formats, and taking names from the
# question). So stage I trains only the projector, as in the paper, and aligns it: to a frozen LLM
# that had never seen a caption, 60 stage-I steps left the caption loss at ~5.5. The small LLM's stand-in knows no image, so stage II
# trains it too (the 7B/13B configs keep the paper's sets, TRAINABLE). The dense warm-up's length
# matters more than any stage's: after 400 steps the stage-III model never read boxes from the
# image, after 1000 it did; 1800 steps of 24 scenes (the time of 1400 of 32) end with the patch
# categories 65–80% right instead of 59–64% (DEMO_RUNS.md).
DEMO_WARMUP = {
    "dense": dict(steps=1800, batch_size=24, lr=3e-3),
    # The longest text of a demo-world conversation (2 questions, 2 boxes per answer) is ~160
    # tokens. The head that copies the shape word from the question formed after ~200 steps of an
    # 800-step run; a 400-step run (its lr decaying twice as fast) ended without it.
    # Induction first (random sequences of the world's 66 token ids, repeated): without it a
    # referring answer could start on one option's colour and end on the other's shape. It forms
    # after a plateau, ~600 steps into a 2000-step schedule; 1000- and 1400-step schedules decay
    # before it ends in some seeds (DEMO_RUNS.md).
    "language": dict(steps=800, batch_size=16, lr=3e-3, max_length=176, caption_share=0.25,
                     induction_steps=2000, induction_lr=1e-3),
}
# The projectors' first layers (`fc1`) stay as the warm-up made them, the dense heads' box-digit
# logits (`warmup.projectors_from_heads`): the code the stage-III LLM reads boxes from. Trained on,
# with updates that Adam makes ~lr in size however small the gradient, the code wore away: the
# global view's patches told their object's hundreds digits 79% right at the warm-up's end, 76% after
# stage I, 67% after stage II and 60% after stage III (seed 0; `benchmarks/probe_box_code.py`);
# kept, 76% after stage III (the encoders still train), and four seeds box single objects 0.70
# instead of 0.62 (DEMO_RUNS.md).
DEMO_TRAINABLE = {
    1: ("proj_global/fc2/.*",),
    2: ("proj_global/fc2/.*", "proj_local/fc2/.*", "sampler/.*", "llm/.*"),
    3: ("clip/.*", "dino/.*", "proj_global/fc2/.*", "proj_local/fc2/.*", "sampler/.*", "llm/.*"),
}


def _synthetic_data(size: str, stage: int) -> tuple[dict, dict, dict]:
    small = _SMALL[size]
    options = {"seed": 0, "grounding_share": small["grounding_share"], "box_quantum": small.get("box_quantum", 1),
               **small["scene"]}
    train = {"shapes": {"type": "synthetic", "split": "train", "num_records": 100_000, **options}}
    held_out = {"shapes": {"type": "synthetic", "split": "val", "num_records": 1_000, **options}}
    return train, {"shapes": 1.0}, held_out


def _per_stage(size: str, key: str, stage: int) -> Any:
    """A small preset's value of `key`, which may differ per stage ({stage: value})."""
    value = _SMALL[size][key]
    return value[stage] if isinstance(value, dict) else value


def stage_config(stage: int, arg: str | None = None):
    """The ml_collections config of training stage 1, 2 or 3 for `arg` ('size=7b' default, '13b',
    'demo', 'tiny'). Every key is documented inline; `--config.<key>=<value>` overrides one."""
    import ml_collections

    from ferret_jax import sharding

    if stage not in TRAINABLE:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
    a = parse_arg(arg, size="7b")
    size = a["size"]
    backbones(size)  # validates the size
    small = size in _SMALL
    optim = _OPTIM[stage]

    c = ml_collections.ConfigDict()
    c.stage = stage
    c.size = size
    c.seed = 0
    # FerretConfig overrides: stage I sees the global view only (SPEC §6.2).
    c.model = ml_collections.ConfigDict({"use_local": stage > 1, "fusion": "add", "sampler_input": "raw"})

    c.data = ml_collections.ConfigDict()
    if small:
        sources, weights, held_out = _synthetic_data(size, stage)
        c.data.tokenizer = "synthetic"  # a SentencePiece model trained at start on the synthetic corpus
        c.data.batch_size = _SMALL[size]["batch_size"]
        c.data.max_length = _per_stage(size, "max_length", stage)
        c.data.max_regions = _SMALL[size]["max_regions"]
        # No system prompt: to a small LLM trained from scratch its 87 constant tokens carry
        # nothing, and they were a third of every demo sequence (a third of the step time).
        c.data.system_prompt = False
    else:
        sources, weights, held_out = _REAL_DATA[stage], _REAL_WEIGHTS[stage], {}
        c.data.tokenizer = ""  # path to the LLM's tokenizer.model (SentencePiece)
        c.data.batch_size = optim["batch_size"]  # global, over all processes
        c.data.max_length = optim["max_length"]
        c.data.max_regions = 10 if stage > 1 else 1
        c.data.system_prompt = True  # begin each conversation with text.SYSTEM_PROMPT (Ferret's format)
    c.data.sources = sources
    c.data.weights = weights
    c.data.eval_sources = held_out  # held-out data for the periodic eval loss; {} = none
    c.data.worker_count = 0  # grain worker processes per host (0 = in the training process)
    c.data.read_threads = 2  # threads building batches ahead (in each worker, or in the training process)
    c.data.prefetch_batches = 4  # batches built ahead; grain's default of 500 keeps small hosts busy for minutes
    c.data.worker_buffer_size = 2

    c.optim = ml_collections.ConfigDict()
    c.optim.trainable = DEMO_TRAINABLE[stage] if size == "demo" else TRAINABLE[stage]
    c.optim.lr = _per_stage(size, "lr", stage) if small else optim["lr"]
    c.optim.warmup_steps = 1 if size == "tiny" else int((0.05 if small else 0.03) * (_per_stage(size, "total_steps", stage) if small else optim["total_steps"]))
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    # (regex, multiplier) pairs: stage III trains the encoders more gently (SPEC §6.2 suggestion).
    c.optim.lr_multipliers = (("clip/.*", 0.1), ("dino/.*", 0.1)) if stage == 3 else ()
    c.optim.grad_accum_steps = 1

    c.total_steps = _per_stage(size, "total_steps", stage) if small else optim["total_steps"]
    c.log_every = 1 if small else 10
    c.ckpt_every = 2 if size == "tiny" else 100 if small else 1000
    c.eval_every = 2 if size == "tiny" else 100 if small else 1000
    c.eval_batches = 1 if size == "tiny" else 4
    c.max_nonfinite_in_a_row = 5  # consecutive skipped (NaN/Inf) updates before the run stops
    # > 0: the lm_head and loss run at each example's first N supervised tokens only, or at all
    # positions for a batch where some example has more (the same loss either way); 0: always all.
    c.loss_positions = _per_stage(size, "loss_positions", stage) if small else 0

    c.mesh = ml_collections.ConfigDict({"shape": (1, -1, 1)})  # ('data', 'fsdp', 'tensor'); -1 = the rest
    c.sharding_rules = tuple(sharding.RULES)

    c.checkpoint = ml_collections.ConfigDict({"max_to_keep": 3, "async_save": True})
    # Where the weights come from when the workdir has no checkpoint (DESIGN §9), in this order:
    c.init = ml_collections.ConfigDict({
        "resume": "",  # another run's workdir: state + data position, as if it were ours
        "init_from": "",  # a previous stage's workdir (or export dir): its params; new subtrees keep their init
        "pretrained": "",  # `python -m ferret_jax.convert` output: CLIP, DINOv2 and LLM weights
        # Stage II from a stage-I run: proj_local starts as a copy of proj_global (DESIGN §7). The
        # demo's warm-up starts proj_local from DINOv2's dense head (`warmup.projector_from_head`),
        # which stage I, training proj_global only, hands over as it is.
        "copy_global_projector": size != "demo",
    })
    c.tensorboard = True
    return c
