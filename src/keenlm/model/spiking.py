"""Spiking execution of the feed-forward layers: integrate-and-fire neurons, rate coding,
conversion of a trained model with threshold balancing, surrogate-gradient fine-tuning, and the
synaptic-operation and energy accounting.

The neuron, in discrete time (the form snnTorch's ``Leaky`` and NIR's LIF use; Eshraghian et al.
2023, https://arxiv.org/abs/2109.12894):

    v[t] = beta * v[t-1] + I[t]          membrane potential; beta = 1: integrate-and-fire (IF)
    s[t] = 1 if v[t] > threshold else 0  a spike (strictly above, as in NIR and snnTorch)
    reset "subtract": v[t] -= s[t] * threshold (keeps the overshoot)
    reset "zero":     v[t] *= 1 - s[t]         (NIR's reset to v_reset = 0)

For a constant input I below threshold the potential follows v[t] = I (1 - beta^t) / (1 - beta).

**Rate coding of a signed activation.** A value x of channel c drives a pair of neurons, one
with current x / lambda_c and one with -x / lambda_c (a spike of the second counts negative), for
T steps; the decoded value is lambda_c (n+ - n-) / T. An IF neuron with reset by subtraction
fires floor(T I) times for 0 <= I <= 1, so the error is below lambda_c / T and falls as T grows;
with ``round`` every step also adds 1 / (2T), and the count becomes round(T I): half the error
(the same effect as the half-threshold start of Bu et al. 2022, https://arxiv.org/abs/2303.04347,
but expressible as a bias in NIR). Values beyond lambda_c saturate at one spike per step.

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

**Fine-tuning** trains through the spikes with a surrogate gradient: the forward keeps the
exact step function, the backward uses the fast-sigmoid derivative 1 / (1 + slope |v - 1|)^2
(Zenke & Ganguli 2018, SuperSpike), bounded by 1 and never NaN, also at +-inf. The reset is
detached in the backward pass (as snnTorch does). ``RateCode`` computes the exact
backpropagation-through-time gradient of the spike counts in the same pass as the counts, so
training stores one tensor per stage instead of T; ``lif`` with autograd is its reference. We
write this ourselves rather than train with snnTorch: it is one small autograd.Function, and the
runs need no extra package (snnTorch reads the NIR export back in the round-trip test).

**Accounting** (``spike_energy``): spikes and firing rates per layer; synaptic operations
(accumulates: spikes x fan-out) against the multiply-accumulates of the dense layer; energy per
token with the 45 nm figures of Horowitz (ISSCC 2014) that SNN papers use -- 4.6 pJ per 32-bit
MAC, 0.9 pJ per 32-bit accumulate -- and a memory-inclusive estimate that adds the movement
those figures leave out: a weight read per synaptic event, a membrane read and write per neuron
per step, each spike written and read once, against the dense layer's weight and activation
traffic (5 pJ per 32-bit SRAM access: Horowitz's 10 pJ per 64-bit read of an 8 KB SRAM). Yan et
al. 2024 show the first estimate flatters spiking networks; both are reported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from keenlm.model import spiking_kernels
from keenlm.model.layers import SwiGLU, _SwiGLU, fused_projection

E_MAC_PJ = 4.6  # 32-bit floating-point multiply-accumulate, 45 nm (Horowitz 2014)
E_AC_PJ = 0.9  # 32-bit floating-point add
E_MEM_PJ = 5.0  # one 32-bit access of an 8 KB SRAM (10 pJ per 64-bit read)


def surrogate(x: torch.Tensor, slope: float) -> torch.Tensor:
    """Fast-sigmoid derivative 1 / (1 + slope |x|)^2: 1 at 0, -> 0 (not NaN) at +-inf."""
    return torch.nan_to_num(1.0 / (1.0 + slope * x.abs()).pow(2), nan=0.0)


class SpikeFn(torch.autograd.Function):
    """Heaviside step (x > 0) forward, fast-sigmoid surrogate backward (``slope`` sets its width)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: float):
        ctx.save_for_backward(x)
        ctx.slope = slope
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * surrogate(x, ctx.slope), None


def _check_neuron(beta: float, threshold: float, reset: str):
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"lif: beta={beta} must be in (0, 1] (1 = integrate-and-fire)")
    if threshold <= 0:
        raise ValueError(f"lif: threshold={threshold} must be > 0")
    if reset not in ("subtract", "zero"):
        raise ValueError(f"lif: reset={reset!r} must be subtract or zero")


