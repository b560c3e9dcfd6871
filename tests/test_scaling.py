"""Scaling-law fits: known constants recovered from noisy synthetic runs, the closed-form
compute-optimal allocation, approach 2 on exact isoFLOP profiles."""

import json

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


# ------------------------------------------------------------------------------ sweeps


def _base(corpus, cache) -> dict:
    return {"data": {"corpus": str(corpus), "tokenizer": "byte", "cache_dir": str(cache)},
            "model": {"max_seq_len": 32},
            "train": {"batch_size": 2, "seq_len": 32, "eval_every": 0, "eval_batches": 2,
                      "progress": False}}


def test_grid_and_isoflop_plans(tmp_path, small_corpus):
    from keenlm.scaling.sweep import grid, isoflop, model_params

    base = _base(small_corpus, tmp_path / "cache")
    trials = grid(base, [1, 2], [640, 1000])
    assert [t.name for t in trials] == ["d1-t640", "d1-t1024", "d2-t640", "d2-t1024"]
    assert trials[2].config["model"]["d_model"] == 64 and trials[0].config["train"]["steps"] == 10
    iso = isoflop(base, [1, 2, 3], [1e9])
    n = [model_params(t.config)["non_embedding"] for t in iso]
    assert all(abs(6 * k * t.tokens - 1e9) < 6 * k * 64 for k, t in zip(n, iso))  # whole steps
    assert all(t.budget == 1e9 for t in iso) and all(t.budget == 0 for t in trials)
    with pytest.raises(ValueError, match="depths"):
        grid(base, [], [640])


def test_sweep_interrupted_halfway_resumes_without_redoing_finished_trials(tmp_path, small_corpus):
    from keenlm.scaling.sweep import grid, run_sweep

    trials = grid(_base(small_corpus, tmp_path / "cache"), [1, 2], [640, 1280])
    seen = []

    def stop_after_two(rec):
        seen.append(rec["name"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(trials, tmp_path / "sw", log=None, on_result=stop_after_two)
    done = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "sw").glob("trials/*/trial.json")}
    assert sorted(done) == sorted(seen[:2])
    ran = []
    res = run_sweep(trials, tmp_path / "sw", log=ran.append)
    assert len(res["results"]) == 4 and not res["failed"]
    assert {p.parent.name: p.stat().st_mtime_ns
            for p in (tmp_path / "sw").glob("trials/*/trial.json") if p.parent.name in done} == done
    # finished trials are reported from their trial.json, the others were trained now
    assert all(r["val_loss"] > 0 and r["params_non_embedding"] < r["params"] for r in res["results"])


def test_a_failing_trial_is_retried_once_then_reported(tmp_path, small_corpus, monkeypatch):
    from keenlm.scaling import sweep

    trials = sweep.grid(_base(small_corpus, tmp_path / "cache"), [1], [640, 1280])
    real, calls = sweep.run_trial, []

    def flaky(trial, out, threads=0):
        calls.append(trial.name)
        if trial.name == "d1-t1280" or calls.count(trial.name) == 1:
            raise RuntimeError(f"boom {trial.name}")
        return real(trial, out, threads)

    monkeypatch.setattr(sweep, "run_trial", flaky)
    logs = []
    res = sweep.run_sweep(trials, tmp_path / "sw", log=logs.append)
    assert calls.count("d1-t640") == 2 and calls.count("d1-t1280") == 2  # one retry each
    assert [r["name"] for r in res["results"]] == ["d1-t640"]
    assert res["failed"] == {"d1-t1280": "RuntimeError: boom d1-t1280"}
    assert any("retrying" in s for s in logs)


def test_ray_backend_runs_two_trials(tmp_path, small_corpus):
    pytest.importorskip("ray")
    from keenlm.scaling.sweep import grid, run_sweep

    trials = grid(_base(small_corpus, tmp_path / "cache"), [1], [640, 1280])
    res = run_sweep(trials, tmp_path / "sw", backend="ray", log=None)
    assert [r["name"] for r in res["results"]] == ["d1-t640", "d1-t1280"] and not res["failed"]
    assert all((tmp_path / "sw" / "trials" / t.name / "model.safetensors").exists()
               or list((tmp_path / "sw" / "trials" / t.name).glob("checkpoints/*")) for t in trials)


