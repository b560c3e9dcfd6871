"""Spiking execution: the compiled rate code against its tensor reference, and what a spiking
training step costs against the dense one (issue: neuromorphic execution).

What is compared:
  - the rate code of a feed-forward layer's hidden activation (batch 16 x 256 tokens, 2 x 352
    neurons, T steps, with the gradient sensitivities as in training): the numba kernel
    (``spiking_kernels``) against the in-place tensor loop (``spiking._rate_code_torch``);
  - a whole training step (forward, loss, backward, AdamW; ``Trainer.train_step``) of the size
    dial's depth-4 model with spiking feed-forward layers at T against the dense model, for scale.
Best of several calls; both sides measured in this run.

The issue sets no speed target; the kernel's own target here is >= 3x the tensor loop at T = 8
(the claim the README makes).

Usage: python benchmarks/spiking.py [--quick]
Ends with one line per target: BENCH <name> <value> target <op><target> PASS|MISS
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import bench_line, best_of  # noqa: E402

TARGET = 3.0  # compiled rate code / tensor loop speed, at least


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from keenlm.spiking import kernels as spiking_kernels
    from keenlm.spiking.neurons import _rate_code_torch

    reps = 3 if args.quick else 6
    print(f"spiking: machine {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    if not spiking_kernels.available():
        print("numba is not installed: only the tensor reference exists here")
        return 1
    g = torch.Generator().manual_seed(0)
    cur = torch.rand(16 * 256, 2 * 352, generator=g) * 1.2 - 0.2
    ratio8 = None
    for T in (4, 8, 16):
        ref = best_of(lambda: _rate_code_torch(cur, T, 1.0, "subtract", 25.0, True), reps)
        fast = best_of(lambda: spiking_kernels.rate_code_kernel(cur, T, 1.0, "subtract", 25.0, True),
                       reps, warmup=2)
        print(f"  rate code T={T:>2}: tensor loop {ref * 1000:7.1f} ms, compiled {fast * 1000:6.1f} ms, "
              f"{ref / fast:.1f}x")
        if T == 8:
            ratio8 = ref / fast
    from keenlm.config import from_dict, merge
    from keenlm.presets import size_preset
    from keenlm.scaling.sweep import base_config
    from keenlm.train import Trainer

    steps = [8] if args.quick else [4, 8, 16]
    with tempfile.TemporaryDirectory() as tmp:
        def trainer(model: dict, name: str) -> Trainer:
            cfg = merge(base_config(), size_preset(4, aspect=32), {"model": model},
                        {"train": {"steps": 10_000, "out_dir": str(Path(tmp) / name),
                                   "checkpoint": {"resume": False}}})
            return Trainer(from_dict(cfg))

        models = {"dense": trainer({}, "dense")}
        for T in steps:  # scales stay 1 here: the cost does not depend on them
            models[f"spiking T={T}"] = trainer({"spike": {"steps": T}}, f"T{T}")
        for tr in models.values():
            tr.train_step()
        times = {k: best_of(tr.train_step, 2 if args.quick else 4, warmup=0)
                 for k, tr in models.items()}
    for k, s in times.items():
        print(f"  train step {k:14s} {s * 1000:8.1f} ms  {s / times['dense']:.2f}x dense")
    print(bench_line("spiking_rate_code_compiled_vs_tensor_T8", ratio8, ">=", TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
