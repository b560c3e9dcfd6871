"""Low-bit weights: quantization-aware training with ternary, 2-bit and 4-bit linears.

The claim (BitNet b1.58, Ma et al. 2024, https://arxiv.org/abs/2402.17764): weights in
{-1, 0, +1} times a scale keep most of a model's quality when the model is trained that way.
Training keeps full-precision *latent* weights; every forward pass uses their quantized values,
and the gradient passes the rounding unchanged (the straight-through estimator, Bengio et al.
2013), so the latent weights keep learning.

Quantizers (weights W of one linear layer, rows = output channels):

- ``ternary``: absmean, as in BitNet b1.58. gamma = mean |W| (per tensor, or per row with
  ``per_channel``); W_q = gamma * clip(round(W / gamma), -1, 1). 1.58 bits per weight.
- ``int2``: ParetoQ's stretched elastic quantizer (Liu et al. 2025,
  https://arxiv.org/abs/2502.02631) for 2 bits: four levels {-1.5, -0.5, 0.5, 1.5} * alpha
  (no zero level, the grid stretched to use all four codes), alpha learned per output row
  with the LSQ gradient (Esser et al. 2019) -- autograd derives it from the STE formula below.
  alpha starts at max|W_row| / 2 from scratch; converting a trained model (``prepare_qat``,
  or the switch of ``train.schedule.qat_start``) starts it at the step with the least rounding error.
- ``int4``: symmetric groupwise, 16 levels {-8..7} * s per group of ``group`` weights along the
  input dimension, s = absmax / 7 of the group (round to nearest).

Optional 8-bit activations (``act_bits=8``, BitNet's W1.58A8): each token's activation vector is
scaled by 127 / absmax and rounded, with the same straight-through gradient.

These are registered as linear kinds (``LINEAR["ternary" | "int2" | "int4"]`` in
keenlm.model.layers), so ``model.linear: ternary`` trains a BitNet-style model from scratch, and
``prepare_qat(model, kind)`` converts an existing model (a keenlm run, an imported GGUF or HF
model) for quantization-aware fine-tuning. Packing, fast kernels and export come on top.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from keenlm.quant.config import LowBitConfig


class RoundSTE(torch.autograd.Function):
    """round() forward; identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


round_ste = RoundSTE.apply


def ternary_absmean(w: torch.Tensor, per_channel: bool = False, eps: float = 1e-5) -> torch.Tensor:
    gamma = (w.abs().mean(dim=1, keepdim=True) if per_channel else w.abs().mean()).clamp_min(eps)
    return round_ste(w / gamma).clamp(-1, 1) * gamma


