"""flash_triton vs PyTorch SDPA's FlashAttention backend on a CUDA GPU (issue: FlashAttention).

Forward + backward of causal attention in bf16, head dims 64 and 128, sequence lengths 1k to 16k,
with batch x length = 16k tokens and heads x head dim = 2048 (FlashAttention-2's benchmark
shape). TFLOP/s counts the causal forward as 2 matmuls over half the N x N pairs
(2 * 2 * B * H * N^2 * D / 2) and the backward as 2.5x the forward (FlashAttention's
convention, the recomputed q k^T included). Both kernels in the same process; median of
several timed calls after warm-up (CUDA events).

Usage: python benchmarks/attention_gpu.py [--quick]      (needs a CUDA GPU and triton)
The first call of each shape tunes flash_triton's tiles (keenlm.model.flash_triton.CANDIDATES),
outside the timed calls; the tiles kept are printed. KEENLM_FLASH_TUNE=0 times the defaults.
Ends with: BENCH attention_gpu_triton_vs_sdpa_min <ratio> target >=0.8 PASS|MISS
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import bench_line, cuda_median_ms  # noqa: E402


def timed(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls (CUDA events)."""
    return cuda_median_ms(fn, reps) / 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_gpu.py needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from keenlm.model.flash_triton import flash_triton_attention

    lengths = [1024, 4096, 16384] if args.quick else [1024, 2048, 4096, 8192, 16384]
    print(f"attention_gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, causal, "
          f"forward + backward")
    print(f"{'D':>4} {'N':>6} {'B':>3} {'H':>3} {'sdpa TFLOP/s':>13} {'triton TFLOP/s':>15} {'ratio':>6}")
    ratios = []
    for D in (64, 128):
        H = 2048 // D
        for N in lengths:
            B = max(1, 16384 // N)
            q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            go = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)

            def sdpa():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(go)

            def tri():
                flash_triton_attention(q, k, v, None, causal=True).backward(go)

            flops = 3.5 * 2 * 2 * B * H * N * N * D / 2
            t_s, t_t = timed(sdpa, 5 if args.quick else 10), timed(tri, 5 if args.quick else 10)
            ratios.append(t_s / t_t)
            print(f"{D:4d} {N:6d} {B:3d} {H:3d} {flops / t_s / 1e12:13.1f} {flops / t_t / 1e12:15.1f} "
                  f"{t_s / t_t:6.2f}")
    from keenlm.model.flash_triton import TUNED

    print("\ntiles the autotuner kept (kernel, head dim, dtype, T, S, causal, mask) -> "
          "(BLOCK_M, BLOCK_N, warps, stages):")
    for key, cfg in sorted(TUNED.items(), key=str):
        print(f"  {key} -> {cfg}")
    print()
    print(bench_line("attention_gpu_triton_vs_sdpa_min", min(ratios), ">=", 0.8))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
