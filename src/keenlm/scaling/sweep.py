"""Scaling sweeps: a grid of (model size, training tokens) runs from one base config.

Every size comes from the one size dial (``keenlm.presets.size_preset``: depth -> width, heads,
SwiGLU width, learning rate), so each point of a sweep is a model a user can also train by
name. A trial is an ordinary run folder (``OUT/trials/<name>``) plus ``trial.json``, written
atomically once the run is trained and evaluated: its validation loss, parameters (total and
without embeddings), tokens, FLOPs and seconds.

- ``grid``: every depth x every token count; ``isoflop``: for each FLOP budget C, every depth
  trained on D = C / (6 N) tokens (N without embeddings, Kaplan's count), the design of
  Chinchilla's approach 2.
- ``run_sweep``: trials in sequence (``backend="local"``) or as Ray tasks, one CPU each
  (``backend="ray"``; a local Ray instance is started when none is running). Resumable:
  a trial with a ``trial.json`` is not run again, and a trial stopped halfway continues from
  its last checkpoint. A trial that raises is reported and retried once; if it fails again
  the sweep goes on and reports it as failed.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from keenlm import api
from keenlm.config import from_dict, merge, upgrade
from keenlm.ledger import count_params
from keenlm.model import build_model
from keenlm.presets import resolve, size_preset
from keenlm.runs import atomic_write_text, hold
from keenlm.scaling.fit import bootstrap, isoflop_fit

Log = Callable[[str], None]


def base_config(seq: int = 256, batch: int = 16, vocab: int = 4096) -> dict:
    """The sweeps' default: the whole stdlib corpus (about 9.5M training tokens with this BPE:
    runs up to that many tokens never see a token twice), a BPE of ``vocab`` tokens, WSD
    schedule, bf16 autocast where the hardware multiplies bf16 natively (1.7x faster on this
    CPU)."""
    return {"data": {"tokenizer": "bpe", "vocab_size": vocab, "max_bytes": 0},
            "model": {"max_seq_len": seq},
            "train": {"batch_size": batch, "seq_len": seq, "progress": False,
                      "schedule": {"kind": "wsd", "decay_fraction": 0.25},
                      "eval": {"every": 0, "batches": 40}, "runtime": {"dtype": "auto"}}}


@dataclass(frozen=True)
class Trial:
    name: str
    depth: int
    tokens: int
    config: dict  # the run's full nested config, ready for keenlm.train
    budget: float = 0.0  # its isoFLOP profile's budget C (isoflop plans), else 0


def _trial(base: dict, depth: int, tokens: int, aspect: int, head_dim: int) -> Trial:
    cfg = merge(copy.deepcopy(base), size_preset(depth, aspect=aspect, head_dim=head_dim))
    t = cfg["train"]
    per_step = t["batch_size"] * t["seq_len"]
    steps = max(1, round(tokens / per_step))
    t["steps"] = steps
    t["schedule"] = {**t.get("schedule", {}), "warmup_steps": max(1, steps // 30)}
    t["checkpoint"] = {**t.get("checkpoint", {}), "resume": True}
    return Trial(f"d{depth}-t{steps * per_step}", depth, steps * per_step, cfg)


def grid(base: dict, depths: Sequence[int], tokens: Sequence[int], aspect: int = 32,
         head_dim: int = 32) -> list[Trial]:
    """Every depth x every token count (rounded to whole steps)."""
    _positive(depths, "depths"), _positive(tokens, "tokens")
    return [_trial(base, d, int(n), aspect, head_dim) for d in depths for n in tokens]


def model_params(config: dict) -> dict[str, int]:
    """A config's parameter counts (keenlm.ledger.count_params), built on the meta device."""
    cfg = from_dict(config)
    with torch.device("meta"):
        net = build_model(resolve(cfg, cfg.data.vocab_size or 256).model)
    return count_params(net)


def isoflop(base: dict, depths: Sequence[int], budgets: Sequence[float], aspect: int = 32,
            head_dim: int = 32) -> list[Trial]:
    """For each FLOP budget C, every depth on D = C / (6 N) tokens."""
    _positive(depths, "depths"), _positive(budgets, "budgets")
    out = []
    for c in budgets:
        for d in depths:
            n = model_params(_trial(base, d, 1, aspect, head_dim).config)["non_embedding"]
            t = _trial(base, d, int(c / (6 * n)), aspect, head_dim)
            out.append(Trial(f"{t.name}-c{c:.2g}", d, t.tokens, t.config, float(c)))
    return out


def _positive(values, name: str) -> None:
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{name} {list(values)}: a non-empty list of positive numbers")


def run_trial(trial: Trial, out: str | Path, threads: int = 0) -> dict:
    """Train and evaluate one trial in ``out/trials/<name>``; returns its trial.json."""
    run_dir = Path(out) / "trials" / trial.name
    done = run_dir / "trial.json"
    if done.exists():
        rec = json.loads(done.read_text())
        if upgrade(rec.get("config")) != upgrade(trial.config):  # either spelling of a config
            raise ValueError(f"{run_dir} was trained with another config; use another sweep folder")
        return rec
    cfg = merge(trial.config, {"train": {"out_dir": str(run_dir),
                                         **({"runtime": {"threads": threads}} if threads else {})}})
    t0 = time.perf_counter()
    res = api.train(cfg)
    if res.interrupted:
        raise KeyboardInterrupt(f"trial {trial.name} was stopped")
    params = count_params(api.load(run_dir).net)
    rec = {"name": trial.name, "depth": trial.depth, "tokens": trial.tokens,
           "d_model": cfg["model"]["d_model"], "n_layer": cfg["model"]["n_layer"],
           "params": params["total"], "params_non_embedding": params["non_embedding"],
           "val_loss": res.final_eval["loss"], "flops": res.ledger["flops_total"],
           "seconds": time.perf_counter() - t0, "budget": trial.budget, "config": trial.config}
    atomic_write_text(done, json.dumps(rec, indent=2) + "\n")
    return rec


