"""``keenlm study``: measured answers to "which technique pays off at my scale?".

Every study writes ``results.json``, ``results.md`` (a table) and charts (SVG, and PNG where
matplotlib is installed) into its output folder; a finished run inside it is kept
(``finished``/``record``), so an interrupted study resumes. This module holds four of them;
``study_tts`` (test-time compute), ``study_law2`` (epochs, GRPO group size), ``study_moe``,
``study_select`` (selective backprop) and ``study_memory`` (neural memory) hold the others:

- ``frontier``: the bits-vs-quality frontier. For each size (d_model x layers; heads of 64,
  SwiGLU width and learning rate by the preset rules) and each linear kind (dense fp32, int4,
  int2, ternary quantization-aware training), a model is trained on the stdlib corpus with the
  same tokens; the low-bit ones are converted to packed weights (int8 embedding). Validation loss of the model *as stored* against its bytes.
  Optionally, ternary runs at the middle size that switch from full precision to QAT at given
  fractions of training (``train.qat_start``), to find the fraction that works best.
- ``ptq``: one model (a run, a GGUF file such as SmolLM2, an HF folder) quantized by several
  methods and bit widths (``keenlm quantize``'s code), each evaluated on the same held-out text.
- ``rl``: supervised warm-up on a verifiable task, then GRPO and rejection-sampling fine-tuning
  from the same policy for the same wall time (``rl`` below).
- ``tts``: a small policy with test-time search against a >= 10x larger one answering greedily,
  in accuracy and total FLOPs (``keenlm.study_tts``).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

Log = Callable[[str], None]

KIND_LABEL = {"dense": "fp32", "int4": "int4 QAT", "int2": "2-bit QAT", "ternary": "ternary QAT"}


def finished(folder: Path, config: dict) -> dict | None:
    """A study's finished run (its ``study.json``), or None; one made with another config is
    an error, so a study folder is never silently mixed."""
    path = folder / "study.json"
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    if rec.get("config") != config:
        raise ValueError(f"{folder} was run with other settings; use another output folder")
    return rec


def record(folder: Path, rec: dict) -> None:
    """Mark a study's run finished: ``study.json`` (with its ``config``), written atomically."""
    from keenlm.runs import atomic_write_text

    atomic_write_text(folder / "study.json", json.dumps(rec, indent=2) + "\n")


def train_run(cfg: dict, name: str):
    """Train one run of a study: (TrainResult, seconds). A run stopped halfway is an error
    (running the study again continues it from its checkpoint)."""
    import keenlm

    t0 = time.perf_counter()
    res = keenlm.train(cfg)
    if res.interrupted:
        raise KeyboardInterrupt(f"the {name} run was stopped; run again to continue")
    return res, time.perf_counter() - t0


def _write(out: Path, results: dict, table: str) -> None:
    from keenlm.runs import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", table + "\n")


# --------------------------------------------------------------------------------- frontier


def parse_size(text: str) -> tuple[int, int]:
    """"128x4" -> (d_model 128, 4 layers)."""
    try:
        d, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r}: write d_model x layers, e.g. 128x4") from None
    if d % 64 or n < 1:
        raise ValueError(f"size {text!r}: d_model must be a multiple of 64 (heads of 64), layers >= 1")
    return d, n


