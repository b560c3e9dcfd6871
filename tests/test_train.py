"""Trainer: exact resume, crash-safe checkpoints, Ctrl-C, hooks, optimizers, schedules."""
import dataclasses
import json
import shutil
import signal
import sysconfig
from pathlib import Path

import pytest
import torch

import keenlm
from keenlm import runs
from keenlm.config import ScheduleConfig, from_dict
from keenlm.presets import preset_dict
from keenlm.train import Trainer
from keenlm.train.optim import lr_multiplier, zeropower_newton_schulz

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for name in ("argparse.py", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py",
                 "heapq.py", "keyword.py", "colorsys.py", "copy.py", "queue.py", "sched.py"):
        shutil.copy(STDLIB / name, d / name)
    return d


def tiny(corpus_dir, out, **train):
    base = preset_dict("tiny")
    base["data"].update({"corpus": str(corpus_dir), "cache_dir": str(out.parent / "cache"),
                         "val_fraction": 0.2})
    base["train"].update({"out_dir": str(out), "progress": False, "log_every": 1, **train})
    return from_dict(base)


def test_loss_goes_down_and_every_parameter_changes(corpus_dir, tmp_path):
    cfg = tiny(corpus_dir, tmp_path / "run", steps=40)
    tr = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    first = tr.evaluate()["loss"]
    res = tr.fit()
    assert res.final_eval["loss"] < first - 0.5
    for n, p in tr.model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} never changed"
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "env.json", "metrics.jsonl", "ledger.json", "tokenizer",
            "checkpoints"} <= files
    led = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert led["tokens_seen"] == 40 * 8 * 64 and led["flops_total"] > 0


@pytest.mark.parametrize("optimizer,accum", [("adamw", 1), ("muon", 2)])
def test_resume_gives_identical_losses(corpus_dir, tmp_path, optimizer, accum):
    cfg = tiny(corpus_dir, tmp_path / "a", steps=12, optimizer=optimizer, grad_accum=accum)
    straight = Trainer(cfg)
    expected = [straight.train_step()["loss"] for _ in range(12)]

    cfg_b = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(tmp_path / "b")))
    first = Trainer(cfg_b)
    got = [first.train_step()["loss"] for _ in range(5)]
    first.save()
    del first
    resumed = Trainer(cfg_b)  # a new process would do the same: read config + checkpoint
    assert resumed.step == 5
    got += [resumed.train_step()["loss"] for _ in range(7)]
    assert got == expected  # bitwise: same batches, same optimizer state, same schedule


def test_interrupted_checkpoint_write_keeps_previous(corpus_dir, tmp_path, monkeypatch):
    cfg = tiny(corpus_dir, tmp_path / "run", steps=10)
    tr = Trainer(cfg)
    tr.train_step()
    tr.save()
    good = runs.latest_checkpoint(tmp_path / "run")
    tr.train_step()

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash)  # dies after model.safetensors is written
    with pytest.raises(OSError):
        tr.save()
    monkeypatch.undo()
    assert runs.latest_checkpoint(tmp_path / "run") == good
    # a hard kill leaves a temp folder behind; it is never mistaken for a checkpoint
    stray = tmp_path / "run" / "checkpoints" / ".tmp-killed"
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(b"\x00" * 10)
    km = keenlm.load(tmp_path / "run")
    assert km.net.cfg.n_layer == 2
    assert Trainer(cfg).step == 1


def test_truncated_checkpoint_is_a_clear_error(corpus_dir, tmp_path):
    cfg = tiny(corpus_dir, tmp_path / "run", steps=2)
    Trainer(cfg).fit()
    f = runs.latest_checkpoint(tmp_path / "run") / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        keenlm.load(tmp_path / "run")


