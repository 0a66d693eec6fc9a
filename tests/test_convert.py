"""Converter: strict checks with named culprits, sharded and bf16 checkpoints, the CLI round trip."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from ferret_jax.convert import CheckpointError, TensorSource, convert_llama, load_converted
from ferret_jax.convert.__main__ import main as convert_main


@pytest.fixture(scope="module")
def llama_dir(hf, tmp_path_factory):
    return hf.save(hf.llama(seed=11), tmp_path_factory.mktemp("llama"))


def _edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return str(dst)


def test_missing_tensor_is_named(llama_dir, tmp_path):
    d = _edited_copy(llama_dir, tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError) as e:
        convert_llama(d)
    msg = str(e.value)
    assert "missing (1)" in msg and "model.layers.1.mlp.up_proj.weight" in msg and "layers/up/kernel" in msg
    assert "unexpected" not in msg and "misshaped" not in msg


def test_extra_tensor_is_named(llama_dir, tmp_path):
    d = _edited_copy(llama_dir, tmp_path / "x", lambda t: t.update({"model.layers.0.mystery.weight": np.ones(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected \(1\):\n  model\.layers\.0\.mystery\.weight"):
        convert_llama(d)


def test_misshaped_tensor_is_named(llama_dir, tmp_path):
    def edit(t):
        t["model.layers.2.self_attn.k_proj.weight"] = t["model.layers.2.self_attn.k_proj.weight"][:-1]

    d = _edited_copy(llama_dir, tmp_path / "s", edit)
    with pytest.raises(CheckpointError, match=r"misshaped \(1\):\n  model\.layers\.2\.self_attn\.k_proj\.weight: has \(63, 64\), expected \(64, 64\)"):
        convert_llama(d)


def test_all_problems_reported_at_once(llama_dir, tmp_path):
    def edit(t):
        t.pop("model.norm.weight")
        t["lm_head.weight"] = t["lm_head.weight"][:, :10]
        t["extra"] = np.zeros(1, np.float32)

    d = _edited_copy(llama_dir, tmp_path / "all", edit)
    with pytest.raises(CheckpointError) as e:
        convert_llama(d)
    for word in ("missing (1)", "model.norm.weight", "unexpected (1)", "extra", "misshaped (1)", "lm_head.weight"):
        assert word in str(e.value)


def test_sharded_checkpoint_equals_single_file(hf, llama_dir, tmp_path):
    model = hf.llama(seed=11)
    sharded = hf.save(model, tmp_path / "sharded", max_shard_size="60KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    _, a, _ = convert_llama(sharded)
    _, b, _ = convert_llama(llama_dir)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_bfloat16_checkpoint(hf, tmp_path):
    model = hf.llama(seed=12).to(torch.bfloat16)
    d = hf.save(model, tmp_path / "bf16")
    assert TensorSource(d).tensors["model.norm.weight"].dtype == "BF16"
    _, params, _ = convert_llama(d, added_tokens=0)
    ref = model.model.layers[1].mlp.gate_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(params["layers"]["gate"]["kernel"][1], ref)


def test_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        TensorSource(str(tmp_path / "nope"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="re-save them as safetensors"):
        TensorSource(str(tmp_path))


def test_cli_writes_orbax_params_that_load_back(hf, llama_dir, tmp_path, capsys):
    clip_dir = hf.save(hf.clip_vision(seed=13), tmp_path / "clip")
    dino_dir = hf.save(hf.dinov2(seed=14), tmp_path / "dino")
    out = tmp_path / "out"
    rc = convert_main(["--clip", clip_dir, "--dinov2", dino_dir, "--llm", llama_dir, "--out", str(out)])
    assert rc == 0
    configs, params = load_converted(str(out))
    assert set(params) == {"clip", "dino", "llm"}
    assert configs["llm"].vocab_size == 211 + 1  # <region_fea> added by default
    _, direct, _ = convert_llama(llama_dir)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), params["llm"], direct)
    report = json.loads((out / "backbones.json").read_text())["report"]
    assert report["dino"]["unused_tensors"] == ["embeddings.mask_token"]
    assert "[convert] wrote" in capsys.readouterr().out
    # A second run refuses to overwrite; a broken folder fails with exit code 2 and a message.
    assert convert_main(["--llm", llama_dir, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert_main(["--llm", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2


def test_cli_bfloat16_output(llama_dir, tmp_path):
    assert convert_main(["--llm", llama_dir, "--out", str(tmp_path / "o"), "--dtype", "bfloat16"]) == 0
    _, params = load_converted(str(tmp_path / "o"))
    assert {np.dtype(x.dtype).name for x in jax.tree.leaves(params)} == {"bfloat16"}
