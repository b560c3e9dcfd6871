"""Optimizers and learning-rate schedules.

- AdamW (Loshchilov & Hutter 2019): decoupled weight decay on matrices only (not on norm
  gains); the fused kernel where PyTorch has one for the device, else foreach.
- Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/): SGD-momentum whose
  update for each hidden weight matrix is orthogonalized by 5 Newton-Schulz iterations; the
  embedding, LM head and norm gains stay on AdamW, as in the reference recipe. Muon's
  learning rate is its own (``MUON_LR``, 0.02 in the reference) times the schedule.
- Schedules (multipliers of the peak lr, a pure function of the step so resume is exact):
  linear warmup, then ``cosine`` decay to ``min_lr_ratio``, ``wsd`` (warmup-stable-decay:
  constant, then linear decay over the last ``decay_fraction`` of steps; Hu et al. 2024,
  MiniCPM), or ``constant``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

MUON_LR = 0.02


def lr_multiplier(step: int, cfg, steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "cosine":
        span = max(1, steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: stable until the decay phase, then linear to the floor
    decay_steps = max(1, int(cfg.decay_fraction * steps))
    decay_start = steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)


def _split_params(model: nn.Module):
    """(hidden matrices, embedding/head matrices, vectors) without duplicates (tied weights)."""
    seen, hidden, edge, vectors = set(), [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2 or name.endswith("alpha"):  # gains, low-bit step sizes: no decay
            vectors.append(p)
        elif "embed_tokens" in name or "lm_head" in name:
            edge.append(p)
        else:
            hidden.append(p)
    return hidden, edge, vectors


def _adamw(groups, cfg, device_type: str):
    kwargs = {"betas": (cfg.beta1, cfg.beta2), "eps": 1e-8, "lr": cfg.lr}
    # fused AdamW exists for CPU and CUDA in torch >= 2.4; foreach is the fallback
    try:
        return torch.optim.AdamW(groups, fused=device_type in ("cpu", "cuda"), **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def build_optimizer(model: nn.Module, cfg, device_type: str) -> torch.optim.Optimizer:
    hidden, edge, vectors = _split_params(model)
    if cfg.name == "adamw":
        return _adamw([{"params": hidden + edge, "weight_decay": cfg.weight_decay},
                       {"params": vectors, "weight_decay": 0.0}], cfg, device_type)
    return MuonAdamW(hidden, [{"params": edge, "weight_decay": cfg.weight_decay},
                              {"params": vectors, "weight_decay": 0.0}], cfg)


def set_lr(opt: torch.optim.Optimizer, mult: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * mult


def zeropower_newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T of G = U S V^T by a quintic Newton-Schulz iteration (Muon)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float()
    transpose = X.shape[0] > X.shape[1]
    if transpose:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if transpose else X).to(G.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for hidden matrices, AdamW for everything else, stepped together."""

    def __init__(self, muon_params, adam_groups, cfg, momentum: float = 0.95):
        groups = [{"params": list(muon_params), "muon": True, "lr": MUON_LR, "momentum": momentum,
                   "weight_decay": cfg.weight_decay}]
        for g in adam_groups:
            groups.append({**g, "muon": False, "lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2)})
        super().__init__(groups, {})

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            (self._muon if g["muon"] else self._adam)(g)

    def _muon(self, g):
        for p in g["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            buf = st.setdefault("momentum_buffer", torch.zeros_like(p))
            buf.mul_(g["momentum"]).add_(p.grad)
            update = p.grad.add(buf, alpha=g["momentum"])  # Nesterov
            update = zeropower_newton_schulz(update)
            scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
            p.mul_(1 - g["lr"] * g["weight_decay"])
            p.add_(update, alpha=-g["lr"] * scale)

    def _adam(self, g):
        b1, b2 = g["betas"]
        for p in g["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            t = st["step"].item()
            st["exp_avg"].lerp_(p.grad, 1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (st["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(1e-8)
            p.mul_(1 - g["lr"] * g["weight_decay"])
            p.addcdiv_(st["exp_avg"], denom, value=-g["lr"] / (1 - b1 ** t))


def init_base_lr(opt: torch.optim.Optimizer) -> None:
    """Remember each group's peak lr so schedules multiply it (idempotent across resume)."""
    for g in opt.param_groups:
        g.setdefault("base_lr", g["lr"])


def grad_norm(params, clip: float) -> float:
    """The gradients' total 2-norm (clipped to ``clip`` when > 0: the norm before clipping is
    returned, as ``clip_grad_norm_`` does); 0.0 without gradients."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if clip > 0:
        norm = nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # a sharded (FSDP) norm: the whole model's
        norm = norm.full_tensor()
    return float(norm)


class FiniteGuard:
    """Whether an optimizer step may be taken: its loss and its gradients' norm must be finite.

    A non-finite step is skipped (its gradients are dropped, the weights stay those of the last
    good step) and counted (``skipped``); ``limit`` of them in a row stop the run with a
    ``FloatingPointError`` naming the step, before anything non-finite reaches the weights, so
    the last checkpoint written is a good one. ``state``/``load`` carry the counts across a
    resume."""

    def __init__(self, limit: int, hint: str = ""):
        self.limit, self.hint = limit, hint
        self.skipped = self.in_a_row = 0

    def allow(self, loss: float, norm: float, step: int) -> bool:
        if math.isfinite(loss) and math.isfinite(norm):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row > self.limit:
            raise FloatingPointError(
                f"step {step}: loss {loss}, gradient norm {norm}: {self.in_a_row} non-finite "
                f"steps in a row (each skipped; the limit is {self.limit}); the weights and the "
                f"last checkpoint are from before them{self.hint}")
        return False

    def state(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load(self, state: dict | None) -> None:
        self.skipped = int((state or {}).get("skipped", 0))
        self.in_a_row = int((state or {}).get("in_a_row", 0))
