"""Compiled CPU kernel for the spiking rate code (keenlm.spiking.ffn.RateCode).

The rate code runs every activation's pair of neurons for T steps. Written with torch tensor
operations (``spiking._rate_code_torch``, the reference) each step is a dozen passes over the
whole activation tensor, so the cost is memory traffic: T x 12 x 4 bytes per value. This kernel
(numba, ``@njit(parallel=True)``) takes the neurons in blocks of 2048 whose membrane, count and
gradient state stay in cache for all T steps, with branch-free inner loops that the compiler
vectorizes (a loop per neuron over its T steps, with branches, was slower than the tensor
reference: measured). Same float arithmetic as the reference for the membrane: the counts are
identical (tests compare them on random inputs); the sensitivities equal to rounding. A missing
numba is said in one line and the reference is used.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

_warned = False


def available() -> bool:
    """numba is installed (imported only when the kernel first runs: ~65 MB of memory)."""
    return importlib.util.find_spec("numba") is not None


def usable(current: torch.Tensor) -> bool:
    """The kernel applies: numba present, a CPU tensor in fp32 or fp64. Says once per process
    when numba is missing."""
    global _warned
    if not available():
        if not _warned:
            print("keenlm: numba is not installed; spiking layers use the slower tensor reference "
                  "(pip install numba)")
            _warned = True
        return False
    return current.device.type == "cpu" and current.dtype in (torch.float32, torch.float64)


BLOCK = 2048  # neurons per task: their state (4 arrays) stays in L1/L2 for all T steps

def rate_code_kernel(current: torch.Tensor, steps: int, beta: float, reset: str, slope: float,
                     want_sens: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(spike counts, d count / d current or None) of neurons with threshold 1 driven by
    ``current`` for ``steps`` steps: the same results as ``spiking._rate_code_torch``."""
    flat = current.detach().contiguous().reshape(-1).numpy()
    t = flat.dtype.type
    from keenlm.spiking.rate_numba import rate_window  # numba: heavy, on first use only

    count = np.empty_like(flat)
    sens = np.empty_like(flat) if want_sens else np.empty(1, flat.dtype)
    rate_window(flat, steps, t(beta), reset == "zero", t(slope), want_sens, count, sens, BLOCK)
    shape = current.shape
    return (torch.from_numpy(count).view(shape),
            torch.from_numpy(sens).view(shape) if want_sens else None)
