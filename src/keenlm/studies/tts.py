"""``keenlm study tts``: can a small policy with more test-time compute beat a >= 10x larger
one answering greedily?

1. Both policies are trained on the same demonstrations with the same recipe (size-preset
   learning rates, same steps, batch and sequence length); each one's greedy accuracy on the
   held-out split is measured.
2. The small policy gets an outcome and a process reward model trained on its own rollouts
   (``keenlm.infer.reward``), and every strategy at every N runs on the held-out split
   (``keenlm.infer.sweep``): majority vote, weighted majority and best-of-N by the ORM, beam
   search and DVTS by the PRM, and best-of-N by the task's exact verifier as an upper bound
   (reported, never counted as the small policy's best: it needs the task's checker).
3. Reported: both accuracies, the parameter ratio, total FLOPs of each side (training, reward
   models and their labelling, inference on the held-out problems), accuracy vs FLOPs per
   problem for every strategy, and the winning strategy per difficulty bin (the policy's own
   pass rate). With ``sweep_large`` the large policy gets the same reward models and sweep,
   to test the finding that search wins for small policies and best-of-N for large ones.

Every phase keeps its result in the output folder (finished warm-ups, reward models, one JSON
per sweep), so a stopped study continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import keenlm
from keenlm.data.tasks import get_task, write_demonstrations
from keenlm.infer.reward import load_reward_model, ranking_auc, train_reward
from keenlm.infer.search import Budget, Policy, verifier
from keenlm.infer.sweep import BINS, curves, sweep
from keenlm.plot import line_chart
from keenlm.runs import atomic_write_text
from keenlm.studies.common import Log, parse_size, write_results
from keenlm.studies.rl import warmup_config

LEARNED = ("majority", "weighted_majority", "best_of_n", "beam", "dvts")
RANKED_BY = {"weighted_majority": "orm", "best_of_n": "orm", "beam": "prm", "dvts": "prm"}
ORACLE = "best_of_n_verifier"
SEARCH = ("beam", "dvts")


@dataclass(frozen=True)
class Options:
    """a small policy with test-time search vs a larger one answering greedily"""

    task: Literal["addition", "multiplication", "countdown"] = "countdown"  # the verifiable task
    difficulty: int = 2  # digits per operand / numbers on offer
    scratchpad: bool = False  # answers worked step by step (arithmetic, countdown)
    small: str = "64x4"  # the small policy, d_model x layers (64x4: 230k parameters, 30% greedy on 2-number Countdown after 3000 steps)
    large: str = "256x3"  # the large policy (256x3: 2.48M, 10.8x)
    sft_steps: int = 3000  # supervised warm-up steps of each policy
    ns: tuple[int, ...] = (1, 4, 16, 64)  # budgets N of every strategy
    eval_n: int = 200  # held-out problems
    sweep_large: bool = False  # reward models and the strategy sweep for the large policy too


def run(out, opts: Options) -> dict:
    return tts(out, task=opts.task, difficulty=opts.difficulty, scratchpad=opts.scratchpad,
               small=opts.small, large=opts.large, sft_steps=opts.sft_steps, ns=opts.ns,
               eval_n=opts.eval_n, sweep_large=opts.sweep_large)


def summary(res: dict) -> str:
    return (f"small {res['small']['size']} best {res['best']['strategy']} N={res['best']['n']}: "
            f"{res['best']['accuracy']:.3f}; large {res['large']['size']} greedy "
            f"{res['large']['greedy']['accuracy']:.3f}")


def _greedy(km, task, n: int, max_new_tokens: int) -> dict:
    """Greedy accuracy on the first ``n`` test problems and its FLOPs (keenlm.ledger)."""
    pol = Policy(km.net, km.tokenizer)
    problems = task.problems("test", n)
    prompts = [p.prompt for p in problems]
    comps = [c[0] for c in pol.sample(prompts, 1, max_new_tokens=max_new_tokens, temperature=0.0,
                                      seed=0)]
    right = sum(r == 1.0 for r in task.reward(prompts, comps))
    return {"accuracy": right / n, "flops_per_problem": pol.compute.policy_flops / n}


def _warm_up(out: Path, name: str, size: str, demos: Path, steps: int, task, eval_n: int,
             max_new: int) -> dict:
    # resume: a finished warm-up is loaded, not trained again
    res = keenlm.train(warmup_config(size, demos, steps, out / name, 512,
                                     checkpoint={"resume": True}))
    km = keenlm.load(out / name)
    return {"size": size, "params": sum(p.numel() for p in km.net.parameters()),
            "train_flops": res.ledger["flops_total"], "greedy": _greedy(km, task, eval_n, max_new)}


def _reward_model(out: Path, policy_dir: Path, kind: str, task, problems: int, steps: int,
                  max_new: int) -> dict:
    done = out / "reward.json"
    if done.exists():  # written last, inside the folder's atomic rename
        return json.loads(done.read_text())
    return train_reward(policy_dir, kind, task, out, problems=problems, samples=4, rollouts=4,
                        steps=steps, max_new_tokens=max_new, log=None)


def _sweep_policy(out: Path, name: str, task, ns, eval_n: int, rm_problems: int, rm_steps: int,
                  max_new: int, auc_problems: int, log: Log) -> dict:
    """Reward models for policy ``name`` and every strategy x N on the held-out split."""
    prefix = "" if name == "small" else f"{name}-"
    rms = {}
    for kind in ("orm", "prm"):
        rms[kind] = _reward_model(out / f"{prefix}{kind}", out / name, kind, task, rm_problems,
                                  rm_steps, max_new)
        log(f"{name} {kind}: {rms[kind]['examples']} rollouts, "
            f"{100 * rms[kind]['positive_share']:.0f}% positive labels")
    km = keenlm.load(out / name)
    policy = Policy(km.net, km.tokenizer)
    for kind in ("orm", "prm"):  # how well each ranks the policy's answers to held-out problems
        cache = out / f"auc-{name}-{kind}.json"
        if not cache.exists():
            auc = ranking_auc(load_reward_model(out / f"{prefix}{kind}"), policy, task,
                              problems=auc_problems, max_new_tokens=max_new)
            atomic_write_text(cache, json.dumps(auc))
        rms[kind]["held_out"] = json.loads(cache.read_text())
        log(f"{name} {kind}: ROC AUC {rms[kind]['held_out']['auc']} on held-out samples")
    base = Budget(max_new_tokens=max_new, temperature=0.8, expand=4, max_steps=8)
    plan = (("majority", None, ("majority",)), ("orm", "orm", ("weighted_majority", "best_of_n")),
            ("prm", "prm", ("beam", "dvts")), ("verifier", "verifier", ("best_of_n",)))
    rows, bins = [], None
    for label, kind, strategies in plan:
        cache = out / f"sweep-{name}-{label}.json"
        if cache.exists():
            res = json.loads(cache.read_text())
            if res["ns"] != list(ns) or res["problems"] != eval_n:
                raise ValueError(f"{cache} holds a sweep of N {res['ns']} on {res['problems']} "
                                 "problems; use another output folder for other budgets")
        else:
            scorer = (verifier(task) if kind == "verifier" else
                      load_reward_model(out / f"{prefix}{kind}") if kind else None)
            step_base = (dataclasses.replace(base, max_new_tokens=min(40, max_new))
                         if kind == "prm" else base)
            res = sweep(policy, scorer, task, strategies, ns, n_problems=eval_n, base=step_base,
                        bins=bins, log=lambda s: log(f"{name} {s}"))  # bins measured once
            if kind == "verifier":
                for r in res["rows"]:
                    r["strategy"] = ORACLE
            atomic_write_text(cache, json.dumps(res))
        bins = res["bins"]
        for r in res["rows"]:
            r["scorer"] = kind or "-"
        rows += res["rows"]
    return {"task": task.name, "problems": eval_n, "bins": bins, "rows": rows,
            "strategies": [*LEARNED, ORACLE], "ns": list(ns), "reward_models": rms}


def by_difficulty(result: dict) -> dict:
    """Per pass-rate bin: the best learned strategy (over N), each strategy's accuracy at the
    largest N, and search (the better of beam and DVTS) minus best-of-N by the ORM at equal N,
    averaged over N."""
    out = {}
    for b in sorted(set(result["bins"])):
        bp = curves(result, b)
        learned = [(name, p) for name, ps in bp.items() if name in LEARNED for p in ps]
        win = max(learned, key=lambda t: (t[1]["accuracy"], -t[1]["flops"]))
        gaps = [max(bp[s][i]["accuracy"] for s in SEARCH) - bp["best_of_n"][i]["accuracy"]
                for i in range(len(result["ns"]))]
        out[f"{BINS[b]:.1f}-{min(1.0, BINS[b + 1]):.1f}"] = {
            "problems": sum(1 for x in result["bins"] if x == b), "best": win[0],
            "n": win[1]["n"], "accuracy": win[1]["accuracy"],
            "by_strategy_at_max_n": {name: ps[-1]["accuracy"] for name, ps in bp.items()},
            "search_minus_best_of_n": statistics.mean(gaps)}
    return out


def tts(out: str | Path, task: str = "countdown", difficulty: int = 2, scratchpad: bool = False,
        small: str = "64x4", large: str = "256x3", sft_steps: int = 3000,
        ns=(1, 4, 16, 64), eval_n: int = 100, rm_problems: int = 200, rm_steps: int = 300,
        sweep_large: bool = False, auc_problems: int = 30, max_new_tokens: int = 160,
        log: Log = print) -> dict:
    """The study (module docstring); returns the summary written to ``results.json``."""
    out = Path(out)
    parse_size(small), parse_size(large)  # a bad size fails before any work
    t = get_task(task, difficulty, scratchpad)
    demos = write_demonstrations(t, out / "demonstrations.jsonl", 6000)
    max_new = max_new_tokens  # per sample (per step in beam search and DVTS: 40)
    sides = {}
    for name, size in (("small", small), ("large", large)):
        sides[name] = _warm_up(out, name, size, demos, sft_steps, t, eval_n, max_new)
        log(f"{name} {size}: {sides[name]['params']:,} params, greedy accuracy "
            f"{sides[name]['greedy']['accuracy']:.3f}")
    swept = {name: _sweep_policy(out, name, t, ns, eval_n, rm_problems, rm_steps, max_new,
                                 auc_problems, log)
             for name in (("small", "large") if sweep_large else ("small",))}
    res = _compare(t.name, eval_n, sides, swept)
    write_results(out, {**res, "rows": swept["small"]["rows"]}, _table(res))
    _chart(res, out / "accuracy_vs_flops.svg")
    best, L = res["best"], res["large"]
    log(f"best: {best['strategy']} N={best['n']} accuracy {best['accuracy']:.3f} vs large greedy "
        f"{L['greedy']['accuracy']:.3f}")
    return res


def _compare(task_name: str, eval_n: int, sides: dict, swept: dict) -> dict:
    """The small policy's best strategy against the large one answering greedily, in accuracy
    and total FLOPs (training, reward models and their labelling, inference)."""
    result = swept["small"]
    pts = curves(result)
    s, L, rms = sides["small"], sides["large"], result["reward_models"]
    # a reward model that ranks the policy's answers below chance is flagged, and the
    # strategies that follow it are not counted as the small policy's best
    below = sorted(k for k, v in rms.items()
                   if v.get("held_out", {}).get("auc") is not None and v["held_out"]["auc"] < 0.5)
    usable = [n for n in LEARNED if RANKED_BY.get(n) not in below]
    best = max(((name, p) for name, ps in pts.items() if name in usable for p in ps),
               key=lambda t: (t[1]["accuracy"], -t[1]["flops"]))
    label_flops = sum(rms[k]["label_compute"]["policy_flops"] for k in rms)
    rm_flops = sum(rms[k]["train_flops"] for k in rms)
    small_total = s["train_flops"] + label_flops + rm_flops + best[1]["flops"] * eval_n
    large_total = L["train_flops"] + L["greedy"]["flops_per_problem"] * eval_n
    wins = [{"strategy": name, **p} for name, ps in pts.items() if name in usable for p in ps
            if p["accuracy"] > L["greedy"]["accuracy"]]
    res = {"task": task_name, "eval_n": eval_n, "small": s, "large": L,
           "below_chance_reward_models": below,
           "cheapest_win": min(wins, key=lambda p: p["flops"]) if wins else None,
           "param_ratio": L["params"] / s["params"],
           "best": {"strategy": best[0], **best[1]},
           "verifier_upper_bound": max(pts[ORACLE], key=lambda p: p["accuracy"]),
           "small_beats_large": best[1]["accuracy"] > L["greedy"]["accuracy"],
           "flops_small_total": small_total, "flops_large_total": large_total,
           "flops_ratio_small_over_large": small_total / large_total,
           "reward_models": rms, "curves": pts,
           "by_difficulty_bin": {name: by_difficulty(r) for name, r in swept.items()}}
    if "large" in swept:
        res["large_curves"] = curves(swept["large"])
        res["large_reward_models"] = swept["large"]["reward_models"]
    return res


def _chart(res: dict, path: Path) -> None:
    """Accuracy against inference FLOPs per problem: every strategy of each swept policy, and
    the large policy's greedy answer as one point."""
    L = res["large"]
    series = {name: [(p["flops"], p["accuracy"]) for p in ps] for name, ps in res["curves"].items()}
    for name, ps in res.get("large_curves", {}).items():
        series[f"large {name}"] = [(p["flops"], p["accuracy"]) for p in ps]
    series["large, greedy"] = [(L["greedy"]["flops_per_problem"], L["greedy"]["accuracy"])]
    line_chart(series, path, x_label="inference FLOPs per problem (log scale)",
               y_label=f"held-out accuracy ({res['eval_n']} problems)", y_range=(0.0, 1.0),
               log_x=True)


