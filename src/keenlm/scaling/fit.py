"""Scaling-law fits: L(N) and L(N, D), compute-optimal allocation, confidence intervals.

The law (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", eq. 2):

    L(N, D) = E + A / N^alpha + B / D^beta        (N parameters, D training tokens)

and its one-variable form L(N) = E + A / N^alpha (every run trained on the same D, whose
term is then absorbed into E). A second form, ``form="kaplan"``, lets N and D interact: Kaplan
et al. 2020 ("Scaling Laws for Neural Language Models", eq. 1.5) with an irreducible term,

    L(N, D) = E + ((N_c / N)^(alpha_N / alpha_D) + D_c / D)^alpha_D

stored in the same fields (A = N_c, alpha = alpha_N, B = D_c, beta = alpha_D). At a fixed D it
flattens as N grows (a large model on few tokens is data-limited), where the Chinchilla form
keeps the same power law in N at every D.

- Approach 3 (``fit_law``): minimize the Huber loss (delta 1e-3) between the predicted and
  the observed log-loss, with the prediction written as a log-sum-exp,
  log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, by L-BFGS
  from a grid of initializations, as in the paper. The paper's grid is 4,500 points; every
  point is scored at once and L-BFGS is run from the ``starts`` best (the optimizer finds the
  same basin from neighbours of a good start; running it 4,500 times would make bootstraps
  impractically slow).
- Approach 2 (``isoflop_fit``): for each compute budget C (runs of equal C = 6 N D), a
  parabola of the loss in log N; its vertex is that budget's N_opt; then N_opt = k C^a by a
  least-squares line in log-log.
- ``bootstrap``: refit on runs resampled with replacement; percentile intervals of every
  constant and of the prediction at query points.
- ``Law.optimal(C)``: the closed-form minimum of L(N, D) under C = 6 N D (paper, appendix):
  G = (alpha A / (beta B))^(1/(alpha+beta)), N_opt = G (C/6)^(beta/(alpha+beta)),
  D_opt = (C/6)^(alpha/(alpha+beta)) / G.

Presets for comparison: ``chinchilla`` (Hoffmann et al. 2022: E 1.69, A 406.4, B 410.7,
alpha 0.34, beta 0.28) and ``epoch`` (Besiroglu et al. 2024, "Chinchilla Scaling: A
replication attempt": E 1.8172, A 482.01, B 2085.43, alpha 0.3478, beta 0.3658). Both are in
nats per token of their own tokenizer and data: compare exponents and the allocation, not E.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Law:
    E: float
    A: float
    alpha: float
    B: float = 0.0  # 0: the one-variable law L(N)
    beta: float = 0.0
    form: str = "chinchilla"  # or "kaplan" (module docstring)

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"form {self.form!r}: one of {', '.join(FORMS)}")

    @property
    def two_variable(self) -> bool:
        return self.B > 0

    def loss(self, n, d=None):
        """Predicted loss at N (and D: required by a two-variable law)."""
        n = np.asarray(n, dtype=float)
        if self.form == "kaplan":
            if d is None:
                raise ValueError("the kaplan form is a law of N and D: it needs D")
            d = np.asarray(d, dtype=float)
            return self.E + ((self.A / n) ** (self.alpha / self.beta) + self.B / d) ** self.beta
        out = self.E + self.A / n**self.alpha
        if self.two_variable:
            if d is None:
                raise ValueError("a two-variable law L(N, D) needs D (training tokens)")
            out = out + self.B / np.asarray(d, dtype=float) ** self.beta
        return out

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimizing L(N, D) subject to 6 N D = flops."""
        if not self.two_variable or self.form != "chinchilla":
            raise ValueError("compute-optimal allocation needs a two-variable law L(N, D) of "
                             "the chinchilla form")
        if flops <= 0:
            raise ValueError(f"FLOP budget {flops}: a positive number")
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        return g * (flops / 6) ** (b / (a + b)), (flops / 6) ** (a / (a + b)) / g


FORMS = ("chinchilla", "kaplan")

PRESETS = {
    "chinchilla": Law(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28),
    "epoch": Law(E=1.8172, A=482.01, alpha=0.3478, B=2085.43, beta=0.3658),
}