def _frontier_config(size: tuple[int, int], kind: str, steps: int, out_dir: Path,
                     qat_start: float = 0.0, batch: int = 16, seq: int = 256):
    from keenlm.config import from_dict

    d_model, n_layer = size  # d_ff and lr (0) follow the preset rules (keenlm.presets.resolve)
    p = {"model": {"n_layer": n_layer, "d_model": d_model, "n_head": d_model // 64, "linear": kind,
                   "max_seq_len": seq, "lowbit_per_channel": True}, "train": {}}
    p["data"] = {"tokenizer": "bpe", "vocab_size": 4096, "max_bytes": 12_000_000}
    p["train"].update({"steps": steps, "batch_size": batch, "seq_len": seq, "schedule": "wsd",
                       "decay_fraction": 0.25, "eval_every": 0, "eval_batches": 40,
                       "warmup_steps": max(1, steps // 30), "dtype": "auto", "qat_start": qat_start,
                       "out_dir": str(out_dir), "resume": True, "progress": False})
    return from_dict(p)


def _measure_run(run_dir: Path, kind: str) -> dict:
    """Loss and bytes of a trained run as it would be stored: fp32 for dense; packed
    (convert_qat) with an int8 embedding for the low-bit kinds."""
    import keenlm
    from keenlm.config import QuantConfig
    from keenlm.model.packing import convert_qat
    from keenlm.quantize import model_bytes, store_tables

    km = keenlm.load(run_dir)
    params = sum(p.numel() for p in km.net.parameters())
    trained = km.evaluate(max_batches=40)["loss"]
    if kind == "dense":
        return {"loss": trained, "loss_trained": trained, "bytes": params * 4, "params": params}
    convert_qat(km.net)
    store_tables(km.net, QuantConfig(embed="int8"))
    km.quant = {"embed": "int8", "head": "int8"}
    b = model_bytes(km)
    return {"loss": km.evaluate(max_batches=40)["loss"], "loss_trained": trained,
            "bytes": b["total"], "params": params}


def frontier(out: str | Path, sizes=("64x2", "128x2", "128x4"),
             kinds=("dense", "int4", "int2", "ternary"), steps: int = 500, qat_starts=(),
             log: Log = print) -> dict:
    from keenlm.train import train

    out = Path(out)
    rows = []
    plan = [(s, k, 0.0) for s in sizes for k in kinds]
    mid = list(sizes)[len(sizes) // 2]
    plan += [(mid, "ternary", s) for s in qat_starts if s > 0]
    for size, kind, start in plan:
        name = f"{size}-{kind}" + (f"-from{start:g}" if start else "")
        cfg = _frontier_config(parse_size(size), kind, steps, out / "runs" / name, start)
        t0 = time.perf_counter()
        res = train(cfg)
        m = _measure_run(Path(res.run_dir), kind)
        tokens = steps * cfg.train.batch_size * cfg.train.seq_len
        rows.append({"name": name, "size": size, "d_model": cfg.model.d_model,
                     "n_layer": cfg.model.n_layer, "kind": kind,
                     "qat_start": start, "tokens": tokens, "seconds": time.perf_counter() - t0, **m})
        log(f"{name}: loss {m['loss']:.4f} (as trained {m['loss_trained']:.4f}), "
            f"{m['bytes'] / 1e6:.3f} MB, {m['params']:,} params")
        _write(out, {"rows": rows}, _frontier_table(rows))  # partial results survive a stop
    _svg_frontier(rows, out / "frontier.svg")
    return {"rows": rows}


def _frontier_table(rows: list[dict]) -> str:
    dense = {r["size"]: r["loss"] for r in rows if r["kind"] == "dense"}
    lines = ["| model | d_model x layers | params | tokens | QAT from | bytes (MB) | "
             "val loss (stored) | val loss (as trained) | vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = (f"{100 * (r['loss'] / dense[r['size']] - 1):+.1f}%" if r["size"] in dense else "")
        lines.append(f"| {KIND_LABEL[r['kind']]} | {r['size']} | "
                     f"{r['params']:,} | {r['tokens']:,} | {r['qat_start'] or '-'} | "
                     f"{r['bytes'] / 1e6:.3f} | {r['loss']:.4f} | {r['loss_trained']:.4f} | {rel} |")
    return "\n".join(lines)


def _svg_frontier(rows: list[dict], path: Path) -> None:
    """Validation loss against model bytes (log scale), one line per kind: a plain SVG file."""
    from keenlm.runs import atomic_write_text

    pts = [r for r in rows if not r["qat_start"]]
    if not pts:
        return
    W, H, L, B = 640, 420, 70, 50
    xs = [math.log10(r["bytes"]) for r in pts]
    ys = [r["loss"] for r in pts]
    x0, x1 = min(xs) - 0.05, max(xs) + 0.05
    y0, y1 = min(ys) - 0.05, max(ys) + 0.05
    X = lambda v: L + (v - x0) / (x1 - x0) * (W - L - 20)  # noqa: E731
    Y = lambda v: 20 + (y1 - v) / (y1 - y0) * (H - 20 - B)  # noqa: E731
    colors = {"dense": "#222222", "int4": "#1f77b4", "int2": "#2ca02c", "ternary": "#d62728"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<line x1="{L}" y1="{H - B}" x2="{W - 20}" y2="{H - B}" stroke="black"/>',
             f'<line x1="{L}" y1="20" x2="{L}" y2="{H - B}" stroke="black"/>',
             f'<text x="{(W + L) / 2}" y="{H - 10}" text-anchor="middle">model bytes (log scale)</text>',
             f'<text x="15" y="{H / 2}" transform="rotate(-90 15 {H / 2})" text-anchor="middle">'
             f'validation loss (nats/token)</text>']
    for e in range(math.floor(x0), math.ceil(x1) + 1):
        for m in (1, 2, 5):
            v = e + math.log10(m)
            if x0 <= v <= x1:
                label = f"{m * 10 ** e / 1e6:g} MB"
                parts.append(f'<line x1="{X(v):.1f}" y1="{H - B}" x2="{X(v):.1f}" y2="{H - B + 5}" '
                             f'stroke="black"/><text x="{X(v):.1f}" y="{H - B + 18}" '
                             f'text-anchor="middle">{label}</text>')
    for i in range(6):
        v = y0 + (y1 - y0) * i / 5
        parts.append(f'<text x="{L - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for k, kind in enumerate(colors):
        series = sorted((r for r in pts if r["kind"] == kind), key=lambda r: r["bytes"])
        if not series:
            continue
        line = " ".join(f"{X(math.log10(r['bytes'])):.1f},{Y(r['loss']):.1f}" for r in series)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colors[kind]}" stroke-width="2"/>')
        for r in series:
            parts.append(f'<circle cx="{X(math.log10(r["bytes"])):.1f}" cy="{Y(r["loss"]):.1f}" '
                         f'r="4" fill="{colors[kind]}"><title>{r["name"]}: {r["loss"]:.4f}</title></circle>')
        parts.append(f'<rect x="{W - 150}" y="{28 + 18 * k}" width="12" height="12" fill="{colors[kind]}"/>'
                     f'<text x="{W - 132}" y="{38 + 18 * k}">{KIND_LABEL[kind]}</text>')
    parts.append("</svg>")
    atomic_write_text(path, "\n".join(parts) + "\n")


# --------------------------------------------------------------------------------- ptq


DEFAULT_PTQ = ("4:rtn:64", "4:gptq:64", "4:gptq:128", "3:rtn:64", "3:gptq:64", "2:rtn:64",
               "2:gptq:64", "1.58:rtn:0", "1.58:gptq:0")


def ptq(model: str, out: str | Path, recipes=DEFAULT_PTQ, eval_batches: int = 10,
        qat_steps: int = 0, log: Log = print) -> dict:
    """Evaluate ``model`` in fp32 and quantized by each recipe "bits:method:group" on the
    same held-out text; ``qat_steps`` > 0 adds 2-bit QAT of that many steps."""
    import dataclasses

    import keenlm
    from keenlm.config import DataConfig, QuantConfig
    from keenlm.quantize import model_bytes, quantize

    out = Path(out)
    rows = []

    def evaluate(km):
        if km.run_dir is None:  # an imported model: the held-out split of the 4 MB of stdlib
            # text whose training split GPTQ calibrates on (keenlm.quantize._calibration)
            km.config = dataclasses.replace(km.config, data=DataConfig(max_bytes=4_000_000))
            return km.evaluate(max_batches=eval_batches, batch_size=4, seq_len=512)
        return km.evaluate(max_batches=eval_batches)

    base = keenlm.load(model)
    params = sum(p.numel() for p in base.net.parameters())
    ev = evaluate(base)
    rows.append({"recipe": "fp32", "bits": 32, "method": "-", "group": "-", "bytes": params * 4,
                 "loss": ev["loss"], "perplexity": ev["perplexity"], "seconds": 0.0})
    log(f"fp32: perplexity {ev['perplexity']:.4f}")
    del base
    recipes = list(recipes) + ([f"2:qat:0:{qat_steps}"] if qat_steps else [])
    for recipe in recipes:
        bits, method, group, *rest = recipe.split(":")
        q = QuantConfig(bits=bits, method=method, group=int(group),
                        **({"qat_steps": int(rest[0])} if rest else {}))
        t0 = time.perf_counter()
        km = quantize(model, q, log=None, qat_dir=out / "qat-run" if method == "qat" else None)
        seconds = time.perf_counter() - t0
        ev = evaluate(km)
        b = model_bytes(km)
        rows.append({"recipe": recipe, "bits": bits, "method": method,
                     "group": q.group_size or "row", "bytes": b["total"], "loss": ev["loss"],
                     "perplexity": ev["perplexity"], "seconds": seconds})
        log(f"{recipe}: perplexity {ev['perplexity']:.4f}, {b['total'] / 1e6:.1f} MB, "
            f"{seconds:.0f} s to quantize")
        _write(out, {"model": str(model), "rows": rows}, _ptq_table(rows))
    return {"model": str(model), "rows": rows}


def _ptq_table(rows: list[dict]) -> str:
    fp = rows[0]["perplexity"]
    lines = ["| recipe | bits | method | group | weights (MB) | perplexity | vs fp32 | quantize (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['bits']} | {r['method']} | {r['group']} | "
                     f"{r['bytes'] / 1e6:.1f} | {r['perplexity']:.4f} | "
                     f"{100 * (r['perplexity'] / fp - 1):+.2f}% | {r['seconds']:.0f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- rl


def _warmup_config(size: str, demos: Path, steps: int, out_dir: Path, max_seq_len: int,
                   **train) -> dict:
    """Supervised warm-up of a byte-level policy on a task's demonstrations (batch 16 x 256)."""
    d, n_layer = parse_size(size)
    return {"model": {"n_layer": n_layer, "d_model": d, "n_head": d // 64, "max_seq_len": max_seq_len},
            "data": {"corpus": str(demos), "tokenizer": "byte",
                     "cache_dir": str(out_dir.parent / "cache"), "val_fraction": 0.05},
            "train": {"steps": steps, "batch_size": 16, "seq_len": 256, "eval_every": 0,
                      "out_dir": str(out_dir), "progress": False, **train}}


def rl_start(out: Path, task: str, difficulty: int, size: str, sft_steps: int, start_at: float,
             eval_n: int, samples: int, log: Log = print) -> dict:
    """The starting policy of the RL studies: supervised warm-up of a byte-level ``size``
    policy on 6000 demonstrations of the task (resumable, checkpoints every 100 steps); the
    first checkpoint whose greedy pass@1 on a validation set reaches ``start_at`` (the last
    otherwise). The validation problems come from the train split and are not among the
    demonstrations, so the held-out test split plays no part in the choice.

    Returns {"task", "policy": a function giving a fresh copy of the starting policy,
    "held_out": a function scoring a policy on the test split, "start": its scores,
    "start_step", "sft_seconds", "warmup_validation"}."""
    import keenlm
    from keenlm.config import from_dict
    from keenlm.data.tasks import complete, evaluate_task, get_task, write_demonstrations
    from keenlm.model import load_model_state
    from keenlm.runs import load_model_state as read_weights
    from keenlm.train import Trainer

    parse_size(size)  # a bad size fails before any work
    t = get_task(task, difficulty)
    n_demos = 6000
    demos = write_demonstrations(t, out / "demonstrations.jsonl", n_demos)
    pool = t.problems("train", n_demos + 3 * eval_n)
    seen = {p.prompt for p in pool[:n_demos]}
    val = [p for p in pool[n_demos:] if p.prompt not in seen][:eval_n]
    if len(val) < eval_n // 2:
        raise ValueError(f"task {t.name} has too few distinct training problems for a validation "
                         f"set beside {n_demos} demonstrations; raise the difficulty")
    sft_cfg = _warmup_config(size, demos, sft_steps, out / "sft", 256, lr=3e-3, save_every=100,
                             keep_checkpoints=sft_steps // 100 + 1)
    t0 = time.perf_counter()
    Trainer(from_dict(sft_cfg)).fit()
    sft_s = time.perf_counter() - t0

    policy = keenlm.load(out / "sft")
    warmup_curve, chosen = [], None
    for ckpt in sorted((out / "sft" / "checkpoints").glob("step-*")):
        load_model_state(policy.net, read_weights(ckpt))
        comps = complete(policy.net, policy.tokenizer, [p.prompt for p in val], max_new_tokens=32)
        rate = sum(r == 1.0 for r in t.reward([p.prompt for p in val], comps)) / len(val)
        warmup_curve.append((int(ckpt.name.split("-")[1]), rate))
        if rate >= start_at:
            chosen = ckpt
            break
    chosen = chosen or ckpt
    start_step = int(chosen.name.split("-")[1])

    def starting_policy():
        km = keenlm.load(out / "sft")
        load_model_state(km.net, read_weights(chosen))
        return km

    def held_out(km) -> dict:
        ev = evaluate_task(km.net, km.tokenizer, t, n=eval_n, samples=samples, ks=(samples,),
                           max_new_tokens=32)
        return {"pass@1": ev["pass@1 greedy"]["success"], f"pass@{samples}": ev[f"pass@{samples}"],
                f"maj@{samples}": ev[f"maj@{samples}"]}

    start = held_out(starting_policy())
    log(f"supervised warm-up: {sft_s:.0f} s; validation pass@1 by step {warmup_curve}; starting "
        f"from step {start_step}: held-out greedy pass@1 {start['pass@1']:.3f}, pass@{samples} "
        f"{start[f'pass@{samples}']:.3f}")
    return {"task": t, "policy": starting_policy, "held_out": held_out, "start": start,
            "start_step": start_step, "sft_seconds": sft_s, "warmup_validation": warmup_curve}


def rl(out: str | Path, task: str = "countdown", difficulty: int = 2, size: str = "128x4",
       sft_steps: int = 1500, start_at: float = 0.2, budget_s: float = 880.0,
       algos=("grpo", "rft"), eval_n: int = 200, samples: int = 8, rl_options: dict | None = None,
       log: Log = print) -> dict:
    """Supervised warm-up on task demonstrations (``rl_start``), then each RL algorithm from
    that same policy for ``budget_s`` seconds of wall time (sampling, updates and the periodic
    held-out evaluations all count). Reports held-out greedy pass@1 before and after, pass@k
    and maj@k of the samples, and the curves (``pass_at_1.svg``, ``reward.svg``, each run's
    metrics)."""
    import keenlm
    from keenlm.config import RLConfig, section_from_dict
    from keenlm.plot import line_chart
    from keenlm.runs import read_jsonl
    from keenlm.train.grpo import RLTrainer

    out = Path(out)
    s0 = rl_start(out, task, difficulty, size, sft_steps, start_at, eval_n, samples, log)
    t, starting_policy, held_out, start = s0["task"], s0["policy"], s0["held_out"], s0["start"]
    sft_s, start_step, warmup_curve = s0["sft_seconds"], s0["start_step"], s0["warmup_validation"]
    results = {"task": t.name, "size": size, "sft_steps": start_step, "sft_seconds": sft_s,
               "warmup_validation": warmup_curve, "start_at": start_at, "budget_s": budget_s,
               "eval_n": eval_n, "sft": start, "runs": []}
    curves, rewards = {}, {}
    for algo in algos:
        cfg = section_from_dict("rl", RLConfig, {**(rl_options or {}), "task": task,
                                                 "difficulty": difficulty, "algo": algo,
                                                 "steps": 1_000_000, "time_budget_s": budget_s,
                                                 "eval_n": eval_n, "out_dir": str(out / algo),
                                                 "resume": False, "progress": False}, RLConfig())
        t0 = time.perf_counter()
        res = RLTrainer(starting_policy(), cfg).fit()
        seconds = time.perf_counter() - t0
        final = held_out(keenlm.load(out / algo))
        recs = read_jsonl(out / algo / "metrics.jsonl")
        evals = [r for r in recs if r["kind"] == "eval"]
        curves[algo.upper()] = [(r["elapsed_s"] / 60, r["pass@1"]) for r in evals]
        rewards[algo.upper()] = [(r["elapsed_s"] / 60, r["reward_mean"]) for r in recs
                                 if r["kind"] == "rl"]
        row = {"algo": algo, "loss": cfg.loss, "steps": res.step, "seconds": seconds,
               "start": res.start_eval["pass@1"], "final": final,
               "gain": final["pass@1"] - res.start_eval["pass@1"],
               "best": max(r["pass@1"] for r in evals),
               "samples_per_step": cfg.prompts * cfg.group, "lr": cfg.lr}
        results["runs"].append(row)
        log(f"{algo}: {res.step} steps in {seconds:.0f} s; held-out greedy pass@1 "
            f"{row['start']:.3f} -> {final['pass@1']:.3f} ({100 * row['gain']:+.1f} points)")
        _write(out, results, _rl_table(results))
    line_chart(curves, out / "pass_at_1.svg", x_label="minutes of RL (wall clock, this machine)",
               y_label=f"held-out greedy pass@1 ({eval_n} problems)", y_range=(0.0, 1.0))
    line_chart(rewards, out / "reward.svg", x_label="minutes of RL (wall clock, this machine)",
               y_label="mean sampled reward", y_range=(0.0, 1.0))
    return results


def _rl_table(res: dict) -> str:
    s = res["sft"]
    k = max(int(key.split("@")[1]) for key in s if key.startswith("pass@"))
    lines = [f"Task {res['task']}, policy {res['size']} (byte-level), {res['eval_n']} held-out problems; "
             f"supervised warm-up of {res['sft_steps']} steps, the first checkpoint whose validation "
             f"pass@1 reached {res['start_at']}.", "",
             f"| policy | RL steps | RL seconds | greedy pass@1 | gain (points) | best pass@1 seen | "
             f"pass@{k} | maj@{k} |", "|---|---|---|---|---|---|---|---|",
             f"| SFT (start) | - | - | {s['pass@1']:.3f} | - | - | {s[f'pass@{k}']:.3f} | "
             f"{s[f'maj@{k}']:.3f} |"]
    for r in res["runs"]:
        f = r["final"]
        name = "GRPO (" + r["loss"] + ")" if r["algo"] == "grpo" else "RFT"
        lines.append(f"| {name} | {r['steps']} | {r['seconds']:.0f} | {f['pass@1']:.3f} | "
                     f"{100 * r['gain']:+.1f} | {r['best']:.3f} | {f[f'pass@{k}']:.3f} | "
                     f"{f[f'maj@{k}']:.3f} |")
    return "\n".join(lines)


from keenlm.study_tts import tts  # noqa: E402,F401  (keenlm study tts)
