"""Mixture of experts on a CUDA GPU: one MoE layer's forward + backward in bf16, the grouped-GEMM
path (torch._grouped_mm) against the per-expert loop, and against the dense SwiGLU of equal
active parameters (issue: update only the relevant weights; no target, recorded for reference).

Shapes: d_model 1024, 8 experts of width 1408 (top-2) vs a dense SwiGLU of width 2816, and
64 experts of width 352 (top-8) vs the same dense layer; 16k tokens. Median of timed calls
after warm-up (CUDA events).

Usage: python benchmarks/moe_gpu.py      (needs a CUDA GPU)
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import cuda_median_ms  # noqa: E402
from keenlm.config import ModelConfig, MoEConfig  # noqa: E402
from keenlm.model import LINEAR  # noqa: E402
from keenlm.model.layers import SwiGLU  # noqa: E402
from keenlm.model.moe import MoE  # noqa: E402


def timed(fn, reps: int = 20) -> float:
    return cuda_median_ms(fn, reps)


def main() -> int:
    C, N = 1024, 16384
    print(f"moe_gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast, "
          f"{N} tokens, d_model {C}, forward + backward")
    for E, k, F in ((8, 2, 1408), (64, 8, 352)):
        cfg = ModelConfig(vocab_size=97, n_layer=1, d_model=C, n_head=8, d_ff=F * k, ffn="moe",
                          moe=MoEConfig(experts=E, top_k=k, d_ff=F))
        lin = functools.partial(LINEAR["dense"], cfg=cfg)
        moe, dense = MoE(cfg, lin).cuda(), SwiGLU(cfg, lin).cuda()
        x = torch.randn(N, C, device="cuda", requires_grad=True)

        def step(mod):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                mod(x).float().sum().backward()

        t = {}
        for name, mod, grouped in (("per-expert loop", moe, False), ("grouped GEMM", moe, True),
                                   ("dense equal-active", dense, None)):
            if grouped is not None:
                moe.use_grouped = grouped
            t[name] = timed(lambda: step(mod))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            applies = moe.grouped_ok(x)
        print(f"  E={E} top-{k} width {F} (grouped GEMM path applies: {applies}):")
        for name, ms in t.items():
            print(f"    {name:20s} {ms:7.2f} ms  {ms / t['dense equal-active']:.2f}x dense")
    return 0


if __name__ == "__main__":
    sys.exit(main())