def lif(current: torch.Tensor, beta: float, threshold: float = 1.0, slope: float = 25.0,
        v0: torch.Tensor | None = None, reset: str = "subtract") -> tuple[torch.Tensor, torch.Tensor]:
    """The reference neuron: run LIF neurons over the first dimension (time), current (T, ...) ->
    (spikes (T, ...), final membrane potential (...)). Differentiable through the surrogate, with
    the reset detached (it carries no gradient)."""
    _check_neuron(beta, threshold, reset)
    v = torch.zeros_like(current[0]) if v0 is None else v0
    spikes = []
    for t in range(current.shape[0]):
        v = beta * v + current[t]
        s = SpikeFn.apply(v - threshold, slope)
        v = v - s.detach() * threshold if reset == "subtract" else v * (1.0 - s.detach())
        spikes.append(s)
    return torch.stack(spikes), v


class RateCode(torch.autograd.Function):
    """Spike counts of neurons with threshold 1 driven by a constant current for T steps:
    current (...) -> counts (...). Same arithmetic as ``lif`` step by step; its backward is the
    exact gradient of ``lif(...)[0].sum(0)`` (detached reset), accumulated during the forward:

        d count / d I = sum_t surrogate(v[t] - 1) * D[t],
        D[t] = d v[t] / d I = k[t] * D[t-1] + 1,  k[t] = beta, or beta (1 - s[t-1]) with reset zero
    """

    @staticmethod
    def forward(ctx, current: torch.Tensor, steps: int, beta: float, reset: str, slope: float):
        need = ctx.needs_input_grad[0]
        if spiking_kernels.usable(current):  # the compiled fast path: same counts
            count, sens = spiking_kernels.rate_code_kernel(current, steps, beta, reset, slope, need)
        else:
            count, sens = _rate_code_torch(current, steps, beta, reset, slope, need)
        if need:
            ctx.save_for_backward(sens)
        return count

    @staticmethod
    def backward(ctx, grad):
        (sens,) = ctx.saved_tensors
        return grad * sens, None, None, None, None


def _rate_code_torch(current: torch.Tensor, steps: int, beta: float, reset: str, slope: float,
                     need: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RateCode's forward in tensor operations (the reference for the compiled kernel, and the
    path on GPUs): (counts, sensitivities d count / d current, or None)."""
    # in place throughout: these loops run over every activation T times
    v = torch.zeros_like(current)
    count = torch.zeros_like(current)
    sens = torch.zeros_like(current) if need else None
    D = torch.zeros_like(current) if need else None
    fired = None
    for _ in range(steps):
        if need:
            if reset == "zero" and fired is not None:
                D.masked_fill_(fired, 0.0)
            D.mul_(beta).add_(1.0)
        if beta != 1.0:
            v.mul_(beta)
        v.add_(current)
        fired = v > 1.0
        s = fired.to(current.dtype)
        if need:  # surrogate(v - 1) = 1 / (1 + slope |v - 1|)^2, times D
            g = (v - 1.0).abs_().mul_(slope).add_(1.0).square_().reciprocal_().nan_to_num_(0.0)
            sens.addcmul_(g, D)
        if reset == "subtract":
            v.sub_(s)
        else:
            v.masked_fill_(fired, 0.0)
        count.add_(s)
    return count, sens


def rate_code(x: torch.Tensor, scale: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed rate coding of x (..., n) with per-channel scales lambda (n,): pairs of neurons
    with currents +-x / lambda (+ 1/(2T) with ``cfg.round``) for ``cfg.steps`` steps. Returns
    (decoded values lambda (n+ - n-) / T, spike counts (..., 2n): the + neurons, then the -).
    The neurons run in at least fp32 (a bf16 membrane would count its spikes wrongly)."""
    T = cfg.steps
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    inv = (1.0 / scale).to(x.dtype)
    cur = x * inv
    cur = torch.cat([cur, -cur], dim=-1)
    if cfg.round:
        cur = cur + 0.5 / T
    counts = RateCode.apply(cur, T, cfg.beta, cfg.reset, cfg.slope)
    pos, neg = counts.chunk(2, dim=-1)
    return (pos - neg) * (scale.to(x.dtype) / T), counts


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
    import dataclasses

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
    import dataclasses

    net.cfg = dataclasses.replace(net.cfg, spike=spike_cfg)
    for m in spiking_layers(net):
        m.spike = spike_cfg


# ------------------------------------------------------------------------------- accounting

