"""Cached greedy decoding speed, ours (JAX, `llama_generate`) vs HF transformers' `generate` (PyTorch).

  Decoder: 4 layers, hidden 256, MLP 688, 4 heads, vocab 32000, fp32 (the bench_backbones LLaMA).
  Prompts of 128 tokens, 128 new tokens, greedy, eos never stops a row; batch 1 and batch 8.

Ours is one jitted call (prefill + `lax.while_loop` over the steps, compile excluded by the
warm-up); HF is `LlamaForCausalLM.generate(use_cache=True, do_sample=False,
min_new_tokens=max_new_tokens=128)`. Weights are converted from the HF model and both are checked
to produce the same first 16 greedy tokens before anything is timed. The two run alternately
(interleaved repeats, 0.5 s idle before each timed call); the figure is tokens per second,
speedup = ours / HF (higher is better). The last output line is one JSON object.

  python benchmarks/bench_generate.py [--repeats 5] [--torch-threads N] [--profile]
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

from ferret_jax.convert import convert_llama  # noqa: E402
from ferret_jax.generate import Sampling, llama_generate  # noqa: E402
from ferret_jax.models import Llama  # noqa: E402
from timing import interleaved  # noqa: E402

LLAMA = dict(
    vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
)
PROMPT, NEW = 128, 128
CHECK_TOKENS = 16
BATCHES = (1, 8)


def _ours(llm, params, ids: np.ndarray, new: int):
    tokens, lengths = jnp.asarray(ids, jnp.int32), jnp.full((ids.shape[0],), ids.shape[1], jnp.int32)
    sampling = Sampling(max_new_tokens=new, eos_id=-1)  # eos disabled: every row runs `new` steps

    def run():
        return jax.block_until_ready(llama_generate(llm, params, tokens, lengths, sampling)["tokens"])

    return run


def _hf(model, ids: np.ndarray, new: int):
    input_ids = torch.tensor(ids)
    mask = torch.ones_like(input_ids)

    def run():
        with torch.inference_mode():
            out = model.generate(
                input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                use_cache=True, pad_token_id=0, eos_token_id=2,
            )
        return out[:, ids.shape[1]:]

    return run


def check_agreement(llm, params, hf_model, ids: np.ndarray) -> None:
    ours = np.asarray(_ours(llm, params, ids[:1], CHECK_TOKENS)())
    theirs = _hf(hf_model, ids[:1], CHECK_TOKENS)().numpy()
    if not np.array_equal(ours, theirs):
        raise AssertionError(f"greedy tokens differ:\n ours {ours.tolist()}\n HF   {theirs.tolist()}")


def profile(llm, params, ids: np.ndarray, repeats: int) -> dict:
    """Our prefill (1 new token) vs the full call: the per-step time is the difference / (NEW - 1)."""
    out = {}
    for b in BATCHES:
        t = interleaved({"prefill": _ours(llm, params, ids[:b], 1), "full": _ours(llm, params, ids[:b], NEW)}, repeats)
        out[f"ours_prefill_ms_b{b}"] = 1e3 * t["prefill"]
        out[f"ours_step_ms_b{b}"] = 1e3 * (t["full"] - t["prefill"]) / (NEW - 1)
        print(f"b{b}: prefill {out[f'ours_prefill_ms_b{b}']:.1f} ms, step {out[f'ours_step_ms_b{b}']:.2f} ms", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also split our time into prefill and steps")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                        help="PyTorch intra-op threads (default: all cores)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.torch_threads)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__}, transformers {transformers.__version__}",
        "prompt_tokens": PROMPT, "new_tokens": NEW, "repeats": args.repeats,
    }
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    hf_model.config._attn_implementation = "sdpa"
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        config, params, _ = convert_llama(tmp, added_tokens=0)
    llm, params = Llama(config), jax.device_put(params)
    ids = np.random.RandomState(0).randint(3, LLAMA["vocab_size"], (max(BATCHES), PROMPT))
    check_agreement(llm, params, hf_model, ids)

    for b in BATCHES:
        t = interleaved({"ours": _ours(llm, params, ids[:b], NEW), "hf": _hf(hf_model, ids[:b], NEW)}, args.repeats)
        ours, hf = b * NEW / t["ours"], b * NEW / t["hf"]
        result.update({f"ours_tokens_per_s_b{b}": ours, f"hf_tokens_per_s_b{b}": hf, f"speedup_b{b}": ours / hf})
        print(f"batch {b}: ours {ours:8.1f} tok/s   HF {hf:8.1f} tok/s   speedup {ours / hf:.2f}", flush=True)
    if args.profile:
        result.update(profile(llm, params, ids, args.repeats))
    result["torch_threads"] = torch.get_num_threads()
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
