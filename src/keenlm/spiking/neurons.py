"""Integrate-and-fire neurons and the rate code of signed activations, with a surrogate
gradient; the reference (``lif``, step by step with autograd) beside the fast path
(``RateCode``, one saved tensor, the numba kernel of keenlm.spiking.kernels when present).

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

**Fine-tuning** trains through the spikes with a surrogate gradient: the forward keeps the
exact step function, the backward uses the fast-sigmoid derivative 1 / (1 + slope |v - 1|)^2
(Zenke & Ganguli 2018, SuperSpike), bounded by 1 and never NaN, also at +-inf. The reset is
detached in the backward pass (as snnTorch does). ``RateCode`` computes the exact
backpropagation-through-time gradient of the spike counts in the same pass as the counts, so
training stores one tensor per stage instead of T; ``lif`` with autograd is its reference. We
write this ourselves rather than train with snnTorch: it is one small autograd.Function, and the
runs need no extra package (snnTorch reads the NIR export back in the round-trip test).
"""
from __future__ import annotations

import torch

from keenlm.spiking import kernels as spiking_kernels


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
