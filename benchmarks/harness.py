"""lm-evaluation-harness on SmolLM2-135M: keenlm's model class in-process against the harness'
own ``local-completions`` client talking to ``keenlm serve`` (its process, 127.0.0.1), on
keenlm's local tasks (keenlm/harness/tasks: stdlib next line, two-digit addition, stdlib
perplexity). Both read the same GGUF (Q4_1, the C decode engine); the in-process model scores
and decodes one request at a time (batch_size=1), as the server prefills each request alone.

Prints each task's figures from both and the largest per-sample difference, and the wall time
of each run (the server's includes HTTP and JSON). Then keenlm's class on the fp32 model against
the harness' own ``hf`` backend (transformers) on the same model exported to a Hugging Face
folder: the figures to 4 decimals, and the wall times, task by task (batch 8 both; the
harness' index of its own built-in tasks, the same cost for every backend, left out).

Usage: python benchmarks/harness.py [--quick]      (--quick: 40 items per task)
Ends with one line per target: BENCH <name> <value> target <op><target> PASS|MISS
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from common import bench_line  # noqa: E402
from decode import gguf_path  # noqa: E402
from serve import free_port, start  # noqa: E402

METRICS = ("acc,none", "acc_norm,none", "exact_match,first-number", "word_perplexity,none",
           "byte_perplexity,none", "bits_per_byte,none")


def evaluate(model, model_args: str | None, limit: int, tasks=None):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from keenlm.harness import TASK_NAMES, TASKS

    t = time.perf_counter()
    # keenlm's local tasks only: the harness' own task index (~13 s of YAML here, the same for
    # every backend) is left out, so the times are the backends'
    out = simple_evaluate(model=model, model_args=model_args, tasks=list(tasks or TASK_NAMES),
                          limit=limit, task_manager=TaskManager(include_path=str(TASKS),
                                                                include_defaults=False),
                          log_samples=True)
    return out, time.perf_counter() - t


def per_task(model, model_args: str, limit) -> tuple[dict, dict[str, float]]:
    """Each task in a run of its own: the merged results and each task's wall time."""
    from keenlm.harness import TASK_NAMES

    merged, times = {"results": {}, "samples": {}}, {}
    for task in TASK_NAMES:
        out, times[task] = evaluate(model, model_args, limit, [task])
        merged["results"].update(out["results"])
        merged["samples"].update(out["samples"])
    return merged, times


def first(r):
    """One response: a log-likelihood (the first of (log-likelihood, is greedy)) or a text."""
    r = r[0] if isinstance(r, list) and len(r) == 1 else r
    return r[0] if isinstance(r, (list, tuple)) else r


def against_hf(path: Path, limit) -> None:
    """keenlm's class (fp32) against the harness' own ``hf`` backend (transformers) on the same
    model exported to a Hugging Face folder: figures to 4 decimals, and wall time."""
    import tempfile

    from keenlm.io.hf import export_hf
    import keenlm

    km = keenlm.load(path)  # fp32, as the exported folder holds it
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_hf(km.net, km.tokenizer, Path(tmp) / "hf")
        theirs, tt = per_task("hf", f"pretrained={folder},dtype=float32,device=cpu,batch_size=8",
                              limit)
    mine, tm = per_task("keenlm", f"pretrained={path},batch_size=8", limit)
    t_mine, t_theirs = sum(tm.values()), sum(tt.values())
    worst = 0.0
    print("\n| task | metric | keenlm (fp32) | hf backend (transformers, fp32) |")
    print("|---|---|---|---|")
    for task, ra in mine["results"].items():
        for m in METRICS:
            if m in ra:
                rb = theirs["results"][task][m]
                print(f"| {task} | {m} | {ra[m]:.6f} | {rb:.6f} |")
                worst = max(worst, abs(round(ra[m], 4) - round(rb, 4)))
    print("\n| task | keenlm s | hf backend s | ratio |\n|---|---:|---:|---:|")
    for task in tm:
        print(f"| {task} | {tm[task]:.1f} | {tt[task]:.1f} | {tm[task] / tt[task]:.2f}x |")
    print(f"\nwall time (each task in a run of its own, model loading included): keenlm "
          f"{t_mine:.1f} s, hf backend {t_theirs:.1f} s ({t_mine / t_theirs:.2f}x)")
    print(bench_line("harness_vs_hf_backend_4_decimals_max_diff", worst, "<=", 0.0))
    print(bench_line("harness_vs_hf_backend_wall_time", t_mine / t_theirs, "<=", 0.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only-hf", action="store_true", help="only the comparison with the hf backend")
    args = ap.parse_args()
    limit = 40 if args.quick else None
    path = gguf_path()
    import torch

    torch.set_num_threads(2)
    import keenlm.harness.model  # noqa: F401  (registers "keenlm" in the harness)

    if args.only_hf:
        return against_hf(path, limit)

    print(f"# lm-evaluation-harness: {path.name}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {'quick' if args.quick else 'full'} run")
    mine, t_mine = evaluate("keenlm", f"pretrained={path},quant=q4,batch_size=1,max_length=512", limit)
    port = free_port()
    proc = start("keenlm", path, port)
    try:
        theirs, t_theirs = evaluate(
            "local-completions", f"base_url=http://127.0.0.1:{port}/v1/completions,model=smol,"
            "tokenizer_backend=remote,max_length=513,num_concurrent=4,max_retries=1", limit)
    finally:
        proc.terminate()
        proc.wait(60)
    worst_metric, worst_ll, same_text, n_text = 0.0, 0.0, 0, 0
    print("\n| task | metric | keenlm in-process | local-completions -> keenlm serve |")
    print("|---|---|---|---|")
    for task, ra in mine["results"].items():
        rb = theirs["results"][task]
        for m in METRICS:
            if m in ra:
                print(f"| {task} | {m} | {ra[m]:.6f} | {rb[m]:.6f} |")
                worst_metric = max(worst_metric, abs(ra[m] - rb[m]) / max(1.0, abs(ra[m])))
        a = sorted(mine["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        for x, y in zip(a, b):  # a document: one response per choice (or one text)
            for rx, ry in zip(x["resps"], y["resps"]):
                fx, fy = first(rx), first(ry)
                if isinstance(fx, str):
                    n_text += 1
                    same_text += fx == fy
                else:
                    worst_ll = max(worst_ll, abs(fx - fy) / max(1.0, abs(fx)))
    print(f"\nlargest per-sample log-likelihood difference {worst_ll:.2e} (relative); generations identical "
          f"{same_text}/{n_text}; wall time in-process {t_mine:.1f} s, through the server "
          f"{t_theirs:.1f} s")
    print(bench_line("harness_metric_rel_diff", worst_metric, "<=", 1e-4))
    print(bench_line("harness_generations_identical", same_text / max(1, n_text), ">=", 1.0))
    if importlib.util.find_spec("transformers") is not None:
        against_hf(path, limit)


if __name__ == "__main__":
    main()
