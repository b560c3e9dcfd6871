"""Scoring a policy on a verifiable task (keenlm.data.tasks): greedy pass@1, and with samples
pass@k (the unbiased estimator) and maj@k (self-consistency), on the task's held-out split.

The tasks, their problems and their exact rewards live in keenlm.data.tasks; this module
generates the answers, so it sits in the inference layer.
"""
from __future__ import annotations

from keenlm.config import GenerateConfig
from keenlm.data.tasks import Task, extract_answer, majority, pass_at_k
from keenlm.infer.generate import generate


def complete(model, tokenizer, prompts: list[str], *, temperature: float = 0.0,
             max_new_tokens: int = 64, seed: int = 0, batch: int = 64,
             repeat: int = 1) -> list[str]:
    """Task completions, about ``batch`` rows per generate call, each ending at its answer tag
    (the closing tag is kept, so rewards can check the format). ``repeat``: that many samples
    of each prompt (consecutive rows), each prompt prefilled once."""
    out = []
    step = max(1, batch // repeat)  # prompts per call
    for i in range(0, len(prompts), step):
        cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                             stop=("</answer>",), seed=seed + i * repeat)
        out += generate(model, tokenizer, prompts[i:i + step], cfg, repeat=repeat)
    return [c + "</answer>" if "<answer>" in c and "</answer>" not in c else c for c in out]


def evaluate_policy(model, tokenizer, task: Task, n: int = 100, max_new_tokens: int = 64,
                    batch: int = 64, problems: list | None = None) -> dict:
    """Greedy answers to the first ``n`` test problems (or to ``problems``, e.g. a validation
    split): success rate (reward 1 = pass@1), format rate (an answer tag), mean reward."""
    problems = task.problems("test", n) if problems is None else problems
    n = len(problems)
    prompts = [p.prompt for p in problems]
    rewards = task.reward(prompts, complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                            batch=batch))
    return {"success": sum(r == 1.0 for r in rewards) / n, "format": sum(r > 0 for r in rewards) / n,
            "reward": sum(rewards) / n, "n": n}


def evaluate_task(model, tokenizer, task: Task, n: int = 100, samples: int = 0,
                  ks: tuple[int, ...] = (1, 4, 8), temperature: float = 1.0,
                  max_new_tokens: int = 64, seed: int = 0, batch: int = 64) -> dict:
    """Held-out evaluation on the first ``n`` test problems: greedy pass@1 always; with
    ``samples`` > 0, that many sampled answers per problem give pass@k (unbiased estimator)
    and maj@k (self-consistency: the most frequent answer among the first k samples, by the
    task's answer key, is the one scored) for each k <= samples in ``ks``."""
    out = {"pass@1 greedy": evaluate_policy(model, tokenizer, task, n, max_new_tokens, batch)}
    if samples <= 0:
        return out
    ks = tuple(k for k in ks if k <= samples)
    problems = task.problems("test", n)
    rows = [p.prompt for p in problems for _ in range(samples)]
    comps = complete(model, tokenizer, [p.prompt for p in problems], temperature=temperature,
                     max_new_tokens=max_new_tokens, seed=seed, batch=batch, repeat=samples)
    rewards = task.reward(rows, comps)
    for k in ks:
        pk = mk = 0.0
        for i, p in enumerate(problems):
            rs = rewards[i * samples:(i + 1) * samples]
            pk += pass_at_k(samples, sum(r == 1.0 for r in rs), k)
            answers = [extract_answer(c) for c in comps[i * samples:i * samples + k]]
            win = majority([None if a is None else task.answer_key(p.prompt, a) for a in answers])
            mk += win is not None and rs[win] == 1.0
        out[f"pass@{k}"] = pk / n
        out[f"maj@{k}"] = mk / n
    out.update(n=n, samples=samples, temperature=temperature)
    return out
