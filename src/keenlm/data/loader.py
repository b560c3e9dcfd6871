"""Batches from a flat token array: random windows for training, fixed windows for evaluation.

Legend: B batch size, T sequence length (tokens a model sees per row).

Training batches (``get_batch``) are B windows of T+1 tokens at uniformly random offsets; the
inputs are the first T tokens and the targets the last T (the same window shifted by one), so
every position predicts its next token. Windows cross document boundaries freely; the ``eos``
between documents teaches the model where one ends (GPT-2/nanoGPT style packing).

The offsets come from ``numpy.random.Generator(PCG64([seed, step]))``: the batch is a pure
function of ``(seed, step)``. There is no generator state to checkpoint, and a run resumed at
step s sees exactly the batches an uninterrupted run would have -- which makes "resume ==
no interruption" a testable invariance.

Evaluation batches (``eval_batches``) are the consecutive, non-overlapping windows from the
start of the split, so every evaluation of every run scores the same tokens.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def _check_length(tokens: np.ndarray, seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                         "use a shorter train.seq_len or a larger corpus / data.val_fraction")


def _to_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) windows -> inputs (B, T) and targets (B, T), both int64."""
    w = torch.from_numpy(windows.astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
              step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B random windows; the same (seed, step) always gives the same batch."""
    _check_length(tokens, seq_len)
    if batch_size < 1 or seed < 0 or step < 0:
        raise ValueError(f"need batch_size >= 1, seed >= 0, step >= 0; got {batch_size}, "
                         f"{seed}, {step}")
    rng = np.random.Generator(np.random.PCG64([seed, step]))
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # last start: n - T - 1
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]  # (B, T+1)
    return _to_xy(np.asarray(tokens[idx]))


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows ``[kT, kT + T]`` from the start; at most ``max_batches`` batches.

    Windows share one boundary token (the last target of one is the first input of the next),
    so the targets of all windows together cover the split without overlap. The last batch may
    hold fewer than B rows.
    """
    _check_length(tokens, seq_len)
    n_windows = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    offsets = np.arange(seq_len + 1)[None, :]
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * seq_len
        yield _to_xy(np.asarray(tokens[starts[:, None] + offsets]))
