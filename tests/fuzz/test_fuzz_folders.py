"""Run folders and quantized-model folders fuzzed: a valid one keenlm wrote, with its
config.json / quant.json text mutated (any field any JSON value, or bytes), its ``latest``
pointer rewritten (paths out of the folder included) and its model.safetensors mutated (the
header's length field, header bytes, truncation, appended bytes). Property: ``keenlm.load``
gives a model that runs, or raises ValueError / FileNotFoundError naming the folder or file;
never another exception, never a half-built model."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import keenlm
from keenlm.config import QuantConfig
from keenlm.quant.recipe import quantize, save_quantized
from keenlm.train import Trainer
from tests.fuzz.mutate import (count, fresh_copy, fuzz_json_file, fuzz_weights,
                               loads_or_fails_clearly)

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, small_corpus):
    from keenlm.config import from_dict
    from keenlm.presets import preset_dict

    root = tmp_path_factory.mktemp("folders")
    p = preset_dict("tiny")
    p["model"].update({"d_model": 64, "n_head": 2, "d_ff": 128, "n_layer": 1})
    p["data"].update({"corpus": str(small_corpus), "cache_dir": str(root / "cache"),
                      "max_bytes": 200_000})
    p["train"].update({"steps": 2, "out_dir": str(root / "run"), "progress": False,
                       "eval_every": 0})
    Trainer(from_dict(p)).fit()
    km = quantize(root / "run", QuantConfig(bits="4", method="rtn", group=32), log=None)
    save_quantized(km, root / "q4")
    return root / "run", root / "q4"


def test_the_valid_folders_load(folders):
    for f in folders:
        loads_or_fails_clearly(f)


def _model_file(folder):
    if (folder / "quant.json").exists():
        return folder / "model.safetensors"
    return keenlm.runs.latest_checkpoint(folder) / "model.safetensors"


@pytest.mark.parametrize("which", ["run", "q4"])
def test_mutated_weights_load_or_fail_clearly(folders, tmp_path_factory, which):
    src = folders[0] if which == "run" else folders[1]
    fuzz_weights(src, str(_model_file(src).relative_to(src)), tmp_path_factory.mktemp("w") / which)


@pytest.mark.parametrize("which,name", [("run", "config.json"), ("q4", "config.json"),
                                        ("q4", "quant.json")])
def test_mutated_json_loads_or_fails_clearly(folders, tmp_path_factory, which, name):
    src = folders[0] if which == "run" else folders[1]
    fuzz_json_file(src, name, tmp_path_factory.mktemp("j") / which)


def test_latest_pointer_rewritten(folders, tmp_path_factory):
    src = folders[0]
    work = tmp_path_factory.mktemp("l") / "run"

    @given(st.one_of(st.text(max_size=40), st.sampled_from(
        ["../../../etc", "/etc", "step-0000002/../../x", "step-9999999", "", "\x00", "step-"])))
    def prop(pointer):
        count()
        fresh_copy(src, work)
        (work / "checkpoints" / "latest").write_text(pointer, encoding="utf-8",
                                                     errors="surrogatepass")
        loads_or_fails_clearly(work)
    prop()


# ------------------------------------------------------------------ what the fuzzing found

def test_fuzz_findings_stay_fixed(folders, tmp_path):
    run, q4 = folders

    def fails(folder, match):
        with pytest.raises(ValueError, match=match):
            keenlm.load(folder)

    # a latest pointer could lead out of the folder (it was joined as a path)
    w = fresh_copy(run, tmp_path / "run")
    for pointer in ("../../../etc", "/etc", "step-0000002/../../x"):
        (w / "checkpoints" / "latest").write_text(pointer)
        fails(w, "not a checkpoint")
    # a config.json that is not UTF-8 escaped as UnicodeDecodeError
    w = fresh_copy(run, tmp_path / "run")
    (w / "config.json").write_bytes(b"\xed" + (run / "config.json").read_bytes())
    fails(w, f"{w}/config.json")
    # a checkpoint whose tensors do not fit the config did not name the file
    w = fresh_copy(run, tmp_path / "run")
    ck = keenlm.runs.latest_checkpoint(w) / "model.safetensors"
    data = bytearray(ck.read_bytes())
    at = data.index(b'"embed_tokens.weight"')
    data[at + 1] = ord(" ")
    ck.write_bytes(bytes(data))
    fails(w, f"{ck} against {w}/config.json: checkpoint does not match the model")
    # a quant.json layer entry of the wrong type escaped as TypeError
    w = fresh_copy(q4, tmp_path / "q4")
    spec = json.loads((w / "quant.json").read_text())
    name = next(iter(spec["layers"]))
    spec["layers"][name]["bits"] = None
    (w / "quant.json").write_text(json.dumps(spec))
    fails(w, "quant.json: layer .* TypeError")
    spec["layers"][name] = 7
    (w / "quant.json").write_text(json.dumps(spec))
    fails(w, "is 7, not a mapping")
    # and a quantized folder's config.json problems name it
    w = fresh_copy(q4, tmp_path / "q4")
    cfg = json.loads((w / "config.json").read_text())
    cfg["model"]["vocab_size"] = None
    (w / "config.json").write_text(json.dumps(cfg))
    fails(w, f"{w}/config.json: config key 'model.vocab_size'")


@pytest.mark.parametrize("which,key,value,match", [
    ("run", "vocab_size", 1 << 40, "embed_tokens.weight has shape"),
    ("run", "d_model", 1 << 30, "has shape"),
    ("run", "d_ff", 1 << 36, "mlp.*has shape"),
    ("run", "n_layer", 1 << 31, "n_layer is 2147483648; the weights hold 1 blocks"),
    ("run", "max_seq_len", 1 << 40, "max_seq_len"),
    ("run", "vocab_size", 9.223372036854776e+18, "Overflow"),  # past int64: torch's TypeError
    ("run", "vocab_size", 3.602879701896397e+16, "overflowed"),  # bytes past int64: RuntimeError
    ("q4", "vocab_size", 1 << 40, "embed_tokens.weight has shape"),
    ("q4", "d_ff", 1 << 36, "has shape"),
    ("q4", "vocab_size", 9.223372036854776e+18, "Overflow"),
])
def test_a_config_never_sizes_what_the_weights_do_not_back(folders, tmp_path, which, key, value,
                                                           match):
    """Found by ``make fuzz``: a config.json with a huge size built that model, and allocated
    it, before any weight was compared with it. A 2 TB request failed at once; a 20 GB one was
    granted, touched, and the fuzzing process was killed for memory. Now the sizes are checked
    against the weights' shapes on a "meta" model first; sizes past int64 (found by the next
    ``make fuzz``) made torch raise TypeError or RuntimeError even there."""
    w = fresh_copy(folders[0] if which == "run" else folders[1], tmp_path / which)
    cfg = json.loads((w / "config.json").read_text())
    cfg["model"][key] = value
    (w / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        keenlm.load(w)

