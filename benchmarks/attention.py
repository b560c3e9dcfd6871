"""Attention backends on the CPU: peak memory and time of forward + backward (issue: FlashAttention).

What is compared: keenlm's ``flash`` backend (FlashAttention-2 in PyTorch, keenlm/model/flash.py)
and ``naive`` (explicit score matrix) against ``sdpa`` (PyTorch's fused kernel), for one causal
attention of batch 1, 8 heads, head dim 64, fp32, forward + backward, at sequence lengths 512 to
16384 (``naive`` only where its N x N matrices fit in memory). Each (backend, length) runs in its
own process, so its peak memory (peak resident set above the process's resident set just
before the call) is its own; time is the best of a few calls in that process. Next to each
length, the IO model (``keenlm.model.flash.io_cost``) gives the bytes a standard and a tiled
implementation move between slow and fast memory (fast memory = 1 MB, about this CPU's L2).

Usage: python benchmarks/attention.py [--quick]
Ends with one line per target: BENCH <name> <value> target <op><target> PASS|MISS
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import bench_line  # noqa: E402

H, D = 8, 64
NAIVE_MAX = 8192  # 16384 would need ~25 GB for naive's N x N matrices


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(backend: str, n: int, reps: int) -> dict:
    import resource

    import torch

    from keenlm.model.attention import ATTENTION

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, H, n, D, generator=g).requires_grad_() for _ in range(3))
    fn = ATTENTION[backend]
    base = _rss()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(q, k, v, None).sum().backward()
        times.append(time.perf_counter() - t0)
        q.grad = k.grad = v.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"backend": backend, "n": n, "seconds": min(times), "peak_bytes": max(0, peak - base)}


def run(backend: str, n: int, reps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", backend, str(n), str(reps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", nargs=3, metavar=("BACKEND", "N", "REPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        b, n, reps = args.worker
        print(json.dumps(worker(b, int(n), int(reps))))
        return 0
    import torch

    from keenlm.model.flash import io_cost

    lengths = [512, 2048, 8192] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    print(f"attention: machine {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"batch 1, {H} heads, head dim {D}, causal, fp32, forward + backward, {time.strftime('%Y-%m-%d')}")
    print(f"{'N':>6} {'backend':>7} {'time s':>8} {'vs sdpa':>8} {'peak MB':>9} {'vs naive':>9}   "
          f"IO model (1 MB fast memory): standard / tiled MB")
    results = {}
    for n in lengths:
        reps = 3 if n <= 2048 else 1
        for backend in ("sdpa", "flash", "naive"):
            if backend == "naive" and n > NAIVE_MAX:
                continue
            results[(backend, n)] = run(backend, n, reps)
        io = io_cost(1, H, n, D, sram_bytes=1 << 20, bytes_per_element=4, causal=True)
        sdpa = results[("sdpa", n)]
        naive = results.get(("naive", n))
        for backend in ("sdpa", "flash", "naive"):
            r = results.get((backend, n))
            if r is None:
                print(f"{n:6d} {backend:>7}   (skipped: N x N matrices too large for this machine)")
                continue
            rel_mem = f"{r['peak_bytes'] / naive['peak_bytes']:9.3f}" if naive else f"{'-':>9}"
            io_txt = (f"   {io['standard']['bytes'] / 1e6:9.1f} / {io['tiled']['bytes'] / 1e6:7.1f}"
                      if backend == "sdpa" else "")
            print(f"{n:6d} {backend:>7} {r['seconds']:8.3f} {sdpa['seconds'] / r['seconds']:7.2f}x "
                  f"{r['peak_bytes'] / 1e6:9.1f} {rel_mem}{io_txt}")
    lines = []
    mem_n = 8192
    if ("naive", mem_n) in results:
        ratio = results[("flash", mem_n)]["peak_bytes"] / results[("naive", mem_n)]["peak_bytes"]
        lines.append(bench_line(f"attention_flash_peak_memory_over_naive_{mem_n}", ratio, "<=", 0.125))
    long = [n for n in lengths if n >= 2048]
    worst = min(results[("sdpa", n)]["seconds"] / results[("flash", n)]["seconds"] for n in long)
    lines.append(bench_line("attention_flash_speed_vs_sdpa_min_over_n_ge_2048", worst, ">=", 0.5))
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
