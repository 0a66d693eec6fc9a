"""(image, conversation, regions) -> one example of the batch contract (DESIGN §5), on the host.

The model sees exactly what this function builds: the any-resolution views, the token sequence
with the `<image>` placeholder expanded to one slot per visual token (`visual_index`), the
`<region_fea>` slots bound to their regions in order of appearance (`region_index`), 512 points
per region, next-token targets and the loss mask. What cannot be represented is refused with an
`ExampleError` whose `reason` a pipeline can count; nothing is silently cut.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from data_pipelines import anyres, regions as regions_lib, text

PAD_ID = 0  # LLaMA's unk, Ferret's pad; never supervised


class ExampleError(ValueError):
    """A record that cannot become an example; `reason` is a short stable key for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
    """Static shapes of one example (the model config fixes the image sides and patch grids)."""

    max_length: int  # L
    max_regions: int  # R
    global_size: int = 336
    cell: int = 336
    max_tiles: int = 6  # T
    global_grid: int = 24  # CLIP patches per side of the global view
    tile_grid: int = 24  # DINOv2 patches per side of a tile
    num_points: int = regions_lib.NUM_POINTS
    use_local: bool = True
    system_prompt: bool = True  # start the conversation with text.SYSTEM_PROMPT (as the model was trained)

    @classmethod
    def for_model(cls, model_config, max_length: int, max_regions: int, system_prompt: bool = True) -> "ExampleConfig":
        """From a `ferret_jax.models.ferret.FerretConfig` (duck-typed: no jax import here)."""
        return cls(
            max_length=max_length,
            max_regions=max_regions,
            global_size=model_config.global_size,
            cell=model_config.cell,
            max_tiles=model_config.max_tiles,
            global_grid=model_config.global_grid,
            tile_grid=model_config.tile_grid,
            num_points=model_config.sampler.num_points,
            use_local=model_config.use_local,
            system_prompt=system_prompt,
        )

    def num_visual_tokens(self, cols: int, rows: int) -> int:
        return self.global_grid**2 + (cols * rows * self.tile_grid**2 if self.use_local else 0)


def region_prompt(region: regions_lib.Region, width: int, height: int) -> str:
    """How a referred region is written in a user turn: `[x, y] <region_fea>` for a point,
    `[x1, y1, x2, y2] <region_fea>` for a box or a free-form shape (its box; SPEC §5.1)."""
    if isinstance(region, regions_lib.Point):
        x, y, _, _ = regions_lib.region_box(region, width, height)
        return f"{text.point_text((x, y), width, height)} {text.REGION_TOKEN}"
    return f"{text.box_text(regions_lib.region_box(region, width, height), width, height)} {text.REGION_TOKEN}"


