"""What users have on disk keeps working: run folders, a quantized folder and a config file
written by keenlm before the package layout of docs/architecture.md (tests/fixtures/legacy,
made by tests/fixtures/legacy/make.py at that release, with the logits it gave), and the
command-line spellings of that release."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import keenlm
from keenlm.cli import build_parser, main
from keenlm.cli.options import config_from_args
from keenlm.config import from_dict, load_file as load_config, rl_config
from keenlm.quant.packing import PackedLinear
from keenlm.quant.qat import QATLinear
from keenlm.spiking.ffn import SpikingFFN

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
FOLDERS = ("run_dense", "run_int4_qat", "run_spiking", "run_moe", "quantized_2bit")


@pytest.fixture(scope="module")
def expected():
    return load_file(str(LEGACY / "expected_logits.safetensors"))


@pytest.mark.parametrize("name", FOLDERS)
def test_old_folders_load_with_the_same_logits(name, expected):
    # against a trusted record: the logits the earlier release gave on the same token ids
    km = keenlm.load(LEGACY / name)
    with torch.no_grad():
        got = km.net(expected["ids"]).float()
    assert torch.equal(got, expected[name]), (got - expected[name]).abs().max()


def test_old_folders_keep_their_parts_and_settings():
    qat = keenlm.load(LEGACY / "run_int4_qat")
    assert qat.config.model.lowbit.group == 16 and qat.config.model.lowbit.act_bits == 8
    assert qat.config.train.schedule.qat_start == 0.5 and qat.config.train.select.method == "loss"
    assert isinstance(qat.net.layers[0].mlp.up_proj, QATLinear)
    assert isinstance(keenlm.load(LEGACY / "run_spiking").net.layers[0].mlp, SpikingFFN)
    assert keenlm.load(LEGACY / "run_moe").config.model.moe.balance == "bias"
    packed = keenlm.load(LEGACY / "quantized_2bit")
    assert packed.quant["bits"] == "2" and any(isinstance(m, PackedLinear) for m in packed.net.modules())


def test_old_config_file_loads_in_todays_spelling():
    cfg = from_dict(load_config(LEGACY / "train.yaml"))
    t = cfg.train
    assert (t.optim.lr, t.optim.weight_decay, t.optim.beta1, t.optim.beta2, t.optim.grad_clip) == \
        (0.003, 0.05, 0.8, 0.9, 0.5)
    assert (t.schedule.kind, t.schedule.warmup_steps, t.schedule.min_lr_ratio,
            t.schedule.decay_fraction, t.schedule.qat_start) == ("wsd", 1, 0.2, 0.3, 0.5)
    assert (t.eval.every, t.eval.batches, t.eval.log_every) == (0, 2, 1)
    assert (t.checkpoint.every, t.checkpoint.keep) == (0, 1)
    assert (cfg.model.lowbit.group, cfg.model.lowbit.per_channel, cfg.model.lowbit.act_bits) == \
        (16, False, 8)


def test_old_option_spellings_work_and_name_the_new_one(capsys):
    args = build_parser().parse_args(["train", "--train.lr", "0.01", "--train.eval_every", "5",
                                      "--model.lowbit_group", "16", "--train.schedule", "wsd"])
    cfg = config_from_args(args)
    assert cfg.train.optim.lr == 0.01 and cfg.train.eval.every == 5
    assert cfg.model.lowbit.group == 16 and cfg.train.schedule.kind == "wsd"
    err = capsys.readouterr().err
    for old, new in (("train.lr", "train.optim.lr"), ("train.eval_every", "train.eval.every"),
                     ("model.lowbit_group", "model.lowbit.group"),
                     ("train.schedule", "train.schedule.kind")):
        assert f"--{old} is now --{new}" in err
    assert "--train.lr" not in build_parser()._subparsers._group_actions[0].choices["train"] \
        .format_help()  # accepted, not advertised


def test_a_value_written_later_in_either_spelling_wins():
    assert from_dict({"train": {"optim": {"lr": 0.1}, "lr": 0.2}}).train.optim.lr == 0.2
    assert from_dict({"train": {"lr": 0.2, "optim": {"lr": 0.1}}}).train.optim.lr == 0.1


def test_rl_config_takes_the_flat_spelling():
    cfg = rl_config({"lr": 3e-3, "out_dir": "x", "group": 4})
    assert cfg.optim.lr == 3e-3 and cfg.run.out_dir == "x" and cfg.group == 4


@pytest.mark.parametrize("name", ["run_int4_qat", "quantized_2bit"])
def test_info_describes_old_folders(name, capsys):
    assert main(["info", str(LEGACY / name)]) == 0
    out = capsys.readouterr().out
    assert ("quantized    2 bits by rtn" in out) if name.startswith("quantized") else \
        ("linear int4" in out and "last eval" in out)


def test_an_old_run_folder_is_a_starting_point(tmp_path, small_corpus):
    # keenlm.train loads train.init_from (an old run folder) before it builds the trainer
    res = keenlm.train({"data": {"corpus": str(small_corpus), "tokenizer": "byte",
                                 "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.3},
                        "train": {"init_from": str(LEGACY / "run_dense"), "steps": 2,
                                  "batch_size": 2, "seq_len": 32, "progress": False,
                                  "out_dir": str(tmp_path / "ft"), "eval": {"batches": 1}}})
    assert res.step == 2 and keenlm.load(tmp_path / "ft").config.model.d_model == 48


def test_a_hook_with_the_earlier_method_name_is_refused(tmp_path, small_corpus):
    from keenlm.train import Trainer

    class OldHook:
        def select_batch(self, x, y, model):
            return x, y, None

    cfg = from_dict({"data": {"corpus": str(small_corpus), "tokenizer": "byte",
                              "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.3},
                     "model": {"n_layer": 1, "d_model": 32, "n_head": 2, "max_seq_len": 64},
                     "train": {"steps": 1, "batch_size": 2, "seq_len": 32, "progress": False,
                               "out_dir": str(tmp_path / "run")}})
    with pytest.raises(TypeError, match="choose_batch"):
        Trainer(cfg, hooks=[OldHook()])
