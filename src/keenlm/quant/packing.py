"""Packed low-bit storage: integer codes of 2, 3 or 4 bits packed along each row, plus scales.

One format serves every low-bit weight in keenlm -- trained ternary/2-bit/4-bit (QAT) and
post-training RTN/GPTQ at 4, 3, 2 bits or ternary. A weight is an affine function of its code,
with one (scale, offset) pair per group of ``group`` consecutive inputs of a row:

    w = code * scale + offset,     code in [0, 2^bits)

(group = the input width means one pair per row). Ternary {-1, 0, +1} * gamma is codes
{0, 1, 2} with scale gamma and offset -gamma; ParetoQ's 2-bit grid {-1.5, -0.5, 0.5, 1.5} * alpha
is codes 0..3 with offset -1.5 alpha; asymmetric min-max grids (GPTQ, Q4_1) have offset = min.

Codes are packed along each row, little end first: 2-bit codes four to a byte
(byte = c0 | c1 << 2 | c2 << 4 | c3 << 6), 4-bit two to a byte, 3-bit eight to three bytes.
A row whose length does not fill its last byte group is padded with code 0 and the true length
is kept, so unpacking is exact for every shape.

``PackedLinear.reference`` unpacks, dequantizes and calls ``F.linear``: the plain path every
fast kernel is tested against. Fast paths, chosen once per layer from its format, CPU only,
without autograd:

- 2 bits, one scale per row: the lookup-table kernel (``packed_kernels.lut_matmul``, numba)
  for up to ``MAX_ROWS`` rows (decode);
- up to 4 bits, groups of 32/64/128/256: PyTorch's int4 CPU kernel
  (``_weight_int4pack_mm_for_cpu``, bf16 activations) for fewer than 16 rows; 2- and 3-bit
  codes are 4-bit codes that never use the top levels.

Larger batches (prefill) use the reference. ``convert_qat(net)`` turns every trained
``QATLinear`` into a PackedLinear (the "convert" of prepare -> train -> convert); in fp32 its
outputs equal the QAT model's up to rounding of the last bit.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from keenlm.quant import kernels as packed_kernels
from keenlm.quant.int4 import _kernel_available
from keenlm.quant.int8 import FusedSlice
from keenlm.quant.kernels import MAX_ROWS, lut_matmul
from keenlm.quant.qat import QATLinear, act_quant_8bit, qat_codes

INT4_GROUPS = (32, 64, 128, 256)  # group sizes PyTorch's int4 CPU kernel accepts
INT4_MAX_ROWS = 15  # from 16 rows on (prefill) a GEMM on widened weights is faster


def codes_per_unit(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest run of codes that fills whole bytes: 2 bits -> (4, 1)."""
    k = 8 // math.gcd(8, bits)
    return k, k * bits // 8


