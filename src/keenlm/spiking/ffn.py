"""Spiking execution of the feed-forward layers: the spiking SwiGLU, its conversion from a
trained model with threshold balancing, and fine-tuning through its spikes. The neurons and the
rate code are in keenlm.spiking.neurons, the operation and energy accounting in
keenlm.spiking.energy.

**The spiking feed-forward layer** (``SpikingFFN``, a SwiGLU with the same weights):

    stage 1: x (the block's normalized input) -> pairs of neurons, T steps -> spikes; every spike
             adds its column of [W_gate; W_up] (scaled by lambda / T) to the hidden currents:
             accumulates, no multiplies
    hidden:  a = silu(g) * u on the currents integrated over the window (one analog operation
             per hidden unit: SwiGLU's gate is a product, which no spiking neuron computes)
    stage 2: a -> pairs of neurons, T steps -> spikes; every spike adds its column of W_down

So a token takes 2T steps per layer (the stages are pipelined); attention, norms and the
residual stream stay analog. By linearity, the currents summed over the window equal the
projection of the decoded spike counts: ``forward`` computes the counts exactly (the neurons run
all T steps) and then projects the decoded values once. ``spiking_reference`` runs the same
layer step by step, accumulating each step's spikes through the weights as event-driven
hardware would; the tests compare the two.

**Conversion** (``convert``): threshold balancing sets lambda_c to the ``percentile`` (99.9) of
|activation| of channel c on calibration data (Rueckauer et al. 2017's robust normalization, per
channel), for the layer input and for the hidden activation.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from keenlm.model.layers import SwiGLU, _SwiGLU, fused_projection
from keenlm.spiking.neurons import lif, rate_code


class SpikingFFN(SwiGLU):
    """A SwiGLU whose input and hidden activation are rate-coded spikes (module docstring). Same
    parameters (and names) as SwiGLU, plus the balanced scales ``in_scale`` (d_model) and
    ``hidden_scale`` (d_ff). Spike counts are summed per layer until ``end_step``/``take_stats``."""

    def __init__(self, cfg, linear):
        super().__init__(cfg, linear)
        self._add_spiking_state(cfg)

    @classmethod
    def from_swiglu(cls, ffn: SwiGLU, cfg) -> "SpikingFFN":
        """The spiking form of a trained SwiGLU, sharing its weights (scales still 1)."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.gate_proj, new.up_proj, new.down_proj = ffn.gate_proj, ffn.up_proj, ffn.down_proj
        new.gate_up_proj = ffn.gate_up_proj
        new._add_spiking_state(cfg, ffn.gate_proj.weight.device)
        return new

    def _add_spiking_state(self, cfg, device=None):
        self.spike = cfg.spike
        self.register_buffer("in_scale", torch.ones(cfg.d_model, device=device))
        self.register_buffer("hidden_scale", torch.ones(cfg.d_ff, device=device))
        self._reset_stats()

    def _reset_stats(self, training: bool | None = None):
        """Counts are kept apart for training and evaluation passes (None: clear both)."""
        if training is None:
            self._stats = {True: [0, 0.0, 0.0], False: [0, 0.0, 0.0]}
        else:
            self._stats[training] = [0, 0.0, 0.0]

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU's hidden activation silu(gate(x)) * up(x), analog (for calibration)."""
        gate_up = fused_projection(x, self.gate_proj, self.up_proj)
        if torch.is_grad_enabled():
            return _SwiGLU.apply(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd, n_in = rate_code(x, self.in_scale, self.spike)
        a = self.hidden(xd)
        ad, n_hidden = rate_code(a, self.hidden_scale, self.spike)
        with torch.no_grad():
            st = self._stats[self.training]
            st[0] += x.numel() // x.shape[-1]
            st[1] += float(n_in.sum())
            st[2] += float(n_hidden.sum())
        return self.down_proj(ad)

    def take_stats(self, training: bool = False) -> dict | None:
        """Spikes of the evaluation (or training) passes since the last call, per token:
        {tokens, in_spikes, hidden_spikes, in_rate, hidden_rate}; rates are spikes per neuron
        per step (each value is a pair of neurons)."""
        n, s_in, s_h = self._stats[training]
        if not n:
            return None
        T, C, Fw = self.spike.steps, self.in_scale.numel(), self.hidden_scale.numel()
        self._reset_stats(training)
        return {"tokens": n, "in_spikes": s_in / n, "hidden_spikes": s_h / n,
                "in_rate": s_in / (n * 2 * C * T), "hidden_rate": s_h / (n * 2 * Fw * T)}

    def end_step(self) -> dict | None:
        return self.take_stats(training=True)

    @staticmethod
    def summarize(stats: list[dict]) -> dict:
        """One metrics record's view of every spiking layer's firing rates."""
        return {"spike_in_rate": sum(s["in_rate"] for s in stats) / len(stats),
                "spike_hidden_rate": sum(s["hidden_rate"] for s in stats) / len(stats)}


def spiking_reference(ffn: SpikingFFN, x: torch.Tensor) -> torch.Tensor:
    """The layer run step by step as event-driven hardware would: at each step every spike adds
    its weight column, times lambda / T, to the next layer's currents; the hidden units apply
    SwiGLU's gate to the currents integrated over the window; the second stage likewise. Built
    on the reference neuron ``lif``."""
    c = ffn.spike
    T = c.steps
    W_gu = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight])  # (2F, C)

    def stage(values, scale, weight):
        cur = values / scale
        cur = torch.cat([cur, -cur], dim=-1)
        if c.round:
            cur = cur + 0.5 / T
        spikes, _ = lif(cur.expand(T, *cur.shape), c.beta, 1.0, c.slope, reset=c.reset)
        syn = torch.cat([weight * scale, -weight * scale], dim=1) / T  # (out, 2n)
        total = torch.zeros(*values.shape[:-1], weight.shape[0], dtype=values.dtype)
        for t in range(T):
            total = total + spikes[t] @ syn.t()
        return total

    gate, up = stage(x, ffn.in_scale, W_gu).chunk(2, dim=-1)
    return stage(F.silu(gate) * up, ffn.hidden_scale, ffn.down_proj.weight)