def test_sigint_stops_after_the_step_and_saves(corpus_dir, tmp_path):
    cfg = tiny(corpus_dir, tmp_path / "run", steps=50)
    tr = Trainer(cfg)

    class CtrlCAtStep3:
        calls = 0

        def choose_batch(self, x, y, model):
            self.calls += 1
            if self.calls == 3:
                signal.raise_signal(signal.SIGINT)  # what the terminal sends on Ctrl-C
            return x, y, None

    tr.hooks.append(CtrlCAtStep3())
    before = signal.getsignal(signal.SIGINT)  # default, or SIG_IGN under nohup / background jobs
    res = tr.fit()
    assert res.interrupted and res.step == 3
    assert runs.latest_checkpoint(tmp_path / "run").name == "step-0000003"
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back


def test_hook_token_weights_and_extra_losses(corpus_dir, tmp_path):
    cfg = tiny(corpus_dir, tmp_path / "run", steps=3)
    tr = Trainer(cfg)

    class HalfTokens:
        def choose_batch(self, x, y, model):
            w = torch.zeros_like(y, dtype=torch.float32)
            w[:, : y.shape[1] // 2] = 1
            return x, y, w

        def extra_losses(self, model, x, y, per_token):
            self.seen = per_token.shape
            return {"zero": per_token.sum() * 0}

    hook = HalfTokens()
    tr.hooks.append(hook)
    tr.train_step()
    assert hook.seen == (8, 64)
    # a token mask changes what is learned, not what runs: every row still goes backward
    assert tr.ledger.tokens_backward == 8 * 64 and tr.ledger.tokens_seen == 8 * 64


def test_schedules():
    t = ScheduleConfig(warmup_steps=10, kind="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, t, 100) == pytest.approx(0.1)
    assert lr_multiplier(9, t, 100) == pytest.approx(1.0)
    assert lr_multiplier(99, t, 100) == pytest.approx(0.1, abs=1e-3)
    w = dataclasses.replace(t, kind="wsd", decay_fraction=0.2)
    assert lr_multiplier(50, w, 100) == 1.0 and lr_multiplier(79, w, 100) == 1.0
    assert lr_multiplier(99, w, 100) == pytest.approx(0.1)
    assert 0.1 < lr_multiplier(90, w, 100) < 1.0


def test_newton_schulz_orthogonalizes():
    g = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(zeropower_newton_schulz(g))
    assert s.min() > 0.5 and s.max() < 1.3  # singular values pushed toward 1 (Muon's target)


def test_resume_with_different_model_config_is_refused(corpus_dir, tmp_path):
    cfg = tiny(corpus_dir, tmp_path / "run", steps=2)
    Trainer(cfg).fit()
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layer=3))
    with pytest.raises(ValueError, match="different model config"):
        Trainer(other)


def test_bf16_autocast_trains(corpus_dir, tmp_path):
    # smoke: bf16 autocast runs forward, fused loss and backward, and the loss goes down
    cfg = tiny(corpus_dir, tmp_path / "run", steps=30, dtype="bf16")
    tr = Trainer(cfg)
    first = tr.evaluate()["loss"]
    res = tr.fit()
    assert res.final_eval["loss"] < first - 0.3
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())  # master weights stay fp32


def nan_grads_at(model, steps: set[int]):
    """A gradient hook that turns one parameter's gradient into NaN on the listed calls
    (one call per optimizer step at grad_accum 1): the injected fault."""
    calls = {"n": 0}
    p = next(model.parameters())

    def hook(g):
        calls["n"] += 1
        return torch.full_like(g, float("nan")) if calls["n"] in steps else g
    p.register_hook(hook)
    return p


def test_a_non_finite_step_is_skipped_and_counted(corpus_dir, tmp_path):
    cfg = tiny(corpus_dir, tmp_path / "run", steps=6, optim={"grad_clip": 0.0})
    tr = Trainer(cfg)
    nan_grads_at(tr.model, {3})
    recs = [tr.train_step() for _ in range(2)]
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    recs.append(tr.train_step())  # the poisoned step: skipped, the weights unchanged
    assert all(torch.equal(p, before[n]) for n, p in tr.model.named_parameters())
    assert recs[-1]["skipped_steps"] == 1 and recs[-1]["grad_norm"] != recs[-1]["grad_norm"]
    recs += [tr.train_step() for _ in range(3)]  # and training goes on
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    assert recs[-1]["skipped_steps"] == 1 and tr.guard.in_a_row == 0
    assert not any(torch.equal(p, before[n]) for n, p in tr.model.named_parameters())


