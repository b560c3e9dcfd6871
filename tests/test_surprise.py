"""Selective backprop (train.select): the same as full training at keep 1.0, really smaller
backward passes below it, and the three scores."""

import pytest
import torch

from keenlm.config import ConfigError, SelectConfig, from_dict
from keenlm.train import Trainer
from keenlm.train.surprise import SelectiveBackprop, choose, keep_at, per_token_losses


def cfg(corpus, out, steps=5, **select):
    return from_dict({"data": {"corpus": str(corpus), "tokenizer": "byte",
                               "cache_dir": str(out.parent / "cache")},
                      "model": {"n_layer": 1, "d_model": 32, "n_head": 2, "max_seq_len": 32},
                      "train": {"steps": steps, "batch_size": 8, "seq_len": 32, "progress": False,
                                "log_every": 1, "eval_batches": 1, "out_dir": str(out),
                                "device": "cpu", "select": select}})  # CPU tensors below


def test_keep_one_is_full_training_step_for_step(tmp_path, small_corpus):
    full = Trainer(cfg(small_corpus, tmp_path / "full"))
    sel = Trainer(cfg(small_corpus, tmp_path / "sel", method="loss", keep=1.0))
    a = [full.train_step()["loss"] for _ in range(5)]
    b = [sel.train_step()["loss"] for _ in range(5)]
    assert a == b
    for p, q in zip(full.model.parameters(), sel.model.parameters()):
        assert torch.equal(p, q)
    assert sel.ledger.tokens_backward == full.ledger.tokens_backward == 5 * 8 * 32


@pytest.mark.parametrize("method", ["loss", "prob"])
def test_unselected_sequences_get_no_gradient(tmp_path, small_corpus, method):
    from keenlm.data import get_batch

    tr = Trainer(cfg(small_corpus, tmp_path / "r", method=method, keep=0.5))
    hook = tr.hooks[0]
    assert isinstance(hook, SelectiveBackprop)
    x, y = get_batch(tr.data.train, 8, 32, tr.cfg.train.seed, 0)
    scores = per_token_losses(tr.model, x, y).mean(1)
    g = torch.Generator().manual_seed(tr.cfg.train.seed)
    rows = choose(scores, 0.5, method, g)  # the hook's first choice, replayed
    # the gradient of the loss on the chosen rows alone, computed by hand
    tr.model.zero_grad()
    h = tr.model.hidden_states(x[rows])
    tr.model.loss(tr.model.lm_head(h), y[rows]).backward()
    expected = [p.grad.clone() for p in tr.model.parameters()]
    tr.model.zero_grad()
    _, drawn, fwd, bwd = tr._micro_step(0)
    for p, e in zip(tr.model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)
    n = int(rows.sum()) * 32
    assert drawn == 8 * 32 and bwd == n and fwd == 8 * 32 + n
    if method == "loss":
        assert n == 4 * 32 and set(scores.topk(4).indices.tolist()) == set(rows.nonzero()[:, 0].tolist())


def test_ledger_counts_the_cheaper_backward(tmp_path, small_corpus):
    tr = Trainer(cfg(small_corpus, tmp_path / "r", steps=4, method="loss", keep=0.25))
    tr.fit()
    lg = tr.ledger
    assert lg.tokens_seen == 4 * 8 * 32 and lg.tokens_backward == 4 * 2 * 32
    assert lg.tokens_forward == 4 * (8 + 2) * 32
    assert lg.flops_backward == pytest.approx(lg.tokens_backward * lg.flops_per_token["backward"])


def test_choose_and_schedule():
    s = torch.tensor([0.1, 5.0, 0.3, 2.0, 0.2, 0.0, 1.0, 0.4])
    assert choose(s, 0.25, "loss").nonzero()[:, 0].tolist() == [1, 3]
    assert choose(s, 1.0, "prob").all()
    g = torch.Generator().manual_seed(0)
    big = torch.randn(20000)
    m = choose(big, 0.25, "prob", g)
    assert abs(m.float().mean().item() - 0.25) < 0.02  # keep on average
    top = big.topk(100).indices
    assert m[top].float().mean() > 0.95  # the most surprising almost surely
    bottom = big.topk(5000, largest=False).indices
    assert m[bottom].float().mean() < 0.01
    sel = SelectConfig(method="loss", keep=0.2, ramp=0.5)
    assert keep_at(sel, 0, 100) == 1.0 and keep_at(sel, 25, 100) == pytest.approx(0.6)
    assert keep_at(sel, 50, 100) == pytest.approx(0.2) and keep_at(sel, 99, 100) == pytest.approx(0.2)


def test_excess_loss_prefers_what_the_reference_finds_easy(tmp_path, small_corpus):
    ref = Trainer(cfg(small_corpus, tmp_path / "ref", steps=30))
    ref.fit()
    tr = Trainer(cfg(small_corpus, tmp_path / "r", method="excess", keep=0.5,
                     reference=str(tmp_path / "ref")))
    hook = tr.hooks[0]
    x = torch.randint(0, 256, (8, 32))
    y = torch.randint(0, 256, (8, 32))
    expected = per_token_losses(tr.model, x, y) - per_token_losses(ref.model, x, y)
    torch.testing.assert_close(hook.scores(tr.model, x, y), expected)
    with pytest.raises(ConfigError, match="train.select.reference"):
        SelectConfig(method="excess")
    with pytest.raises(ConfigError, match="train.select.keep"):
        SelectConfig(method="loss", keep=0.0)


def test_reach_interpolates_between_evaluations():
    from keenlm.studies.select import reach

    ev = [{"loss": 5.0, "train_s": 0.0}, {"loss": 4.0, "train_s": 10.0}, {"loss": 3.0, "train_s": 30.0}]
    assert reach(ev, 3.5, "train_s") == pytest.approx(20.0)
    assert reach(ev, 5.5, "train_s") == 0.0 and reach(ev, 2.9, "train_s") is None


def test_select_study_runs_end_to_end_and_resumes(tmp_path, small_corpus):
    from keenlm.studies.select import select

    over = {"data": {"corpus": str(small_corpus), "tokenizer": "byte", "max_bytes": 0,
                     "cache_dir": str(tmp_path / "cache")},
            "model": {"max_seq_len": 32},
            "train": {"batch_size": 4, "seq_len": 32, "dtype": "fp32"}}
    kw = dict(depth=1, tokens=128 * 20, ref_tokens=128 * 5, overrides=over, log=lambda s: None)
    res = select(tmp_path / "s", **kw)
    by = {r["name"]: r for r in res["rows"]}
    assert list(by) == ["full", "loss-pool", "prob-pool", "excess-pool", "loss-half", "excess-token"]
    assert by["full"]["speedup_time"] == pytest.approx(1.0) and by["full"]["steps"] == 20
    lg = by["loss-pool"]["ledger"]  # a pool of 8 sequences, 4 of them backpropagated
    assert lg["tokens_seen"] == 2 * lg["tokens_backward"]
    assert lg["tokens_forward"] == lg["tokens_seen"] + lg["tokens_backward"]
    tok = by["excess-token"]["ledger"]  # a loss mask: every row still backward
    assert tok["tokens_backward"] == tok["tokens_seen"]
    for f in ("results.md", "results.json", "select.svg", "reference/study.json"):
        assert (tmp_path / "s" / f).exists(), f
    assert select(tmp_path / "s", **kw)["rows"] == res["rows"]
