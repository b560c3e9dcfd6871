"""Spiking execution: the LIF neuron against its closed form, a finite surrogate gradient,
spike counting, the fast rate code against the step-by-step neuron (counts and gradients),
conversion error falling with T, the spiking layer against its event-driven reference,
accounting against a brute-force count, and conversion + fine-tuning through the trainer."""
import dataclasses

import pytest
import torch

from keenlm.config import ModelConfig, SpikeConfig, from_dict
from keenlm.model import build_model
from keenlm.model.layers import SwiGLU
from keenlm.spiking.energy import spike_counts, spike_energy
from keenlm.spiking.ffn import SpikingFFN, convert, spiking_layers, spiking_reference
from keenlm.spiking.neurons import RateCode, SpikeFn, lif, rate_code


def test_lif_follows_its_closed_form_below_threshold_and_fires_when_it_crosses():
    beta, current, T = 0.9, 0.05, 30
    I = torch.full((T, 1), current)
    spikes, v = lif(I, beta, threshold=10.0)  # never reached: 0.05 / 0.1 = 0.5 at most
    assert spikes.sum() == 0
    assert v.item() == pytest.approx(current * (1 - beta ** T) / (1 - beta), rel=1e-5)
    # with threshold 0.3: the first spike is at the first t with I (1 - beta^t) / (1 - beta) > 0.3
    spikes, _ = lif(I, beta, threshold=0.3)
    first = next(t for t in range(1, T + 1) if current * (1 - beta ** t) / (1 - beta) > 0.3)
    assert spikes[:, 0].nonzero()[0].item() == first - 1  # index 0 is t = 1
    # integrate-and-fire (beta 1) with reset by subtraction: floor(T I) spikes for I in [0, 1]
    for i in (0.0, 0.13, 0.5, 0.77, 0.999):
        spikes, _ = lif(torch.full((20, 1), i), 1.0)
        assert spikes.sum() == int(20 * i + 1e-9) - (1 if (20 * i).is_integer() and i else 0)
    # reset to zero forgets the overshoot: 0.6 per step fires every second step
    spikes, _ = lif(torch.full((10, 1), 0.6), 1.0, reset="zero")
    assert spikes[:, 0].tolist() == [0, 1] * 5
    with pytest.raises(ValueError, match="beta"):
        lif(torch.zeros(2, 2), 1.5)
    with pytest.raises(ValueError, match="reset"):
        lif(torch.zeros(2, 2), 1.0, reset="half")


def test_surrogate_gradient_is_finite_at_extreme_membrane_values():
    x = torch.tensor([-float("inf"), -1e30, -1e4, -1.0, 0.0, 1e-8, 1.0, 1e4, 1e30, float("inf")],
                     requires_grad=True)
    s = SpikeFn.apply(x, 25.0)
    assert s.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]  # strictly above threshold, as in NIR
    (g,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(g).all() and g.max() == 1.0 and g[0] == 0 and g[-1] == 0
    # through a whole LIF run and through the rate code, with huge inputs too
    I = (torch.randn(8, 16) * 1e20).requires_grad_(True)
    spikes, _ = lif(I, 0.9)
    (gi,) = torch.autograd.grad(spikes.sum(), I)
    assert torch.isfinite(gi).all()
    J = torch.tensor([-float("inf"), -1e30, 0.0, 1e30, float("inf")], requires_grad=True)
    (gj,) = torch.autograd.grad(RateCode.apply(J, 8, 1.0, "subtract", 25.0).sum(), J)
    assert torch.isfinite(gj).all()


def test_spike_count_equals_a_brute_force_count():
    g = torch.Generator().manual_seed(0)
    spikes, _ = lif(torch.rand(12, 5, 7, generator=g), 0.8, threshold=0.9)
    brute = 0
    for t in range(12):
        for i in range(5):
            for j in range(7):
                brute += int(spikes[t, i, j].item() == 1.0)
    c = spike_counts(spikes)
    assert c["spikes"] == brute and c["rate"] == pytest.approx(brute / (12 * 5 * 7))
    assert 0 < brute < 12 * 5 * 7


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("beta", [1.0, 0.85])
def test_rate_code_counts_and_gradients_equal_the_step_by_step_neuron(reset, beta):
    g = torch.Generator().manual_seed(hash((reset, beta)) % 1000)
    I = (torch.rand(40, 9, generator=g, dtype=torch.float64) * 1.8 - 0.4).requires_grad_()
    go = torch.randn(40, 9, generator=g, dtype=torch.float64)
    T = 11
    fast = RateCode.apply(I, T, beta, reset, 25.0)
    ref = lif(I.expand(T, *I.shape), beta, 1.0, 25.0, reset=reset)[0].sum(0)
    assert torch.equal(fast, ref)
    (g_fast,) = torch.autograd.grad(fast, I, go)
    (g_ref,) = torch.autograd.grad(ref, I, go)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)
    assert g_fast.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reset,beta", [("subtract", 1.0), ("zero", 0.9), ("subtract", 0.8)])
