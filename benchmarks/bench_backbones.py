"""Backbone speed, ours (JAX/Flax) vs HF transformers (PyTorch eager), same configs, same process.

  LLaMA forward+backward: 4 layers, hidden 256, MLP 688, 4 heads, vocab 32000, seq 512, batch 4.
  CLIP vision forward:    4 layers, hidden 256, MLP 1024, 4 heads, 336 px / patch 14, batch 4.

The two frameworks run alternately (interleaved repeats) so machine noise hits both alike; the
ratios (ours / PyTorch, lower is better) are the figures to compare across machines. Weights
are converted from the HF models, and outputs are checked to agree before anything is timed.
The last output line is one JSON object.

  python benchmarks/bench_backbones.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ferret_jax.convert import convert_clip, convert_llama  # noqa: E402
from ferret_jax.losses import token_cross_entropy  # noqa: E402
from ferret_jax.models import ClipVision, Llama  # noqa: E402
from timing import interleaved  # noqa: E402

LLAMA = dict(
    vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
)
CLIP = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=336, patch_size=14)
BATCH, SEQ = 4, 512


def bench_llama(tmp: str, repeats: int) -> dict:
    torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    torch_model.config._attn_implementation = "sdpa"
    torch_model.save_pretrained(tmp, safe_serialization=True)
    config, params, _ = convert_llama(tmp, added_tokens=0)
    model = Llama(config)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, LLAMA["vocab_size"], (BATCH, SEQ))
    targets = rng.randint(0, LLAMA["vocab_size"], (BATCH, SEQ))

    def loss_fn(p, ids, targets):
        logits, _ = model.apply({"params": p}, ids)
        return token_cross_entropy(logits, targets)[0].mean()

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    p, jids, jt = jax.device_put(params), jnp.asarray(ids), jnp.asarray(targets)
    tids, tt = torch.tensor(ids), torch.tensor(targets)

    def ours():
        loss, grads = grad_fn(p, jids, jt)
        jax.block_until_ready(grads)
        return float(loss)

    def theirs():
        torch_model.zero_grad(set_to_none=True)
        logits = torch_model(tids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tt.reshape(-1))
        loss.backward()
        return loss.item()

    l_ours, l_theirs = ours(), theirs()
    assert abs(l_ours - l_theirs) < 1e-3, (l_ours, l_theirs)
    t = interleaved({"ours": ours, "torch": theirs}, repeats)
    return {"llama_fwd_bwd_ms_ours": 1e3 * t["ours"], "llama_fwd_bwd_ms_torch": 1e3 * t["torch"],
            "llama_fwd_bwd_ratio": t["ours"] / t["torch"], "llama_loss": l_ours}


def bench_clip(tmp: str, repeats: int) -> dict:
    torch_model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP)).eval()
    torch_model.config._attn_implementation = "sdpa"
    torch_model.save_pretrained(tmp, safe_serialization=True)
    config, params, _ = convert_clip(tmp, select_layer=-1)
    model = ClipVision(config)
    images = np.random.RandomState(1).randn(BATCH, 336, 336, 3).astype(np.float32)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    p, jx = jax.device_put(params), jnp.asarray(images)
    tx = torch.tensor(images).permute(0, 3, 1, 2).contiguous()

    def ours():
        return jax.block_until_ready(fwd(p, jx))

    def theirs():
        with torch.no_grad():
            return torch_model(tx).last_hidden_state

    diff = np.abs(np.asarray(ours()).reshape(BATCH, -1, CLIP["hidden_size"]) - theirs()[:, 1:].numpy()).max()
    assert diff < 1e-3, diff
    t = interleaved({"ours": ours, "torch": theirs}, repeats)
    return {"clip_fwd_ms_ours": 1e3 * t["ours"], "clip_fwd_ms_torch": 1e3 * t["torch"],
            "clip_fwd_ratio": t["ours"] / t["torch"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}",
        "repeats": args.repeats,
    }
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        result.update(bench_llama(a, args.repeats))
        print(f"llama fwd+bwd  ours {result['llama_fwd_bwd_ms_ours']:8.1f} ms   torch {result['llama_fwd_bwd_ms_torch']:8.1f} ms   ratio {result['llama_fwd_bwd_ratio']:.2f}", flush=True)
        result.update(bench_clip(b, args.repeats))
        print(f"clip fwd       ours {result['clip_fwd_ms_ours']:8.1f} ms   torch {result['clip_fwd_ms_torch']:8.1f} ms   ratio {result['clip_fwd_ratio']:.2f}", flush=True)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
