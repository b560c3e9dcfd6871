"""The numba-compiled lookup-table kernel of keenlm.quant.kernels (see its docstring). A module
of its own so that numba is imported only when the kernel first runs. ROW_BLOCK: rows per task."""
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=False)
def lut_matmul_kernel(packed_q, x, scale, offset, table, high, out, ROW_BLOCK):  # pragma: no cover - compiled
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
