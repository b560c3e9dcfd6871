"""Spiking execution in training (keenlm.train.converters): ``train.init_from`` a dense model
with ``model.spike.steps`` > 0 converts it (threshold balancing on training batches) and
fine-tunes it through its spikes; a spiking model goes on with this config's time steps and
neuron. Every evaluation of a spiking model also reports its firing rates, synaptic operations
and energy per token (kept in the run's ledger as ``spiking``)."""
from __future__ import annotations

import dataclasses

from keenlm.data import get_batch
from keenlm.spiking.energy import spike_energy
from keenlm.spiking.ffn import convert, set_spike, spiking_layers

REPORTED = ("steps", "in_rate", "hidden_rate", "synops_per_token", "macs_per_token_dense_ffn",
            "ffn_energy_j", "ffn_ratio", "model_ratio")


def calibration_batches(tokens, n: int, batch_size: int, seq_len: int, seed: int = 7919) -> list:
    """``n`` batches of training windows for threshold balancing; ``train.init_from`` converts
    with ``seed = train.seed + 7919``."""
    return [get_batch(tokens, batch_size, seq_len, seed, i)[0] for i in range(n)]


class SpikingConversion:
    name = "spiking"

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def for_run(cls, cfg, start=None):
        spiking = cfg.model.spike.steps or (start is not None and start.model.spike.steps)
        return cls(cfg) if spiking else None

    def adopt(self, model, net, data, log):
        spike, t = self.cfg.model.spike, self.cfg.train
        if not spike.steps:
            raise ValueError("train.init_from is a spiking model: set model.spike.steps (its own "
                             f"is {model.spike.steps})")
        if spiking_layers(net):
            set_spike(net, spike)
        else:
            batches = calibration_batches(data.train, spike.calibrate, t.batch_size, t.seq_len,
                                          t.seed + 7919)
            convert(net, spike, batches)
            if log:
                log(f"converted to spiking feed-forward layers: T={spike.steps}, thresholds "
                    f"balanced on {spike.calibrate} batches")
        return dataclasses.replace(model, spike=spike)

    def on_step(self, model, step, planned_steps):
        pass

    def begin_eval(self, model):
        for m in spiking_layers(model):
            m.take_stats()

    def end_eval(self, model, seq_len) -> dict:
        layers = spiking_layers(model)
        if not layers:
            return {}
        e = spike_energy(model, [m.take_stats() for m in layers], seq_len)
        return {"spiking": {k: e[k] for k in REPORTED}}
