"""``keenlm eval RUN``: validation loss, bits per byte and perplexity; or, with ``--task``,
pass@1 greedy, pass@k and maj@k on a verifiable task's held-out split."""
from __future__ import annotations

import json

import keenlm
from keenlm.cli.options import add_device_options, add_model_source, model_path, task_of
from keenlm.config import RL_TASKS
from keenlm.infer.task_eval import evaluate_task


def add_parser(sub, fmt):
    e = sub.add_parser("eval", help="validation loss, bits per byte, perplexity", formatter_class=fmt)
    add_model_source(e)
    e.add_argument("--corpus", default=None,
                   help="stdlib, a file, a folder or a .jsonl (whole); default: the run's val split")
    e.add_argument("--batches", type=int, default=50, help="at most this many batches")
    e.add_argument("--batch-size", type=int, default=8, help="windows per batch")
    e.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's)")
    add_device_options(e)
    e.add_argument("--json", action="store_true", help="print JSON")
    tk = e.add_argument_group("task evaluation (instead of the loss): pass@1 greedy, pass@k, maj@k")
    tk.add_argument("--task", choices=RL_TASKS,
                    help="a verifiable task: score answers on its held-out split")
    tk.add_argument("--difficulty", type=int, default=2, help="digits per operand / numbers on offer")
    tk.add_argument("--scratchpad", action="store_true",
                    help="answers worked step by step (arithmetic, countdown)")
    tk.add_argument("--template", default="plain", choices=("plain", "chat"),
                    help="chat: prompts rendered by the model's chat template")
    tk.add_argument("--shots", type=int, default=0,
                    help="with --template chat: worked examples shown as earlier turns")
    tk.add_argument("--examples", default="demonstration", choices=("demonstration", "equation"),
                    help="what the examples show before the answer: the task's demonstration, "
                         "or the problem restated as an equation with its result")
    tk.add_argument("--n", type=int, default=100, help="held-out problems")
    tk.add_argument("--samples", type=int, default=0,
                    help="sampled answers per problem for pass@k and maj@k (0: greedy only)")
    tk.add_argument("--k", default="1,4,8", help="k values for pass@k and maj@k")
    tk.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    tk.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit")
    hk = e.add_argument_group("lm-evaluation-harness (instead of the loss; the eval extra)")
    hk.add_argument("--harness", metavar="TASKS",
                    help="comma-separated harness tasks: keenlm's local ones (keenlm_nextline, "
                         "keenlm_addition, keenlm_stdlib_text) or any the harness has offline")
    hk.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    return e


def run(args) -> int:
    km = keenlm.load(model_path(args), device=args.device, quant=args.quant)
    if args.harness:
        return _harness_eval(km, args)
    if args.task:
        return _task_eval(km, args)
    res = km.evaluate(args.corpus, batch_size=args.batch_size, seq_len=args.seq_len,
                      max_batches=args.batches)
    print(json.dumps(res, indent=2) if args.json else
          f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}  "
          f"bits/byte {res['bits_per_byte']:.4f}  ({res['tokens']} tokens, {res['bytes']} bytes)")
    return 0


def _harness_eval(km, args) -> int:
    from keenlm.harness.model import run_harness, summary  # optional: lm-evaluation-harness

    tasks = [t for t in args.harness.split(",") if t]
    res = summary(run_harness(km, tasks, limit=args.limit, batch_size=args.batch_size))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    for task, metrics in res.items():
        print(f"{task}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _task_eval(km, args) -> int:
    if args.samples < 0 or args.n < 1:
        raise ValueError("--n must be >= 1 and --samples >= 0")
    ks = tuple(int(k) for k in args.k.split(",") if k)
    if any(k < 1 for k in ks):
        raise ValueError(f"--k {args.k!r}: a list of integers >= 1")
    task = task_of(args, km.tokenizer)
    res = evaluate_task(km.net, km.tokenizer, task, n=args.n, samples=args.samples, ks=ks,
                        temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    g = res["pass@1 greedy"]
    print(f"{task.name}, {args.n} held-out problems: greedy pass@1 {g['success']:.3f} "
          f"(format {g['format']:.3f}, mean reward {g['reward']:.3f})")
    for k in ks:
        if f"pass@{k}" in res:
            print(f"  {args.samples} samples at temperature {args.temperature}: pass@{k} "
                  f"{res[f'pass@{k}']:.3f}  maj@{k} {res[f'maj@{k}']:.3f}")
    return 0
