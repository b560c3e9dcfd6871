"""The prediction check: fit a law on small models, predict bigger ones, then train them.

``prediction_check`` trains models of several depths (the size dial) on one or more token
counts of the stdlib corpus, fits the law to them, and writes the predicted validation loss of
every target (a depth and a token count, each with a bootstrap interval) to
``prediction.json`` *before* any target is trained. Then it trains the targets, in order, and
reports the error of each prediction.

- One token count: L(N) = E + A / N^alpha, extrapolated in N at that D (the data term is a
  constant absorbed into E).
- Several token counts: L(N, D) in two forms (``fit.FORMS``): Chinchilla's additive one and
  Kaplan's, where N and D interact. Each form is fitted with N counted without embeddings and,
  separately, with them.

Which of these fits is the headline is decided before any target trains, by a backtest on the
fitted runs alone: each fit is refitted without the largest fitted depth and scored on how well
it predicts that depth's runs; the fit with the smallest backtest error is the one the check
stands by (``chosen`` in prediction.json). Every other fit's prediction is written too. The
stated interval is the bootstrap interval widened by that backtest error (the bootstrap alone
sees only the scatter of the fitted runs, not the error of extrapolating one depth further).

With ``lr_sweep`` (multipliers of the size dial's learning rate), the learning rate is tuned
per size before anything is fitted, as DeepSeek LLM (2024) fits its hyperparameters: each
fitted depth is trained at the smallest fitted token count with every multiplier, keeps the
best for all its runs, and a power law lr(N) fitted to those best rates gives each target
its rate. Without it, a fixed rule lets a larger model train worse than a smaller one (the
ladder is not monotone in N) and no law can predict it.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from keenlm.config import merge
from keenlm.plot import line_chart
from keenlm.runs import atomic_write_text
from keenlm.scaling.fit import FORMS, Law, fit_law
from keenlm.scaling.sweep import (COUNTS, Trial, base_config, fit_trials, grid, model_params,
                                  run_sweep, run_trial)

Log = Callable[[str], None]

# Published exponents, for the report (Chinchilla form: alpha, beta; Kaplan: alpha_N, alpha_D,
# fitted there without an irreducible term).
PUBLISHED = {"Chinchilla (Hoffmann et al. 2022)": ("chinchilla", 0.34, 0.28),
             "Epoch AI (Besiroglu et al. 2024)": ("chinchilla", 0.3478, 0.3658),
             "Kaplan et al. 2020": ("kaplan", 0.076, 0.095)}


def prediction_check(out: str | Path, fit_depths=(1, 2, 3, 4, 5),
                     fit_tokens: Sequence[int] = (1_000_000, 2_000_000),
                     targets: Sequence[tuple[int, int]] = ((8, 2_000_000),),
                     backend: str = "local", samples: int = 200, base: dict | None = None,
                     lr_sweep: Sequence[float] = (), log: Log = print, aspect: int = 32,
                     head_dim: int = 32) -> dict:
    """``aspect``, ``head_dim``: the size dial (d_model = aspect x depth, heads of head_dim)."""
    out = Path(out)
    if len(fit_depths) < 3 or not targets or any(d <= max(fit_depths) for d, _ in targets):
        raise ValueError("fit on >= 3 depths and predict deeper models than all of them")
    base = base or base_config()
    t0 = time.perf_counter()
    if any(m <= 0 for m in lr_sweep) or len(set(lr_sweep)) != len(lr_sweep):
        raise ValueError(f"lr_sweep {list(lr_sweep)}: distinct positive multipliers")
    dial = {"aspect": aspect, "head_dim": head_dim}
    to_fit = grid(base, fit_depths, fit_tokens, **dial)
    goals = [grid(base, [depth], [tokens], **dial)[0] for depth, tokens in targets]
    tuned = None
    if lr_sweep:
        tuned = tune_lr(base, fit_depths, min(fit_tokens), lr_sweep, out, backend, log, dial)
        to_fit = [with_lr(t, tuned["per_depth"][str(t.depth)]["lr"]) for t in to_fit]
        goals = [with_lr(t, tuned["lr_of"](_point(t)["non_embedding"])) for t in goals]
    sizes = sorted({model_params(t.config)["non_embedding"] for t in to_fit})
    points = [_point(t) for t in goals]
    design = {"fit_span": sizes[-1] / sizes[0],
              "fit_tokens": [t.tokens for t in to_fit[:len(fit_tokens)]],
              "target_over_largest": [p["non_embedding"] / sizes[-1] for p in points]}
    log(f"fit sizes {sizes} (span {design['fit_span']:.1f}x) on {design['fit_tokens']} tokens; "
        "targets " + ", ".join(f"{t.name} ({r:.1f}x the largest)"
                               for t, r in zip(goals, design["target_over_largest"])))
    runs = _run(to_fit, out, backend, log)
    pred_path = out / "prediction.json"
    if pred_path.exists():  # a resumed check keeps the predictions made before the targets ran
        predictions = json.loads(pred_path.read_text())
        if [t["name"] for t in predictions["targets"]] != [t.name for t in goals]:
            raise ValueError(f"{pred_path} predicts other targets; use another folder")
    else:
        predictions = predict(runs, points, [t.name for t in goals], samples)
        if tuned:
            predictions["lr"] = {k: v for k, v in tuned.items() if k != "lr_of"}
            for t, p in zip(goals, predictions["targets"]):
                p["lr"] = t.config["train"]["optim"]["lr"]
        atomic_write_text(pred_path, json.dumps(predictions, indent=2) + "\n")
    chosen = predictions["chosen"]
    for i, t in enumerate(goals):
        p = predictions["fits"][chosen["form"]][chosen["count"]]["prediction"]
        log(f"predicted {t.name} ({chosen['form']}, {chosen['count']} params): "
            f"{p['loss'][i]:.4f} [{p['low'][i]:.4f}, {p['high'][i]:.4f}]")
    actual = []
    for t in goals:
        actual.append(run_trial(t, out))
        log(f"{t.name}: val loss {actual[-1]['val_loss']:.4f}")
    result = {"fit_depths": list(fit_depths), "dial": dial, "design": design, "runs": runs,
              "targets": actual,
              "lr_sweep": None if tuned is None else {
                  **predictions["lr"], "seconds": tuned["seconds"]},
              "predictions": predictions, "seconds_this_call": time.perf_counter() - t0,
              "seconds_fit_runs": sum(r["seconds"] for r in runs)
              + (tuned["seconds_other"] if tuned else 0.0),
              "seconds_targets": [r["seconds"] for r in actual], "scores": _scores(predictions,
                                                                                  actual)}
    atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "results.md", table(result) + "\n")
    _chart(result, out / "scaling.svg")
    return result


def _run(trials: list[Trial], out: Path, backend: str, log: Log) -> list[dict]:
    sweep = run_sweep(trials, out, backend=backend, log=log)
    if sweep["failed"]:
        raise RuntimeError(f"trials failed: {sweep['failed']}")
    return sweep["results"]


def with_lr(t: Trial, lr: float) -> Trial:
    """The trial at another learning rate (its name says which)."""
    return Trial(f"{t.name}-lr{lr:.3g}", t.depth, t.tokens,
                 merge(t.config, {"train": {"optim": {"lr": float(f"{lr:.3g}")}}}), t.budget)


def tune_lr(base: dict, depths, tokens: int, multipliers, out: Path, backend: str,
            log: Log, dial: dict | None = None) -> dict:
    """Each depth at ``tokens`` with every multiplier of its size-dial rate: the best rate per
    depth, and the power law lr(N) = exp(a) N^b (N without embeddings) fitted to them."""
    trials = []
    for d in depths:
        t = grid(base, [d], [tokens], **(dial or {}))[0]
        trials += [with_lr(t, t.config["train"]["optim"]["lr"] * m) for m in multipliers]
    runs = _run(trials, out, backend, log)
    per_depth = {}
    for d in depths:
        rows = sorted((r["config"]["train"]["optim"]["lr"], r["val_loss"], r["seconds"],
                       r["params_non_embedding"]) for r in runs if r["depth"] == d)
        best = min(range(len(rows)), key=lambda i: rows[i][1])
        per_depth[str(d)] = {"lr": rows[best][0], "params_non_embedding": rows[best][3],
                             "losses": {f"{lr:.3g}": loss for lr, loss, _, _ in rows},
                             "at_edge": best in (0, len(rows) - 1)}
    n = np.log([v["params_non_embedding"] for v in per_depth.values()])
    b, a = np.polyfit(n, np.log([v["lr"] for v in per_depth.values()]), 1)
    chosen = {(d, v["lr"]) for d, v in per_depth.items()}
    other = sum(r["seconds"] for r in runs if (str(r["depth"]),
                                               r["config"]["train"]["optim"]["lr"]) not in chosen)
    log(f"learning rate by depth (best of x{', x'.join(map(str, multipliers))} at {tokens:,} "
        f"tokens): " + ", ".join(f"d{d} {v['lr']:.3g}" for d, v in per_depth.items())
        + f"; lr(N) = {np.exp(a):.3g} N^{b:.3f}")
    return {"tokens": tokens, "multipliers": list(multipliers), "per_depth": per_depth,
            "law": {"a": float(a), "b": float(b)}, "seconds": sum(r["seconds"] for r in runs),
            "seconds_other": other,
            "lr_of": lambda params: float(np.exp(a) * params ** b)}


def _point(t: Trial) -> dict:
    counts = model_params(t.config)
    return {"non_embedding": counts["non_embedding"], "total": counts["total"],
            "tokens": t.tokens}


def predict(runs: list[dict], points: list[dict], names: list[str], samples: int) -> dict:
    """Every fit's prediction at ``points`` with its interval, the backtest of each fit, and
    the chosen fit (smallest backtest error; the first form and count when no backtest)."""
    two = len({r["tokens"] for r in runs}) > 1
    forms = FORMS if two else FORMS[:1]
    fits = {form: fit_trials(runs, samples, points, form) for form in forms}
    backtest = {form: {count: _backtest(runs, form, key) for count, key in COUNTS.items()}
                for form in forms}
    scored = [(err, form, count) for form in forms for count, err in backtest[form].items()
              if err is not None]
    _, form, count = min(scored) if scored else (None, forms[0], next(iter(COUNTS)))
    for f in forms:
        for c in COUNTS:
            _widen(fits[f][c]["prediction"], backtest[f][c] or 0.0)
    return {"targets": [{"name": n, **p} for n, p in zip(names, points)],
            "law": fits[forms[0]]["law"], "fits": fits, "backtest": backtest,
            "chosen": {"form": form, "count": count,
                       "by": "backtest" if scored else "default (too few runs to backtest)"}}


def _widen(p: dict, err: float) -> None:
    """The stated interval: the bootstrap's (kept as ``bootstrap_low``/``bootstrap_high``)
    widened to at least the prediction -+ the backtest's relative error."""
    p["bootstrap_low"], p["bootstrap_high"] = p["low"], p["high"]
    p["low"] = [min(lo, x * (1 - err)) for lo, x in zip(p["low"], p["loss"])]
    p["high"] = [max(hi, x * (1 + err)) for hi, x in zip(p["high"], p["loss"])]


