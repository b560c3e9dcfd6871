"""Test-time compute, measured: strategies x budgets on a held-out split, and the choice of the
best strategy for a compute budget and a problem's difficulty.

``sweep`` runs every (strategy, N) on the same held-out problems and records, per problem,
whether the chosen answer is right (the task's exact reward) and what it cost (policy and
scorer tokens and FLOPs, ``keenlm.infer.search.Compute``). Each problem also gets a difficulty
estimate from the policy itself: its pass rate over ``difficulty_samples`` samples, binned
(Snell et al. 2024 bin by the model's own pass rate; no gold difficulty label is used to
choose). ``curves`` gives accuracy against mean FLOPs per problem for each strategy, overall
and per bin; ``choose`` picks, for a FLOP budget and a bin, the (strategy, N) whose measured
accuracy is highest within the budget: compute-optimal test-time scaling as a lookup in
measured curves. ``save_results`` writes a sweep as results.json, a Markdown table
(``results_table``) and an accuracy-vs-FLOPs chart (what ``keenlm solve --out`` leaves).

For N, the strategies' budgets are: majority / weighted majority / best-of-N: N samples;
beam search: N candidates per step, width N // expand with expand = min(expand, N); DVTS: N
candidates per step in N // expand subtrees; budget forcing: N x 16 thinking tokens at least.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Callable, Optional, Sequence

from keenlm.infer.search import STRATEGIES, Budget, Policy
from keenlm.plot import line_chart
from keenlm.runs import atomic_write_text

BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.01)  # policy pass-rate bin edges: bin 0 is hardest


def budget_for(strategy: str, n: int, base: Budget) -> Budget:
    """The Budget of ``strategy`` at size ``n`` (see the module docstring)."""
    if strategy in ("beam", "dvts"):  # N candidates per step: width (or subtrees) x expand
        expand = min(base.expand, n)
        return dataclasses.replace(base, n=n, expand=expand, width=max(1, n // expand))
    if strategy == "budget_forcing":
        return dataclasses.replace(base, min_think=16 * n, max_think=0)
    return dataclasses.replace(base, n=n)


def difficulty_bins(policy: Policy, task, problems, samples: int, base: Budget) -> list[int]:
    """Each problem's bin of the policy's own pass rate over ``samples`` samples (0: hardest)."""
    out = []
    for k, p in enumerate(problems):
        comps = policy.sample([p.prompt], samples, max_new_tokens=base.max_new_tokens,
                              temperature=base.temperature, seed=base.seed + 104729 * (k + 1))[0]
        rate = sum(r == 1.0 for r in task.reward([p.prompt] * samples, comps)) / samples
        out.append(next(i for i in range(len(BINS) - 1) if rate < BINS[i + 1]))
    return out


def sweep(policy: Policy, scorer: Optional[Callable], task, strategies: Sequence[str],
          ns: Sequence[int], n_problems: int = 50, base: Budget = Budget(),
          difficulty_samples: int = 8, bins: Optional[list[int]] = None, log=None) -> dict:
    """Per-problem outcomes of every (strategy, N) on the first ``n_problems`` test problems.
    ``bins``: the problems' difficulty bins from an earlier sweep of the same policy (else
    measured here)."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"strategies {unknown}: choose from {', '.join(STRATEGIES)}")
    lacking = [s for s in strategies if s in ("best_of_n", "dvts")] if scorer is None else []
    if lacking:
        raise ValueError(f"strategies {lacking} need a scorer (a verifier or a reward model)")
    problems = task.problems("test", n_problems)
    if bins is None:
        bins = difficulty_bins(policy, task, problems, difficulty_samples, base)
    elif len(bins) != len(problems):
        raise ValueError(f"{len(bins)} difficulty bins for {len(problems)} problems")
    rows = []
    for name in strategies:
        for n in ns:
            budget = budget_for(name, n, base)
            for k, p in enumerate(problems):
                b = dataclasses.replace(budget, seed=base.seed + 7 * k)
                res = STRATEGIES[name](policy, scorer if name != "majority" else None, p.prompt, b,
                                       key=task.answer_key)
                right = task.reward([p.prompt], [res.completion])[0] == 1.0
                rows.append({"strategy": name, "n": n, "problem": k, "bin": bins[k], "right": right,
                             **dataclasses.asdict(res.compute)})
            if log:
                acc = statistics.mean(r["right"] for r in rows[-len(problems):])
                log(f"{name} N={n}: accuracy {acc:.3f}")
    return {"task": task.name, "problems": n_problems, "bins": bins, "rows": rows,
            "strategies": list(strategies), "ns": list(ns)}


def curves(result: dict, bin: Optional[int] = None) -> dict[str, list[dict]]:
    """Per strategy, one point per N: accuracy and mean policy + scorer FLOPs per problem
    (only the problems of ``bin`` when given)."""
    out: dict[str, list[dict]] = {}
    for name in result["strategies"]:
        for n in result["ns"]:
            rs = [r for r in result["rows"] if r["strategy"] == name and r["n"] == n
                  and (bin is None or r["bin"] == bin)]
            if not rs:
                continue
            out.setdefault(name, []).append({
                "n": n, "accuracy": statistics.mean(r["right"] for r in rs), "problems": len(rs),
                "flops": statistics.mean(r["policy_flops"] + r["scorer_flops"] for r in rs),
                "policy_tokens": statistics.mean(r["policy_tokens"] for r in rs)})
    return out


def choose(result: dict, flops_budget: float, bin: Optional[int] = None) -> Optional[dict]:
    """The (strategy, N) with the best measured accuracy whose mean FLOPs per problem fit the
    budget (ties: the cheaper); None when nothing fits."""
    best = None
    for name, points in curves(result, bin).items():
        for pt in points:
            if pt["flops"] <= flops_budget and (best is None or (pt["accuracy"], -pt["flops"]) >
                                                (best["accuracy"], -best["flops"])):
                best = {"strategy": name, **pt}
    return best


def results_table(result: dict) -> str:
    """The sweep as a Markdown table: one row per (strategy, N), mean cost per problem."""
    lines = ["| strategy | N | accuracy | policy tokens / problem | FLOPs / problem |",
             "|---|---|---|---|---|"]
    for name, points in curves(result).items():
        for pt in points:
            lines.append(f"| {name} | {pt['n']} | {pt['accuracy']:.3f} | {pt['policy_tokens']:.0f} | "
                         f"{pt['flops']:.3g} |")
    return "\n".join(lines)


def save_results(result: dict, out, title: str) -> Path:
    """Write a sweep into folder ``out``: results.json (every row), results.md (``title`` above
    ``results_table``) and accuracy_vs_flops.svg (one line per strategy, FLOPs on a log scale)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(result) + "\n")
    atomic_write_text(out / "results.md", f"{title}\n\n{results_table(result)}\n")
    line_chart({k: [(p["flops"], p["accuracy"]) for p in v] for k, v in curves(result).items()},
               out / "accuracy_vs_flops.svg", x_label="FLOPs per problem (log scale)",
               y_label="held-out accuracy", y_range=(0.0, 1.0), log_x=True)
    return out
