"""Tiny random HF transformers models, saved as safetensors folders: the parity references."""

from __future__ import annotations

import torch
import transformers

torch.set_num_threads(2)

TINY_CLIP = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14
)
TINY_DINOV2 = dict(
    hidden_size=64, intermediate_size=None, mlp_ratio=4, num_hidden_layers=3, num_attention_heads=4,
    image_size=70, patch_size=14, layerscale_value=0.5,
)
TINY_LLAMA = dict(
    vocab_size=211, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
)


def _randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values for every tensor, norms and LayerScale included, so no mapping error hides."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if p.ndim <= 1 else 1.0 / max(1.0, p.shape[-1] ** 0.5)
            base = 1.0 if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight", "pre_layrnorm.weight")) else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def clip_vision(seed: int = 0, **overrides) -> transformers.CLIPVisionModel:
    cfg = transformers.CLIPVisionConfig(**{**TINY_CLIP, **overrides})
    return _randomize_(transformers.CLIPVisionModel(cfg), seed)


def clip_full(seed: int = 0) -> transformers.CLIPModel:
    """A whole CLIPModel: its safetensors carry `vision_model.` and `text_model.` prefixes."""
    cfg = transformers.CLIPConfig(
        vision_config=TINY_CLIP,
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        projection_dim=16,
    )
    return _randomize_(transformers.CLIPModel(cfg), seed)


def dinov2(seed: int = 0, registers: int = 0, **overrides) -> torch.nn.Module:
    kw = {k: v for k, v in {**TINY_DINOV2, **overrides}.items() if v is not None}
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)
        return _randomize_(transformers.Dinov2WithRegistersModel(cfg), seed)
    return _randomize_(transformers.Dinov2Model(transformers.Dinov2Config(**kw)), seed)


def llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    return _randomize_(transformers.LlamaForCausalLM(cfg), seed)


def save(model: torch.nn.Module, directory, **kwargs) -> str:
    model.save_pretrained(str(directory), safe_serialization=True, **kwargs)
    return str(directory)
