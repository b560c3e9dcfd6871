"""Packed low-bit matvec: keenlm's lookup-table kernel vs fp32 F.linear (issue: low-bit weights).

What is compared: y = x W^T for one input row (batch-1 decode) with W stored as 2-bit packed
codes (ternary and 2-bit, four weights per byte, one scale per row) through
``keenlm.model.packed_kernels.lut_matmul``, against ``torch.nn.functional.linear`` with the same
W in fp32, at shapes in x out = 576x1536, 1536x576 and 2048x8192, with 1 and 2 threads; both
in the same run, best of several repetitions.

Not yet here (the issue's parts b and c): batch-1 decode of a whole ternary model vs fp32, and
packed model bytes.

Usage: python benchmarks/lowbit.py [--quick]
Ends with one line per target: BENCH <name> <value> target <op><target> PASS|MISS
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import bench_line, best_of  # noqa: E402
from keenlm.model import packed_kernels  # noqa: E402
from keenlm.model.packing import LEVELS, pack  # noqa: E402

SHAPES = [(576, 1536), (1536, 576), (2048, 8192)]  # (in_features, out_features)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not packed_kernels.available():
        sys.exit("lowbit.py needs numba: pip install 'keenlm[lowbit]'")
    import numba

    reps = 10 if args.quick else 30
    print(f"lowbit: machine {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"numba {numba.__version__}, batch-1 matvec, best of {reps}, {time.strftime('%Y-%m-%d')}")
    lines = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        numba.set_num_threads(threads)
        for n_in, n_out in SHAPES:
            g = torch.Generator().manual_seed(n_in)
            x = torch.randn(1, n_in, generator=g)
            w = torch.randn(n_out, n_in, generator=g)
            base = best_of(lambda: F.linear(x, w), reps, warmup=2)
            for kind in ("ternary", "int2"):
                codes = torch.randint(0, 3 if kind == "ternary" else 4, (n_out, n_in),
                                      generator=g, dtype=torch.uint8)
                packed_t = pack(codes, 2).t().contiguous()
                scales = torch.rand(n_out, 1, generator=g)
                t = best_of(lambda: packed_kernels.lut_matmul(x, packed_t, LEVELS[kind], scales), reps,
                            warmup=2)
                ratio = base / t
                print(f"  {threads}t {n_in}x{n_out} {kind:7s} fp32 {base * 1e6:8.1f} us  packed "
                      f"{t * 1e6:8.1f} us  speed-up {ratio:5.2f}x")
                if (n_in, n_out) == (2048, 8192):
                    lines.append(bench_line(f"lowbit_matvec_{kind}_2048x8192_{threads}t",
                                            ratio, ">=", 3.0))
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
