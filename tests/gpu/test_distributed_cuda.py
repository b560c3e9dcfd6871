"""Data parallelism on CUDA: one rank under torchrun with NCCL (DDP, then FSDP2 with its bf16
mixed-precision policy) trains, checkpoints and loads back.

Opt-in by nature: skipped where torch sees no CUDA device. Run on a GPU machine with:
PYTHONPATH=src python -m pytest -q tests/gpu
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device")]

import keenlm  # noqa: E402
from keenlm import runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_one_nccl_rank_trains_and_checkpoints(small_corpus, tmp_path, mode):
    out = tmp_path / mode
    cfg = {"data": {"corpus": str(small_corpus), "tokenizer": "byte", "cache_dir": str(tmp_path / "c")},
           "model": {"n_layer": 2, "d_model": 64, "n_head": 2, "max_seq_len": 64},
           "train": {"steps": 10, "batch_size": 4, "seq_len": 64, "parallel": mode, "out_dir": str(out),
                     "progress": False, "eval": {"every": 0, "batches": 2, "log_every": 1},
                     "runtime": {"device": "cuda"}}}
    spec = tmp_path / "cfg.json"
    spec.write_text(json.dumps([cfg]))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=1", str(ROOT / "tests" / "dist_worker.py"), str(spec)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [r for r in runs.read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == 10 and rows[-1]["loss"] < rows[0]["loss"]
    assert runs.is_dcp(runs.latest_checkpoint(out))
    assert keenlm.load(out).net is not None
