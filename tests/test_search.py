"""Test-time strategies: right choices on scripted policies, greedy equivalence, exact budgets,
compute accounting."""

import pytest
import torch

from keenlm.data.tokenizer import ByteTokenizer
from keenlm.infer.search import (Budget, Policy, beam_search, best_of_n, budget_forcing, dvts,
                                 majority_vote, verifier, weighted_majority)


class Scripted(Policy):
    """A policy whose continuations are a function of (prefix, sample index): known answers."""

    def __init__(self, fn):
        super().__init__(None, ByteTokenizer())
        self.fn, self.calls = fn, []

    def sample(self, prefixes, n, *, max_new_tokens, temperature, seed, stop=("</answer>",)):
        self.calls.append((list(prefixes), n, max_new_tokens, tuple(stop)))
        out = []
        for p in prefixes:
            texts = []
            for i in range(n):
                t = self.fn(p, i)[:max_new_tokens]  # byte tokens: one character each
                hits = [t.find(s) + len(s) for s in stop if s in t]
                texts.append(t[:min(hits)] if hits else t)
                self.compute.policy_tokens += len(texts[-1])
            out.append(texts)
        return out


def answers(*values):
    return lambda prefix, i: f"<answer>{values[i % len(values)]}</answer>"


def test_majority_weighted_and_best_of_n_choose_right():
    pol = Scripted(answers(3, 5, 7, 5, "x"))
    b = Budget(n=5)
    assert majority_vote(pol, None, "Q", b).answer == "5"
    # a scorer that trusts 7 outweighs two votes for 5; equal weights give the majority's choice
    favour7 = lambda prompt, comps: [10.0 if "7" in c else 1.0 for c in comps]  # noqa: E731
    assert weighted_majority(pol, favour7, "Q", b).answer == "7"
    flat = lambda prompt, comps: [0.5] * len(comps)  # noqa: E731
    for scorer in (flat, None):
        assert weighted_majority(pol, scorer, "Q", b).completion == majority_vote(pol, None, "Q", b).completion
    # best-of-n with an exact verifier finds the one right answer among wrong ones
    from keenlm.data.tasks import get_task

    task = get_task("addition", 1)
    prompt = "What is 3 + 4? Answer inside <answer></answer>.\n"
    pol = Scripted(answers(6, 8, 7, 9))
    r = best_of_n(pol, verifier(task), prompt, Budget(n=4))
    assert r.answer == "7" and r.score == 1.0 and r.candidates == 4
    with pytest.raises(ValueError, match="scorer"):
        best_of_n(pol, None, prompt, Budget(n=4))


def _steps_policy(prefix, i):
    """Two steps, then an answer: the answer is 1 on the path that took 'good' both times."""
    done = prefix.count("\n")
    if done < 2:
        return ("good" if i == 1 else f"bad{i}") + "\n"
    return "<answer>1</answer>" if prefix.count("good") == 2 else "<answer>0</answer>"


def _prm(prompt, partials):  # a process scorer: the share of good steps
    return [p.count("good") / max(1, p.count("\n")) if p else 0.0 for p in partials]


def test_beam_search_and_dvts_follow_the_process_scorer():
    b = Budget(width=2, expand=3, max_steps=5, n=6)
    pol = Scripted(_steps_policy)
    r = beam_search(pol, _prm, "Q:", b)
    assert r.answer == "1" and r.completion.startswith("good\ngood\n")
    assert all(n == 3 for _, n, _, _ in pol.calls) and len(pol.calls[1][0]) == 2  # width 2 kept
    assert len(pol.calls[0][0]) == 2  # the first step, too, samples width x expand candidates
    pol = Scripted(_steps_policy)
    r = dvts(pol, _prm, "Q:", b)
    assert r.answer == "1" and len(pol.calls[0][0]) == 2  # 6 // 3 = 2 independent subtrees


