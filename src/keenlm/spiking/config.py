"""Spiking execution's config (``model.spike.*``): a leaf module the run config nests."""
from __future__ import annotations

from dataclasses import dataclass

from keenlm.config.base import check


SPIKE_RESETS = ("subtract", "zero")


@dataclass(frozen=True)
class SpikeConfig:
    """Spiking execution of the feed-forward layers (``model.spike``, keenlm.spiking.ffn):
    each SwiGLU's input and hidden activation travel as spikes of integrate-and-fire neurons
    over ``steps`` time steps; the projections only accumulate the weights of spiking inputs."""

    steps: int = 0  # time steps T per token; 0: off (an ordinary model)
    beta: float = 1.0  # membrane leak per step: 1.0 = integrate-and-fire (best for rate coding), < 1 leaky
    reset: str = "subtract"  # subtract (keeps the overshoot: rate error <= 1/T) | zero (the NIR / snnTorch neuron)
    round: bool = True  # each step adds 1/(2T) of the threshold: T steps give round(T x), not floor(T x)
    percentile: float = 99.9  # threshold balancing: each channel's scale is this percentile of |activation| on calibration data
    slope: float = 25.0  # surrogate gradient 1 / (1 + slope |v - threshold|)^2 for spiking fine-tuning
    calibrate: int = 8  # converting a dense model (train.init_from): training batches for threshold balancing

    def __post_init__(self):
        p = "model.spike."
        check(self.steps >= 0, p + "steps", self.steps, "an integer >= 0 (0 = off)")
        check(0.0 < self.beta <= 1.0, p + "beta", self.beta, "a number in (0, 1]")
        check(self.reset in SPIKE_RESETS, p + "reset", self.reset, " | ".join(SPIKE_RESETS))
        check(0.0 < self.percentile <= 100.0, p + "percentile", self.percentile,
              "a number in (0, 100]")
        check(self.slope > 0, p + "slope", self.slope, "a number > 0")
        check(self.calibrate >= 1, p + "calibrate", self.calibrate, "an integer >= 1")


