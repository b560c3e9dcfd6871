"""The command line end to end on a tiny run: train, info, eval, generate, help."""
import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import keenlm
from keenlm.cli import COMMANDS, build_parser, main
from keenlm.cli.options import options_from_args
from keenlm.studies import STUDIES, law2, memory, moe, ptq, spike, tts

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in ("argparse.py", "textwrap.py", "shlex.py", "fnmatch.py", "copy.py", "heapq.py"):
        shutil.copy(STDLIB / name, corpus / name)
    out = root / "run"
    rc = main(["train", "--preset", "tiny", "--data.corpus", str(corpus),
               "--data.cache_dir", str(root / "cache"), "--data.val_fraction", "0.3",
               "--train.steps", "30", "--train.out_dir", str(out), "--train.progress", "false"])
    assert rc == 0
    return out


def test_info(run_dir, capsys):
    assert main(["info", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "bits/byte" in text and "model.safetensors" in text
    assert main(["info", str(run_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["total"] > 0 and info["last_eval"]["step"] == 30


def test_eval_on_val_split_and_on_a_file(run_dir, capsys):
    assert main(["eval", str(run_dir), "--json", "--batches", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0 < res["bits_per_byte"] < 8 and res["perplexity"] > 1
    assert main(["eval", str(run_dir), "--corpus", str(STDLIB / "bisect.py"), "--json",
                 "--batches", "2", "--seq-len", "32"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] > 0


def test_generate_streams(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "def ", "--generate.max_new_tokens", "20",
                 "--generate.temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def ")
    km = keenlm.load(run_dir)
    assert out.strip() == ("def " + km.generate("def ", max_new_tokens=20, temperature=0)).strip()


def test_errors_are_one_line(run_dir, tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "not a keenlm run folder" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--model.n_layer", "0"]) == 2
    assert "model.n_layer" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--data.corpus", str(tmp_path / "missing")]) == 2
    assert "data.corpus" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "generate", "eval", "info", "demo"])
def test_help_shows_defaults(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    text = sub.format_help()
    assert "default" in text
    if command == "train":
        assert "--model.n_layer" in text and "--train.optim.lr" in text and "--generate.top_p" in text


def test_console_script():
    exe = Path(sys.executable).parent / "keenlm"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "keenlm.cli"]
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "demo" in out.stdout


def test_model_option_and_missing_model(run_dir, capsys):
    assert main(["eval", "--model", str(run_dir), "--json", "--batches", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    assert main(["generate"]) == 2
    assert "name a model" in capsys.readouterr().err


# ------------------------------------------------------------------------------ help of every command


def _subcommands(parser) -> dict:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _help_entries(parser) -> dict[str, str]:
    """Each option's entry in the rendered --help, by its first option string."""
    entries, current = {}, None
    for line in parser.format_help().splitlines():
        m = re.match(r"  (-[-\w.]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def _assert_defaults_shown(parser) -> dict[str, str]:
    entries = _help_entries(parser)
    for a in parser._actions:
        if not a.option_strings or a.help == argparse.SUPPRESS or a.required \
                or isinstance(a, argparse._HelpAction):
            continue  # no default to show
        assert "default" in entries[a.option_strings[0]], entries[a.option_strings[0]]
    return entries


def test_commands_table_names_every_subcommand():
    assert list(_subcommands(build_parser())) == list(COMMANDS)
    for name, module in COMMANDS.items():
        assert callable(module.add_parser) and callable(module.run), name


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_renders_help_with_its_defaults(command):
    sub = _subcommands(build_parser())[command]
    entries = _assert_defaults_shown(sub)
    assert "-h" in entries


def _study_parser(name):
    return _subcommands(_subcommands(build_parser())["study"])[name]


def _own_options(name) -> set[str]:
    return {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(STUDIES[name].options)}


@pytest.mark.parametrize("name", list(STUDIES))
def test_each_study_lists_its_own_options_with_defaults_and_no_other(name):
    entries = _assert_defaults_shown(_study_parser(name))
    assert set(entries) - {"-h"} == _own_options(name)
    others = set().union(*(_own_options(n) for n in STUDIES)) - _own_options(name)
    assert not others & set(entries)
    assert ("--experts" in entries) == (name == "moe")


def test_study_defaults_once_hidden_in_code_are_shown():
    depth = {n: _help_entries(_study_parser(n))["--depth"] for n in ("moe", "spike", "epochs", "select")}
    assert "default: 4" in depth["moe"] and "default: 4" in depth["spike"]
    assert "default: 3" in depth["epochs"] and "default: 3" in depth["select"]
    for name, steps in (("rl", 1500), ("group", 1500), ("tts", 3000)):
        assert f"default: {steps}" in _help_entries(_study_parser(name))["--sft-steps"]


def test_study_options_keep_their_spelling():
    parser = build_parser()

    def opts(*argv):
        args = parser.parse_args(["study", *argv])
        return options_from_args(STUDIES[args.study].options, args)

    assert opts("moe", "o", "--tokens", "2e6", "--seeds", "3", "--pair-only") == \
        moe.Options(tokens=2_000_000, seeds=3, pair_only=True)
    assert opts("spike", "o", "--spike-steps", "4,8", "--finetune-steps", "150") == \
        spike.Options(spike_steps=(4, 8))
    assert opts("ptq", "o", "--model", "m", "--recipes", "4:rtn:64,2:gptq:0") == \
        ptq.Options(model="m", recipes=("4:rtn:64", "2:gptq:0"))
    assert opts("tts", "o", "--ns", "1,4", "--sweep-large") == tts.Options(ns=(1, 4), sweep_large=True)
    assert opts("epochs", "o", "--unique-tokens", "250e3") == law2.EpochsOptions()
    assert opts("memory", "o", "--lengths", "32,64", "--gate", "0") == \
        memory.Options(lengths=(32, 64), gate=0.0)


def test_study_option_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["study", "ptq", "out", "--model", "m", "--experts", "4"])
    assert e.value.code == 2 and "unrecognized arguments: --experts" in capsys.readouterr().err
    assert main(["study", "spike", "out", "--spike-steps", "four"]) == 2
    assert "--spike-steps 'four': give comma-separated integers" in capsys.readouterr().err
    assert main(["study", "ptq", "out"]) == 2
    assert "needs --model" in capsys.readouterr().err
