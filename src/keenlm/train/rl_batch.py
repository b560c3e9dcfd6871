"""What one RL step trains on, when the policy rarely samples a correct answer.

GRPO learns from the differences within a prompt's group. A group whose samples all got the
same reward (all wrong, or all right) has zero advantage and carries no gradient; when success
is rare, most groups are like that, and the few well-formed-but-wrong answers that earn the
task's 0.1 format reward become the only thing the update can learn from. Two remedies from
the literature, both off by default (``rl.oversample``, ``rl.format_reward_until``):

- **Dynamic sampling** (DAPO, Yu et al. 2025): draw groups for more prompts than the step
  trains on and keep the informative ones (reward not constant within the group) until the
  step has ``prompts`` of them; if ``rounds`` extra rounds of ``prompts`` fresh prompts are
  spent first, the rest of the batch is filled with the first uninformative groups (they add
  no gradient). Sampling costs more per step, and every update is spent on prompts at the
  edge of what the policy can do -- a curriculum the policy chooses itself.
- **Format reward dropped once learned**: the tiered reward (1 right, 0.1 well formed, 0
  otherwise) teaches the answer format; once a step's samples are well formed at rate
  ``until``, a well-formed wrong answer earns 0 for the rest of the run, so the update no
  longer pays for the format alone.

- **Curriculum by difficulty** (``rl.curriculum`` "learnability"): the step's prompts are drawn
  bin by bin (``keenlm.data.tasks.difficulty_bin``: carries, multiplicative steps), each bin
  weighted by its learnability p(1 - p), p being the bin's recent sampled success (Foster &
  Foerster 2025, "Learning to Reason at the Frontier of Learnability"; Tzannetos et al. 2023
  for the p(1 - p) weight). A bin the policy never or always solves gives no GRPO signal and
  gets only a small floor weight, so training starts where the easy problems are half
  solved and moves to harder bins as they become learnable -- an easy-to-hard order the
  policy's own success sets, with no schedule to tune.

``draw_batch`` is the reference: with ``rounds`` 0 it is exactly one draw of ``prompts`` groups.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from keenlm.data.tasks import Problem, difficulty_bin

FORMAT_ONLY = 0.1  # the tiered reward of a well-formed wrong answer (keenlm.data.tasks)


@dataclass
class Drawn:
    """Groups of samples: per prompt, its ids, its G completions (ids, texts) and rewards."""
    prompts: list  # texts, one per group
    prompt_ids: list
    comps: list  # G rows per prompt, consecutive
    texts: list
    rewards: list  # floats, G per prompt: what the update uses (FormatReward.apply)
    raw: list  # the task's own rewards
    gen_flops: float = 0.0

    def group(self, i: int, g: int) -> slice:
        return slice(i * g, (i + 1) * g)


def informative(rewards: list, g: int) -> list[bool]:
    """Per group of ``g`` consecutive rewards: are they not all equal?"""
    return [len(set(rewards[i:i + g])) > 1 for i in range(0, len(rewards), g)]


def draw_batch(draw: Callable[[list, int], Drawn], candidates: list, prompts: int, g: int,
               rounds: int) -> tuple[Drawn, dict]:
    """``prompts`` groups to train on: ``draw(chunk, offset)`` samples and scores the groups
    of a chunk of candidate prompts (``offset``: the chunk's place, for its seeds). Round 0
    draws the first ``prompts`` candidates; each further round (at most ``rounds``) the next
    ``prompts``, while fewer than ``prompts`` informative groups are kept. Returns the batch
    and {"drawn": groups sampled, "rounds": rounds used, "all": every group drawn}."""
    if len(candidates) < prompts * (rounds + 1):
        raise ValueError(f"{len(candidates)} candidate prompts for {rounds + 1} rounds of "
                         f"{prompts}")
    parts: list[Drawn] = []
    kept: list[tuple[int, int]] = []  # (part, group) of the informative groups, in order
    for r in range(rounds + 1):
        part = draw(candidates[r * prompts:(r + 1) * prompts], r * prompts)
        parts.append(part)
        if rounds == 0:
            return part, {"drawn": prompts, "rounds": 0, "all": part}
        kept += [(r, i) for i, ok in enumerate(informative(part.rewards, g)) if ok]
        if len(kept) >= prompts:
            break
    kept = kept[:prompts]
    chosen = set(kept)
    fill = [(0, i) for i in range(prompts) if (0, i) not in chosen][:prompts - len(kept)]
    picks = kept + fill
    everything = _join([(p, i) for p, part in enumerate(parts)
                        for i in range(len(part.prompts))], parts, g)
    everything.gen_flops = sum(p.gen_flops for p in parts)
    batch = _join(picks, parts, g)
    return batch, {"drawn": sum(len(p.prompts) for p in parts), "rounds": len(parts) - 1,
                   "all": everything}


def _join(picks: list[tuple[int, int]], parts: list[Drawn], g: int) -> Drawn:
    out = Drawn([], [], [], [], [], [])
    for p, i in picks:
        part, rows = parts[p], parts[p].group(i, g)
        out.prompts.append(part.prompts[i])
        out.prompt_ids.append(part.prompt_ids[i])
        out.comps += part.comps[rows]
        out.texts += part.texts[rows]
        out.rewards += part.rewards[rows]
        out.raw += part.raw[rows]
    return out


@dataclass
class FormatReward:
    """The tiered reward's format part, dropped once the format is learned (``until`` 0:
    never dropped)."""
    until: float = 0.0
    dropped_at: int = 0  # the step it was dropped at (0: not dropped)

    def apply(self, rewards: list[float]) -> list[float]:
        if not self.dropped_at:
            return rewards
        return [0.0 if r == FORMAT_ONLY else r for r in rewards]

    def observe(self, step: int, rewards: list[float]) -> bool:
        """After a step's (raw) rewards: drop the format reward when the share of well-formed
        samples reached ``until``. True when it is dropped now."""
        if not self.until or self.dropped_at or not rewards:
            return False
        if sum(r > 0 for r in rewards) / len(rewards) >= self.until:
            self.dropped_at = step
            return True
        return False


@dataclass
class Curriculum:
    """Prompts drawn by difficulty bin with weight p(1 - p) + ``floor`` (p: the bin's sampled
    success, an exponential average over the steps that drew from it with weight ``keep`` on
    the past; a bin not drawn yet weighs 0.25, the most a bin can, so every bin is tried)."""
    problems: list  # the training problems (keenlm.data.tasks.Problem)
    floor: float = 0.02
    keep: float = 0.7
    success: dict = field(default_factory=dict)  # bin -> recent sampled success

    def __post_init__(self):
        self.bins: dict[int, list[Problem]] = {}
        for p in self.problems:
            self.bins.setdefault(difficulty_bin(p), []).append(p)
        self.bin_of = {p.prompt: b for b, ps in self.bins.items() for p in ps}

    def weights(self) -> dict[int, float]:
        return {b: (0.25 if b not in self.success else
                    self.success[b] * (1 - self.success[b])) + self.floor
                for b in sorted(self.bins)}

    def draw(self, rng: random.Random, k: int) -> list[Problem]:
        """``k`` distinct problems: each from a bin drawn by weight (a bin used up is dropped)."""
        if k > len(self.problems):
            raise ValueError(f"{k} prompts from {len(self.problems)} training problems")
        left = {b: list(ps) for b, ps in self.bins.items()}
        w = self.weights()
        out = []
        for _ in range(k):
            bins = [b for b in sorted(left) if left[b]]
            b = rng.choices(bins, [w[b] for b in bins])[0]
            out.append(left[b].pop(rng.randrange(len(left[b]))))
        return out

    def observe(self, prompts: list[str], raw: list[float], g: int) -> None:
        """After a step: each bin's share of right samples (raw reward 1) among its groups."""
        right: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            tally = right.setdefault(self.bin_of[prompt], [0, 0])
            tally[0] += sum(r == 1.0 for r in raw[i * g:(i + 1) * g])
            tally[1] += g
        for b, (ok, n) in right.items():
            rate = ok / n
            self.success[b] = rate if b not in self.success else (
                self.keep * self.success[b] + (1 - self.keep) * rate)

    def state(self) -> dict:
        return {str(b): p for b, p in self.success.items()}

    def load(self, state: dict | None) -> None:
        self.success = {int(b): float(p) for b, p in (state or {}).items()}