# The paper's initialization grid: alpha, beta in 0..2 by 0.5; e in -1..1.5 by 0.5; a, b in
# 0..25 by 5.
GRID_EXP = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
GRID_AB = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
# The kaplan form's grid: log N_c and log D_c in 5..35 by 5 (Kaplan's are ~32), exponents from
# 0.05 to 0.8.
GRID_LOG_C = (5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0)
GRID_KAPLAN_EXP = (0.05, 0.1, 0.2, 0.4, 0.8)


def _check(n, losses, d) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    n, losses = np.asarray(n, dtype=float), np.asarray(losses, dtype=float)
    if n.shape != losses.shape or n.ndim != 1:
        raise ValueError(f"N {n.shape} and losses {losses.shape}: two 1-D arrays of one length")
    need = 3 if d is None else 5
    if len(n) < need:
        raise ValueError(f"{len(n)} runs: a fit of {need} constants needs at least {need}")
    if (n <= 0).any() or (losses <= 0).any() or not np.isfinite(losses).all():
        raise ValueError("N and losses must be positive and finite")
    if d is not None:
        d = np.asarray(d, dtype=float)
        if d.shape != n.shape or (d <= 0).any():
            raise ValueError("D: positive token counts, one per run")
    return n, losses, d


def _huber(r, delta: float):
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _objective(theta, logn, logd, logl, delta, form: str = "chinchilla"):
    """theta = (e, a, alpha[, b, beta]) (logs of E, A, B); the summed Huber loss of log-loss
    residuals. Kaplan: log(term) = beta * LSE((alpha / beta)(a - log N), b - log D)."""
    e = theta[..., 0:1] + 0 * logn
    if form == "kaplan":
        alpha, beta = theta[..., 2:3], theta[..., 4:5]
        inner = torch.logsumexp(torch.stack([alpha / beta * (theta[..., 1:2] - logn),
                                             theta[..., 3:4] - logd]), dim=0)
        terms = [e, beta * inner]
    else:
        terms = [e, theta[..., 1:2] - theta[..., 2:3] * logn]
        if logd is not None:
            terms.append(theta[..., 3:4] - theta[..., 4:5] * logd)
    pred = torch.logsumexp(torch.stack(terms), dim=0)
    return _huber(pred - logl, delta).sum(-1)


@dataclass(frozen=True)
class Fit:
    law: Law
    objective: float  # summed Huber loss at the optimum
    runs: int


def fit_law(n: Sequence[float], losses: Sequence[float], d: Optional[Sequence[float]] = None,
            delta: float = 1e-3, starts: int = 8, init: Optional[Law] = None,
            form: str = "chinchilla") -> Fit:
    """Approach 3: L(N) (``d`` None) or L(N, D) by Huber loss on log-loss and L-BFGS."""
    if form not in FORMS:
        raise ValueError(f"form {form!r}: one of {', '.join(FORMS)}")
    if form == "kaplan" and d is None:
        raise ValueError("the kaplan form is a law of N and D: give each run's tokens")
    n, losses, d = _check(n, losses, d)
    logn = torch.tensor(np.log(n), dtype=torch.float64)
    logl = torch.tensor(np.log(losses), dtype=torch.float64)
    logd = None if d is None else torch.tensor(np.log(d), dtype=torch.float64)
    if form == "kaplan":
        axes = [GRID_E, GRID_LOG_C, GRID_KAPLAN_EXP, GRID_LOG_C, GRID_KAPLAN_EXP]
    else:
        axes = [GRID_E, GRID_AB, GRID_EXP] + ([GRID_AB, GRID_EXP] if d is not None else [])
    grid = torch.tensor(list(itertools.product(*axes)), dtype=torch.float64)
    if init is not None:
        grid = torch.cat([grid, torch.tensor([_theta(init, d is not None)], dtype=torch.float64)])

    def objective(theta):
        return _objective(theta, logn, logd, logl, delta, form)

    scores = objective(grid)
    best = None
    for k in torch.argsort(scores)[:starts].tolist():
        theta = grid[k].clone().requires_grad_(True)
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=150, tolerance_grad=1e-12,
                                tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = objective(theta)
            value.backward()
            return value

        opt.step(closure)
        value = float(objective(theta.detach()))
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, theta.detach().clone())
    if best is None:
        raise RuntimeError("the fit diverged from every start")
    t = best[1].tolist()
    law = Law(E=math.exp(t[0]), A=math.exp(t[1]), alpha=t[2], form=form,
              **({"B": math.exp(t[3]), "beta": t[4]} if d is not None else {}))
    return Fit(law, best[0], len(n))