def test_compiled_rate_code_equals_the_tensor_reference(reset, beta, dtype):
    from keenlm.spiking import kernels as spiking_kernels
    from keenlm.spiking.neurons import _rate_code_torch

    assert spiking_kernels.available(), "numba is part of the test environment"
    g = torch.Generator().manual_seed(5)
    cur = (torch.rand(3, 257, 33, generator=g) * 2.4 - 0.6).to(dtype)
    cur[0, 0, :3] = torch.tensor([float("inf"), -float("inf"), 1.0])
    for need in (False, True):
        fast, fast_sens = spiking_kernels.rate_code_kernel(cur, 13, beta, reset, 25.0, need)
        ref, ref_sens = _rate_code_torch(cur, 13, beta, reset, 25.0, need)
        finite = torch.isfinite(cur)
        assert torch.equal(fast[finite], ref[finite])
        if need:
            torch.testing.assert_close(fast_sens[finite], ref_sens[finite], rtol=1e-5, atol=1e-6)
            assert torch.isfinite(fast_sens).all()
        else:
            assert fast_sens is None


def test_conversion_error_falls_as_the_time_steps_grow():
    """Rate coding of random values: the error halves with each doubling of T and stays within
    lambda / (2T) with rounding (lambda / T without); values beyond lambda saturate."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 8, generator=g)
    scale = torch.full((8,), 2.0)
    errors = {}
    for rnd in (True, False):
        prev = None
        for T in (4, 8, 16, 32, 64):
            dec, counts = rate_code(x, scale, SpikeConfig(steps=T, round=rnd))
            err = (dec - x.clamp(-2, 2)).abs()
            assert err.max() <= 2.0 / (2 * T if rnd else T) + 1e-5
            assert counts.max() <= T and counts.min() >= 0
            if prev is not None:
                assert err.mean() < 0.6 * prev
            prev = float(err.mean())
            errors[rnd, T] = prev
    assert errors[True, 16] < errors[False, 16]


def spiking_cfg(**spike):
    return ModelConfig(vocab_size=61, n_layer=2, d_model=32, n_head=4, d_ff=48, max_seq_len=16,
                       attention="naive", spike=SpikeConfig(**{"steps": 6, **spike}))


@pytest.mark.parametrize("spike", [{}, {"reset": "zero", "beta": 0.9}, {"round": False}])
def test_spiking_layer_equals_its_event_driven_reference(spike):
    cfg = spiking_cfg(**spike)
    torch.manual_seed(0)
    net = build_model(cfg)
    layer = net.layers[0].mlp
    assert isinstance(layer, SpikingFFN)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.in_scale.copy_(torch.rand(32, generator=g) + 0.5)
        layer.hidden_scale.copy_(torch.rand(48, generator=g) * 0.05 + 0.01)
    x = torch.randn(3, 5, 32, generator=g, dtype=torch.float64)
    layer = layer.double()
    with torch.no_grad():
        fast, ref = layer(x), spiking_reference(layer, x)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-12)
    assert fast.abs().sum() > 0


def _calib(vocab, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (4, 16), generator=g) for _ in range(n)]


def test_converted_model_approaches_the_dense_model_as_t_grows():
    cfg = dataclasses.replace(spiking_cfg(), spike=SpikeConfig())
    torch.manual_seed(3)
    dense = build_model(cfg).eval()
    x = _calib(61, 1, seed=9)[0]
    with torch.no_grad():
        want = dense(x)
    errors = []
    for T in (4, 16, 64):
        net = build_model(cfg).eval()
        net.load_state_dict(dense.state_dict())
        convert(net, SpikeConfig(steps=T, percentile=100.0), _calib(61))
        assert all(isinstance(layer.mlp, SpikingFFN) for layer in net.layers)
        assert net.cfg.spike.steps == T
        with torch.no_grad():
            errors.append(float((net(x) - want).abs().mean()))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.2 * errors[0]
    with pytest.raises(ValueError, match="steps"):
        convert(build_model(cfg), SpikeConfig(steps=0), _calib(61))
    with pytest.raises(ValueError, match="ffn"):
        convert(build_model(dataclasses.replace(cfg, ffn="moe")), SpikeConfig(steps=4), _calib(61))


def test_synaptic_operations_and_energy_match_a_brute_force_count():
    cfg = spiking_cfg(steps=5)
    torch.manual_seed(4)
    net = build_model(cfg).eval()
    dense = build_model(dataclasses.replace(cfg, spike=SpikeConfig())).eval()
    convert(net, SpikeConfig(steps=5), _calib(61))
    x = _calib(61, 1, seed=5)[0]
    captured = []
    for layer in spiking_layers(net):  # the layer's input, to count its spikes by hand
        layer.register_forward_pre_hook(lambda m, a: captured.append((m, a[0].detach().clone())))
    with torch.no_grad():
        net(x)
    stats = [m.take_stats() for m in spiking_layers(net)]
    brute_synops = 0
    C, F, T = 32, 48, 5
    for (m, inp), st in zip(captured, stats):
        # count spike by spike with the reference neuron, fan-out by fan-out
        cur = inp / m.in_scale
        cur = torch.cat([cur, -cur], -1) + 0.5 / T
        s_in = lif(cur.expand(T, *cur.shape), 1.0)[0]
        dec = (s_in.sum(0)[..., :C] - s_in.sum(0)[..., C:]) * m.in_scale / T
        a = m.hidden(dec)
        cur = a / m.hidden_scale
        cur = torch.cat([cur, -cur], -1) + 0.5 / T
        s_h = lif(cur.expand(T, *cur.shape), 1.0)[0]
        n_tok = inp.numel() // C
        for spike in s_in.flatten().tolist():
            brute_synops += int(spike) * 2 * F  # each input spike reaches the gate and up rows
        for spike in s_h.flatten().tolist():
            brute_synops += int(spike) * C
        assert st["in_spikes"] == pytest.approx(float(s_in.sum()) / n_tok)
        assert st["in_rate"] == pytest.approx(float(s_in.sum()) / (n_tok * 2 * C * T))
    e = spike_energy(net, stats, seq_len=16)
    n_tok = x.numel()
    assert e["synops_per_token"] == pytest.approx(brute_synops / n_tok)
    assert e["macs_per_token_dense_ffn"] == 2 * 3 * C * F
    macs_model = sum(m.weight.numel() for m in dense.modules() if isinstance(m, torch.nn.Linear))
    attn = 2 * 16 * 32  # per layer: q k^T and probs v over 16 keys of width 32, MACs
    other = macs_model + 2 * attn - 2 * 3 * C * F
    naive_dense = (2 * 3 * C * F + 2 * 3 * F) * 4.6e-12
    assert e["ffn_energy_j"]["naive"]["dense"] == pytest.approx(naive_dense)
    assert e["model_energy_j"]["naive"]["dense"] == pytest.approx(naive_dense + other * 4.6e-12)
    naive_spiking = e["synops_per_token"] * 0.9e-12 + 2 * (C + 4 * F) * 4.6e-12
    assert e["ffn_energy_j"]["naive"]["spiking"] == pytest.approx(naive_spiking)
    # the memory-inclusive estimate only adds
    for kind in ("spiking", "dense"):
        assert e["ffn_energy_j"]["memory"][kind] > e["ffn_energy_j"]["naive"][kind]
    with pytest.raises(ValueError, match="statistics"):
        spike_energy(net, stats[:1], seq_len=16)


def test_spiking_model_validates_its_config():
    with pytest.raises(ValueError, match="model.spike.beta"):
        SpikeConfig(beta=0.0)
    with pytest.raises(ValueError, match="model.spike.reset"):
        SpikeConfig(reset="half")
    with pytest.raises(ValueError, match="model.ffn"):
        ModelConfig(ffn="moe", spike=SpikeConfig(steps=4))
    with pytest.raises(ValueError, match="model.linear"):
        ModelConfig(linear="ternary", spike=SpikeConfig(steps=4))


def _train_cfg(corpus, tmp_path, name, **over):
    base = {"data": {"corpus": str(corpus), "tokenizer": "byte", "max_bytes": 0,
                     "cache_dir": str(tmp_path / "cache")},
            "model": {"n_layer": 2, "d_model": 32, "n_head": 4, "d_ff": 64, "max_seq_len": 32},
            "train": {"batch_size": 4, "seq_len": 32, "steps": 6, "eval_every": 0,
                      "eval_batches": 2, "dtype": "fp32", "out_dir": str(tmp_path / name),
                      "progress": False, "log_every": 1}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v}
    return from_dict(base)


def test_fine_tuning_converts_a_dense_run_trains_through_the_spikes_and_reloads(tmp_path, small_corpus):
    import json

    import keenlm
    from keenlm.runs import read_jsonl
    from keenlm.train import Trainer

    Trainer(_train_cfg(small_corpus, tmp_path, "dense")).fit()
    cfg = _train_cfg(small_corpus, tmp_path, "spiking",
                     model={"spike": {"steps": 4, "calibrate": 2}},
                     train={"init_from": str(tmp_path / "dense"), "steps": 4})
    tr = Trainer(cfg, init=keenlm.load(tmp_path / "dense"))
    layers = spiking_layers(tr.model)
    assert len(layers) == 2 and tr.cfg.model.spike.steps == 4
    assert all(float(m.in_scale.min()) > 0 and not torch.equal(m.in_scale, torch.ones(32))
               for m in layers), "threshold balancing set the scales"
    before = [p.detach().clone() for p in layers[0].parameters()]
    tr.fit()
    after = list(layers[0].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the surrogate trains the FFN"
    recs = [r for r in read_jsonl(tmp_path / "spiking" / "metrics.jsonl") if r["kind"] == "train"]
    assert all(0 < r["spike_in_rate"] < 1 and 0 < r["spike_hidden_rate"] < 1 for r in recs)
    ledger = json.loads((tmp_path / "spiking" / "ledger.json").read_text())
    assert ledger["extra"]["spiking"]["steps"] == 4 and ledger["extra"]["spiking"]["synops_per_token"] > 0
    km = keenlm.load(tmp_path / "spiking")
    assert isinstance(km.net.layers[0].mlp, SpikingFFN)
    torch.testing.assert_close(km.net.layers[1].mlp.hidden_scale, layers[1].hidden_scale)
    x = torch.randint(0, km.tokenizer.vocab_size, (2, 16))
    tr.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(km.net(x), tr.model(x))
    # a spiking model needs spiking steps to go on from
    bad = _train_cfg(small_corpus, tmp_path, "again", train={"init_from": str(tmp_path / "spiking")})
    with pytest.raises(ValueError, match="model.spike.steps"):
        keenlm.train(bad)
    assert type(build_model(dataclasses.replace(km.config.model, spike=SpikeConfig())).layers[0].mlp) is SwiGLU
    from keenlm.io.gguf_export import export_gguf
    from keenlm.io.hf import export_hf

    with pytest.raises(ValueError, match="spiking"):
        export_hf(km.net, km.tokenizer, tmp_path / "hf")
    with pytest.raises(ValueError, match="spiking"):
        export_gguf(km.net, km.tokenizer, tmp_path / "m.gguf")


def test_spike_study_runs_end_to_end_and_resumes(tmp_path, small_corpus):
    from keenlm.studies.spike import spike

    over = {"data": {"corpus": str(small_corpus), "tokenizer": "byte", "max_bytes": 0,
                     "cache_dir": str(tmp_path / "cache")},
            "model": {"max_seq_len": 32},
            "train": {"batch_size": 2, "seq_len": 32, "eval": {"batches": 2},
                      "runtime": {"dtype": "fp32"}}}
    kw = dict(depth=1, tokens=64 * 20, steps=(2, 4), finetune_steps=3, calibrate=2,
              overrides=over, log=lambda s: None)
    res = spike(tmp_path / "s", **kw)
    names = [r["name"] for r in res["rows"]]
    assert names == ["dense", "dense+ft", "ft-if-subtract-T2", "ft-if-subtract-T4",
                     "ft-lif-zero-T2", "ft-lif-zero-T4"]
    assert len(res["spiking"]) == 4
    for r in res["spiking"]:
        e = r["energy"]
        assert 0 < e["in_rate"] < 1 and e["synops_per_token"] > 0
        assert e["ffn_energy_j"]["memory"]["spiking"] > e["ffn_energy_j"]["naive"]["spiking"]
        assert r["gap"] == pytest.approx(r["finetuned"] / res["rows"][0]["val_loss"] - 1)
    # more steps, more synaptic operations (same model, same data)
    by = {(r["neuron"], r["steps"]): r for r in res["spiking"]}
    assert by["if-subtract", 4]["energy"]["synops_per_token"] > by["if-subtract", 2]["energy"]["synops_per_token"]
    assert (tmp_path / "s" / "results.md").read_text().count("| if-subtract |") == 2
    again = spike(tmp_path / "s", **kw)
    assert again["rows"] == res["rows"]


def test_spike_command_reports_saves_and_exports(tmp_path, small_corpus, capsys):
    import json

    import keenlm
    from keenlm.cli import main
    from keenlm.train import Trainer

    Trainer(_train_cfg(small_corpus, tmp_path, "dense")).fit()
    run = str(tmp_path / "dense")
    assert main(["spike", run, "--steps", "2,4", "--calibrate", "2", "--batches", "2",
                 "--batch-size", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["steps"] for r in res["rows"]] == [2, 4]
    for r in res["rows"]:
        assert r["gap"] == pytest.approx(r["loss"] / res["dense"]["loss"] - 1)
        assert 0 < r["in_rate"] < 1 and 0 < r["synops_over_macs"]
        assert set(r["ffn_ratio"]) == {"naive", "memory"}
    out, nir_file = tmp_path / "spiking", tmp_path / "model.nir"
    assert main(["spike", run, "--steps", "3", "--calibrate", "2", "--batches", "1",
                 "--batch-size", "2", "--reset", "zero", "--beta", "0.9", "--out", str(out),
                 "--nir", str(nir_file)]) == 0
    text = capsys.readouterr().out
    assert "T=  3: val loss" in text and "memory-inclusive" in text
    assert main(["info", str(out)]) == 0
    assert "T=3 steps, beta 0.9, reset zero" in capsys.readouterr().out
    km = keenlm.load(out)
    assert km.config.model.spike.steps == 3 and km.config.model.spike.reset == "zero"
    assert nir_file.exists()
    # a spiking model is evaluated with its own scales at other T
    assert main(["spike", str(out), "--steps", "5", "--batches", "1", "--batch-size", "2",
                 "--nir", str(tmp_path / "t5.nir")]) == 0  # its own neuron: reset zero, exports
    assert "T=  5" in capsys.readouterr().out
    # NIR needs the zero reset; several T cannot be saved as one model
    assert main(["spike", run, "--steps", "2", "--calibrate", "1", "--batches", "1",
                 "--batch-size", "2", "--nir", str(tmp_path / "x.nir")]) == 2
    assert "subtraction" in capsys.readouterr().err
    assert main(["spike", run, "--steps", "2,4", "--out", str(tmp_path / "y")]) == 2
    assert main(["spike", run, "--steps", "four"]) == 2
    assert "--steps 'four': give comma-separated integers" in capsys.readouterr().err