def test_beam_search_of_width_one_and_one_expansion_is_greedy():
    from keenlm.api import KeenModel
    from keenlm.config import GenerateConfig, from_dict
    from keenlm.infer import generate_tokens
    from keenlm.model import build_model
    from keenlm.presets import resolve

    torch.manual_seed(0)
    tok = ByteTokenizer()
    cfg = resolve(from_dict({"model": {"n_layer": 2, "d_model": 64, "n_head": 2, "max_seq_len": 256},
                             "train": {"seq_len": 128}}), tok.vocab_size)
    km = KeenModel(build_model(cfg.model), tok, cfg, None)
    pol = Policy(km.net, tok)
    prompt = "Count: 1\n2\n"
    b = Budget(width=1, expand=1, max_steps=6, max_new_tokens=12, temperature=0, step=" ")
    r = beam_search(pol, None, prompt, b)
    greedy = tok.decode(generate_tokens(km.net, [tok.encode_prompt(prompt)],
                                        GenerateConfig(max_new_tokens=72, temperature=0))[0])
    assert r.completion and greedy.startswith(r.completion)
    # the compute is counted: the prefixes prefilled, the tokens generated, their FLOPs
    assert r.compute.policy_tokens == len(tok.encode(r.completion))
    assert r.compute.policy_flops > 2 * r.compute.policy_tokens * 64 * 64


def test_budget_forcing_caps_and_extends_exactly():
    # a policy that wants to answer at once: thinking is extended with the cue until long enough
    def eager(prefix, i):
        return "42</answer>" if prefix.endswith("<answer>") else "<answer>42</answer>"

    pol = Scripted(eager)
    r = budget_forcing(pol, None, "Q", Budget(min_think=10, cue="Wait", temperature=0))
    assert r.cues == 3 and r.thinking_tokens == 12 and r.completion == "WaitWaitWait<answer>42</answer>"
    # a policy that would think forever: cut at exactly max_think tokens, then made to answer
    pol = Scripted(lambda prefix, i: "1</answer>" if prefix.endswith("<answer>") else "hmm " * 100)
    r = budget_forcing(pol, None, "Q", Budget(max_think=17, temperature=0))
    assert r.thinking_tokens == 17 and r.completion == ("hmm " * 5)[:17] + "<answer>1</answer>"
    # both bounds: thinking that stops at 5 tokens, min 8, max 9: one cue (5 + 4), no cut
    def short(prefix, i):
        if prefix.endswith("<answer>"):
            return "1</answer>"
        return "abcde<answer>1</answer>" if "Wait" not in prefix else "<answer>1</answer>"

    pol = Scripted(short)
    r = budget_forcing(pol, None, "Q", Budget(min_think=8, max_think=9, temperature=0))
    assert r.thinking_tokens == 9 and r.cues == 1 and r.answer == "1"
    with pytest.raises(ValueError, match="min_think"):
        Budget(min_think=10, max_think=5)


def test_generation_flops_count_matmuls_and_attention():
    from keenlm.ledger import generation_flops, matmul_params
    from keenlm.config import ModelConfig
    from keenlm.model import build_model

    m = build_model(ModelConfig(vocab_size=50, n_layer=2, d_model=32, n_head=2, d_ff=64, max_seq_len=64))
    lin, per_key = 2 * matmul_params(m), 2 * 4 * 2 * 16
    # prefill of 3 tokens sees 1+2+3 keys; two samples of 2 and 1 tokens see 4+5 and 4 keys
    expected = 3 * lin + per_key * 6 + 2 * lin + per_key * 9 + 1 * lin + per_key * 4
    assert generation_flops(m, 3, [2, 1]) == expected


