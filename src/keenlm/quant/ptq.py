"""Post-training quantization of any keenlm model: round-to-nearest (RTN) and GPTQ.

Both produce the packed format of keenlm.quant.packing (w = code * scale + offset per group of
``group`` inputs; group 0 = one pair per row), at these grids:

- ``int4`` / ``int3`` / ``int2``: 2^bits levels from a (clipped) minimum to maximum of the
  group, asymmetric (Q4_1's and GPTQ's grid);
- ``ternary``: {-1, 0, +1} * gamma, symmetric (BitNet's levels, offset = -gamma).

The grid of each group is fitted by a small search, as in GPTQ's reference ``mse`` option: the
range (or gamma) is shrunk by factors 1.0, 0.95, ... and the factor with the least squared
rounding error is kept, per row. Without it, 2-bit and ternary grids are set by outliers.
Scales and offsets are stored in fp16 (rounded before codes are chosen, so the codes fit the
stored grid).

RTN rounds every weight to its group's grid. GPTQ (Frantar et al. 2022,
https://arxiv.org/abs/2210.17323) quantizes the columns of W one at a time and spreads each
column's rounding error over the not-yet-quantized columns, weighted by the inverse Hessian
H = 2 X^T X of the layer's inputs on calibration text, so that the layer's *outputs* on that
text move as little as possible. Implemented as in the paper's Algorithm 1: Cholesky factor of
H^-1 (with 1% dampening of the mean diagonal), lazy batched updates in blocks of 128 columns,
columns in decreasing order of the Hessian diagonal ("act-order") with each group's grid
fitted on the original weights ("static groups"). Calibration runs block by block: each block's
inputs come from the already-quantized blocks before it, and within a block q/k/v, o, gate/up
and down are quantized in that order, each on inputs from the already-quantized ones
("true-sequential"), so later layers correct for earlier layers' errors.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from keenlm.quant.packing import PackedLinear, from_codes

# kind -> (number of levels, bits per stored code)
GRIDS = {"ternary": (3, 2), "int2": (4, 2), "int3": (8, 3), "int4": (16, 4)}
BITS_TO_KIND = {"1.58": "ternary", "2": "int2", "3": "int3", "4": "int4"}
SHRINK = torch.linspace(1.0, 0.3, 15).tolist()  # clip factors tried per row
TERNARY_GAMMA = torch.linspace(0.2, 1.2, 21).tolist()  # gamma / (1.5 mean|w|) tried per row


def _codes(w, scale, offset, levels):
    return torch.round((w - offset) / scale).clamp(0, levels - 1)


def fit_grid(w: torch.Tensor, kind: str, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, offset), each (rows, 1), rounded to fp16, for the values ``w`` (rows, n)."""
    levels, _ = GRIDS[kind]
    w = w.float()
    if kind == "ternary":
        base = 1.5 * w.abs().mean(dim=1, keepdim=True)
        factors = TERNARY_GAMMA if search else [1 / 1.5]  # absmean (BitNet) without search
        cands = [(base * f, -base * f) for f in factors]
    else:
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        factors = SHRINK if search else [1.0]
        cands = [((hi - lo) * f / (levels - 1), lo * f) for f in factors]
    best_err = best_s = best_o = None
    for s, o in cands:
        s = s.clamp_min(1e-8).half().clamp_min(6e-8).float()
        o = o.half().float()
        err = ((_codes(w, s, o, levels) * s + o - w) ** 2).sum(dim=1, keepdim=True)
        if best_err is None:
            best_err, best_s, best_o = err, s, o
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_o = torch.where(better, s, best_s), torch.where(better, o, best_o)
    return best_s, best_o


