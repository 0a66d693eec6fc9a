"""Position-table resizing equals torch's bicubic interpolation in each of HF's and Meta's modes."""

import numpy as np
import pytest

import jax.numpy as jnp
from ferret_jax.models import layers

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_resize(table: np.ndarray, hw, mode: str) -> np.ndarray:
    n = int(np.sqrt(table.shape[0]))
    x = torch.tensor(table, dtype=torch.float64).reshape(1, n, n, -1).permute(0, 3, 1, 2)
    if mode == "meta":
        y = F.interpolate(x, scale_factor=((hw[0] + 0.1) / n, (hw[1] + 0.1) / n), mode="bicubic", align_corners=False)
    else:
        y = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=mode == "hf_antialias")
    return y.permute(0, 2, 3, 1).reshape(hw[0] * hw[1], -1).numpy()


@pytest.mark.parametrize("mode", layers.POS_INTERPOLATIONS)
@pytest.mark.parametrize("hw", [(24, 24), (16, 32), (50, 40), (37, 20)])
def test_matches_torch_bicubic(mode, hw):
    table = np.random.RandomState(0).randn(37 * 37, 8).astype(np.float32)
    ours = np.asarray(layers.interpolate_pos_table(jnp.asarray(table), hw, mode))
    ref = _torch_resize(table, hw, mode)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_modes_really_differ():
    """The three modes are distinct maps (so a wrong switch would be caught by parity tests)."""
    table = jnp.asarray(np.random.RandomState(1).randn(37 * 37, 4).astype(np.float32))
    outs = [np.asarray(layers.interpolate_pos_table(table, (24, 24), m)) for m in layers.POS_INTERPOLATIONS]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert np.abs(outs[i] - outs[j]).max() > 1e-2


def test_identity_at_trained_size_and_errors():
    table = jnp.asarray(np.random.RandomState(2).randn(25, 3).astype(np.float32))
    assert layers.interpolate_pos_table(table, (5, 5)) is table
    with pytest.raises(ValueError, match="square"):
        layers.interpolate_pos_table(table[:24], (4, 4))
    with pytest.raises(ValueError, match="unknown position interpolation"):
        layers.interpolate_pos_table(table, (4, 4), "bilinear")
