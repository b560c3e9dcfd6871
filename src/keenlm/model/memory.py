"""A neural long-term memory that learns from surprise at test time (Titans-style).

Titans (Behrouz, Zhong & Mirrokni 2024, "Titans: Learning to Memorize at Test Time",
https://arxiv.org/abs/2501.00663) keeps, beside attention, a memory M: a small MLP whose
*weights* are the state. Every token writes into it by one step of gradient descent on an
associative loss, during the forward pass -- in training and at test time alike:

    k_t, v_t, q_t = x_t W_K, x_t W_V, x_t W_Q        (each L2-normalized, per head)
    loss_t(M)  = || M(k_t) - v_t ||^2                  (how surprised M is by the pair)
    S_t = eta_t S_{t-1} - theta_t grad loss_t(M)       (surprise with momentum)
    M_t = (1 - alpha_t) M_{t-1} + S_t                  (forgetting by weight decay)
    y_t = M(q_t)                                       (reading: a forward pass, no update)

eta_t (momentum), theta_t (learning rate) and alpha_t (forgetting) are data-dependent:
sigmoids of linear functions of x_t, one per head (theta scaled by ``lr_max`` / ``chunk``:
see ``NeuralMemory.coefficients``).

What is implemented, and how (the paper has no official code; the widely used community
version differs from the paper in several places, as its issue tracker discusses, and nothing
here follows it):
- The memory is an MLP of depth 1 (M(k) = W k, the default) or 2 (M(k) = W2 silu(W1 k))
  per head; its initial weights are parameters learned by the outer model. Stability: with
  unit-norm keys the linear memory's mean-gradient step cannot overshoot (the curvature of
  the chunk's mean loss is at most 2, the step at most lr_max = 1). The depth-2 memory has
  no such bound (its curvature grows with its own weights): trained on the recall task it
  learned at 64 tokens but its writes diverged to inf within 10 steps at 256 tokens. A
  stabilizer for it (a step scaled by the gradient's norm, or weight normalization) is not
  built yet.
- Chunked, parallel update (the paper's Section 3.2): within a chunk of ``chunk`` tokens every
  gradient is taken at the memory as it was at the chunk's start (mini-batch gradient
  descent), then the momentum and decay recurrences are unrolled in closed form with
  cumulative products (log-space, so nothing divides by a vanishing product). The per-token
  gradients are outer products, so the chunk's update is a few batched matrix products and
  no per-token weight copy is made. Training is a Python loop over chunks, not tokens.
  ``memory_reference`` below is the same rule as a plain loop over tokens, its gradients from
  autograd; the tests hold the two equal to 1e-5. With ``chunk = 1`` it is the paper's fully
  sequential rule.
- Reading: the tokens of a chunk read the memory as it stood at the chunk's start (written by
  all earlier chunks), so the output is causal at chunk granularity.
- Surprise gate (``gate`` > 0, an option beyond the paper): a token whose loss_t at the
  chunk-start memory is below ``gate`` x the mean loss of its chunk (per head; a threshold
  that needs no knowledge of the loss's scale) makes no update at all (S and M unchanged);
  the skipped share is counted and logged.
- Outer learning: the whole update is differentiable, so W_K, W_V, W_Q, the coefficient
  projections and M's initial weights are trained by the language-model loss through it.
- Integration: memory as a layer (MAL: x + memory(norm x) before attention) and memory as a
  gated branch (MAG: a learned sigmoid gate mixes the attention and memory outputs), with
  sliding-window attention (``model.attn_window``). Memory as context (MAC) and persistent
  memory tokens are not implemented. Generation with a KV cache does not carry the memory
  state yet: such models are evaluated with full forward passes (a clear error otherwise).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def memory_apply(weights: list[torch.Tensor], k: torch.Tensor) -> torch.Tensor:
    """M(k) for weights [W] (depth 1) or [W1, W2] (depth 2), each (..., out, in); k (..., n, in)."""
    if len(weights) == 1:
        return k @ weights[0].transpose(-1, -2)
    return F.silu(k @ weights[0].transpose(-1, -2)) @ weights[1].transpose(-1, -2)


def token_gradients(weights, k, v):
    """Per-token loss ||M(k) - v||^2 at ``weights`` and its gradient as outer-product factors:
    for each weight matrix, (left (..., n, out), right (..., n, in)) with
    grad_t = left_t right_t^T. Returns (loss (..., n), factors)."""
    if len(weights) == 1:
        e = memory_apply(weights, k) - v
        return e.pow(2).sum(-1), [(2 * e, k)]
    w1, w2 = weights
    z = k @ w1.transpose(-1, -2)
    a = F.silu(z)
    e = a @ w2.transpose(-1, -2) - v
    dz = (2 * e @ w2) * _silu_grad(z)
    return e.pow(2).sum(-1), [(dz, k), (2 * e, a)]


def chunk_update(weights, momentum, k, v, eta, theta, alpha, gate: float = 0.0):
    """Apply one chunk's writes in closed form. weights/momentum: lists of (B, H, out, in);
    k, v: (B, H, n, D); eta, theta, alpha: (B, H, n). Returns (new weights, new momentum,
    per-token loss (B, H, n), update mask (B, H, n))."""
    loss, factors = token_gradients(weights, k, v)
    m = (loss >= gate * loss.mean(-1, keepdim=True)).to(k.dtype) if gate > 0 else torch.ones_like(loss)
    # a skipped token: eta 1, theta 0, alpha 0, and its S is not added to M
    eta = m * eta + (1 - m)
    theta = m * theta
    alpha = m * alpha
    l_eta = torch.cumsum(torch.log(eta.clamp_min(1e-6)), -1)  # (B, H, n)
    l_keep = torch.cumsum(torch.log1p(-alpha.clamp(max=1 - 1e-6)), -1)
    n = k.shape[-2]
    tri = torch.ones(n, n, dtype=torch.bool, device=k.device).tril()  # [t, j]: j <= t
    diff = l_eta[..., :, None] - l_eta[..., None, :]
    P = torch.where(tri, torch.exp(diff.masked_fill(~tri, 0.0)), torch.zeros((), device=k.device))
    r = torch.exp(l_keep[..., -1:] - l_keep) * m  # (B, H, n): decay from t to the chunk's end
    c_s = (r * torch.exp(l_eta)).sum(-1)  # coefficient of the incoming momentum in M_end
    w = theta * (P.transpose(-1, -2) @ r[..., None])[..., 0]  # weight of g_j in M_end
    u = theta * torch.exp(l_eta[..., -1:] - l_eta)  # weight of g_j in S_end
    decay = torch.exp(l_keep[..., -1])[..., None, None]
    eta_all = torch.exp(l_eta[..., -1])[..., None, None]
    new_w, new_s = [], []
    for W, S, (left, right) in zip(weights, momentum, factors):
        gw = (left * w[..., None]).transpose(-1, -2) @ right  # sum_j w_j left_j right_j^T
        gu = (left * u[..., None]).transpose(-1, -2) @ right
        new_w.append(decay * W + c_s[..., None, None] * S - gw)
        new_s.append(eta_all * S - gu)
    return new_w, new_s, loss, m


def memory_reference(weights, momentum, q, k, v, eta, theta, alpha, chunk: int,
                     gate: float = 0.0):
    """The same rule as a loop over tokens, gradients by autograd at each chunk's start:
    returns (what the queries read (B, H, T, D), final weights, final momentum, update mask
    (B, H, T))."""
    W = [w.clone() for w in weights]
    S = [s.clone() for s in momentum]
    T = k.shape[-2]
    reads, mask = [], []
    for c0 in range(0, T, chunk):
        start = [w.detach().clone().requires_grad_(True) for w in W]
        reads.append(memory_apply(W, q[..., c0:c0 + chunk, :]))
        with torch.no_grad():  # the gate's threshold: gate x the chunk's mean surprise
            chunk_loss = (memory_apply(W, k[..., c0:c0 + chunk, :]) -
                          v[..., c0:c0 + chunk, :]).pow(2).sum(-1)
            threshold = gate * chunk_loss.mean(-1)
        for t in range(c0, min(c0 + chunk, T)):
            lt = (memory_apply(start, k[..., t:t + 1, :]) - v[..., t:t + 1, :]).pow(2).sum(-1)
            grads = torch.autograd.grad(lt.sum(), start)  # sums over (B, H): separate weights
            on = (lt[..., 0] >= threshold) if gate > 0 else torch.ones_like(lt[..., 0], dtype=torch.bool)
            mask.append(on)
            f = on.to(k.dtype)[..., None, None]
            e, th, a = (eta[..., t][..., None, None], theta[..., t][..., None, None],
                        alpha[..., t][..., None, None])
            S = [f * (e * s - th * g) + (1 - f) * s for s, g in zip(S, grads)]
            W = [f * ((1 - a) * w + s) + (1 - f) * w for w, s in zip(W, S)]
    return torch.cat(reads, -2), W, S, torch.stack(mask, -1)


class NeuralMemory(nn.Module):
    """The memory layer: (B, T, C) -> (B, T, C), the state written as it reads."""

    def __init__(self, cfg):
        super().__init__()
        mc = cfg.memory
        self.H = mc.heads or cfg.n_head
        self.D = mc.head_dim or cfg.head_dim
        self.chunk, self.gate, self.lr_max = mc.chunk, mc.gate, mc.lr_max
        inner = self.H * self.D
        self.to_qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.to_coef = nn.Linear(cfg.d_model, 3 * self.H, bias=True)  # eta, theta, alpha
        hidden = mc.expansion * self.D
        shapes = [(self.D, self.D)] if mc.depth == 1 else [(hidden, self.D), (self.D, hidden)]
        self.init_weights = nn.ParameterList(
            nn.Parameter(torch.randn(self.H, o, i) / math.sqrt(i)) for o, i in shapes)
        self.o_proj = nn.Linear(inner, cfg.d_model, bias=False)
        self.reset_coefficients()
        self._skipped = self._tokens = 0
        self._surprise = 0.0

    def own_parameters(self):
        return list(self.init_weights)

    @torch.no_grad()
    def reset_own_parameters(self):
        """The memory's starting state: unit gain (a model's generic init would be far smaller)."""
        for w in self.init_weights:
            nn.init.normal_(w, 0.0, w.shape[-1] ** -0.5)

    @torch.no_grad()
    def reset_coefficients(self):
        """Start: momentum 0.88, half the largest step, forgetting 0.25% per token."""
        self.to_coef.bias.copy_(torch.tensor([2.0, 0.0, -6.0]).repeat_interleave(self.H))
        self.to_coef.weight.mul_(0.1)

    def coefficients(self, x):
        """eta, theta, alpha: (B, H, T) each. theta is divided by the chunk length: a chunk's
        gradients are all taken at one memory state, so their sum is one mini-batch step,
        and a step of the *mean* gradient is what stays stable as chunks grow (with unit keys
        a linear memory diverges once theta x chunk > 1)."""
        c = self.to_coef(x).float().view(*x.shape[:2], 3, self.H).permute(2, 0, 3, 1)
        theta = self.lr_max * torch.sigmoid(c[1]) / self.chunk
        return torch.sigmoid(c[0]), theta, torch.sigmoid(c[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.to_qkv(x).float().view(B, T, 3, self.H, self.D).permute(2, 0, 3, 1, 4)
        q, k, v = F.normalize(q, dim=-1), F.normalize(k, dim=-1), F.normalize(v, dim=-1)
        eta, theta, alpha = self.coefficients(x)
        with torch.autocast(x.device.type, enabled=False):  # the state in fp32
            W = [w.float().expand(B, *w.shape) for w in self.init_weights]
            S = [torch.zeros_like(w) for w in W]
            outs, losses, masks = [], [], []
            for c0 in range(0, T, self.chunk):
                sl = slice(c0, c0 + self.chunk)
                outs.append(memory_apply(W, q[..., sl, :]))
                W, S, loss, m = chunk_update(W, S, k[..., sl, :], v[..., sl, :], eta[..., sl],
                                             theta[..., sl], alpha[..., sl], self.gate)
                losses.append(loss.detach())
                masks.append(m.detach())
        y = torch.cat(outs, -2).transpose(1, 2).reshape(B, T, self.H * self.D)
        if self.training:
            m = torch.cat(masks, -1)
            self._skipped += int((m == 0).sum())
            self._tokens += m.numel()
            self._surprise += float(torch.cat(losses, -1).sum())
        return self.o_proj(y.to(x.dtype))

    def end_step(self) -> dict | None:
        if not self._tokens:
            return None
        stats = {"memory_skipped": self._skipped / self._tokens,
                 "memory_surprise": self._surprise / self._tokens}
        self._skipped = self._tokens = 0
        self._surprise = 0.0
        return stats

    @staticmethod
    def summarize(stats: list[dict]) -> dict:
        return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
