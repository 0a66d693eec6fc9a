"""Size presets and the config arg parser."""

import pytest

from ferret_jax import config_lib


def test_presets_have_all_backbones():
    for size in ("tiny", "demo", "7b", "13b"):
        cfgs = config_lib.backbones(size)
        assert set(cfgs) == {"clip", "dino", "llm"}
        assert cfgs["clip"].hidden_size == cfgs["dino"].hidden_size  # proj_local starts as a copy of proj_global
    assert config_lib.backbones("7b")["llm"].vocab_size == config_lib.VICUNA_VOCAB + 1
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        config_lib.backbones("huge")


def test_parse_arg():
    defaults = dict(size="7b", steps=100, lr=1e-3, local=False)
    assert config_lib.parse_arg(None, **defaults) == defaults
    assert config_lib.parse_arg("demo", **defaults)["size"] == "demo"
    got = config_lib.parse_arg("size=13b,steps=5,lr=2e-5,local", **defaults)
    assert got == dict(size="13b", steps=5, lr=2e-5, local=True)
    assert config_lib.parse_arg("local=false", **defaults)["local"] is False
    with pytest.raises(ValueError, match=r"unknown config argument 'stpes'; known: \['local', 'lr', 'size', 'steps'\]"):
        config_lib.parse_arg("stpes=3", **defaults)
    with pytest.raises(ValueError):
        config_lib.parse_arg("steps=many", **defaults)
