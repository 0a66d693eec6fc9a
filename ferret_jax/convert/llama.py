"""HF LlamaForCausalLM safetensors -> `Llama` params, with room for added tokens (`<region_fea>`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ferret_jax.convert import mapping
from ferret_jax.convert.mapping import HEADS_TO_LINEAR, LINEAR, LINEAR_TO_HEADS, Rule, append_mean_rows
from ferret_jax.convert.safetensors_io import TensorSource
from ferret_jax.models.llama import Llama, LlamaConfig


def rules(added_tokens: int) -> list[Rule]:
    p = "model.layers.{i}."
    return [
        Rule("embed", "model.embed_tokens.weight", append_mean_rows(added_tokens, transpose=False)),
        Rule("lm_head", "lm_head.weight", append_mean_rows(added_tokens, transpose=True)),
        Rule("final_norm/scale", "model.norm.weight"),
        Rule("layers/attn_norm/scale", p + "input_layernorm.weight"),
        Rule("layers/mlp_norm/scale", p + "post_attention_layernorm.weight"),
        Rule("layers/q/kernel", p + "self_attn.q_proj.weight", LINEAR_TO_HEADS),
        Rule("layers/k/kernel", p + "self_attn.k_proj.weight", LINEAR_TO_HEADS),
        Rule("layers/v/kernel", p + "self_attn.v_proj.weight", LINEAR_TO_HEADS),
        Rule("layers/o/kernel", p + "self_attn.o_proj.weight", HEADS_TO_LINEAR),
        Rule("layers/gate/kernel", p + "mlp.gate_proj.weight", LINEAR),
        Rule("layers/up/kernel", p + "mlp.up_proj.weight", LINEAR),
        Rule("layers/down/kernel", p + "mlp.down_proj.weight", LINEAR),
    ]


# Older checkpoints store the RoPE frequency buffer; it is recomputed from rope_theta.
IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def convert_llama(
    directory: str, added_tokens: int = 1, dtype=np.float32, **overrides
) -> tuple[LlamaConfig, dict, list[str]]:
    """Returns (config, params, ignored tensor names); the vocabulary grows by `added_tokens`."""
    source = TensorSource(directory)
    config = LlamaConfig.from_hf(source.config, **overrides)
    config = dataclasses.replace(config, vocab_size=config.vocab_size + added_tokens)
    target = mapping.abstract_params(Llama(config), np.zeros((1, 1), np.int32))
    params, skipped = mapping.convert(source, rules(added_tokens), target, IGNORED, dtype, "LLaMA checkpoint")
    return config, params, skipped
