"""Tests for LoRA / QLoRA adapters (keenlm.model.lora) and their peft format (keenlm.io.peft).

Kinds of test: against our reference (the adapter path equals the merged weight W + s B A on
fresh random inputs, forward and backward, on dense, QAT and packed int4 bases); against a
trusted implementation (peft loads the adapters onto transformers' model of the exported base
and gives keenlm's logits, 1e-4); round-trip invariance (save -> load_adapter, run folder ->
keenlm.load); "only the adapters change" smoke runs of training and RL; errors naming the
file and the field. All models are tiny and seeded.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import keenlm
from keenlm.config import LoRAConfig, RLConfig, rl_config
from keenlm.data import ByteTokenizer
from keenlm.io.hf import export_hf
from keenlm.io.peft import AdapterError, load_adapter, save_adapter
from keenlm.ledger import count_params, flops_per_token
from keenlm.model import build_model
from keenlm.model.lora import LoRALinear, add_adapters, lora_layers, merge_lora
from keenlm.quant.packing import PackedLinear, from_codes
from keenlm.quant.ptq import rtn
from keenlm.quant.q4 import Q4Linear, dequantize_q4, quantize_q4, quantize_q4_model
from keenlm.quant.qat import QATLinear
from tests.test_hf import random_net, tiny_cfg, token_batch

LORA = LoRAConfig(rank=4, alpha=8.0)


def random_adapters(net, seed=0):
    """B starts at zero (the adapted model equals its base); give it values, so tests compare
    something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(net).values():
            layer.lora_B.weight.copy_(0.2 * torch.randn(layer.lora_B.weight.shape, generator=g))
    return net


def packed_int4(w: torch.Tensor) -> PackedLinear:
    return from_codes(*rtn(w, "int4", 32), 4, 32)


@pytest.mark.parametrize("kind", ["dense", "qat_int4", "packed_int4", "q4"])
def test_adapter_path_equals_merged_weight(kind):
    torch.manual_seed(0)
    w = torch.randn(48, 64) / 8
    if kind == "dense":
        base = nn.Linear(64, 48, bias=False)
        base.weight.data.copy_(w)
    elif kind == "qat_int4":
        base = QATLinear(64, 48, "int4", group=32)
        base.weight.data.copy_(w)
    elif kind == "q4":
        base = Q4Linear.from_float(w)
    else:
        base = packed_int4(w)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: the base itself
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x.requires_grad_(True)
    y, y_ref = layer(x), layer.reference(x)
    assert (y - base(x)).abs().max() > 0.1
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    y.backward(g)
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())


def test_model_lora_config_freezes_all_but_adapters_and_counts_them():
    net = build_model(tiny_cfg(lora=LORA))
    names = list(lora_layers(net))
    assert len(names) == 2 * 7 and names[0] == "layers.0.self_attn.q_proj"
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    c = count_params(net)
    expected = sum(4 * (m.in_features + m.out_features) for m in lora_layers(net).values())
    assert c["trainable"] == expected and c["optimizer_bytes"] == 8 * expected
    full = build_model(tiny_cfg())
    f_lora, f_full = flops_per_token(net, 16), flops_per_token(full, 16)
    assert f_lora["backward"] < 0.75 * f_full["backward"]  # no weight gradients of the base


def test_lora_config_is_checked():
    for bad in (dict(rank=-1), dict(dropout=1.0), dict(targets=("lm_head",)), dict(targets=())):
        with pytest.raises(ValueError, match="model.lora"):
            LoRAConfig(**bad)
    cfg = rl_config({"lora_rank": 8, "lora_targets": "q_proj,v_proj"})
    assert cfg.lora == LoRAConfig(rank=8, targets=("q_proj", "v_proj"))


def test_merge_gives_the_adapted_logits():
    net = random_net()
    add_adapters(net, LORA)
    random_adapters(net)
    x = token_batch()
    with torch.no_grad():
        adapted = net(x)
        merged = merge_lora(net)(x)
    assert not lora_layers(net) and net.cfg.lora.rank == 0
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed")


