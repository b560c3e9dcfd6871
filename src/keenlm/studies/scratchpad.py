"""``keenlm study scratchpad``: worked answers against answers alone, at equal compute.

The second scaling law's training-time claim is that time spent per data point -- longer,
worked responses -- makes a model smarter. This study trains one policy size twice on the same
task with the same recipe and the same number of steps (so the same training FLOPs: both runs
train on packed windows of 16 x 256 bytes): once on demonstrations that work the problem step
by step before the answer (``scratchpad``), once on demonstrations that give the answer alone
(``direct``). A worked demonstration is longer, so at equal training FLOPs the scratchpad run
sees fewer problems.

- Equal training compute: held-out greedy pass@1 at every checkpoint of both runs (the same
  steps, hence the same FLOPs), with the mean answer length and FLOPs of one greedy answer.
- Equal inference compute: at the end, ``max_n`` sampled answers per test problem of each run
  (``plan.answer_samples``); every (format, strategy, N) with its inference FLOPs per query
  (``exchange``'s points; a prompt is prefilled once for all its samples), and at a ladder of
  budgets (each format's greedy cost among them) the best each format reaches within it --
  e.g. several direct answers, voted or checked, for the price of one worked answer.

Both formats draw the same problems (``tasks``: the direct demonstrations are the worked ones
with the steps taken out), so the held-out test problems are identical.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import keenlm
from keenlm.data.tasks import Problem, get_task, write_demonstrations
from keenlm.infer.task_eval import complete
from keenlm.model import load_model_state
from keenlm.plot import line_chart
from keenlm.runs import atomic_write_text
from keenlm.runs import load_model_state as read_weights
from keenlm.studies.common import Log, parse_size, write_results
from keenlm.studies.exchange import _best, _cached, _measure, _points
from keenlm.studies.rl import N_DEMOS, warmup_config

FORMATS = ("direct", "scratchpad")


@dataclass(frozen=True)
class Options:
    """worked (scratchpad) against answer-only demonstrations, one policy size, at equal
    training and at equal inference FLOPs"""

    task: Literal["addition", "multiplication", "countdown"] = "addition"  # the verifiable task
    difficulty: int = 3  # digits per operand / numbers on offer
    size: str = "128x2"  # the policy, d_model x layers
    sft_steps: int = 2000  # supervised steps of each format (equal training FLOPs)
    every: int = 250  # steps between the checkpoints measured along the way
    eval_n: int = 200  # held-out test problems
    max_n: int = 16  # sampled answers per test problem at the end (strategies use the first N)
    temperature: float = 0.8  # sampling temperature


def run(out, o: Options) -> dict:
    return scratchpad(out, o)


def summary(res: dict) -> str:
    f = res["final"]
    lines = [f"{fmt}: held-out greedy pass@1 {f[fmt]['accuracy']:.3f}, "
             f"{f[fmt]['answer_bytes']:.0f} bytes per answer" for fmt in FORMATS]
    for row in res["equal_inference"]:
        lines.append(f"at {row['budget']:.3g} FLOPs/query: " + ", ".join(
            f"{fmt} {row[fmt]['strategy']} N={row[fmt]['n']} {row[fmt]['accuracy']:.3f}"
            for fmt in FORMATS if row[fmt]))
    return "\n".join(lines)


def tasks(kind: str, difficulty: int) -> dict:
    """The two formats of one task on the same problems: the worked task's, and the same ones
    with the steps taken out of the demonstration (a worked Countdown problem is drawn only
    when its intermediate results are whole numbers, so the plain task's problems differ)."""
    worked = get_task(kind, difficulty, True)
    direct = dataclasses.replace(worked, name=worked.name[:-1], stream=worked.name,
                                 make=lambda rng: _answer_only(worked.make(rng)))
    return {"direct": direct, "scratchpad": worked}


def _answer_only(p: Problem) -> Problem:
    return dataclasses.replace(p, demonstration=p.demonstration.split("\n")[-1])


def scratchpad(out, o: Options, log: Log = print) -> dict:
    out = Path(out)
    parse_size(o.size)
    if o.sft_steps < 1 or o.every < 1 or o.eval_n < 1 or o.max_n < 2:
        raise ValueError("sft_steps >= 1, every >= 1, eval_n >= 1 and max_n >= 2")
    options = {k: getattr(o, k) for k in o.__dataclass_fields__}
    _same_options(out, options)
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= o.max_n]
    curves, measured, policies, final = {}, {}, {}, {}
    for fmt, task in tasks(o.task, o.difficulty).items():
        demos = write_demonstrations(task, out / f"demonstrations-{fmt}.jsonl", N_DEMOS)
        test = task.problems("test", o.eval_n)
        # byte-level: a demonstration's answer length in bytes is its length in tokens
        max_new = 16 + max(len(p.demonstration.encode()) for p in test)
        res = keenlm.train(warmup_config(o.size, demos, o.sft_steps, out / fmt, 512, checkpoint={
            "every": o.every, "keep": o.sft_steps // o.every + 1, "resume": True}))
        km = keenlm.load(out / fmt)
        flops_per_step = res.ledger["flops_total"] / o.sft_steps
        curves[fmt] = _cached(out / f"curve-{fmt}.json",
                              lambda: _curve(km, task, test, max_new, flops_per_step), None)
        params = sum(p.numel() for p in km.net.parameters())
        policies[fmt] = {"params": params, "train_flops": res.ledger["flops_total"],
                         "demonstration_bytes": _mean_len(demos), "max_new_tokens": max_new}
        load_model_state(km.net, read_weights(sorted((out / fmt / "checkpoints").glob("step-*"),
                                                     key=_step)[-1]))
        measured[fmt] = _cached(out / f"measured-{fmt}.json", lambda: _measure(
            km, task, test, o.max_n, o.temperature, max_new), None)
        final[fmt] = {**curves[fmt][-1], "flops_greedy": measured[fmt]["flops_greedy"]}
        log(f"{fmt}: {params:,} params, held-out greedy pass@1 by step "
            + ", ".join(f"{c['step']}: {c['accuracy']:.3f}" for c in curves[fmt]))
    points = _points(measured, policies, ns, 1.0)
    res = {"task": o.task, "difficulty": o.difficulty,
           "options": options, "policies": policies,
           "curves": curves, "final": final, "points": points,
           "equal_inference": _equal_inference(points, final)}
    write_results(out, res, _table(res))
    _charts(res, out)
    return res


def _same_options(out: Path, options: dict) -> None:
    """A study folder holds one set of options: its cached measurements are never mixed."""
    path = out / "options.json"
    if path.exists() and json.loads(path.read_text()) != json.loads(json.dumps(options)):
        raise ValueError(f"{out} was run with other settings; use another output folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(options, indent=2) + "\n")


def _step(path: Path) -> int:
    return int(path.name.split("-")[1])


def _mean_len(demos: Path) -> float:
    lines = demos.read_text().splitlines()
    return sum(len(json.loads(x)["text"].encode()) for x in lines) / len(lines)


def _curve(km, task, test: list, max_new: int, flops_per_step: float) -> list[dict]:
    """Held-out greedy pass@1 and mean answer length at every checkpoint."""
    prompts = [p.prompt for p in test]
    rows = []
    for ckpt in sorted(km.run_dir.glob("checkpoints/step-*"), key=_step):
        load_model_state(km.net, read_weights(ckpt))
        comps = complete(km.net, km.tokenizer, prompts, max_new_tokens=max_new)
        right = [r == 1.0 for r in task.reward(prompts, comps)]
        rows.append({"step": _step(ckpt), "train_flops": _step(ckpt) * flops_per_step,
                     "accuracy": sum(right) / len(right),
                     "answer_bytes": sum(len(c.encode()) for c in comps) / len(comps)})
    return rows


def _equal_inference(points: list[dict], final: dict, rungs: int = 6) -> list[dict]:
    """At each format's greedy cost per query and at ``rungs`` budgets spread evenly (in log)
    over every measured cost: the best (strategy, N) of each format within the budget, without
    a verifier (greedy, majority) and with the exact one."""
    costs = [p["flops"] for p in points]
    lo, hi = min(costs), max(costs)
    ladder = {f["flops_greedy"] for f in final.values()}
    ladder |= {lo * (hi / lo) ** (i / (rungs - 1)) for i in range(rungs)}
    rows = []
    for budget in sorted(ladder):
        for verifier in (False, True):
            pts = [p for p in points if verifier or p["strategy"] != "best_of_n_verifier"]
            rows.append({"budget": budget, "verifier": verifier,
                         **{fmt: _best([p for p in pts if p["policy"] == fmt], budget * 1.001)
                            for fmt in FORMATS}})
    return rows


def _table(r: dict) -> str:
    o, pol = r["options"], r["policies"]
    lines = [f"Task {r['task']} {r['difficulty']}, policy {o['size']} (byte-level, "
             f"{pol['direct']['params']:,} params), {o['sft_steps']} supervised steps of 16 x 256 "
             f"bytes for each format ({pol['direct']['train_flops']:.3g} training FLOPs each); "
             f"mean demonstration: direct {pol['direct']['demonstration_bytes']:.0f} bytes, "
             f"scratchpad {pol['scratchpad']['demonstration_bytes']:.0f}; {o['eval_n']} held-out "
             "problems, the same for both formats.", "",
             "Equal training FLOPs (held-out greedy pass@1 at each checkpoint):", "",
             "| step | training FLOPs | direct | direct answer bytes | scratchpad | "
             "scratchpad answer bytes |", "|---|---|---|---|---|---|"]
    for d, s in zip(r["curves"]["direct"], r["curves"]["scratchpad"]):
        lines.append(f"| {d['step']} | {d['train_flops']:.3g} | {d['accuracy']:.3f} | "
                     f"{d['answer_bytes']:.0f} | {s['accuracy']:.3f} | {s['answer_bytes']:.0f} |")
    lines += ["", f"Equal inference FLOPs per query (after training; {o['max_n']} samples per "
              f"problem at temperature {o['temperature']}): the best of each format within the "
              "budget.", "", "| budget (FLOPs/query) | verifier | direct | accuracy | scratchpad | "
              "accuracy |", "|---|---|---|---|---|---|"]
    for row in r["equal_inference"]:
        cells = []
        for fmt in FORMATS:
            b = row[fmt]
            cells += ([f"{b['strategy']} N={b['n']}", f"{b['accuracy']:.3f}"] if b
                      else ["-", "-"])
        lines.append(f"| {row['budget']:.3g} | {'exact' if row['verifier'] else 'none'} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| format | strategy | N | accuracy | inference FLOPs / query |",
              "|---|---|---|---|---|"]
    lines += [f"| {p['policy']} | {p['strategy']} | {p['n']} | {p['accuracy']:.3f} | "
              f"{p['flops']:.3g} |" for p in r["points"]]
    return "\n".join(lines)


def _charts(r: dict, out: Path) -> None:
    line_chart({fmt: [(c["train_flops"], c["accuracy"]) for c in r["curves"][fmt]]
                for fmt in FORMATS}, out / "accuracy_vs_training_flops.svg",
               x_label="training FLOPs (log scale)", y_label="held-out greedy pass@1",
               y_range=(0.0, 1.0), log_x=True)
    series = {}
    for p in r["points"]:
        series.setdefault(f"{p['policy']} {p['strategy']}", []).append((p["flops"], p["accuracy"]))
    line_chart(series, out / "accuracy_vs_inference_flops.svg",
               x_label="inference FLOPs per query (log scale)", y_label="held-out accuracy",
               y_range=(0.0, 1.0), log_x=True)
