"""Fast CPU matmul that reads 2-bit packed weights directly (ternary and 2-bit models).

Lookup tables, as in bitnet.cpp's TL kernels (Wang et al. 2024, https://arxiv.org/abs/2410.16144):
a packed byte holds the codes of 4 consecutive weights of a row, so its contribution to a
dot product with x depends only on the byte's value and on 4 entries of x. For each group j of
4 inputs, one table of 256 partial sums is built once per input vector,

    T[j, byte] = sum_{i<4} level[code_i(byte)] * x[4j + i],

and every row's dot product becomes one table lookup and add per packed byte: rows x in/4
gathers from a table that stays in cache, instead of rows x in multiply-adds over 16x more
weight bytes. Codes are the packed format's (w = code * scale + offset per row), so the row's
scale and offset (times the sum of x) are applied at the end. Compiled with numba (``@njit(parallel=True)``, keenlm.quant.lut_numba,
rows split across threads); chosen over a C extension because it needs no compiler at install
time, and over torch.compile because no torch op expresses the byte-indexed gather-add
without materializing the unpacked weights.

``lut_matmul`` is tested against ``keenlm.quant.packing.PackedLinear``'s unpack-then-matmul
reference. A missing numba is said in one line and the reference is used.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

MAX_ROWS = 8  # the kernel serves decode (1 row) and small batches; prefill uses the reference
ROW_BLOCK = 256  # rows per thread task: their accumulators stay in L1


def available() -> bool:
    """numba is installed (it is imported only when the kernel first runs: ~65 MB of memory
    and ~0.5 s that most keenlm processes never need)."""
    return importlib.util.find_spec("numba") is not None


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
    from keenlm.quant.lut_numba import lut_matmul_kernel  # numba: heavy, on first use only

    out = np.empty((B, rows), dtype=np.float32)
    lut_matmul_kernel(words.numpy(), np.ascontiguousarray(xf), scale.numpy(), offset.numpy(),
                      _buffer("table", nq * 4, 256), _buffer("high", nq * 4, 16), out, ROW_BLOCK)
    return torch.from_numpy(out)