def packed_width(n: int, bits: int) -> int:
    k, m = codes_per_unit(bits)
    return -(-n // k) * m


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (rows, n) uint8 in [0, 2^bits) -> (rows, packed_width(n, bits)) uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: allowed 1..8")
    rows, n = codes.shape
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes do not fit in {bits} bits")
    k, m = codes_per_unit(bits)
    padded = torch.zeros(rows, -(-n // k) * k, dtype=torch.uint8, device=codes.device)
    padded[:, :n] = codes
    parts = padded.view(rows, -1, k).to(torch.int64)
    val = torch.zeros(parts.shape[:2], dtype=torch.int64, device=codes.device)
    for i in range(k):
        val |= parts[..., i] << (bits * i)
    return torch.stack([(val >> (8 * j)) & 255 for j in range(m)], dim=-1).reshape(rows, -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: (rows, bytes) uint8 -> (rows, n) uint8 codes."""
    k, m = codes_per_unit(bits)
    rows = packed.shape[0]
    b = packed.view(rows, -1, m).to(torch.int64)
    val = torch.zeros(b.shape[:2], dtype=torch.int64, device=packed.device)
    for j in range(m):
        val |= b[..., j] << (8 * j)
    mask = (1 << bits) - 1
    codes = torch.stack([(val >> (bits * i)) & mask for i in range(k)], dim=-1)
    return codes.reshape(rows, -1)[:, :n].to(torch.uint8)


def _int4_kernel_available() -> bool:
    return _kernel_available()  # probed once per process


class PackedLinear(nn.Module):
    """y = x W^T with W stored as packed codes and per-group (scale, offset): inference only.

    packed (rows, packed_width(in_features, bits)) uint8; scale and offset (rows, groups)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, *,
                 bits: int, in_features: int, group: int = 0, act_bits: int = 0):
        super().__init__()
        group = group or in_features
        rows = packed.shape[0]
        if packed.dtype != torch.uint8 or packed.shape != (rows, packed_width(in_features, bits)):
            raise ValueError(f"packed codes {tuple(packed.shape)} {packed.dtype} do not hold "
                             f"{rows} rows of {in_features} {bits}-bit codes")
        if in_features % group:
            raise ValueError(f"input width {in_features} is not a multiple of the group {group}")
        if scale.shape != (rows, in_features // group) or offset.shape != scale.shape:
            raise ValueError(f"scale {tuple(scale.shape)} / offset {tuple(offset.shape)} should be "
                             f"{(rows, in_features // group)}")
        self.bits, self.group, self.act_bits = bits, group, act_bits
        self.in_features, self.out_features = in_features, rows
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.path = self._choose_path()
        self._prepare_path()

    # ------------------------------------------------------------------ fast-path set-up

    def _choose_path(self) -> str:
        if self.bits == 2 and self.group == self.in_features and packed_kernels.available():
            return "lut"
        if (self.bits <= 4 and self.group in INT4_GROUPS and self.out_features % 16 == 0
                and _int4_kernel_available()):
            return "int4"
        return "reference"

    def _prepare_path(self):
        if self.path == "lut":  # the kernel's layout: input-group-major words (see packed_kernels)
            self.register_buffer("_words", packed_kernels.kernel_layout(self.packed), persistent=False)
            self.register_buffer("_scale32", self.scale.float().reshape(-1).contiguous(), persistent=False)
            self.register_buffer("_offset32", self.offset.float().reshape(-1).contiguous(), persistent=False)
        elif self.path == "int4":
            codes = self.codes().to(torch.int32)
            self.register_buffer("_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
                                 persistent=False)
            # the kernel's convention: w = (q - 8) * scale + zero, pairs laid out (groups, rows, 2)
            s, o = self.scale.float(), self.offset.float()
            sz = torch.stack([s, o + 8 * s], dim=-1).transpose(0, 1).contiguous()
            self.register_buffer("_scales_zeros", sz.to(torch.bfloat16), persistent=False)

    def _apply(self, fn, *args, **kwargs):  # .to(device): derived buffers follow the real ones
        out = super()._apply(fn, *args, **kwargs)
        if self.packed.device.type != "cpu" and self.path != "reference":
            self.path = "reference"
        return out

    # ------------------------------------------------------------------ weights

    def codes(self) -> torch.Tensor:
        return unpack(self.packed, self.bits, self.in_features)

    def weight(self) -> torch.Tensor:
        """The dequantized (rows, in_features) fp32 weight."""
        expand = lambda t: t.float().repeat_interleave(self.group, dim=1)  # noqa: E731
        return self.codes().float() * expand(self.scale) + expand(self.offset)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.offset))

    # ------------------------------------------------------------------ compute

    def forward(self, x):
        if self.act_bits == 8:
            x = act_quant_8bit(x)
        rows = x.numel() // x.shape[-1]
        if self.path == "reference" or torch.is_grad_enabled() or x.device.type != "cpu":
            return self.reference(x)
        x2 = x.reshape(rows, -1)
        if self.path == "lut" and rows <= MAX_ROWS:
            y = lut_matmul(x2, self._words, self._scale32, self._offset32)
        elif self.path == "int4" and rows <= INT4_MAX_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self._int4,
                                                           self.group, self._scales_zeros)
        else:
            return self.reference(x)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def reference(self, x):
        """Unpack, dequantize, multiply: the plain path every kernel is tested against."""
        return F.linear(x, self.weight().to(x.dtype))

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, bits={self.bits}, group={self.group}, "
                f"path={self.path}")


def from_codes(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
               group: int = 0, act_bits: int = 0) -> PackedLinear:
    return PackedLinear(pack(codes, bits), scale, offset, bits=bits, in_features=codes.shape[1],
                        group=group, act_bits=act_bits)


def fuse_packed(net: nn.Module) -> nn.Module:
    """Run q/k/v and gate/up as one PackedLinear each when their formats agree (one table
    build and one kernel call per decode step instead of three). In place."""
    for m in list(net.modules()):
        for names, attr in ((("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                            (("gate_proj", "up_proj"), "gate_up_proj")):
            parts = [getattr(m, n, None) for n in names]
            if not hasattr(m, attr) or not all(isinstance(p, PackedLinear) for p in parts):
                continue
            if len({(p.bits, p.group, p.in_features, p.act_bits, p.scale.dtype) for p in parts}) != 1:
                continue
            p0 = parts[0]
            fused = PackedLinear(torch.cat([p.packed for p in parts]),
                                 torch.cat([p.scale for p in parts]),
                                 torch.cat([p.offset for p in parts]), bits=p0.bits,
                                 in_features=p0.in_features, group=p0.group, act_bits=p0.act_bits)
            setattr(m, attr, fused)
            start = 0
            for n, p in zip(names, parts):
                setattr(m, n, FusedSlice(fused, start, start + p.out_features))
                start += p.out_features
    return net


@torch.no_grad()
def convert_qat(net: nn.Module) -> nn.Module:
    """Converter: every QATLinear becomes a PackedLinear (inference only). In place."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QATLinear):
                codes, scale, offset, bits, group = qat_codes(child)
                setattr(parent, name, from_codes(codes, scale, offset, bits, group, child.act_bits))
    return net