def spike_energy(net, stats: list[dict], seq_len: int, e_mac: float = E_MAC_PJ,
                 e_ac: float = E_AC_PJ, e_mem: float = E_MEM_PJ) -> dict:
    """Operations and energy per token of the feed-forward layers, spiking against dense, from
    each spiking layer's ``take_stats`` (same order as the layers); and of the whole model,
    whose other parts (attention, norms, LM head) are the same analog operations in both.

    Per layer and token, with C = d_model, F = d_ff, T steps, s_in / s_h spikes:
      synaptic ops (accumulates)   s_in * 2F + s_h * C         dense MACs   3 C F
      neuron updates               (2C + 2F) T  (an AC if beta = 1, else a MAC)
      analog ops (both)            C + F current scalings (spiking only) and 3F for the gate
                                   silu(g) u (both)
      naive energy    spiking: synops e_ac + analog e_mac;     dense: (3CF + 3F) e_mac
      memory-incl.    + e_mem x (spiking: synops weight reads + 2 per neuron update + 2 per spike;
                                 dense: 3CF weight reads + (2C + 6F) activation accesses)
                      + spiking neuron updates' own arithmetic
    """
    from keenlm.ledger import flops_per_token

    layers = spiking_layers(net)
    if len(stats) != len(layers) or not layers:
        raise ValueError(f"spike_energy: {len(stats)} statistics for {len(layers)} spiking layers")
    cfg = net.cfg
    C, Fw, T = cfg.d_model, cfg.d_ff, cfg.spike.steps
    e_upd = e_ac if cfg.spike.beta == 1.0 else e_mac
    rows, tot = [], {k: 0.0 for k in ("synops", "macs_dense", "naive_spiking", "naive_dense",
                                      "memory_spiking", "memory_dense", "spikes", "updates")}
    for i, s in enumerate(stats):
        synops = s["in_spikes"] * 2 * Fw + s["hidden_spikes"] * C
        macs = 3 * C * Fw
        spikes = s["in_spikes"] + s["hidden_spikes"]
        updates = (2 * C + 2 * Fw) * T
        analog_s, analog_d = C + Fw + 3 * Fw, 3 * Fw
        naive_s = synops * e_ac + analog_s * e_mac
        naive_d = (macs + analog_d) * e_mac
        mem_s = naive_s + updates * e_upd + e_mem * (synops + 2 * updates + 2 * spikes)
        mem_d = naive_d + e_mem * (macs + 2 * C + 6 * Fw)
        rows.append({"layer": i, "in_rate": s["in_rate"], "hidden_rate": s["hidden_rate"],
                     "synops": synops, "macs_dense": macs})
        for k, v in (("synops", synops), ("macs_dense", macs), ("naive_spiking", naive_s),
                     ("naive_dense", naive_d), ("memory_spiking", mem_s), ("memory_dense", mem_d),
                     ("spikes", spikes), ("updates", updates)):
            tot[k] += v
    # the rest of the model: analog multiply-accumulates (and weight reads) in both
    other_macs = flops_per_token(net, seq_len)["forward"] / 2 - tot["macs_dense"]
    other_weights = sum(p.numel() for n, p in net.named_parameters()  # read once per token
                        if ".mlp." not in n and not n.startswith(("embed_tokens", "lm_head"))) + \
        net.lm_head.weight.numel()  # tied or not, the head's matrix is read once
    other_naive = other_macs * e_mac
    other_mem = other_naive + e_mem * other_weights
    pj = 1e-12
    return {
        "steps": T, "layers": rows,
        "in_rate": sum(r["in_rate"] for r in rows) / len(rows),
        "hidden_rate": sum(r["hidden_rate"] for r in rows) / len(rows),
        "spikes_per_token": tot["spikes"], "synops_per_token": tot["synops"],
        "macs_per_token_dense_ffn": tot["macs_dense"],
        "synops_over_macs": tot["synops"] / tot["macs_dense"],
        "ffn_energy_j": {"naive": {"spiking": tot["naive_spiking"] * pj, "dense": tot["naive_dense"] * pj},
                         "memory": {"spiking": tot["memory_spiking"] * pj, "dense": tot["memory_dense"] * pj}},
        "model_energy_j": {"naive": {"spiking": (tot["naive_spiking"] + other_naive) * pj,
                                     "dense": (tot["naive_dense"] + other_naive) * pj},
                           "memory": {"spiking": (tot["memory_spiking"] + other_mem) * pj,
                                      "dense": (tot["memory_dense"] + other_mem) * pj}},
        "ffn_ratio": {"naive": tot["naive_spiking"] / tot["naive_dense"],
                      "memory": tot["memory_spiking"] / tot["memory_dense"]},
        "model_ratio": {k: (tot[f"{k}_spiking"] + o) / (tot[f"{k}_dense"] + o)
                        for k, o in (("naive", other_naive), ("memory", other_mem))},
        "constants_pj": {"mac": e_mac, "ac": e_ac, "memory_access": e_mem},
    }


def spike_counts(spikes: torch.Tensor) -> dict[str, float]:
    """Total spikes and the mean firing rate (spikes per neuron per step) of (T, ...) spikes."""
    total = float(spikes.sum())
    return {"spikes": total, "rate": total / spikes.numel() if spikes.numel() else 0.0}
