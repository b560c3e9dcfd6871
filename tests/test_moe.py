"""Mixture of experts: the sparse forward against the every-expert reference, routing,
balancing, capacity dropping, accounting, upcycling, and training with every part."""
import dataclasses
import functools

import pytest
import torch

import keenlm
from keenlm.config import ModelConfig, MoEConfig, from_dict
from keenlm.ledger import count_params, flops_per_token
from keenlm.model import LINEAR, build_model
from keenlm.model.moe import MoE, moe_reference, upcycle


def moe_cfg(**moe):
    return ModelConfig(vocab_size=97, n_layer=2, d_model=32, n_head=4, d_ff=64, max_seq_len=32,
                       attention="naive", ffn="moe", moe=MoEConfig(**{"experts": 4, **moe}))


def make_moe(seed=0, **moe) -> MoE:
    cfg = moe_cfg(**moe)
    torch.manual_seed(seed)
    layer = MoE(cfg, functools.partial(LINEAR["dense"], cfg=cfg))
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    return layer.train()


CASES = [dict(top_k=1), dict(top_k=2), dict(top_k=3, shared=1), dict(top_k=2, capacity_factor=0.5),
         dict(top_k=1, capacity_factor=1.0, balance="bias"), dict(top_k=2, experts=8, d_ff=16)]


@pytest.mark.parametrize("kw", CASES, ids=[str(c) for c in CASES])
def test_sparse_forward_and_gradients_equal_the_every_expert_reference(kw):
    layer = make_moe(**kw)
    if kw.get("balance") == "bias":
        layer.expert_bias.copy_(torch.randn(layer.E) * 0.3)
    g = torch.Generator().manual_seed(len(str(kw)))
    x = torch.randn(3, 10, 32, generator=g, requires_grad=True)
    go = torch.randn(3, 10, 32, generator=g)
    outs, grads = [], []
    for fn in (layer.forward, functools.partial(moe_reference, layer)):
        out = fn(x)
        grads.append(torch.autograd.grad(out, [x] + list(layer.parameters()), go,
                                         allow_unused=True))
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b
        torch.testing.assert_close(a.expand_as(b) if a.dim() == 0 else a,
                                   b.expand_as(a) if b.dim() == 0 else b, rtol=1e-4, atol=1e-5)


def test_padded_expert_rows_give_the_unpadded_outputs_and_gradients():
    """The CPU low-precision path pads each expert's rows with zeros (pad_rows): in fp32 the
    padded loop equals the plain one, outputs and gradients, whatever the counts (zero included)."""
    layer = make_moe(top_k=2, experts=6, d_ff=24)
    g = torch.Generator().manual_seed(7)
    counts = torch.tensor([5, 0, 1, 13, 8, 3])
    xs = torch.randn(int(counts.sum()), 32, generator=g, requires_grad=True)
    go = torch.randn(int(counts.sum()), 32, generator=g)
    results = []
    for pad in (1, 4, 16):
        layer.pad_rows = pad
        out = (layer._per_expert_padded(xs, counts) if pad > 1
               else layer._per_expert(xs, counts.tolist()))
        grads = torch.autograd.grad(out, [xs] + list(layer.experts.parameters()), go,
                                    allow_unused=True)
        results.append((out, grads))
    assert sum(g is None for g in results[0][1]) == 3, "the empty expert gets no gradient"
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-6, atol=1e-6)
        for a, b in zip(grads, results[0][1]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_forward_takes_the_padded_path_on_the_cpu_and_matches_unpadded():
    layer = make_moe(top_k=2, experts=4)
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    calls = []
    padded = layer._per_expert_padded
    layer._per_expert_padded = lambda *a: calls.append(1) or padded(*a)
    outs = []
    for pad in (64, 1):
        layer.pad_rows = pad
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        outs.append((out, torch.autograd.grad(out.float().sum(), [x, layer.experts[0].up_proj.weight])))
    assert calls == [1], "the padded path ran once: with pad_rows 64 and not with 1"
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=2e-2, atol=2e-2)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_a_token_changes_only_the_gradients_of_its_experts():
    layer = make_moe(top_k=2, experts=6)
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        chosen = set(layer.route(x.reshape(1, 32))[2].flatten().tolist())
    layer(x).sum().backward()
    assert len(chosen) == 2
    for e, expert in enumerate(layer.experts):
        grads = [p.grad for p in expert.parameters()]
        if e in chosen:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), e
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads), e


def test_switch_aux_loss_is_minimal_for_uniform_routing_and_grows_with_skew():
    layer = make_moe(top_k=1, aux_coef=0.01, z_coef=0.0)
    E = layer.E
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(E, 32) * 50)  # token i (x = e_i) picks expert i
    balanced = torch.eye(E, 32).repeat(4, 1)[None]  # every expert gets a quarter of the tokens
    layer(balanced)
    low = layer.pop_aux_losses()["aux_loss"].item()
    skewed = torch.eye(E, 32)[:1].repeat(16, 1)[None]  # every token picks expert 0
    layer(skewed)
    high = layer.pop_aux_losses()["aux_loss"].item()
    assert low == pytest.approx(0.01, rel=1e-3)  # the minimum: aux_coef exactly
    assert high == pytest.approx(0.01 * E, rel=1e-3)  # the maximum: aux_coef * E
    mid = torch.cat([torch.eye(E, 32)[:1].repeat(8, 1), torch.eye(E, 32).repeat(2, 1)])[None]
    layer(mid)
    assert low < layer.pop_aux_losses()["aux_loss"].item() < high


