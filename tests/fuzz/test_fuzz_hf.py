"""Hugging Face folders fuzzed: a valid one keenlm exports (a tiny Llama, a byte-level BPE
tokenizer with a chat template), with config.json, tokenizer.json, tokenizer_config.json and a
sharded index given any value in any field (and bytes edited), and the weights' safetensors
header mutated. Property: ``keenlm.load`` gives a model that runs, or raises ValueError naming
the folder or file; never another exception."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import keenlm
from keenlm.config import ModelConfig
from keenlm.data import train_bpe
from keenlm.io.hf import export_hf
from keenlm.model import build_model
from tests.fuzz.mutate import fresh_copy, fuzz_json_file, fuzz_weights, loads_or_fails_clearly

pytestmark = pytest.mark.filterwarnings("ignore")
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    bpe = train_bpe(["def add(a, b):\n    return a + b\n" * 40], 280)
    bpe.chat_template = TEMPLATE
    torch.manual_seed(0)
    net = build_model(ModelConfig(vocab_size=bpe.vocab_size, n_layer=1, d_model=32, n_head=2,
                                  d_ff=64, max_seq_len=32))
    out = export_hf(net, bpe, root / "m")
    # a sharded copy: the weights split in two files and an index
    from safetensors.torch import load_file, save_file

    sh = root / "sharded"
    shutil.copytree(out, sh)
    state = load_file(str(sh / "model.safetensors"))
    (sh / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half],
             "model-00002-of-00002.safetensors": names[half:]}
    for f, ks in parts.items():
        save_file({k: state[k] for k in ks}, str(sh / f), metadata={"format": "pt"})
    (sh / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}))
    return out, sh


def test_the_valid_folders_load(folder):
    for f in folder:
        loads_or_fails_clearly(f)
        assert keenlm.load(f).tokenizer.chat_template == TEMPLATE


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json",
                                  "model.safetensors.index.json"])
def test_mutated_json_files_load_or_fail_clearly(folder, tmp_path_factory, name):
    src = folder[1] if name.startswith("model.") else folder[0]
    fuzz_json_file(src, name, tmp_path_factory.mktemp("j") / "m")


def test_mutated_weights_load_or_fail_clearly(folder, tmp_path_factory):
    fuzz_weights(folder[0], "model.safetensors", tmp_path_factory.mktemp("w") / "m")


# ------------------------------------------------------------------ what the fuzzing found

@pytest.mark.parametrize("key,value,message", [
    # a huge layer count built that many blocks (on meta) before any weight was read: minutes
    ("num_hidden_layers", 2**24, "num_hidden_layers is 16777216; the weights hold 1 blocks"),
    ("architectures", True, "architectures is True, expected a list"),  # was a TypeError
    ("rope_theta", "", "rope_theta is '', expected a number"),  # was float('') ValueError
    ("vocab_size", 0, r"key vocab_size is 0, out of range"),  # an unnamed "not resolved"
    ("max_position_embeddings", 2**30, "out of range"),  # sized the rotary tables
])
def test_fuzz_findings_stay_fixed(folder, tmp_path, key, value, message):
    w = fresh_copy(folder[0], tmp_path / "m")
    cfg = json.loads((w / "config.json").read_text())
    if key == "rope_theta" and isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"]["rope_theta"] = value  # (transformers 5 writes it there)
    else:
        cfg[key] = value
    (w / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message) as e:
        keenlm.load(w)
    assert str(w) in str(e.value)


def test_a_tokenizer_that_makes_the_library_panic_is_an_error_naming_the_file(folder, tmp_path):
    """Found by ``make fuzz``: a ``continuing_subword_prefix`` longer than a merged token makes
    the tokenizers library panic (a PanicException, which is a BaseException, not an
    Exception); it escaped every reader."""
    w = fresh_copy(folder[0], tmp_path / "m")
    tok = json.loads((w / "tokenizer.json").read_text())
    tok["model"]["continuing_subword_prefix"] = "x" * 40
    (w / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=r"tokenizer.json.*PanicException"):
        keenlm.load(w)
