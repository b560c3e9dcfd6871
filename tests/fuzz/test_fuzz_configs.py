"""Configs fuzzed: a valid run config (a preset, as written to config.json) and a valid RL
config, with any field replaced by any JSON value (wrong types, nesting, huge and non-finite
numbers, long strings), keys added, and the whole written as JSON or YAML text with its bytes
mutated. Property: the config builds, or one ConfigError naming the key; never another
exception."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keenlm.config import ConfigError, from_dict, load_file, rl_config, to_dict
from keenlm.presets import preset_dict
from tests.fuzz.mutate import count, json_paths, replaced, values

VALID = to_dict(from_dict(preset_dict("tiny")))
RL = {"task": "addition", "difficulty": 2, "lr": 1e-4, "group": 8, "lora": {"rank": 4}}

PATHS, RL_PATHS = list(json_paths(VALID)), list(json_paths(RL))


def builds_or_config_error(make, data):
    try:
        make(data)
    except ConfigError as e:
        assert str(e)


@given(st.lists(st.tuples(st.sampled_from(PATHS), values), min_size=1, max_size=3),
       st.dictionaries(st.text(max_size=10), values, max_size=2))
def test_run_configs_build_or_fail_clearly(changes, extra):
    count()
    data = VALID
    for path, value in changes:
        data = replaced(data, path, value)
    builds_or_config_error(from_dict, {**data, **extra})


@given(st.lists(st.tuples(st.sampled_from(RL_PATHS), values), min_size=1, max_size=3))
def test_rl_configs_build_or_fail_clearly(changes):
    count()
    data = RL
    for path, value in changes:
        data = replaced(data, path, value)
    builds_or_config_error(rl_config, data)


@given(st.sampled_from(["json", "yaml"]), st.lists(st.tuples(st.integers(0, 10**6),
                                                             st.characters()), max_size=4),
       st.integers(0, 10**6))
def test_config_files_read_or_fail_clearly(tmp_path_factory, kind, edits, cut):
    count()
    import yaml

    text = json.dumps(VALID, indent=1) if kind == "json" else yaml.safe_dump(VALID)
    chars = list(text)
    for at, ch in edits:
        chars[at % len(chars)] = ch
    text = "".join(chars)[:max(1, cut % (len(text) + 1))]
    path = tmp_path_factory.mktemp("cfg") / f"c.{kind}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")  # invalid UTF-8 too
    try:
        data = load_file(path)
    except ConfigError as e:
        assert str(path) in str(e) or "--config" in str(e)
        return
    builds_or_config_error(from_dict, data)


def test_non_finite_numbers_are_config_errors():
    for path in (("train", "optim", "lr"), ("model", "rope_theta"), ("train", "optim", "grad_clip")):
        for bad in (math.nan, math.inf, -math.inf):
            try:
                from_dict(replaced(VALID, path, bad))
            except ConfigError as e:
                assert ".".join(path) in str(e)
            else:
                raise AssertionError(f"{'.'.join(path)} = {bad} was accepted")


def test_fuzz_finding_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    """Found by ``make fuzz``: a config file that is not valid UTF-8 escaped as
    UnicodeDecodeError, naming neither the file nor the option."""
    path = tmp_path / "c.yaml"
    path.write_bytes(b"train:\n  steps: 10\xed\xa0\x80\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_file(path)

