"""Fast CPU matmul that reads 2-bit packed weights directly (ternary and 2-bit models).

Lookup tables, as in bitnet.cpp's TL kernels (Wang et al. 2024, https://arxiv.org/abs/2410.16144):
a packed byte holds the codes of 4 consecutive weights of a row, so its contribution to a
dot product with x depends only on the byte's value and on 4 entries of x. For each group j of
4 inputs, one table of 256 partial sums is built once per input vector,

    T[j, byte] = sum_{i<4} level[code_i(byte)] * x[4j + i],

and every row's dot product becomes one table lookup and add per packed byte: rows x in/4
gathers from a table that stays in cache, instead of rows x in multiply-adds over 16x more
weight bytes. Row scales are applied at the end. Compiled with numba (``@njit(parallel=True)``,
rows split across threads); chosen over a C extension because it needs no compiler at install
time, and over torch.compile because no torch op expresses the byte-indexed gather-add
without materializing the unpacked weights.

``lut_matmul`` is tested against ``keenlm.model.packing.PackedLinear``'s unpack-then-matmul
reference. A missing numba is said in one line and the reference is used.
"""
from __future__ import annotations

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
except ImportError:  # optional: pip install 'keenlm[lowbit]'
    numba = None

MAX_ROWS = 8  # the kernel serves decode (1 row) and small batches; prefill uses the reference
ROW_BLOCK = 256  # rows per thread task: their accumulators stay in L1


def available() -> bool:
    return numba is not None


if numba is not None:

    @njit(parallel=True, cache=True, fastmath=False)
    def _lut_matmul(packed_t, x, levels, out):  # pragma: no cover - compiled
        nb, rows = packed_t.shape
        B = x.shape[0]
        table = np.empty((nb, 256), dtype=np.float32)
        n_blocks = (rows + ROW_BLOCK - 1) // ROW_BLOCK
        for b in range(B):
            for j in prange(nb):
                x0, x1, x2, x3 = x[b, 4 * j], x[b, 4 * j + 1], x[b, 4 * j + 2], x[b, 4 * j + 3]
                for v in range(256):
                    table[j, v] = (levels[v & 3] * x0 + levels[(v >> 2) & 3] * x1
                                   + levels[(v >> 4) & 3] * x2 + levels[(v >> 6) & 3] * x3)
            # codes stored input-group-major (packed_t[j, r]): for each group j one 1 KB table
            # row stays in L1 while a block of rows reads contiguous bytes and accumulates
            for blk in prange(n_blocks):
                r0 = blk * ROW_BLOCK
                r1 = min(rows, r0 + ROW_BLOCK)
                acc = np.zeros(r1 - r0, dtype=np.float32)
                j = 0
                while j + 4 <= nb:  # four groups per pass: a quarter of the accumulator traffic
                    t0, t1, t2, t3 = table[j], table[j + 1], table[j + 2], table[j + 3]
                    c0, c1, c2, c3 = packed_t[j], packed_t[j + 1], packed_t[j + 2], packed_t[j + 3]
                    for r in range(r0, r1):
                        acc[r - r0] += (t0[c0[r]] + t1[c1[r]]) + (t2[c2[r]] + t3[c3[r]])
                    j += 4
                while j < nb:
                    t0, c0 = table[j], packed_t[j]
                    for r in range(r0, r1):
                        acc[r - r0] += t0[c0[r]]
                    j += 1
                out[b, r0:r1] = acc


def lut_matmul(x: torch.Tensor, packed_t: torch.Tensor, levels: torch.Tensor,
               row_scales: torch.Tensor) -> torch.Tensor:
    """x (B, in) float -> (B, rows) float32: x W^T for 2-bit codes packed four to a byte along
    the input, stored transposed: packed_t (ceil(in/4), rows) = pack(codes).T, contiguous."""
    B, n_in = x.shape
    nb = packed_t.shape[0]
    xp = np.zeros((B, nb * 4), dtype=np.float32)  # padded codes meet zero inputs
    xp[:, :n_in] = x.detach().float().cpu().numpy()
    out = np.empty((B, packed_t.shape[1]), dtype=np.float32)
    _lut_matmul(packed_t.cpu().numpy(), xp, levels.float().cpu().numpy(), out)
    return torch.from_numpy(out) * row_scales.reshape(1, -1).float()
