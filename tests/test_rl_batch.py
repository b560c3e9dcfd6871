"""What an RL step trains on when success is rare: dynamic sampling keeps the informative
groups (rewards that differ within the group), the format reward is dropped once learned; and
both in a real run."""

import json
import random

import pytest

from keenlm.config import rl_config
from keenlm.train.grpo import RLTrainer
from keenlm.train.rl_batch import Drawn, FormatReward, draw_batch, informative

from test_grpo import tiny_policy


def _drawer(g, rng, calls):
    """A stand-in for sampling: each prompt's G rewards drawn at random, the texts naming the
    prompt and row, so the batch can be checked against what was drawn."""
    def draw(chunk, offset):
        calls.append((list(chunk), offset))
        rewards = [rng.choice([0.0, 0.0, 0.0, 0.1, 1.0]) for _ in range(len(chunk) * g)]
        texts = [f"{p}#{j}" for p in chunk for j in range(g)]
        return Drawn(list(chunk), [[i] for i, _ in enumerate(chunk)], [[1]] * len(texts), texts,
                     rewards, list(rewards), gen_flops=float(len(chunk)))
    return draw


def test_informative_groups_are_those_whose_rewards_differ():
    assert informative([0, 0, 1, 1, 0.1, 0], 2) == [False, False, True]


@pytest.mark.parametrize("seed", range(5))
def test_dynamic_sampling_keeps_informative_groups_in_order_and_fills_from_the_first_round(seed):
    g, prompts, rounds = 4, 6, 3
    candidates = [f"p{i}" for i in range(prompts * (rounds + 1))]
    calls = []
    batch, drew = draw_batch(_drawer(g, random.Random(seed), calls), candidates, prompts, g,
                             rounds)
    # rounds are drawn in order, each the next chunk of fresh candidates, and stop once enough
    assert [c for c, _ in calls] == [candidates[r * prompts:(r + 1) * prompts]
                                     for r in range(len(calls))]
    assert [o for _, o in calls] == [r * prompts for r in range(len(calls))]
    everything = drew["all"]
    assert drew["drawn"] == len(everything.prompts) == prompts * len(calls)
    assert everything.gen_flops == drew["drawn"]
    ok = informative(everything.rewards, g)
    kept = [p for p, good in zip(everything.prompts, ok) if good][:prompts]
    assert len(batch.prompts) == prompts and batch.prompts[:len(kept)] == kept
    if len(kept) < prompts:  # rounds spent: the first round's uninformative groups fill the rest
        assert len(calls) == rounds + 1
        first = [p for p, good in zip(everything.prompts[:prompts], ok[:prompts]) if not good]
        assert batch.prompts[len(kept):] == first[:prompts - len(kept)]
    else:
        assert sum(ok[:len(calls) * prompts - prompts]) < prompts  # the last round was needed
    # each kept group arrives whole: its texts, rewards and raw rewards belong to its prompt
    for i, p in enumerate(batch.prompts):
        assert batch.texts[i * g:(i + 1) * g] == [f"{p}#{j}" for j in range(g)]
        j = everything.prompts.index(p)
        assert batch.rewards[i * g:(i + 1) * g] == everything.rewards[j * g:(j + 1) * g]
    assert batch.raw == batch.rewards


def test_without_extra_rounds_the_batch_is_exactly_one_draw():
    calls = []
    draw = _drawer(2, random.Random(0), calls)
    batch, drew = draw_batch(draw, ["a", "b", "c"], 3, 2, 0)
    assert calls == [(["a", "b", "c"], 0)] and drew["drawn"] == 3 and batch is drew["all"]
    with pytest.raises(ValueError, match="candidate prompts"):
        draw_batch(draw, ["a", "b", "c"], 3, 2, 1)


def test_the_format_reward_is_dropped_once_the_format_is_learned():
    f = FormatReward(until=0.75)
    assert f.apply([1.0, 0.1, 0.0]) == [1.0, 0.1, 0.0]
    assert not f.observe(1, [0.1, 0.0, 0.0, 1.0])  # half well formed
    assert f.observe(2, [0.1, 0.1, 0.0, 1.0]) and f.dropped_at == 2
    assert f.apply([1.0, 0.1, 0.0]) == [1.0, 0.0, 0.0]
    assert not f.observe(3, [0.1] * 4)  # once
    assert FormatReward().apply([0.1]) == [0.1] and not FormatReward().observe(1, [0.1])


