"""Building blocks of the Llama-family decoder: RMSNorm, rotary embeddings, and the
registries of linear-layer and feed-forward constructors.

- RMSNorm (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467): x / rms(x) * g.
- RoPE (Su et al. 2021, https://arxiv.org/abs/2104.09864), in the "rotate half" layout that
  Hugging Face's Llama uses, so weights move between the two without permutation.
- SwiGLU feed-forward (Shazeer 2020, https://arxiv.org/abs/2002.05202): down(silu(gate(x)) * up(x)).

Registries are plain dicts of same-signature constructors, resolved once at build time:

    LINEAR[kind](in_features, out_features) -> nn.Module     (no bias, as in Llama)
    FFN[kind](cfg, linear) -> nn.Module                        (maps (B, T, C) -> (B, T, C))

A later technique (low-bit linears, mixture of experts) adds an entry; the model never changes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in fp32 even under bf16 autocast: the mean of squares loses precision
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float):
    """cos/sin tables for integer positions of any shape P -> (*P, head_dim), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (*P, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (*P, D), "rotate half" layout
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos/sin: (T, D) or (B, 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def dense_linear(in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=False)


LINEAR: dict[str, Callable[[int, int], nn.Module]] = {
    "dense": dense_linear,
}


class SwiGLU(nn.Module):
    def __init__(self, cfg, linear):
        super().__init__()
        self.gate_proj = linear(cfg.d_model, cfg.d_ff)
        self.up_proj = linear(cfg.d_model, cfg.d_ff)
        self.down_proj = linear(cfg.d_ff, cfg.d_model)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


FFN: dict[str, Callable] = {
    "dense": SwiGLU,
}
