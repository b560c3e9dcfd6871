"""Spiking execution: leaky integrate-and-fire (LIF) neurons, a surrogate gradient, spike counts.

The neuron, in discrete time (Eshraghian et al. 2023, "Training Spiking Neural Networks Using
Lessons From Deep Learning", https://arxiv.org/abs/2109.12894, the form snnTorch's ``Leaky``
uses):

    v[t] = beta * v[t-1] + I[t]          membrane potential, leak beta in [0, 1)
    s[t] = 1 if v[t] >= threshold else 0 a spike
    v[t] = v[t] - s[t] * threshold       reset by subtraction (keeps the overshoot)

For a constant input I below threshold the potential follows the closed form
v[t] = I (1 - beta^t) / (1 - beta) (v[0] = 0), which the tests check.

The spike is a step function, whose derivative is zero almost everywhere; training through it
uses a surrogate: the forward pass keeps the exact step, the backward pass uses the derivative
of a fast sigmoid, 1 / (1 + slope |v - threshold|)^2 (Zenke & Ganguli 2018, SuperSpike). It is
bounded by 1 and goes to 0 (never NaN) as |v| grows without bound, also at +-inf. We write our
own rather than depend on snnTorch for training: it is one small autograd.Function, and the
runs need no extra package (snnTorch is used to check the NIR export).

Built so far: the neuron over T steps, the surrogate, spike counting. Not built yet: conversion
of a trained model's feed-forward layers (threshold balancing), spiking fine-tuning, the
synaptic-operation and energy accounting, NIR export, ``keenlm spike``.
"""
from __future__ import annotations

import torch


class SpikeFn(torch.autograd.Function):
    """Heaviside step forward, fast-sigmoid surrogate backward (``slope`` sets its width)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: float):
        ctx.save_for_backward(x)
        ctx.slope = slope
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        surrogate = 1.0 / (1.0 + ctx.slope * x.abs()).pow(2)
        return grad * torch.nan_to_num(surrogate, nan=0.0), None


def lif(current: torch.Tensor, beta: float, threshold: float = 1.0, slope: float = 25.0,
        v0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run LIF neurons over the first dimension (time): current (T, ...) -> (spikes (T, ...),
    final membrane potential (...)). Differentiable through the surrogate."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"lif: beta={beta} must be in [0, 1)")
    if threshold <= 0:
        raise ValueError(f"lif: threshold={threshold} must be > 0")
    v = torch.zeros_like(current[0]) if v0 is None else v0
    spikes = []
    for t in range(current.shape[0]):
        v = beta * v + current[t]
        s = SpikeFn.apply(v - threshold, slope)
        v = v - s * threshold
        spikes.append(s)
    return torch.stack(spikes), v


def spike_counts(spikes: torch.Tensor) -> dict[str, float]:
    """Total spikes and the mean firing rate (spikes per neuron per step) of (T, ...) spikes."""
    total = float(spikes.sum())
    return {"spikes": total, "rate": total / spikes.numel() if spikes.numel() else 0.0}