def test_dropped_tokens_get_nothing_from_the_experts_so_the_residual_carries_them():
    layer = make_moe(top_k=1, capacity_factor=0.5)  # capacity ceil(0.5 * 16 / 4) = 2 per expert
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(4, 32) * 50)
    x = torch.eye(4, 32)[:1].repeat(16, 1)[None] + 0.01 * torch.randn(1, 16, 32)  # all pick 0
    out = layer(x)
    assert layer.capacity(16) == 2
    assert out[0, 2:].abs().max() == 0  # tokens 2.. were dropped: exactly zero
    assert out[0, :2].abs().min() > 0  # the first two fit
    stats = layer.end_step()
    assert stats["dropped"] == pytest.approx(14 / 16) and stats["load"][0] == pytest.approx(4.0)
    # in a block: a dropped token's output is its residual stream after attention, unchanged
    cfg = moe_cfg(top_k=1, capacity_factor=0.5)
    net = build_model(cfg).train()
    block = net.layers[0]
    with torch.no_grad():
        block.mlp.gate.weight.zero_()  # ties: every token picks expert 0, capacity 2 of 16
    h = torch.randn(1, 16, 32)
    cos, sin = net.rope_cos[:16, None], net.rope_sin[:16, None]
    after_attn = h + block.self_attn(block.input_layernorm(h), cos, sin, None, None)
    torch.testing.assert_close(block(h, cos, sin)[0, 2:], after_attn[0, 2:])


def test_bias_balancing_moves_selection_toward_the_underloaded_experts():
    layer = make_moe(top_k=1, balance="bias", bias_rate=0.1)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(4, 32) * 5)
    layer(torch.eye(4, 32)[:1].repeat(8, 1)[None])  # all on expert 0
    stats = layer.end_step()
    assert stats["load"] == [4.0, 0.0, 0.0, 0.0]
    assert layer.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])
    assert "aux_loss" not in layer.pop_aux_losses()  # bias balancing adds no loss
    assert layer.end_step() is None  # nothing routed since


def test_active_parameters_and_flops_match_a_count():
    cfg = moe_cfg(top_k=2, experts=8, shared=1, d_ff=24)
    net = build_model(cfg)
    C, F, V, L = 32, 24, 97, 2
    expert = 3 * C * F
    per_layer_total = 4 * C * C + C * 8 + 9 * expert + 2 * C  # attention, router, 8+1 experts, norms
    per_layer_active = 4 * C * C + C * 8 + 3 * expert + 2 * C  # 2 routed + 1 shared
    p = count_params(net)
    assert p["non_embedding"] == L * per_layer_total + C
    assert p["active"] == L * per_layer_active + C + V * C
    fl = flops_per_token(net, seq_len=16)
    matmul_active = L * (4 * C * C + C * 8 + 3 * expert) + V * C
    assert fl["forward"] == 2 * matmul_active + L * 4 * 16 * C
    # and the sparse layer really does that work: FLOPs counted while it runs
    from torch.utils.flop_counter import FlopCounterMode

    layer = net.layers[0].mlp
    x = torch.randn(1, 64, C)
    with FlopCounterMode(display=False) as fc:
        layer(x)
    assert fc.get_total_flops() == 2 * 64 * (C * 8 + 3 * expert)


def test_upcycled_model_starts_as_the_dense_model():
    dense_cfg = dataclasses.replace(moe_cfg(), ffn="dense")
    torch.manual_seed(0)
    net = build_model(dense_cfg).eval()
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        before = net(x)
    upcycle(net, MoEConfig(experts=4, top_k=2), noise=0.0)
    assert net.cfg.ffn == "moe" and net.cfg.moe.d_ff == 64 and len(net.layers[0].mlp.experts) == 4
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)
    net2 = build_model(dense_cfg)
    upcycle(net2, MoEConfig(experts=4, top_k=2), noise=0.01)
    e = net2.layers[0].mlp.experts
    assert not torch.equal(e[0].up_proj.weight, e[1].up_proj.weight)  # symmetry broken
    with pytest.raises(ValueError, match="dense model"):
        upcycle(net2, MoEConfig(experts=4, top_k=2))
    with pytest.raises(ValueError, match="top_k >= 2"):
        upcycle(build_model(dense_cfg), MoEConfig(experts=4, top_k=1))


def _train_cfg(corpus, tmp_path, name, **model):
    return from_dict({"data": {"corpus": str(corpus), "tokenizer": "byte",
                               "cache_dir": str(tmp_path / "cache")},
                      "model": {"n_layer": 1, "d_model": 32, "n_head": 2, "max_seq_len": 32,
                                "ffn": "moe", "moe": {"experts": 4, "top_k": 2}, **model},
                      "train": {"steps": 3, "batch_size": 2, "seq_len": 32, "progress": False,
                                "log_every": 1, "eval_batches": 1, "out_dir": str(tmp_path / name)}})


