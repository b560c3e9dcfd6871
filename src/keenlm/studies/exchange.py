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
picks a (policy, strategy, N) for nine budgets (10% to 90% of the measured range, log scale);
its pick's *measured* accuracy is compared with the measured best within the same budget
(target: within 2 points).

Per difficulty bin (``keenlm.data.tasks.difficulty_bin``: carries, multiplicative steps --
known before a problem is answered; adjacent bins merged until each holds ``min_bin`` test
problems) the same measurements give each bin's points, crossover and planner check, the
planner calibrated on the validation problems of that bin alone. Snell et al. (2024) found the
exchange rate depends on difficulty: test-time compute pays on easier problems, parameters on
the hardest; the bins test that here.

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
from keenlm.data.tasks import (bin_measure, difficulty_bin, get_task, majority,
                               write_demonstrations)
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
    min_bin: int = 40  # test problems per difficulty bin at least (adjacent bins merged)


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
    bins = _by_bin(task, o, measured, policies, cals, ns)
    res = {"task": task.name, "options": {k: getattr(o, k) for k in o.__dataclass_fields__},
           "policies": policies, "points": points, "crossover": _crossover(points),
           "planner_check": check,
           "predicted_vs_measured": _predicted_vs_measured(preds, points, ns, o.eval_n),
           "bin_measure": bin_measure(task.problems("test", 1)[0]), "bins": bins}
    write_results(out, res, _table(res) + "\n\n" + _bins_table(res))
    _charts(points, out)
    for kind, rows in bins.items():
        for b in rows:
            _charts(b["points"], out, f"_{kind}_bin{_label(*b['range'])}",
                    kinds=(("total_flops", "total"),))
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


def _charts(points: list[dict], out: Path, suffix: str = "",
            kinds=(("flops", "inference"), ("total_flops", "total"))) -> None:
    for key, label in kinds:
        series = {}
        for p in points:
            series.setdefault(f"{p['policy']} {p['strategy']}", []).append((p[key], p["accuracy"]))
        line_chart(series, out / f"accuracy_vs_{label}_flops{suffix}.svg",
                   x_label=f"{label} FLOPs per query (log scale)", y_label="held-out accuracy",
                   y_range=(0.0, 1.0), log_x=True)


# --------------------------------------------------------------------------------- by difficulty


def merge_bins(values: list[int], min_size: int) -> list[tuple[int, int]]:
    """Ranges (lo, hi) of bin values, adjacent values merged from the easiest up until each
    range holds ``min_size`` problems (a short last range joins the one before it)."""
    counts = {v: values.count(v) for v in sorted(set(values))}
    ranges, lo, n = [], None, 0
    for v, c in counts.items():
        lo, n = (v if lo is None else lo), n + c
        if n >= min_size:
            ranges.append((lo, v))
            lo, n = None, 0
    if lo is not None:  # the hardest problems, too few on their own
        last = max(counts)
        ranges[-1:] = [(ranges[-1][0], last)] if ranges else [(lo, last)]
    return ranges


def _label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


# pooled success of the held-back samples -> bin value (0: the easiest), and each bin's range
POOLED = ((0.5, 1.0), (0.2, 0.5), (0.05, 0.2), (0.0, 0.05), (0.0, 0.0))


def _pooled_bins(measured: dict, half: int) -> list[int]:
    """Each test problem's difficulty for these policies (Snell et al.'s oracle bins): the
    share of right answers among every policy's samples from ``half`` on, which the binned
    strategies never use (they take the first ``half``)."""
    ms = list(measured.values())
    out = []
    for i in range(len(ms[0]["right"])):
        held = [r for m in ms for r in m["right"][i][half:]]
        p = sum(held) / len(held)
        out.append(len(POOLED) - 1 if p == 0 else
                   next(v for v, (low, _) in enumerate(POOLED) if p >= low))
    return out


def _pooled_label(lo: int, hi: int) -> str:
    """A merged range of pooled-success bins as an interval of the share, e.g. "[0.2, 1]"."""
    a, b = POOLED[hi][0], POOLED[lo][1]
    if hi == len(POOLED) - 1:
        return "0" if lo == hi else f"[0, {b:g})"
    return f"{'(' if a == 0 else '['}{a:g}, {b:g}{']' if b == 1 else ')'}"