def test_prediction_check_predicts_before_training_the_target(tmp_path, small_corpus):
    from keenlm.scaling.check import prediction_check

    r = prediction_check(tmp_path / "chk", fit_depths=(1, 2, 3, 4), fit_tokens=(640, 1280),
                         targets=((5, 1280), (6, 640)),
                         base=_base(small_corpus, tmp_path / "cache"), samples=10,
                         log=lambda s: None)
    pred = tmp_path / "chk" / "prediction.json"
    for t in r["targets"]:
        trained = tmp_path / "chk" / "trials" / t["name"] / "trial.json"
        assert pred.stat().st_mtime_ns < trained.stat().st_mtime_ns
    assert r["design"]["fit_span"] > 10 and min(r["design"]["target_over_largest"]) > 1.5
    saved = json.loads(pred.read_text())
    # two forms x two counts, each predicted at both targets; the choice made by the backtest
    assert saved["chosen"]["by"] == "backtest" and set(saved["fits"]) == {"chinchilla", "kaplan"}
    assert len(r["scores"]) == 8 and sum(s["chosen"] for s in r["scores"]) == 2
    assert all(0 <= s["error"] < 1 for s in r["scores"])
    # the stated interval holds the bootstrap's and the backtest error around the prediction
    for form in ("chinchilla", "kaplan"):
        for count in ("non_embedding", "total"):
            p, err = saved["fits"][form][count]["prediction"], saved["backtest"][form][count]
            for i in range(2):
                assert p["low"][i] == min(p["bootstrap_low"][i], p["loss"][i] * (1 - err))
                assert p["high"][i] == max(p["bootstrap_high"][i], p["loss"][i] * (1 + err))
    assert (tmp_path / "chk" / "scaling.svg").exists()
    text = (tmp_path / "chk" / "results.md").read_text()
    assert "| **d5-t1280** | **" in text and "Epoch AI" in text
    # a resumed check keeps its predictions; asking it for other targets is refused
    again = prediction_check(tmp_path / "chk", fit_depths=(1, 2, 3, 4), fit_tokens=(640, 1280),
                             targets=((5, 1280), (6, 640)),
                             base=_base(small_corpus, tmp_path / "cache"), samples=10,
                             log=lambda s: None)
    assert again["predictions"] == saved
    with pytest.raises(ValueError, match="other targets"):
        prediction_check(tmp_path / "chk", fit_depths=(1, 2, 3, 4), fit_tokens=(640, 1280),
                         targets=((6, 1280),), base=_base(small_corpus, tmp_path / "cache"),
                         samples=10, log=lambda s: None)


def test_the_kaplan_form_recovers_its_constants_and_the_backtest_picks_the_true_form():
    from keenlm.scaling.check import _backtest

    truth = Law(E=1.5, A=1e5, alpha=0.3, B=3e5, beta=0.4, form="kaplan")
    rng = np.random.default_rng(0)
    n = np.repeat(np.geomspace(1e4, 2e6, 5), 2)
    d = np.tile([1e6, 4e6], 5)
    loss = truth.loss(n, d) * np.exp(rng.normal(0, 0.001, n.shape))
    law = fit_law(n, loss, d, form="kaplan").law
    assert law.form == "kaplan" and law.alpha == pytest.approx(0.3, abs=0.05)
    assert law.E == pytest.approx(1.5, rel=0.1)  # 10 runs pin E only loosely
    assert law.loss(8e6, 2e6) == pytest.approx(truth.loss(8e6, 2e6), rel=0.01)
    runs = [{"depth": i // 2, "tokens": int(dd), "val_loss": float(v), "params": int(nn),
             "params_non_embedding": int(nn)} for i, (nn, dd, v) in enumerate(zip(n, d, loss))]
    errors = {f: _backtest(runs, f, "params") for f in ("chinchilla", "kaplan")}
    assert errors["kaplan"] < errors["chinchilla"]
    with pytest.raises(ValueError, match="needs D"):
        law.loss(1e6)
    with pytest.raises(ValueError, match="chinchilla form"):
        law.optimal(1e18)
    with pytest.raises(ValueError, match="form 'x'"):
        Law(E=1, A=1, alpha=1, form="x")


