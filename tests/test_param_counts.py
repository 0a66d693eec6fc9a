"""Parameter counts of the real presets equal HF's for the same configs (nothing allocated)."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from ferret_jax import config_lib
from ferret_jax.convert.mapping import abstract_params
from ferret_jax.models import ClipVision, Dinov2, Llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _count_ours(module, *example) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(module, *example)))


def _count_hf(build, exclude=lambda name: False) -> int:
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for n, p in model.named_parameters() if not exclude(n))


def _hf_llama_config(cfg):
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
    )


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_llm_counts_equal_hf(size):
    cfg = config_lib.backbones(size)["llm"]
    ours = _count_ours(Llama(cfg), np.zeros((1, 1), np.int32))
    hf = _count_hf(lambda: transformers.LlamaForCausalLM(_hf_llama_config(cfg)))
    assert ours == hf
    assert cfg.vocab_size == 32001
    # Sanity against the published size: Vicuna-7B v1.5 has 6,738,415,616 params at vocab 32000.
    if size == "7b":
        assert ours == 6_738_415_616 + 2 * cfg.hidden_size


def test_clip_l14_336_count_equals_hf_minus_unused_tail():
    cfg = config_lib.CLIP_L14_336
    ours = _count_ours(ClipVision(cfg), np.zeros((1, 336, 336, 3), np.float32))
    hf_cfg = transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14,
    )
    unused = lambda n: n.startswith(("vision_model.post_layernorm", "vision_model.encoder.layers.23.", "post_layernorm", "encoder.layers.23."))  # noqa: E731
    assert ours == _count_hf(lambda: transformers.CLIPVisionModel(hf_cfg), unused)
    assert ours == _count_hf(lambda: transformers.CLIPVisionModel(hf_cfg)) - 12_596_224 - 2048  # one layer + post LN


def test_dinov2_l14_count_equals_hf_minus_mask_token():
    cfg = config_lib.DINOV2_L14
    ours = _count_ours(Dinov2(cfg), np.zeros((1, 14, 14, 3), np.float32))
    hf_cfg = transformers.Dinov2Config(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518, patch_size=14
    )
    assert ours == _count_hf(lambda: transformers.Dinov2Model(hf_cfg), lambda n: n.endswith("mask_token"))
    assert 300e6 < ours < 310e6  # DINOv2 ViT-L/14 is ~304M


def test_presets_compile_free_shapes():
    """eval_shape of the 13B decoder with bf16 compute: params stay fp32 (mixed precision)."""
    cfg = config_lib.backbones("13b")["llm"]
    assert cfg.dtype == "bfloat16"
    params = abstract_params(Llama(cfg), np.zeros((1, 1), np.int32))
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
    assert params["layers"]["q"]["kernel"].shape == (40, 5120, 40, 128)
    assert dataclasses.asdict(cfg)["num_layers"] == 40
