"""``keenlm study exchange``: the exchange rate between parameters and test-time compute.

Policies of several sizes are trained on the same demonstrations with the same recipe (the
warm-up of keenlm.studies.rl). Then, for each one:

1. **calibration** (``keenlm.infer.plan.calibrate``): greedy and ``calib_samples`` sampled
   answers to ``calib_n`` problems of the task's validation split;
2. **measurement** on ``eval_n`` held-out test problems: the greedy answer and ``max_n``
   sampled answers per problem. Majority@N is the vote of the first N samples
   (``keenlm.data.tasks.majority``), best-of-N by the exact verifier is "one of the first N is
   right" (an upper bound for any reward model), each at N = 1, 2, 4, ... ``max_n``.

Every (policy, strategy, N) is a point of accuracy against FLOPs per query: inference only, and
total, with the policy's training FLOPs spread over ``queries`` queries. The crossover table
gives, for a ladder of budgets per query, the measured best choice: where it moves to a larger
policy, parameters became the better buy.

The planner is then checked: from the calibration runs alone (``keenlm.infer.plan.plan``) it
picks a (policy, strategy, N) for three budgets; its pick's *measured* accuracy is compared
with the measured best within the same budget (target: within 2 points).

Everything finished is kept in the output folder (warm-ups, calibrations, measurements), so a
stopped study continues where it stopped.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import keenlm
from keenlm.data.tasks import get_task, majority, write_demonstrations
from keenlm.infer.plan import (STRATEGIES, Calibration, Predictor, answer_samples, calibrate,
                               plan, sample_cost)
from keenlm.plot import line_chart
from keenlm.runs import atomic_write_text
from keenlm.studies.common import Log, parse_size, write_results
from keenlm.studies.rl import N_DEMOS, warmup_config


@dataclass(frozen=True)
class Options:
    """policies of several sizes x test-time strategies: accuracy against FLOPs, and the
    planner's choice checked"""

    task: Literal["addition", "multiplication", "countdown"] = "countdown"  # the verifiable task
    difficulty: int = 2  # digits per operand / numbers on offer
    sizes: tuple[str, ...] = ("64x2", "128x2", "256x2")  # the policies, d_model x layers
    sft_steps: int = 1500  # supervised warm-up steps of each policy
    calib_n: int = 100  # validation problems the planner calibrates on
    calib_samples: int = 16  # sampled answers per calibration problem
    eval_n: int = 200  # held-out test problems measured
    max_n: int = 64  # sampled answers per test problem (strategies use the first N)
    queries: float = 10000.0  # training FLOPs are spread over this many queries
    temperature: float = 0.8  # sampling temperature
    max_new_tokens: int = 48  # answer length limit


def run(out, o: Options) -> dict:
    return exchange(out, o)


def summary(res: dict) -> str:
    lines = [f"{c['budget']:.3g} FLOPs/query: planner {c['planned']['policy']} "
             f"{c['planned']['strategy']} N={c['planned']['n']} measured "
             f"{c['planned_measured']:.3f}, best {c['best']['policy']} {c['best']['strategy']} "
             f"N={c['best']['n']} {c['best']['accuracy']:.3f} "
             f"({'PASS' if c['within_2_points'] else 'MISS'})" for c in res["planner_check"]]
    return "\n".join(lines)


def exchange(out, o: Options, log: Log = print) -> dict:
    out = Path(out)
    for s in o.sizes:
        parse_size(s)
    if o.max_n < 2 or o.eval_n < 1:
        raise ValueError("max_n >= 2 and eval_n >= 1")
    task = get_task(o.task, o.difficulty)
    demos = write_demonstrations(task, out / "demonstrations.jsonl", N_DEMOS)
    ns = [2 ** i for i in range(int(math.log2(o.max_n)) + 1)]
    policies, cals, measured = {}, [], {}
    for size in o.sizes:
        res = keenlm.train(warmup_config(size, demos, o.sft_steps, out / size, 512,
                                         checkpoint={"resume": True}))
        km = keenlm.load(out / size)
        params = sum(p.numel() for p in km.net.parameters())
        policies[size] = {"params": params, "train_flops": res.ledger["flops_total"]}
        cals.append(_cached(out / f"calibration-{size}.json", lambda: calibrate(
            size, km.net, km.tokenizer, task, o.calib_n, o.calib_samples, o.temperature,
            o.max_new_tokens).to_dict(), Calibration))
        measured[size] = _cached(out / f"measured-{size}.json",
                                 lambda: _measure(
            km, task, task.problems("test", o.eval_n), o.max_n, o.temperature,
            o.max_new_tokens), None)
        log(f"{size}: {params:,} params, greedy {measured[size]['greedy']:.3f} on test")
    points = _points(measured, policies, ns, o.queries)
    preds = [Predictor(cal) for cal in cals]  # fitted once, for every budget and the table
    check = _check_planner(preds, points, ns)
    res = {"task": task.name, "options": {k: getattr(o, k) for k in o.__dataclass_fields__},
           "policies": policies, "points": points, "crossover": _crossover(points),
           "planner_check": check,
           "predicted_vs_measured": _predicted_vs_measured(preds, points, ns, o.eval_n)}
    write_results(out, res, _table(res))
    _charts(points, out)
    return res


