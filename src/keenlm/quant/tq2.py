"""Ternary weights in llama.cpp's TQ2_0 blocks times int8 activations: the low-bit decode kernel.

BitNet b1.58 (Ma et al. 2024, https://arxiv.org/abs/2402.17764) weights are d t with t in
{-1, 0, +1}. llama.cpp's TQ2_0 stores them in blocks of 256: 64 bytes of 2-bit codes q = t + 1
and one scale d, 2.0625 bits per weight. Byte 32 c + i of a block holds, in bits 2 l, the code
of weight 128 c + 32 l + i. keenlm keeps the blocks as the file has them (codes (N, K/4), the
scales apart) and multiplies them with activations rounded to int8 per block of 32 (the Q4
kernels' rounding, keenlm.quant.q4):

    sum_i w_i x_i  ~  d sum_j xd_j ((q . xq)_j - sum(xq)_j)      (j: the 8 blocks of 32)

with ``vpdpbusd`` (AVX-512 VNNI) taking the codes as unsigned bytes; a scalar loop elsewhere.

    T2Linear.forward      the C kernel (keenlm/quant/csrc/qdot.c, t2_*) for up to 16 rows;
                          more rows: the weights dequantized to bf16, one GEMM (as Q4Linear)
    T2Linear.reference    dequantize, then F.linear: the definition of the layer
    t2_matmul_reference   the kernel's arithmetic in torch, what the C paths reproduce

keenlm.infer.engine decodes models whose projections are T2Linear (a TQ2_0 GGUF read by
``keenlm.load(..., quant="q4")``) with the same C step as Q4 ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from keenlm.quant import q4 as _q4
from keenlm.quant.q4 import (MAX_ROWS, PATHS, _kernel_forward, _prefill, _qdot,
                             quantize_activations)

BLOCK = 256  # weights per TQ2_0 block
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 1, 4, 1)


def pack_t2(codes: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) in {0, 1, 2} -> the TQ2_0 byte order (N, K/4)."""
    n, k = codes.shape
    q = codes.to(torch.uint8).view(n, k // BLOCK, 2, 4, 32) << _SHIFTS
    return (q[..., 0, :] | q[..., 1, :] | q[..., 2, :] | q[..., 3, :]).reshape(n, k // 4)


def unpack_t2(qs: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) in {0, 1, 2} from the packed (N, K/4) bytes."""
    n, quarter = qs.shape
    b = qs.view(n, quarter // 64, 2, 1, 32) >> _SHIFTS
    return (b & 3).reshape(n, quarter * 4)


def quantize_t2(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (N, K/4), d fp16 (N, K/256)) of a float weight: BitNet b1.58's absmean rounding
    per block of 256, t = round(clamp(w / d, -1, 1)), d = mean |w|. A weight that is already
    ternary with one fp16 scale per block (d t) comes back exactly."""
    w = weight.detach().float()
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"tq2: input width {k} is not a multiple of {BLOCK}")
    g = w.view(n, k // BLOCK, BLOCK)
    nz = g.abs().masked_fill(g == 0, float("nan"))  # mean over the non-zero weights: a ternary
    d = torch.nan_to_num(nz.nanmean(-1), nan=0.0)  # d t block has them all at |w| = d
    t = torch.round(g / torch.where(d > 0, d, torch.ones_like(d))[..., None]).clamp(-1, 1)
    return pack_t2((t + 1).view(n, k)).contiguous(), d.half().contiguous()


def dequantize_t2(qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    n = qs.shape[0]
    t = unpack_t2(qs).float().view(n, -1, BLOCK) - 1
    return (t * d.float()[..., None]).view(n, -1)


def t2_matmul_reference(x: torch.Tensor, qs, d) -> torch.Tensor:
    """The kernel's arithmetic in torch (float64 sums): per 256-block, d times the sum over its
    8 activation blocks of xd (q . xq) - xs."""
    xq, xd, xs = quantize_activations(x)
    B, K = x.shape
    n = qs.shape[0]
    q = unpack_t2(qs).double().view(n, K // 32, 32)
    dots = torch.einsum("njk,bjk->bnj", q, xq.double().view(B, K // 32, 32))  # (B, N, K/32)
    per32 = dots * xd.double()[:, None] - xs.double()[:, None]
    return (per32.view(B, n, K // BLOCK, 8).sum(-1) * d.double()[None]).sum(-1).float()


def t2_matmul(x: torch.Tensor, qs, d, path: str = "auto", threads: int = 0) -> torch.Tensor:
    """out (B, N) = x (B, K) @ W^T for TQ2_0 weights by the compiled kernel, B <= 16;
    ``threads`` 0: the Q4 kernels' count (keenlm.quant.q4.THREADS)."""
    if _qdot is None:
        raise RuntimeError("keenlm.quant._qdot is not built (no C compiler at install)")
    x = x.float().contiguous()
    B, K = x.shape
    qs, d = qs.contiguous(), d.half().contiguous()
    n = qs.shape[0]
    if qs.dtype != torch.uint8 or qs.shape != (n, K // 4) or K % BLOCK or d.shape != (n, K // BLOCK):
        raise ValueError(f"t2_matmul: x {tuple(x.shape)} against codes {tuple(qs.shape)} "
                         f"{qs.dtype}, scales {tuple(d.shape)}")
    out = torch.empty(B, n, dtype=torch.float32)
    _qdot.t2_linear(x.data_ptr(), qs.data_ptr(), d.data_ptr(), out.data_ptr(), n, K, B,
                    PATHS[path], threads or _q4.THREADS)
    return out


class T2Linear(nn.Module):
    """A bias-free linear layer with ternary weights in TQ2_0 blocks (see the module docstring)."""

    def __init__(self, qs: torch.Tensor, d: torch.Tensor):
        super().__init__()
        n, quarter = qs.shape
        if qs.dtype != torch.uint8 or quarter % 64 or d.shape != (n, quarter // 64):
            raise ValueError(f"tq2: codes {tuple(qs.shape)} {qs.dtype}, scales {tuple(d.shape)} "
                             "do not describe one layer")
        self.register_buffer("qs", qs.contiguous())
        self.register_buffer("d", d.half().contiguous())  # fp16, as TQ2_0 stores it
        self.in_features, self.out_features = 4 * quarter, n
        self.path = "auto"

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "T2Linear":
        return cls(*quantize_t2(weight))

    def blocks(self):
        """(codes, scales, offsets, format) for the bf16 prefill pass (format 2: TQ2_0)."""
        return self.qs, self.d, None, 2

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_t2(self.qs, self.d).to(x.dtype))

    def kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        return t2_matmul(x2d, self.qs, self.d, self.path)

    forward, prefill = _kernel_forward, _prefill

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, TQ2_0 blocks of {BLOCK}"


__all__ = ["MAX_ROWS", "T2Linear", "dequantize_t2", "pack_t2", "quantize_t2", "t2_matmul",
           "t2_matmul_reference", "unpack_t2"]
