"""Scaling-law fits: known constants recovered from noisy synthetic runs, the closed-form
compute-optimal allocation, approach 2 on exact isoFLOP profiles."""

import numpy as np
import pytest

from keenlm.scaling.fit import PRESETS, Law, bootstrap, fit_law, isoflop_fit

TRUE = Law(E=1.8, A=300.0, alpha=0.35, B=900.0, beta=0.3)


def _runs(law, noise, seed=0):
    rng = np.random.default_rng(seed)
    n = np.repeat(np.geomspace(1e5, 3e7, 7), 5)
    d = np.tile(np.geomspace(2e6, 2e9, 5), 7)
    return n, d, law.loss(n, d) * np.exp(rng.normal(0, noise, n.shape))


def test_fit_recovers_known_constants_from_noisy_runs():
    n, d, loss = _runs(TRUE, 0.005)
    law = fit_law(n, loss, d).law
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.05)
    assert law.beta == pytest.approx(TRUE.beta, abs=0.05)
    assert law.E == pytest.approx(TRUE.E, rel=0.05)
    assert np.log(law.A) == pytest.approx(np.log(TRUE.A), abs=0.6)
    assert np.log(law.B) == pytest.approx(np.log(TRUE.B), abs=0.6)
    # and predicts beyond the data within 1%
    assert law.loss(1e8, 1e10) == pytest.approx(TRUE.loss(1e8, 1e10), rel=0.01)


def test_one_variable_fit_and_its_bootstrap_interval_cover_the_truth():
    truth = Law(E=2.0, A=50.0, alpha=0.4)
    rng = np.random.default_rng(1)
    n = np.geomspace(2e4, 2e6, 8)
    loss = truth.loss(n) * np.exp(rng.normal(0, 0.003, n.shape))
    law = fit_law(n, loss).law
    assert law.alpha == pytest.approx(0.4, abs=0.08) and law.E == pytest.approx(2.0, rel=0.03)
    ci = bootstrap(n, loss, samples=40, query_n=[8e6])
    low, high = ci["prediction"]["low"][0], ci["prediction"]["high"][0]
    assert low <= truth.loss(8e6) <= high and high - low < 0.05
    assert ci["constants"]["alpha"][0] <= law.alpha <= ci["constants"]["alpha"][1]


def test_compute_optimal_allocation_is_the_closed_form_minimum():
    for law in (TRUE, *PRESETS.values()):
        for c in (1e15, 1e19, 1e23):
            n_opt, d_opt = law.optimal(c)
            assert 6 * n_opt * d_opt == pytest.approx(c, rel=1e-9)
            grid = np.geomspace(n_opt / 30, n_opt * 30, 20001)
            numeric = grid[np.argmin(law.loss(grid, c / (6 * grid)))]
            assert numeric == pytest.approx(n_opt, rel=2e-3)
    # Chinchilla's published allocation: about 20 tokens per parameter near 1e23-1e24 FLOPs
    n, d = PRESETS["epoch"].optimal(5.76e23)
    assert 10 < d / n < 40


def test_isoflop_approach_recovers_the_allocation_exponent():
    n_all, l_all, c_all = [], [], []
    for c in (1e16, 1e17, 1e18, 1e19):
        n_opt = TRUE.optimal(c)[0]
        n = n_opt * np.geomspace(0.25, 4, 9)
        n_all += list(n)
        l_all += list(TRUE.loss(n, c / (6 * n)))
        c_all += [c] * len(n)
    res = isoflop_fit(n_all, l_all, c_all)
    assert res["n_exponent"] == pytest.approx(TRUE.beta / (TRUE.alpha + TRUE.beta), abs=0.02)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="at least 5"):
        fit_law([1e5, 2e5, 3e5], [3.0, 2.9, 2.8], [1e6] * 3)
    with pytest.raises(ValueError, match="positive"):
        fit_law([1e5, -2e5, 3e5], [3.0, 2.9, 2.8])
    with pytest.raises(ValueError, match="needs D"):
        TRUE.loss(1e6)
    with pytest.raises(ValueError, match="two-variable"):
        Law(E=1.0, A=1.0, alpha=0.3).optimal(1e18)
    with pytest.raises(ValueError, match="isoFLOP"):
        isoflop_fit([1e5, 2e5], [3.0, 2.9], [1e15, 1e15])
