"""Ledger FLOPs against torch's own FLOP counter (a trusted implementation)."""
import pytest
import torch
import torch.utils.flop_counter as fc
from torch.utils.flop_counter import FlopCounterMode

from keenlm.config import ModelConfig
from keenlm.ledger import Ledger, count_params, flops_per_token
from keenlm.model import build_model


def _cpu_sdpa_mapping():
    """torch's counter knows SDPA's CUDA kernels but not the CPU flash ones; map those to
    torch's own SDPA formulas (sdpa_flop_count / sdpa_backward_flop_count)."""
    aten = torch.ops.aten

    def fwd(q, k, v, *args, out_shape=None, **kw):
        return fc.sdpa_flop_count(q, k, v)  # the counter passes shapes

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kw):
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


@pytest.mark.parametrize("backend,tie,kv,lora", [("naive", True, 4, 0), ("sdpa", True, 2, 0),
                                                ("sdpa", False, 1, 0), ("sdpa", True, 2, 8)])
def test_ledger_flops_match_counted(backend, tie, kv, lora):
    """With LoRA adapters (lora > 0) only the adapters' weight gradients are computed."""
    from keenlm.config import LoRAConfig

    cfg = ModelConfig(vocab_size=300, n_layer=3, d_model=64, n_head=4, n_kv_head=kv, d_ff=160,
                      max_seq_len=128, attention=backend, tie_embeddings=tie,
                      lora=LoRAConfig(rank=lora))
    model = build_model(cfg)
    B, T = 2, 96
    x = torch.randint(0, 300, (B, T))
    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as fwd_counter:
        logits = model(x)
    loss = model.loss(logits, x)
    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as bwd_counter:
        loss.backward()
    counted_fwd = fwd_counter.get_total_flops() / (B * T)
    counted_bwd = bwd_counter.get_total_flops() / (B * T)
    ours = flops_per_token(model, T)
    assert abs(ours["forward"] / counted_fwd - 1) < 0.05, (ours["forward"], counted_fwd)
    assert abs(ours["backward"] / counted_bwd - 1) < 0.05, (ours["backward"], counted_bwd)


def test_param_counts():
    cfg = ModelConfig(vocab_size=300, n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=160)
    model = build_model(cfg)
    p = count_params(model)
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 160 + 2 * 64
    assert p["non_embedding"] == 2 * per_layer + 64
    assert p["embedding"] == 300 * 64
    assert p["total"] == p["non_embedding"] + p["embedding"]
    assert p["active"] == p["non_embedding"] + 300 * 64  # the tied head is a matmul per token


def test_ledger_accumulates_and_round_trips(tmp_path):
    model = build_model(ModelConfig(vocab_size=50, n_layer=1, d_model=32, n_head=2, d_ff=64))
    led = Ledger.for_model(model, seq_len=16)
    led.add_step(tokens=100, tokens_backward=40, seconds=2.0)
    d = led.to_dict()
    assert d["flops_total"] == 100 * d["flops_per_token"]["forward"] + 40 * d["flops_per_token"]["backward"]
    assert d["tokens_per_s"] == 50.0
    led.save(tmp_path / "ledger.json")
    import json
    back = Ledger.from_dict(json.loads((tmp_path / "ledger.json").read_text()))
    assert back.tokens_backward == 40 and back.flops_forward == led.flops_forward
