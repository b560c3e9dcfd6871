"""``keenlm spike MODEL --steps T --calibrate N``: a trained model run as a spiking network.

For each T it converts the model (keenlm.spiking.ffn.convert: threshold balancing on N
batches of the training split), evaluates the validation loss of the spiking model next to the
dense one on the same windows, and reports the firing rates, synaptic operations against the
dense multiply-accumulates, and both energy estimates per token (naive and memory-inclusive).
With one T, ``--out`` saves the spiking model as a run folder (``keenlm train
--train.init_from DIR`` fine-tunes it with surrogate gradients) and ``--nir`` exports it to NIR.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable

import torch

from keenlm import runs
from keenlm.config import SpikeConfig, save_json
from keenlm.data import default_cache_dir, load_corpus, tokenize_corpus
from keenlm.infer.evaluate import evaluate
from keenlm.model import model_state
from keenlm.model.layers import SwiGLU
from keenlm.runs import atomic_folder
from keenlm.spiking.converter import calibration_batches
from keenlm.spiking.energy import spike_energy
from keenlm.spiking.ffn import SpikingFFN, convert, set_spike, spiking_layers


def dense_copy(net):
    """The same weights with every spiking layer back to a plain SwiGLU (the dense baseline)."""
    net = copy.deepcopy(net)
    for layer in net.layers:
        if isinstance(layer.mlp, SpikingFFN):
            m, plain = layer.mlp, SwiGLU.__new__(SwiGLU)
            torch.nn.Module.__init__(plain)
            plain.gate_proj, plain.up_proj, plain.down_proj = m.gate_proj, m.up_proj, m.down_proj
            plain.gate_up_proj = m.gate_up_proj
            layer.mlp = plain
    net.cfg = dataclasses.replace(net.cfg, spike=SpikeConfig())
    return net


def spike_eval(km, steps: list[int], spike: SpikeConfig, *, calibrate: int = 8,
               batches: int = 20, batch_size: int = 8, seq_len: int | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Dense vs spiking at each T: validation loss, firing rates, operations, energy. Returns
    {"dense": eval, "rows": [{steps, loss, gap, energy...}], "models": {T: spiking net}}."""
    if not steps or min(steps) < 1:
        raise ValueError(f"spike: --steps {steps}: give time steps >= 1")
    seq_len = seq_len or km.config.train.seq_len
    data = tokenize_corpus(load_corpus(km.config.data), km.tokenizer,
                           default_cache_dir(km.config.data.cache_dir))
    spiking_already = bool(spiking_layers(km.net))
    dense = dense_copy(km.net) if spiking_already else km.net

    def val(net):
        return evaluate(net, data.val, data.token_bytes, batch_size=batch_size, seq_len=seq_len,
                        max_batches=batches, device=next(net.parameters()).device)

    base = val(dense)
    log(f"dense: val loss {base['loss']:.4f} ({base['tokens']} tokens)")
    calib = None if spiking_already else calibration_batches(data.train, calibrate, batch_size,
                                                              seq_len)
    rows, models = [], {}
    for T in steps:
        cfg = dataclasses.replace(spike, steps=T)
        net = copy.deepcopy(km.net)
        if spiking_already:  # keep its balanced (and perhaps fine-tuned) scales
            set_spike(net, cfg)
        else:
            convert(net, cfg, calib)
        for m in spiking_layers(net):
            m.take_stats()  # calibration and earlier passes do not count
        res = val(net)
        stats = [m.take_stats() for m in spiking_layers(net)]
        e = spike_energy(net, stats, seq_len)
        row = {"steps": T, "loss": res["loss"], "gap": res["loss"] / base["loss"] - 1.0, **e}
        rows.append(row)
        models[T] = net
        log(f"T={T:>3}: val loss {res['loss']:.4f} ({row['gap']:+.1%} vs dense), firing rate "
            f"in {e['in_rate']:.3f} / hidden {e['hidden_rate']:.3f}, synaptic ops "
            f"{e['synops_per_token']:,.0f} vs {e['macs_per_token_dense_ffn']:,.0f} MACs per token "
            f"({e['synops_over_macs']:.2f}x); feed-forward energy per token: naive "
            f"{_pj(e['ffn_energy_j']['naive']['spiking'])} vs {_pj(e['ffn_energy_j']['naive']['dense'])} "
            f"({e['ffn_ratio']['naive']:.2f}x), memory-inclusive "
            f"{_pj(e['ffn_energy_j']['memory']['spiking'])} vs "
            f"{_pj(e['ffn_energy_j']['memory']['dense'])} ({e['ffn_ratio']['memory']:.2f}x); "
            f"whole model {e['model_ratio']['naive']:.2f}x / {e['model_ratio']['memory']:.2f}x")
    return {"dense": base, "rows": rows, "models": models, "spike": dataclasses.asdict(spike),
            "calibrate": 0 if spiking_already else calibrate}


def _pj(joules: float) -> str:
    """Energy with a readable unit: pJ, nJ or uJ."""
    for unit, scale in (("uJ", 1e-6), ("nJ", 1e-9)):
        if joules >= scale:
            return f"{joules / scale:,.2f} {unit}"
    return f"{joules * 1e12:,.1f} pJ"


def save_spiking(km, net, out: str | Path, overwrite: bool = False) -> Path:
    """A spiking model as a run folder (config.json with model.spike, tokenizer, checkpoint),
    loadable by keenlm.load and by ``train.init_from``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (--overwrite replaces it)")
    with atomic_folder(out, replace=True) as tmp:
        save_json(dataclasses.replace(km.config, model=net.cfg), tmp / "config.json")
        km.tokenizer.save(tmp / "tokenizer")
        runs.save_checkpoint(tmp, 0, model_state(net), {"step": 0})
    return out