def _backtest(runs: list[dict], form: str, key: str) -> float | None:
    """Mean relative error predicting the largest fitted depth's runs from the others."""
    top = max(r["depth"] for r in runs)
    train = [r for r in runs if r["depth"] < top]
    test = [r for r in runs if r["depth"] == top]
    two = len({r["tokens"] for r in runs}) > 1
    try:
        law = fit_law([r[key] for r in train], [r["val_loss"] for r in train],
                      [r["tokens"] for r in train] if two else None, form=form).law
    except ValueError:  # too few runs below the largest depth
        return None
    pred = law.loss([r[key] for r in test], [r["tokens"] for r in test] if two else None)
    real = np.array([r["val_loss"] for r in test])
    return float(np.mean(np.abs(pred - real) / real))


def _scores(predictions: dict, actual: list[dict]) -> list[dict]:
    rows = []
    for i, a in enumerate(actual):
        for form, fit in predictions["fits"].items():
            for count in COUNTS:
                p = fit[count]["prediction"]
                rows.append({"target": a["name"], "form": form, "count": count,
                             "backtest": predictions["backtest"][form][count],
                             "chosen": (form, count) == (predictions["chosen"]["form"],
                                                         predictions["chosen"]["count"]),
                             "predicted": p["loss"][i], "low": p["low"][i], "high": p["high"][i],
                             "trained": a["val_loss"],
                             "error": abs(p["loss"][i] - a["val_loss"]) / a["val_loss"],
                             "inside": p["low"][i] <= a["val_loss"] <= p["high"][i],
                             "inside_bootstrap": p.get("bootstrap_low", p["low"])[i]
                             <= a["val_loss"] <= p.get("bootstrap_high", p["high"])[i]})
    return rows


