"""Log-probabilities of sampled completions under a model, for policy-gradient training.

Rows are R completions; row r continues prompt ``rows[r]`` of a list of P distinct prompts.
Log-probabilities come back as (R, W): token j of completion r at [r, j], 0 past its end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from keenlm.infer.generate import left_pad
from keenlm.model.attention import SharedPrefix


def completion_mask(completions: list[list[int]], width: int | None = None) -> torch.Tensor:
    """(R, W) bool: True on each completion's tokens; W = the longest completion by default."""
    W = width if width is not None else max((len(c) for c in completions), default=0)
    mask = torch.zeros(len(completions), W, dtype=torch.bool)
    for i, c in enumerate(completions):
        mask[i, :len(c)] = True
    return mask


def _completion_ids(completions, W: int, device) -> torch.Tensor:
    ids = torch.zeros(len(completions), W, dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, :len(c)] = torch.as_tensor(c, dtype=torch.long)
    return ids.to(device)


def _gather_logprobs(model, h, targets, mask, temperature, chunk_elems: int) -> torch.Tensor:
    """log p(targets) from hidden states h (R, W, C) where ``mask``; the LM head runs only on
    masked positions, in chunks, so a large vocabulary never makes an (R, W, V) tensor."""
    sel, tgt = h[mask], targets[mask]
    W = model.lm_head.weight
    step = max(1, chunk_elems // W.shape[0])
    parts = [-F.cross_entropy(F.linear(sel[i:i + step], W).float() / temperature, tgt[i:i + step],
                              reduction="none") for i in range(0, sel.shape[0], step)]
    out = torch.zeros(mask.shape, dtype=torch.float32, device=h.device)
    return out.masked_scatter(mask, torch.cat(parts)) if parts else out


def reference_logprobs(model, prompts: list[list[int]], rows: torch.Tensor,
                       completions: list[list[int]], temperature: float = 1.0,
                       width: int | None = None, chunk_elems: int = 2**25) -> torch.Tensor:
    """The plain way: each row is prompt + completion, right-padded, in one forward pass."""
    device = model.norm.weight.device
    mask = completion_mask(completions, width).to(device)
    R, W = mask.shape
    starts = [len(prompts[p]) for p in rows.tolist()]
    seqs = [prompts[p] + list(c) for p, c in zip(rows.tolist(), completions)]
    ids = _completion_ids(seqs, max(map(len, seqs)), device)
    h = model.hidden_states(ids)
    # completion token j of row r sits at starts[r] + j, predicted from the position before it
    at = (torch.tensor(starts, device=device)[:, None] - 1 + torch.arange(W, device=device))
    h = h[torch.arange(R, device=device)[:, None], at.clamp_max(ids.shape[1] - 1)]
    return _gather_logprobs(model, h, _completion_ids(completions, W, device), mask, temperature,
                            chunk_elems)


def shared_prefix_logprobs(model, prompts: list[list[int]], rows: torch.Tensor,
                           completions: list[list[int]], temperature: float = 1.0,
                           width: int | None = None, chunk_elems: int = 2**25) -> torch.Tensor:
    """The same numbers as ``reference_logprobs``, with each prompt run once however many rows
    continue it: pass 1 runs the distinct prompts (left-padded) and keeps their keys and
    values (``SharedPrefix``); pass 2 runs only the completions, each attending to its prompt.
    Forward and backward over a prompt cost 1/G of the plain way for a group of G."""
    device = model.norm.weight.device
    mask = completion_mask(completions, width).to(device)
    R, W = mask.shape
    if W == 0:
        return torch.zeros(R, 0, device=device)
    used, rows = torch.unique(rows, return_inverse=True)  # only the prompts these rows read
    rows = rows.to(device)
    idx, key_mask = left_pad([prompts[p] for p in used.tolist()], device)
    positions = (key_mask.long().cumsum(-1) - 1).clamp_min(0)
    cache = SharedPrefix(rows)
    h_prompt = model.hidden_states(idx, cache=cache, positions=positions, key_mask=key_mask)
    h = h_prompt[:, -1][rows][:, None]  # the last prompt position predicts token 0
    comp = _completion_ids(completions, W, device)
    if W > 1:  # tokens 0..W-2 predict tokens 1..W-1
        L = idx.shape[1]
        pos = positions[:, -1][rows][:, None] + 1 + torch.arange(W - 1, device=device)
        keys = torch.cat([key_mask[rows], torch.ones(R, W - 1, dtype=torch.bool, device=device)], 1)
        assert keys.shape == (R, L + W - 1)
        h_rest = model.hidden_states(comp[:, :-1], cache=cache, positions=pos, key_mask=keys)
        h = torch.cat([h, h_rest], dim=1)
    return _gather_logprobs(model, h, comp, mask, temperature, chunk_elems)
