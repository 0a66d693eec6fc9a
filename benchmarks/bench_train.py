"""Training step speed: Ferret-v2 `demo` stage III (JAX/Flax) vs HF LLaVA-NeXT (PyTorch eager).

  ours (any-res): the trainer's jitted step of `configs/stage3.py:demo` (its trainable set:
                  all but the projectors' fc1; AdamW with the stage's lr multipliers,
                  global-norm clip, donated state) on a
                  real batch of the synthetic data pipeline (`data.batch_size` examples of
                  `data.max_length` tokens): CLIP global view + DINOv2 tiles + spatial-aware
                  sampler + LLaMA.
  ours (global):  the same with `model.use_local=False` (only the global view's g*g visual slots
                  per example, sampler on the global map), data built to match.
  HF:             `transformers.LlavaNextForConditionalGeneration` with the demo's CLIP tower and
                  LLaMA sizes, projector mlp2x_gelu, the same vision feature layer, and
                  `image_grid_pinpoints=[[S, S]]` at the global view's side S (the fewest visual
                  tokens LLaVA-NeXT can produce: base view + one high-resolution patch + newline
                  tokens); same B and L, our global views as images, random text ids, labels on
                  as many positions as our loss mask; forward + loss.backward() + AdamW step +
                  zero_grad, fp32.

All three run alternately (interleaved repeats, 0.5 s idle before each timed call) in one
process; the figure to compare across machines is `ratio_vs_llava_next` = ours (global) / HF,
lower is better. Both sides' losses are checked to be finite first. The last output line is one
JSON object.

  python benchmarks/bench_train.py [--repeats 5] [--warmup 2] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from timing import interleaved  # noqa: E402
from train_step import FerretStep, demo_inputs  # noqa: E402


# ----------------------------------------------------------------------------------------------
# HF LLaVA-NeXT


def hf_config(mcfg) -> transformers.LlavaNextConfig:
    c, l = mcfg.clip, mcfg.llm
    vision = transformers.CLIPVisionConfig(
        hidden_size=c.hidden_size, intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, image_size=c.image_size, patch_size=c.patch_size,
    )
    text_cfg = transformers.LlamaConfig(
        vocab_size=l.vocab_size, hidden_size=l.hidden_size, intermediate_size=l.intermediate_size,
        num_hidden_layers=l.num_layers, num_attention_heads=l.num_heads, num_key_value_heads=l.num_kv_heads,
        max_position_embeddings=l.max_position_embeddings, rms_norm_eps=l.rms_norm_eps, rope_theta=l.rope_theta,
        tie_word_embeddings=False,
    )
    return transformers.LlavaNextConfig(
        vision_config=vision, text_config=text_cfg, image_token_index=l.vocab_size - 1, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=c.select_layer,
        image_grid_pinpoints=[[c.image_size, c.image_size]], tie_word_embeddings=False,
    )


class HFStep:
    """LLaVA-NeXT training step on a batch of our B, L, images and loss-position counts."""

    def __init__(self, mcfg, ours: FerretStep, lr: float):
        config = hf_config(mcfg)
        config._attn_implementation = "sdpa"
        config.text_config._attn_implementation = "sdpa"
        config.vision_config._attn_implementation = "sdpa"
        self.model = transformers.LlavaNextForConditionalGeneration(config).train()
        b, length = ours.host["tokens"].shape
        size = mcfg.global_size
        # The global views of our batch (CLIP-normalized), as LLaVA-NeXT's base image and its one
        # high-resolution patch of the same size (pinpoints [[S, S]]).
        images = torch.tensor(ours.host["global_image"]).permute(0, 3, 1, 2).contiguous()
        self.pixel_values = torch.stack([images, images], dim=1)  # [B, 2, 3, H, W]
        self.image_sizes = torch.tensor([[size, size]] * b)
        with torch.no_grad():
            feats = self.model.model.get_image_features(self.pixel_values, self.image_sizes).pooler_output
        self.visual_tokens = int(feats[0].shape[0])
        rng = np.random.RandomState(0)
        image_id = config.image_token_index
        ids = rng.randint(1, image_id, (b, length))
        labels = np.full((b, length), -100)
        start = 5  # a few text tokens (system prompt) before the image, as in a conversation
        for i, n in enumerate(ours.loss_positions):
            ids[i, start:start + self.visual_tokens] = image_id
            text_pos = np.setdiff1d(np.arange(1, length), np.arange(start, start + self.visual_tokens))
            pos = rng.choice(text_pos, n, replace=False)
            labels[i, pos] = rng.randint(1, image_id, n)
        self.input_ids, self.labels = torch.tensor(ids), torch.tensor(labels)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.num_params = sum(p.numel() for p in self.model.parameters())

    def __call__(self) -> float:
        out = self.model(input_ids=self.input_ids, pixel_values=self.pixel_values, image_sizes=self.image_sizes,
                         labels=self.labels)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out.loss.item()

    def pieces(self) -> dict:
        kw = dict(input_ids=self.input_ids, pixel_values=self.pixel_values, image_sizes=self.image_sizes, labels=self.labels)

        def fwd():
            with torch.no_grad():
                self.model(**kw).loss.item()

        def fwd_bwd():
            self.model(**kw).loss.backward()
            self.model.zero_grad(set_to_none=True)

        def vision_fwd_bwd():
            feats = self.model.model.get_image_features(self.pixel_values, self.image_sizes).pooler_output
            sum(f.sum() for f in feats).backward()
            self.model.zero_grad(set_to_none=True)

        return {"fwd": fwd, "fwd_bwd": fwd_bwd, "vision_fwd_bwd": vision_fwd_bwd}


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also time forward / forward+backward pieces")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    cfg, proto = demo_inputs()
    full = FerretStep(cfg, proto)
    glob = FerretStep(cfg, proto, use_local=False)
    hf = HFStep(glob.mcfg, glob, cfg.optim.lr)
    b, length = full.host["tokens"].shape

    losses = {"ferret": full(), "ferret_global": glob(), "hf": hf()}
    for k, v in losses.items():
        if not np.isfinite(v):
            raise FloatingPointError(f"{k}: non-finite loss {v}")
    print(f"first-step losses: {', '.join(f'{k} {v:.3f}' for k, v in losses.items())}", flush=True)

    raw: dict = {}
    t = interleaved({"ferret": full, "ferret_global": glob, "hf": hf}, args.repeats, args.warmup - 1, raw)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}), "
                   f"torch {torch.__version__}, transformers {transformers.__version__}",
        "load_avg_1min_at_start": round(load, 2),
        "load_avg_1min_at_end": round(load_end, 2),
        "ferret_step_s": t["ferret"],
        "ferret_tokens_per_s": full.tokens / t["ferret"],
        "ferret_global_step_s": t["ferret_global"],
        "ferret_global_tokens_per_s": glob.tokens / t["ferret_global"],
        "hf_step_s": t["hf"],
        "ratio_vs_llava_next": t["ferret_global"] / t["hf"],
        "ours_visual_tokens": glob.visual_per_example[0],
        "ours_visual_tokens_anyres": [min(full.visual_per_example), max(full.visual_per_example)],
        "hf_visual_tokens": hf.visual_tokens,
        "ferret_nonpad_tokens": full.tokens,
        "ferret_global_nonpad_tokens": glob.tokens,
        "loss_positions": int(sum(full.loss_positions)),
        "ferret_params": int(sum(x.size for x in jax.tree.leaves(full.state["params"]))),
        "hf_params": hf.num_params,
        "geometry": f"view {full.mcfg.global_size} px, patch {full.mcfg.clip.patch_size}, max_tiles {full.mcfg.max_tiles}, "
                    f"regions {cfg.data.max_regions}, vocab {full.mcfg.llm.vocab_size}",
        "batch": b,
        "length": length,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    print()
    print(f"{'step (B=%d, L=%d)' % (b, length):30s} {'median s':>9s} {'visual/ex':>10s} {'tok/s':>9s}")
    print(f"{'ferret any-res (stage III)':30s} {t['ferret']:9.3f} {'%d-%d' % tuple(result['ours_visual_tokens_anyres']):>10s} "
          f"{result['ferret_tokens_per_s']:9.0f}")
    print(f"{'ferret global only':30s} {t['ferret_global']:9.3f} {result['ours_visual_tokens']:>10d} "
          f"{result['ferret_global_tokens_per_s']:9.0f}")
    print(f"{'HF LLaVA-NeXT (torch eager)':30s} {t['hf']:9.3f} {hf.visual_tokens:>10d}")
    print(f"ratio ferret global / LLaVA-NeXT: {result['ratio_vs_llava_next']:.2f}")
    for k, v in raw.items():
        print(f"  {k} times (s): {' '.join(f'{x:.3f}' for x in v)}")
    print(f"load average (1 min): {load:.2f} at start, {load_end:.2f} at end", flush=True)

    if args.profile:
        pieces = {f"ours_{k}": f for k, f in glob.pieces().items()}
        pieces.update({f"hf_{k}": f for k, f in hf.pieces().items()})
        pieces["ours_step"], pieces["hf_step"] = glob, hf
        tp = interleaved(pieces, args.repeats, args.warmup)
        print("\nprofile (global-only config, median s):")
        for k, v in tp.items():
            print(f"  {k:30s} {v:8.3f}")
        result["profile_s"] = tp

    print(json.dumps({k: round(v, 4) if isinstance(v, float) else
                      ({kk: round(vv, 4) for kk, vv in v.items()} if isinstance(v, dict) else v)
                      for k, v in result.items()}))


if __name__ == "__main__":
    main()
