"""Fast CPU matmul that reads 2-bit packed weights directly (ternary and 2-bit models).

Lookup tables, as in bitnet.cpp's TL kernels (Wang et al. 2024, https://arxiv.org/abs/2410.16144):
a packed byte holds the codes of 4 consecutive weights of a row, so its contribution to a
dot product with x depends only on the byte's value and on 4 entries of x. For each group j of
4 inputs, one table of 256 partial sums is built once per input vector,

    T[j, byte] = sum_{i<4} level[code_i(byte)] * x[4j + i],

and every row's dot product becomes one table lookup and add per packed byte: rows x in/4
gathers from a table that stays in cache, instead of rows x in multiply-adds over 16x more
weight bytes. Codes are the packed format's (w = code * scale + offset per row), so the row's
scale and offset (times the sum of x) are applied at the end. Compiled with numba (``@njit(parallel=True)``,
rows split across threads); chosen over a C extension because it needs no compiler at install
time, and over torch.compile because no torch op expresses the byte-indexed gather-add
without materializing the unpacked weights.

``lut_matmul`` is tested against ``keenlm.quant.packing.PackedLinear``'s unpack-then-matmul
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
    def _lut_matmul(packed_q, x, scale, offset, table, high, out):  # pragma: no cover - compiled
        nq, rows = packed_q.shape
        nb = nq * 4
        B = x.shape[0]
        n_blocks = (rows + ROW_BLOCK - 1) // ROW_BLOCK
        for b in range(B):
            xs = np.float32(0.0)  # for the offsets: w = code * scale + offset
            for i in range(x.shape[1]):
                xs += x[b, i]
            for j in prange(nb):
                # T[lo | hi << 4] = low[lo] + high[hi]: partial sums of inputs (0, 1) and (2, 3)
                # are 16-entry tables, so a 256-entry table costs 256 adds, not 256 * 7 flops
                x0, x1, x2, x3 = x[b, 4 * j], x[b, 4 * j + 1], x[b, 4 * j + 2], x[b, 4 * j + 3]
                for h in range(16):
                    high[j, h] = np.float32(h & 3) * x2 + np.float32(h >> 2) * x3
                for lo in range(16):
                    low = np.float32(lo & 3) * x0 + np.float32(lo >> 2) * x1
                    for h in range(16):
                        table[j, lo | (h << 4)] = low + high[j, h]
            # packed_q[q, r] holds the bytes of input groups 4q..4q+3 of row r in one word: one
            # load feeds four lookups; four 1 KB tables stay in L1 while a block of rows streams
            for blk in prange(n_blocks):
                r0 = blk * ROW_BLOCK
                r1 = min(rows, r0 + ROW_BLOCK)
                acc = np.zeros(r1 - r0, dtype=np.float32)
                for q in range(nq):
                    t0, t1, t2, t3 = table[4 * q], table[4 * q + 1], table[4 * q + 2], table[4 * q + 3]
                    words = packed_q[q]
                    for r in range(r0, r1):
                        w = words[r]
                        acc[r - r0] += (t0[w & 255] + t1[(w >> 8) & 255]) + (t2[(w >> 16) & 255]
                                                                             + t3[w >> 24])
                for r in range(r0, r1):
                    out[b, r] = acc[r - r0] * scale[r] + offset[r] * xs


def kernel_layout(packed: torch.Tensor) -> torch.Tensor:
    """(rows, bytes) 2-bit packed codes -> the kernel's (ceil(bytes / 4), rows) uint32 words:
    word [q, r] = bytes 4q..4q+3 of row r, little end first (missing bytes are code 0)."""
    rows, nb = packed.shape
    nq = -(-nb // 4)
    padded = torch.zeros(rows, nq * 4, dtype=torch.uint8)
    padded[:, :nb] = packed.cpu()
    words = padded.view(rows, nq, 4).permute(1, 0, 2).contiguous().numpy().view(np.uint32)
    return torch.from_numpy(words.reshape(nq, rows).copy())


_scratch: dict[str, np.ndarray] = {}


def _buffer(name: str, rows: int, cols: int) -> np.ndarray:
    """Reused work arrays (a fresh 0.5 MB table per call costs page faults)."""
    buf = _scratch.get(name)
    if buf is None or buf.shape[0] < rows:
        buf = _scratch[name] = np.empty((rows, cols), dtype=np.float32)
    return buf


def lut_matmul(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor,
               offset: torch.Tensor) -> torch.Tensor:
    """x (B, in) float -> (B, rows) float32: x W^T for W[r, i] = code[r, i] * scale[r] + offset[r]
    with 2-bit codes in ``kernel_layout``; scale and offset (rows,) float32."""
    B, n_in = x.shape
    nq, rows = words.shape
    xf = x.detach().float().cpu().numpy()
    if n_in != nq * 16:  # padded inputs meet padded codes
        xp = np.zeros((B, nq * 16), dtype=np.float32)
        xp[:, :n_in] = xf
        xf = xp
    out = np.empty((B, rows), dtype=np.float32)
    _lut_matmul(words.numpy(), np.ascontiguousarray(xf), scale.numpy(), offset.numpy(),
                _buffer("table", nq * 4, 256), _buffer("high", nq * 4, 16), out)
    return torch.from_numpy(out)
