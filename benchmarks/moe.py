"""Mixture of experts: seconds per training step against the dense model of equal active
parameters (issue: update only the relevant weights).

What is compared: ``Trainer.train_step`` (forward, loss, backward, clipping, AdamW; exactly as
``keenlm train`` runs it) of
  - dense: the size dial's model (depth 4: d_model 128, 4 layers, SwiGLU width F = 352),
  - moe: the same with 8 experts of width F / 2 and top-2 routing (sorted, gathered, each
    expert on its own tokens) -- equal active parameters and FLOPs per token, 4x the
    feed-forward parameters,
  - dense-total: a dense model of width 8 F / 2 (the MoE's total parameters; for scale),
on keenlm's BPE-tokenized stdlib, batch 16 x 256, dtype auto, in interleaved rounds in one
process; the median round is reported, because timings on a shared 2-core machine drift.
The reference MoE (every expert on every token) is timed too, to show what sparsity buys.

Usage: python benchmarks/moe.py [--quick] [--depth N] [--rounds N]
Ends with one line per target: BENCH <name> <value> target <op><target> PASS|MISS
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import bench_line  # noqa: E402
from keenlm.config import from_dict, merge  # noqa: E402
from keenlm.train import Trainer  # noqa: E402

TARGET = 1.5  # MoE seconds per step / dense (equal active parameters), at most


def trainer(depth: int, model: dict, out: Path) -> Trainer:
    from keenlm.presets import size_preset
    from keenlm.scaling.sweep import base_config

    cfg = merge(base_config(), size_preset(depth, aspect=32), {"model": model},
                {"train": {"steps": 10_000, "out_dir": str(out), "checkpoint": {"resume": False}}})
    return Trainer(from_dict(cfg))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=0, help="0: 6 (--quick: 3)")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 6)
    steps = 3 if args.quick else 5
    print(f"moe: machine {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, depth {args.depth}, {rounds} rounds of {steps} "
          f"steps, {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as tmp:
        dense = trainer(args.depth, {}, Path(tmp) / "dense")
        width = dense.cfg.model.d_ff
        moe = {"ffn": "moe", "moe": {"experts": 8, "top_k": 2, "d_ff": width // 2}}
        models = {"dense": dense,
                  "moe": trainer(args.depth, moe, Path(tmp) / "moe"),
                  "dense-total": trainer(args.depth, {"d_ff": width * 4}, Path(tmp) / "total")}
        ref = trainer(args.depth, moe, Path(tmp) / "ref")
        from keenlm.model.moe import moe_reference

        for layer in ref.model.layers:  # the every-expert reference in place of the sparse forward
            layer.mlp.forward = lambda x, m=layer.mlp: moe_reference(m, x)
        models["moe (reference)"] = ref
        for name, tr in models.items():
            p = tr.ledger.params
            print(f"  {name:16s} total {p['total']:>10,}  active {p['active']:>10,}  "
                  f"train FLOPs/token {tr.ledger.flops_per_token['train']:.3g}")
        times: dict[str, list[float]] = {k: [] for k in models}
        for tr in models.values():  # warm-up
            tr.train_step()
        for _ in range(rounds):
            for name, tr in models.items():
                t0 = time.perf_counter()
                for _ in range(steps):
                    tr.train_step()
                times[name].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, s in med.items():
        print(f"  {name:16s} {s * 1000:8.1f} ms/step  {s / med['dense']:.2f}x dense")
    ratio = med["moe"] / med["dense"]
    print(bench_line("moe_step_vs_dense_equal_active", ratio, "<=", TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
