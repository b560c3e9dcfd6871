"""What every benchmark here shares: timing a callable and the closing BENCH line."""
from __future__ import annotations

import time


def best_of(fn, reps: int, warmup: int = 1) -> float:
    """Seconds of the fastest of ``reps`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_line(name: str, value: float, op: str, target: float) -> str:
    """``BENCH <name> <value> target <op><target> PASS|MISS`` (op: >= or <=)."""
    ok = value >= target if op == ">=" else value <= target
    return f"BENCH {name} {value:.3f} target {op}{target} {'PASS' if ok else 'MISS'}"


def cuda_median_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of ``reps`` calls on the current CUDA device (CUDA events), after
    ``warmup`` untimed ones."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
