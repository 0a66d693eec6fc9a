"""CLIP vision tower: parity with HF transformers and the converter's handling of CLIP layouts."""

import numpy as np
import pytest
import torch

from ferret_jax.convert import convert_clip
from ferret_jax.models import ClipVision

ATOL = 1e-4


def _images(seed, b=2, size=56):
    return np.random.RandomState(seed).randn(b, size, size, 3).astype(np.float32)


def _hf_hidden(model, images, layer):
    with torch.no_grad():
        out = model(torch.tensor(images).permute(0, 3, 1, 2), output_hidden_states=True)
    h = out.hidden_states[layer][:, 1:].numpy()  # drop CLS
    g = int(np.sqrt(h.shape[1]))
    return h.reshape(h.shape[0], g, g, -1)


@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_parity_with_hf(hf, tmp_path, select_layer):
    model = hf.clip_vision(seed=1)
    config, params, skipped = convert_clip(hf.save(model, tmp_path), select_layer=select_layer)
    images = _images(0)
    ours = np.asarray(ClipVision(config).apply({"params": params}, images))
    ref = _hf_hidden(model, images, select_layer)
    assert ours.shape == ref.shape == (2, 4, 4, 64)
    assert np.abs(ref).max() > 1.0  # activations of order one: the tolerance is meaningful
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    # post_layernorm never affects hidden states; later layers don't affect the selected one.
    assert "post_layernorm.weight" in skipped
    unused_layers = {n.split(".")[2] for n in skipped if n.startswith("encoder.layers.")}
    assert unused_layers == {str(i) for i in range(config.layers_used, 3)}


def test_clipmodel_layout_with_prefix(hf, tmp_path):
    """A whole CLIPModel folder (`vision_model.` prefix, text tower beside it) converts too."""
    full = hf.clip_full(seed=2)
    config, params, skipped = convert_clip(hf.save(full, tmp_path))
    images = _images(3)
    ours = np.asarray(ClipVision(config).apply({"params": params}, images))
    ref = _hf_hidden(full.vision_model, images, -2)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    assert any(n.startswith("text_model.") for n in skipped)


def test_other_input_size_interpolates_like_hf(hf, tmp_path):
    model = hf.clip_vision(seed=4)
    config, params, _ = convert_clip(hf.save(model, tmp_path))
    images = np.random.RandomState(5).randn(1, 42, 70, 3).astype(np.float32)
    ours = np.asarray(ClipVision(config).apply({"params": params}, images))
    with torch.no_grad():
        out = model(torch.tensor(images).permute(0, 3, 1, 2), output_hidden_states=True, interpolate_pos_encoding=True)
    ref = out.hidden_states[-2][:, 1:].numpy().reshape(1, 3, 5, 64)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