def _theta(law: Law, two: bool) -> list[float]:
    t = [math.log(law.E), math.log(law.A), law.alpha]
    return t + ([math.log(law.B), law.beta] if two else [])


def bootstrap(n, losses, d=None, samples: int = 200, seed: int = 0, level: float = 0.9,
              query_n: Sequence[float] = (), query_d: Optional[Sequence[float]] = None,
              delta: float = 1e-3, form: str = "chinchilla") -> dict:
    """Percentile intervals (``level``) of each constant and of the predicted loss at
    (query_n, query_d), from fits to runs resampled with replacement. Each refit starts from
    the full fit and the grid's best points."""
    n, losses, d = _check(n, losses, d)
    full = fit_law(n, losses, d, delta, form=form)
    rng = np.random.default_rng(seed)
    laws = []
    need = 3 if d is None else 5
    while len(laws) < samples:
        idx = rng.integers(0, len(n), len(n))
        if len(set(n[idx].tolist()) if d is None else set(zip(n[idx], d[idx]))) < need:
            continue  # too few distinct runs to determine the constants
        laws.append(fit_law(n[idx], losses[idx], None if d is None else d[idx], delta,
                            starts=1, init=full.law, form=form).law)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    names = ["E", "A", "alpha"] + (["B", "beta"] if d is not None else [])
    out = {"fit": dataclasses.asdict(full.law), "level": level, "samples": samples,
           "constants": {k: [float(np.percentile([getattr(x, k) for x in laws], q)) for q in (lo, hi)]
                         for k in names},
           "laws": [dataclasses.asdict(x) for x in laws]}
    if len(query_n):
        out["prediction"] = interval(out, query_n, query_d)
    return out


def interval(boot: dict, n, d=None) -> dict:
    """The fitted prediction at N (and D) and its percentile interval over a bootstrap's laws."""
    level = boot["level"]
    preds = np.array([Law(**x).loss(n, d) for x in boot["laws"]])
    return {"n": np.atleast_1d(np.asarray(n, dtype=float)).tolist(),
            "loss": np.atleast_1d(Law(**boot["fit"]).loss(n, d)).tolist(),
            "low": np.atleast_1d(np.percentile(preds, (1 - level) / 2 * 100, axis=0)).tolist(),
            "high": np.atleast_1d(np.percentile(preds, (1 + level) / 2 * 100, axis=0)).tolist()}


def isoflop_fit(n, losses, flops) -> dict:
    """Approach 2. ``flops``: each run's compute budget (equal for the runs of one isoFLOP
    profile). Per budget with >= 3 runs: the vertex of a parabola of loss in log N. Then
    N_opt = k C^a and D_opt = C / (6 N_opt) by least squares in log-log."""
    n, losses = np.asarray(n, dtype=float), np.asarray(losses, dtype=float)
    flops = np.asarray(flops, dtype=float)
    minima = []
    for c in sorted(set(flops.tolist())):
        sel = flops == c
        if sel.sum() < 3:
            continue
        x = np.log(n[sel])
        c2, c1, _ = np.polyfit(x, losses[sel], 2)
        if c2 <= 0:
            continue  # no minimum: the profile does not bracket the optimum
        minima.append((c, float(np.exp(-c1 / (2 * c2)))))
    if len(minima) < 2:
        raise ValueError(f"{len(minima)} isoFLOP profiles with a minimum: approach 2 needs >= 2 "
                         "(each >= 3 model sizes at one budget, bracketing the optimum)")
    lc = np.log([m[0] for m in minima])
    ln = np.log([m[1] for m in minima])
    a, logk = np.polyfit(lc, ln, 1)
    return {"minima": [{"flops": c, "n_opt": m, "d_opt": c / (6 * m)} for c, m in minima],
            "n_exponent": float(a), "d_exponent": float(1 - a), "n_coefficient": float(np.exp(logk))}