def test_non_finite_steps_in_a_row_stop_the_run_with_the_last_good_checkpoint(corpus_dir, tmp_path):
    cfg = tiny(corpus_dir, tmp_path / "run", steps=8, optim={"max_nonfinite": 2},
               checkpoint={"every": 1, "keep": 10})
    tr = Trainer(cfg)
    nan_grads_at(tr.model, set(range(4, 100)))
    with pytest.raises(FloatingPointError, match=r"step 6: .*3 non-finite steps in a row"):
        tr.fit()
    assert runs.latest_checkpoint(tmp_path / "run").name == "step-0000005"
    km = keenlm.load(tmp_path / "run")  # the last good weights: finite, and they load
    assert all(torch.isfinite(p).all() for p in km.net.parameters())
    # a resume carries the count: the checkpoint's run has 2 skipped steps, 2 in a row
    again = Trainer(cfg)
    assert again.guard.skipped == 2 and again.guard.in_a_row == 2


def test_a_second_writer_is_refused_and_a_killed_holder_leaves_no_stuck_lock(corpus_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from keenlm.runs import hold\n"
        f"with hold({str(out)!r}, 'train'):\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        tr = Trainer(tiny(corpus_dir, out, steps=2))
        with pytest.raises(runs.FolderBusy, match=rf"in use by pid {holder.pid} .*train, since"):
            tr.fit()
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    assert tr.fit().step == 2
    with runs.hold(out, "test"):  # released after the run: held again at once
        pass


def test_a_full_disk_keeps_the_last_checkpoint_and_the_run_resumes_exactly(corpus_dir, tmp_path):
    """A real write failure: a child process whose files may not grow past a limit (RLIMIT_FSIZE,
    the kernel's EFBIG, as a full disk's ENOSPC) fails its checkpoint write with a clear message;
    the previous checkpoint stays latest and loadable; run again without the limit, the run
    resumes and ends on the weights of a run never interrupted."""
    import subprocess
    import sys

    from keenlm.config import save_json

    def child(cfg, limit=0):
        save_json(cfg, tmp_path / "cfg.json")
        code = ("import json, resource, signal, keenlm\n"
                f"if {limit}:\n"
                "    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                f"    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
                f"keenlm.train(json.load(open({str(tmp_path / 'cfg.json')!r})))\n")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    flat = {"kind": "constant", "warmup_steps": 0}  # a 3-step and a 6-step run share steps 1-3
    straight = tiny(corpus_dir, tmp_path / "straight", steps=6, schedule=flat)
    Trainer(straight).fit()
    cfg = tiny(corpus_dir, tmp_path / "run", steps=3, checkpoint={"every": 3}, schedule=flat)
    assert child(cfg).returncode == 0  # steps 1-3, checkpoint step 3
    size = (runs.latest_checkpoint(tmp_path / "run") / "model.safetensors").stat().st_size
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=6))
    failed = child(more, limit=size // 2)  # the step-6 checkpoint cannot be written
    assert failed.returncode != 0
    assert "could not write checkpoint step-0000006" in failed.stderr
    assert "step-0000003 stays the latest checkpoint" in failed.stderr
    assert runs.latest_checkpoint(tmp_path / "run").name == "step-0000003"
    keenlm.load(tmp_path / "run")  # still loadable
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    assert child(more).returncode == 0  # space is back: resumed from step 3
    a = runs.load_model_state(runs.latest_checkpoint(tmp_path / "run"))
    b = runs.load_model_state(runs.latest_checkpoint(tmp_path / "straight"))
    assert runs.latest_checkpoint(tmp_path / "run").name == "step-0000006"
    assert all(torch.equal(a[k], b[k]) for k in b)  # bitwise the uninterrupted run's weights
