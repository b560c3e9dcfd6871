"""An RL run that fails quietly is said to fail: no success signal, coverage falling, a policy
left worse than it started; and the best policy by validation is kept in OUT/best."""

import json

import torch

from keenlm.config import rl_config
from keenlm.train.grpo import RLTrainer
from keenlm.train.rl_watch import Watch

from test_grpo import tiny_policy


def test_watch_warns_once_each_about_no_success_falling_coverage_and_a_worse_end():
    w = Watch(window=4)
    said = []
    for s, c in [(0.3, 0.8)] * 4 + [(0.2, 0.6)] * 3:  # healthy, then a little lower
        said += w.after_step(s, c)
    assert said == []
    for _ in range(6):  # success near zero, coverage below half its start
        said += w.after_step(0.01, 0.2)
    kinds = [k for k, _ in said]
    assert sorted(kinds) == ["coverage", "no_success"]  # each once
    coverage = said[kinds.index("coverage")][1]
    assert "from 0.800" in coverage and "to 0.400" in coverage  # (0.6 + 3 x 0.2) / 4
    # the best evaluation by validation; ties do not replace it
    assert w.evaluated(0, 0.30, 0.31) and not w.evaluated(5, 0.30, 0.40)
    assert w.evaluated(10, 0.35, 0.29) and w.best == {"step": 10, "val_pass@1": 0.35,
                                                       "pass@1": 0.29}
    assert w.at_end({"pass@1": 0.31}, {"pass@1": 0.31}) == []  # not worse: nothing to say
    (kind, text), = w.at_end({"pass@1": 0.31}, {"pass@1": 0.20})
    assert kind == "worse" and "0.310 -> 0.200" in text and "step 10" in text
    # the state survives a checkpoint
    again = Watch(window=4)
    again.load(json.loads(json.dumps(w.state())))
    assert again.state() == w.state() and again.at_end({"pass@1": 1}, {"pass@1": 0}) == []


def test_rl_keeps_the_best_policy_by_validation_and_warns_when_nothing_succeeds(tmp_path):
    import keenlm

    km = tiny_policy(6)
    start = {k: v.clone() for k, v in km.net.state_dict().items()}
    cfg = rl_config(dict(task="addition", difficulty=2, prompts=2, group=4, steps=6,
                         max_new_tokens=4, lr=3e-3, eval_every=3, eval_n=6,
                         out_dir=str(tmp_path / "rl"), progress=False))
    def reward(prompts, comps):  # a partial reward that varies, never a success (1.0)
        return [0.1 if c and c[0].encode()[0] % 2 == 0 else 0.0 for c in comps]

    tr = RLTrainer(km, cfg, reward=reward)
    tr.watch = Watch(window=3)
    val = {p.prompt for p in tr.val_problems}
    assert len(tr.val_problems) == 6 and not val & {p.prompt for p in tr.train_problems}
    test = {p.prompt for p in tr.task.problems("test", 200)}
    assert not val & test
    res = tr.fit()
    recs = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6] and all("val_pass@1" in r for r in evals)
    assert all("coverage" in r for r in recs if r["kind"] == "rl")
    warned = [r for r in recs if r["kind"] == "warning"]
    assert [r["warning"] for r in warned] == ["no_success"] and warned[0]["step"] == 3
    assert res.warnings == [warned[0]["text"]]
    # a random policy never solves a problem: the start stays the best, and best/ holds it
    assert res.best["step"] == 0 and json.loads((tmp_path / "rl" / "best" / "best.json")
                                                .read_text()) == res.best
    best = keenlm.load(tmp_path / "rl" / "best").net.state_dict()
    assert all(torch.equal(best[k], start[k]) for k in start)
    final = keenlm.load(tmp_path / "rl").net.state_dict()
    assert any(not torch.equal(final[k], start[k]) for k in start)  # the run did move