@pytest.mark.parametrize("model", [{"attention": "naive"}, {"attention": "flash"},
                                   {"linear": "ternary"}, {"linear": "int4", "lowbit_group": 16},
                                   {"moe": {"experts": 4, "balance": "bias", "shared": 1, "top_k": 1}}],
                         ids=["naive", "flash", "ternary", "int4", "bias-shared"])
def test_moe_trains_with_every_part_and_reloads(tmp_path, small_corpus, model):
    import json

    import keenlm
    from keenlm.train import Trainer

    tr = Trainer(_train_cfg(small_corpus, tmp_path, "run", **model))
    res = tr.fit()
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 3 and all(len(r["moe_load"]) == 1 and len(r["moe_load"][0]) == 4
                                   for r in train)
    balance = model.get("moe", {}).get("balance", "aux")
    assert ("aux_loss" in train[0]) == (balance == "aux") and "z_loss" in train[0]
    assert res.ledger["params"]["active"] < res.ledger["params"]["non_embedding"] + 97 * 32 * 4
    km = keenlm.load(tmp_path / "run", device="cpu")
    x = torch.randint(0, 200, (1, 16))
    net = tr.model.to("cpu").eval()  # the trainer's device may be a GPU
    with torch.no_grad():
        torch.testing.assert_close(km.net(x), net(x))
    if balance == "bias":
        assert km.net.layers[0].mlp.expert_bias.abs().sum() > 0  # saved with the weights


def test_train_init_from_a_dense_run_upcycles_it(tmp_path, small_corpus):
    from keenlm.train import Trainer

    dense = _train_cfg(small_corpus, tmp_path, "dense", ffn="dense")
    Trainer(dense).fit()
    cfg = _train_cfg(small_corpus, tmp_path, "moe")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                             init_from=str(tmp_path / "dense")))
    tr = Trainer(cfg, init=keenlm.load(tmp_path / "dense"))
    assert tr.cfg.model.ffn == "moe" and len(tr.model.layers[0].mlp.experts) == 4
    assert tr.cfg.model.moe.d_ff == tr.cfg.model.d_ff
    tr.fit()


def test_moe_study_runs_end_to_end_and_resumes(tmp_path, small_corpus):
    from keenlm.studies.moe import moe

    over = {"data": {"corpus": str(small_corpus), "tokenizer": "byte", "max_bytes": 0,
                     "cache_dir": str(tmp_path / "cache")},
            "model": {"max_seq_len": 32},
            "train": {"batch_size": 2, "seq_len": 32, "eval": {"batches": 1},
                      "runtime": {"dtype": "fp32"}}}
    kw = dict(depth=1, tokens=64 * 40, experts=4, top_k=2, overrides=over, log=lambda s: None,
              bias_rates=(0.001, 0.01), seeds=2)
    res = moe(tmp_path / "s", **kw)
    by = {r["name"]: r for r in res["rows"]}
    assert list(by) == ["dense", "moe-aux", "moe-bias-0.001", "moe-bias-0.01", "moe-none",
                        "dense-total", "dense-s1", "moe-aux-s1"]
    assert len(res["loss_gain_seeds"]) == 2
    assert res["loss_gain_seeds"][1] == pytest.approx(by["dense-s1"]["val_loss"]
                                                      - by["moe-aux-s1"]["val_loss"])
    assert by["dense-s1"]["val_loss"] != by["dense"]["val_loss"]
    from keenlm.studies.moe import moe_configs

    cfgs = moe_configs(1, 64 * 40, 4, 2, tmp_path / "s", over, (0.001, 0.01))
    assert [cfgs[f"moe-bias-{r}"]["model"]["moe"]["bias_rate"] for r in (0.001, 0.01)] == [0.001, 0.01]
    assert by["moe-none"]["steps"] == 10 and by["dense"]["steps"] == 40
    # equal active parameters (up to the router), equal total parameters with dense-total
    router = 64 * 4  # depth 1 of the dial: d_model 64; a router of 4 experts
    assert by["moe-aux"]["params"]["active"] == by["dense"]["params"]["active"] + router
    assert by["moe-aux"]["params"]["total"] == by["dense-total"]["params"]["total"] + router
    assert by["dense"]["routing"] is None and by["moe-aux"]["routing"]["steps"] >= 3
    assert 0 <= by["moe-aux"]["routing"]["load_min"] <= 1 <= by["moe-aux"]["routing"]["load_max"]
    for f in ("results.md", "results.json", "moe_loss.svg"):
        assert (tmp_path / "s" / f).exists(), f
    again = moe(tmp_path / "s", **kw)
    assert again["rows"] == res["rows"]
    pair = moe(tmp_path / "p", **{**kw, "seeds": 1, "pair_only": True})
    assert [r["name"] for r in pair["rows"]] == ["dense", "moe-aux"] and "loss_gain_bias" not in pair
    assert "(aux)" in (tmp_path / "p" / "results.md").read_text()