def test_sweep_curves_and_compute_optimal_choice():
    import re

    from keenlm.data.tasks import get_task
    from keenlm.infer.search import verifier
    from keenlm.infer.sweep import choose, curves, sweep

    def answer(prefix, i):  # right on samples 1, 4, 7, ...; otherwise always the same wrong sum
        a, b = map(int, re.search(r"(\d+) \+ (\d+)", prefix).groups())
        return f"<answer>{a + b if i % 3 == 1 else a + b + 1}</answer>"

    class Costed(Scripted):
        def sample(self, prefixes, n, **kw):
            out = super().sample(prefixes, n, **kw)
            self.compute.policy_flops = float(self.compute.policy_tokens)  # 1 FLOP per token
            return out

    task = get_task("addition", 2)
    res = sweep(Costed(answer), verifier(task), task, ["majority", "best_of_n"], [1, 4], n_problems=5)
    assert set(res["bins"]) == {1}  # 3 of 8 samples right: pass rate 0.375
    c = curves(res)
    acc = {(k, p["n"]): p["accuracy"] for k, pts in c.items() for p in pts}
    assert acc == {("majority", 1): 0.0, ("majority", 4): 0.0, ("best_of_n", 1): 0.0,
                   ("best_of_n", 4): 1.0}
    big = choose(res, flops_budget=1e9)
    assert (big["strategy"], big["n"]) == ("best_of_n", 4)
    one = c["majority"][0]["flops"]
    small = choose(res, flops_budget=one)  # only N = 1 fits: accuracy 0, the cheaper first
    assert small["n"] == 1 and small["accuracy"] == 0.0
    assert choose(res, flops_budget=0.5) is None and curves(res, bin=0) == {}
    with pytest.raises(ValueError, match="scorer"):
        sweep(Costed(answer), None, task, ["best_of_n"], [1], n_problems=1)