def _table(r: dict) -> str:
    s, L, b, o = r["small"], r["large"], r["best"], r["verifier_upper_bound"]
    lines = [f"Task {r['task']}, {r['eval_n']} held-out problems. Small {s['size']} "
             f"({s['params']:,} params) vs large {L['size']} ({L['params']:,}): "
             f"{r['param_ratio']:.1f}x the parameters.", "",
             f"- large, greedy: accuracy **{L['greedy']['accuracy']:.3f}**",
             f"- small, greedy: accuracy {s['greedy']['accuracy']:.3f}",
             f"- small, best strategy: **{b['strategy']} N={b['n']}: {b['accuracy']:.3f}** "
             f"({'beats' if r['small_beats_large'] else 'does not beat'} the large policy)",
             "- small, cheapest strategy that beats the large policy: " + (
                 f"{c['strategy']} N={c['n']}: {c['accuracy']:.3f} at {c['flops']:.3g} FLOPs per "
                 f"problem ({c['flops'] / L['greedy']['flops_per_problem']:.2f}x the large "
                 "policy's greedy answer)" if (c := r["cheapest_win"]) else "none"),
             f"- small, best-of-N by the exact verifier (upper bound): N={o['n']}: "
             f"{o['accuracy']:.3f}",
             f"- total FLOPs (training + reward models + labelling + inference): small "
             f"{r['flops_small_total']:.3g}, large {r['flops_large_total']:.3g}, ratio "
             f"{r['flops_ratio_small_over_large']:.2f}",
             "- the small policy's reward models, ROC AUC of right vs wrong samples on held-out "
             "problems (0.5: chance): " + ", ".join(
                 f"{k.upper()} {_auc(v)}" for k, v in r["reward_models"].items())]
    if r.get("below_chance_reward_models"):
        lines.append("- **below chance**: " + ", ".join(
            k.upper() for k in r["below_chance_reward_models"]) + " ranks right answers below "
            "wrong ones; the strategies that follow it are not counted as the best")
    if "large_reward_models" in r:
        lines.append("- the large policy's reward models, the same: " + ", ".join(
            f"{k.upper()} {_auc(v)}" for k, v in r["large_reward_models"].items()))
    lines.append("")
    for side, key in (("small", "curves"), ("large", "large_curves")):
        if key not in r:
            continue
        lines += [f"{side} policy:", "",
                  "| strategy | N | accuracy | policy tokens / problem | FLOPs / problem |",
                  "|---|---|---|---|---|"]
        for name, ps in r[key].items():
            for p in ps:
                lines.append(f"| {name} | {p['n']} | {p['accuracy']:.3f} | "
                             f"{p['policy_tokens']:.0f} | {p['flops']:.3g} |")
        lines.append("")
    for side, bins in r["by_difficulty_bin"].items():
        lines += [f"{side} policy by its own pass-rate bin:", "",
                  "| pass-rate bin | problems | best strategy | N | accuracy | "
                  "search - best-of-N (mean over N) |", "|---|---|---|---|---|---|"]
        for k, v in bins.items():
            lines.append(f"| {k} | {v['problems']} | {v['best']} | {v['n']} | "
                         f"{v['accuracy']:.3f} | {v['search_minus_best_of_n']:+.3f} |")
        lines.append("")
    return "\n".join(lines)


def _auc(rm: dict) -> str:
    h = rm.get("held_out", {})
    return "n/a" if h.get("auc") is None else f"{h['auc']:.3f} ({h['right']} right, {h['wrong']} wrong)"
