"""The second scaling law in training: fixed unique data repeated (epochs), GRPO group size."""
import json

import numpy as np
import pytest


def test_train_tokens_keeps_the_first_tokens_of_the_split(tmp_path, small_corpus):
    from keenlm.config import ConfigError, DataConfig, from_dict
    from keenlm.data import limit_train, prepare_data
    from keenlm.train import Trainer

    tok, data = prepare_data(DataConfig(corpus=str(small_corpus), tokenizer="byte",
                                        cache_dir=str(tmp_path / "cache")))
    kept = limit_train(data, 1000)
    assert len(kept.train) == 1000 and np.array_equal(kept.train, data.train[:1000])
    assert np.array_equal(kept.val, data.val) and limit_train(data, 0) is data
    with pytest.raises(ValueError, match="train_tokens"):
        limit_train(data, len(data.train) + 1)
    with pytest.raises(ConfigError, match="data.train_tokens"):
        DataConfig(train_tokens=-1)
    cfg = from_dict({"data": {"corpus": str(small_corpus), "tokenizer": "byte",
                              "cache_dir": str(tmp_path / "cache"), "train_tokens": 500},
                     "model": {"n_layer": 1, "d_model": 32, "n_head": 2, "max_seq_len": 16},
                     "train": {"steps": 1, "batch_size": 2, "seq_len": 16, "progress": False,
                               "out_dir": str(tmp_path / "run")}})
    tr = Trainer(cfg)
    assert len(tr.data.train) == 500


def test_effective_tokens_interpolates_the_fresh_curve_in_log_tokens():
    from keenlm.studies.law2 import effective_tokens

    fresh = [(10_000, 4.0), (1_000, 5.0), (100_000, 3.5)]
    assert effective_tokens(4.5, fresh) == pytest.approx(10 ** 3.5)
    assert effective_tokens(4.0, fresh) == pytest.approx(10_000)
    assert effective_tokens(3.75, fresh) == pytest.approx(10 ** 4.5)
    assert effective_tokens(3.0, fresh) is None and effective_tokens(6.0, fresh) is None


def test_epochs_study_runs_end_to_end_and_resumes(tmp_path, small_corpus):
    from keenlm.studies.law2 import epochs

    over = {"data": {"corpus": str(small_corpus), "tokenizer": "byte", "max_bytes": 0,
                     "cache_dir": str(tmp_path / "cache")},
            "train": {"eval": {"batches": 2}, "runtime": {"dtype": "fp32"}}}
    kw = dict(depth=1, unique_tokens=256, max_epochs=3, batch=2, seq=32, overrides=over,
              log=lambda s: None)
    res = epochs(tmp_path / "s", **kw)
    assert [r["epochs"] for r in res["rows"]] == [1.0, 2.0, 3.0]
    assert [r["tokens"] for r in res["rows"]] == [256, 512, 768]
    rep = json.loads((tmp_path / "s" / "repeated" / "study.json").read_text())
    fresh = json.loads((tmp_path / "s" / "fresh" / "study.json").read_text())
    assert rep["config"]["data"]["train_tokens"] == 256 and fresh["config"]["data"]["train_tokens"] == 0
    assert rep["config"]["train"]["schedule"]["kind"] == "constant"
    assert all(r["repeated_val"] > 0 and r["fresh_val"] > 0 for r in res["rows"])
    for f in ("results.md", "results.json", "epochs.svg"):
        assert (tmp_path / "s" / f).exists(), f
    metrics = tmp_path / "s" / "repeated" / "metrics.jsonl"
    before = metrics.read_text()
    assert epochs(tmp_path / "s", **kw)["rows"] == res["rows"]  # finished runs are kept
    assert metrics.read_text() == before
    with pytest.raises(ValueError, match="other settings"):
        epochs(tmp_path / "s", **{**kw, "max_epochs": 4})
    with pytest.raises(ValueError, match="one batch"):
        epochs(tmp_path / "t", **{**kw, "unique_tokens": 32})


def test_group_study_runs_each_group_size_from_one_policy(tmp_path):
    from keenlm.studies.law2 import group

    kw = dict(groups=(4, 2), steps=2, prompts=2, task="addition", difficulty=3, size="64x1",
              sft_steps=20, start_at=1.0, eval_n=8, samples=2, log=lambda s: None)
    res = group(tmp_path / "s", **kw)
    assert [r["group"] for r in res["rows"]] == [2, 4]
    assert [r["samples"] for r in res["rows"]] == [8, 16] and res["equal_samples"] == 8
    for r in res["rows"]:
        assert r["curve"][0][0] == 0 and r["curve"][-1][0] == r["samples"]
        assert 0 <= r["final"]["pass@1"] <= 1
    rows = res["rows"]
    # G=2 spends exactly the equal budget: its value is its last evaluation; G=4 reaches the
    # budget at step 1, between its evaluations at steps 0 and 2: its value is the start's
    assert rows[0]["pass@1_at_equal_samples"] == rows[0]["curve"][-1][1]
    assert rows[1]["pass@1_at_equal_samples"] == rows[1]["curve"][0][1]
    for f in ("results.md", "results.json", "group.svg", "g2/study.json", "g4/study.json"):
        assert (tmp_path / "s" / f).exists(), f
    before = (tmp_path / "s" / "g4" / "metrics.jsonl").read_text()
    again = group(tmp_path / "s", **kw)
    assert [r["final"] for r in again["rows"]] == [r["final"] for r in rows]
    assert (tmp_path / "s" / "g4" / "metrics.jsonl").read_text() == before
    # the equal-samples arm: prompts x G fixed at 8 per step; G=4 x 2 prompts is the run both
    # arms share (kept, not run again), G=2 runs with 4 prompts
    both = group(tmp_path / "s", **{**kw, "samples_per_step": 8})
    arm = [r for r in both["rows"] if r["arm"] == "equal samples"]
    assert [(r["group"], r["prompts"], r["samples"]) for r in arm] == [(2, 4, 16), (4, 2, 16)]
    assert arm[1]["final"] == rows[1]["final"]
    assert (tmp_path / "s" / "g2-p4" / "study.json").exists()
    assert "| equal samples | 2 | 4 | 16 |" in (tmp_path / "s" / "results.md").read_text()
    with pytest.raises(ValueError, match="multiple of every group size"):
        group(tmp_path / "s", **{**kw, "samples_per_step": 6})


def test_a_study_run_recorded_in_an_earlier_spelling_is_kept(tmp_path):
    from keenlm.studies.common import finished, record

    old = {"train": {"schedule": "constant", "warmup_steps": 3, "eval_every": 5, "lr": 0.01}}
    new = {"train": {"schedule": {"kind": "constant", "warmup_steps": 3}, "eval": {"every": 5},
                     "optim": {"lr": 0.01}}}
    record(tmp_path, {"config": old, "val_loss": 1.0})
    assert finished(tmp_path, new)["val_loss"] == 1.0
    with pytest.raises(ValueError, match="other settings"):
        finished(tmp_path, {**new, "train": {**new["train"], "eval": {"every": 6}}})
