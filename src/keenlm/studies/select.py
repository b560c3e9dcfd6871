"""``keenlm study select``: does backpropagating only the surprising data pay, here?

One model (a depth of the size dial) on the stdlib corpus, constant learning rate after a
short warm-up (so every evaluation along a run is a fair point of its curve), evaluated on
the held-out split 20 times per run. Runs:

- ``full``: full backprop, batch 16 x 256, for ``tokens``; its final validation loss is the
  target, its training seconds the budget every other run gets;
- ``loss-pool``, ``prob-pool``, ``excess-pool``: a pool of 32 sequences per step, scored
  without autograd, the top half (or Selective-Backprop's probabilistic half, or Rho-1's half
  by excess loss over a reference model) backpropagated: the same backward batch as ``full``;
- ``loss-half``: batch 16, the top half backpropagated: cheaper steps, fewer tokens learned;
- ``excess-token``: Rho-1's token-level selection (60% of tokens), batch 16: a loss mask, no
  cheaper backward.

The reference model of ``excess`` is a depth-1 model trained on ``ref_tokens`` of the same
corpus (keenlm has no separate "high-quality" set; Rho-1's reference is trained on one).

For each run: training seconds and backward FLOPs to reach the target loss (interpolated
between evaluations; "not reached" when it did not within the budget), the speed-up against
``full`` in both, and the loss at the end of the budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keenlm
from keenlm.config import merge
from keenlm.plot import line_chart
from keenlm.presets import size_preset
from keenlm.runs import read_jsonl
from keenlm.scaling.sweep import base_config
from keenlm.studies.common import Log, finished, record, train_run, write_results


@dataclass(frozen=True)
class Options:
    """selective backprop (loss, probability, Rho-1 excess) vs full backprop, time to a target loss"""

    depth: int = 3  # depth of the size dial
    tokens: int = 4_000_000  # training tokens of the full-backprop run


def run(out, opts: Options) -> dict:
    return select(out, depth=opts.depth, tokens=opts.tokens)


def summary(res: dict) -> str:
    return "\n".join(f"{r['name']}: val loss {r['val_loss']:.4f}, time to target "
                     + (f"{r['time_to_target']:.0f} s ({r['speedup_time']:.2f}x)"
                        if r["time_to_target"] else "not reached") for r in res["rows"])


def select_configs(depth: int, tokens: int, out: Path, reference: Path,
                   overrides: dict | None = None) -> dict[str, dict]:
    base = merge(base_config(), size_preset(depth, aspect=32), overrides or {})
    t = base["train"]
    steps = max(20, round(tokens / (t["batch_size"] * t["seq_len"])))
    pool = 2 * t["batch_size"]
    runs = {"full": {},
            "loss-pool": {"train": {"batch_size": pool, "select": {"method": "loss", "keep": 0.5}}},
            "prob-pool": {"train": {"batch_size": pool, "select": {"method": "prob", "keep": 0.5}}},
            "excess-pool": {"train": {"batch_size": pool, "select": {
                "method": "excess", "keep": 0.5, "reference": str(reference)}}},
            "loss-half": {"train": {"select": {"method": "loss", "keep": 0.5}}},
            "excess-token": {"train": {"select": {"method": "excess", "keep": 0.6, "unit": "token",
                                                  "reference": str(reference)}}}}
    return {name: merge(base, extra, {"train": {
        "steps": steps, "out_dir": str(out / name),
        "schedule": {"kind": "constant", "warmup_steps": max(1, steps // 30)},
        "eval": {"every": max(1, steps // 20), "batches": 20}, "checkpoint": {"resume": True}}})
        for name, extra in runs.items()}


def reach(evals: list[dict], target: float, key: str) -> float | None:
    """``key`` (train_s, flops_backward) when the validation loss first reaches ``target``,
    interpolated linearly between the evaluations around it; None if it never does."""
    prev = None
    for e in evals:
        if e["loss"] <= target:
            if prev is None or prev["loss"] == e["loss"]:
                return e[key]
            f = (prev["loss"] - target) / (prev["loss"] - e["loss"])
            return prev[key] + f * (e[key] - prev[key])
        prev = e
    return None


def select(out: str | Path, depth: int = 3, tokens: int = 4_000_000, ref_depth: int = 1,
           ref_tokens: int = 1_000_000, overrides: dict | None = None, log: Log = print) -> dict:
    """Train the reference and the six runs (resumable) and compare their time to the target."""
    out = Path(out)
    ref_loss = _reference(out / "reference", ref_depth, ref_tokens, overrides)
    log(f"reference (depth {ref_depth}, {ref_tokens:,} tokens): val loss {ref_loss:.4f}")
    rows, curves, budget, target = [], {}, None, None
    for name, cfg in select_configs(depth, tokens, out, out / "reference", overrides).items():
        if budget is not None:  # every other run: the full run's training seconds
            cfg = merge(cfg, {"train": {"steps": 10 * cfg["train"]["steps"],
                                        "time_budget_s": budget}})
        rec = _selected_run(out / name, cfg, name)
        if budget is None:
            budget, target = rec["train_s"], rec["val_loss"]
        t_hit = reach(rec["evals"], target, "train_s")
        f_hit = reach(rec["evals"], target, "flops_backward")
        rows.append({"name": name, "val_loss": rec["val_loss"], "steps": rec["steps"],
                     "train_s": rec["train_s"], "ledger": rec["ledger"],
                     "time_to_target": t_hit, "backward_flops_to_target": f_hit})
        curves[name] = [(e["train_s"] / 60, e["loss"]) for e in rec["evals"]]
        log(f"{name}: val loss {rec['val_loss']:.4f} after {rec['steps']} steps; target "
            + (f"reached at {t_hit:.0f} s" if t_hit is not None else "not reached"))
    full = rows[0]
    for r in rows:
        r["speedup_time"] = (full["time_to_target"] / r["time_to_target"]
                             if r["time_to_target"] else None)
        r["speedup_backward_flops"] = (full["backward_flops_to_target"] /
                                       r["backward_flops_to_target"]
                                       if r["backward_flops_to_target"] else None)
    pool = [r for r in rows if r["name"].endswith("-pool") or r["name"] == "loss-half"]
    best = max((r for r in pool if r["speedup_time"]), key=lambda r: r["speedup_time"],
               default=None)
    results = {"depth": depth, "tokens": tokens, "target": target, "budget_s": budget,
               "reference_loss": ref_loss, "rows": rows,
               "best": best["name"] if best else None,
               "best_speedup_time": best["speedup_time"] if best else None}
    line_chart(curves, out / "select.svg", x_label="training minutes (this machine)",
               y_label="validation loss (nats/token)")
    write_results(out, results, _table(results))
    return results


def _reference(folder: Path, depth: int, tokens: int, overrides: dict | None) -> float:
    """The reference model of the ``excess`` runs (kept when finished): its validation loss."""
    cfg = merge(base_config(), size_preset(depth, aspect=32), overrides or {})
    steps = max(1, round(tokens / (cfg["train"]["batch_size"] * cfg["train"]["seq_len"])))
    cfg = merge(cfg, {"train": {"steps": steps, "out_dir": str(folder),
                                "schedule": {"warmup_steps": max(1, steps // 30)},
                                "checkpoint": {"resume": True}}})
    if finished(folder, cfg) is None:
        res = keenlm.train(cfg)
        record(folder, {"config": cfg, "val_loss": res.final_eval["loss"]})
    return finished(folder, cfg)["val_loss"]


def _selected_run(folder: Path, cfg: dict, name: str) -> dict:
    """One run of the study (kept when finished): its loss, steps, seconds, ledger and evals."""
    rec = finished(folder, cfg)
    if rec is not None:
        return rec
    res, seconds = train_run(cfg, name)
    evals = [r for r in read_jsonl(folder / "metrics.jsonl") if r["kind"] == "eval"]
    rec = {"config": cfg, "val_loss": res.final_eval["loss"], "steps": res.step,
           "train_s": res.ledger["wall_time_s"], "seconds": seconds,
           "ledger": {k: res.ledger[k] for k in ("tokens_seen", "tokens_forward",
                                                 "tokens_backward", "flops_forward",
                                                 "flops_backward")},
           "evals": [{k: e[k] for k in ("step", "loss", "train_s", "flops_backward")}
                     for e in evals]}
    record(folder, rec)
    return rec


def _table(res: dict) -> str:
    lines = [f"Depth {res['depth']} of the size dial, stdlib corpus, BPE 4096, constant learning "
             f"rate; target: full backprop's validation loss after {res['tokens']:,} tokens, "
             f"{res['target']:.4f}; every other run gets its {res['budget_s']:.0f} training "
             f"seconds. Reference model (excess): validation loss {res['reference_loss']:.4f}.",
             "", "| run | steps | val loss at the end | seconds to target | speed-up (time) | "
             "backward FLOPs to target | speed-up (backward FLOPs) | forward / backward tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lg = r["ledger"]
        t = f"{r['time_to_target']:.0f}" if r["time_to_target"] else "not reached"
        f = f"{r['backward_flops_to_target']:.3g}" if r["backward_flops_to_target"] else "-"
        st = f"{r['speedup_time']:.2f}x" if r["speedup_time"] else "-"
        sf = f"{r['speedup_backward_flops']:.2f}x" if r["speedup_backward_flops"] else "-"
        lines.append(f"| {r['name']} | {r['steps']} | {r['val_loss']:.4f} | {t} | {st} | {f} | "
                     f"{sf} | {lg['tokens_forward']:,} / {lg['tokens_backward']:,} |")
    return "\n".join(lines)
