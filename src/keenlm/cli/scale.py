"""``keenlm scale sweep|fit|predict|plan|check``: scaling laws from the command line
(keenlm.scaling), one short function per action."""
from __future__ import annotations

import json
from pathlib import Path

from keenlm.config import load_file, merge
from keenlm.runs import atomic_write_text
from keenlm.scaling import check, sweep
from keenlm.scaling.fit import PRESETS, Law, interval
from keenlm.scaling.sweep import COUNTS


def _numbers(text: str, kind=float) -> list:
    try:
        return [kind(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{text!r}: a comma-separated list of numbers") from None


def fit_sweep(folder, samples: int = 200) -> dict:
    """Fit every finished trial of a sweep folder (``sweep.fit_trials``)."""
    return sweep.fit_trials(sweep.finished(folder), samples)


def _base(args) -> dict:
    """The sweeps' base config, with ``--config`` (a YAML/JSON file of overrides) on top."""
    base = sweep.base_config(seq=args.seq_len, batch=args.batch_size)
    return merge(base, load_file(args.config)) if args.config else base


def _sweep(args) -> int:
    base = _base(args)
    atomic_write_text(Path(args.out) / "base.json", json.dumps(base, indent=2) + "\n")
    depths = _numbers(args.depths, int)
    trials = (sweep.isoflop(base, depths, _numbers(args.isoflop), aspect=args.aspect,
                            head_dim=args.head_dim) if args.isoflop else
              sweep.grid(base, depths, _numbers(args.tokens or "4e6", int), aspect=args.aspect,
                         head_dim=args.head_dim))
    res = sweep.run_sweep(trials, args.out, backend=args.backend)
    print(f"{len(res['results'])} trials finished, {len(res['failed'])} failed")
    for name, err in res["failed"].items():
        print(f"  failed: {name}: {err}")
    return 1 if res["failed"] else 0


def _targets(text: str) -> list[tuple[int, int]]:
    """'8:2e6,10:1e6' -> [(8, 2000000), (10, 1000000)]: each target's depth and tokens."""
    try:
        pairs = [v.split(":") for v in text.split(",") if v.strip()]
        return [(int(d), int(float(t))) for d, t in pairs]
    except ValueError:
        raise ValueError(f"--targets {text!r}: DEPTH:TOKENS pairs, comma-separated "
                         "(e.g. 8:2e6,10:1e6)") from None


def _check(args) -> int:
    quick = dict(fit_depths=(1, 2, 3), fit_tokens=(100_000, 200_000), targets=((4, 200_000),),
                 samples=50)
    tokens = _numbers(args.tokens or "1e6,2e6", int)
    kw = quick if args.quick else dict(
        fit_depths=tuple(_numbers(args.depths, int)), fit_tokens=tokens,
        targets=_targets(args.targets) if args.targets else [(args.target_depth, max(tokens))])
    lr_sweep = tuple(_numbers(args.lr_sweep, float)) if args.lr_sweep else ()
    r = check.prediction_check(args.out, backend=args.backend, base=_base(args),
                               lr_sweep=lr_sweep, aspect=args.aspect, head_dim=args.head_dim, **kw)
    print(check.table(r))
    return 0


def _plan(args) -> int:
    if args.flops <= 0:
        raise ValueError(f"--flops {args.flops}: a positive FLOP budget")
    fit = None if args.law in PRESETS else fit_sweep(args.law, samples=args.samples)
    if fit is not None and fit["law"] != "L(N, D)":
        raise ValueError(f"{args.law}: every trial has the same token count, so the fit is "
                         "L(N) alone; planning needs a sweep over tokens too")
    law = PRESETS[args.law] if fit is None else Law(**fit["non_embedding"]["fit"])
    n, d = law.optimal(args.flops)
    line = f"with {args.flops:.3g} FLOPs, train N = {n:,.0f} params on D = {d:,.0f} tokens; "
    if fit is None:
        line += (f"expected loss {float(law.loss(n, d)):.4f} ({args.law}'s constants: "
                 "their tokenizer and data)")
    else:
        p = interval(fit["non_embedding"], n, d)
        line += f"expected loss {p['loss'][0]:.4f} [{p['low'][0]:.4f}, {p['high'][0]:.4f}] (90%)"
    print(line)
    return 0


def _fit(args) -> int:
    fit = fit_sweep(args.out, samples=args.samples)
    atomic_write_text(Path(args.out) / "fit.json", json.dumps(fit, indent=2) + "\n")
    for count in COUNTS:
        f, c = fit[count]["fit"], fit[count]["constants"]
        print(f"{fit['law']} with N {count}: " + ", ".join(
            f"{k} {f[k]:.4g} [{c[k][0]:.4g}, {c[k][1]:.4g}]" for k in c))
    return 0


def _predict(args) -> int:
    """A model of --depth trained on --tokens (the sweep's own count for an L(N) fit)."""
    fit = fit_sweep(args.out, samples=args.samples)
    tokens = int(float(args.tokens or "4e6")) if fit["law"] == "L(N, D)" else fit["tokens"]
    saved = Path(args.out) / "base.json"
    base = json.loads(saved.read_text()) if saved.exists() else _base(args)
    trial = sweep.grid(base, [args.depth], [tokens])[0]
    counts = sweep.model_params(trial.config)
    for count in COUNTS:
        p = interval(fit[count], counts[count], trial.tokens if fit["law"] == "L(N, D)" else None)
        print(f"depth {args.depth} ({counts[count]:,} params, {count}): predicted loss "
              f"{p['loss'][0]:.4f} [{p['low'][0]:.4f}, {p['high'][0]:.4f}] (90%)")
    return 0


ACTIONS = {"sweep": _sweep, "fit": _fit, "predict": _predict, "plan": _plan, "check": _check}


def add_parser(sub, fmt):
    s = sub.add_parser("scale", help="scaling laws: sweep sizes x tokens, fit, predict, plan, "
                       "and the prediction check", formatter_class=fmt)
    s.add_argument("action", choices=tuple(ACTIONS))
    s.add_argument("out", nargs="?", default="runs/scale", help="the sweep's folder")
    s.add_argument("--depths", default="1,2,3,4,5", help="sweep/check: depths of the size dial "
                   "(d_model = --aspect x depth, heads of --head-dim)")
    s.add_argument("--tokens", default="", help="sweep: training tokens (a list: a grid; "
                   "default 4e6); check: the fitted runs' token counts (default 1e6,2e6: "
                   "L(N, D); one count: L(N)); predict: tokens of the predicted run")
    s.add_argument("--isoflop", default="", help="sweep: FLOP budgets; each depth trained on "
                   "C / (6 N) tokens (approach 2) instead of --tokens")
    s.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="sweep/check: trials in sequence, or as Ray tasks (pip install ray)")
    s.add_argument("--config", default="", help="sweep/check: a YAML/JSON file of config "
                   "overrides for every run (e.g. another corpus or tokenizer)")
    s.add_argument("--seq-len", type=int, default=256,
                   help="sweep/check: tokens per training sequence (and the model's context)")
    s.add_argument("--batch-size", type=int, default=16, help="sweep/check: sequences per step")
    s.add_argument("--aspect", type=int, default=32, help="sweep/check: the size dial's d_model "
                   "per layer (d_model = aspect x depth; smaller: a ladder of narrower models)")
    s.add_argument("--head-dim", type=int, default=32, help="sweep/check: the size dial's "
                   "attention head width (d_model is rounded to a multiple of it)")
    s.add_argument("--depth", type=int, default=8, help="predict: the model to predict")
    s.add_argument("--target-depth", type=int, default=8, help="check: the model to predict, "
                   "on the largest of --tokens (when --targets is not given)")
    s.add_argument("--targets", default="", help="check: DEPTH:TOKENS pairs to predict, all "
                   "written down before any is trained (e.g. 8:2e6,10:1e6)")
    s.add_argument("--lr-sweep", default="", help="check: multipliers of the size dial's "
                   "learning rate (e.g. 0.25,0.5,1): each fitted depth is trained with each at "
                   "the smallest --tokens first and keeps the best; a power law in N fitted to "
                   "those rates sets the targets'")
    s.add_argument("--samples", type=int, default=200, help="bootstrap resamples")
    s.add_argument("--flops", type=float, default=0.0, help="plan: the FLOP budget")
    s.add_argument("--law", default="chinchilla", help="plan: a sweep folder to fit, or a "
                   "preset: chinchilla | epoch")
    s.add_argument("--quick", action="store_true", help="check: depths 1-3 on 100k and 200k "
                   "tokens predict depth 4 on 200k (a smoke run)")
    return s


def run(args) -> int:
    return ACTIONS[args.action](args)
