"""GRPO and rejection-sampling fine-tuning: the objective by hand, the sampler, one real step."""

import json
import math

import pytest
import torch

from keenlm.api import KeenModel
from keenlm.config import ConfigError, RLConfig, from_dict, rl_config
from keenlm.data.tasks import get_task, majority, pass_at_k
from keenlm.data.tokenizer import ByteTokenizer
from keenlm.model import build_model
from keenlm.presets import resolve
from keenlm.train.grpo import RLTrainer, sample_group
from keenlm.train.rl_objective import (LOSSES, clipped_objective, group_advantages,
                                       likelihood_objective, rft_targets)
from keenlm.train.logprobs import reference_logprobs, shared_prefix_logprobs


def tiny_policy(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = from_dict({"model": {"n_layer": layers, "d_model": 64, "n_head": 2, "d_ff": 192,
                               "max_seq_len": 160}, "train": {"seq_len": 128}})
    tok = ByteTokenizer()
    cfg = resolve(cfg, tok.vocab_size)
    return KeenModel(build_model(cfg.model), tok, cfg, None)


# ------------------------------------------------------------------------------ by hand

RATIO = [[1.1, 1.3], [0.7, 1.0]]  # row 1 has one completion token: its second entry is padding
MASK = torch.tensor([[True, True], [True, False]])


def _hand_case(rewards, variant, ref=None, kl_coef=0.0):
    v = LOSSES[variant]
    adv = group_advantages(torch.tensor([rewards]), v.scale_by_std).reshape(-1)
    weights = v.token_weights(MASK.float(), 2)  # max_new_tokens 2
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor(RATIO))
    hi = v.clip_high or 0.2
    return adv, clipped_objective(logp, old, adv, weights, 0.2, hi, ref, kl_coef)


def test_advantages_and_losses_equal_a_hand_computed_example():
    # rewards 1 and 0: mean 0.5, std (n-1) 0.7071 -> advantages +-0.5/(0.7071+1e-4)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    adv, (loss, st) = _hand_case([1.0, 0.0], "grpo")
    assert adv.tolist() == pytest.approx([a, -a], rel=1e-6)
    # row 0 (A>0): ratios 1.1 and 1.3 -> min(1.3a, 1.2a) = 1.2a; row 1 (A<0): ratio 0.7 ->
    # min(-0.7a, -0.8a) = -0.8a. grpo weights: 1/(2 rows * 2 tokens) and 1/(2 rows * 1 token)
    assert loss.item() == pytest.approx(-(0.25 * (1.1 + 1.2) * a + 0.5 * (-0.8 * a)), rel=1e-5)
    assert st["clip_frac"] == pytest.approx(2 / 3)  # 1.3 and 0.7 were clipped, of 3 tokens
    # dapo: one weight 1/3 per token and clip-higher 0.28, so 1.3 -> 1.28
    _, (loss, _) = _hand_case([1.0, 0.0], "dapo")
    assert loss.item() == pytest.approx(-(1 / 3) * (1.1 * a + 1.28 * a - 0.8 * a), rel=1e-5)
    # dr_grpo: advantages not scaled (+-0.5), weights 1/(2 rows * max_new_tokens 2)
    adv, (loss, _) = _hand_case([1.0, 0.0], "dr_grpo")
    assert adv.tolist() == [0.5, -0.5]
    assert loss.item() == pytest.approx(-(1 / 4) * (1.1 * 0.5 + 1.2 * 0.5 - 0.8 * 0.5), rel=1e-6)
    # the KL term (k3): with ref = logp + d, kl = e^d - d - 1 per token, weighted like the rest
    d = torch.tensor([[0.1, -0.2], [0.3, 0.0]])
    ref = torch.log(torch.tensor(RATIO)) + d
    _, (loss_kl, st) = _hand_case([1.0, 0.0], "dr_grpo", ref=ref, kl_coef=0.5)
    kl = torch.exp(d) - d - 1
    assert loss_kl.item() == pytest.approx(loss.item() + 0.5 * 0.25 * (kl[0, 0] + kl[0, 1] + kl[1, 0]).item(),
                                           rel=1e-5)
    assert st["kl"] == pytest.approx(((kl[0, 0] + kl[0, 1] + kl[1, 0]) / 3).item(), rel=1e-5)


