"""The test-time compute planner: coverage extrapolated by a beta-binomial fit, majority votes
by simulation, the best buy within a budget; and the exchange study end to end, tiny."""

import math

import numpy as np
import pytest

from keenlm.data.tasks import pass_at_k
from keenlm.infer.plan import (Calibration, Predictor, fit_beta, majority_at_n, pass_at_n,
                               plan)


def _synthetic(a, b, problems=400, samples=16, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.beta(a, b, problems)
    return p, rng.binomial(samples, p)


def test_the_beta_fit_recovers_coverage_beyond_the_calibration_samples():
    p, right = _synthetic(0.3, 1.2)
    a, b = fit_beta(right, 16)
    assert a == pytest.approx(0.3, rel=0.25) and b == pytest.approx(1.2, rel=0.35)
    for n in (1, 4, 16, 64, 256):  # the truth: the mean over problems of 1 - (1 - p)^n
        assert pass_at_n(a, b, n) == pytest.approx(np.mean(1 - (1 - p) ** n), abs=0.03)
    # within the calibration samples it agrees with the unbiased estimator
    measured = np.mean([pass_at_k(16, c, 8) for c in right])
    assert pass_at_n(a, b, 8) == pytest.approx(measured, abs=0.02)
    assert fit_beta([0, 0, 0], 8)[0] < 0.01  # never right: no coverage
    assert pass_at_n(*fit_beta([0, 0, 0], 8), 1000) < 0.01


def test_majority_chance_by_simulation_matches_the_exact_vote():
    rng = np.random.default_rng(0)
    d = {"draws": 20000}
    # one sample: the right answer's share (3 of 4)
    assert majority_at_n([[3, True], [1, False]], 0, 1, rng, **d) == pytest.approx(0.75, abs=0.01)
    # three samples, right and a wrong answer seen twice, 1/2 each: right wins with 2 or 3: 1/2
    assert majority_at_n([[2, True], [2, False]], 0, 3, rng, **d) == pytest.approx(0.5, abs=0.01)
    # a wrong answer seen once stands for distinct wrong answers: right wins with 2 or 3 votes
    # (1/2), and with 1 vote it ties three ways (3/8 x 1/3): 0.625
    assert majority_at_n([[1, True], [1, False]], 0, 3, rng, **d) == pytest.approx(0.625, abs=0.01)
    # an unparsed sample never votes: with p(right) = p(none) = 1/2 and N = 1, half the votes
    # are empty (no answer: wrong)
    assert majority_at_n([[1, True]], 1, 1, rng, **d) == pytest.approx(0.5, abs=0.01)
    assert majority_at_n([[5, False]], 0, 9, rng) == 0.0  # never right, no prior: 0
    # with a prior, a problem never right in 16 samples is still won at large N when its wrong
    # answers scatter, and not when one wrong answer dominates
    scattered = majority_at_n([[1, False]] * 16, 0, 256, rng, prior=(0.5, 10.0), samples=16)
    dominated = majority_at_n([[16, False]], 0, 256, rng, prior=(0.5, 10.0), samples=16)
    assert scattered > 0.2 and dominated < 0.05


def _cal(name, right, greedy, flops, samples=16):
    answers = [[[c, True], [samples - c, False]] if c < samples else [[c, True]] for c in right]
    return Calibration(name, 1000, samples, greedy, list(right), answers, [0] * len(right),
                       flops / 2, flops / 2, flops)


def test_the_plan_is_the_best_predicted_choice_within_the_budget():
    rng = np.random.default_rng(1)
    _, weak = _synthetic(0.4, 2.0, 80, seed=1)
    _, strong = _synthetic(2.0, 1.0, 80, seed=2)
    small = _cal("small", weak, list(rng.random(80) < 0.2), 1e6)
    large = _cal("large", strong, list(rng.random(80) < 0.6), 1e7)
    tight = plan([small, large], 2e6, ns=(1, 2, 4))
    assert tight["chosen"]["policy"] == "small" and tight["chosen"]["flops"] <= 2e6
    assert all(o["flops"] <= 2e6 for o in tight["options"])
    assert tight["chosen"]["accuracy"] == max(o["accuracy"] for o in tight["options"])
    roomy = plan([small, large], 1e9, ns=(1, 2, 4, 16, 64))
    assert roomy["chosen"]["strategy"] == "best_of_n_verifier" and roomy["chosen"]["n"] == 64
    c = roomy["chosen"]
    assert c["low"] <= c["accuracy"] <= c["high"]
    assert plan([small], 1e3)["chosen"] is None  # nothing fits
    # a query's N samples share one prefill: cost = prefill + N x decode
    assert small.cost("majority", 4) == 0.5e6 + 4 * 0.5e6 and small.cost("greedy", 9) == 1e6
    with pytest.raises(ValueError, match="budget"):
        plan([small], -1)
    # the interval of a measurement on 50 test problems adds their noise: it is wider
    for strategy in ("greedy", "majority", "best_of_n_verifier"):
        a, b = (Predictor(small).predict(strategy, 4, test_n=t) for t in (0, 50))
        assert b["accuracy"] == a["accuracy"] and b["high"] - b["low"] > a["high"] - a["low"]
    p = Predictor(small).predict("best_of_n_verifier", 4)
    assert p["measured"] == pytest.approx(np.mean([pass_at_k(16, c, 4) for c in weak]))
    assert math.isclose(Predictor(small).predict("greedy", 8)["accuracy"], np.mean(small.greedy))


def test_exchange_study_runs_end_to_end_tiny(tmp_path):
    from keenlm.studies.exchange import Options, exchange

    o = Options(task="addition", difficulty=2, sizes=("64x1", "128x1"), sft_steps=20, calib_n=4,
                calib_samples=4, eval_n=6, max_n=4, max_new_tokens=12)
    res = exchange(tmp_path / "ex", o, log=lambda s: None)
    assert {p["policy"] for p in res["points"]} == {"64x1", "128x1"}
    assert len(res["points"]) == 2 * (1 + 3 + 3)  # greedy, majority and best-of-N at 1, 2, 4
    assert len(res["planner_check"]) == 9
    for c in res["planner_check"]:
        assert c["planned"] is None or c["planned"]["flops"] <= c["budget"]
    text = (tmp_path / "ex" / "results.md").read_text()
    assert "| 64x1 | majority | 4 |" in text and "within 2 points" in text
    assert (tmp_path / "ex" / "accuracy_vs_total_flops.svg").exists()
    for size in ("64x1", "128x1"):  # measured costs: one prefill, then N decodes
        cost = {p["n"]: p["flops"] for p in res["points"]
                if p["policy"] == size and p["strategy"] == "majority"}
        decode = cost[2] - cost[1]
        assert decode > 0 and cost[4] == pytest.approx(cost[1] + 3 * decode)
        assert cost[1] - decode > 0  # the prefill, paid once
    again = exchange(tmp_path / "ex", o, log=lambda s: None)  # resumes: everything cached
    assert again["points"] == res["points"]
    # by difficulty bin: the bins' accuracies, weighted by their problems, are the whole's
    o2 = Options(**{**o.__dict__, "min_bin": 2})
    res = exchange(tmp_path / "ex", o2, log=lambda s: None)  # the same cached answers
    whole = {(p["policy"], p["strategy"], p["n"]): p["accuracy"] for p in res["points"]}
    bins = res["bins"]["task"]
    assert sum(b["test_n"] for b in bins) == 6 and all(b["test_n"] >= 2 for b in bins)
    for key, acc in whole.items():
        parts = [(b["test_n"], next(p["accuracy"] for p in b["points"]
                                    if (p["policy"], p["strategy"], p["n"]) == key)) for b in bins]
        assert sum(n * a for n, a in parts) / 6 == pytest.approx(acc)
    pooled = res["bins"]["pooled"]  # strategies on the first half of the samples only
    assert sum(b["test_n"] for b in pooled) == 6
    assert max(p["n"] for b in pooled for p in b["points"]) == 2
    assert all(b["planner_check"] == [] for b in pooled)
    assert "By the task's difficulty bins (carries" in (tmp_path / "ex" / "results.md").read_text()


@pytest.mark.parametrize("seed", range(4))
def test_bins_are_merged_into_ascending_ranges_that_each_hold_enough_problems(seed):
    from keenlm.studies.exchange import merge_bins
    rng = np.random.default_rng(seed)
    values = list(rng.integers(0, 6, rng.integers(1, 120)))
    ranges = merge_bins(values, 15)
    covered = [v for lo, hi in ranges for v in sorted(set(values)) if lo <= v <= hi]
    assert covered == sorted(set(values))  # every value in exactly one range, in order
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [sum(lo <= v <= hi for v in values) for lo, hi in ranges]
    assert all(n >= 15 for n in sizes) or len(ranges) == 1


def test_pooled_difficulty_reads_only_the_held_back_samples():
    from keenlm.studies.exchange import _pooled_bins
    rng = np.random.default_rng(0)
    right = [[bool(x) for x in rng.integers(0, 2, 8)] for _ in range(30)]
    m = {"a": {"right": right}, "b": {"right": [r[::-1] for r in right]}}
    bins = _pooled_bins(m, 4)
    flipped = {k: {"right": [[not x for x in r[:4]] + r[4:] for r in v["right"]]}
               for k, v in m.items()}
    assert _pooled_bins(flipped, 4) == bins  # the first half (what strategies use) plays no part
    share = [(sum(right[i][4:]) + sum(right[i][::-1][4:])) / 8 for i in range(30)]
    for p, b in zip(share, bins):  # 0 is the easiest bin, 4 no right answer at all
        assert (b == 4) == (p == 0) and (b == 0) == (p >= 0.5)


def test_a_calibration_subset_keeps_only_those_problems():
    cal = Calibration("x", 10, 4, [True, False, True], [4, 0, 2], [[[4, True]], [[3, False]],
                      [[2, True], [2, False]]], [0, 1, 0], 1.0, 2.0, 3.0)
    sub = cal.subset([2, 0])
    assert sub.greedy == [True, True] and sub.right == [2, 4] and sub.unparsed == [0, 0]
    assert sub.flops_decode == cal.flops_decode and cal.subset([0, 1, 2]) == cal
    with pytest.raises(ValueError, match="at least 2"):
        cal.subset([1])
    with pytest.raises(ValueError, match="by index"):
        cal.subset([0, 3])


def test_votes_count_the_tagged_answer_by_the_tasks_key():
    from keenlm.data.tasks import get_task
    from keenlm.infer.plan import answer_keys

    for task in (get_task("countdown", 2), get_task("addition", 2)):
        p = task.problems("val", 1)[0]
        keys = answer_keys(task, p.prompt, [p.demonstration, "chatter " + p.demonstration,
                                            "no answer here"])
        assert keys[0] is not None and keys[0] == keys[1] and keys[2] is None
        assert task.reward([p.prompt], [p.demonstration]) == [1.0]
