"""Reward models: outcome (ORM) and process (PRM) scorers, trained on the policy's own rollouts.

A reward model is a keenlm Transformer (started from the policy's weights) with a scalar head on
its final hidden state: p(correct) = sigmoid(w . h_t + b), read at chosen token positions t.

- ORM (Cobbe et al. 2021, verifiers): one label per sampled completion, read at its last
  token: 1 when the task's exact reward is 1, else 0.
- PRM, Math-Shepherd style (Wang et al. 2024, arXiv:2312.08935): one label per reasoning step
  (text up to and including the step delimiter, a newline by default; the answer is the last
  step), read at the step's last token. The label of step s is estimated by Monte-Carlo: from
  the prompt and steps 1..s, the policy rolls out ``rollouts`` completions; the soft label is
  the fraction that reach the right answer (the last step's label is the completion's own
  correctness).

Training: binary cross-entropy at the labelled positions, AdamW. Scoring (the scorer protocol
of ``keenlm.infer.search``): the probability at the last token of each text: a finished
completion for an ORM, a partial solution ending at a step delimiter for a PRM (the score of
its last step, as search-and-learn's beam search uses it). The scorer counts its tokens and
forward FLOPs.

A reward model folder: ``config.json`` (the backbone's run config), ``tokenizer/``,
``model.safetensors`` (backbone + ``score.weight`` / ``score.bias``), ``reward.json`` (kind,
task, training data counts), written atomically.
"""
from __future__ import annotations

import bisect
import copy
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from keenlm.config import from_dict, save_json
from keenlm.data import load_tokenizer
from keenlm.infer.search import Compute, Policy
from keenlm.io.loaders import load_any
from keenlm.ledger import flops_per_token, generation_flops
from keenlm.model import build_model, load_model_state, model_state
from keenlm.runs import atomic_folder

KINDS = ("orm", "prm")


@dataclasses.dataclass(frozen=True)
class Example:
    text: str  # prompt + completion (or a partial solution)
    ends: tuple[int, ...]  # character offsets in text where a label is read (exclusive ends)
    labels: tuple[float, ...]  # one label in [0, 1] per end


def step_ends(completion: str, delim: str = "\n") -> list[int]:
    """Exclusive character ends of each step of a completion (the delimiter belongs to its
    step; text after the last delimiter is the final step)."""
    ends, at = [], 0
    while True:
        i = completion.find(delim, at)
        if i < 0:
            break
        at = i + len(delim)
        ends.append(at)
    if not ends or ends[-1] < len(completion):
        ends.append(len(completion))
    return ends


def mc_step_labels(policy, reward, prompt: str, completion: str, rollouts: int, *,
                   max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0,
                   delim: str = "\n") -> list[float]:
    """Math-Shepherd labels of each step of ``completion``: for each step prefix but the last,
    the share of ``rollouts`` continuations (sampled together, one call) whose reward is 1;
    the last step: the completion's own correctness."""
    ends = step_ends(completion, delim)
    prefixes = [completion[:e] for e in ends[:-1]]
    labels = []
    if prefixes:
        conts = policy.sample([prompt + p for p in prefixes], rollouts, max_new_tokens=max_new_tokens,
                              temperature=temperature, seed=seed)
        for p, cs in zip(prefixes, conts):
            r = reward([prompt] * len(cs), [p + c for c in cs])
            labels.append(sum(x == 1.0 for x in r) / len(cs))
    labels.append(float(reward([prompt], [completion])[0] == 1.0))
    return labels


def rollout_examples(policy, task, kind: str, problems: int = 200, samples: int = 4,
                     rollouts: int = 4, max_new_tokens: int = 64, temperature: float = 1.0,
                     seed: int = 0, log=None) -> list[Example]:
    """Training data from the policy's own samples on the task's training problems."""
    if kind not in KINDS:
        raise ValueError(f"reward model kind {kind!r}: {' | '.join(KINDS)}")
    probs = task.problems("train", problems)
    prompts = [p.prompt for p in probs]
    out = []
    comps = policy.sample(prompts, samples, max_new_tokens=max_new_tokens, temperature=temperature,
                          seed=seed)
    for i, (prompt, cs) in enumerate(zip(prompts, comps)):
        if kind == "orm":
            r = task.reward([prompt] * len(cs), cs)
            out += [Example(prompt + c, (len(prompt) + len(c),), (float(x == 1.0),))
                    for c, x in zip(cs, r)]
            continue
        for j, c in enumerate(cs):
            labels = mc_step_labels(policy, task.reward, prompt, c, rollouts,
                                    max_new_tokens=max_new_tokens, temperature=temperature,
                                    seed=seed + 1 + i * samples + j)
            out.append(Example(prompt + c, tuple(len(prompt) + e for e in step_ends(c)),
                               tuple(labels)))
        if log and (i + 1) % 20 == 0:
            log(f"{kind} labels: {i + 1}/{len(prompts)} problems")
    return out


