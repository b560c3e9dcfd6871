"""Building blocks of the Llama-family decoder: RMSNorm, rotary embeddings, the dense linear
layer and the SwiGLU feed-forward.

- RMSNorm (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467): x / rms(x) * g.
- RoPE (Su et al. 2021, https://arxiv.org/abs/2104.09864), in the "rotate half" layout that
  Hugging Face's Llama uses, so weights move between the two without permutation.
- SwiGLU feed-forward (Shazeer 2020, https://arxiv.org/abs/2002.05202): down(silu(gate(x)) * up(x)).

The registries that choose among these and the techniques' variants (``LINEAR``, ``FFN``) live
in keenlm.model.transformer, one layer above every part they name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm_reference(x, weight, eps):
    """Reference RMSNorm: x / sqrt(mean(x^2) + eps) * weight, statistics in fp32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """RMSNorm with a hand-written backward (autograd's decomposition makes ~10 passes over
    the activations; this makes ~5). With xh = x * r, r = rsqrt(mean(x^2) + eps):
        dL/dw = sum over rows of g * xh
        dL/dx = r * (g w - xh * mean(g w xh))
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).mul_(weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        xh = x.float() * rstd
        gf = g.float()
        gw = gf * weight.float()
        dot = (gw * xh).mean(-1, keepdim=True)
        dx = gw.sub_(xh * dot).mul_(rstd)
        dweight = (gf * xh).flatten(0, -2).sum(0)
        return dx.to(x.dtype), dweight.to(weight.dtype), None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if not torch.is_grad_enabled():  # generation: skip the autograd.Function machinery
            xf = x.float()
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(self.eps))
            return (xf * rstd).mul_(self.weight.float()).to(x.dtype)
        return _RMSNorm.apply(x, self.weight, self.eps)


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float):
    """cos/sin for integer positions of any shape P -> (*P, head_dim / 2), fp32.

    Frequency i rotates the pair (x[i], x[i + head_dim/2]) ("rotate half" layout, as in
    Hugging Face's Llama), so weights move between the two without permutation.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (*P, D/2)
    return angles.cos(), angles.sin()


def rotate_reference(x, cos, sin):
    """Reference RoPE, the textbook formula: x * cos + rotate_half(x) * sin.

    x: (B, T, H, D); cos/sin: (T, 1, D/2) or (B, T, 1, D/2).
    """
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def _rotate(x, cos, sin):
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written straight into the two halves of
    the output: no concatenation, no temporaries (each was a full pass over memory)."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class _Rope(torch.autograd.Function):
    """RoPE with a hand-written backward: the gradient of a rotation by +theta is the rotation
    of the incoming gradient by -theta, so backward costs what forward costs and saves only
    the tables (autograd would keep x and several intermediates)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def apply_rope(x, cos, sin):
    """Rotary embedding of x: (B, T, H, D), contiguous in D (rotate before moving heads to
    dim 1: elementwise ops on the transposed view are several times slower on CPU)."""
    if not torch.is_grad_enabled():
        return _rotate(x, cos.to(x.dtype), sin.to(x.dtype))
    return _Rope.apply(x, cos, sin)


def dense_linear(in_features: int, out_features: int, cfg=None) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=False)


def fused_projection(x: torch.Tensor, *mods: nn.Module) -> torch.Tensor:
    """Several projections of the same input (q, k, v; gate, up), concatenated on the last dim.

    The parameters stay separate (named as in Hugging Face's Llama, quantizable one by one);
    only the execution is fused when that pays: in training, plain bias-free ``nn.Linear``
    layers run as one matrix multiply over their concatenated weights (a bigger GEMM runs
    closer to peak, and backward sums one input gradient instead of three). Without autograd
    (generation) the weight copy would cost more than it saves -- a decode step reads each
    weight once anyway -- and other linear kinds (quantized ones) always run one by one.
    Decided per call from the modules present, so converters that swap layers need no rewiring.
    """
    if torch.is_grad_enabled() and all(type(m) is nn.Linear and m.bias is None for m in mods):
        return F.linear(x, torch.cat([m.weight for m in mods]))
    return torch.cat([m(x) for m in mods], dim=-1)


def swiglu_reference(gate_up):
    """silu(gate) * up for gate_up = [gate | up] along the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up on the fused [gate | up] projection, with a backward that writes both
    gradients into one tensor (autograd would build them apart and concatenate: a full extra
    pass over the widest activation). With s = sigmoid(gate):
        d/d up   = g * gate * s
        d/d gate = g * up * s * (1 + gate * (1 - s))
    """

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, g):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        d_gate, d_up = out.chunk(2, dim=-1)
        s = torch.sigmoid(gate)
        torch.mul(gate, s, out=d_up).mul_(g)  # g * silu(gate)
        one_minus = torch.rsub(s, 1.0).mul_(gate).add_(1.0)  # 1 + gate (1 - s)
        torch.mul(g, up, out=d_gate).mul_(s).mul_(one_minus)
        return out


class SwiGLU(nn.Module):
    def __init__(self, cfg, linear):
        super().__init__()
        self.gate_proj = linear(cfg.d_model, cfg.d_ff)
        self.up_proj = linear(cfg.d_model, cfg.d_ff)
        self.down_proj = linear(cfg.d_ff, cfg.d_model)
        self.gate_up_proj = None  # a converter may install one module computing [gate | up]

    def forward(self, x):
        gate_up = (self.gate_up_proj(x) if self.gate_up_proj is not None
                   else fused_projection(x, self.gate_proj, self.up_proj))
        if not torch.is_grad_enabled():
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(F.silu(gate).mul_(up))
        return self.down_proj(_SwiGLU.apply(gate_up))
