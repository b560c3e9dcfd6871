"""The command line end to end on a tiny run: train, info, eval, generate, help."""
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import keenlm
from keenlm.cli import build_parser, main

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
        assert "--model.n_layer" in text and "--train.lr" in text and "--generate.top_p" in text


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
