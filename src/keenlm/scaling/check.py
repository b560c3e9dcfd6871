"""The prediction check: fit L(N) on small models, predict a bigger one, then train it.

``prediction_check`` trains models of several depths (the size dial) on the same number of
tokens of the stdlib corpus, fits L(N) = E + A / N^alpha (approach 3) with N counted without
embeddings and, separately, with them, and writes the predicted validation loss of a model of
``target_depth`` (with a bootstrap interval) to ``prediction.json`` *before* that model is
trained. Then it trains the target and reports the error of each prediction. All runs see the
same D tokens, so the data term of L(N, D) is a constant absorbed into E: the law is
extrapolated in N at fixed D, which is what the check measures.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from keenlm.plot import line_chart
from keenlm.runs import atomic_write_text
from keenlm.scaling.fit import Law
from keenlm.scaling.sweep import (COUNTS, base_config, fit_trials, grid, model_params, run_sweep,
                                  run_trial)

Log = Callable[[str], None]


def prediction_check(out: str | Path, fit_depths=(1, 2, 3, 4, 5), target_depth: int = 8,
                     tokens: int = 4_000_000, backend: str = "local", samples: int = 200,
                     base: dict | None = None, log: Log = print) -> dict:
    out = Path(out)
    if len(fit_depths) < 3 or target_depth <= max(fit_depths):
        raise ValueError("fit on >= 3 depths and predict a deeper model than all of them")
    base = base or base_config()
    t0 = time.perf_counter()
    to_fit = grid(base, fit_depths, [tokens])
    target = grid(base, [target_depth], [tokens])[0]
    sizes = [model_params(t.config)["non_embedding"] for t in to_fit]
    n_target = model_params(target.config)["non_embedding"]
    design = {"fit_span": max(sizes) / min(sizes), "target_over_largest": n_target / max(sizes)}
    log(f"fit sizes {sizes} (span {design['fit_span']:.1f}x), target {n_target:,} "
        f"({design['target_over_largest']:.1f}x the largest), {tokens:,} tokens each")
    sweep = run_sweep(to_fit, out, backend=backend, log=log)
    if sweep["failed"]:
        raise RuntimeError(f"trials failed: {sweep['failed']}")
    runs = sweep["results"]
    pred_path = out / "prediction.json"
    if pred_path.exists():  # a resumed check keeps the prediction made before the target ran
        predictions = json.loads(pred_path.read_text())
    else:
        n = {"non_embedding": n_target, "total": model_params(target.config)["total"]}
        predictions = {"target": target.name, "n": n, **fit_trials(runs, samples, query_n=n)}
        atomic_write_text(pred_path, json.dumps(predictions, indent=2) + "\n")
    for count in COUNTS:
        p = predictions[count]["prediction"]
        log(f"predicted ({count} params): {p['loss'][0]:.4f} "
            f"[{p['low'][0]:.4f}, {p['high'][0]:.4f}]")
    actual = run_trial(target, out)
    log(f"{target.name}: val loss {actual['val_loss']:.4f}")
    seconds = time.perf_counter() - t0
    result = {"tokens": tokens, "fit_depths": list(fit_depths), "target_depth": target_depth,
              "design": design, "runs": runs, "target": actual, "predictions": predictions,
              "seconds_this_call": seconds,
              "seconds_training": sum(r["seconds"] for r in runs) + actual["seconds"]}
    for count in COUNTS:
        p = predictions[count]["prediction"]
        result[f"error_{count}"] = abs(p["loss"][0] - actual["val_loss"]) / actual["val_loss"]
        result[f"inside_interval_{count}"] = p["low"][0] <= actual["val_loss"] <= p["high"][0]
    atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "results.md", table(result) + "\n")
    law = Law(**predictions["non_embedding"]["fit"])
    xs = [min(sizes) * (n_target / min(sizes)) ** (i / 40) for i in range(41)]
    p = predictions["non_embedding"]["prediction"]
    line_chart({"trained (fit)": [(r["params_non_embedding"], r["val_loss"]) for r in runs],
                "fit L(N)": [(x, float(law.loss(x))) for x in xs],
                "prediction interval": [(n_target, p["low"][0]), (n_target, p["high"][0])],
                "target, trained after": [(n_target, actual["val_loss"])]},
               out / "scaling.svg", x_label="parameters without embeddings (log scale)",
               y_label="validation loss (nats/token)", log_x=True)
    return result


def table(r: dict) -> str:
    lines = [f"Fixed {r['tokens']:,} training tokens per model; fit span "
             f"{r['design']['fit_span']:.1f}x, target {r['design']['target_over_largest']:.1f}x "
             f"the largest fitted model; training time {r['seconds_training'] / 60:.1f} min.", "",
             "| run | params (non-embedding) | params (total) | val loss | seconds |",
             "|---|---|---|---|---|"]
    for x in [*r["runs"], r["target"]]:
        lines.append(f"| {x['name']} | {x['params_non_embedding']:,} | {x['params']:,} | "
                     f"{x['val_loss']:.4f} | {x['seconds']:.0f} |")
    lines += ["", "| N counted | E | A | alpha | predicted | 90% interval | trained | error |",
              "|---|---|---|---|---|---|---|---|"]
    for count in COUNTS:
        f, p = r["predictions"][count]["fit"], r["predictions"][count]["prediction"]
        lines.append(f"| {count} | {f['E']:.3f} | {f['A']:.3g} | {f['alpha']:.3f} | "
                     f"{p['loss'][0]:.4f} | [{p['low'][0]:.4f}, {p['high'][0]:.4f}] | "
                     f"{r['target']['val_loss']:.4f} | {100 * r[f'error_{count}']:.2f}% |")
    return "\n".join(lines)
