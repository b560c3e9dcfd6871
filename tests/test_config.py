"""Config validation: errors name the key, the value and what is allowed."""
import json

import pytest

from keenlm.cli import build_parser, config_from_args
from keenlm.config import ConfigError, GenerateConfig, ModelConfig, RunConfig, from_dict, load_file, to_dict


def test_defaults_round_trip():
    cfg = RunConfig()
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("data,key", [
    ({"model": {"n_layer": 0}}, "model.n_layer"),
    ({"model": {"attention": "flashy"}}, "model.attention"),
    ({"model": {"d_model": 30, "n_head": 4}}, "model.d_model"),
    ({"model": {"n_head": 4, "n_kv_head": 3}}, "model.n_kv_head"),
    ({"train": {"optim": {"lr": -1}}}, "train.optim.lr"),
    ({"train": {"lr": -1}}, "train.optim.lr"),  # an earlier spelling, upgraded
    ({"train": {"optim": {"name": "sgd"}}}, "train.optim.name"),
    ({"train": {"steps": "many"}}, "train.steps"),
    ({"train": {"runtime": {"compile": "maybe"}}}, "train.runtime.compile"),
    ({"data": {"val_fraction": 0.9}}, "data.val_fraction"),
    ({"generate": {"top_p": 0}}, "generate.top_p"),
    ({"model": {"n_layers": 4}}, "model.n_layers"),
    ({"modle": {}}, "modle"),
])
def test_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert e.value.key == key
    assert key in str(e.value) and "allowed" in str(e.value)


def test_allowed_values_are_listed():
    with pytest.raises(ConfigError, match="naive | sdpa"):
        ModelConfig(attention="x")


def test_cli_overrides_and_file_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  n_layer: 3\n  d_model: 96\ntrain:\n  steps: 7\n")
    args = build_parser().parse_args(["train", "--preset", "tiny", "--config", str(f),
                                      "--model.n_layer", "5", "--generate.stop", "a,b",
                                      "--train.runtime.compile", "true", "--train.steps", "1e3"])
    cfg = config_from_args(args)
    assert cfg.model.n_layer == 5            # command line beats file
    assert cfg.model.d_model == 96           # file beats preset
    assert cfg.model.n_head == 3             # preset beats default
    assert cfg.train.steps == 1000
    assert cfg.train.runtime.compile is True
    assert cfg.generate.stop == ("a", "b")
    assert cfg.preset == "tiny"


def test_cli_unknown_and_bad_values_fail():
    args = build_parser().parse_args(["train", "--model.n_head", "three"])
    with pytest.raises(ConfigError, match="model.n_head"):
        config_from_args(args)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--model.heads", "3"])


def test_bad_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="valid JSON"):
        load_file(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_file(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="--config"):
        load_file(tmp_path / "missing.yaml")
    (tmp_path / "ok.json").write_text(json.dumps({"generate": {"stop": ["\n\n"]}}))
    assert from_dict(load_file(tmp_path / "ok.json")).generate == GenerateConfig(stop=("\n\n",))


def test_configs_are_frozen():
    with pytest.raises(Exception):
        RunConfig().model.n_layer = 3