def test_gradient_of_the_objective_is_the_policy_gradient():
    # at ratio 1 (the first update of a batch) d loss / d logp = -w * A for every token
    logp = torch.randn(4, 3, requires_grad=True)
    adv = torch.tensor([1.5, -0.5, 0.0, -1.0])
    w = torch.rand(4, 3)
    loss, _ = clipped_objective(logp, logp.detach(), adv, w, 0.2, 0.2)
    loss.backward()
    torch.testing.assert_close(logp.grad, -w * adv[:, None])


def test_a_group_with_equal_rewards_gives_no_gradient():
    rewards = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.1, 1.0, 0.0, 0.1]])
    for name, v in LOSSES.items():
        adv = group_advantages(rewards, v.scale_by_std).reshape(-1)
        assert adv[:4].abs().max() == 0, name
        logp = torch.randn(8, 5, requires_grad=True)
        mask = torch.ones(8, 5, dtype=torch.bool)
        loss, _ = clipped_objective(logp, logp.detach() - 0.1 * torch.rand(8, 5), adv,
                                    v.token_weights(mask.float(), 5), 0.2, v.clip_high or 0.2)
        loss.backward()
        assert logp.grad[:4].abs().max() == 0 and logp.grad[4:].abs().max() > 0, name


def test_rft_keeps_distinct_correct_completions_and_is_cross_entropy():
    rewards = torch.tensor([[1.0, 1.0, 0.1, 0.0]])
    comps = [[5, 6], [5, 6], [7], [8]]
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0]], dtype=torch.bool)
    keep, w = rft_targets(rewards, mask, LOSSES["grpo"], 2, comps)
    assert keep.tolist() == [1.0, 0.0, 0.0, 0.0]  # the duplicate of row 0 is dropped
    assert w.sum().item() == pytest.approx(1.0) and w[1:].sum() == 0
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.25], [0.1, 0.0], [0.1, 0.0]]) + 1e-30)
    loss, _ = likelihood_objective(logp, logp, keep, w, 0.2, 0.2)
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2, rel=1e-6)


# ------------------------------------------------------------------------------ model parts


def _random_rows(seed):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 250, (n,), generator=g).tolist() for n in (5, 9, 3)]
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    comps = [torch.randint(1, 250, (n,), generator=g).tolist() for n in (4, 1, 0, 7, 2, 6, 3)]
    return prompts, rows, comps