class RewardModel(nn.Module):
    """A keenlm Transformer with a scalar head: logits (B, T) of p(correct) at every position."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.score = nn.Linear(net.cfg.d_model, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        self.train_flops = 0.0  # forward + backward FLOPs spent fitting it (ledger formula)

    @property
    def cfg(self):
        return self.net.cfg

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.score(self.net.hidden_states(ids)).squeeze(-1).float()


def _encode(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """Token ids of the text and the token index where each label is read (the last token of
    the text up to each end)."""
    ids = tokenizer.encode_prompt(example.text)
    at = [len(tokenizer.encode_prompt(example.text[:e])) - 1 for e in example.ends]
    return ids, [min(a, len(ids) - 1) for a in at]


def _batch(rows: Sequence[list[int]], device) -> torch.Tensor:
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r)
    return ids.to(device)


def train_reward_model(policy, examples: Sequence[Example], *, steps: int = 300, batch: int = 16,
                       lr: float = 1e-3, seed: int = 0, log=None) -> RewardModel:
    """Fit a reward model (started from a copy of the policy's weights) to ``examples``."""
    if not examples:
        raise ValueError("no training examples for the reward model")
    torch.manual_seed(seed)
    rm = RewardModel(copy.deepcopy(policy.model)).train()
    device = next(rm.parameters()).device
    encoded = [_encode(policy.tokenizer, e) + (e.labels,) for e in examples]
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    for step in range(steps):
        chunk = rng.sample(encoded, min(batch, len(encoded)))
        ids = _batch([c[0] for c in chunk], device)
        rows = torch.tensor([i for i, c in enumerate(chunk) for _ in c[1]], device=device)
        cols = torch.tensor([a for c in chunk for a in c[1]], device=device)
        target = torch.tensor([y for c in chunk for y in c[2]], device=device)
        loss = F.binary_cross_entropy_with_logits(rm(ids)[rows, cols], target)
        rm.train_flops += ids.numel() * flops_per_token(rm.net, ids.shape[1])["train"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log and (step + 1) % 50 == 0:
            log(f"reward model step {step + 1}/{steps}: loss {loss.item():.4f}")
    return rm.eval()


class RewardScorer:
    """A trained reward model as a scorer: ``scorer(prompt, texts) -> probabilities`` read at
    each text's last token; counts scorer tokens and forward FLOPs."""

    def __init__(self, rm: RewardModel, tokenizer, kind: str, batch: int = 64):
        self.rm, self.tokenizer, self.kind, self.batch = rm, tokenizer, kind, batch
        self.compute = Compute()

    @torch.no_grad()
    def __call__(self, prompt: str, texts: Sequence[str]) -> list[float]:
        device = next(self.rm.parameters()).device
        out = []
        for i in range(0, len(texts), self.batch):
            limit = self.rm.cfg.max_seq_len  # longer texts keep their end, where the score is read
            rows = [self.tokenizer.encode_prompt(prompt + t)[-limit:] for t in texts[i:i + self.batch]]
            logits = self.rm(_batch(rows, device))
            last = torch.tensor([len(r) - 1 for r in rows], device=device)
            out += torch.sigmoid(logits[torch.arange(len(rows), device=device), last]).tolist()
            for r in rows:
                self.compute.scorer_tokens += len(r)
                self.compute.scorer_flops += generation_flops(self.rm.net, len(r), [])
        return out


def ranking_auc(scorer, policy, task, problems: int = 30, samples: int = 16,
                max_new_tokens: int = 64, temperature: float = 0.8, seed: int = 1) -> dict:
    """How well a scorer ranks the policy's own answers on held-out (test-split) problems:
    the ROC AUC of its scores of right (reward 1) against wrong samples, over all pairs
    (0.5: chance; ties count half). None when either class is empty."""
    right, wrong = [], []
    for k, p in enumerate(task.problems("test", problems)):
        comps = policy.sample([p.prompt], samples, max_new_tokens=max_new_tokens,
                              temperature=temperature, seed=seed + k)[0]
        for s, r in zip(scorer(p.prompt, comps), task.reward([p.prompt] * samples, comps)):
            (right if r == 1.0 else wrong).append(s)
    auc = None
    if right and wrong:
        w = sorted(wrong)
        below = (bisect.bisect_left(w, s) + 0.5 * (bisect.bisect_right(w, s) - bisect.bisect_left(w, s))
                 for s in right)  # wrong samples scored lower, ties half
        auc = sum(below) / (len(right) * len(wrong))
    return {"auc": auc, "right": len(right), "wrong": len(wrong)}


# ------------------------------------------------------------------------------ files


def save_reward_model(rm: RewardModel, tokenizer, config, out, info: dict) -> Path:
    out = Path(out)
    state = {**model_state(rm.net), "score.weight": rm.score.weight.detach().cpu().contiguous(),
             "score.bias": rm.score.bias.detach().cpu().contiguous()}
    with atomic_folder(out, replace=True) as tmp:
        save_json(config, tmp / "config.json")
        tokenizer.save(tmp / "tokenizer")
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "reward.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def load_reward_model(path, device: str = "cpu") -> RewardScorer:
    """A reward model folder as a scorer. Weights via safetensors only; every tensor checked."""
    path = Path(path)
    if not (path / "reward.json").exists():
        raise FileNotFoundError(f"{path} is not a reward model folder (no reward.json)")
    info = json.loads((path / "reward.json").read_text())
    if info.get("kind") not in KINDS:
        raise ValueError(f"{path}/reward.json: kind {info.get('kind')!r} is not one of {KINDS}")
    cfg = from_dict(json.loads((path / "config.json").read_text()))
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise ValueError(f"cannot read {path / 'model.safetensors'}: {e}") from None
    head = {k: state.pop(k, None) for k in ("score.weight", "score.bias")}
    if any(v is None for v in head.values()):
        raise ValueError(f"{path / 'model.safetensors'} has no score head (score.weight, score.bias)")
    rm = RewardModel(build_model(cfg.model))
    load_model_state(rm.net, state)
    if head["score.weight"].shape != rm.score.weight.shape:
        raise ValueError(f"score.weight has shape {tuple(head['score.weight'].shape)}, "
                         f"expected {tuple(rm.score.weight.shape)}")
    rm.score.load_state_dict({"weight": head["score.weight"], "bias": head["score.bias"]})
    return RewardScorer(rm.to(device).eval(), load_tokenizer(path / "tokenizer"), info["kind"])


def train_reward(policy_path, kind: str, task, out, *, problems: int = 200, samples: int = 4,
                 rollouts: int = 4, steps: int = 300, lr: float = 1e-3, max_new_tokens: int = 64,
                 seed: int = 0, log=print) -> dict:
    """``keenlm train-reward``: label the policy's rollouts, fit, save; returns reward.json."""
    km = load_any(Path(policy_path))
    policy = Policy(km.net, km.tokenizer)
    t0 = time.perf_counter()
    examples = rollout_examples(policy, task, kind, problems, samples, rollouts,
                                max_new_tokens=max_new_tokens, seed=seed, log=log)
    labels = [y for e in examples for y in e.labels]
    t1 = time.perf_counter()
    rm = train_reward_model(policy, examples, steps=steps, lr=lr, seed=seed, log=log)
    info = {"kind": kind, "task": task.name, "policy": str(policy_path), "examples": len(examples),
            "labels": len(labels), "positive_share": sum(labels) / max(1, len(labels)),
            "rollouts": rollouts if kind == "prm" else 0, "steps": steps,
            "label_seconds": t1 - t0, "train_seconds": time.perf_counter() - t1,
            "train_flops": rm.train_flops,
            "label_compute": dataclasses.asdict(policy.compute)}
    save_reward_model(rm, km.tokenizer, km.config, out, info)
    return info


__all__ = ["Example", "KINDS", "RewardModel", "RewardScorer", "load_reward_model",
           "mc_step_labels", "ranking_auc", "rollout_examples", "save_reward_model", "step_ends", "train_reward",
           "train_reward_model"]
