"""Int4 weight-only inference: groupwise asymmetric 4-bit weights for CPU decoding.

Each group of ``group_size`` consecutive weights in a row is rounded to 16 levels between its
minimum and maximum (round-to-nearest; Q4_1 in llama.cpp's terms, "asymmetric groupwise int4"
in torchao's):

    d = (max - min) / 15,   q = round((w - min) / d) in [0, 15],   w ~ min + d q

PyTorch's CPU kernel ``_weight_int4pack_mm_for_cpu`` multiplies bf16 activations by such
weights packed two per byte, with per-group (scale, zero) pairs meaning w = (q - 8) scale +
zero, so scale = d and zero = min + 8 d. Half the bytes of int8 per decode step.

A model imported from a Q4_1 GGUF file (SmolLM2's) is recovered exactly up to the bf16
rounding of the scales: its blocks of 32 already hold 16 levels between their min and max.
``Int4Linear.reference`` dequantizes in fp32 and calls ``F.linear``: the readable definition
the kernel is tested against. ``quantize_int4(net)`` is the converter; the LM head stays int8
(it is the most sensitive layer and the embedding of most GGUF files is stored at 8 bits).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from keenlm.quant.int8 import Int8Linear, _fuse_slots

PREFILL_ROWS = 16


@functools.cache
def _kernel_available() -> bool:  # probed once, not per layer
    try:
        q = torch.zeros(16, 64, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, 64, dtype=torch.bfloat16),
                                                   packed, 32, torch.zeros(2, 16, 2, dtype=torch.bfloat16))
        return True
    except (RuntimeError, AttributeError):
        return False


class Int4Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, group_size: int = 32):
        super().__init__()
        w = weight.detach().float()
        n, k = w.shape
        if k % group_size:
            raise ValueError(f"int4: input width {k} is not a multiple of the group size {group_size}")
        g = w.view(n, k // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        d = ((hi - lo) / 15).clamp_min(1e-12)
        q = torch.round((g - lo[..., None]) / d[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
        sz = torch.stack([d, lo + 8 * d], dim=-1).transpose(0, 1).contiguous()  # (k/g, n, 2)
        # codes one per byte, beside the kernel's packed copy: the prefill path widens them to
        # bf16 and the reference dequantizes them (costs 1 byte per weight of memory)
        self.register_buffer("q", q.to(torch.uint8))
        self.register_buffer("scales_zeros", sz.to(torch.bfloat16))
        # the same pairs laid out (n, k/g, 1) to widen weights to bf16 for prefill GEMMs
        self.register_buffer("_scale_rows", sz[..., 0].T.unsqueeze(-1).to(torch.bfloat16).contiguous())
        self.register_buffer("_zero_rows", sz[..., 1].T.unsqueeze(-1).to(torch.bfloat16).contiguous())
        self.group_size, self.in_features, self.out_features = group_size, k, n
        self.use_kernel = _kernel_available() and n % 16 == 0  # the packing needs N % 16 == 0
        if self.use_kernel:
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))

    def dequantized(self) -> torch.Tensor:
        sz = self.scales_zeros.float()  # (k/g, n, 2)
        scale = sz[..., 0].T.repeat_interleave(self.group_size, dim=1)  # (n, k)
        zero = sz[..., 1].T.repeat_interleave(self.group_size, dim=1)
        return (self.q.float() - 8) * scale + zero

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.dequantized()).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_kernel or x.device.type != "cpu":
            return self.reference(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if x2.shape[0] >= PREFILL_ROWS:  # prefill: compute-bound, bf16 GEMM on widened weights
            n, k, g = self.out_features, self.in_features, self.group_size
            q = self.q.view(n, k // g, g).to(torch.bfloat16).sub_(8)
            y = F.linear(x2, torch.addcmul(self._zero_rows, q, self._scale_rows).reshape(n, k))
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size,
                                                           self.scales_zeros)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


def quantize_int4(net: nn.Module, group_size: int = 32) -> nn.Module:
    """Every block projection to Int4Linear (q/k/v and gate/up fused), the LM head to int8."""
    if not _kernel_available():
        print("keenlm: the int4 CPU kernel is unavailable here; int4 layers use the "
              "dequantizing reference (correct, not faster)")
    _fuse_slots(net, lambda w: Int4Linear(w, group_size))
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                make = Int8Linear if name == "lm_head" else (lambda w: Int4Linear(w, group_size))
                setattr(parent, name, make(child.weight))
    return net
