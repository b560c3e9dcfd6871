"""Data-parallel training with real processes: torchrun, gloo, world size 2, one thread per rank.
DDP and FSDP2 against the one-process run of the same global batch (losses and final weights),
for a dense, an MoE, a ternary-QAT, a neural-memory and a spiking model; resuming across world
sizes; a killed rank; two nodes; Ctrl-C; RL."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import keenlm
from keenlm import runs
from keenlm.config import from_dict

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

MODELS = {
    "dense": {},
    "moe": {"ffn": "moe", "moe": {"experts": 4, "top_k": 2}},
    "ternary": {"linear": "ternary"},
    "memory": {"memory": {"kind": "mag"}},
    "spiking": {"spike": {"steps": 4}},
}


def config(corpus, cache, out, parallel="none", model=None, steps=20, every=0):
    return {"data": {"corpus": str(corpus), "tokenizer": "byte", "cache_dir": str(cache)},
            "model": {"n_layer": 2, "d_model": 64, "n_head": 2, "max_seq_len": 96, **(model or {})},
            "train": {"steps": steps, "batch_size": 4, "seq_len": 32, "parallel": parallel,
                      "out_dir": str(out), "progress": False,
                      "optim": {"lr": 3e-3},
                      "eval": {"every": 0, "batches": 2, "log_every": 1},
                      "checkpoint": {"every": every, "keep": 3},
                      "runtime": {"threads": 1}}}


def torchrun(cfgs, tmp, nproc=2, extra=(), timeout=180):
    """Train each config under torchrun (one launch); (exit status, output)."""
    spec = tmp / f"cfgs-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(cfgs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", *extra, str(ROOT / "tests" / "dist_worker.py"),
                           str(spec)], env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def losses(run):
    return [r["loss"] for r in runs.read_jsonl(Path(run) / "metrics.jsonl") if r["kind"] == "train"]


def weights(run):
    return {k: v.clone() for k, v in keenlm.load(run).net.state_dict().items()}


def assert_same(a, b, what, tol=TOL):
    assert len(losses(a)) == len(losses(b)) > 0
    assert losses(a) == pytest.approx(losses(b), abs=tol), what
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= tol, f"{what}: final weights differ by {worst:.2e}"


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory):
    """The one-process runs (1 thread), one per model."""
    tmp = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    try:
        for name, model in MODELS.items():
            keenlm.train(config(small_corpus, tmp / "cache", tmp / f"one-{name}", model=model,
                                every=10))
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    return tmp


def test_ddp_and_fsdp_train_the_one_process_model(small_corpus, reference):
    tmp = reference
    cfgs = [config(small_corpus, tmp / "cache", tmp / f"{mode}-{name}", mode, model)
            for mode in ("ddp", "fsdp") for name, model in MODELS.items()]
    code, out = torchrun(cfgs, tmp)
    assert code == 0, out[-3000:]
    for mode in ("ddp", "fsdp"):
        for name in MODELS:
            run = tmp / f"{mode}-{name}"
            # spikes are thresholds: a last-bit difference in a membrane can flip one, so the
            # spiking model agrees less closely (seen: 4e-5 in the loss)
            assert_same(run, tmp / f"one-{name}", f"{mode}, {name}",
                        tol=1e-3 if name == "spiking" else TOL)
            ck = runs.latest_checkpoint(run)
            assert runs.is_dcp(ck) and len(list((ck / "dcp").glob("*.safetensors"))) >= 1
            # only rank 0 wrote the metrics: one line per step
            assert len(losses(run)) == 20
    # a sharded checkpoint exports like any run: gathered into one Hugging Face folder
    from keenlm.cli import main

    assert main(["convert", str(tmp / "fsdp-dense"), str(tmp / "hf"), "--to", "hf"]) == 0
    wa, wb = weights(tmp / "hf"), weights(tmp / "fsdp-dense")
    assert all(torch.equal(wa[k], wb[k]) for k in wb)


def test_resume_across_world_sizes(small_corpus, reference):
    """Save at step 10 with 2 ranks, resume with 1; and 1 -> 2 (FSDP): steps 11-20 and the final
    weights are those of the run that never stopped."""
    tmp = reference
    one = tmp / "one-dense"

    def cut_at_10(src, dst):  # the run as it stood after its step-10 checkpoint
        shutil.copytree(src, dst)
        ck = dst / "checkpoints"
        for p in ck.iterdir():
            if p.name.startswith("step-") and p.name != "step-0000010":
                shutil.rmtree(p)
        (ck / "latest").write_text("step-0000010\n")
        rows = [r for r in runs.read_jsonl(dst / "metrics.jsonl") if r.get("step", 0) <= 10
                and r["kind"] == "train"]
        (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    code, out = torchrun([config(small_corpus, tmp / "cache", tmp / "two-10", "ddp", every=10)], tmp)
    assert code == 0, out[-3000:]
    cut_at_10(tmp / "two-10", tmp / "two-then-one")
    keenlm.train(config(small_corpus, tmp / "cache", tmp / "two-then-one", "none", every=10))
    assert_same(tmp / "two-then-one", one, "2 ranks -> 1")

    cut_at_10(one, tmp / "one-then-two")
    code, out = torchrun([config(small_corpus, tmp / "cache", tmp / "one-then-two", "fsdp",
                                 every=10)], tmp)
    assert code == 0, out[-3000:]
    assert_same(tmp / "one-then-two", one, "1 -> 2 ranks (FSDP)")


def test_refusals_name_the_reason(small_corpus, tmp_path):
    from keenlm.train import distributed

    d = distributed.Dist("fsdp", 0, 2)
    cfg = from_dict(config(small_corpus, tmp_path, tmp_path / "r", "fsdp"))
    distributed.check(d, cfg)  # the plain case passes
    for change, words in [({"train": {"batch_size": 3}}, "split evenly"),
                          ({"train": {"optim": {"name": "muon"}}}, "Muon"),
                          ({"model": {"ffn": "moe", "moe": {"capacity_factor": 1.25}}}, "dropless")]:
        raw = config(small_corpus, tmp_path, tmp_path / "r", "fsdp")
        for section, fields in change.items():
            for k, v in fields.items():
                raw[section][k] = {**raw[section].get(k, {}), **v} if isinstance(v, dict) else v
        with pytest.raises(ValueError, match=words):
            distributed.check(d, from_dict(raw))
    with pytest.raises(ValueError, match="needs torchrun"):
        distributed.setup("ddp", torch.device("cpu"))


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker torchrun started as ``rank`` (read from its environment)."""
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "dist_worker" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def test_a_killed_rank_ends_the_job_and_the_run_resumes_exactly(small_corpus, reference):
    """kill -9 of rank 1 mid-run: torchrun exits non-zero within 60 s naming the rank; latest
    is a complete checkpoint; resuming reaches the step-20 weights of a run that never
    stopped."""
    pytest.importorskip("psutil")
    tmp = reference
    cfg = config(small_corpus, tmp / "cache", tmp / "killed", "ddp", every=5)
    spec = tmp / "killed.json"
    spec.write_text(json.dumps([cfg]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node=2", str(ROOT / "tests" / "dist_worker.py"),
                                 str(spec)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    latest = tmp / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not latest.exists():
        time.sleep(0.002)
    pid = _rank_pid(launcher, 1)
    assert pid is not None and launcher.poll() is None, "the run ended before it could be killed"
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    out, _ = launcher.communicate(timeout=90)
    assert launcher.returncode != 0 and time.time() - killed_at < 60
    assert "rank      : 1" in out, out[-2000:]  # torchrun's report names the rank
    ck = runs.latest_checkpoint(tmp / "killed")
    assert runs.is_dcp(ck) and (ck / "trainer_state.pt").exists()
    stopped = max(r["step"] for r in runs.read_jsonl(tmp / "killed" / "metrics.jsonl"))
    assert stopped < 20, "the kill came after the last step"
    code, out = torchrun([cfg], tmp)  # resume from the last complete checkpoint
    assert code == 0, out[-3000:]
    wa, wb = weights(tmp / "killed"), weights(tmp / "one-dense")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= TOL


def test_two_nodes_rendezvous_on_loopback(small_corpus, reference):
    """Two torchrun launches of one process each, --nnodes 2 with c10d rendezvous on 127.0.0.1:
    the job trains the one-process model."""
    import socket

    tmp = reference
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(small_corpus, tmp / "cache", tmp / "two-nodes", "ddp")
    spec = tmp / "nodes.json"
    spec.write_text(json.dumps([cfg]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                               f"--node-rank={i}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                               f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=keenlm-test",
                               "--master-addr=127.0.0.1", str(ROOT / "tests" / "dist_worker.py"),
                               str(spec)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=180)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert_same(tmp / "two-nodes", tmp / "one-dense", "two nodes")


def test_ctrl_c_on_the_launcher_saves_once_and_exits(small_corpus, tmp_path):
    """keenlm train --nproc 2, interrupted: every rank finishes its step, the checkpoint is
    written once (by all ranks together) and the launcher ends with 130."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "keenlm.cli", "train", "--nproc", "2",
           "--data.corpus", str(small_corpus), "--data.tokenizer", "byte",
           "--data.cache_dir", str(tmp_path / "cache"), "--model.n_layer", "2",
           "--model.d_model", "64", "--model.n_head", "2", "--model.max_seq_len", "32",
           "--train.steps", "100000", "--train.batch_size", "4", "--train.seq_len", "32",
           "--train.eval.every", "0", "--train.eval.batches", "2", "--train.progress", "false",
           "--train.eval.log_every", "1", "--train.out_dir", str(out), "--train.parallel", "ddp"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=90)
    assert proc.returncode == 130, text[-2000:]
    stopped = max(r["step"] for r in runs.read_jsonl(metrics) if r["kind"] == "train")
    ck = runs.latest_checkpoint(out)
    assert runs.is_dcp(ck) and ck.name == runs.step_dir(stopped)  # saved at the step it reached
    assert text.count("stopped at step") == 1  # rank 0 reports


def test_the_sizing_plan_adds_up():
    from keenlm.config import ModelConfig
    from keenlm.ledger import count_params
    from keenlm.model import build_model
    from keenlm.train.distributed import plan

    cfg = ModelConfig(vocab_size=1000, n_layer=4, d_model=128, n_head=4, d_ff=352, max_seq_len=256)
    P = count_params(build_model(cfg))["total"]
    block = sum(p.numel() for p in build_model(cfg).layers[0].parameters())
    ddp, fsdp = plan(cfg, 8, "ddp", 4, 256), plan(cfg, 8, "fsdp", 4, 256)
    assert ddp["params"] == P and ddp["state_bytes"] == 16 * P
    assert fsdp["state_bytes"] == 16 * P / 8 + 8 * block < ddp["state_bytes"]
    assert ddp["comm_bytes"] == fsdp["comm_bytes"] == 7 / 8 * 8 * P
    assert ddp["activation_bytes"] == 34 * 256 * 4 * 128 * 4
    assert plan(cfg, 64, "fsdp", 4, 256)["state_bytes"] < fsdp["state_bytes"]
    from keenlm.cli import main

    assert main(["info", "--plan", "small", "--gpus", "8"]) == 0


def test_rl_under_ddp_matches_one_process(reference):
    """GRPO with the step's prompts split over 2 ranks: the same rollouts (rewards, step by step)
    as one process with the same seed, the same losses and final weights."""
    tmp = reference
    policy = tmp / "one-dense"

    def rl_cfg(out, parallel):
        return {"prompts": 4, "group": 4, "max_new_tokens": 4, "steps": 4, "lr": 3e-3,
                "temperature": 1.0, "eval_n": 2, "eval_every": 0, "progress": False,
                "out_dir": str(out), "parallel": parallel, "threads": 1}

    from keenlm.config import rl_config
    from keenlm.train.grpo import RLTrainer

    even = lambda prompts, comps: [1.0 if c and c[0].encode()[0] % 2 == 0 else 0.0  # noqa: E731
                                   for c in comps]
    torch.set_num_threads(1)
    try:
        RLTrainer(keenlm.load(policy), rl_config(rl_cfg(tmp / "rl-one", "none")), reward=even).fit()
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    code, out = torchrun([{"rl": rl_cfg(tmp / "rl-two", "ddp"), "policy": str(policy)}], tmp)
    assert code == 0, out[-3000:]
    rec = lambda run: [r for r in runs.read_jsonl(run / "metrics.jsonl") if r["kind"] == "rl"]  # noqa: E731
    one, two = rec(tmp / "rl-one"), rec(tmp / "rl-two")
    assert len(one) == len(two) == 4
    assert [r["reward_mean"] for r in one] == [r["reward_mean"] for r in two]  # the same rollouts
    assert 0 < sum(r["rows_trained"] for r in one)  # something was learned from
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two], abs=TOL)
    wa, wb = weights(tmp / "rl-one"), weights(tmp / "rl-two")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= TOL
