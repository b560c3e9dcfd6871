"""``keenlm solve POLICY``: held-out problems answered with test-time strategies; a list of
strategies and budgets N is swept and written as accuracy-vs-FLOPs curves (keenlm.infer.sweep).
``keenlm solve POLICY [POLICY ...] --plan FLOPS``: which policy, strategy and N to use for that
budget per query, predicted from a calibration run of each policy (keenlm.infer.plan)."""
from __future__ import annotations

import keenlm
from keenlm.cli.options import add_task_options, int_list, task_of
from keenlm.infer.plan import calibrate, plan
from keenlm.infer.reward import load_reward_model, ranking_auc
from keenlm.infer.search import Budget, Policy, verifier
from keenlm.infer.sweep import results_table, save_results, sweep


def add_parser(sub, fmt):
    so = sub.add_parser("solve", help="answer held-out problems with a test-time strategy; a list "
                        "of strategies and N sweeps them and writes accuracy-vs-FLOPs curves",
                        formatter_class=fmt)
    so.add_argument("model", nargs="+", help="the policy: run folder, .gguf file or HF folder "
                    "(with --plan: one or more candidate policies)")
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
    so.add_argument("--plan", type=float, default=0.0, help="a FLOP budget per query: calibrate "
                    "each policy on --problems validation problems (--samples answers each) and "
                    "print the predicted best policy, strategy and N within it")
    so.add_argument("--samples", type=int, default=16, help="--plan: sampled answers per "
                    "calibration problem")
    return so


def run(args) -> int:
    if args.problems < 1:
        raise ValueError(f"--problems {args.problems}: an integer >= 1")
    if args.plan:
        return _plan(args)
    if len(args.model) > 1:
        raise ValueError("several policies are compared only with --plan FLOPS")
    km = keenlm.load(args.model[0], device=args.device)
    task = task_of(args, km.tokenizer)
    base = Budget(expand=args.expand, max_steps=args.max_steps, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, step=args.step.replace("\\n", "\n").replace("\\t", "\t"),
                  seed=args.seed)
    strategies = [s for s in args.strategy.split(",") if s]
    ns = int_list(args.n, "--n")
    policy, scorer = Policy(km.net, km.tokenizer), _scorer(args.scorer, task, args.device)
    if args.scorer and args.scorer != "verifier":
        _check_ranking(scorer, policy, task, args)
    res = sweep(policy, scorer, task, strategies, ns, n_problems=args.problems, base=base,
                log=print if len(strategies) * len(ns) > 1 else None)
    print(results_table(res))
    if args.out:
        save_results(res, args.out, f"{task.name}, {args.problems} held-out problems, "
                     f"scorer {args.scorer or 'none'}")
        print(f"results in {args.out}")
    return 0


def _check_ranking(scorer, policy, task, args) -> None:
    """A reward model that ranks right answers below wrong ones does harm: say so first."""
    auc = ranking_auc(scorer, policy, task, problems=min(20, args.problems),
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    if auc["auc"] is None:
        print(f"reward model: cannot rate its ranking ({auc['right']} right, {auc['wrong']} wrong "
              "samples on 20 problems)")
    elif auc["auc"] < 0.5:
        print(f"warning: the reward model ranks this policy's answers below chance (ROC AUC "
              f"{auc['auc']:.3f}: right answers score lower than wrong ones); strategies that "
              "follow its scores will do worse than plain majority voting")
    else:
        print(f"reward model: ROC AUC {auc['auc']:.3f} on this policy's answers (0.5: chance)")


def _plan(args) -> int:
    """Calibrate each policy, then the planner's choice within ``--plan`` FLOPs per query."""
    if args.plan <= 0:
        raise ValueError(f"--plan {args.plan}: a positive FLOP budget per query")
    ns = int_list(args.n, "--n") if args.n != "8" else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    cals = []
    for path in args.model:
        km = keenlm.load(path, device=args.device)
        cals.append(calibrate(path, km.net, km.tokenizer, task_of(args, km.tokenizer),
                              args.problems, args.samples, args.temperature, args.max_new_tokens,
                              args.seed))
        print(f"{path}: greedy {sum(cals[-1].greedy) / len(cals[-1].greedy):.3f} on "
              f"{args.problems} validation problems; FLOPs per query: {cals[-1].flops_greedy:.3g} "
              f"greedy, {cals[-1].flops_prefill:.3g} prefill + {cals[-1].flops_decode:.3g} per "
              "sample")
    res = plan(cals, args.plan, ns=ns)
    c = res["chosen"]
    if c is None:
        print(f"nothing fits {args.plan:.3g} FLOPs per query: the cheapest greedy answer costs "
              f"{min(x.flops_greedy for x in cals):.3g}")
        return 1
    print(f"within {args.plan:.3g} FLOPs per query: {c['policy']}, {c['strategy']} N={c['n']}: "
          f"predicted accuracy {c['accuracy']:.3f} [{c['low']:.3f}, {c['high']:.3f}] (90%) at "
          f"{c['flops']:.3g} FLOPs")
    return 0


def _scorer(name: str, task, device: str):
    """None, the task's exact verifier, or a reward model loaded from its folder."""
    if name == "verifier":
        return verifier(task)
    return load_reward_model(name, device=device) if name else None