def _cached(path: Path, make, kind):
    if not path.exists():
        value = make()
        atomic_write_text(path, json.dumps(value) + "\n")
    value = json.loads(path.read_text())
    return kind(**value) if kind else value


def _measure(km, task, problems: list, max_n: int, temperature: float,
             max_new_tokens: int) -> dict:
    """Greedy and ``max_n`` sampled answers to each of ``problems`` (``plan.answer_samples``),
    the vote keys written as text."""
    got = answer_samples(km.net, km.tokenizer, task, problems, max_n, temperature,
                         max_new_tokens, seed=12345)
    got["keys"] = [[None if k is None else repr(k) for k in keys] for keys in got["keys"]]
    got["greedy"] = sum(got["greedy_right"]) / len(got["greedy_right"])
    return got


def _points(measured: dict, policies: dict, ns, queries: float) -> list[dict]:
    """Every (policy, strategy, N): measured accuracy, inference and total FLOPs per query."""
    out = []
    for size, m in measured.items():
        amortized = policies[size]["train_flops"] / queries
        k = len(m["right"])
        acc = {"greedy": {1: m["greedy"]}}
        acc["majority"] = {n: sum(_vote(m["keys"][i][:n], m["right"][i][:n]) for i in range(k)) / k
                           for n in ns}
        acc["best_of_n_verifier"] = {n: sum(any(m["right"][i][:n]) for i in range(k)) / k
                                     for n in ns}
        for strategy, by_n in acc.items():
            for n, a in by_n.items():
                inf = sample_cost(m["flops_greedy"], m["flops_prefill"], m["flops_decode"],
                                  strategy, n)
                out.append({"policy": size, "params": policies[size]["params"],
                            "strategy": strategy, "n": n, "accuracy": a, "flops": inf,
                            "total_flops": inf + amortized})
    return out


def _vote(keys: list, right: list) -> bool:
    i = majority(keys)
    return i is not None and right[i]


def _best(points, budget: float, key: str = "flops") -> dict | None:
    fits = [p for p in points if p[key] <= budget]
    return max(fits, key=lambda p: (p["accuracy"], -p[key]), default=None)


def _check_planner(preds: list[Predictor], points: list[dict], ns) -> list[dict]:
    """Nine budgets spread evenly (in log) across the measured range of inference FLOPs per
    query, 10% to 90%: the planner's pick (from calibration alone) against the measured best
    within the budget."""
    costs = sorted(p["flops"] for p in points)
    lo, hi = math.log(costs[0]), math.log(costs[-1])
    out = []
    for frac in [i / 10 for i in range(1, 10)]:
        budget = math.exp(lo + frac * (hi - lo))
        pick = plan(preds, budget, ns=ns)["chosen"]
        best = _best(points, budget)
        if pick is None or best is None:
            out.append({"budget": budget, "planned": pick, "best": best, "within_2_points": False,
                        "planned_measured": float("nan")})
            continue
        got = next(p for p in points if (p["policy"], p["strategy"], p["n"]) ==
                   (pick["policy"], pick["strategy"], pick["n"]))
        out.append({"budget": budget, "planned": pick, "planned_measured": got["accuracy"],
                    "best": best, "within_2_points": got["accuracy"] >= best["accuracy"] - 0.02})
    return out


def _predicted_vs_measured(preds: list[Predictor], points: list[dict], ns,
                           test_n: int) -> list[dict]:
    """Each prediction beside its measurement; the interval is that of an accuracy measured
    on ``test_n`` problems (calibration resampling and test sampling noise together)."""
    rows = []
    for pred in preds:
        cal = pred.cal
        for s in STRATEGIES:
            for n in ((1,) if s == "greedy" else ns):
                p = pred.predict(s, n, test_n=test_n)
                m = next(x for x in points if (x["policy"], x["strategy"], x["n"]) ==
                         (cal.name, s, p["n"]))
                rows.append({**p, "measured": m["accuracy"],
                             "inside": p["low"] <= m["accuracy"] <= p["high"]})
    return rows