def run_sweep(trials: Sequence[Trial], out: str | Path, backend: str = "local",
              retries: int = 1, log: Optional[Log] = print,
              on_result: Optional[Callable[[dict], None]] = None) -> dict:
    """Run every trial not yet finished; returns {"results": [...], "failed": [...]}.
    ``on_result`` is called after each finished trial (progress, or a test's interruption)."""
    if backend not in ("local", "ray"):
        raise ValueError(f"backend {backend!r}: local | ray")
    names = [t.name for t in trials]
    if len(set(names)) != len(names):
        raise ValueError("two trials share a name: each (depth, tokens) once")
    out = Path(out)
    with hold(out, "sweep"):  # one sweep per folder at a time
        return _sweep(trials, names, out, backend, retries, log, on_result)


def _sweep(trials, names, out: Path, backend, retries, log, on_result) -> dict:
    atomic_write_text(out / "sweep.json", json.dumps([t.__dict__ for t in trials], indent=2) + "\n")
    results, failed = {}, {}
    pending = list(trials)
    for attempt in range(retries + 1):
        run = _run_ray if backend == "ray" else _run_local
        errors = run(pending, out, results, log, on_result)
        for t in pending:
            if t.name in errors:
                failed[t.name] = errors[t.name]
                if log:
                    log(f"trial {t.name} failed: {errors[t.name]}"
                        + ("; retrying" if attempt < retries else ""))
        pending = [t for t in pending if t.name in errors]
        if not pending:
            break
    failed = {t.name: failed[t.name] for t in pending}
    return {"results": [results[n] for n in names if n in results], "failed": failed}


def _finished(rec: dict, results: dict, log, on_result) -> None:
    results[rec["name"]] = rec
    if log:
        log(f"{rec['name']}: {rec['params_non_embedding']:,} params (non-embedding), "
            f"{rec['tokens']:,} tokens, val loss {rec['val_loss']:.4f}")
    if on_result:
        on_result(rec)


def _run_local(trials, out, results, log, on_result) -> dict:
    errors = {}
    for t in trials:
        try:
            rec = run_trial(t, out)
        except Exception as e:  # reported and retried; KeyboardInterrupt stops the sweep
            errors[t.name] = f"{type(e).__name__}: {e}"
            continue
        _finished(rec, results, log, on_result)
    return errors


def _run_ray(trials, out, results, log, on_result) -> dict:
    try:
        import ray  # optional extra (keenlm[sweep]), heavy to import
    except ImportError:
        raise RuntimeError("backend ray needs Ray: pip install 'keenlm[sweep]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(run_trial)
        futures = {remote.remote(t, str(out), 1): t for t in trials}
        errors = {}
        while futures:
            done, _ = ray.wait(list(futures), num_returns=1)
            t = futures.pop(done[0])
            try:
                rec = ray.get(done[0])
            except Exception as e:
                errors[t.name] = f"{type(e).__name__}: {e}".splitlines()[0]
                continue
            _finished(rec, results, log, on_result)
        return errors
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------ fits

COUNTS = {"non_embedding": "params_non_embedding", "total": "params"}  # N, counted two ways


def finished(folder) -> list[dict]:
    """The trial.json of every finished trial of a sweep folder."""
    found = sorted(Path(folder).glob("trials/*/trial.json"))
    if not found:
        raise FileNotFoundError(f"{folder}: no finished trials (trials/*/trial.json); run "
                                "keenlm scale sweep first")
    return [json.loads(p.read_text()) for p in found]


def fit_trials(runs: Sequence[dict], samples: int = 200, points: Sequence[dict] = (),
               form: str = "chinchilla") -> dict:
    """Fit finished trials: L(N) when all share one token count, else L(N, D) (of ``form``:
    ``fit.FORMS``); once per parameter count (``COUNTS``), with bootstrap laws for intervals
    (``fit.interval``). ``points`` ({count: N, "tokens": D} each) adds each count's prediction
    at those points (an L(N) fit predicts only at its own token count). Trials of isoFLOP
    plans also get approach 2."""
    two = len({r["tokens"] for r in runs}) > 1
    d = [r["tokens"] for r in runs] if two else None
    if not two and any(p["tokens"] != runs[0]["tokens"] for p in points):
        raise ValueError(f"every trial has {runs[0]['tokens']:,} tokens, so the fit is L(N): it "
                         "predicts only at that token count")
    losses = [r["val_loss"] for r in runs]
    out = {"runs": len(runs), "law": "L(N, D)" if two else "L(N)", "form": form,
           "tokens": None if two else runs[0]["tokens"]}
    for count, key in COUNTS.items():
        out[count] = bootstrap([r[key] for r in runs], losses, d, samples=samples, form=form,
                               query_n=[p[count] for p in points],
                               query_d=[p["tokens"] for p in points] if two else None)
    budgets = [r.get("budget", 0.0) for r in runs]
    if two and any(budgets):
        try:
            out["isoflop"] = isoflop_fit([r["params_non_embedding"] for r in runs], losses, budgets)
        except ValueError as e:
            out["isoflop"] = {"skipped": str(e)}
    return out
