"""Reward models: Monte-Carlo step labels against an exhaustive count, training, files."""

import math

import pytest
import torch

from keenlm.data.tokenizer import ByteTokenizer
from keenlm.infer.reward import (Example, load_reward_model, mc_step_labels, save_reward_model,
                                 step_ends, train_reward_model)
from keenlm.infer.search import Policy

DEPTH = 3  # steps of the toy task: each step writes 0 or 1; right when exactly two are 1


def toy_reward(prompts, completions):
    return [1.0 if c.count("1\n") == 2 and "</answer>" in c else 0.0 for c in completions]


class Enumerating(Policy):
    """From a prefix with j steps written, sample i spells the remaining steps as the bits of i:
    2**DEPTH samples cover every continuation equally often (the policy is uniform)."""

    def __init__(self):
        super().__init__(None, ByteTokenizer())

    def sample(self, prefixes, n, *, max_new_tokens, temperature, seed, stop=("</answer>",)):
        out = []
        for p in prefixes:
            rest = DEPTH - p.count("\n")
            conts = []
            for i in range(n):
                steps = "".join(f"{(i >> b) & 1}\n" for b in range(rest))
                ones = (p + steps).count("1\n")
                conts.append(steps + f"<answer>{ones}</answer>")
            out.append(conts)
        return out


def test_step_ends():
    assert step_ends("a\nbb\n<answer>1</answer>") == [2, 5, 23]
    assert step_ends("a\n") == [2] and step_ends("x") == [1]


def test_monte_carlo_step_labels_match_an_exhaustive_count():
    pol = Enumerating()
    completion = "1\n0\n1\n<answer>2</answer>"
    labels = mc_step_labels(pol, toy_reward, "Q:", completion, rollouts=2 ** DEPTH)
    # exhaustive: after j steps with o ones, P(exactly two ones at the end) = C(r, 2-o) / 2^r
    expected = []
    for j, ones in ((1, 1), (2, 1), (3, 2)):
        r = DEPTH - j
        expected.append(math.comb(r, 2 - ones) / 2 ** r if 0 <= 2 - ones <= r else 0.0)
    assert labels == expected + [1.0]  # the last step: the completion's own correctness
    assert mc_step_labels(pol, toy_reward, "Q:", "0\n0\n1\n<answer>1</answer>", 2 ** DEPTH) == [
        math.comb(2, 2) / 4, 0.0, 0.0, 0.0]


def _tiny():
    from keenlm.config import from_dict
    from keenlm.model import build_model
    from keenlm.presets import resolve

    torch.manual_seed(0)
    tok = ByteTokenizer()
    cfg = resolve(from_dict({"model": {"n_layer": 1, "d_model": 64, "n_head": 1, "max_seq_len": 128},
                             "train": {"seq_len": 64}}), tok.vocab_size)
    return Policy(build_model(cfg.model), tok), cfg


def test_reward_model_learns_labels_and_round_trips(tmp_path):
    from keenlm.infer.reward import RewardScorer

    pol, cfg = _tiny()
    examples = [Example(f"Q{q}:<answer>{a}</answer>", (len(f"Q{q}:<answer>{a}</answer>"),),
                        (float(a == 1),)) for q in range(6) for a in range(3)]
    # a process example: labels read at two positions of one text
    examples.append(Example("Q9:1\n0\n", (5, 7), (1.0, 0.0)))
    rm = train_reward_model(pol, examples, steps=120, batch=8, lr=3e-3)
    scorer = RewardScorer(rm, pol.tokenizer, "orm")
    right = scorer("Q4:", ["<answer>1</answer>"])[0]
    wrong = scorer("Q4:", ["<answer>2</answer>"])[0]
    assert right > 0.5 > wrong
    assert scorer.compute.scorer_tokens == 2 * len("Q4:<answer>1</answer>") and scorer.compute.scorer_flops > 0
    out = save_reward_model(rm, pol.tokenizer, cfg, tmp_path / "rm", {"kind": "orm", "task": "toy"})
    again = load_reward_model(out)
    assert again("Q4:", ["<answer>1</answer>", "<answer>2</answer>"]) == pytest.approx([right, wrong], abs=1e-6)
    # a truncated weights file is an error naming it, never a half-loaded model
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_reward_model(out)
    with pytest.raises(FileNotFoundError, match="reward model"):
        load_reward_model(tmp_path)


def test_rollout_examples_from_a_real_policy():
    from keenlm.data.tasks import get_task
    from keenlm.infer.reward import rollout_examples

    pol, _ = _tiny()
    task = get_task("addition", 2, scratchpad=True)
    orm = rollout_examples(pol, task, "orm", problems=3, samples=2, max_new_tokens=12)
    assert len(orm) == 6 and all(len(e.labels) == 1 and e.ends[0] == len(e.text) for e in orm)
    prm = rollout_examples(pol, task, "prm", problems=2, samples=2, rollouts=2, max_new_tokens=12)
    for e in prm:
        assert len(e.ends) == len(e.labels) and all(0.0 <= y <= 1.0 for y in e.labels)
        assert list(e.ends) == sorted(e.ends) and e.ends[-1] == len(e.text)
    with pytest.raises(ValueError, match="kind"):
        rollout_examples(pol, task, "dpo")


def test_ranking_auc_of_a_perfect_an_inverted_and_a_blind_scorer():
    from keenlm.data.tasks import get_task
    from keenlm.infer.reward import ranking_auc
    from keenlm.infer.search import verifier

    task = get_task("addition", 1)

    class Alternating:  # half right, half wrong answers to each prompt
        def sample(self, prefixes, n, **kw):
            import re
            out = []
            for p in prefixes:
                a, b = map(int, re.search(r"(\d+) \+ (\d+)", p).groups())
                out.append([f"<answer>{a + b + (k % 2)}</answer>" for k in range(n)])
            return out

    right = verifier(task)
    res = ranking_auc(right, Alternating(), task, problems=5, samples=4)
    assert res == {"auc": 1.0, "right": 10, "wrong": 10}
    inverted = lambda prompt, comps: [-s for s in right(prompt, comps)]  # noqa: E731
    assert ranking_auc(inverted, Alternating(), task, problems=5, samples=4)["auc"] == 0.0
    blind = lambda prompt, comps: [0.3] * len(comps)  # noqa: E731
    assert ranking_auc(blind, Alternating(), task, problems=5, samples=4)["auc"] == 0.5