def test_scale_commands_sweep_fit_predict_plan(tmp_path, small_corpus, capsys):
    import json

    from keenlm.cli import main

    cfg = tmp_path / "base.json"
    base = _base(small_corpus, tmp_path / "cache")
    cfg.write_text(json.dumps({k: v for k, v in base.items() if k != "train"} |
                              {"train": {"eval_batches": 2}}))
    out = str(tmp_path / "sw")
    common = ["--config", str(cfg), "--seq-len", "32", "--batch-size", "2"]
    assert main(["scale", "sweep", out, "--depths", "1,2,3", "--tokens", "640,1280", *common]) == 0
    assert "6 trials finished, 0 failed" in capsys.readouterr().out
    assert main(["scale", "fit", out, "--samples", "5"]) == 0
    text = capsys.readouterr().out
    assert "L(N, D) with N non_embedding: E" in text and "L(N, D) with N total" in text
    fit = json.loads((tmp_path / "sw" / "fit.json").read_text())
    assert fit["runs"] == 6 and len(fit["total"]["laws"]) == 5
    assert main(["scale", "predict", out, "--depth", "4", "--tokens", "2560", "--samples", "5"]) == 0
    assert "depth 4 (" in capsys.readouterr().out
    assert main(["scale", "plan", "--flops", "1e21", "--law", "chinchilla"]) == 0
    assert "train N = " in capsys.readouterr().out
    assert main(["scale", "plan", "--flops", "1e12", "--law", out, "--samples", "5"]) == 0
    assert "(90%)" in capsys.readouterr().out
    assert main(["scale", "plan", "--flops", "-1"]) == 2
    assert "positive" in capsys.readouterr().err


def test_a_finished_trial_is_not_reused_for_another_config(tmp_path, small_corpus):
    from keenlm.scaling.sweep import grid, run_trial

    base = _base(small_corpus, tmp_path / "cache")
    trial = grid(base, [1], [640])[0]
    first = run_trial(trial, tmp_path / "sw")
    assert run_trial(trial, tmp_path / "sw") == first  # reused as is
    other = grid({**base, "train": {**base["train"], "batch_size": 4, "seq_len": 16}}, [1], [640])[0]
    assert other.name == trial.name
    with pytest.raises(ValueError, match="another config"):
        run_trial(other, tmp_path / "sw")


def test_the_check_tunes_the_learning_rate_per_size_before_fitting(tmp_path, small_corpus):
    from keenlm.scaling.check import prediction_check

    kw = dict(fit_depths=(1, 2, 3), fit_tokens=(640, 1280), targets=((4, 640),),
              base=_base(small_corpus, tmp_path / "cache"), samples=10, log=lambda s: None,
              aspect=16, head_dim=16)  # a narrower size dial than the default 32
    r = prediction_check(tmp_path / "chk", lr_sweep=(0.5, 1.0), **kw)
    for run in r["runs"] + r["targets"]:  # the sweep's, the fitted and the target's runs
        assert run["config"]["model"]["d_model"] == 16 * run["depth"]
    lr = r["lr_sweep"]
    assert lr["tokens"] == 640 and set(lr["per_depth"]) == {"1", "2", "3"}
    for d, v in lr["per_depth"].items():
        assert len(v["losses"]) == 2  # each multiplier trained once at the smallest token count
        assert v["losses"][f"{v['lr']:.3g}"] == min(v["losses"].values())
        # every fitted run of that depth uses the best rate
        for run in (x for x in r["runs"] if x["depth"] == int(d)):
            assert run["config"]["train"]["optim"]["lr"] == v["lr"]
    # the target's rate is the power law's, written into prediction.json before it trained
    saved = json.loads((tmp_path / "chk" / "prediction.json").read_text())
    law, target = saved["lr"]["law"], saved["targets"][0]
    expect = float(np.exp(law["a"]) * target["non_embedding"] ** law["b"])
    assert target["lr"] == pytest.approx(expect, rel=5e-3)
    assert r["targets"][0]["config"]["train"]["optim"]["lr"] == target["lr"]
    text = (tmp_path / "chk" / "results.md").read_text()
    assert "Learning rate, tuned first" in text and "d_model = 16 x depth" in text
    with pytest.raises(ValueError, match="distinct positive"):
        prediction_check(tmp_path / "bad", lr_sweep=(1.0, 1.0), **kw)
