"""Test-time compute: strategies that spend more generation on a problem to answer it better.

Every strategy is a plain function ``strategy(policy, scorer, prompt, budget, key=...) ->
Result``:

- ``policy``: a ``Policy`` (a model and its tokenizer) that samples continuations of text
  prefixes, many per prefix in one batched, KV-cached call (each prefix prefilled once), and
  counts what that cost;
- ``scorer``: ``scorer(prompt, completions) -> list[float]``: an exact verifier (the task's
  reward, an oracle for upper bounds: ``verifier(task)``), an outcome reward model (scores
  finished answers) or a process reward model (scores partial solutions, step by step);
  ``None`` where a strategy needs none. A scorer with a ``compute`` attribute (a ``Compute``)
  has its cost added to the result;
- ``budget``: a ``Budget`` (samples, beam width, expansions, lengths, temperature, seed);
- ``key(prompt, answer)``: what votes compare (a task's ``answer_key``; default the answer
  text).

The strategies:

- ``majority_vote``: self-consistency (Wang et al. 2022): ``n`` samples, the most frequent
  answer wins (ties: the first seen).
- ``weighted_majority``: each answer's votes weighted by the scorer's score of its sample.
- ``best_of_n``: the sample the scorer ranks highest.
- ``beam_search``: search over reasoning steps (text up to ``budget.step``, a newline by
  default): ``width`` partial solutions (at first ``width`` copies of the empty one), each
  extended by ``expand`` sampled next steps, so every step weighs width x expand = N; the
  scorer (a PRM) ranks the partial solutions and the best ``width`` unfinished ones go on;
  finished ones (answer tag closed, or nothing more generated) are set aside; it stops after
  ``max_steps`` steps or once ``width`` solutions are finished, and returns the best finished
  one by score.
- ``dvts``: diverse verifier tree search (Beeching et al. 2024, search-and-learn):
  ``n // expand`` independent subtrees, each a beam search of width 1 (keep the best of
  ``expand`` next steps), so the subtrees cannot collapse onto one line; the best leaf wins.
- ``budget_forcing``: s1's control of thinking length (Muennighoff et al. 2025). The thinking
  is the text before ``<answer>``. With ``max_think`` > 0 it is cut at that many tokens and
  ``<answer>`` is forced; while it is shorter than ``min_think`` tokens, each attempt to write
  ``<answer>`` is removed and the cue (``"Wait"``) appended instead, and thinking goes on.

Compute (``Result.compute``): tokens the policy generated and prefilled, and their forward
FLOPs (``ledger.generation_flops``: matrix multiplies plus attention over the keys each token
sees); the scorer's separately.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

from keenlm.config import GenerateConfig
from keenlm.data.tasks import extract_answer, majority
from keenlm.infer.generate import generate_tokens, stop_check
from keenlm.ledger import generation_flops

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


@dataclasses.dataclass(frozen=True)
class Budget:
    n: int = 8  # samples (majority, best-of-n); leaves (dvts: n // expand subtrees)
    width: int = 4  # beam search: partial solutions kept per step
    expand: int = 4  # beam search, dvts: next steps sampled per partial solution
    max_steps: int = 16  # beam search, dvts: reasoning steps
    max_new_tokens: int = 64  # per sample; per step for beam search and dvts
    temperature: float = 0.8  # 0: greedy
    step: str = "\n"  # the end of a reasoning step
    seed: int = 0
    min_think: int = 0  # budget forcing: thinking tokens at least (extended with the cue)
    max_think: int = 0  # budget forcing: thinking tokens at most (0: no cap)
    cue: str = "Wait"  # budget forcing: what replaces an early end of thinking

    def __post_init__(self):
        for name in ("n", "width", "expand", "max_steps", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"budget.{name} = {getattr(self, name)}: an integer >= 1")
        if self.temperature < 0 or self.min_think < 0 or self.max_think < 0:
            raise ValueError("budget.temperature, min_think and max_think must be >= 0")
        if self.max_think and self.min_think > self.max_think:
            raise ValueError(f"budget.min_think {self.min_think} > max_think {self.max_think}")
        if not self.step:
            raise ValueError("budget.step: a non-empty delimiter")
        if self.min_think and not self.cue:
            raise ValueError("budget.min_think needs a cue to extend thinking with")


@dataclasses.dataclass
class Compute:
    policy_tokens: int = 0  # generated
    policy_prefill: int = 0  # prompt and prefix tokens read
    policy_flops: float = 0.0
    scorer_tokens: int = 0
    scorer_flops: float = 0.0

    def __sub__(self, other: "Compute") -> "Compute":
        return Compute(*(getattr(self, f.name) - getattr(other, f.name)
                         for f in dataclasses.fields(self)))


@dataclasses.dataclass
class Result:
    completion: str  # the chosen completion (thinking and answer)
    answer: Optional[str]  # inside its answer tag; None without one
    score: Optional[float]  # the scorer's score of it, when there is a scorer
    candidates: int  # completions (or partial solutions) considered
    compute: Compute
    thinking_tokens: Optional[int] = None  # budget forcing: the thinking's length in tokens
    cues: int = 0  # budget forcing: times the cue replaced an early end of thinking


def text_key(prompt: str, answer: str):
    return answer.strip()


def verifier(task) -> Callable[[str, list[str]], list[float]]:
    """The task's exact reward as a scorer: an oracle, for upper bounds."""
    return lambda prompt, completions: task.reward([prompt] * len(completions), completions)