def _with_image_marker(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every example shows the image: add `<image>` to the first user turn when absent."""
    turns = list(turns)
    if not any(text.IMAGE_TOKEN in t for _, t in turns) and turns:
        role, first = turns[0]
        turns[0] = (role, f"{text.IMAGE_TOKEN}\n{first}")
    return turns


def build_example(
    image,
    turns: Sequence[tuple[str, str]],
    regions: Sequence[regions_lib.Region],
    tokenizer: text.Tokenizer,
    config: ExampleConfig,
    rng: np.random.Generator,
    segmentations: Sequence[np.ndarray | None] | None = None,
) -> dict[str, np.ndarray]:
    """One example of the batch contract.

    Args:
      image: PIL image or `[H, W(, C)]` array.
      turns: `[(role, text)]`, roles 'human'/'gpt'; user turns refer to regions with
        `region_prompt(...)`, one `<region_fea>` per region, in the order of `regions`.
      regions: the referred regions in order of appearance.
      segmentations: optional `[H, W]` masks per region (SPEC §4.3 box/point ∩ segmentation).
      rng: seeds the 512-point subsets.

    Returns:
      dict with `global_image [Sg, Sg, 3]`, `tiles [T, St, St, 3]`, `grid [2]`, `tokens [L]`,
      `visual_index [L]`, `region_index [L]`, `region_points [R, P, 2]`, `region_valid [R]`,
      `targets [L]`, `loss_mask [L]`.

    Raises:
      ExampleError (reasons: too_many_regions, region_without_slot, slot_without_region,
      too_long, bad_region) for what the contract cannot hold.
    """
    ids, weights = text.tokenize_conversation(_with_image_marker(turns), tokenizer, config.system_prompt)
    return _assemble(image, ids, weights, regions, tokenizer, config, rng, segmentations)[0]


def build_prompt(
    image,
    turns: Sequence[tuple[str, str]],
    regions: Sequence[regions_lib.Region],
    tokenizer: text.Tokenizer,
    config: ExampleConfig,
    rng: np.random.Generator,
    segmentations: Sequence[np.ndarray | None] | None = None,
) -> dict[str, np.ndarray]:
    """A generation prompt in the batch contract: `turns` end with a human turn and the tokens end
    right after "ASSISTANT:". Same keys as `build_example` (targets and loss mask all zero) plus
    `prompt_length` (int32 scalar: tokens before the padding). Raises ExampleError likewise."""
    ids = text.tokenize_prompt(_with_image_marker(turns), tokenizer, config.system_prompt)
    out, length = _assemble(image, ids, np.zeros(len(ids), np.float32), regions, tokenizer, config, rng, segmentations)
    out["targets"][:] = PAD_ID
    out["prompt_length"] = np.int32(length)
    return out


def _assemble(image, ids, weights, regions, tokenizer, config, rng, segmentations) -> tuple[dict[str, np.ndarray], int]:
    """Token ids (one IMAGE_ID, `<region_fea>` slots) + image + regions -> (the contract arrays,
    the number of tokens before the padding)."""
    image = anyres.to_rgb(image)
    height, width = image.shape[:2]
    if len(regions) > config.max_regions:
        raise ExampleError("too_many_regions", f"{len(regions)} regions, the config allows {config.max_regions}")
    views = anyres.preprocess(
        image, global_size=config.global_size, cell=config.cell, max_tiles=config.max_tiles, use_local=config.use_local
    )
    cols, rows = (int(v) for v in views["grid"])
    num_visual = config.num_visual_tokens(cols, rows)

    slots = np.flatnonzero(ids == tokenizer.region_id)
    if len(slots) > len(regions):
        raise ExampleError("slot_without_region", f"{len(slots)} {text.REGION_TOKEN} tokens but {len(regions)} regions")
    if len(slots) < len(regions):
        raise ExampleError("region_without_slot", f"{len(regions)} regions but {len(slots)} {text.REGION_TOKEN} tokens")
    (image_at,) = np.flatnonzero(ids == text.IMAGE_ID)
    length = len(ids) - 1 + num_visual
    if length > config.max_length:
        raise ExampleError(
            "too_long", f"{len(ids) - 1} text tokens + {num_visual} visual slots = {length} > max_length {config.max_length}"
        )

    # Expand the single image placeholder into num_visual slots.
    seq = np.concatenate([ids[:image_at], np.full(num_visual, text.IMAGE_ID, np.int64), ids[image_at + 1 :]])
    w = np.concatenate([weights[:image_at], np.zeros(num_visual, np.float32), weights[image_at + 1 :]])
    visual = np.full(len(seq), -1, np.int32)
    visual[image_at : image_at + num_visual] = np.arange(num_visual)
    region_index = np.full(len(seq), -1, np.int32)
    region_index[np.flatnonzero(seq == tokenizer.region_id)] = np.arange(len(regions))

    points = np.zeros((config.max_regions, config.num_points, 2), np.float32)
    valid = np.zeros((config.max_regions,), bool)
    segmentations = segmentations or [None] * len(regions)
    for k, (region, seg) in enumerate(zip(regions, segmentations)):
        try:
            points[k] = regions_lib.region_points(region, width, height, rng, seg, config.num_points)
        except regions_lib.RegionError as e:
            raise ExampleError("bad_region", f"region {k}: {e}") from e
        valid[k] = True

    n, L = len(seq), config.max_length
    out = {
        "global_image": np.asarray(views["global_image"], np.float32),  # fresh float32 arrays already
        "tiles": np.asarray(views["tiles"], np.float32),
        "grid": np.asarray([cols, rows], np.int32),
        "tokens": np.full(L, PAD_ID, np.int32),
        "visual_index": np.full(L, -1, np.int32),
        "region_index": np.full(L, -1, np.int32),
        "region_points": points,
        "region_valid": valid,
        "targets": np.full(L, PAD_ID, np.int32),
        "loss_mask": np.zeros(L, np.float32),
    }
    out["tokens"][:n] = seq
    out["visual_index"][:n] = visual
    out["region_index"][:n] = region_index
    # Position i predicts token i+1; its weight is that of the predicted token.
    out["targets"][: n - 1] = np.maximum(seq[1:], PAD_ID)
    out["loss_mask"][: n - 1] = w[1:]
    return out, n
