"""Selective backprop: backpropagate only the most surprising data (``train.select.*``).

Each micro-batch is first scored by a forward pass without autograd (cheap: no activations
kept); then only the chosen part is trained on:

- ``unit: sequence``: the chosen rows are forwarded again, with autograd, and backpropagated;
  the other rows are not in the backward graph at all, so the backward pass costs ``keep`` of
  a full one (forward: 1 + keep; backward: keep; a full step is 1 + 2 = 3 forward units, a
  step at keep 0.5 is 1.5 + 1 = 2.5, at keep 0.25 1.25 + 0.5 = 1.75). To keep the backward
  batch as large as full backprop's, raise ``train.batch_size`` by 1 / keep: the larger
  batch is then the pool the selection draws from (Selective-Backprop's setting).
- ``unit: token``: a loss mask over the chosen tokens (Rho-1's setting). Every row still runs
  backward, so this changes what is learned, not what it costs.

Scores (``method``):
- ``loss``: the loss itself (the highest-loss share is kept; Selective-Backprop's
  deterministic variant).
- ``prob``: Selective-Backprop (Jiang et al. 2019, https://arxiv.org/abs/1910.00762): an item
  is kept with probability percentile(loss)^beta, beta = 1 / keep - 1, so that ``keep`` of
  the items are kept on average and the highest-loss ones almost surely.
- ``excess``: Rho-1 (Lin et al. 2024, https://arxiv.org/abs/2404.07965): loss minus a
  reference model's loss on the same tokens (``reference``: a run folder with the same
  tokenizer, e.g. a small model trained on the data one trusts). High excess = learnable and
  not yet learned; high loss on both models = noise, which plain loss selection would chase.

``keep`` can be scheduled: it falls linearly from 1.0 to ``keep`` over the first ``ramp`` of
the steps. The ledger counts forward and backward tokens apart (``tokens_forward``,
``tokens_backward``), so the saving is a measured number.
"""
from __future__ import annotations

from pathlib import Path

import torch

from keenlm.config import SelectConfig
from keenlm.io.loaders import load_any
from keenlm.model.loss import fused_linear_cross_entropy


def per_token_losses(model, x: torch.Tensor, y: torch.Tensor, amp=None) -> torch.Tensor:
    """(B, T) cross-entropy of ``model`` on (x, y), without autograd."""
    was_training = model.training
    model.eval()  # no routing statistics, no capacity dropping while scoring
    try:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            h = model.hidden_states(x)
            _, per_token = fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]).float(),
                                                      model.lm_head.weight.float(), y.reshape(-1))
    finally:
        model.train(was_training)
    return per_token.view(y.shape)


def keep_at(cfg: SelectConfig, step: int, steps: int) -> float:
    """The keep ratio at ``step`` of ``steps``: 1.0 falling to cfg.keep over the ramp."""
    if cfg.ramp <= 0:
        return cfg.keep
    f = min(1.0, step / max(1.0, cfg.ramp * steps))
    return 1.0 + (cfg.keep - 1.0) * f


def choose(scores: torch.Tensor, keep: float, method: str, generator=None) -> torch.Tensor:
    """Boolean mask over ``scores`` (any shape): the items to train on."""
    flat = scores.flatten()
    n = flat.numel()
    if keep >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    if method == "prob":
        ranks = torch.empty(n, device=flat.device)
        ranks[flat.argsort()] = torch.arange(1, n + 1, device=flat.device, dtype=torch.float32)
        p = (ranks / n) ** (1.0 / keep - 1.0)
        u = torch.rand(n, generator=generator, device="cpu").to(flat.device)
        mask = u < p
        if not mask.any():  # never an empty step: the most surprising item at least
            mask[flat.argmax()] = True
        return mask.view_as(scores)
    k = max(1, round(keep * n))
    mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
    mask[flat.topk(k).indices] = True
    return mask.view_as(scores)


class SelectiveBackprop:
    """The trainer hook (``TrainHook.choose_batch``) for ``train.select``."""

    def __init__(self, cfg: SelectConfig, steps: int, seed: int, amp=None, reference=None):
        if cfg.method == "excess" and reference is None:
            raise ValueError("train.select.method=excess needs train.select.reference (a run "
                             "folder of the reference model)")
        self.cfg, self.steps, self.amp, self.reference = cfg, steps, amp, reference
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0  # set by begin_step before each optimizer step
        self.forward_tokens = 0  # tokens of the scoring pass(es), read by the trainer
        self.kept = 1.0  # share kept in the last call

    def begin_step(self, step: int, steps: int) -> None:
        self.step, self.steps = step, steps

    def scores(self, model, x, y) -> torch.Tensor:
        loss = per_token_losses(model, x, y, self.amp)
        if self.cfg.method == "excess":
            loss = loss - per_token_losses(self.reference, x, y, self.amp)
        return loss

    def choose_batch(self, x, y, model):
        keep = keep_at(self.cfg, self.step, self.steps)
        self.forward_tokens = x.numel() if keep < 1.0 else 0
        if self.cfg.method == "excess" and keep < 1.0:
            self.forward_tokens += x.numel()  # the reference model's pass, counted too
        if keep >= 1.0:  # nothing to choose: exactly the full step, no scoring pass
            self.kept = 1.0
            return x, y, None
        s = self.scores(model, x, y)
        if self.cfg.unit == "token":
            mask = choose(s, keep, self.cfg.method, self.generator)
            self.kept = float(mask.float().mean())
            return x, y, mask.float()
        rows = choose(s.mean(1), keep, self.cfg.method, self.generator)
        self.kept = float(rows.float().mean())
        return x[rows], y[rows], None


def build_hook(cfg, tokenizer, amp, device):
    """The hook for a RunConfig's ``train.select`` (None when off), its reference loaded."""
    sel = cfg.train.select
    if sel.method == "none":
        return None
    reference = None
    if sel.method == "excess":
        km = load_any(Path(sel.reference))  # SelectConfig has checked that one is named
        if km.tokenizer.fingerprint() != tokenizer.fingerprint():
            raise ValueError(f"train.select.reference {sel.reference}: its tokenizer differs from "
                             f"this run's; the reference must score the same tokens")
        reference = km.net.to(device).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    return SelectiveBackprop(sel, cfg.train.steps, cfg.train.seed, amp, reference)
