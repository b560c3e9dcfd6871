"""Which policy, which strategy, which N: test-time compute planned from a calibration run.

Brown et al. 2024 ("Large Language Monkeys") found that coverage (pass@k, the chance that k
samples hold a right answer) grows smoothly with k and bounds what best-of-N with a verifier
can reach; Snell et al. 2024 found the best test-time strategy depends on how hard a problem is
for the policy. The planner turns a small calibration run of each candidate policy into
predicted accuracy and cost of every strategy at every N, and picks the best buy for a budget.

- ``calibrate``: a policy answers ``problems`` problems of the task's validation split (never
  the test split) once greedily and ``samples`` times at ``temperature``. Kept per problem: the
  greedy outcome, how many samples were right, how often each distinct answer (the task's
  answer key) came up; and the FLOPs (``keenlm.ledger.generation_flops``) of a greedy answer,
  of a prompt's prefill, and of one sample's decoding: N samples of a query cost one prefill
  (the prompt's cache is shared by its samples) and N decodes (``Calibration.cost``).
- ``predict`` at any N:
  - best-of-N by an exact verifier = pass@N. Per-problem success rates are modelled as
    Beta(a, b), fitted by maximum likelihood to the right-sample counts (beta-binomial), and
    pass@N = 1 - B(a, b + N) / B(a, b): it extrapolates past N = samples (a problem with 0 of
    n right still has a chance at larger N, as real policies show). For N <= samples, the
    unbiased estimate (Chen et al. 2021) is beside it as ``pass@N measured``.
  - majority@N: the chance that the right answer gets the most of N votes (ties shared
    evenly), by Monte Carlo from each problem's calibration answers: the right answer's share
    drawn from its posterior under the fitted Beta (so a problem never answered right in
    calibration can still be won at large N when its wrong answers scatter), wrong answers seen
    once standing for the long tail of distinct wrong answers (``majority_at_n``).
  - greedy: the calibration greedy accuracy, at the cost of one sample.
  Intervals: percentiles over calibration problems resampled with replacement; with
  ``test_n``, the interval of an accuracy *measured* on that many other problems, which adds
  their sampling noise (each resample's accuracy drawn through a binomial of ``test_n``).
- ``plan``: for a FLOP budget per query, every (policy, strategy, N) whose cost fits; the one
  with the highest predicted accuracy wins (ties: the cheaper).

Strategies ranked by a learned reward model are not planned: their accuracy depends on how well
the model ranks, which a user should measure first (``keenlm solve --scorer RM`` reports the
ranking quality and says when it is below chance).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from keenlm.data.tasks import extract_answer, pass_at_k
from keenlm.infer.task_eval import complete
from keenlm.ledger import generation_flops

STRATEGIES = ("greedy", "majority", "best_of_n_verifier")


@dataclass
class Calibration:
    """One policy's calibration run (see the module docstring)."""
    name: str
    params: int
    samples: int  # answers per problem
    greedy: list  # per problem: the greedy answer was right (bool)
    right: list  # per problem: how many of the samples were right
    answers: list  # per problem: [[count, is_right], ...] per distinct parsed answer
    unparsed: list  # per problem: samples without a parsable answer (they never vote)
    flops_prefill: float  # mean FLOPs of a prompt's prefill
    flops_decode: float  # mean FLOPs of one sample's decoding (after the shared prefill)
    flops_greedy: float  # mean FLOPs of a greedy answer, prefill included

    def cost(self, strategy: str, n: int) -> float:
        """FLOPs per query of ``strategy`` at N."""
        return sample_cost(self.flops_greedy, self.flops_prefill, self.flops_decode, strategy, n)

    def to_dict(self) -> dict:
        return asdict(self)

    def subset(self, idx: list[int]) -> "Calibration":
        """The calibration of only some of its problems (e.g. one difficulty bin's)."""
        if len(idx) < 2 or not all(0 <= i < len(self.right) for i in idx):
            raise ValueError(f"a subset of {len(self.right)} calibration problems needs at least "
                             f"2 of them, by index; got {len(idx)}")

        def pick(xs):
            return [xs[i] for i in idx]
        return replace(self, greedy=pick(self.greedy), right=pick(self.right),
                       answers=pick(self.answers), unparsed=pick(self.unparsed))


def sample_cost(greedy: float, prefill: float, decode: float, strategy: str, n: int) -> float:
    """FLOPs per query: a greedy answer's, or one prefill and N decodes."""
    return greedy if strategy == "greedy" else prefill + n * decode