def test_both_logprob_paths_match_a_row_by_row_reference():
    km = tiny_policy(1)
    prompts, rows, comps = _random_rows(3)
    plain = reference_logprobs(km.net, prompts, rows, comps, temperature=0.7, chunk_elems=300)
    shared = shared_prefix_logprobs(km.net, prompts, rows, comps, temperature=0.7)
    for i, c in enumerate(comps):
        p = prompts[rows[i]]
        assert not plain[i, len(c):].any() and not shared[i, len(c):].any()
        if not c:
            continue
        logp = torch.log_softmax(km.net(torch.tensor([p + c]))[0].float() / 0.7, dim=-1)
        by_hand = torch.stack([logp[len(p) - 1 + t, c[t]] for t in range(len(c))])
        torch.testing.assert_close(plain[i, :len(c)], by_hand, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(shared[i, :len(c)], by_hand, rtol=1e-4, atol=1e-5)


def test_shared_prefix_gradients_equal_the_plain_ones():
    prompts, rows, comps = _random_rows(4)
    grads = []
    for fn in (reference_logprobs, shared_prefix_logprobs):
        km = tiny_policy(6)
        w = torch.randn(len(comps), 7, generator=torch.Generator().manual_seed(0))
        (fn(km.net, prompts, rows, comps, width=7) * w).sum().backward()
        grads.append({n: p.grad.clone() for n, p in km.net.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_sampling_is_reproducible_by_seed_and_prefills_each_prompt_once():
    from keenlm.config import GenerateConfig
    from keenlm.infer import generate_tokens

    km = tiny_policy(2)
    prompts = ["What is 1 + 2?", "Say something."]
    kw = dict(temperature=1.0, max_new_tokens=12)
    ids, a, texts = sample_group(km.net, km.tokenizer, prompts, 4, seed=7, **kw)
    _, b, _ = sample_group(km.net, km.tokenizer, prompts, 4, seed=7, **kw)
    _, c, _ = sample_group(km.net, km.tokenizer, prompts, 4, seed=8, **kw)
    assert len(ids) == 2 and len(a) == len(texts) == 8
    assert a == b and a != c
    assert len(set(map(tuple, a[:4]))) > 1  # the members of a group differ
    # a prompt prefilled once and shared equals the prompt written out in every row (greedy)
    greedy = GenerateConfig(max_new_tokens=10, temperature=0)
    shared = generate_tokens(km.net, ids, greedy, repeat=3)
    plain = generate_tokens(km.net, [p for p in ids for _ in range(3)], greedy)
    assert shared == plain


def _first_token_mass(km, prompt, wanted):
    ids = torch.tensor([km.tokenizer.encode_prompt(prompt)])
    with torch.no_grad():
        p = torch.softmax(km.net(ids)[0, -1].float(), dim=-1)
    return p[wanted].sum().item()


@pytest.mark.parametrize("algo,loss", [("grpo", "grpo"), ("grpo", "dr_grpo"), ("grpo", "dapo"),
                                       ("rft", "grpo")])
def test_one_step_raises_the_probability_of_the_rewarded_completion(tmp_path, algo, loss):
    km = tiny_policy(4)
    even = torch.arange(0, 256, 2)

    def reward(prompts, completions):  # toy verifier: the answer must start with an even byte
        return [1.0 if c and c[0].encode()[0] % 2 == 0 else 0.0 for c in completions]

    cfg = rl_config(dict(prompts=2, group=16, max_new_tokens=3, lr=3e-3, algo=algo, loss=loss,
                         epochs=2, minibatches=2, out_dir=str(tmp_path / "rl"), progress=False,
                         eval_n=2))
    tr = RLTrainer(km, cfg, reward=reward)
    prompts = tr.prompts_for(0)
    before = [_first_token_mass(km, p, even) for p in prompts]
    rec = tr.rl_step()
    after = [_first_token_mass(km, p, even) for p in prompts]
    assert 0 < rec["success"] < 1 and rec["rows_trained"] > 0
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert rec["kl"] is not None and rec["kl"] >= 0  # logged against the frozen start


def test_rl_run_writes_metrics_curves_and_a_loadable_policy(tmp_path, capsys):
    import keenlm
    from keenlm.cli import main

    from keenlm.config import save_json
    from keenlm.model import model_state
    from keenlm.runs import save_checkpoint

    km = tiny_policy(5)
    src = tmp_path / "sft"
    src.mkdir()
    save_json(km.config, src / "config.json")
    km.tokenizer.save(src / "tokenizer")
    save_checkpoint(src, 1, model_state(km.net), {"step": 1})
    out = tmp_path / "rl"
    assert main(["rl", str(src), "--task", "countdown", "--difficulty", "2", "--group", "4",
                 "--prompts", "2", "--steps", "3", "--eval-every", "2", "--eval-n", "4",
                 "--max-new-tokens", "8", "--out-dir", str(out), "--progress", "false"]) == 0
    assert "held-out greedy pass@1" in capsys.readouterr().out
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rl_recs = [r for r in recs if r["kind"] == "rl"]
    assert [r["step"] for r in rl_recs] == [1, 2, 3]
    for key in ("reward_mean", "reward_std", "zero_std_groups", "completion_len", "kl", "clip_frac",
                "gen_tokens_per_s", "train_tokens_per_s", "success"):
        assert key in rl_recs[0], key
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [0, 2, 3]
    assert (out / "rl_curves.svg").read_text().startswith("<svg")
    assert keenlm.load(out).generate("What is", max_new_tokens=2, temperature=0) is not None
    assert main(["eval", str(out), "--task", "countdown", "--n", "3", "--samples", "4",
                 "--k", "1,4", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "greedy pass@1" in printed and "pass@4" in printed and "maj@4" in printed
    # bad options name the key
    assert main(["rl", str(src), "--group", "1", "--out-dir", str(out)]) == 2
    assert "rl.group" in capsys.readouterr().err


def test_rl_config_checks():
    with pytest.raises(ConfigError, match="rl.loss"):
        RLConfig(loss="ppo")
    with pytest.raises(ConfigError, match="rl.temperature"):
        RLConfig(temperature=0)
    with pytest.raises(ConfigError, match="rl.task"):
        RLConfig(task="sorting")


# ------------------------------------------------------------------------------ evaluation


def test_pass_at_k_and_majority():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 4, 2) == 1.0 and pass_at_k(4, 1, 1) == 0.25
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    assert majority(["7", None, "8", "8"]) == 2 and majority([None, None]) is None
    assert majority(["1", "2"]) == 0  # a tie goes to the first seen
    # countdown answers vote by value: two different correct expressions agree
    task = get_task("countdown", 2)
    prompt = "Using the numbers [3, 7], make 21."
    assert task.answer_key(prompt, "3 * 7") == task.answer_key(prompt, "7*3")
    assert task.answer_key(prompt, "3 * 3") is None


def test_rl_study_runs_end_to_end(tmp_path):
    from keenlm.studies import rl as study

    res = study.rl(tmp_path / "s", task="addition", difficulty=3, size="64x1", sft_steps=20,
                   start_at=1.0, budget_s=1.0, eval_n=8, samples=2,
                   algos=("grpo:grpo", "rft+dynamic+format"),
                   rl_options={"prompts": 2, "group": 2, "eval_every": 1}, log=lambda s: None,
                   scratchpad=True)
    assert res["sft_steps"] == 20 and [r["algo"] for r in res["runs"]] == ["grpo", "rft"]
    assert res["runs"][0]["loss"] == "grpo" and (tmp_path / "s" / "length.svg").exists()
    assert all(r["length_first"] > 0 and r["length_last"] > 0 for r in res["runs"])
    assert "carry" in (tmp_path / "s" / "demonstrations.jsonl").read_text()[:2000]
    assert len(res["warmup_validation"]) == 1  # one checkpoint (every 100 steps, and the last)
    for r in res["runs"]:
        assert r["steps"] >= 1 and r["gain"] == pytest.approx(r["final"]["pass@1"] - r["start"])
    for f in ("results.md", "results.json", "pass_at_1.svg", "reward.svg", "grpo-grpo/rl_curves.svg"):
        assert (tmp_path / "s" / f).exists(), f
    text = (tmp_path / "s" / "results.md").read_text()
    # the report says what was done: start_at 1.0 was not reached, so the last checkpoint
    assert "no checkpoint reached the start threshold 1.0, so the last one (step 20" in text
    assert all(r["best"] is not None and r["best_step"] is not None for r in res["runs"])
    assert "GRPO (grpo), best by validation (step" in text
    # the low-coverage remedies named after the algorithm reach its config
    assert res["runs"][1]["oversample"] == 3 and res["runs"][1]["format_reward_until"] == 0.9
    assert "RFT, dynamic sampling, format reward dropped" in text
    assert (tmp_path / "s" / "rft-dynamic-format" / "rl_curves.svg").exists()
    with pytest.raises(ValueError, match="after \\+ comes"):
        study.rl(tmp_path / "s", task="addition", difficulty=3, size="64x1", sft_steps=20,
                 start_at=1.0, budget_s=1.0, eval_n=8, samples=2, algos=("grpo+fast",),
                 log=lambda s: None, scratchpad=True)


def test_rl_skips_a_non_finite_update_and_stops_after_too_many(tmp_path):
    from keenlm.train.grpo import RLTrainer
    from tests.test_train import nan_grads_at

    def trainer(limit, out):
        km = tiny_policy()
        cfg = rl_config({"steps": 3, "prompts": 2, "group": 4, "max_new_tokens": 8,
                         "max_nonfinite": limit, "eval_n": 4, "out_dir": str(tmp_path / out),
                         "progress": False, "task": "addition", "difficulty": 1})
        tr = RLTrainer(km, cfg, reward=lambda p, c: [float(len(x) % 2) for x in c])
        return tr, nan_grads_at(tr.model, {1})

    tr, _ = trainer(5, "a")
    res = tr.fit()  # the first update's gradients are NaN: skipped, the rest applied
    assert res.step == 3 and tr.guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    tr, _ = trainer(0, "b")
    with pytest.raises(FloatingPointError, match="step 1: .*lower rl.lr"):
        tr.fit()
