"""``keenlm study moe``: mixture of experts against dense models at equal compute.

One command trains, on the stdlib corpus with the same tokens, schedule and learning rate:

- ``dense``: the dense model of the size dial (feed-forward width F);
- ``moe-aux``, ``moe-bias-<rate>``: E experts of width F / k, top-k routing -- the same active
  parameters and training FLOPs per token as ``dense`` (plus the router's C x E), E / k times
  the feed-forward parameters -- balanced by the Switch loss, and by auxiliary-loss-free bias at
  each of the ``bias_rates`` (DeepSeek-V3 used 0.001 over millions of steps; a run of a few
  hundred steps moves each bias by at most steps x rate, so the rate is swept);
- ``moe-none``: the same with no balancing, for a quarter of the tokens: how routing collapses
  without it;
- ``dense-total``: a dense model as wide as all the experts together (width E x F / k): the
  same total parameters as the MoE, E / k times its FLOPs per token.

It reports each model's validation loss, parameters (total, active), FLOPs per token, seconds
per training step (median over the logged steps after the first 10%) and the routing health
after warm-up (the first 10% of steps): the lowest and highest load of any expert in any layer
at any logged step, relative to the mean load (1.0), the dropped share and the router entropy.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from keenlm.config import merge
from keenlm.plot import line_chart
from keenlm.presets import size_preset
from keenlm.runs import read_jsonl
from keenlm.scaling.sweep import base_config
from keenlm.studies.common import Log, finished, record, train_run, write_results

BIAS_RATES = (0.001, 0.003, 0.01)


@dataclass(frozen=True)
class Options:
    """mixture of experts vs dense models of equal active and of equal total parameters"""

    depth: int = 4  # depth of the size dial
    tokens: int = 4_000_000  # training tokens of each model
    experts: int = 8  # routed experts
    top_k: int = 2  # experts per token
    bias_rates: tuple[float, ...] = BIAS_RATES  # rates of the bias-balanced runs (one run each)
    seeds: int = 1  # seeds of the dense and MoE (aux) pair (more: the run-to-run spread)
    pair_only: bool = False  # only the dense / MoE (aux) pair and its seeds (e.g. at more tokens)


def run(out, opts: Options) -> dict:
    return moe(out, depth=opts.depth, tokens=opts.tokens, experts=opts.experts, top_k=opts.top_k,
               bias_rates=opts.bias_rates, seeds=opts.seeds, pair_only=opts.pair_only)


def summary(res: dict) -> str:
    return (f"MoE minus dense validation loss {-res['loss_gain']:+.4f}; seconds per step "
            f"{res['step_ratio']:.2f}x the dense model's")


def moe_configs(depth: int, tokens: int, experts: int, top_k: int, out: Path,
                overrides: dict | None = None,
                bias_rates: tuple[float, ...] = BIAS_RATES, seeds: int = 1,
                pair_only: bool = False) -> dict[str, dict]:
    """The study's runs by name, each a full nested config."""
    base = merge(base_config(), size_preset(depth, aspect=32), overrides or {})
    t = base["train"]
    per_step = t["batch_size"] * t["seq_len"]
    steps = max(1, round(tokens / per_step))
    width = base["model"]["d_ff"]
    if width % top_k:
        raise ValueError(f"the dense width {width} must be a multiple of top_k={top_k}")
    moe = {"experts": experts, "top_k": top_k, "d_ff": width // top_k}
    if not bias_rates:
        raise ValueError("bias_rates: give at least one rate for the bias-balanced MoE")
    runs = {"dense": {},
            "moe-aux": {"model": {"ffn": "moe", "moe": {**moe, "balance": "aux"}}},
            **{f"moe-bias-{r:g}": {"model": {"ffn": "moe", "moe": {**moe, "balance": "bias",
                                                                   "bias_rate": r}}}
               for r in bias_rates},
            "moe-none": {"model": {"ffn": "moe", "moe": {**moe, "balance": "none"}}},
            "dense-total": {"model": {"d_ff": width * experts // top_k}}}
    if pair_only:  # only the dense / MoE (aux) comparison, e.g. at more tokens
        runs = {k: runs[k] for k in ("dense", "moe-aux")}
    for seed in range(1, seeds):  # repeats of the main comparison: the run-to-run spread
        runs[f"dense-s{seed}"] = {"train": {"seed": seed}}
        runs[f"moe-aux-s{seed}"] = {**runs["moe-aux"], "train": {"seed": seed}}
    out_cfgs = {}
    for name, extra in runs.items():
        n = max(1, steps // 4) if name == "moe-none" else steps
        out_cfgs[name] = merge(base, extra, {"train": {
            "steps": n, "out_dir": str(out / name), "schedule": {"warmup_steps": max(1, n // 30)},
            "eval": {"log_every": 10}, "checkpoint": {"resume": True}}})
    return out_cfgs


def routing_health(recs: list[dict], after_step: int, settled_step: int | None = None) -> dict | None:
    """Loads relative to the mean (1.0) after ``after_step``: the worst of any expert in any
    layer at any logged step (``load_min``/``load_max``), and the worst of each expert's load
    averaged over those steps (``avg_min``/``avg_max``); with ``settled_step``, also the worst
    at any logged step after it (``settled_min``/``settled_max``: once routing has settled)."""
    rows = [r for r in recs if r.get("kind") == "train" and "moe_load" in r and r["step"] > after_step]
    if not rows:
        return None
    loads = [v for r in rows for layer in r["moe_load"] for v in layer]
    late = [v for r in rows if settled_step is not None and r["step"] > settled_step
            for layer in r["moe_load"] for v in layer] or loads
    n_layers, n_experts = len(rows[0]["moe_load"]), len(rows[0]["moe_load"][0])
    avg = [statistics.mean(r["moe_load"][i][e] for r in rows)
           for i in range(n_layers) for e in range(n_experts)]
    return {"load_min": min(loads), "load_max": max(loads), "avg_min": min(avg),
            "avg_max": max(avg), "steps": len(rows),
            "settled_min": min(late), "settled_max": max(late),
            "dropped": statistics.mean(r["moe_dropped"] for r in rows),
            "entropy": statistics.mean(r["moe_entropy"] for r in rows)}


def moe(out: str | Path, depth: int = 4, tokens: int = 4_000_000, experts: int = 8,
        top_k: int = 2, overrides: dict | None = None, log: Log = print,
        bias_rates: tuple[float, ...] = BIAS_RATES, seeds: int = 1,
        pair_only: bool = False) -> dict:
    """Train the models (resumable: a finished one is kept) and compare them."""
    out = Path(out)
    rows, curves = [], {}
    for name, cfg in moe_configs(depth, tokens, experts, top_k, out, overrides,
                                 bias_rates, seeds, pair_only).items():
        folder = out / name
        rec = finished(folder, cfg)
        if rec is None:
            res, seconds = train_run(cfg, name)
            recs = read_jsonl(folder / "metrics.jsonl")
            steps = cfg["train"]["steps"]
            per_step = cfg["train"]["batch_size"] * cfg["train"]["seq_len"]
            timed = [per_step / r["tokens_per_s"] for r in recs
                     if r["kind"] == "train" and r["step"] > steps // 10]
            rec = {"config": cfg, "val_loss": res.final_eval["loss"], "steps": res.step,
                   "tokens": res.ledger["tokens_seen"], "params": res.ledger["params"],
                   "flops_per_token": res.ledger["flops_per_token"]["train"],
                   "step_seconds": statistics.median(timed) if timed else None,
                   "seconds": seconds,
                   "routing": routing_health(recs, steps // 10, steps // 4),
                   "curve": [(r["step"] * per_step, r["loss"]) for r in recs if r["kind"] == "train"]}
            record(folder, rec)
        # read again from the metrics every time, so a finished run gets today's measures
        rec["routing"] = routing_health(read_jsonl(folder / "metrics.jsonl"),
                                        cfg["train"]["steps"] // 10, cfg["train"]["steps"] // 4)
        rows.append({"name": name, **{k: v for k, v in rec.items() if k not in ("config", "curve")}})
        curves[name] = rec["curve"]
        log(f"{name}: val loss {rec['val_loss']:.4f}, {rec['params']['total']:,} parameters "
            f"({rec['params']['active']:,} active), {rec['step_seconds']:.3f} s/step")
    by = {r["name"]: r for r in rows}
    bias = [r for r in rows if r["name"].startswith("moe-bias-")]
    results = {"depth": depth, "tokens": tokens, "experts": experts, "top_k": top_k, "rows": rows,
               "bias_rates": [] if pair_only else list(bias_rates),
               "loss_gain": by["dense"]["val_loss"] - by["moe-aux"]["val_loss"],
               "step_ratio": by["moe-aux"]["step_seconds"] / by["dense"]["step_seconds"]}
    if bias:
        results["loss_gain_bias"] = by["dense"]["val_loss"] - min(r["val_loss"] for r in bias)
        results["step_ratio_bias"] = (statistics.mean(r["step_seconds"] for r in bias)
                                      / by["dense"]["step_seconds"])
    if seeds > 1:  # the gain per seed (seed 0 is the main runs)
        gains = [by["dense"]["val_loss"] - by["moe-aux"]["val_loss"]] + [
            by[f"dense-s{s}"]["val_loss"] - by[f"moe-aux-s{s}"]["val_loss"] for s in range(1, seeds)]
        results["loss_gain_seeds"] = gains
    line_chart({k: _smooth(v) for k, v in curves.items()}, out / "moe_loss.svg",
               x_label="training tokens", y_label="training loss (nats/token, smoothed)")
    write_results(out, results, _table(results))
    return results


def _smooth(points: list[tuple[float, float]], window: int = 5) -> list[tuple[float, float]]:
    return [(points[i][0], statistics.mean(v for _, v in points[max(0, i - window + 1):i + 1]))
            for i in range(len(points))]


def _table(res: dict) -> str:
    E, k = res["experts"], res["top_k"]
    lines = [f"Stdlib corpus, BPE 4096, batch 16 x 256, {res['tokens']:,} tokens (moe-none: a "
             f"quarter), depth {res['depth']} of the size dial; MoE: {E} experts, top-{k}, each "
             f"of width F / {k}.", "",
             "| model | val loss | total params | active params | train FLOPs/token | s/step | "
             "vs dense | load min / max (any step) | load min / max (any step after 1/4) | "
             "load min / max (mean over steps) | dropped | router entropy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = next(r for r in res["rows"] if r["name"] == "dense")["step_seconds"]
    for r in res["rows"]:
        h = r["routing"]
        route = (f"{h['load_min']:.2f} / {h['load_max']:.2f} | {h['settled_min']:.2f} / "
                 f"{h['settled_max']:.2f} | {h['avg_min']:.2f} / "
                 f"{h['avg_max']:.2f} | {h['dropped']:.3f} | {h['entropy']:.2f} |"
                 if h else "- | - | - | - | - |")
        lines.append(f"| {r['name']} | {r['val_loss']:.4f} | {r['params']['total']:,} | "
                     f"{r['params']['active']:,} | {r['flops_per_token']:.3g} | "
                     f"{r['step_seconds']:.3f} | {r['step_seconds'] / dense:.2f}x | {route}")
    lines += ["", "Loads are relative to the mean (1.00 = an even share), after the first 10% of "
              "steps: the worst of any expert in any layer at any logged step (also counted only "
              "after the first quarter of the run, once routing has settled), and the worst of "
              "each expert's load averaged over those steps; router entropy is "
              f"normalized by log {E} (1.00 = uniform).",
              f"MoE minus dense validation loss: {-res['loss_gain']:+.4f} (aux)"
              + (f", {-res['loss_gain_bias']:+.4f} (bias, best rate)" if "loss_gain_bias" in res
                 else "") + f"; seconds per step, MoE / dense: {res['step_ratio']:.2f}x (aux)"
              + (f", {res['step_ratio_bias']:.2f}x (bias, mean over rates)"
                 if "step_ratio_bias" in res else "") + ".",
              "Timings are one run's median logged step; `benchmarks/moe.py` measures the "
              "step-time ratio in interleaved rounds."]
    if "loss_gain_seeds" in res:
        g = res["loss_gain_seeds"]
        lines.append(f"Dense minus MoE (aux) validation loss per seed: "
                     f"{', '.join(f'{v:+.4f}' for v in g)} (mean {statistics.mean(g):+.4f}; "
                     f"positive: the MoE is lower).")
    return "\n".join(lines)