def answer_samples(model, tokenizer, task, problems: list, samples: int, temperature: float,
                   max_new_tokens: int, seed: int = 0) -> dict:
    """Greedy and ``samples`` sampled answers to ``problems``: per problem, whether the greedy
    answer was right, whether each sample was right and its vote key (``answer_keys``); the mean
    FLOPs (``keenlm.ledger.generation_flops``) of a greedy answer, of a prompt's prefill and of
    one sample's decoding."""
    prompts = [p.prompt for p in problems]
    greedy = complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    sampled = complete(model, tokenizer, prompts, temperature=temperature, seed=seed,
                       max_new_tokens=max_new_tokens, repeat=samples)
    ok = [r == 1.0 for r in task.reward([p for p in prompts for _ in range(samples)], sampled)]
    per = [slice(i * samples, (i + 1) * samples) for i in range(len(prompts))]
    n_tokens = lambda text: len(tokenizer.encode(text))  # noqa: E731
    flops = sum(generation_flops(model, n_tokens(p), [n_tokens(c) for c in sampled[mine]])
                for p, mine in zip(prompts, per))
    prefill = sum(generation_flops(model, n_tokens(p), []) for p in prompts)
    return {"greedy_right": [r == 1.0 for r in task.reward(prompts, greedy)],
            "right": [ok[mine] for mine in per],
            "keys": [answer_keys(task, p, sampled[mine]) for p, mine in zip(prompts, per)],
            "flops_prefill": prefill / len(prompts),
            "flops_decode": (flops - prefill) / (len(prompts) * samples),
            "flops_greedy": sum(generation_flops(model, n_tokens(p), [n_tokens(c)])
                                for p, c in zip(prompts, greedy)) / len(prompts)}


def calibrate(name: str, model, tokenizer, task, problems: int = 50, samples: int = 16,
              temperature: float = 1.0, max_new_tokens: int = 32, seed: int = 0) -> Calibration:
    """Greedy and ``samples`` sampled answers of ``model`` to ``problems`` validation problems."""
    if problems < 2 or samples < 2:
        raise ValueError(f"problems {problems}, samples {samples}: at least 2 of each")
    got = answer_samples(model, tokenizer, task, task.problems("val", problems), samples,
                         temperature, max_new_tokens, seed)
    answers, unparsed = [], []
    for keys, ok in zip(got["keys"], got["right"]):
        counts: dict = {}  # key -> [samples, right]
        for key, r in zip(keys, ok):
            counts.setdefault(key, [0, False])
            counts[key] = [counts[key][0] + 1, r and key is not None]
        answers.append([c for k, c in counts.items() if k is not None])
        unparsed.append(counts.get(None, [0])[0])
    params = sum(p.numel() for p in model.parameters())
    return Calibration(name, params, samples, got["greedy_right"],
                       [sum(ok) for ok in got["right"]], answers, unparsed,
                       got["flops_prefill"], got["flops_decode"], got["flops_greedy"])


def answer_keys(task, prompt: str, completions: list[str]) -> list:
    """What each completion's vote counts as: the task's key of its tagged answer (None: no
    answer, no vote)."""
    answers = [extract_answer(c) for c in completions]
    return [None if a is None else task.answer_key(prompt, a) for a in answers]


# ------------------------------------------------------------------------------ predictions


def betaln(a, b):
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def fit_beta(right, samples: int) -> tuple[float, float]:
    """Maximum-likelihood Beta(a, b) of per-problem success rates from right-sample counts
    (the beta-binomial likelihood; L-BFGS on log a, log b)."""
    c = torch.tensor(np.asarray(right, dtype=float), dtype=torch.float64)
    if bool((c == 0).all()) or bool((c == samples).all()):
        return (1e-3, 1e3) if float(c[0]) == 0 else (1e3, 1e-3)  # all wrong or all right

    def lbeta(a, b):
        return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)

    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # log a, log b: Beta(1, 1)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=200, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        a, b = x.clamp(-12, 12).exp()
        nll = -(lbeta(c + a, samples - c + b) - lbeta(a, b)).sum()
        nll.backward()
        return nll

    opt.step(closure)
    a, b = x.detach().clamp(-12, 12).exp().tolist()
    return a, b


def pass_at_n(a: float, b: float, n: int) -> float:
    """1 - E[(1 - p)^n] for p ~ Beta(a, b)."""
    return 1.0 - math.exp(betaln(a, b + n) - betaln(a, b))