def rtn(w: torch.Tensor, kind: str, group: int = 0):
    """Round to nearest: (codes uint8 (rows, cols), scale (rows, groups) fp16, offset fp16)."""
    rows, cols = w.shape
    g = group or cols
    if cols % g:
        raise ValueError(f"input width {cols} is not a multiple of the group {g}")
    wg = w.float().reshape(rows * (cols // g), g)
    s, o = fit_grid(wg, kind)
    codes = _codes(wg, s, o, GRIDS[kind][0]).to(torch.uint8).view(rows, cols)
    return codes, s.view(rows, -1).half(), o.view(rows, -1).half()


@torch.no_grad()
def gptq(w: torch.Tensor, H: torch.Tensor, kind: str, group: int = 0, block: int = 128,
         damp: float = 0.01, act_order: bool = True):
    """GPTQ of one weight matrix (rows, cols) given the Hessian H = 2 X^T X / n (cols, cols).
    Returns (codes, scale, offset) as ``rtn`` does.

    act_order: quantize columns by decreasing H diagonal (the inputs with the most energy
    first, while the most columns remain to absorb their error); the group grids are then
    fitted up front on the original weights ("static groups"), so stored groups stay
    contiguous runs of inputs and the packed format is unchanged."""
    levels, _ = GRIDS[kind]
    W = w.detach().float().clone()
    rows, cols = W.shape
    g = group or cols
    if cols % g:
        raise ValueError(f"input width {cols} is not a multiple of the group {g}")
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs never active on the calibration text
    H[dead, dead] = 1
    W[:, dead] = 0
    # grids per group: (rows, groups) each
    s_all, o_all = (t.view(rows, cols // g) for t in
                    fit_grid(W.reshape(rows * (cols // g), g), kind))
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    col_group = perm // g  # the stored group of each (permuted) column
    H.diagonal().add_(damp * torch.diag(H).mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(rows, cols)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            gi = col_group[i1 + i]
            s, o = s_all[:, gi:gi + 1], o_all[:, gi:gi + 1]
            w_col = W1[:, i:i + 1]
            c = _codes(w_col, s, o, levels)
            Q[:, i1 + i] = c[:, 0]
            e = (w_col - (c * s + o)) / Hinv1[i, i]
            W1[:, i:] -= e * Hinv1[i:i + 1, i:]
            err1[:, i:i + 1] = e
        W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    codes[:, perm] = Q.to(torch.uint8)
    return codes, s_all.half(), o_all.half()


# ---------------------------------------------------------------------------------- models


# true-sequential order within a block (as the GPTQ reference runs it)
SEQUENCE = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def _targets(net: nn.Module, skip=("lm_head",)) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, module) of every bias-free nn.Linear outside ``skip``."""
    return [(parent, name, child) for parent in net.modules()
            for name, child in parent.named_children()
            if type(child) is nn.Linear and child.bias is None and name not in skip]


def _packed(codes, scale, offset, kind, group) -> PackedLinear:
    return from_codes(codes, scale, offset, GRIDS[kind][1], group)


@torch.no_grad()
def quantize_rtn(net: nn.Module, kind: str, group: int = 0) -> nn.Module:
    """Every block projection becomes a PackedLinear by round-to-nearest. In place."""
    for parent, name, lin in _targets(net):
        setattr(parent, name, _packed(*rtn(lin.weight, kind, group), kind, group))
    return net


@torch.no_grad()
def quantize_gptq(net, kind: str, group: int, calib: torch.Tensor, *, batch: int = 8,
                  act_order: bool = True, log: Callable[[str], None] | None = None) -> nn.Module:
    """GPTQ every block projection of a keenlm Transformer, block by block, on calibration
    token ids ``calib`` (N, T). In place."""
    net.eval()
    T = calib.shape[1]
    cos, sin = net.rope_cos[:T, None], net.rope_sin[:T, None]
    xs = [net.embed_tokens(calib[i:i + batch]) for i in range(0, len(calib), batch)]
    for li, layer in enumerate(net.layers):
        for names in SEQUENCE:  # in execution order: each stage sees the quantized ones before it
            targets = [t for t in _targets(layer) if t[1] in names]
            if not targets:
                continue
            hess = {id(m): torch.zeros(m.in_features, m.in_features) for _, _, m in targets}
            count = {"n": 0}

            def hook(mod, inputs, _out):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                hess[id(mod)].addmm_(x.T, x, alpha=2.0)

            handles = [m.register_forward_hook(hook) for _, _, m in targets]
            for x in xs:
                layer(x, cos, sin, None, None)
                count["n"] += x.shape[0] * x.shape[1]
            for h in handles:
                h.remove()
            for parent, name, m in targets:
                H = hess[id(m)] / count["n"]
                setattr(parent, name, _packed(*gptq(m.weight, H, kind, group, act_order=act_order),
                                              kind, group))
        left = [n for _, n, _ in _targets(layer)]
        if left:
            raise ValueError(f"gptq: block {li} has projections outside keenlm's order: {left}")
        xs = [layer(x, cos, sin, None, None) for x in xs]  # inputs of the next block
        if log:
            log(f"gptq: block {li + 1}/{len(net.layers)} quantized")
    return net