def test_peft_loads_the_adapters_onto_the_exported_base_with_same_logits(tmp_path, transformers):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'keenlm[dev]')")
    net = random_net()
    add_adapters(net, dataclasses.replace(LORA, targets=("q_proj", "v_proj", "down_proj")))
    random_adapters(net)
    folder = export_hf(net, ByteTokenizer(), tmp_path / "hf")
    assert (folder / "adapter" / "adapter_config.json").exists()
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    m = peft.PeftModel.from_pretrained(base, folder / "adapter").eval()
    x = token_batch()
    with torch.no_grad():
        ours, theirs = net(x), m(x).logits
    assert ours.abs().max() > 1
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    # and back: keenlm reads what peft saves
    m.save_pretrained(tmp_path / "peft_saved")
    plain = keenlm.load(folder).net
    load_adapter(plain, tmp_path / "peft_saved")
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ours, rtol=0, atol=1e-5)


def test_adapter_round_trip_and_bad_folders(tmp_path):
    net = random_net()
    add_adapters(net, LORA)
    random_adapters(net)
    out = save_adapter(net, tmp_path / "a")
    again = random_net()
    load_adapter(again, out)
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x), rtol=0, atol=0)
    cfg = json.loads((out / "adapter_config.json").read_text())
    for change, words in (({"peft_type": "IA3"}, "peft_type"), ({"use_dora": True}, "use_dora"),
                          ({"r": 3}, "shape"), ({"target_modules": ["q_proj"]}, "unexpected")):
        bad = tmp_path / f"bad{len(words)}{words}"
        bad.mkdir()
        (bad / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        (bad / "adapter_model.safetensors").write_bytes((out / "adapter_model.safetensors").read_bytes())
        with pytest.raises(AdapterError, match=words):
            load_adapter(random_net(), bad)
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "adapter_config.json").write_text(json.dumps(cfg))
    data = (out / "adapter_model.safetensors").read_bytes()
    (tmp_path / "trunc" / "adapter_model.safetensors").write_bytes(data[:len(data) // 2])
    fresh = random_net()
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        load_adapter(fresh, tmp_path / "trunc")
    assert not lora_layers(fresh)  # nothing half-applied


def test_qlora_on_packed_int4_base_trains_and_merges():
    """QLoRA: the base stays packed int4; the adapters learn; the merged dense model gives
    the adapter-applied outputs."""
    net = random_net()
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                setattr(parent, name, packed_int4(child.weight.detach()))
    add_adapters(net, LORA)
    packed_before = {n: b.clone() for n, b in net.named_buffers() if b.dtype == torch.uint8}
    assert packed_before
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    x = token_batch()
    net.train()
    losses = []
    for _ in range(15):
        logits = net(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(b, packed_before[n]) for n, b in net.named_buffers() if n in packed_before)
    net.eval()
    with torch.no_grad():
        adapted = net(x)
        merged = merge_lora(net)(x)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_q4_base_keeps_a_q4_files_codes_and_serves_with_the_adapters():
    """lora.base = "q4": weights that came from Q4_1 blocks (a GGUF file) round back to the
    same codes, scales and offsets, so the frozen base is the file's 4-bit weights; loading
    the model with quant="q4" keeps the adapters in full precision over Q4 bases, and its
    outputs are the adapted model's (to the int8 rounding of the activations)."""
    net = random_net()
    codes = {}
    with torch.no_grad():  # put every projection on a Q4_1 grid, as a GGUF file's weights are
        for name, m in net.named_modules():
            if type(m) is nn.Linear and name != "lm_head":
                codes[name] = quantize_q4(m.weight)
                m.weight.copy_(dequantize_q4(*codes[name]))
    add_adapters(net, dataclasses.replace(LORA, base="q4"))
    random_adapters(net)
    for name, layer in lora_layers(net).items():
        assert isinstance(layer.base_layer, Q4Linear)
        for got, want in zip((layer.base_layer.qs, layer.base_layer.d, layer.base_layer.m),
                             codes[name]):
            assert torch.equal(got, want), name
    assert all(not b.requires_grad for b in net.buffers())
    x = token_batch()
    net.eval()
    with torch.no_grad():
        merged_ref = merge_lora(copy.deepcopy(net))(x)
        served = quantize_q4_model(copy.deepcopy(net))
        assert lora_layers(served) and all(
            type(m.lora_A) is nn.Linear and type(m.lora_B) is nn.Linear
            for m in lora_layers(served).values())  # adapters kept in fp32 over Q4 bases
        out = served(x)
    assert (out - merged_ref).abs().max() < 0.05 * merged_ref.abs().max()
    assert (merged_ref.argmax(-1) == out.argmax(-1)).float().mean() > 0.9


def test_lora_base_q4_refuses_widths_off_the_block():
    net = random_net(d_model=48, n_head=4)
    with pytest.raises(ValueError, match="multiple of the Q4 block"):
        add_adapters(net, dataclasses.replace(LORA, base="q4"))
    with pytest.raises(Exception, match="model.lora.base"):
        LoRAConfig(rank=4, base="nf4")


@pytest.mark.parametrize("base", ["model", "q4"])
def test_rl_with_lora_trains_only_adapters_and_the_run_reloads(tmp_path, base):
    from keenlm.data.tasks import get_task
    from keenlm.train.grpo import RLTrainer
    from tests.test_grpo import tiny_policy

    km = tiny_policy()
    before = {k: v.clone() for k, v in km.net.state_dict().items()}
    cfg = rl_config({"steps": 2, "prompts": 2, "group": 4, "max_new_tokens": 8, "lora_rank": 4,
                     "lora_base": base, "eval_n": 4, "out_dir": str(tmp_path / "rl"),
                     "progress": False, "task": "addition", "difficulty": 1})
    res = RLTrainer(km, cfg, reward=lambda p, c: [float(len(x) % 2) for x in c]).fit()
    state = km.net.state_dict()
    kept = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    if base == "q4":  # the frozen bases are Q4 blocks of the starting weights
        for name, m in lora_layers(km.net).items():
            assert isinstance(m.base_layer, Q4Linear)
            assert torch.equal(m.base_layer.qs, quantize_q4(before[name + ".weight"])[0])
        kept = {k: v for k, v in kept.items() if k in before}
    assert kept.keys() == before.keys() - (
        {n + ".weight" for n in lora_layers(km.net)} if base == "q4" else set())
    assert all(torch.equal(v, before[k]) for k, v in kept.items())  # no base tensor moved
    moved = [k for k in state if ".lora_B." in k and state[k].abs().sum() > 0]
    assert moved
    again = keenlm.load(res.run_dir)
    assert again.config.model.lora.rank == 4 and again.config.model.lora.base == base
    x = token_batch(vocab=km.net.cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(again.net(x), km.net.eval()(x), rtol=0, atol=0)


def test_train_init_from_with_lora_trains_only_adapters(tmp_path, small_corpus):
    from keenlm.config import from_dict
    from keenlm.presets import preset_dict
    from keenlm.train import Trainer

    p = preset_dict("tiny")
    p["model"].update({"d_model": 64, "n_head": 4, "d_ff": 128})
    p["data"].update({"corpus": str(small_corpus), "cache_dir": str(tmp_path / "cache"),
                      "val_fraction": 0.3})
    p["train"].update({"steps": 10, "out_dir": str(tmp_path / "src"), "progress": False,
                       "eval_every": 0})
    Trainer(from_dict(p)).fit()
    src = keenlm.load(tmp_path / "src")
    before = {k: v.clone() for k, v in src.net.state_dict().items()}
    p["model"].update({"lora": {"rank": 8, "targets": ["q_proj", "v_proj"]}})
    p["train"].update({"steps": 20, "out_dir": str(tmp_path / "lora"),
                       "init_from": str(tmp_path / "src")})
    p["train"].setdefault("optim", {})["lr"] = 3e-3
    tr = Trainer(from_dict(p), init=src)
    assert tr.cfg.model.lora.rank == 8 and tr.ledger.params["trainable"] == 2 * 2 * 8 * (64 + 64)
    start = tr.evaluate()["loss"]
    res = tr.fit()
    assert res.final_eval["loss"] < start
    again = keenlm.load(tmp_path / "lora")
    state = again.net.state_dict()
    base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    assert all(torch.equal(v, before[k]) for k, v in base.items())
    assert len(lora_layers(again.net)) == 4