def test_solve_and_train_reward_commands(tmp_path, capsys):
    import json

    from keenlm.cli import main
    from keenlm.config import from_dict, save_json
    from keenlm.model import build_model, model_state
    from keenlm.presets import resolve
    from keenlm.runs import save_checkpoint

    torch.manual_seed(0)
    tok = ByteTokenizer()
    cfg = resolve(from_dict({"model": {"n_layer": 1, "d_model": 64, "n_head": 1, "max_seq_len": 256},
                             "train": {"seq_len": 64}}), tok.vocab_size)
    src = tmp_path / "policy"
    src.mkdir()
    save_json(cfg, src / "config.json")
    tok.save(src / "tokenizer")
    save_checkpoint(src, 1, model_state(build_model(cfg.model)), {"step": 1})
    common = ["--task", "addition", "--difficulty", "1", "--scratchpad", "--max-new-tokens", "6"]
    assert main(["solve", str(src), *common, "--strategy", "majority,best_of_n", "--n", "1,2",
                 "--scorer", "verifier", "--problems", "3", "--out", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert "| best_of_n | 2 |" in out and "| majority | 1 |" in out
    res = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert len(res["rows"]) == 2 * 2 * 3 and all(r["policy_flops"] > 0 for r in res["rows"])
    assert (tmp_path / "sweep" / "accuracy_vs_flops.svg").exists()
    assert main(["train-reward", str(src), "--kind", "prm", *common, "--problems", "2",
                 "--samples", "2", "--rollouts", "2", "--steps", "3", "--out", str(tmp_path / "prm")]) == 0
    assert "prm on 4 rollouts" in capsys.readouterr().out
    assert main(["solve", str(src), *common, "--strategy", "beam", "--n", "2", "--expand", "2",
                 "--max-steps", "2", "--scorer", str(tmp_path / "prm"), "--problems", "2"]) == 0
    out = capsys.readouterr().out
    assert "| beam | 2 |" in out and "reward model" in out  # its ranking is rated first
    assert main(["solve", str(src), *common, "--strategy", "dvts", "--problems", "1"]) == 2
    assert "scorer" in capsys.readouterr().err
    # the planner: two candidate policies calibrated, one choice within the budget
    plan = ["--task", "addition", "--difficulty", "2", "--max-new-tokens", "6", "--problems", "3",
            "--samples", "2"]
    assert main(["solve", str(src), str(src), *plan, "--plan", "1e12"]) == 0
    out = capsys.readouterr().out
    assert "within 1e+12 FLOPs per query:" in out and "predicted accuracy" in out
    assert main(["solve", str(src), *plan, "--plan", "10"]) == 1  # nothing fits
    assert "nothing fits" in capsys.readouterr().out
    assert main(["solve", str(src), str(src), *plan]) == 2  # several policies need --plan


def test_tts_study_runs_end_to_end_and_continues_where_it_stopped(tmp_path):
    from keenlm.studies import tts as study

    kw = dict(task="addition", difficulty=2, small="64x1", large="64x2", sft_steps=4, ns=(1, 2),
              eval_n=2, rm_problems=1, rm_steps=2, auc_problems=2, max_new_tokens=24,
              log=lambda s: None)
    r = study.tts(tmp_path / "s", **kw)
    assert r["param_ratio"] > 1 and set(r["curves"]) == {"majority", "weighted_majority",
                                                          "best_of_n", "beam", "dvts",
                                                          "best_of_n_verifier"}
    assert r["best"]["strategy"] != "best_of_n_verifier"  # the oracle is a bound, not a result
    assert r["flops_small_total"] > r["small"]["train_flops"] > 0
    assert (tmp_path / "s" / "results.md").exists() and (tmp_path / "s" / "accuracy_vs_flops.svg").exists()
    # a second call reuses the warm-ups, reward models and sweeps, and adds the large policy's
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").glob("sweep-small-*.json")}
    r2 = study.tts(tmp_path / "s", **kw, sweep_large=True)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").glob("sweep-small-*.json")} == stamps
    assert r2["curves"] == r["curves"] and r2["small"]["train_flops"] == r["small"]["train_flops"]
    assert set(r2["by_difficulty_bin"]) == {"small", "large"} and "large_curves" in r2
    held = r2["large_reward_models"]["orm"]["held_out"]
    assert held["right"] + held["wrong"] == 2 * 16
    assert (tmp_path / "s" / "large-prm" / "reward.json").exists()
    with pytest.raises(ValueError, match="another output folder"):
        study.tts(tmp_path / "s", **{**kw, "ns": (1, 4)})


def test_tts_study_flags_a_reward_model_that_ranks_below_chance_and_does_not_count_it():
    from keenlm.studies.tts import _compare, _table

    def rows(strategy, right_of):
        return [{"strategy": strategy, "n": 4, "problem": k, "bin": 0, "right": right_of(k),
                 "policy_flops": 10.0, "scorer_flops": 1.0, "policy_tokens": 5}
                for k in range(10)]

    rms = {"orm": {"held_out": {"auc": 0.3, "right": 5, "wrong": 9}, "label_compute":
                   {"policy_flops": 0.0}, "train_flops": 0.0},
           "prm": {"held_out": {"auc": 0.7, "right": 5, "wrong": 9}, "label_compute":
                   {"policy_flops": 0.0}, "train_flops": 0.0}}
    right = {"majority": 3, "weighted_majority": 8, "best_of_n": 9, "beam": 2, "dvts": 2,
             "best_of_n_verifier": 10}  # right answers of 10 per strategy
    swept = {"small": {"rows": [r for s, c in right.items() for r in rows(s, lambda k: k < c)],
                       "strategies": list(right), "ns": [4], "bins": [0] * 10,
                       "reward_models": rms}}
    side = {"size": "64x1", "params": 10, "train_flops": 1.0,
            "greedy": {"accuracy": 0.2, "flops_per_problem": 1.0}}
    res = _compare("t", 10, {"small": side, "large": {**side, "params": 100}}, swept)
    assert res["below_chance_reward_models"] == ["orm"]
    assert res["best"]["strategy"] == "majority" and res["best"]["accuracy"] == 0.3
    assert "**below chance**: ORM" in _table(res)
