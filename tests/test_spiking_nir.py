"""NIR export of spiking feed-forward layers: written, read back with nir.read, imported into
snnTorch and simulated there; its spike trains are identical to keenlm's own simulation."""
import dataclasses

import nir  # keenlm[neuro]; the dev extra installs it
import numpy as np
import pytest
import torch

from keenlm.config import ModelConfig, SpikeConfig
from keenlm.model import build_model
from keenlm.spiking.ffn import convert
from keenlm.spiking.neurons import lif, rate_code
from keenlm.spiking.nir import export_nir


def converted(**spike):
    cfg = ModelConfig(vocab_size=61, n_layer=2, d_model=32, n_head=4, d_ff=48, max_seq_len=16,
                      attention="naive")
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    convert(net, SpikeConfig(**spike), [torch.randint(0, 61, (4, 16), generator=g) for _ in range(2)])
    return net


def simulate_snntorch(graph, x, steps):
    """Run an imported stage for ``steps`` steps on constant input x: (spikes (T, ...), output
    currents summed over the steps)."""
    import snntorch.utils
    from snntorch.import_nir import import_from_nir

    net = import_from_nir(graph)
    leaky = [m for m in net.modules() if type(m).__name__ == "Leaky"]
    assert len(leaky) == 1
    spikes = []
    leaky[0].register_forward_hook(
        lambda m, i, o: spikes.append((o[0] if isinstance(o, tuple) else o).detach().clone()))
    snntorch.utils.reset(net)
    total = 0
    with torch.no_grad():
        for _ in range(steps):
            out = net(x)
            total = total + (out[0] if isinstance(out, tuple) else out)
    return torch.stack(spikes), total


def keenlm_spikes(values, scale, spike):
    cur = values * (1.0 / scale)
    cur = torch.cat([cur, -cur], dim=-1) + (0.5 / spike.steps if spike.round else 0.0)
    return lif(cur.expand(spike.steps, *cur.shape), spike.beta, 1.0, reset=spike.reset)[0]


@pytest.mark.parametrize("beta", [0.9, 0.75])
def test_nir_round_trip_through_snntorch_gives_identical_spike_trains(tmp_path, beta):
    net = converted(steps=8, reset="zero", beta=beta)
    spike = net.cfg.spike
    path = export_nir(net, tmp_path / "model.nir")
    graph = nir.read(str(path))
    assert {"layers.0.in", "layers.0.out", "layers.1.in", "layers.1.out"} <= set(graph.nodes)
    g = torch.Generator().manual_seed(2)
    for i, layer in enumerate(net.layers):
        m = layer.mlp
        x = torch.randn(64, 32, generator=g) * m.in_scale * 0.8
        a = m.hidden(rate_code(x, m.in_scale, spike)[0])
        for stage, values, scale, weight in (
                ("in", x, m.in_scale, torch.cat([m.gate_proj.weight, m.up_proj.weight])),
                ("out", a, m.hidden_scale, m.down_proj.weight)):
            got, total = simulate_snntorch(graph.nodes[f"layers.{i}.{stage}"], values, spike.steps)
            want = keenlm_spikes(values, scale, spike)
            assert 0 < want.sum() < want.numel() / 2, "a test with spikes, not all or none"
            assert torch.equal(got, want), f"layers.{i}.{stage}: spike trains differ"
            decoded = rate_code(values, scale, spike)[0]
            torch.testing.assert_close(total, torch.nn.functional.linear(decoded, weight),
                                       rtol=1e-4, atol=1e-5)


def test_nir_export_writes_the_neurons_and_refuses_what_nir_cannot_hold(tmp_path):
    net = converted(steps=4, reset="zero", beta=1.0)
    graph = nir.read(str(export_nir(net, tmp_path / "if.nir")))
    neuron = graph.nodes["layers.0.in"].nodes["neurons"]
    assert isinstance(neuron, nir.IF) and np.all(neuron.v_threshold == 1) and np.all(neuron.v_reset == 0)
    enc = graph.nodes["layers.1.out"].nodes["encode"]
    assert enc.weight.shape == (96, 48) and np.allclose(enc.bias, 0.5 / 4)
    with pytest.raises(ValueError, match="subtraction"):
        export_nir(converted(steps=4), tmp_path / "sub.nir")
    assert not (tmp_path / "sub.nir").exists()
    dense = build_model(dataclasses.replace(net.cfg, spike=SpikeConfig()))
    with pytest.raises(ValueError, match="no spiking layers"):
        export_nir(dense, tmp_path / "dense.nir")
