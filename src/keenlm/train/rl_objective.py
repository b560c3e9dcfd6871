"""The objectives of keenlm.train.grpo: advantages, token weights and losses of GRPO and its
variants, and of rejection-sampling fine-tuning. Plain functions of tensors; the loop that
samples and steps lives in grpo.py.

GRPO, as implemented (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, eq. 3 with outcome
supervision): every token of completion i of a group gets the advantage
A_i = (r_i - mean(r)) / (std(r) + 1e-4) (std with Bessel's correction; a group whose rewards
are all equal has A = 0 and gives no gradient, so its rows are not even run backward), and the
loss is

    - sum_i,t  w_i,t * [ min(rho A_i, clip(rho, 1 - eps, 1 + eps_high) A_i) - beta * KL_i,t ]

with rho = pi_theta / pi_old per token (pi_old: the policy that sampled the batch, so rho = 1 on
the first optimizer step of a batch), KL_i,t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (the
k3 estimator the paper uses) against the frozen starting policy, and token weights w that
differ by variant (``LOSSES``, looked up once, never an if/elif chain):

- ``grpo``: the paper's 1/G sum_i 1/|o_i| sum_t: each completion's tokens averaged, then
  completions averaged. Long completions weigh less per token.
- ``dapo``: token-level, sum over all tokens / all tokens of the batch, with clip-higher
  eps_high = 0.28 (Yu et al. 2025, DAPO, arXiv:2503.14476, its token-level loss and
  decoupled clip; its dynamic sampling and overlong shaping are not implemented: groups with
  equal rewards are skipped, not re-drawn).
- ``dr_grpo``: sum over all tokens / (completions x max_new_tokens), a constant, and
  advantages not divided by the group's std (Liu et al. 2025, "Understanding R1-Zero-Like
  Training", arXiv:2503.20783): removes the length and difficulty biases of the two above.

Weights are computed once over the sampled batch, so the loss of the whole batch is exactly
the variant's formula; a minibatch's loss is its share, times the number of minibatches.

Rejection-sampling fine-tuning (``algo="rft"``; RFT, Yuan et al. 2023, arXiv:2308.01825; STaR,
Zelikman et al. 2022, arXiv:2203.14465): the same loop, but only the completions with full
reward are kept (duplicates within a group dropped) and trained on by cross-entropy, averaged
over their tokens: the baseline GRPO must beat or match.

Legend: P prompts, G group size, R = P*G rows, T tokens per completion.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): reward minus its group's mean, divided by the
    group's std when ``scale_by_std``. Equal rewards give exactly 0."""
    equal = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # exactly, not up to rounding
    centered = torch.where(equal, 0.0, rewards - rewards.mean(dim=1, keepdim=True))
    if not scale_by_std:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


def _per_sequence(mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """GRPO: 1/R * 1/|o_i| for every token of completion i."""
    lengths = mask.sum(dim=1, keepdim=True).clamp_min(1)
    return mask / (lengths * mask.shape[0])


def _per_token(mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """DAPO: 1 / (tokens in the batch)."""
    return mask / mask.sum().clamp_min(1)


def _constant(mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Dr. GRPO: 1 / (R * max_new_tokens), whatever the lengths."""
    return mask / (mask.shape[0] * max_new_tokens)


@dataclasses.dataclass(frozen=True)
class LossVariant:
    scale_by_std: bool  # divide advantages by the group's reward std
    token_weights: Callable[[torch.Tensor, int], torch.Tensor]  # (mask (R, T), max_new) -> (R, T)
    clip_high: Optional[float]  # None: the same as the lower clip


LOSSES = {
    "grpo": LossVariant(True, _per_sequence, None),
    "dapo": LossVariant(True, _per_token, 0.28),
    "dr_grpo": LossVariant(False, _constant, None),
}


def k3_kl(ref_logp, logp):
    """Per-token KL(pi || pi_ref) estimate pi_ref/pi - log(pi_ref/pi) - 1 (DeepSeekMath's k3)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def _masked_mean(x, weights) -> float:
    active = weights > 0
    return float((x.detach() * active).sum() / active.sum().clamp_min(1))


def clipped_objective(logp, old_logp, adv, weights, clip_low: float, clip_high: float,
                      ref_logp=None, kl_coef: float = 0.0):
    """The GRPO loss (a scalar to minimize) and its statistics.

    logp, old_logp, ref_logp, weights: (R, T) per completion token (0 elsewhere in weights);
    adv: (R,) one advantage per row."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    unclipped = ratio * a
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * a
    surrogate = torch.minimum(unclipped, clipped)
    per_token = -surrogate
    kl = None if ref_logp is None else k3_kl(ref_logp, logp)
    if kl is not None and kl_coef:
        per_token = per_token + kl_coef * kl
    loss = (weights * per_token).sum()
    stats = {"clip_frac": _masked_mean((clipped < unclipped).float(), weights)}
    if kl is not None:
        stats["kl"] = _masked_mean(kl, weights)
    return loss, stats


def likelihood_objective(logp, old_logp, adv, weights, clip_low, clip_high, ref_logp=None,
                         kl_coef: float = 0.0):
    """RFT: cross-entropy on the kept completions (adv 1 marks them; weights average their
    tokens). No ratio, no clipping: it is supervised fine-tuning on the policy's own samples."""
    loss = -(weights * adv[:, None] * logp).sum()
    stats = {"clip_frac": 0.0}
    if ref_logp is not None:
        stats["kl"] = _masked_mean(k3_kl(ref_logp, logp), weights)
    return loss, stats


def grpo_targets(rewards: torch.Tensor, mask: torch.Tensor, variant: LossVariant,
                 max_new_tokens: int, completions=None):
    """GRPO: advantages (R,) and token weights (R, T) for rewards (P, G) and completion mask (R, T)."""
    adv = group_advantages(rewards, variant.scale_by_std).reshape(-1)
    return adv, variant.token_weights(mask.float(), max_new_tokens)


def rft_targets(rewards: torch.Tensor, mask: torch.Tensor, variant: LossVariant,
                max_new_tokens: int, completions=None):
    """RFT: 1 for each distinct completion with full reward, 0 otherwise; weights average the
    kept completions' tokens."""
    P, G = rewards.shape
    keep = torch.zeros(P * G)
    for p in range(P):
        seen = set()
        for g in range(G):
            i = p * G + g
            key = tuple(completions[i]) if completions is not None else i
            if rewards[p, g] == 1.0 and key not in seen:
                seen.add(key)
                keep[i] = 1.0
    kept = mask.float() * keep[:, None]
    return keep, kept / kept.sum().clamp_min(1)


ALGORITHMS = {"grpo": (grpo_targets, clipped_objective), "rft": (rft_targets, likelihood_objective)}
