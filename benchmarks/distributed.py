"""Data parallelism on one 2-core machine: 2 ranks x 1 thread (DDP and FSDP2, gloo) against 1
process x 2 threads, training the 10M shape of train_throughput.py (6 layers, width 384, BPE
4096, batch 16 x 256 tokens, fp32).

Each case is ``keenlm train`` in its own process(es), the same config, the same global batch;
tokens/s is the median over steps after the first 3 (rank 0's figure: the whole job's tokens
over its step time). The share of a distributed step spent beyond computing is estimated
against one process with 1 thread computing one rank's half of the batch (8 rows): 1 -
t(half batch, 1 thread) / t(distributed step). It holds communication and whatever the two
ranks cost each other on shared cores and memory. On one 2-core box no gain is expected: the
ranks split cores that one process uses anyway; the figures say what the machinery costs.

Usage: python benchmarks/distributed.py [--quick]     (--quick: 12 steps per case)
Ends with one line per figure: BENCH <name> <value> target <op><target> PASS|MISS
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import bench_line  # noqa: E402


def train(out: Path, steps: int, nproc: int, parallel: str, threads: int, batch: int = 16) -> dict:
    args = ["--model.n_layer", "6", "--model.d_model", "384", "--model.n_head", "6",
            "--model.d_ff", "1024", "--model.max_seq_len", "256", "--model.attention", "sdpa",
            "--data.corpus", "stdlib", "--data.tokenizer", "bpe", "--data.vocab_size", "4096",
            "--train.steps", str(steps), "--train.batch_size", str(batch), "--train.seq_len", "256",
            "--train.optim.lr", "1e-3", "--train.eval.every", "0", "--train.eval.batches", "1",
            "--train.eval.log_every", "1", "--train.checkpoint.resume", "false",
            "--train.progress", "false", "--train.out_dir", str(out), "--train.parallel", parallel,
            "--train.runtime.threads", str(threads)]
    cmd = [sys.executable, "-m", "keenlm.cli", "train", *(["--nproc", str(nproc)] if nproc > 1 else []), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        sys.exit(f"{parallel} x{nproc} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if r["kind"] == "train" and r["step"] > 3]
    return {"tok_s": statistics.median(r["tokens_per_s"] for r in steady),
            "step_s": statistics.median(batch * 256 / r["tokens_per_s"] for r in steady),
            "wall": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps = 12 if args.quick else 30
    print(f"# distributed: 10M shape, {steps} steps per case, {platform.machine()} "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        res["one"] = train(tmp / "one", steps, 1, "none", 2)
        res["half"] = train(tmp / "half", steps, 1, "none", 1, batch=8)
        res["ddp"] = train(tmp / "ddp", steps, 2, "ddp", 1)
        res["fsdp"] = train(tmp / "fsdp", steps, 2, "fsdp", 1)
    one = res["one"]["tok_s"]
    print(f"  1 process x 2 threads        {one:8.0f} tok/s  step {res['one']['step_s']:.3f} s")
    print(f"  1 process x 1 thread, 8 rows {res['half']['tok_s']:8.0f} tok/s  step "
          f"{res['half']['step_s']:.3f} s  (one rank's share of the work, nothing shared)")
    for m in ("ddp", "fsdp"):
        r = res[m]
        share = 1 - res["half"]["step_s"] / r["step_s"]
        r["share"] = share
        print(f"  2 ranks x 1 thread, {m:4s}     {r['tok_s']:8.0f} tok/s  step {r['step_s']:.3f} s"
              f"  ({r['tok_s'] / one:.2f}x one process; {share:.0%} of the step beyond computing)")
    print()
    print(bench_line("distributed_ddp_vs_one_process", res["ddp"]["tok_s"] / one, ">=", 1.0))
    print(bench_line("distributed_fsdp_vs_one_process", res["fsdp"]["tok_s"] / one, ">=", 1.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
