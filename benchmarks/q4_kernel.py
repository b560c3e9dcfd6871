"""The Q4 x int8 matrix-vector kernel (keenlm.quant.q4) alone, against PyTorch's kernels (issue:
the inference engine; the whole decode step is measured by benchmarks/decode.py).

What is compared, for one activation row (batch-1 decode) at SmolLM2-135M's projection shapes
(qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536): fp32 ``F.linear``, PyTorch's int4
weight-only kernel (``Int4Linear``: what ``keenlm.load(quant="int4")`` runs), and each compiled
path of the Q4 kernel (AVX2; AVX-512 VNNI at 256 and 512 bits where the CPU has them). Weights
are streamed from memory as in decoding: each shape is held in enough copies to exceed the
last-level cache, and the calls cycle through them. Microseconds per call, the mean of a
cycle, at 1 and 2 threads: torch's kernels on torch's threads, the Q4 kernel on as many threads
of its own pool with torch on one meanwhile (as keenlm.quant.q4.decode_threads decodes when
the C decode step cannot run a model: beside torch's own threads the two pools would starve
each other on 2 cores).

Usage: python benchmarks/q4_kernel.py [--quick]
Ends with one line per target: BENCH <name> <value> target <op><target> PASS|MISS
The interim targets: the Q4 kernel at least level with PyTorch's int4 kernel on the same number
of threads (1 and 2), summed over one decoder layer's four projections.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import bench_line  # noqa: E402
from keenlm.quant.int4 import Int4Linear  # noqa: E402
from keenlm.quant import q4  # noqa: E402
from keenlm.quant.q4 import Q4Linear, available_paths  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
TARGET = 1.0  # torch int4 time / Q4 kernel time over a layer, same threads, at least


def cycle_us(layers, x, reps: int) -> float:
    """Mean microseconds per call over ``reps`` passes through all the copies."""
    with torch.no_grad():
        for lin in layers:
            lin(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            for lin in layers:
                lin(x)
    return (time.perf_counter() - t0) / (reps * len(layers)) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer copies and passes (~20 s)")
    args = ap.parse_args()
    paths = [p for p in available_paths() if p != "scalar"]
    if not paths:
        print("the Q4 kernel is not built here (no C compiler at install): nothing to measure")
        return
    print(f"q4_kernel: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"paths {paths}, {time.strftime('%Y-%m-%d')}")
    reps, budget = (2, 24e6) if args.quick else (5, 64e6)  # bytes of fp32 weights per shape
    torch.manual_seed(0)
    layer = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, (n, k) in SHAPES.items():
            copies = max(4, int(budget // (4 * n * k)))
            ws = [torch.randn(n, k) * 0.02 for _ in range(copies)]
            x = torch.randn(1, k)
            fp32 = [torch.nn.Linear(k, n, bias=False) for _ in ws]
            for lin, w in zip(fp32, ws):
                lin.weight.data = w
            row = {"fp32": cycle_us(fp32, x, reps),
                   "int4": cycle_us([Int4Linear(w) for w in ws], x, reps)}
            q4s = [Q4Linear.from_float(w) for w in ws]
            # as keenlm decodes (keenlm.quant.q4.decode_threads): the kernel's own pool holds
            # the threads and torch runs on one, since two spinning pools starve each other
            q4.THREADS = threads
            torch.set_num_threads(1)
            for p in paths:
                for q in q4s:
                    q.path = p
                row["q4-" + p] = cycle_us(q4s, x, reps)
            torch.set_num_threads(threads)
            for key, us in row.items():
                layer[(threads, key)] = layer.get((threads, key), 0.0) + us
            print(f"  {threads}t {name:8s} {n}x{k}  " + "  ".join(f"{k_} {v:7.1f} us"
                                                           for k_, v in row.items()))
    best = paths[-1]
    for threads in (1, 2):
        print(f"  {threads}t layer (4 projections): " + "  ".join(
            f"{key} {us:.0f} us" for (t, key), us in layer.items() if t == threads))
    ratios = {t: layer[(t, "int4")] / layer[(t, "q4-" + best)] for t in (1, 2)}
    print(f"  the Q4 kernel ({best}) vs torch int4 over a layer: {ratios[1]:.2f}x on 1 thread, "
          f"{ratios[2]:.2f}x on 2")
    for t in (1, 2):
        print(bench_line(f"q4_kernel_layer_vs_torch_int4_{t}t", ratios[t], ">=", TARGET))


if __name__ == "__main__":
    main()