def int2_seq(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Stretched elastic 2-bit grid {-1.5, -0.5, 0.5, 1.5} * alpha (alpha: (rows, 1))."""
    return (round_ste(w / alpha - 0.5).clamp(-2, 1) + 0.5) * alpha


def int4_groupwise(w: torch.Tensor, group: int) -> torch.Tensor:
    rows, cols = w.shape
    if cols % group:
        raise ValueError(f"int4 QAT: input width {cols} is not a multiple of group {group}")
    g = w.view(rows, cols // group, group)
    scale = (g.abs().amax(dim=-1, keepdim=True) / 7).clamp_min(1e-8)
    return (round_ste(g / scale).clamp(-8, 7) * scale).view(rows, cols)


def act_quant_8bit(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax 8-bit fake quantization of activations (straight-through)."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
    return round_ste(x * scale).clamp(-128, 127) / scale


class QATLinear(nn.Linear):
    """A bias-free linear whose forward uses quantized weights (and optionally activations)."""

    def __init__(self, in_features: int, out_features: int, kind: str, *, group: int = 32,
                 per_channel: bool = False, act_bits: int = 0):
        super().__init__(in_features, out_features, bias=False)
        if kind not in QUANTIZERS:
            raise ValueError(f"unknown low-bit kind {kind!r} ({' | '.join(QUANTIZERS)})")
        self.kind, self.group, self.per_channel, self.act_bits = kind, group, per_channel, act_bits
        self.quantize = True  # False: plain full-precision linear (the QAT schedule's first part)
        if kind == "int2":  # learned step per output row (LSQ-style), set from the weights
            self.alpha = nn.Parameter(torch.ones(out_features, 1))
            self.init_alpha()

    def own_parameters(self):
        return [self.alpha] if self.kind == "int2" else []

    def reset_own_parameters(self):
        self.init_alpha()

    @torch.no_grad()
    def init_alpha(self, fit: bool = False):
        """2-bit step per row: max|w| / 2, or with ``fit`` (trained weights: prepare_qat, the
        QAT schedule's switch) the step with the least squared rounding error per row."""
        if self.kind != "int2" or self.weight.is_meta:
            return
        w = self.weight.float()
        top = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-5)
        if not fit:
            self.alpha.copy_(top / 2)
            return
        best, best_err = None, None
        for f in torch.linspace(0.1, 0.7, 25).tolist():
            a = top * f
            err = ((torch.round(w / a - 0.5).clamp(-2, 1) + 0.5) * a - w).pow(2).sum(1, keepdim=True)
            if best is None:
                best, best_err = a, err
            else:
                better = err < best_err
                best, best_err = torch.where(better, a, best), torch.where(better, err, best_err)
        self.alpha.copy_(best)

    def quantized_weight(self) -> torch.Tensor:
        if self.kind == "ternary":
            return ternary_absmean(self.weight, self.per_channel)
        if self.kind == "int2":
            return int2_seq(self.weight, self.alpha.abs().clamp_min(1e-8))
        return int4_groupwise(self.weight, self.group)

    def forward(self, x):
        if not self.quantize:
            return F.linear(x, self.weight.to(x.dtype))
        if self.act_bits == 8:
            x = act_quant_8bit(x)
        return F.linear(x, self.quantized_weight().to(x.dtype))

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, kind={self.kind}"


def set_quantize(net: nn.Module, on: bool) -> int:
    """Turn quantization of every QATLinear on or off; returns how many switched. Turning it on
    re-fits the learned 2-bit steps to the weights as they are now."""
    switched = 0
    for m in net.modules():
        if isinstance(m, QATLinear) and m.quantize != on:
            m.quantize = on
            if on:
                m.init_alpha(fit=True)
            switched += 1
    return switched


@torch.no_grad()
def qat_codes(q: QATLinear):
    """(codes, scale, offset, bits, group) of a QATLinear's quantized weight in the packed
    format's affine form w = code * scale + offset (see keenlm.quant.packing)."""
    w = q.weight.detach().float()
    rows, cols = w.shape
    if q.kind == "ternary":
        gamma = (w.abs().mean(dim=1, keepdim=True) if q.per_channel else w.abs().mean()).clamp_min(1e-5)
        gamma = gamma.expand(rows, 1) if gamma.dim() == 0 else gamma
        codes = (torch.round(w / gamma).clamp(-1, 1) + 1).to(torch.uint8)  # -1, 0, +1 -> 0, 1, 2
        return codes, gamma.contiguous(), (-gamma).contiguous(), 2, cols
    if q.kind == "int2":
        alpha = q.alpha.detach().float().abs().clamp_min(1e-8)
        codes = (torch.round(w / alpha - 0.5).clamp(-2, 1) + 2).to(torch.uint8)
        return codes, alpha.contiguous(), (-1.5 * alpha).contiguous(), 2, cols
    g = w.view(rows, cols // q.group, q.group)
    scale = (g.abs().amax(dim=-1, keepdim=True) / 7).clamp_min(1e-8)
    codes = (torch.round(g / scale).clamp(-8, 7) + 8).to(torch.uint8).view(rows, cols)
    scale = scale.squeeze(-1).contiguous()
    return codes, scale, -8 * scale, 4, q.group


QUANTIZERS = ("ternary", "int2", "int4")


def qat_linear_factory(kind: str):
    """A LINEAR registry entry: (in_features, out_features, cfg) -> QATLinear."""

    def make(in_features: int, out_features: int, cfg=None) -> QATLinear:
        low = cfg.lowbit if cfg is not None else LowBitConfig()
        return QATLinear(in_features, out_features, kind, group=low.group,
                         per_channel=low.per_channel, act_bits=low.act_bits)

    return make


@torch.no_grad()
def prepare_qat(net: nn.Module, kind: str, *, group: int = 32, per_channel: bool = False,
                act_bits: int = 0, skip=("lm_head",)) -> nn.Module:
    """Converter: every bias-free nn.Linear (except ``skip``) becomes a QATLinear that keeps
    the trained weights as its latent weights. In place; returns ``net``."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None and name not in skip:
                q = QATLinear(child.in_features, child.out_features, kind, group=group,
                              per_channel=per_channel, act_bits=act_bits).to(child.weight.device)
                q.weight.copy_(child.weight)
                q.init_alpha(fit=True)
                setattr(parent, name, q)
    return net


class QATConversion:
    """The trainer's converter for low-bit linears (keenlm.train.converters).

    adopt: starting from a loaded full-precision model, this config's linear kind and
    ``model.lowbit`` apply to it, and every block projection becomes a QATLinear keeping the
    trained weights (``prepare_qat``). on_step: ``train.schedule.qat_start`` -- full precision
    until that fraction of the planned steps, quantization-aware from then on."""

    name = "qat"

    def __init__(self, cfg):
        self.cfg = cfg
        self._on = None

    @classmethod
    def for_run(cls, cfg, start=None):
        return cls(cfg) if start is not None or cfg.model.linear != "dense" else None

    def adopt(self, model, net, data, log):
        m = self.cfg.model
        if m.linear != "dense":
            prepare_qat(net, m.linear, group=m.lowbit.group, per_channel=m.lowbit.per_channel,
                        act_bits=m.lowbit.act_bits)
        return dataclasses.replace(model, linear=m.linear, lowbit=m.lowbit)

    def on_step(self, model, step, planned_steps):
        on = step >= int(self.cfg.train.schedule.qat_start * planned_steps)
        if on != self._on:
            if set_quantize(model, on) and self._on is not None:
                print(f"step {step}: quantization-aware training starts")
            self._on = on

    def begin_eval(self, model):
        pass

    def end_eval(self, model, seq_len) -> dict:
        return {}
