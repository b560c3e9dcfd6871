"""The language-modelling loss: LM head + cross-entropy, fused and chunked, beside a reference.

    loss = sum_i w_i * CE(h_i W^T, t_i) / sum_i w_i        (w_i = 1 by default)

The reference computes the full (N, V) logits, then ``F.cross_entropy``; autograd keeps the
logits and builds three more tensors of that size in backward (the zeros of the one-hot
gradient, the log-softmax gradient, its product). At batch 16 x 256 and V = 4096 each is 67 MB,
and on a CPU those passes over memory cost about a tenth of a training step.

The fused version (the idea of Liger-Kernel's FusedLinearCrossEntropy, Hsu et al. 2024,
https://arxiv.org/abs/2410.10989) walks over row chunks small enough to stay in cache: for
each chunk it computes logits, log-sum-exp, the per-token loss, and then -- since the loss is a
scalar whose gradient is known already -- turns the logits in place into their gradient
(softmax - one_hot) * w_i / sum(w) and multiplies it out into dL/dh and dL/dW at once. No
(N, V) tensor ever exists; the backward pass only scales the stored gradients by the incoming
scalar. The same three matrix products are done, so FLOPs are unchanged.

Both return ``(loss, per_token)`` where per_token (N,) is detached (for logging and hooks).
Targets < 0 are ignored (weight 0), for prompt masking in supervised fine-tuning.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _weights(targets: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    w = (targets >= 0).float() if weights is None else weights.float() * (targets >= 0)
    return w


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                   targets: torch.Tensor, weights: Optional[torch.Tensor] = None):
    """hidden (N, C), weight (V, C), targets (N,), weights (N,) or None."""
    logits = (hidden @ weight.t().to(hidden.dtype)).float()
    per_token = F.cross_entropy(logits, targets.clamp_min(0), reduction="none")
    w = _weights(targets, weights)
    loss = (per_token * w).sum() / w.sum().clamp_min(1e-8)
    return loss, per_token.detach()


def _chunk_rows(vocab: int, itemsize: int = 4, budget: int = 16 << 20) -> int:
    """Rows per chunk so one chunk of logits takes about ``budget`` bytes (cache-sized)."""
    return max(32, min(8192, budget // (vocab * itemsize)))


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, w, chunk):
        N = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        per_token = torch.empty(N, dtype=torch.float32, device=hidden.device)
        wt = weight.to(hidden.dtype)
        scale = w / w.sum().clamp_min(1e-8)  # dL/d(per-token loss)
        safe_t = targets.clamp_min(0)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            h, t = hidden[s:e], safe_t[s:e]
            rows = torch.arange(e - s, device=hidden.device)
            # the only logits ever held: (n, V), turned in place into log-probabilities
            logp = torch.log_softmax((h @ wt.t()).float(), dim=-1)
            per_token[s:e] = -logp[rows, t]
            if need_h or need_w:  # log-probs -> (softmax - one_hot) * scale, in place
                grad = logp.exp_()
                grad[rows, t] -= 1.0
                grad.mul_(scale[s:e, None])
                g = grad.to(hidden.dtype)
                if need_h:
                    torch.mm(g, wt, out=grad_h[s:e])
                if need_w:
                    grad_w.addmm_(g.t().float(), h.float())  # no copies in fp32
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        loss = (per_token * w).sum() / w.sum().clamp_min(1e-8)
        ctx.mark_non_differentiable(per_token)
        return loss, per_token

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               weights: Optional[torch.Tensor] = None, chunk: int = 0):
    """Same contract as the reference; never materializes the (N, V) logits."""
    assert hidden.dim() == 2 and targets.shape == hidden.shape[:1], (hidden.shape, targets.shape)
    w = _weights(targets, weights)
    return _FusedLinearCE.apply(hidden, weight, targets, w, chunk or _chunk_rows(weight.shape[0]))


LOSSES = {
    "fused": fused_linear_cross_entropy,
    "reference": reference_linear_cross_entropy,
}
