"""The second scaling law in training: more passes over each data point.

Two studies (``keenlm study epochs|group``), each writing ``results.json``, ``results.md`` and
charts (SVG and PNG) into its folder; the test-time half of the law is ``keenlm study tts``.

- ``epochs``: loss against passes over a fixed set of unique data. One model (a depth of the
  scaling sweeps' size dial, on the stdlib corpus) is trained twice with the same recipe and
  the same number of steps: once on only the first ``unique_tokens`` tokens of the training
  split (``data.train_tokens``; the run draws that set ``max_epochs`` times over), once on the
  whole split (9.5M tokens; drawing 16 x 250k of them leaves most windows seen once). Both
  are evaluated on the held-out split after every epoch's worth of tokens. The learning rate
  is constant after a short warm-up, so every evaluation along one run is a fair point of its
  curve (a decaying schedule would favour the last one). The question is Muennighoff et al.'s
  (2023, "Scaling Data-Constrained Language Models"): how much a repeated token is worth next
  to a fresh one. Each repeated-data point is given its *effective tokens*: the fresh tokens
  that reach the same validation loss (interpolated on the fresh curve).
- ``group``: accuracy against RL samples per prompt. From one supervised starting policy
  (``keenlm.studies.rl.rl_start``), GRPO runs with group sizes G (e.g. 2, 4, 8, 16) on the same
  prompts per step for the same number of steps: a larger group spends more samples -- more
  compute -- on each prompt. Reports held-out greedy pass@1, pass@k and maj@k after the run,
  the samples drawn and seconds taken, and pass@1 at an equal number of samples (the smallest
  run's), so the gain from a larger group can be told from the gain from more compute. A second
  arm holds the samples per step fixed instead (``samples_per_step`` = prompts x G, e.g. 64:
  32 prompts of 2, ..., 4 prompts of 16), so every group size spends the same compute over the
  same steps and only the split between prompts and samples per prompt changes.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import keenlm
from keenlm.config import merge, rl_config
from keenlm.plot import line_chart
from keenlm.presets import size_preset
from keenlm.runs import read_jsonl
from keenlm.scaling.sweep import base_config
from keenlm.studies.common import Log, finished, record, train_run, write_results
from keenlm.studies.rl import rl_start
from keenlm.train import grpo


@dataclass(frozen=True)
class EpochsOptions:
    """loss vs passes over fixed unique data, against fresh data"""

    depth: int = 3  # depth of the size dial
    unique_tokens: int = 250_000  # the fixed unique data
    epochs: int = 16  # passes over it


def run_epochs(out, opts: EpochsOptions) -> dict:
    return epochs(out, depth=opts.depth, unique_tokens=opts.unique_tokens, max_epochs=opts.epochs)


def epochs_summary(res: dict) -> str:
    return f"lowest validation loss on repeated data after {res['best_epochs']:.1f} epochs"


@dataclass(frozen=True)
class GroupOptions:
    """GRPO accuracy vs samples per prompt (group size)"""

    groups: tuple[int, ...] = (2, 4, 8, 16)  # GRPO group sizes
    rl_steps: int = 150  # GRPO steps of each run
    task: Literal["addition", "multiplication", "countdown"] = "countdown"  # the verifiable task
    difficulty: int = 2  # digits per operand / numbers on offer
    size: str = "128x4"  # the policy, d_model x layers
    sft_steps: int = 1500  # supervised warm-up steps
    start_at: float = 0.2  # start RL from the first warm-up checkpoint (every 100 steps) whose validation pass@1 reaches this
    eval_n: int = 200  # held-out problems
    lr: float = 2e-4  # learning rate of the RL runs
    prompts: int = 16  # prompts per step of the equal-prompts arm
    samples_per_step: int = 64  # prompts x G of the equal-samples arm (0: no such arm)
    scratchpad: bool = False  # demonstrations and answers worked step by step (longer answers)


def run_group(out, opts: GroupOptions) -> dict:
    return group(out, groups=opts.groups, steps=opts.rl_steps, prompts=opts.prompts,
                 task=opts.task, difficulty=opts.difficulty, size=opts.size,
                 sft_steps=opts.sft_steps, start_at=opts.start_at, eval_n=opts.eval_n,
                 lr=opts.lr, samples_per_step=opts.samples_per_step,
                 scratchpad=opts.scratchpad)


def group_summary(res: dict) -> str:
    return "\n".join(f"{r['arm']}, G={r['group']} x {r['prompts']} prompts: held-out greedy "
                     f"pass@1 {r['final']['pass@1']:.3f} ({r['samples']:,} samples, "
                     f"{r['seconds']:.0f} s)" for r in res["rows"])


# --------------------------------------------------------------------------------- epochs


def epochs_config(depth: int, unique_tokens: int, max_epochs: int, out_dir: Path,
                  repeated: bool, batch: int = 16, seq: int = 256,
                  overrides: dict | None = None) -> dict:
    """One run of the epochs study: the sweeps' base config on the whole stdlib corpus, then
    ``overrides`` (e.g. another corpus or tokenizer)."""
    per_step = batch * seq
    per_epoch = max(1, round(unique_tokens / per_step))
    steps = per_epoch * max_epochs
    return merge(base_config(seq=seq, batch=batch), size_preset(depth), {
        "data": {"max_bytes": 0, "train_tokens": unique_tokens if repeated else 0},
        "model": {"max_seq_len": seq},
        "train": {"steps": steps, "out_dir": str(out_dir),
                  "schedule": {"kind": "constant", "warmup_steps": max(1, steps // 30)},
                  "eval": {"every": per_epoch, "batches": 20, "log_every": 1},
                  "checkpoint": {"resume": True}}}, overrides or {})


def effective_tokens(loss: float, fresh: list[tuple[float, float]]) -> float | None:
    """Fresh tokens at which the fresh curve ``[(tokens, loss), ...]`` (loss falling) reaches
    ``loss``, interpolated in log-tokens; None when the loss is beyond the curve's range
    (below its lowest point, or above its first)."""
    pts = sorted(fresh)
    for (d0, l0), (d1, l1) in zip(pts, pts[1:]):
        if min(l0, l1) <= loss <= max(l0, l1) and l0 != l1:
            f = (l0 - loss) / (l0 - l1)
            return math.exp(math.log(d0) + f * (math.log(d1) - math.log(d0)))
    return None


def epochs(out: str | Path, depth: int = 3, unique_tokens: int = 250_000, max_epochs: int = 16,
           batch: int = 16, seq: int = 256, overrides: dict | None = None,
           log: Log = print) -> dict:
    """Validation loss after each pass over ``unique_tokens`` tokens, against the same model on
    fresh data; resumable (a finished run is kept, a stopped one continues)."""
    if unique_tokens < batch * seq or max_epochs < 1 or depth < 1:
        raise ValueError(f"epochs study: need unique_tokens >= {batch * seq} (one batch), "
                         f"max_epochs >= 1, depth >= 1; got {unique_tokens}, {max_epochs}, {depth}")
    out = Path(out)
    curves = {}
    for name, repeated in (("repeated", True), ("fresh", False)):
        folder = out / name
        cfg = epochs_config(depth, unique_tokens, max_epochs, folder, repeated, batch, seq,
                            overrides)
        rec = finished(folder, cfg)
        if rec is None:
            res, seconds = train_run(cfg, name)
            rec = {"config": cfg, "points": _epoch_points(folder, cfg, unique_tokens),
                   "seconds": seconds, "params": res.ledger["params"]}
            record(folder, rec)
        curves[name] = rec
        log(f"{name}: val loss {rec['points'][-1]['val_loss']:.4f} after "
            f"{rec['points'][-1]['epochs']:.1f} epochs of {unique_tokens:,} tokens "
            f"({rec['seconds']:.0f} s)")

    fresh = [(p["tokens"], p["val_loss"]) for p in curves["fresh"]["points"]]
    rows = []
    for rp, fp in zip(curves["repeated"]["points"], curves["fresh"]["points"]):
        eff = effective_tokens(rp["val_loss"], fresh)
        rows.append({"epochs": rp["epochs"], "tokens": rp["tokens"],
                     "repeated_val": rp["val_loss"], "repeated_train": rp["train_loss"],
                     "fresh_val": fp["val_loss"], "fresh_train": fp["train_loss"],
                     "effective_tokens": eff, "effective_epochs": eff / unique_tokens if eff else None})
    best = min(rows, key=lambda r: r["repeated_val"])
    cfg = curves["fresh"]["config"]
    results = {"depth": depth, "unique_tokens": unique_tokens, "max_epochs": max_epochs,
               "data": cfg["data"], "train": cfg["train"], "params": curves["fresh"]["params"],
               "rows": rows, "best_epochs": best["epochs"],
               "seconds": {k: v["seconds"] for k, v in curves.items()}}
    line_chart({f"{unique_tokens:,} unique tokens, repeated": [(r["epochs"], r["repeated_val"])
                                                                for r in rows],
                "fresh tokens": [(r["epochs"], r["fresh_val"]) for r in rows],
                "repeated, training loss": [(r["epochs"], r["repeated_train"]) for r in rows
                                            if r["repeated_train"] is not None]},
               out / "epochs.svg", x_label=f"tokens drawn, in passes over {unique_tokens:,}",
               y_label="loss (nats/token; validation unless marked)", log_x=True)
    write_results(out, results, _epochs_table(results))
    return results


def _epoch_points(folder: Path, cfg: dict, unique_tokens: int) -> list[dict]:
    """One point per epoch of a finished run: validation loss, and the training loss averaged
    over that epoch's logged steps."""
    recs = read_jsonl(folder / "metrics.jsonl")
    per_step = cfg["train"]["batch_size"] * cfg["train"]["seq_len"]
    per_epoch = cfg["train"]["eval"]["every"]
    # an evaluation at a stop of an interrupted run is not at an epoch's end
    evals = {r["step"]: r["loss"] for r in recs if r["kind"] == "eval" and r["step"] % per_epoch == 0}
    train = [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]
    points = []
    for step in sorted(evals):
        window = [v for s, v in train if step - per_epoch < s <= step]
        points.append({"step": step, "tokens": step * per_step,
                       "epochs": step * per_step / unique_tokens, "val_loss": evals[step],
                       "train_loss": sum(window) / len(window) if window else None})
    return points


