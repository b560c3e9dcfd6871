"""Compiled CPU kernel for the spiking rate code (keenlm.model.spiking.RateCode).

The rate code runs every activation's pair of neurons for T steps. Written with torch tensor
operations (``spiking._rate_code_torch``, the reference) each step is a dozen passes over the
whole activation tensor, so the cost is memory traffic: T x 12 x 4 bytes per value. This kernel
(numba, ``@njit(parallel=True)``) keeps each neuron's membrane, count and gradient sensitivity in
registers for all T steps and touches memory twice per value. Same float arithmetic, in the same
order, as the reference: the counts are identical (tests compare them on random inputs), the
sensitivities equal to rounding. A missing numba is said in one line and the reference is used.
"""
from __future__ import annotations

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
except ImportError:  # optional: pip install 'keenlm[lowbit]' (numba)
    numba = None

_warned = False


def available() -> bool:
    return numba is not None


def usable(current: torch.Tensor) -> bool:
    """The kernel applies: numba present, a CPU tensor in fp32 or fp64. Says once per process
    when numba is missing."""
    global _warned
    if numba is None:
        if not _warned:
            print("keenlm: numba is not installed; spiking layers use the slower tensor reference "
                  "(pip install numba)")
            _warned = True
        return False
    return current.device.type == "cpu" and current.dtype in (torch.float32, torch.float64)


if numba is not None:

    @njit(parallel=True, cache=False)
    def _window(cur, steps, beta, zero_reset, slope, want_sens, count, sens):  # pragma: no cover
        one = cur.dtype.type(1.0)
        zero = cur.dtype.type(0.0)
        for i in prange(cur.shape[0]):
            current = cur[i]
            v = zero
            d = zero
            acc = zero
            c = zero
            fired = False
            for _ in range(steps):
                if want_sens:
                    if zero_reset and fired:
                        d = zero
                    d = d * beta + one
                if beta != one:
                    v = v * beta
                v = v + current
                fired = v > one
                if want_sens:
                    x = abs(v - one) * slope + one
                    g = one / (x * x)
                    if g != g:  # NaN (v was NaN): no gradient, as nan_to_num in the reference
                        g = zero
                    acc = acc + g * d
                if fired:
                    c = c + one
                    v = zero if zero_reset else v - one
            count[i] = c
            if want_sens:
                sens[i] = acc


def rate_code_kernel(current: torch.Tensor, steps: int, beta: float, reset: str, slope: float,
                     want_sens: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(spike counts, d count / d current or None) of neurons with threshold 1 driven by
    ``current`` for ``steps`` steps: the same results as ``spiking._rate_code_torch``."""
    flat = current.detach().contiguous().reshape(-1).numpy()
    t = flat.dtype.type
    count = np.empty_like(flat)
    sens = np.empty_like(flat) if want_sens else np.empty(1, flat.dtype)
    _window(flat, steps, t(beta), reset == "zero", t(slope), want_sens, count, sens)
    shape = current.shape
    return (torch.from_numpy(count).view(shape),
            torch.from_numpy(sens).view(shape) if want_sens else None)