def _crossover(points: list[dict]) -> dict:
    """The measured best (policy, strategy, N) for a ladder of total FLOPs per query: with the
    exact verifier among the strategies, and without one (greedy and majority only)."""
    costs = sorted(p["total_flops"] for p in points)
    ladder = [costs[0] * (costs[-1] / costs[0]) ** (i / 8) for i in range(9)]
    plain = [p for p in points if p["strategy"] != "best_of_n_verifier"]
    return {kind: [{"budget": b, **(_best(pts, b, "total_flops") or {})} for b in ladder]
            for kind, pts in (("with_verifier", points), ("without_verifier", plain))}


def _table(r: dict) -> str:
    o = r["options"]
    lines = [f"Task {r['task']}; policies " + ", ".join(
        f"{s} ({p['params']:,} params, trained with {p['train_flops']:.3g} FLOPs)"
        for s, p in r["policies"].items()) + f"; {o['eval_n']} held-out problems, "
        f"{o['max_n']} samples each at temperature {o['temperature']}; training FLOPs spread "
        f"over {o['queries']:.0f} queries.", "",
        "| policy | strategy | N | accuracy | inference FLOPs / query | total FLOPs / query |",
        "|---|---|---|---|---|---|"]
    for p in r["points"]:
        lines.append(f"| {p['policy']} | {p['strategy']} | {p['n']} | {p['accuracy']:.3f} | "
                     f"{p['flops']:.3g} | {p['total_flops']:.3g} |")
    lines += ["", "Measured best within a budget of total FLOPs per query (the crossover), with "
              "the exact verifier among the strategies and without it:", "",
              "| budget | with verifier | accuracy | without (greedy, majority) | accuracy |",
              "|---|---|---|---|---|"]
    for a, b in zip(r["crossover"]["with_verifier"], r["crossover"]["without_verifier"]):
        if "policy" in a:
            lines.append(f"| {a['budget']:.3g} | {a['policy']} {a['strategy']} N={a['n']} | "
                         f"{a['accuracy']:.3f} | " + (f"{b['policy']} {b['strategy']} N={b['n']} | "
                                                      f"{b['accuracy']:.3f} |" if "policy" in b
                                                      else "- | - |"))
    lines += ["", "The planner (calibration on validation problems only) against the measured "
              "best, inference FLOPs per query:", "",
              "| budget | planned | predicted [90%] | measured | measured best | best accuracy | "
              "within 2 points |", "|---|---|---|---|---|---|---|"]
    for c in r["planner_check"]:
        p, b = c["planned"], c["best"]
        if p is None or b is None:
            lines.append(f"| {c['budget']:.3g} | - | - | - | - | - | no |")
            continue
        lines.append(f"| {c['budget']:.3g} | {p['policy']} {p['strategy']} N={p['n']} | "
                     f"{p['accuracy']:.3f} [{p['low']:.3f}, {p['high']:.3f}] | "
                     f"{c['planned_measured']:.3f} | {b['policy']} {b['strategy']} N={b['n']} | "
                     f"{b['accuracy']:.3f} | {'yes' if c['within_2_points'] else 'no'} |")
    inside = [x["inside"] for x in r["predicted_vs_measured"]]
    err = [abs(x["accuracy"] - x["measured"]) for x in r["predicted_vs_measured"]]
    lines += ["", f"Predictions against measurements: {sum(inside)} of {len(inside)} measured "
              f"accuracies inside the 90% interval (calibration resampling and the noise of "
              f"{o['eval_n']} test problems); mean absolute error "
              f"{100 * sum(err) / len(err):.1f} points."]
    return "\n".join(lines)


def _charts(points: list[dict], out: Path) -> None:
    for key, label in (("flops", "inference"), ("total_flops", "total")):
        series = {}
        for p in points:
            series.setdefault(f"{p['policy']} {p['strategy']}", []).append((p[key], p["accuracy"]))
        line_chart(series, out / f"accuracy_vs_{label}_flops.svg",
                   x_label=f"{label} FLOPs per query (log scale)", y_label="held-out accuracy",
                   y_range=(0.0, 1.0), log_x=True)