def majority_at_n(answers: list, unparsed: int, n: int, rng: np.random.Generator,
                  prior: tuple[float, float] | None = None, samples: int = 0,
                  draws: int = 2000) -> float:
    """The chance that the right answer wins a vote of ``n`` samples (ties shared evenly),
    simulated from a problem's calibration answers ([[count, is_right], ...], plus ``unparsed``
    samples, which never vote).

    Wrong answers seen once stand for the long tail of distinct wrong answers: each draw from
    them is an answer of its own. With ``prior`` (the Beta of success rates over problems) and
    ``samples`` (calibration samples per problem), the right answer's share is drawn from its
    posterior Beta(a + right, b + samples - right) in each simulated vote, so a problem never
    answered right in calibration can still be won at large N, when its wrong answers scatter;
    without, its share is its calibration share (0 when it was never right)."""
    right = sum(c for c, r in answers if r)
    if prior is None and not right:
        return 0.0
    wrong = [c for c, r in answers if not r]
    kept = [c for c in wrong if c >= 2]  # wrong answers that can gather votes
    tail = sum(c for c in wrong if c < 2)
    total = right + sum(wrong) + unparsed
    if prior is None:
        share = np.full(draws, right / total)
    else:
        share = rng.beta(prior[0] + right, prior[1] + max(samples - right, 0), size=draws)
    rest = np.array(kept + [tail, unparsed], dtype=float)
    rest = rest / rest.sum() if rest.sum() > 0 else np.r_[np.zeros(len(kept)), 1.0, 0.0]
    votes = rng.multinomial(n, np.concatenate([share[:, None], (1 - share)[:, None] *
                                               rest[None, :]], axis=1))
    mine, others, singles = votes[:, 0], votes[:, 1:1 + len(kept)], votes[:, -2]
    best_other = others.max(axis=1) if kept else np.zeros_like(mine)
    top = np.maximum(np.maximum(mine, best_other), (singles > 0).astype(mine.dtype))
    ties = (mine == top) + (others == top[:, None]).sum(axis=1) + np.where(top == 1, singles, 0)
    return float(np.mean(np.where((mine == top) & (mine > 0), 1.0 / np.maximum(ties, 1), 0.0)))


class Predictor:
    """Predictions for one calibration. The bootstrap resamples (of problems) are drawn once,
    so every strategy and N is judged on the same resamples; the Beta fits (one per resample)
    and each N's per-problem majority chances are computed once."""

    def __init__(self, cal: Calibration, resamples: int = 200, level: float = 0.9,
                 seed: int = 0):
        self.cal, self.level, self.seed = cal, level, seed
        self.rng = np.random.default_rng(seed)
        k = len(cal.right)
        self.idx = [self.rng.integers(0, k, k) for _ in range(resamples)]
        self.beta = fit_beta(cal.right, cal.samples)
        self.betas = [fit_beta([cal.right[i] for i in ix], cal.samples) for ix in self.idx]
        self._majority: dict[int, np.ndarray] = {}

    def _per_problem(self, strategy: str, n: int) -> np.ndarray:
        if strategy == "greedy":
            return np.asarray(self.cal.greedy, dtype=float)
        if n not in self._majority:  # each (N, problem) from its own generator: any order
            self._majority[n] = np.array([
                majority_at_n(a, u, n, np.random.default_rng([self.seed, n, i]), self.beta,
                              self.cal.samples)
                for i, (a, u) in enumerate(zip(self.cal.answers, self.cal.unparsed))])
        return self._majority[n]

    def predict(self, strategy: str, n: int, test_n: int = 0) -> dict:
        """Predicted accuracy of ``strategy`` at ``n`` with its interval (``test_n`` > 0: of
        an accuracy measured on ``test_n`` problems); FLOPs per query."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
        if n < 1:
            raise ValueError(f"N {n}: an integer >= 1")
        cal = self.cal
        if strategy == "best_of_n_verifier":
            full = pass_at_n(*self.beta, n)
            boots = [pass_at_n(a, b, n) for a, b in self.betas]
        else:
            vals = self._per_problem(strategy, n)
            full, boots = float(vals.mean()), [float(vals[ix].mean()) for ix in self.idx]
        if test_n > 0:  # the noise of measuring it on test_n problems (its own generator)
            rng = np.random.default_rng([self.seed, test_n, n, STRATEGIES.index(strategy)])
            boots = rng.binomial(test_n, np.clip(boots, 0.0, 1.0)) / test_n
        lo, hi = np.percentile(boots, [(1 - self.level) / 2 * 100, (1 + self.level) / 2 * 100])
        out = {"policy": cal.name, "strategy": strategy, "n": 1 if strategy == "greedy" else n,
               "accuracy": float(full), "low": float(lo), "high": float(hi),
               "flops": cal.cost(strategy, n)}
        if strategy == "best_of_n_verifier" and n <= cal.samples:
            out["measured"] = float(np.mean([pass_at_k(cal.samples, c, n) for c in cal.right]))
        return out


def plan(cals: list, budget: float, ns=(1, 2, 4, 8, 16, 32, 64, 128, 256),
         strategies=STRATEGIES, resamples: int = 200) -> dict:
    """The best predicted (policy, strategy, N) within ``budget`` FLOPs per query, and every
    option considered (None chosen when nothing fits). ``cals``: Calibrations, or Predictors
    made from them (reused across budgets, their fits are not redone)."""
    if budget <= 0 or not math.isfinite(budget):
        raise ValueError(f"budget {budget}: a positive FLOP count per query")
    options = []
    for c in cals:
        pred = c if isinstance(c, Predictor) else Predictor(c, resamples)
        cal = pred.cal
        for s in strategies:
            for n in ((1,) if s == "greedy" else ns):
                if cal.cost(s, n) <= budget:
                    options.append(pred.predict(s, n))
    best = max(options, key=lambda o: (o["accuracy"], -o["flops"]), default=None)
    return {"budget": budget, "chosen": best, "options": options}