def _by_bin(task, o: Options, measured: dict, policies: dict, cals: list, ns) -> dict:
    """Each difficulty bin's measured points and crossover: by the task's bins (with the planner
    checked, calibrated on the validation problems of the same bin), and by the policies'
    pooled success (``_pooled_bins``; strategies measured on the other half of the samples)."""
    half = o.max_n // 2
    test = [difficulty_bin(p) for p in task.problems("test", o.eval_n)]
    val = [difficulty_bin(p) for p in task.problems("val", o.calib_n)]
    return {"task": _bin_rows(test, val, o, measured, policies, cals, ns, o.max_n, _label),
            "pooled": _bin_rows(_pooled_bins(measured, half), None, o, measured, policies,
                                cals, [n for n in ns if n <= half], half, _pooled_label)}


def _bin_rows(test: list, val: list | None, o: Options, measured: dict, policies: dict,
              cals: list, ns, samples: int, label) -> list[dict]:
    out = []
    for lo, hi in merge_bins(test, o.min_bin):
        idx = [i for i, b in enumerate(test) if lo <= b <= hi]
        sub = {size: {**m, "right": [m["right"][i][:samples] for i in idx],
                      "keys": [m["keys"][i][:samples] for i in idx],
                      "greedy_right": [m["greedy_right"][i] for i in idx],
                      "greedy": sum(m["greedy_right"][i] for i in idx) / len(idx)}
               for size, m in measured.items()}
        points = _points(sub, policies, ns, o.queries)
        vidx = [i for i, b in enumerate(val or []) if lo <= b <= hi]
        check = (_check_planner([Predictor(c.subset(vidx)) for c in cals], points, ns)
                 if len(vidx) >= 2 else [])
        out.append({"label": label(lo, hi), "range": [lo, hi], "test_n": len(idx),
                    "calib_n": len(vidx), "points": points, "crossover": _crossover(points),
                    "planner_check": check})
    return out


def _bins_table(r: dict) -> str:
    return "\n\n".join([
        _bin_section(r["bins"]["task"], f"By the task's difficulty bins ({r['bin_measure']}, "
                     f"known before answering; bins merged to hold at least "
                     f"{r['options']['min_bin']} test problems)", r["policies"]),
        _bin_section(r["bins"]["pooled"], "By the policies' pooled success on held-back samples "
                     f"(Snell et al.'s oracle difficulty: the share of right answers among all "
                     f"policies' samples {r['options']['max_n'] // 2 + 1}-{r['options']['max_n']}; "
                     f"the strategies use samples 1-{r['options']['max_n'] // 2}). A bin is a "
                     f"range of that share; it is known only after sampling, so the planner is "
                     f"not checked on it", r["policies"])])


def _bin_section(bins: list[dict], title: str, policies: dict) -> str:
    """Per bin: each policy's greedy, majority and best-of-N at the largest N; the measured best
    along the bin's ladder of total FLOPs per query; the planner's record in the bin."""
    n = max(p["n"] for p in bins[0]["points"])
    lines = [title + ":", "",
             f"| bin | test problems | policy | greedy | majority@{n} | best-of-{n} (verifier) |",
             "|---|---|---|---|---|---|"]
    for b in bins:
        acc = {(p["policy"], p["strategy"], p["n"]): p["accuracy"] for p in b["points"]}
        for size in policies:
            lines.append(f"| {b['label']} | {b['test_n']} | {size} | "
                         f"{acc[(size, 'greedy', 1)]:.3f} | {acc[(size, 'majority', n)]:.3f} | "
                         f"{acc[(size, 'best_of_n_verifier', n)]:.3f} |")
    lines += ["", "The measured best in each bin within a budget of total FLOPs per query (the "
              "bin's ladder; a row is left out where neither choice changes):", "",
              "| bin | budget | with verifier | accuracy | without | accuracy |",
              "|---|---|---|---|---|---|"]
    for b in bins:
        seen = None
        for a, c in zip(b["crossover"]["with_verifier"], b["crossover"]["without_verifier"]):
            if (_choice(a), _choice(c)) == seen:
                continue
            seen = (_choice(a), _choice(c))
            lines.append(f"| {b['label']} | {a['budget']:.3g} | " + " | ".join(
                f"{x['policy']} {x['strategy']} N={x['n']} | {x['accuracy']:.3f}"
                if "policy" in x else "- | -" for x in (a, c)) + " |")
    checked = [b for b in bins if b["planner_check"]]
    if checked:
        lines.append("")
    for b in checked:
        ok = sum(c["within_2_points"] for c in b["planner_check"])
        lines.append(f"- bin {b['label']}: the planner, calibrated on the bin's {b['calib_n']} "
                     f"validation problems, picked the best or within 2 points at {ok} of "
                     f"{len(b['planner_check'])} budgets")
    return "\n".join(lines)


def _choice(x: dict) -> tuple:
    return (x.get("policy"), x.get("strategy"), x.get("n"))
