"""``keenlm study rl``: supervised warm-up on a verifiable task, then GRPO and rejection-sampling
fine-tuning from the same policy for the same wall time.

``rl_start`` makes the starting policy the RL studies share (this one, and ``group`` in
keenlm.studies.law2): a byte-level policy trained on the task's demonstrations, stopped at the
first checkpoint that reaches a validation pass rate. ``warmup_config`` is that supervised
run's config, which keenlm.studies.tts trains its policies with too.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import keenlm
from keenlm.config import merge, rl_config
from keenlm.data.tasks import get_task, write_demonstrations
from keenlm.infer.task_eval import complete, evaluate_task
from keenlm.model import load_model_state
from keenlm.plot import line_chart
from keenlm.runs import load_model_state as read_weights
from keenlm.runs import read_jsonl
from keenlm.studies.common import Log, parse_size, write_results
from keenlm.train import grpo

N_DEMOS = 6000  # demonstrations of the supervised warm-up


@dataclass(frozen=True)
class Options:
    """supervised warm-up on a task, then GRPO and rejection-sampling fine-tuning"""

    task: Literal["addition", "multiplication", "countdown"] = "countdown"  # the verifiable task
    difficulty: int = 2  # digits per operand / numbers on offer
    size: str = "128x4"  # the policy, d_model x layers
    sft_steps: int = 1500  # supervised warm-up steps
    start_at: float = 0.2  # start RL from the first warm-up checkpoint (every 100 steps) whose validation pass@1 reaches this
    budget: float = 880.0  # wall-clock seconds of each RL run (sampling, updates, evaluations)
    algos: tuple[str, ...] = ("grpo", "rft")  # runs, each from the same policy: ALGO[:LOSS][+dynamic][+format][+curriculum] (e.g. grpo:dr_grpo,grpo:dr_grpo+dynamic+format; +dynamic: DAPO's dynamic sampling, 3 extra rounds; +format: the format reward dropped once 90% of samples are well formed; +curriculum: prompts by difficulty bin, weighted by learnability)
    eval_n: int = 200  # held-out problems
    lr: float = 2e-4  # learning rate of the RL runs
    scratchpad: bool = False  # demonstrations and answers worked step by step (longer answers)


def run(out, opts: Options) -> dict:
    return rl(out, task=opts.task, difficulty=opts.difficulty, size=opts.size,
              sft_steps=opts.sft_steps, start_at=opts.start_at, budget_s=opts.budget,
              algos=opts.algos, eval_n=opts.eval_n, rl_options={"lr": opts.lr},
              scratchpad=opts.scratchpad)


def summary(res: dict) -> str:
    return "\n".join(f"{r['algo']}: held-out greedy pass@1 {r['start']:.3f} -> "
                     f"{r['final']['pass@1']:.3f} in {r['seconds']:.0f} s" for r in res["runs"])


def warmup_config(size: str, demos: Path, steps: int, out_dir: Path, max_seq_len: int,
                  lr: float = 0.0, checkpoint: dict | None = None) -> dict:
    """Supervised warm-up of a byte-level policy on a task's demonstrations (batch 16 x 256;
    ``lr`` 0: the size preset's)."""
    d, n_layer = parse_size(size)
    return {"model": {"n_layer": n_layer, "d_model": d, "n_head": d // 64, "max_seq_len": max_seq_len},
            "data": {"corpus": str(demos), "tokenizer": "byte",
                     "cache_dir": str(out_dir.parent / "cache"), "val_fraction": 0.05},
            "train": {"steps": steps, "batch_size": 16, "seq_len": 256, "eval": {"every": 0},
                      "out_dir": str(out_dir), "progress": False, "optim": {"lr": lr},
                      "checkpoint": checkpoint or {}}}


def _first_checkpoint_reaching(sft: Path, task, val: list, start_at: float, max_new: int = 32):
    """(the warm-up's validation pass@1 by step, the first checkpoint reaching ``start_at``,
    else the last one)."""
    policy = keenlm.load(sft)
    prompts = [p.prompt for p in val]
    curve = []
    for ckpt in sorted((sft / "checkpoints").glob("step-*")):
        load_model_state(policy.net, read_weights(ckpt))
        comps = complete(policy.net, policy.tokenizer, prompts, max_new_tokens=max_new)
        rate = sum(r == 1.0 for r in task.reward(prompts, comps)) / len(val)
        curve.append((int(ckpt.name.split("-")[1]), rate))
        if rate >= start_at:
            break
    return curve, ckpt


def rl_start(out: Path, task: str, difficulty: int, size: str, sft_steps: int, start_at: float,
             eval_n: int, samples: int, log: Log = print, scratchpad: bool = False,
             max_new: int = 32) -> dict:
    """The starting policy of the RL studies: supervised warm-up of a byte-level ``size``
    policy on 6000 demonstrations of the task (resumable, checkpoints every 100 steps); the
    first checkpoint whose greedy pass@1 on a validation set reaches ``start_at`` (the last
    otherwise). The validation problems are the task's val split, kept out of the
    demonstrations, so the held-out test split plays no part in the choice (and the RL runs
    keep their best policy by the same problems).

    Returns {"task", "policy": a function giving a fresh copy of the starting policy,
    "held_out": a function scoring a policy on the test split, "start": its scores,
    "start_step", "sft_seconds", "warmup_validation"}."""
    parse_size(size)  # a bad size fails before any work
    t = get_task(task, difficulty, scratchpad)
    # the validation problems: the task's val split, kept out of the demonstrations
    demos = write_demonstrations(t, out / "demonstrations.jsonl", N_DEMOS, val_size=eval_n)
    val = t.problems("val", eval_n)
    t0 = time.perf_counter()
    keenlm.train(warmup_config(size, demos, sft_steps, out / "sft", 256, lr=3e-3, checkpoint={
        "every": 100, "keep": sft_steps // 100 + 1}))
    sft_s = time.perf_counter() - t0
    warmup_curve, chosen = _first_checkpoint_reaching(out / "sft", t, val, start_at, max_new)

    def starting_policy():
        km = keenlm.load(out / "sft")
        load_model_state(km.net, read_weights(chosen))
        return km

    def held_out(km) -> dict:
        ev = evaluate_task(km.net, km.tokenizer, t, n=eval_n, samples=samples, ks=(samples,),
                           max_new_tokens=max_new)
        return {"pass@1": ev["pass@1 greedy"]["success"], f"pass@{samples}": ev[f"pass@{samples}"],
                f"maj@{samples}": ev[f"maj@{samples}"]}

    start, start_step = held_out(starting_policy()), int(chosen.name.split("-")[1])
    log(f"supervised warm-up: {sft_s:.0f} s; validation pass@1 by step {warmup_curve}; starting "
        f"from step {start_step}: held-out greedy pass@1 {start['pass@1']:.3f}, pass@{samples} "
        f"{start[f'pass@{samples}']:.3f}")
    return {"task": t, "policy": starting_policy, "held_out": held_out, "start": start,
            "start_step": start_step, "sft_seconds": sft_s, "warmup_validation": warmup_curve}


def rl(out: str | Path, task: str = "countdown", difficulty: int = 2, size: str = "128x4",
       sft_steps: int = 1500, start_at: float = 0.2, budget_s: float = 880.0,
       algos=("grpo", "rft"), eval_n: int = 200, samples: int = 8, rl_options: dict | None = None,
       log: Log = print, scratchpad: bool = False) -> dict:
    """Supervised warm-up on task demonstrations (``rl_start``), then each RL algorithm from
    that same policy for ``budget_s`` seconds of wall time (sampling, updates and the periodic
    held-out evaluations all count). ``rl_options``: more RLConfig fields, flat or nested.
    Reports held-out greedy pass@1 before and after, pass@k and maj@k of the samples, and the
    curves (``pass_at_1.svg``, ``reward.svg``, each run's metrics)."""
    out = Path(out)
    max_new = 160 if scratchpad else 32  # worked answers are several lines long
    s0 = rl_start(out, task, difficulty, size, sft_steps, start_at, eval_n, samples, log,
                  scratchpad, max_new)
    results = {"task": s0["task"].name, "size": size, "sft_steps": s0["start_step"],
               "sft_seconds": s0["sft_seconds"], "warmup_validation": s0["warmup_validation"],
               "start_at": start_at, "budget_s": budget_s, "eval_n": eval_n, "sft": s0["start"],
               "runs": []}
    curves, rewards, lengths = {}, {}, {}
    for spec in algos:
        algo, _, loss = spec.split("+")[0].partition(":")
        name = spec.replace(":", "-").replace("+", "-")
        cfg = rl_config(merge(rl_options or {}, {**_remedies(spec),
            "task": task, "difficulty": difficulty, "algo": algo, "steps": 1_000_000,
            "scratchpad": scratchpad, "max_new_tokens": max_new, **({"loss": loss} if loss else {}),
            "run": {"time_budget_s": budget_s, "eval_n": eval_n, "out_dir": str(out / name),
                    "resume": False, "progress": False}}))
        row, recs = _rl_run(out / name, s0, cfg)
        evals = [r for r in recs if r["kind"] == "eval"]
        steps = [r for r in recs if r["kind"] == "rl"]
        label = name.upper()
        curves[label] = [(r["elapsed_s"] / 60, r["pass@1"]) for r in evals]
        rewards[label] = [(r["elapsed_s"] / 60, r["reward_mean"]) for r in steps]
        lengths[label] = [(r["step"], r["completion_len"]) for r in steps]
        results["runs"].append(row)
        log(f"{name}: {row['steps']} steps in {row['seconds']:.0f} s; held-out greedy pass@1 "
            f"{row['start']:.3f} -> {row['final']['pass@1']:.3f} ({100 * row['gain']:+.1f} "
            f"points); completion length {row['length_first']:.1f} -> {row['length_last']:.1f}")
        write_results(out, results, _rl_table(results))
    line_chart(curves, out / "pass_at_1.svg", x_label="minutes of RL (wall clock, this machine)",
               y_label=f"held-out greedy pass@1 ({eval_n} problems)", y_range=(0.0, 1.0))
    line_chart(rewards, out / "reward.svg", x_label="minutes of RL (wall clock, this machine)",
               y_label="mean sampled reward", y_range=(0.0, 1.0))
    line_chart(lengths, out / "length.svg", x_label="RL step",
               y_label="mean completion length (tokens)")
    return results


REMEDIES = {"dynamic": {"oversample": 3}, "format": {"format_reward_until": 0.9},
            "curriculum": {"curriculum": "learnability"}}


def _remedies(spec: str) -> dict:
    """The low-coverage remedies named after an algorithm (``grpo:dr_grpo+dynamic+format``)."""
    out = {}
    for extra in spec.split("+")[1:]:
        if extra not in REMEDIES:
            raise ValueError(f"{spec!r}: after + comes {' | '.join(REMEDIES)}, not {extra!r}")
        out.update(REMEDIES[extra])
    return out


def _rl_run(folder: Path, s0: dict, cfg) -> tuple[dict, list[dict]]:
    """One RL run from the starting policy: its row of the results, and its metrics."""
    t0 = time.perf_counter()
    res = grpo.rl(s0["policy"](), cfg)
    seconds = time.perf_counter() - t0
    final = s0["held_out"](keenlm.load(folder))
    recs = read_jsonl(folder / "metrics.jsonl")
    start = res.start_eval["pass@1"]
    # the policy the run kept by its validation split (never the test problems)
    best = s0["held_out"](keenlm.load(folder / "best")) if res.best else None
    row = {"algo": cfg.algo, "loss": cfg.loss, "steps": res.step, "seconds": seconds,
           "start": start, "final": final, "gain": final["pass@1"] - start,
           "best_step": res.best.get("step"), "best": best, "warnings": res.warnings,
           **_lengths([r["completion_len"] for r in recs if r["kind"] == "rl"]),
           "samples_per_step": cfg.prompts * cfg.group, "lr": cfg.optim.lr,
           "oversample": cfg.oversample, "format_reward_until": cfg.format_reward_until,
           "curriculum": cfg.curriculum,
           "bin_success": next((r["bin_success"] for r in reversed(recs) if "bin_success" in r),
                               None),
           "format_dropped_at": next((r["step"] for r in recs
                                      if r.get("event") == "format_dropped"), None)}
    return row, recs


def _lengths(per_step: list[float], window: int = 10) -> dict:
    """Mean completion length over the first and the last ``window`` steps."""
    if not per_step:
        return {"length_first": float("nan"), "length_last": float("nan")}
    w = min(window, len(per_step))
    return {"length_first": sum(per_step[:w]) / w, "length_last": sum(per_step[-w:]) / w}


def _rl_table(res: dict) -> str:
    s = res["sft"]
    k = max(int(key.split("@")[1]) for key in s if key.startswith("pass@"))
    step, rate = res["warmup_validation"][-1]
    how = (f"its first checkpoint whose validation pass@1 reached {res['start_at']} (step {step}, "
           f"{rate:.3f})" if rate >= res["start_at"] else
           f"no checkpoint reached the start threshold {res['start_at']}, so the last one "
           f"(step {step}, validation pass@1 {rate:.3f})")
    lines = [f"Task {res['task']}, policy {res['size']} (byte-level), {res['eval_n']} held-out "
             f"problems; RL started from the supervised warm-up, {how}.", "",
             f"| policy | RL steps | RL seconds | greedy pass@1 | gain (points) | pass@{k} | "
             f"maj@{k} | completion length (first -> last 10 steps) |",
             "|---|---|---|---|---|---|---|---|",
             f"| SFT (start) | - | - | {s['pass@1']:.3f} | - | {s[f'pass@{k}']:.3f} | "
             f"{s[f'maj@{k}']:.3f} | - |"]
    notes = []
    for r in res["runs"]:
        name = "GRPO (" + r["loss"] + ")" if r["algo"] == "grpo" else "RFT"
        name += "".join([", dynamic sampling" if r.get("oversample") else "",
                         ", curriculum by difficulty" if r.get("curriculum", "none") != "none"
                         else "",
                         ", format reward dropped" + (f" at step {r['format_dropped_at']}"
                                                      if r.get("format_dropped_at") else
                                                      " (never reached)")
                         if r.get("format_reward_until") else ""])
        rows = [(name + ", final", r["final"])]
        if r.get("best"):
            rows.append((f"{name}, best by validation (step {r['best_step']})", r["best"]))
        for label, f in rows:
            lines.append(f"| {label} | {r['steps']} | {r['seconds']:.0f} | {f['pass@1']:.3f} | "
                         f"{100 * (f['pass@1'] - r['start']):+.1f} | {f[f'pass@{k}']:.3f} | "
                         f"{f[f'maj@{k}']:.3f} | {r['length_first']:.1f} -> "
                         f"{r['length_last']:.1f} |")
        notes += [f"- {name} warned: {w}" for w in r.get("warnings", [])]
        if r.get("bin_success"):
            notes.append(f"- {name}: sampled success by difficulty bin at the end: " + ", ".join(
                f"bin {b} {p:.2f}" for b, p in sorted(r["bin_success"].items())))
    return "\n".join(lines + ([""] + notes if notes else []))
