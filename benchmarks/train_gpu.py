"""Training speed on one GPU: model FLOPs utilization of keenlm's trainer, and keenlm against
transformers' LlamaForCausalLM trained in a plain loop, at the ``base`` and ``large`` presets.

Both sides get what a speed-focused GPU trainer has: bf16 autocast over fp32 master weights,
fused AdamW, FlashAttention (SDPA's flash kernel; keenlm: ``--attention``, default sdpa),
``torch.compile`` of the model, gradient clipping, the same micro-batch and sequence length and
the same batches (keenlm's BPE-tokenized stdlib). keenlm runs ``Trainer.train_step`` exactly
as ``keenlm train`` does. The transformers model has the same shape (width, depth, heads,
grouped key/value heads, SwiGLU width, vocabulary, tied embeddings), checked by parameter
count.

MFU = model FLOPs per token (keenlm.ledger.flops_per_token: 6 x matmul parameters plus
attention, no discount for causality, as PaLM's appendix B counts) x tokens/s / the chip's
dense bf16 peak (table below, or ``--peak-tflops``). Each side: ``--warmup`` untimed steps
(compilation), then the median of ``--steps`` timed steps (CUDA synchronized).

Usage: python benchmarks/train_gpu.py [--quick] [--presets base,large] [--attention sdpa]
       python benchmarks/train_gpu.py --smoke    (a tiny shape on the CPU: checks the script
                                                  runs; its figures mean nothing)
Ends with: BENCH train_gpu_mfu_large <mfu> target >=0.4, and per preset
           BENCH train_gpu_<preset>_vs_transformers <ratio> target >=1.3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import bench_line  # noqa: E402
from train_throughput import plain_step_fn  # noqa: E402
from keenlm.config import from_dict, merge  # noqa: E402
from keenlm.ledger import flops_per_token  # noqa: E402
from keenlm.presets import preset_dict  # noqa: E402
from keenlm.train import Trainer  # noqa: E402

# dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets; SXM parts)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0, "4090": 165.0}
SHAPES = {"base": (16, 1024), "large": (4, 2048)}  # micro-batch, sequence length
VOCAB = 8192


def peak_of(name: str, given: float) -> float:
    if given:
        return given
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    sys.exit(f"unknown GPU {name!r}: give its dense bf16 peak with --peak-tflops")


def keenlm_runner(preset: str, batch: int, seq: int, args, tmp: Path):
    p = preset_dict(preset)
    smoke = args.smoke
    cfg = merge(p, {
        "model": {"max_seq_len": seq, "attention": args.attention,
                  **({"n_layer": 2, "d_model": 128, "n_head": 2, "n_kv_head": 2, "d_ff": 352}
                     if smoke else {})},
        "data": {"corpus": "stdlib", "tokenizer": "bpe", "vocab_size": VOCAB,
                 "max_bytes": 4_000_000 if smoke else 20_000_000},
        "train": {"steps": 1_000_000, "batch_size": batch, "seq_len": seq, "progress": False,
                  "out_dir": str(tmp / preset), "checkpoint": {"resume": False},
                  "eval": {"every": 0}, "optim": {"lr": 3e-4},
                  "runtime": {"device": "cpu" if smoke else "cuda",
                              "dtype": "fp32" if smoke else "bf16",
                              "compile": not (smoke or args.no_compile)}}})
    trainer = Trainer(from_dict(cfg))
    return trainer, lambda: trainer.train_step()["loss"]


def transformers_runner(trainer, batch: int, seq: int, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = trainer.cfg.model
    device = "cpu" if args.smoke else "cuda"
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
        num_hidden_layers=m.n_layer, num_attention_heads=m.n_head,
        num_key_value_heads=m.n_kv_head, max_position_embeddings=seq, rope_theta=m.rope_theta,
        rms_norm_eps=m.norm_eps, tie_word_embeddings=True, attn_implementation="sdpa")).to(device)
    ours = sum(p.numel() for p in trainer.model.parameters())
    theirs = sum(p.numel() for p in hf.parameters())
    if ours != theirs:
        sys.exit(f"shapes differ: transformers {theirs:,} vs keenlm {ours:,} parameters")
    model = hf if args.smoke or args.no_compile else torch.compile(hf)
    return plain_step_fn(hf, trainer.data.train, batch, seq, 0,
                         lambda _, x: model(input_ids=x).logits, device=device,
                         autocast_dtype=None if args.smoke else torch.bfloat16, lr=3e-4)


def timed_steps(step, warmup: int, steps: int, cuda: bool) -> float:
    """Median seconds per step after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timed steps")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU")
    ap.add_argument("--presets", default="base,large")
    ap.add_argument("--attention", default="sdpa", help="keenlm's attention backend")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps (default 2 smoke, 5)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default 2 smoke, 8/20)")
    args = ap.parse_args()
    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        sys.exit("train_gpu.py needs a CUDA GPU (--smoke checks the script on a CPU)")
    warmup = args.warmup or (2 if args.smoke else 5)
    steps = args.steps or (2 if args.smoke else 8 if args.quick else 20)
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    peak = 1.0 if args.smoke else peak_of(name, args.peak_tflops) * 1e12
    print(f"train_gpu: {name}, torch {torch.__version__}, bf16 autocast, fused AdamW, "
          f"compile {'off' if args.no_compile or args.smoke else 'on'}, keenlm attention "
          f"{args.attention}, {time.strftime('%Y-%m-%d')}")
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            batch, seq = (2, 64) if args.smoke else SHAPES[preset]
            trainer, ours = keenlm_runner(preset, batch, seq, args, Path(tmp))
            theirs = transformers_runner(trainer, batch, seq, args)
            per_token = flops_per_token(trainer.model, seq)["train"]
            tokens = batch * seq
            res = {}
            for side, step in (("keenlm", ours), ("transformers", theirs)):
                s = timed_steps(step, warmup, steps, cuda)
                res[side] = {"tok_s": tokens / s, "mfu": per_token * tokens / s / peak}
            n = sum(p.numel() for p in trainer.model.parameters())
            print(f"\n{preset}: {n / 1e6:.1f}M params, micro-batch {batch} x {seq}")
            for side, r in res.items():
                mfu = "n/a" if args.smoke else f"{100 * r['mfu']:5.1f}%"
                print(f"  {side:13s} {r['tok_s']:10.0f} tok/s  MFU {mfu}")
            ratio = res["keenlm"]["tok_s"] / res["transformers"]["tok_s"]
            print(f"  keenlm / transformers = {ratio:.2f}x")
            if not args.smoke:
                lines.append(bench_line(f"train_gpu_{preset}_vs_transformers", ratio, ">=", 1.3))
                if preset == "large":
                    lines.append(bench_line("train_gpu_mfu_large", res["keenlm"]["mfu"], ">=", 0.4))
            del trainer, ours, theirs
            if cuda:
                torch.cuda.empty_cache()
    print()
    print("\n".join(lines) if lines else "smoke run: the script works; its figures mean nothing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
