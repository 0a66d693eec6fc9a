"""DINOv2: parity with HF at a non-square input whose patch grid differs from the trained one."""

import numpy as np
import pytest
import torch

from ferret_jax.convert import convert_dinov2
from ferret_jax.models import Dinov2

ATOL = 1e-4


@pytest.mark.parametrize("registers", [0, 2])
def test_parity_with_hf_non_square(hf, tmp_path, registers):
    model = hf.dinov2(seed=3, registers=registers)
    config, params, skipped = convert_dinov2(hf.save(model, tmp_path))
    assert config.grid == 5 and config.num_register_tokens == registers
    assert config.pos_interpolation == ("hf_antialias" if registers else "hf")
    images = np.random.RandomState(0).randn(2, 42, 98, 3).astype(np.float32)  # 3x7 grid, trained 5x5
    ours = np.asarray(Dinov2(config).apply({"params": params}, images))
    with torch.no_grad():
        ref = model(torch.tensor(images).permute(0, 3, 1, 2)).last_hidden_state[:, 1 + registers :].numpy()
    ref = ref.reshape(2, 3, 7, 64)
    assert ours.shape == ref.shape
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    assert skipped == ["embeddings.mask_token"]


def test_without_final_norm_matches_last_block(hf, tmp_path):
    model = hf.dinov2(seed=4)
    config, params, skipped = convert_dinov2(hf.save(model, tmp_path), final_norm=False)
    images = np.random.RandomState(1).randn(1, 70, 42, 3).astype(np.float32)
    ours = np.asarray(Dinov2(config).apply({"params": params}, images))
    with torch.no_grad():
        out = model(torch.tensor(images).permute(0, 3, 1, 2), output_hidden_states=True)
    ref = out.hidden_states[-1][:, 1:].numpy().reshape(1, 5, 3, 64)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    assert "layernorm.weight" in skipped


def test_meta_offset_mode_changes_the_output(hf, tmp_path):
    """The Meta switch is live: at a resized grid it differs from HF's interpolation."""
    model = hf.dinov2(seed=5)
    directory = hf.save(model, tmp_path)
    images = np.random.RandomState(2).randn(1, 42, 42, 3).astype(np.float32)
    outs = []
    for mode in ("hf", "meta"):
        config, params, _ = convert_dinov2(directory, pos_interpolation=mode)
        outs.append(np.asarray(Dinov2(config).apply({"params": params}, images)))
    assert np.abs(outs[0] - outs[1]).max() > 1e-3
