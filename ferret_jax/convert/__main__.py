"""CLI: python -m ferret_jax.convert --clip DIR --dinov2 DIR --llm DIR --out DIR [--dtype bfloat16]."""

from __future__ import annotations

import argparse
import sys

import ml_dtypes
import numpy as np

from ferret_jax.convert import CheckpointError, convert_all, save_converted


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ferret_jax.convert",
        description="Convert HF safetensors checkpoints (CLIP vision, DINOv2, LLaMA/Vicuna) into a "
        "ferret_jax Orbax params checkpoint.",
    )
    parser.add_argument("--clip", help="CLIPVisionModel or CLIPModel folder (e.g. clip-vit-large-patch14-336)")
    parser.add_argument("--dinov2", help="Dinov2Model folder (e.g. dinov2-large)")
    parser.add_argument("--llm", help="LlamaForCausalLM folder (e.g. vicuna-7b-v1.5, safetensors)")
    parser.add_argument("--out", required=True, help="output folder (must not hold a params checkpoint)")
    parser.add_argument("--added_tokens", type=int, default=1, help="rows added to the vocabulary (<region_fea>)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    dtype = np.float32 if args.dtype == "float32" else ml_dtypes.bfloat16
    try:
        configs, params, report = convert_all(args.clip, args.dinov2, args.llm, args.added_tokens, dtype)
        path = save_converted(args.out, configs, params, report)
    except (CheckpointError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[convert] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
