"""The numba-compiled rate-code kernel of keenlm.spiking.kernels (see its docstring). A module of
its own so that numba is imported only when the kernel first runs. BLOCK: neurons per task."""
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=False)
def rate_window(cur, steps, beta, zero_reset, slope, want_sens, count, sens, BLOCK):  # pragma: no cover
    one = cur.dtype.type(1.0)
    zero = cur.dtype.type(0.0)
    n = cur.shape[0]
    for b in prange((n + BLOCK - 1) // BLOCK):
        lo = b * BLOCK
        hi = min(n, lo + BLOCK)
        m = hi - lo
        x = cur[lo:hi]
        v = np.zeros(m, cur.dtype)
        c = np.zeros(m, cur.dtype)
        d = np.zeros(m, cur.dtype)
        acc = np.zeros(m, cur.dtype)
        keep = np.ones(m, cur.dtype)
        for _ in range(steps):  # branch-free inner loops, so they vectorize
            if want_sens:
                for j in range(m):
                    d[j] = d[j] * keep[j] * beta + one
            for j in range(m):
                vj = v[j] * beta + x[j]
                s = one if vj > one else zero
                if want_sens:
                    q = abs(vj - one) * slope + one
                    g = d[j] / (q * q)
                    acc[j] += g if g == g else zero  # NaN (v was NaN): no gradient
                c[j] += s
                if zero_reset:
                    keep[j] = one - s
                    v[j] = zero if vj > one else vj
                else:
                    v[j] = vj - s
        count[lo:hi] = c
        if want_sens:
            sens[lo:hi] = acc
