"""Packed low-bit storage: 2-bit codes four to a byte, 4-bit codes two to a byte.

Ternary weights {-1, 0, +1} and 2-bit weights {-1.5, -0.5, 0.5, 1.5} both fit 2-bit codes
0..3; 4-bit weights {-8..7} fit 4-bit codes 0..15. Codes are packed along each row (the input
dimension), little end first: byte = c0 | c1 << 2 | c2 << 4 | c3 << 6. A row whose length is
not a multiple of the codes per byte is padded with code 0 and the true length is kept, so
unpacking is exact for every shape.

``PackedLinear`` holds packed codes plus scales and computes y = x W^T by unpacking to a
full-precision matrix and calling ``F.linear``: the plain path every fast packed kernel will be
tested against. ``convert_qat(net)`` turns every trained ``QATLinear`` into one (the "convert"
step of prepare -> train -> convert); its outputs equal the QAT model's exactly in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from keenlm.model.packed_kernels import MAX_ROWS, lut_matmul
from keenlm.model.packed_kernels import available as kernels_available

# code -> level, per kind (levels are multiplied by the row's or group's scale)
LEVELS = {
    "ternary": torch.tensor([0.0, 1.0, -1.0, 0.0]),  # code 3 unused
    "int2": torch.tensor([-1.5, -0.5, 0.5, 1.5]),
    "int4": torch.arange(-8, 8, dtype=torch.float32),
}
BITS = {"ternary": 2, "int2": 2, "int4": 4}


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (rows, n) uint8 in [0, 2^bits) -> (rows, ceil(n * bits / 8)) uint8."""
    per = 8 // bits
    rows, n = codes.shape
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes do not fit in {bits} bits")
    padded = torch.zeros(rows, -(-n // per) * per, dtype=torch.uint8, device=codes.device)
    padded[:, :n] = codes
    parts = padded.view(rows, -1, per).to(torch.int32)
    out = torch.zeros(parts.shape[:2], dtype=torch.int32, device=codes.device)
    for i in range(per):
        out |= parts[..., i] << (bits * i)
    return out.to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: (rows, bytes) uint8 -> (rows, n) uint8 codes."""
    per, mask = 8 // bits, (1 << bits) - 1
    p = packed.to(torch.int32)
    codes = torch.stack([(p >> (bits * i)) & mask for i in range(per)], dim=-1)
    return codes.reshape(packed.shape[0], -1)[:, :n].to(torch.uint8)


def codes_and_scales(q: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer codes and scales of a QATLinear's current quantized weight."""
    from keenlm.model.lowbit import QATLinear

    assert isinstance(q, QATLinear)
    w = q.weight.detach().float()
    if q.kind == "ternary":
        gamma = (w.abs().mean(dim=1, keepdim=True) if q.per_channel else w.abs().mean()).clamp_min(1e-5)
        t = torch.round(w / gamma).clamp(-1, 1)
        codes = torch.where(t < 0, 2, t).to(torch.uint8)  # 0 -> 0, +1 -> 1, -1 -> 2
        scale = gamma.expand(w.shape[0], 1) if gamma.dim() == 0 else gamma
        return codes, scale.reshape(-1, 1).contiguous()
    if q.kind == "int2":
        alpha = q.alpha.detach().abs().clamp_min(1e-8)
        codes = (torch.round(w / alpha - 0.5).clamp(-2, 1) + 2).to(torch.uint8)
        return codes, alpha.reshape(-1, 1).contiguous()
    g = w.view(w.shape[0], -1, q.group)
    scale = (g.abs().amax(dim=-1, keepdim=True) / 7).clamp_min(1e-8)
    codes = (torch.round(g / scale).clamp(-8, 7) + 8).to(torch.uint8).view(w.shape)
    return codes, scale.squeeze(-1).contiguous()  # (rows, groups)


class PackedLinear(nn.Module):
    """Packed low-bit weights + scales; forward unpacks and multiplies (the reference path)."""

    def __init__(self, kind: str, packed: torch.Tensor, scales: torch.Tensor, in_features: int,
                 group: int = 32, act_bits: int = 0):
        super().__init__()
        self.kind, self.in_features, self.out_features = kind, in_features, packed.shape[0]
        self.group, self.act_bits = group, act_bits
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        # the lookup-table kernel reads 2-bit codes with one scale per row
        self.use_kernel = kernels_available() and BITS[kind] == 2 and scales.shape[1] == 1
        if self.use_kernel:  # the kernel's layout: input-group-major (see packed_kernels)
            self.register_buffer("packed_t", packed.t().contiguous(), persistent=False)

    def weight(self) -> torch.Tensor:
        codes = unpack(self.packed, BITS[self.kind], self.in_features).long()
        levels = LEVELS[self.kind].to(self.scales.device)[codes]  # (rows, in)
        if self.kind == "int4":
            return levels * self.scales.repeat_interleave(self.group, dim=1)
        return levels * self.scales

    def forward(self, x):
        if self.act_bits == 8:
            from keenlm.model.lowbit import act_quant_8bit

            x = act_quant_8bit(x)
        rows = x.numel() // x.shape[-1]
        if self.use_kernel and rows <= MAX_ROWS and not torch.is_grad_enabled() and x.device.type == "cpu":
            y = lut_matmul(x.reshape(rows, -1), self.packed_t, LEVELS[self.kind], self.scales)
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return self.reference(x)

    def reference(self, x):
        """Unpack, then multiply: the plain path every kernel is tested against."""
        return F.linear(x, self.weight().to(x.dtype))


@torch.no_grad()
def convert_qat(net: nn.Module) -> nn.Module:
    """Converter: every QATLinear becomes a PackedLinear (inference only). In place."""
    from keenlm.model.lowbit import QATLinear

    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QATLinear):
                codes, scales = codes_and_scales(child)
                setattr(parent, name, PackedLinear(child.kind, pack(codes, BITS[child.kind]),
                                                   scales, child.in_features, child.group,
                                                   child.act_bits))
    return net