# ------------------------------------------------------------------------------- conversion

def spiking_layers(net) -> list[SpikingFFN]:
    return [m for m in net.modules() if isinstance(m, SpikingFFN)]


@torch.no_grad()
def calibrate(net, batches, percentile: float, max_tokens: int = 65536) -> None:
    """Threshold balancing: each spiking layer's ``in_scale`` and ``hidden_scale`` become the
    ``percentile`` of |activation| per channel over the calibration batches (token ids (B, T)),
    computed from the analog activations (up to ``max_tokens`` tokens per layer)."""
    layers = spiking_layers(net)
    if not layers:
        raise ValueError("calibrate: the model has no spiking layers (model.spike.steps is 0)")
    seen: dict[int, list] = {id(m): [] for m in layers}
    original = {}

    def analog(m):
        def fwd(x):
            a = m.hidden(x)
            if sum(t.shape[0] for t, _ in seen[id(m)]) < max_tokens:
                seen[id(m)].append((x.reshape(-1, x.shape[-1]).float().abs(),
                                    a.reshape(-1, a.shape[-1]).float().abs()))
            return m.down_proj(a)
        return fwd

    for m in layers:
        original[m] = m.forward
        m.forward = analog(m)
    was, n = net.training, 0
    net.eval()
    try:
        for ids in batches:
            net(ids.to(next(net.parameters()).device))
            n += 1
    finally:
        net.train(was)
        for m, f in original.items():
            m.forward = f
    if n == 0:
        raise ValueError("calibrate: no calibration batches")
    for m in layers:
        xs = torch.cat([x for x, _ in seen[id(m)]])[:max_tokens]
        hs = torch.cat([h for _, h in seen[id(m)]])[:max_tokens]
        m.in_scale.copy_(_percentile(xs, percentile))
        m.hidden_scale.copy_(_percentile(hs, percentile))
        m._reset_stats()


def _percentile(a: torch.Tensor, q: float) -> torch.Tensor:
    """Per column of a (N, n) >= 0: the q-th percentile (nearest rank), floored so that a
    channel that never fires on the calibration data still gets a positive scale."""
    k = min(a.shape[0] - 1, max(0, int(round(q / 100.0 * a.shape[0])) - 1))
    v = a.sort(dim=0).values[k]
    floor = max(float(v.max()) * 1e-6, 1e-12)
    return v.clamp_min(floor)


def convert(net, spike_cfg, batches) -> None:
    """Turn a trained dense model into a spiking one in place: every SwiGLU becomes a
    SpikingFFN with the same weights, thresholds balanced on ``batches`` (ANN-to-SNN
    conversion). ``net.cfg`` gets ``model.spike``."""
    if spike_cfg.steps < 1:
        raise ValueError(f"convert: model.spike.steps={spike_cfg.steps} must be >= 1")
    cfg = dataclasses.replace(net.cfg, spike=spike_cfg)  # validates ffn/linear for spiking
    for layer in net.layers:
        if type(layer.mlp) is SwiGLU:
            layer.mlp = SpikingFFN.from_swiglu(layer.mlp, cfg)
        elif isinstance(layer.mlp, SpikingFFN):
            layer.mlp.spike = spike_cfg
        else:
            raise ValueError(f"convert: {type(layer.mlp).__name__} feed-forward layers cannot "
                             "spike (model.ffn must be dense)")
    net.cfg = cfg
    calibrate(net, batches, spike_cfg.percentile)


def set_spike(net, spike_cfg) -> None:
    """Change the time steps / neuron of an already converted model, keeping its scales."""
    net.cfg = dataclasses.replace(net.cfg, spike=spike_cfg)
    for m in spiking_layers(net):
        m.spike = spike_cfg
