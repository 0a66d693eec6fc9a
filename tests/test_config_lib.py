"""Size presets, the config arg parser and what the stage configs choose."""

import pytest

from data_pipelines import example as ex
from data_pipelines import mixture, text
from ferret_jax import config_lib, train
from tests import train_helpers as th


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


def test_the_system_prompt_is_in_the_paper_sizes_and_out_of_the_synthetic_ones():
    assert all(config_lib.stage_config(s, size).data.system_prompt for s in (1, 2, 3) for size in ("7b", "13b"))
    assert not any(config_lib.stage_config(s, size).data.system_prompt for s in (1, 2, 3) for size in ("demo", "tiny"))
    proto = th.tokenizer_proto()
    tok = text.Tokenizer(model_proto=proto)
    head = tok.encode(text.SYSTEM_PROMPT)[:40]  # the last pieces merge with " USER:"
    for system_prompt in (False, True):
        c = th.config(3, **{"data.system_prompt": system_prompt})
        ecfg = train.example_config(c, train.model_config(c))
        batch = next(iter(mixture.build_stage_dataset(c.data, 3, proto, ecfg, 2, 0)))
        starts = [row[1 : 1 + len(head)].tolist() == head for row in batch["tokens"]]
        assert starts == [system_prompt] * 2 and (batch["tokens"][:, 0] == tok.bos_id).all()
        assert ex.PAD_ID not in batch["tokens"][:, :2]
