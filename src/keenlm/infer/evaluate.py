"""Language-modelling evaluation: loss, perplexity and bits per byte.

Bits per byte makes models with different tokenizers comparable: the summed cross-entropy of
the predicted tokens (in nats) divided by ln 2 and by the number of UTF-8 bytes those tokens
spell. Each token's byte length comes from the tokenizer (``token_byte_lengths``), so the
figure is exact, not an average bytes-per-token ratio. Windows are consecutive and
non-overlapping, each token predicted from the tokens before it in its window.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from keenlm.data import eval_batches


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, token_bytes: np.ndarray, *, batch_size: int,
             seq_len: int, max_batches: int, device="cpu", autocast_dtype=None) -> dict:
    was_training = model.training
    model.eval()
    nats, n_tokens, n_bytes = 0.0, 0, 0
    lengths = torch.as_tensor(token_bytes, dtype=torch.int64)
    try:
        for x, y in eval_batches(tokens, batch_size, seq_len, max_batches):
            x, y = x.to(device), y.to(device)
            with torch.autocast(torch.device(device).type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                logits = model(x)
            losses = model.loss(logits, y, reduction="none")
            nats += losses.double().sum().item()
            n_tokens += y.numel()
            n_bytes += int(lengths[y.cpu()].sum())
    finally:
        model.train(was_training)
    if n_tokens == 0:
        raise ValueError(f"evaluation set too small: needs more than {seq_len} tokens")
    loss = nats / n_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": nats / math.log(2) / max(n_bytes, 1),
            "tokens": n_tokens, "bytes": n_bytes}
