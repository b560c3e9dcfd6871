"""``keenlm study spike``: a keenlm model run as a spiking network, converted and fine-tuned.

One command, on the stdlib corpus:

1. trains a dense model (depth ``depth`` of the size dial, ``tokens`` tokens);
2. for each neuron -- integrate-and-fire with reset by subtraction (``if-subtract``: the best
   rate code), and a leaky neuron (beta 0.9) reset to zero (``lif-zero``: the neuron NIR and
   snnTorch simulate, so the model exports) -- and each T in ``steps``:
   - converts the dense model (threshold balancing on 8 training batches) and evaluates it;
   - fine-tunes the converted model through its spikes with surrogate gradients for
     ``finetune_steps`` steps (``train.init_from`` with ``model.spike``) and evaluates it;
3. fine-tunes the dense model for the same steps with the same learning rate (``dense+ft``):
   the control that separates what fine-tuning the spikes buys from what more training buys.

Every model is evaluated on the same validation windows. For each spiking model it reports the
validation loss against dense (target: within 10% at some T), the mean firing rates, synaptic
operations against the dense feed-forward MACs, and both energy estimates per token
(keenlm.spiking.ffn.spike_energy): naive (4.6 pJ per MAC, 0.9 pJ per accumulate) and
memory-inclusive (weight, membrane and spike traffic at 5 pJ per 32-bit access).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import keenlm
from keenlm.config import SpikeConfig, TrainConfig, merge
from keenlm.data import default_cache_dir, load_corpus, tokenize_corpus
from keenlm.infer.evaluate import evaluate
from keenlm.presets import size_preset
from keenlm.scaling.sweep import base_config
from keenlm.spiking.converter import calibration_batches
from keenlm.spiking.energy import spike_energy
from keenlm.spiking.ffn import convert, spiking_layers
from keenlm.studies.common import Log, finished, record, train_run, write_results

NEURONS = {"if-subtract": {"beta": 1.0, "reset": "subtract"},
           "lif-zero": {"beta": 0.9, "reset": "zero"}}


@dataclass(frozen=True)
class Options:
    """a model converted to spiking feed-forward layers and fine-tuned, at several time steps,
    with firing rates and energy per token"""

    depth: int = 4  # depth of the size dial
    tokens: int = 4_000_000  # training tokens of the dense model
    spike_steps: tuple[int, ...] = (4, 8, 16)  # time steps T per token
    finetune_steps: int = 150  # surrogate-gradient fine-tuning steps of each spiking model


def run(out, opts: Options) -> dict:
    return spike(out, depth=opts.depth, tokens=opts.tokens, steps=opts.spike_steps,
                 finetune_steps=opts.finetune_steps)


def summary(res: dict) -> str:
    b = res["best"]
    return (f"best spiking model: {b['neuron']} at T={b['steps']}, {b['gap']:+.1%} validation "
            "loss against dense")


def spike_configs(depth: int, tokens: int, steps: tuple[int, ...], finetune_steps: int,
                  lr_mult: float, out: Path, neurons: tuple[str, ...],
                  overrides: dict | None = None) -> dict[str, dict]:
    """The study's training runs by name (dense, dense+ft, ft-<neuron>-T<T>): full configs."""
    base = merge(base_config(), size_preset(depth, aspect=32), overrides or {})
    t = base["train"]
    n = max(1, round(tokens / (t["batch_size"] * t["seq_len"])))
    dense = merge(base, {"train": {"steps": n, "out_dir": str(out / "dense"),
                                   "schedule": {"warmup_steps": max(1, n // 30)},
                                   "eval": {"log_every": 10}, "checkpoint": {"resume": True}}})
    ft = {"steps": finetune_steps, "init_from": str(out / "dense"),
          "optim": {"lr": t["optim"]["lr"] * lr_mult},
          "schedule": {"warmup_steps": max(1, finetune_steps // 10)},
          "eval": {"log_every": 10}, "checkpoint": {"resume": True}}
    runs = {"dense": dense,
            "dense+ft": merge(base, {"train": {**ft, "out_dir": str(out / "dense+ft")}})}
    for name in neurons:
        if name not in NEURONS:
            raise ValueError(f"neuron {name!r}: one of {', '.join(NEURONS)}")
        for T in steps:
            runs[f"ft-{name}-T{T}"] = merge(base, {
                "model": {"spike": {"steps": T, **NEURONS[name]}},
                "train": {**ft, "out_dir": str(out / f"ft-{name}-T{T}")}})
    return runs


def measure(net, data, cfg: dict, calib=None, spike=None) -> dict:
    """Validation loss of ``net`` (converted first when ``spike`` is given) on the study's
    windows, with the spiking statistics and energy when it spikes."""
    t = cfg["train"]
    if spike is not None:
        net = copy.deepcopy(net)
        convert(net, spike, calib)
    layers = spiking_layers(net)
    for m in layers:
        m.take_stats()
    res = evaluate(net, data.val, data.token_bytes, batch_size=t["batch_size"],
                   seq_len=t["seq_len"], max_batches=t["eval"]["batches"],
                   device=next(net.parameters()).device)
    out = {"val_loss": res["loss"], "eval_tokens": res["tokens"]}
    if layers:
        e = spike_energy(net, [m.take_stats() for m in layers], t["seq_len"])
        out["energy"] = {k: v for k, v in e.items() if k != "layers"}
    return out


def spike(out: str | Path, depth: int = 4, tokens: int = 2_000_000, steps=(4, 8, 16),
          finetune_steps: int = 150, lr_mult: float = 0.1, neurons=tuple(NEURONS),
          calibrate: int = 8, overrides: dict | None = None, log: Log = print) -> dict:
    """Train, convert, fine-tune and compare (resumable: a finished run is kept)."""
    out = Path(out)
    cfgs = spike_configs(depth, tokens, tuple(steps), finetune_steps, lr_mult, out,
                         tuple(neurons), overrides)
    d = cfgs["dense"]["data"]
    results: dict = {"depth": depth, "tokens": tokens, "steps": list(steps),
                     "finetune_steps": finetune_steps, "lr_mult": lr_mult, "calibrate": calibrate,
                     "data": f"{d.get('corpus', 'stdlib')} corpus, tokenizer "
                             f"{d.get('tokenizer', 'bpe')}", "rows": []}
    data = km = None
    for name, cfg in cfgs.items():
        folder = out / name
        rec = finished(folder, cfg)
        if rec is None:
            res, seconds = train_run(cfg, name)
            rec = {"config": cfg, "seconds": seconds, "steps": res.step}
            if name == "dense" or km is None:
                km = keenlm.load(out / "dense")
                data = tokenize_corpus(load_corpus(km.config.data), km.tokenizer,
                                       default_cache_dir(km.config.data.cache_dir))
            run = keenlm.load(folder)
            rec.update(measure(run.net, data, cfg))
            if name == "dense":  # the conversions of the dense model, without training
                t = cfg["train"]
                calib = calibration_batches(data.train, calibrate, t["batch_size"], t["seq_len"],
                                            t.get("seed", TrainConfig.seed) + 7919)  # as init_from
                rec["converted"] = {}
                for neuron in neurons:
                    for T in steps:
                        sc = SpikeConfig(steps=T, calibrate=calibrate, **NEURONS[neuron])
                        rec["converted"][f"{neuron}-T{T}"] = measure(run.net, data, cfg,
                                                                     calib, sc)
            record(folder, rec)
        log(f"{name}: val loss {rec['val_loss']:.4f}" + (
            f", firing rates {rec['energy']['in_rate']:.3f} / {rec['energy']['hidden_rate']:.3f}"
            if "energy" in rec else ""))
        results["rows"].append({"name": name, **{k: v for k, v in rec.items() if k != "config"}})
    _summarize(results, tuple(neurons), tuple(steps))
    write_results(out, results, _table(results))
    return results


def _summarize(res: dict, neurons, steps) -> None:
    by = {r["name"]: r for r in res["rows"]}
    dense = by["dense"]["val_loss"]
    conv = by["dense"]["converted"]
    rows = []
    for neuron in neurons:
        for T in steps:
            c, f = conv[f"{neuron}-T{T}"], by[f"ft-{neuron}-T{T}"]
            rows.append({"neuron": neuron, "steps": T, "converted": c["val_loss"],
                         "finetuned": f["val_loss"], "gap": f["val_loss"] / dense - 1.0,
                         "gap_converted": c["val_loss"] / dense - 1.0,
                         "gap_vs_dense_ft": f["val_loss"] / by["dense+ft"]["val_loss"] - 1.0,
                         "energy": f["energy"]})
    res["spiking"] = rows
    best = min(rows, key=lambda r: r["gap"])
    res["best"] = {"neuron": best["neuron"], "steps": best["steps"], "gap": best["gap"],
                   "within_10pct": [f"{r['neuron']}-T{r['steps']}" for r in rows if r["gap"] <= 0.10]}


def _table(res: dict) -> str:
    by = {r["name"]: r for r in res["rows"]}
    lines = [f"{res['data']}, depth {res['depth']} of the size dial, {res['tokens']:,} "
             f"training tokens; spiking fine-tuning: {res['finetune_steps']} steps at "
             f"{res['lr_mult']:g} x the learning rate, from the conversion ({res['calibrate']} "
             "calibration batches).",
             "", f"dense: val loss {by['dense']['val_loss']:.4f}; dense fine-tuned the same way "
             f"(dense+ft): {by['dense+ft']['val_loss']:.4f}.", "",
             "| neuron | T | converted | fine-tuned | vs dense | vs dense+ft | firing rate in / hidden "
             "| synaptic ops / dense MACs | FFN energy naive (spiking / dense) | FFN energy "
             "memory-incl. | whole model naive | whole model memory-incl. |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["spiking"]:
        e = r["energy"]
        fe = e["ffn_energy_j"]
        lines.append(
            f"| {r['neuron']} | {r['steps']} | {r['converted']:.4f} ({r['gap_converted']:+.1%}) | "
            f"{r['finetuned']:.4f} | {r['gap']:+.1%} | {r['gap_vs_dense_ft']:+.1%} | "
            f"{e['in_rate']:.3f} / {e['hidden_rate']:.3f} | {e['synops_over_macs']:.2f} | "
            f"{fe['naive']['spiking'] * 1e9:.2f} / {fe['naive']['dense'] * 1e9:.2f} nJ "
            f"({e['ffn_ratio']['naive']:.2f}x) | {fe['memory']['spiking'] * 1e9:.2f} / "
            f"{fe['memory']['dense'] * 1e9:.2f} nJ ({e['ffn_ratio']['memory']:.2f}x) | "
            f"{e['model_ratio']['naive']:.2f}x | {e['model_ratio']['memory']:.2f}x |")
    b = res["best"]
    lines += ["", "Energy per token: the spiking model's estimate over the dense model's "
              "(x < 1: the spiking model spends less). Firing rates are spikes per neuron per "
              "step; each value drives a pair of neurons, one of them silent.",
              f"Best: {b['neuron']} at T={b['steps']}, {b['gap']:+.1%} against dense; within 10%: "
              f"{', '.join(b['within_10pct']) or 'none'}."]
    return "\n".join(lines)
