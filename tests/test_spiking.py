"""Spiking neurons: the LIF response against its closed form, a finite surrogate gradient at
extreme membrane values, spike counting against a brute-force count."""
import pytest
import torch

from keenlm.model.spiking import SpikeFn, lif, spike_counts


def test_lif_follows_its_closed_form_below_threshold_and_fires_when_it_crosses():
    beta, current, T = 0.9, 0.05, 30
    I = torch.full((T, 1), current)
    spikes, v = lif(I, beta, threshold=10.0)  # never reached: 0.05 / 0.1 = 0.5 at most
    assert spikes.sum() == 0
    assert v.item() == pytest.approx(current * (1 - beta ** T) / (1 - beta), rel=1e-5)
    # with threshold 0.3: the first spike is at the first t with I (1 - beta^t) / (1 - beta) >= 0.3
    spikes, _ = lif(I, beta, threshold=0.3)
    first = next(t for t in range(1, T + 1) if current * (1 - beta ** t) / (1 - beta) >= 0.3)
    assert spikes[:, 0].nonzero()[0].item() == first - 1  # index 0 is t = 1
    # reset by subtraction: the overshoot is kept, so the potential stays below threshold after
    spikes, v = lif(torch.full((200, 1), 0.5), 0.0, threshold=1.0)  # beta 0: v = I each step
    assert spikes.sum() == 0
    spikes, _ = lif(torch.full((10, 1), 1.5), 0.0, threshold=1.0)
    assert spikes.sum() == 10  # 1.5 >= 1 every step, the 0.5 left is forgotten (beta 0)


def test_surrogate_gradient_is_finite_at_extreme_membrane_values():
    x = torch.tensor([-float("inf"), -1e30, -1e4, -1.0, 0.0, 1e-8, 1.0, 1e4, 1e30, float("inf")],
                     requires_grad=True)
    s = SpikeFn.apply(x, 25.0)
    assert s.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    (g,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(g).all() and g.max() == 1.0 and g[0] == 0 and g[-1] == 0
    # through a whole LIF run with huge inputs too
    I = (torch.randn(8, 16) * 1e20).requires_grad_(True)
    spikes, _ = lif(I, 0.9)
    (gi,) = torch.autograd.grad(spikes.sum(), I)
    assert torch.isfinite(gi).all()


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
    with pytest.raises(ValueError, match="beta"):
        lif(torch.zeros(2, 2), 1.0)