def test_rl_with_dynamic_sampling_and_the_format_reward_dropped(tmp_path):
    km = tiny_policy(3)
    cfg = rl_config(dict(task="addition", difficulty=2, prompts=2, group=4, steps=4,
                         max_new_tokens=4, lr=3e-3, eval_every=0, eval_n=4, oversample=3,
                         format_reward_until=0.2, out_dir=str(tmp_path / "rl"),
                         progress=False))

    def reward(prompts, comps):  # never right; any non-empty answer "well formed"
        return [0.1 if c else 0.0 for c in comps]

    tr = RLTrainer(km, cfg, reward=reward)
    tr.fit()
    recs = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "rl"]
    # the first step's samples are (nearly all) well formed: the format reward goes
    (dropped,) = [r for r in recs if r.get("event") == "format_dropped"]
    assert dropped["step"] == 1 == tr.format.dropped_at
    assert steps[0]["reward_mean"] > 0
    # from then on every reward is 0: no group is informative, so every step spends all its
    # rounds (2 prompts x 4 rounds) and trains on uninformative groups
    for r in steps[1:]:
        assert r["groups_drawn"] == 8 and r["zero_std_groups"] == 1.0 and r["reward_mean"] == 0
    with pytest.raises(ValueError, match="oversample"):
        rl_config(dict(oversample=-1))
    with pytest.raises(ValueError, match="format_reward_until"):
        rl_config(dict(format_reward_until=1.5))


def _problems(bins: dict[int, int]):
    from keenlm.data.tasks import Problem
    return [Problem(f"{b}+{i}", "", "", {"op": "+", "a": 9 * b, "b": 1 if b else 0})
            for b, n in bins.items() for i in range(n)]


def test_curriculum_bins_problems_and_weights_them_by_learnability():
    from keenlm.data.tasks import difficulty_bin
    from keenlm.train.rl_batch import Curriculum
    probs = [p for p in _problems({0: 50, 1: 50})]
    assert {difficulty_bin(p) for p in probs} == {0, 1}  # 0 + 0 and 9 + 1 (one carry)
    cur = Curriculum(probs)
    assert cur.weights() == {0: 0.27, 1: 0.27}  # untried bins: the largest weight
    cur.success = {0: 0.5, 1: 0.0}
    rng = random.Random(0)
    drawn = [difficulty_bin(p) for _ in range(200) for p in cur.draw(rng, 5)]
    # weights 0.27 : 0.02 -> about 93% from the half-solved bin
    assert 0.85 < drawn.count(0) / len(drawn) < 0.99
    picks = cur.draw(random.Random(1), 100)  # every problem once: bins run out, then the other
    assert len({p.prompt for p in picks}) == 100
    with pytest.raises(ValueError, match="101 prompts"):
        cur.draw(rng, 101)


@pytest.mark.parametrize("seed", range(3))
def test_curriculum_success_is_each_bins_share_of_right_samples_averaged_over_steps(seed):
    from keenlm.train.rl_batch import Curriculum
    rng = random.Random(seed)
    cur = Curriculum(_problems({0: 5, 1: 5}), keep=0.7)
    g = 4
    prompts = [p.prompt for p in cur.draw(rng, 6)]
    raw = [rng.choice([0.0, 0.1, 1.0]) for _ in range(6 * g)]
    cur.observe(prompts, raw, g)
    for b in (0, 1):
        mine = [raw[i * g:(i + 1) * g] for i, p in enumerate(prompts) if cur.bin_of[p] == b]
        if mine:
            want = sum(r == 1.0 for grp in mine for r in grp) / (g * len(mine))
            assert cur.success[b] == pytest.approx(want)
    before = dict(cur.success)
    cur.observe(prompts[:1], [1.0] * g, g)  # one more step: only that bin moves
    b = cur.bin_of[prompts[0]]
    assert cur.success[b] == pytest.approx(0.7 * before[b] + 0.3)
    assert all(cur.success[o] == before[o] for o in before if o != b)
    again = Curriculum(cur.problems)
    again.load(json.loads(json.dumps(cur.state())))  # what a checkpoint keeps
    assert again.success == cur.success


def test_rl_with_a_curriculum_records_and_resumes_the_bins_success(tmp_path):
    km = tiny_policy(3)
    opts = dict(task="addition", difficulty=2, prompts=2, group=4, steps=3, max_new_tokens=4,
                lr=3e-3, eval_every=0, eval_n=4, curriculum="learnability", save_every=2,
                out_dir=str(tmp_path / "rl"), progress=False)

    def reward(prompts, comps):  # right for prompts whose first number is even
        return [1.0 if int(p.split()[2]) % 2 == 0 else 0.0 for p in prompts]

    tr = RLTrainer(km, rl_config(opts), reward=reward)
    tr.fit()
    recs = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "rl"]
    assert len(steps) == 3 and all("bin_success" in r for r in steps)
    assert steps[-1]["bin_success"] == tr.curriculum.state() and tr.curriculum.success
    assert all(0 <= p <= 1 for p in tr.curriculum.success.values())
    # a run resumed from its step-2 checkpoint continues with the same bins' success
    resumed = RLTrainer(tiny_policy(3), rl_config({**opts, "steps": 3, "resume": True}),
                        reward=reward)
    assert resumed.step == 3 and resumed.curriculum.success == tr.curriculum.success
    with pytest.raises(ValueError, match="curriculum"):
        rl_config(dict(curriculum="easy-first"))