def table(r: dict) -> str:
    pr, d = r["predictions"], r["design"]
    dial = r.get("dial", {"aspect": 32, "head_dim": 32})
    lines = [f"Size dial: d_model = {dial['aspect']} x depth, heads of {dial['head_dim']}. "
             f"Fit: {len(r['runs'])} runs, {pr['law']}, sizes spanning {d['fit_span']:.1f}x, "
             f"tokens {', '.join(f'{t:,}' for t in d['fit_tokens'])}; targets "
             + ", ".join(f"{t['name']} ({x:.1f}x the largest fitted N)"
                         for t, x in zip(r["targets"], d["target_over_largest"]))
             + f". Training time: fitted runs {r['seconds_fit_runs'] / 60:.1f} min, targets "
             + ", ".join(f"{s / 60:.1f}" for s in r["seconds_targets"]) + " min. Chosen before "
             f"the targets trained (by {pr['chosen']['by']}): the {pr['chosen']['form']} form "
             f"with N counted {pr['chosen']['count']} (**bold** below).", "",
             "| run | params (non-embedding) | params (total) | tokens | val loss | seconds |",
             "|---|---|---|---|---|---|"]
    for x in [*r["runs"], *r["targets"]]:
        lines.append(f"| {x['name']} | {x['params_non_embedding']:,} | {x['params']:,} | "
                     f"{x['tokens']:,} | {x['val_loss']:.4f} | {x['seconds']:.0f} |")
    if r.get("lr_sweep"):
        lines += _lr_table(r["lr_sweep"], pr["targets"])
    lines += ["", "Interval: the bootstrap's 90% interval, widened to at least the prediction "
              "-+ the backtest error.", "",
              "| target | form | N counted | backtest error | predicted | interval | "
              "trained | error | inside | inside the bootstrap's |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in r["scores"]:
        b = "-" if s["backtest"] is None else f"{100 * s['backtest']:.2f}%"
        cells = [s["target"], s["form"], s["count"], b, f"{s['predicted']:.4f}",
                 f"[{s['low']:.4f}, {s['high']:.4f}]", f"{s['trained']:.4f}",
                 f"{100 * s['error']:.2f}%", "yes" if s["inside"] else "no",
                 "yes" if s.get("inside_bootstrap", s["inside"]) else "no"]
        if s["chosen"]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| fit | alpha (N) | beta (D) |", "|---|---|---|"]
    for form, fit in pr["fits"].items():
        for count in COUNTS:
            f = fit[count]["fit"]
            lines.append(f"| keenlm, {form}, N {count} | {f['alpha']:.3f} | "
                         + (f"{f['beta']:.3f} |" if f["B"] > 0 else "- |"))
    lines += [f"| {name} ({form}) | {a} | {b} |" for name, (form, a, b) in PUBLISHED.items()]
    return "\n".join(lines)


def _lr_table(lr: dict, targets: list[dict]) -> list[str]:
    mults = sorted(lr["multipliers"])
    lines = ["", f"Learning rate, tuned first: every fitted depth at {lr['tokens']:,} tokens with "
             f"x{', x'.join(map(str, mults))} the size dial's rate (validation loss at each; "
             "the best, in bold, is the rate of all that depth's runs, and that run is its "
             f"fitted run at this token count; the sweep took {lr['seconds'] / 60:.1f} min, "
             "all counted in the fitted runs' time). A best rate at the edge of the sweep is "
             "marked *.", "",
             "| depth | best rate | " + " | ".join(f"x{m}" for m in mults) + " |",
             "|---|---|" + "---|" * len(mults)]
    for d, v in lr["per_depth"].items():
        rates = sorted(v["losses"], key=float)  # in the order of the multipliers
        cells = [("**{:.4f}**" if float(k) == v["lr"] else "{:.4f}").format(v["losses"][k])
                 for k in rates]
        lines.append(f"| {d}{' *' if v['at_edge'] else ''} | {v['lr']:.3g} | "
                     + " | ".join(cells) + " |")
    law = lr["law"]
    lines += ["", f"Fitted to the best rates: lr(N) = {math.exp(law['a']):.3g} N^{law['b']:.3f} "
              "(N without embeddings); targets: " + ", ".join(
                  f"{t['name']} lr {t['lr']:.3g}" for t in targets if "lr" in t) + "."]
    return lines


def _chart(r: dict, path: Path) -> None:
    pr = r["predictions"]
    form, count = pr["chosen"]["form"], pr["chosen"]["count"]
    key, fit = COUNTS[count], pr["fits"][form][count]
    law = Law(**fit["fit"])
    xs_all = [x[key] for x in [*r["runs"], *r["targets"]]]
    lo, hi = min(xs_all), max(xs_all)
    xs = [lo * (hi / lo) ** (i / 40) for i in range(41)]
    series = {}
    for d in sorted({x["tokens"] for x in [*r["runs"], *r["targets"]]}):
        trained = [(x[key], x["val_loss"]) for x in r["runs"] if x["tokens"] == d]
        if trained:
            series[f"trained, {d:,} tokens"] = trained
        series[f"fit, {d:,} tokens"] = [(x, float(law.loss(x, d if law.two_variable else None)))
                                        for x in xs]
    p = fit["prediction"]
    series["prediction interval"] = [pt for i, t in enumerate(pr["targets"])
                                     for pt in ((t[count], p["low"][i]), (t[count], p["high"][i]))]
    series["targets, trained after"] = [(x[key], x["val_loss"]) for x in r["targets"]]
    line_chart(series, path, x_label=f"parameters ({count.replace('_', ' ')}; log scale)",
               y_label="validation loss (nats/token)", log_x=True)