def _epochs_table(res: dict) -> str:
    p, d, t = res["params"], res["data"], res["train"]
    lines = [f"Depth {res['depth']} of the size dial ({p['total']:,} parameters, "
             f"{p['non_embedding']:,} without embeddings), corpus {d.get('corpus', 'stdlib')} "
             f"({d.get('tokenizer', 'bpe')} tokenizer), batch {t['batch_size']} x {t['seq_len']}, constant "
             f"learning rate after warm-up; evaluated on the held-out split after every "
             f"{res['unique_tokens']:,} tokens drawn (random windows).", "",
             "| epochs | tokens drawn | repeated: val loss | repeated: train loss | fresh: val loss "
             "| repeated - fresh | effective fresh tokens | value of a repeated token |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        eff = r["effective_tokens"]
        train = "-" if r["repeated_train"] is None else f"{r['repeated_train']:.4f}"
        lines.append(f"| {r['epochs']:.2f} | {r['tokens']:,} | {r['repeated_val']:.4f} | "
                     f"{train} | {r['fresh_val']:.4f} | "
                     f"{r['repeated_val'] - r['fresh_val']:+.4f} | "
                     + (f"{eff:,.0f} | {eff / r['tokens']:.2f} |" if eff else "- | - |"))
    lines += ["", f"Lowest validation loss on the repeated data: after {res['best_epochs']:.1f} "
              f"epochs. \"Value of a repeated token\": effective fresh tokens / tokens drawn (1.00: "
              f"as good as fresh data; '-': the repeated run's loss is outside the fresh curve)."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- group size


def group(out: str | Path, groups=(2, 4, 8, 16), steps: int = 150, prompts: int = 16,
          task: str = "countdown", difficulty: int = 2, size: str = "128x4",
          sft_steps: int = 1500, start_at: float = 0.2, eval_n: int = 200, samples: int = 8,
          lr: float = 2e-4, samples_per_step: int = 0, log: Log = print,
          scratchpad: bool = False) -> dict:
    """GRPO from one starting policy with each group size: equal prompts and steps, and (with
    ``samples_per_step``) equal samples per step and steps; resumable (a finished run is kept;
    a run both arms share is run once)."""
    if not groups or any(g < 2 for g in groups) or steps < 1 or prompts < 1:
        raise ValueError(f"group study: need group sizes >= 2, steps >= 1, prompts >= 1; got "
                         f"{list(groups)}, {steps}, {prompts}")
    if samples_per_step and any(samples_per_step % g for g in groups):
        raise ValueError(f"samples_per_step {samples_per_step}: a multiple of every group size "
                         f"{list(groups)}")
    out = Path(out)
    max_new = 160 if scratchpad else 32  # worked answers are several lines long
    s0 = rl_start(out, task, difficulty, size, sft_steps, start_at, eval_n, samples, log,
                  scratchpad, max_new)
    arms = [("equal prompts", [(g, prompts) for g in sorted(groups)])]
    if samples_per_step:
        arms.append(("equal samples", [(g, samples_per_step // g) for g in sorted(groups)]))
    rows, curves = [], {}
    for arm, runs in arms:
        for g, n_prompts in runs:
            name = f"g{g}" if n_prompts == prompts else f"g{g}-p{n_prompts}"
            opts = {"task": task, "difficulty": difficulty, "algo": "grpo", "group": g,
                    "prompts": n_prompts, "steps": steps, "optim": {"lr": lr},
                    **({"scratchpad": True, "max_new_tokens": max_new} if scratchpad else {}),
                    "run": {"eval_n": eval_n, "out_dir": str(out / name), "resume": False,
                            "progress": False}}
            rec = _group_run(out / name, opts, s0)
            per_step = n_prompts * g
            row = {"arm": arm, "group": g, "prompts": n_prompts, "steps": steps,
                   "samples": steps * per_step, "seconds": rec["seconds"], "final": rec["final"],
                   "curve": [(s * per_step, p) for s, p in rec["evals"]]}
            rows.append(row)
            curves[f"G={g} x {n_prompts} prompts"] = [(n, p) for n, p in row["curve"] if n > 0]
            log(f"{arm}: G={g} x {n_prompts} prompts, {steps} steps, {row['samples']:,} samples "
                f"in {rec['seconds']:.0f} s; held-out greedy pass@1 {s0['start']['pass@1']:.3f} "
                f"-> {rec['final']['pass@1']:.3f}")
    equal = min(r["samples"] for r in rows)
    for r in rows:  # the last evaluation within the smallest run's samples
        r["pass@1_at_equal_samples"] = max((n, p) for n, p in r["curve"] if n <= equal)[1]
    results = {"task": s0["task"].name, "size": size, "sft_steps": s0["start_step"],
               "sft_seconds": s0["sft_seconds"], "start": s0["start"], "prompts": prompts,
               "samples_per_step": samples_per_step, "steps": steps, "lr": lr,
               "eval_n": eval_n, "samples_k": samples, "equal_samples": equal, "rows": rows}
    line_chart(curves, out / "group.svg",
               x_label="RL samples drawn (prompts x group x steps)",
               y_label=f"held-out greedy pass@1 ({eval_n} problems)", y_range=(0.0, 1.0), log_x=True)
    write_results(out, results, _group_table(results))
    return results


def _same_rl_config(config: dict):
    """An RL config in one spelling, so that a run recorded flat (an earlier release) and the
    same one written nested compare equal."""
    return dataclasses.asdict(rl_config(config))


def _group_run(folder: Path, opts: dict, s0: dict) -> dict:
    """One group size's GRPO run from the starting policy (kept when finished)."""
    rec = finished(folder, opts, normalize=_same_rl_config)
    if rec is not None:
        return rec
    cfg = rl_config(opts)
    t0 = time.perf_counter()
    res = grpo.rl(s0["policy"](), cfg)
    seconds = time.perf_counter() - t0
    if res.step < cfg.steps:
        raise KeyboardInterrupt(f"the G={cfg.group} run was stopped at step {res.step}; run again")
    evals = [(r["step"], r["pass@1"]) for r in read_jsonl(folder / "metrics.jsonl")
             if r["kind"] == "eval"]
    rec = {"config": opts, "seconds": seconds, "evals": evals,
           "final": s0["held_out"](keenlm.load(folder))}
    record(folder, rec)
    return rec


def _group_table(res: dict) -> str:
    k = res["samples_k"]
    s = res["start"]
    lines = [f"Task {res['task']}, policy {res['size']} (byte-level), GRPO (dr_grpo loss, lr "
             f"{res['lr']:g}) from the same supervised policy (warm-up of {res['sft_steps']} steps), "
             f"{res['steps']} steps per run; equal prompts: {res['prompts']} prompts per step"
             + (f"; equal samples: {res['samples_per_step']} samples per step"
                if res.get("samples_per_step") else "")
             + f"; {res['eval_n']} held-out problems.", "",
             f"| arm | group size G | prompts per step | samples drawn | seconds | greedy pass@1 | "
             f"gain (points) | pass@{k} | maj@{k} | pass@1 at {res['equal_samples']:,} samples |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| start | - | - | - | - | {s['pass@1']:.3f} | - | {s[f'pass@{k}']:.3f} | "
             f"{s[f'maj@{k}']:.3f} | {s['pass@1']:.3f} |"]
    for r in res["rows"]:
        f = r["final"]
        lines.append(f"| {r.get('arm', 'equal prompts')} | {r['group']} | "
                     f"{r.get('prompts', res['prompts'])} | {r['samples']:,} | "
                     f"{r['seconds']:.0f} | "
                     f"{f['pass@1']:.3f} | "
                     f"{100 * (f['pass@1'] - s['pass@1']):+.1f} | {f[f'pass@{k}']:.3f} | "
                     f"{f[f'maj@{k}']:.3f} | {r['pass@1_at_equal_samples']:.3f} |")
    return "\n".join(lines)