def cut_after(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to and including the first stop string; and whether one was found."""
    hits = [(text.find(s), s) for s in stops if s in text]
    if not hits:
        return text, False
    at, s = min(hits)
    return text[:at + len(s)], True


class Policy:
    """A model and its tokenizer, sampling continuations of text and counting the cost."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.compute = Compute()

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def sample(self, prefixes: Sequence[str], n: int, *, max_new_tokens: int, temperature: float,
               seed: int, stop: Sequence[str] = (ANSWER_CLOSE,)) -> list[list[str]]:
        """``n`` continuations of each prefix, each ending at (and keeping) its first stop
        string or after ``max_new_tokens`` tokens: one generate call, each prefix prefilled
        once. Returns one list of n texts per prefix."""
        tok = self.tokenizer
        ids = [tok.encode_prompt(p) for p in prefixes]
        room = self.model.cfg.max_seq_len - max(map(len, ids))
        if room < 1:  # a prefix that fills the context has nothing more to say
            return [[""] * n for _ in prefixes]
        max_new_tokens = min(max_new_tokens, room)
        cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        outs = generate_tokens(self.model, ids, cfg, eos_id=tok.eos_id,
                               should_stop=stop_check(tok, stop), repeat=n)
        texts = [cut_after(tok.decode(o), stop)[0] for o in outs]
        for i, p in enumerate(ids):
            lengths = [len(o) for o in outs[i * n:(i + 1) * n]]
            self.compute.policy_prefill += len(p)
            self.compute.policy_tokens += sum(lengths)
            self.compute.policy_flops += generation_flops(self.model, len(p), lengths)
        return [texts[i * n:(i + 1) * n] for i in range(len(prefixes))]


def _finish(policy, scorer, prompt, chosen: str, score, candidates, start: Compute,
            scorer_start: Optional[Compute]) -> Result:
    spent = policy.compute - start
    if scorer_start is not None:
        s = scorer.compute - scorer_start
        spent.scorer_tokens, spent.scorer_flops = s.scorer_tokens, s.scorer_flops
    return Result(chosen, extract_answer(chosen), score, candidates, spent)


def _snapshot(policy, scorer):
    c = getattr(scorer, "compute", None)
    return dataclasses.replace(policy.compute), (dataclasses.replace(c) if c is not None else None)


def _samples(policy, prompt, budget) -> list[str]:
    return policy.sample([prompt], budget.n, max_new_tokens=budget.max_new_tokens,
                         temperature=budget.temperature, seed=budget.seed)[0]


# ------------------------------------------------------------------------------ voting and ranking


def _keys(prompt: str, completions: list[str], key) -> list:
    """What each completion votes for: its answer's key, or None without an answer."""
    return [None if (a := extract_answer(c)) is None else key(prompt, a) for c in completions]


def weighted_majority(policy, scorer, prompt: str, budget: Budget, key=text_key) -> Result:
    """``n`` samples; each answer collects the scores of the samples that give it (1 each
    without a scorer); the heaviest answer wins, represented by its first sample."""
    start, s0 = _snapshot(policy, scorer)
    comps = _samples(policy, prompt, budget)
    weights = scorer(prompt, comps) if scorer is not None else [1.0] * len(comps)
    i = majority(_keys(prompt, comps, key), weights) or 0
    return _finish(policy, scorer, prompt, comps[i], weights[i] if scorer else None, len(comps),
                   start, s0)


def majority_vote(policy, scorer, prompt: str, budget: Budget, key=text_key) -> Result:
    """``n`` samples; the most frequent answer wins (ties: the first seen). The scorer is not
    used."""
    start, s0 = _snapshot(policy, None)
    comps = _samples(policy, prompt, budget)
    i = majority(_keys(prompt, comps, key)) or 0
    return _finish(policy, None, prompt, comps[i], None, len(comps), start, s0)


def best_of_n(policy, scorer, prompt: str, budget: Budget, key=text_key) -> Result:
    """``n`` samples; the one the scorer ranks highest (the first on ties)."""
    if scorer is None:
        raise ValueError("best_of_n needs a scorer (a verifier or a reward model)")
    start, s0 = _snapshot(policy, scorer)
    comps = _samples(policy, prompt, budget)
    scores = scorer(prompt, comps)
    i = max(range(len(comps)), key=lambda j: (scores[j], -j))
    return _finish(policy, scorer, prompt, comps[i], scores[i], len(comps), start, s0)


# ------------------------------------------------------------------------------ search over steps


def _extend(policy, prompt, partials: list[str], budget: Budget, step: int) -> list[tuple[str, bool]]:
    """Each partial solution extended by ``expand`` sampled next steps: (text, finished)."""
    conts = policy.sample([prompt + p for p in partials], budget.expand,
                          max_new_tokens=budget.max_new_tokens, temperature=budget.temperature,
                          seed=budget.seed + 7919 * step, stop=(ANSWER_CLOSE, budget.step))
    out = []
    for p, cs in zip(partials, conts):
        for c in cs:
            text = p + c
            out.append((text, ANSWER_CLOSE in c or c == ""))
    return out


def beam_search(policy, scorer, prompt: str, budget: Budget, key=text_key) -> Result:
    """Beam search over reasoning steps guided by a (process) scorer; see the module docstring."""
    start, s0 = _snapshot(policy, scorer)
    beams, finished, seen = [""] * budget.width, [], 0  # width x expand candidates from step 1
    for step in range(budget.max_steps):
        cands = list(dict.fromkeys(_extend(policy, prompt, beams, budget, step)))  # no duplicates
        seen += len(cands)
        scores = scorer(prompt, [c for c, _ in cands]) if scorer is not None else [0.0] * len(cands)
        ranked = sorted(zip(scores, range(len(cands))), key=lambda t: (-t[0], t[1]))
        finished += [(cands[i][0], s) for s, i in ranked if cands[i][1]]
        beams = [cands[i][0] for s, i in ranked if not cands[i][1]][:budget.width]
        if not beams or len(finished) >= budget.width:
            break
    if not finished:  # out of steps: the best unfinished solutions compete
        finished = [(b, s) for b, s in zip(beams, scorer(prompt, beams) if scorer else [0.0] * len(beams))]
    text, score = max(finished, key=lambda t: t[1])  # max keeps the first of equal scores
    return _finish(policy, scorer, prompt, text, score if scorer else None, seen, start, s0)


def dvts(policy, scorer, prompt: str, budget: Budget, key=text_key) -> Result:
    """Diverse verifier tree search: ``n // expand`` independent subtrees, each keeping the best
    of ``expand`` next steps; the best leaf by score wins."""
    if scorer is None:
        raise ValueError("dvts needs a scorer (a process reward model or a verifier)")
    start, s0 = _snapshot(policy, scorer)
    trees = max(1, budget.n // budget.expand)
    lines, leaves, seen = [""] * trees, [], 0
    active = list(range(trees))
    for step in range(budget.max_steps):
        cands = _extend(policy, prompt, [lines[t] for t in active], budget, step)
        seen += len(cands)
        scores = scorer(prompt, [c for c, _ in cands])
        still = []
        for j, t in enumerate(active):
            group = range(j * budget.expand, (j + 1) * budget.expand)
            b = max(group, key=lambda i: (scores[i], -i))
            lines[t] = cands[b][0]
            if cands[b][1]:
                leaves.append((cands[b][0], scores[b]))
            else:
                still.append(t)
        active = still
        if not active:
            break
    if active:
        leaves += list(zip([lines[t] for t in active], scorer(prompt, [lines[t] for t in active])))
    text, score = max(leaves, key=lambda t: t[1])
    return _finish(policy, scorer, prompt, text, score, seen, start, s0)


# ------------------------------------------------------------------------------ thinking length


def _strip_tag_start(text: str) -> str:
    """``text`` without a trailing ``<answer>`` or a beginning of one."""
    for k in range(len(ANSWER_OPEN), 0, -1):
        if text.endswith(ANSWER_OPEN[:k]):
            return text[:-k]
    return text


def budget_forcing(policy, scorer, prompt: str, budget: Budget, key=text_key) -> Result:
    """Think, with the length held between ``min_think`` and ``max_think`` tokens, then answer
    (greedy at ``budget.temperature`` 0). The scorer is not used."""
    start, s0 = _snapshot(policy, None)
    cap = budget.max_think or budget.max_new_tokens
    thinking, used, forced = "", 0, 0
    while used < cap:
        piece = policy.sample([prompt + thinking], 1, max_new_tokens=cap - used,
                              temperature=budget.temperature, seed=budget.seed + forced,
                              stop=(ANSWER_OPEN,))[0][0]
        thinking += _strip_tag_start(piece)  # an answer tag, whole or cut by the cap, ends it
        used = policy.count(thinking)
        if used >= cap or used >= budget.min_think:  # out of room, or long enough to answer
            break
        thinking += budget.cue  # it wants to stop (or stopped) too early: think on
        used = policy.count(thinking)
        forced += 1
    if budget.max_think and used > budget.max_think:  # a cue can overshoot: cut to the cap
        ids = policy.tokenizer.encode(thinking)[:budget.max_think]
        thinking, used = policy.tokenizer.decode(ids), budget.max_think
    answer = policy.sample([prompt + thinking + ANSWER_OPEN], 1, max_new_tokens=budget.max_new_tokens,
                           temperature=budget.temperature, seed=budget.seed)[0][0]
    text = thinking + ANSWER_OPEN + answer
    res = _finish(policy, None, prompt, text, None, 1, start, s0)
    res.thinking_tokens, res.cues = used, forced
    return res


STRATEGIES = {"majority": majority_vote, "weighted_majority": weighted_majority,
              "best_of_n": best_of_n, "beam": beam_search, "dvts": dvts,
              "budget_forcing": budget_forcing}
