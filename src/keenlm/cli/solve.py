"""``keenlm solve POLICY``: held-out problems answered with test-time strategies; a list of
strategies and budgets N is swept and written as accuracy-vs-FLOPs curves (keenlm.infer.sweep)."""
from __future__ import annotations

import keenlm
from keenlm.cli.options import add_task_options, int_list, task_of
from keenlm.infer.reward import load_reward_model
from keenlm.infer.search import Budget, Policy, verifier
from keenlm.infer.sweep import results_table, save_results, sweep


def add_parser(sub, fmt):
    so = sub.add_parser("solve", help="answer held-out problems with a test-time strategy; a list "
                        "of strategies and N sweeps them and writes accuracy-vs-FLOPs curves",
                        formatter_class=fmt)
    so.add_argument("model", help="the policy: run folder, .gguf file or HF folder")
    add_task_options(so)
    so.add_argument("--strategy", default="majority",
                    help="comma list of majority, weighted_majority, best_of_n, beam, dvts, budget_forcing")
    so.add_argument("--n", default="8", help="comma list of budgets N (samples; beam width x expand)")
    so.add_argument("--scorer", default="", help="verifier (the exact reward, an oracle) or a "
                    "reward model folder (keenlm train-reward)")
    so.add_argument("--problems", type=int, default=50, help="held-out problems")
    so.add_argument("--expand", type=int, default=4, help="beam search, dvts: next steps per partial solution")
    so.add_argument("--max-steps", type=int, default=16, help="beam search, dvts: reasoning steps")
    so.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    so.add_argument("--step", default="\\n", help="step delimiter (escapes such as \\n allowed)")
    so.add_argument("--device", default="cpu", help="cpu | cuda | mps")
    so.add_argument("--out", default="", help="folder for results.json, results.md, accuracy_vs_flops.svg")
    return so


def run(args) -> int:
    if args.problems < 1:
        raise ValueError(f"--problems {args.problems}: an integer >= 1")
    km = keenlm.load(args.model, device=args.device)
    task = task_of(args, km.tokenizer)
    base = Budget(expand=args.expand, max_steps=args.max_steps, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, step=args.step.replace("\\n", "\n").replace("\\t", "\t"),
                  seed=args.seed)
    strategies = [s for s in args.strategy.split(",") if s]
    ns = int_list(args.n, "--n")
    res = sweep(Policy(km.net, km.tokenizer), _scorer(args.scorer, task, args.device), task,
                strategies, ns, n_problems=args.problems, base=base,
                log=print if len(strategies) * len(ns) > 1 else None)
    print(results_table(res))
    if args.out:
        save_results(res, args.out, f"{task.name}, {args.problems} held-out problems, "
                     f"scorer {args.scorer or 'none'}")
        print(f"results in {args.out}")
    return 0


def _scorer(name: str, task, device: str):
    """None, the task's exact verifier, or a reward model loaded from its folder."""
    if name == "verifier":
        return verifier(task)
    return load_reward_model(name, device=device) if name else None
