"""Mixture of experts on a CUDA GPU: the sparse forward against the reference, the grouped-GEMM
fast path (torch._grouped_mm, Hopper, bf16) against the per-expert loop, and a training run.

Skipped where torch sees no CUDA device. Run with: PYTHONPATH=src python -m pytest -q tests/gpu
"""
import functools

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device")]

from keenlm.config import ModelConfig, MoEConfig, from_dict  # noqa: E402
from keenlm.model import LINEAR  # noqa: E402
from keenlm.model.moe import MoE, moe_reference  # noqa: E402


def layer(d_model=128, d_ff=256, **moe):
    cfg = ModelConfig(vocab_size=97, n_layer=1, d_model=d_model, n_head=2, d_ff=d_ff,
                      ffn="moe", moe=MoEConfig(**{"experts": 8, "top_k": 2, **moe}))
    torch.manual_seed(0)
    m = MoE(cfg, functools.partial(LINEAR["dense"], cfg=cfg)).cuda().train()
    for p in m.parameters():
        torch.nn.init.normal_(p, 0.0, d_model ** -0.5)
    return m


def grads(fn, x, m, go):
    out = fn(x)
    return out, torch.autograd.grad(out, [x] + list(m.parameters()), go, allow_unused=True)


def test_sparse_matches_reference_on_cuda_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    m = layer(capacity_factor=1.0)
    x = torch.randn(4, 64, 128, device="cuda", requires_grad=True)
    go = torch.randn_like(x)
    m.use_grouped = False
    a, ga = grads(m, x, m, go)
    b, gb = grads(functools.partial(moe_reference, m), x, m, go)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for u, v in zip(ga, gb):
        if u is not None and v is not None:
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


def test_grouped_gemm_path_matches_the_per_expert_loop_in_bf16():
    m = layer()
    x = torch.randn(4, 256, 128, device="cuda", requires_grad=True)
    go = torch.randn_like(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        if not m.grouped_ok(x.reshape(-1, 128)):
            pytest.skip("torch._grouped_mm path does not apply here (needs sm90+ and bf16)")
        m.use_grouped = True
        a, ga = grads(m, x, m, go)
        m.use_grouped = False
        b, gb = grads(m, x, m, go)
    scale = b.abs().max()
    assert (a - b).abs().max() <= 2e-2 * scale  # both bf16 GEMMs; fp32 accumulation differs
    for u, v in zip(ga, gb):
        if u is not None and v is not None and v.abs().max() > 0:
            assert (u.float() - v.float()).abs().max() <= 3e-2 * v.abs().max(), u.shape


def test_moe_model_trains_on_cuda_in_bf16(tmp_path):
    from keenlm.train import Trainer

    cfg = from_dict({"data": {"corpus": str(tmp_path / "c.txt"), "tokenizer": "byte",
                              "cache_dir": str(tmp_path / "cache")},
                     "model": {"n_layer": 2, "d_model": 128, "n_head": 2, "max_seq_len": 128,
                               "ffn": "moe", "moe": {"experts": 8, "top_k": 2}},
                     "train": {"steps": 30, "batch_size": 8, "seq_len": 128, "progress": False,
                               "runtime": {"dtype": "bf16", "device": "cuda"},
                               "eval": {"batches": 2}, "optim": {"lr": 3e-3},
                               "out_dir": str(tmp_path / "run")}})
    (tmp_path / "c.txt").write_text(("def f(x):\n    return x * 2\n" * 400) +
                                    ("class A:\n    pass\n" * 400))
    tr = Trainer(cfg)
    first = tr.evaluate()["loss"]
    res = tr.fit()
    assert res.final_eval["loss"] < first - 1.0
