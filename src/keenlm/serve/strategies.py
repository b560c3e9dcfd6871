"""Test-time compute as a request option: keenlm.infer.search's strategies, sampling through the
server's scheduler.

``ServedPolicy`` is the ``Policy`` of keenlm.infer.search (``sample(prefixes, n, ...)``) whose
samples are requests to the running scheduler: the ``n`` samples of one prefix are one request
(the prefix prefilled once, its keys and values copied into ``n`` slots) and decode in the same
batches as every other client's requests. So majority vote, best-of-N, beam search, DVTS and
budget forcing run unchanged inside the server, and the prompt is never sent N times.

A request names ``strategy`` (a key of ``search.STRATEGIES``), optionally ``task`` (a keenlm
task: its answer key compares votes, its verifier can score) and ``scorer``: ``verifier`` (the
task's exact reward) or ``reward_model`` (the reward model the server loaded at start-up,
``keenlm serve --reward-model DIR``); by default the reward model when there is one, else the
task's verifier. Requests share the one reward model and take turns on it (``SharedScorer``);
each counts its own scorer tokens and FLOPs. As in keenlm.infer.search, answers are read from
``<answer>...</answer>`` tags.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Optional, Sequence

from keenlm.data.tasks import extract_answer, get_task
from keenlm.infer import search
from keenlm.ledger import generation_flops
from keenlm.serve.scheduler import Request, Scheduler


class ServedPolicy(search.Policy):
    """Samples through ``sched`` (call from a worker thread: it waits for the scheduler)."""

    def __init__(self, sched: Scheduler, timeout: float = 600.0):
        super().__init__(sched.model, sched.tokenizer)
        self.sched, self.timeout = sched, timeout
        self.samples: list[str] = []  # every completion produced, in order

    def sample(self, prefixes: Sequence[str], n: int, *, max_new_tokens: int, temperature: float,
               seed: int, stop: Sequence[str] = (search.ANSWER_CLOSE,)) -> list[list[str]]:
        tok, results = self.tokenizer, []
        waits = []
        for k, prefix in enumerate(prefixes):
            ids = tok.encode_prompt(prefix)
            room = self.sched.max_len - len(ids) - 1
            if room < 1:
                results.append(None)
                continue
            outs, done, left = [[] for _ in range(n)], threading.Event(), [n]

            def on(i, t, f, lp=None, outs=outs, done=done, left=left):
                if t is not None:
                    outs[i].append(t)
                if f is not None:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
            req = Request(prompt=ids, max_tokens=min(max_new_tokens, room), temperature=temperature,
                          n=n, seed=seed + 1000 * k, stop=tuple(stop), on_event=on)
            self.sched.submit(req)
            results.append((ids, outs))
            waits.append((req, done))
        for req, done in waits:  # every prefix was queued first: they decode together
            if not done.wait(self.timeout):
                req.cancelled = True
                raise TimeoutError(f"the strategy's samples took more than {self.timeout:.0f} s")
        texts = []
        for r in results:
            if r is None:
                texts.append([""] * n)
                continue
            ids, outs = r
            got = [search.cut_after(tok.decode(o), stop)[0] for o in outs]
            self.samples += got
            self.compute.policy_prefill += len(ids)
            self.compute.policy_tokens += sum(len(o) for o in outs)
            self.compute.policy_flops += generation_flops(self.model, len(ids), [len(o) for o in outs])
            texts.append(got)
        return texts


class SharedScorer:
    """A reward model (keenlm.infer.reward.RewardScorer) that every request uses: one call at a
    time; ``for_request()`` gives a scorer that counts only its own request's compute."""

    def __init__(self, scorer):
        self.scorer, self.lock = scorer, threading.Lock()

    def for_request(self) -> "_RequestScorer":
        return _RequestScorer(self)


class _RequestScorer:
    def __init__(self, shared: SharedScorer):
        self.shared, self.compute = shared, search.Compute()

    def __call__(self, prompt: str, texts: Sequence[str]) -> list[float]:
        inner = self.shared.scorer
        with self.shared.lock:
            before = dataclasses.replace(inner.compute)
            out = inner(prompt, texts)
            spent = inner.compute - before
        self.compute.scorer_tokens += spent.scorer_tokens
        self.compute.scorer_flops += spent.scorer_flops
        return out


SCORERS = ("verifier", "reward_model")


def pick_scorer(kind: Optional[str], task, reward: Optional[SharedScorer]):
    """The request's scorer (see the module docstring); ValueError naming what is missing."""
    if kind is not None and kind not in SCORERS:
        raise ValueError(f"scorer {kind!r}: one of {', '.join(SCORERS)}")
    if kind == "reward_model" or (kind is None and reward is not None):
        if reward is None:
            raise ValueError("scorer reward_model: this server has no reward model "
                             "(keenlm serve --reward-model DIR)")
        return reward.for_request()
    if kind == "verifier" and task is None:
        raise ValueError("scorer verifier: name the task whose verifier scores (task)")
    return search.verifier(task) if task is not None else None


def run_strategy(sched: Scheduler, name: str, prompt: str, budget: search.Budget,
                 task: Optional[str] = None, scorer: Optional[str] = None,
                 reward: Optional[SharedScorer] = None) -> dict:
    """Run ``name`` on ``prompt``; the chosen completion and what it took (the response's
    ``keenlm`` field). The candidates' scores are the scorer's (a reward model scores them
    once more for the listing, and that compute is counted too)."""
    if name not in search.STRATEGIES:
        raise ValueError(f"strategy {name!r}: one of {', '.join(search.STRATEGIES)}")
    t = get_task(task) if task else None
    scorer_fn = pick_scorer(scorer, t, reward)
    key = t.answer_key if t is not None else search.text_key
    policy = ServedPolicy(sched)
    result = search.STRATEGIES[name](policy, scorer_fn, prompt, budget, key=key)
    answers = [extract_answer(c) for c in policy.samples]
    keys = [None if a is None else key(prompt, a) for a in answers]  # what the votes compare
    listed = getattr(scorer_fn, "compute", search.Compute())
    before = dataclasses.replace(listed)
    scores = scorer_fn(prompt, policy.samples) if scorer_fn is not None and policy.samples else None
    c = result.compute
    c.scorer_tokens += listed.scorer_tokens - before.scorer_tokens
    c.scorer_flops += listed.scorer_flops - before.scorer_flops
    return {
        "completion": result.completion, "answer": result.answer, "score": result.score,
        "strategy": name, "task": task,
        "scorer": None if scorer_fn is None else ("reward_model" if isinstance(
            scorer_fn, _RequestScorer) else "verifier"),
        "candidates": [{"text": s, "answer": a, "score": None if scores is None else scores[i],
                        "votes": sum(k is not None and k == other for other in keys)}
                       for i, (s, a, k) in enumerate(zip(policy.samples, answers, keys))],
        "compute": {"policy_tokens": c.policy_tokens, "policy_prefill_tokens": c.policy_prefill,
                    "policy_flops": c.policy_flops, "scorer_tokens": c.scorer_tokens,
                    "scorer_flops": c.scorer_flops},
    }
