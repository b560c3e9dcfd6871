"""Training throughput: keenlm vs Hugging Face transformers vs a minimal plain-PyTorch GPT.

What is compared: training tokens per second (forward, loss, backward, gradient clipping and
a fused AdamW step) of
  - keenlm: ``Trainer.train_step`` exactly as ``keenlm train`` runs it,
  - transformers' ``LlamaForCausalLM`` of the identical shape (same width, depth, heads, SwiGLU
    width, vocabulary, tied embeddings, SDPA attention),
  - a minimal GPT written below in plain PyTorch (nanoGPT-style: LayerNorm, learned positions,
    fused QKV, GELU MLP of 4x width -- the same parameter count as SwiGLU at 8/3x), the
    "what you would write yourself" baseline,
on the same batches (keenlm's BPE-tokenized Python stdlib), batch size, sequence length,
thread count and dtype (fp32). The three are measured in interleaved rounds in one process
and the median round is reported, because timings on a shared 2-core machine drift.

Usage: python benchmarks/train_throughput.py [--quick] [--shapes 10m,1m] [--rounds N]
Ends with one line per target: BENCH <name> <value> target <op><target> PASS|MISS
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import bench_line, best_of  # noqa: E402
from keenlm.config import from_dict  # noqa: E402
from keenlm.data import get_batch  # noqa: E402
from keenlm.train import Trainer  # noqa: E402

SHAPES = {  # name: (n_layer, d_model, n_head, d_ff, batch, seq_len)
    "10m": (6, 384, 6, 1024, 16, 256),
    "1m": (4, 128, 4, 352, 16, 256),
}
TARGETS = {"transformers": 1.3, "minimal": 1.0}


# ------------------------------------------------------------------------- minimal GPT baseline


class MinimalBlock(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.out = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class MinimalGPT(nn.Module):
    def __init__(self, vocab, d, n_layer, n_head, max_len):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(MinimalBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0, 0.02)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


# ------------------------------------------------------------------------- runners


def plain_step_fn(model, data, batch, seq, seed, logits_of, device: str = "cpu",
                  autocast_dtype=None, lr: float = 1e-3):
    """A plain training step: batch, forward (under bf16 autocast when ``autocast_dtype``),
    cross-entropy, backward, clipping, fused AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True)
    state = {"step": 0}

    def step():
        x, y = get_batch(data, batch, seq, seed, state["step"])
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            logits = logits_of(model, x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        return loss.item()

    return step


def build_runners(shape: str, tmp: Path):
    n_layer, d, n_head, d_ff, batch, seq = SHAPES[shape]
    cfg = from_dict({
        "model": {"n_layer": n_layer, "d_model": d, "n_head": n_head, "d_ff": d_ff,
                  "max_seq_len": seq, "attention": "sdpa"},
        "data": {"corpus": "stdlib", "tokenizer": "bpe", "vocab_size": 4096},
        "train": {"steps": 10_000, "batch_size": batch, "seq_len": seq, "progress": False,
                  "out_dir": str(tmp / shape), "optim": {"lr": 1e-3},
                  "schedule": {"warmup_steps": 1}, "checkpoint": {"resume": False},
                  "eval": {"every": 0}},
    })
    trainer = Trainer(cfg)
    vocab = trainer.cfg.model.vocab_size
    data = trainer.data.train
    n_params = sum(p.numel() for p in trainer.model.parameters())

    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=d_ff,
                         num_hidden_layers=n_layer, num_attention_heads=n_head,
                         num_key_value_heads=n_head, max_position_embeddings=seq,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    hf = LlamaForCausalLM(hf_cfg).train()
    hf_params = sum(p.numel() for p in hf.parameters())
    assert hf_params == n_params, f"shapes differ: transformers {hf_params} vs keenlm {n_params}"
    gpt = MinimalGPT(vocab, d, n_layer, n_head, seq).train()
    runners = {
        "keenlm": lambda: trainer.train_step()["loss"],
        "transformers": plain_step_fn(hf, data, batch, seq, cfg.train.seed,
                                      lambda m, x: m(input_ids=x).logits),
        "minimal": plain_step_fn(gpt, data, batch, seq, cfg.train.seed, lambda m, x: m(x)),
    }
    params = {"keenlm": n_params, "transformers": hf_params,
              "minimal": sum(p.numel() for p in gpt.parameters())}
    return runners, params, batch * seq


def compute_floor(shape: str, vocab: int, reps: int = 3) -> dict:
    """Seconds per step of the unavoidable work alone: every matrix multiply of a training step
    (forward, grad-input, grad-weight of each projection and of the LM head) and the fused
    causal attention forward+backward, at this shape, each timed on its own. No implementation
    of the same math in fp32 on this machine can run a step faster than their sum."""
    n_layer, d, n_head, d_ff, batch, seq = SHAPES[shape]
    N = batch * seq
    mats = [(d, 3 * d), (d, d), (d, 2 * d_ff), (d_ff, d)] * n_layer + [(d, vocab)]

    gemm = 0.0
    for fan_in, fan_out in mats:
        x, w, g = torch.randn(N, fan_in), torch.randn(fan_out, fan_in), torch.randn(N, fan_out)
        gemm += best_of(lambda: (x @ w.t(), g @ w, g.t() @ x), reps)
    q = torch.randn(batch, n_head, seq, d // n_head, requires_grad=True)
    out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    go = torch.randn_like(out)

    def attn():
        o = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.autograd.grad(o, q, go)

    attention = best_of(attn, reps) * n_layer
    return {"gemm_s": gemm, "attention_s": attention, "floor_tok_s": N / (gemm + attention)}


def measure(shape: str, rounds: int, steps_per_round: int, tmp: Path) -> dict:
    runners, params, tokens_per_step = build_runners(shape, tmp)
    for run in runners.values():  # warm-up: allocator, kernels, optimizer state
        run()
        run()
    rates = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                run()
            rates[name].append(steps_per_round * tokens_per_step / (time.perf_counter() - t0))
    return {name: {"tok_s": statistics.median(r), "all": r, "params": params[name]}
            for name, r in rates.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (about a minute)")
    ap.add_argument("--shapes", default="10m,1m")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = ap.parse_args()
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(f"train_throughput: machine {platform.machine()} {os.cpu_count()} cores, "
          f"{threads} threads, torch {torch.__version__}, fp32, {time.strftime('%Y-%m-%d')}")
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            small = SHAPES[shape][1] < 256
            # many short interleaved rounds: the median resists a neighbour's burst of load
            rounds = args.rounds or (4 if args.quick else 9)
            steps = (4 if small else 1) if args.quick else (6 if small else 1)
            res = measure(shape, rounds, steps, Path(tmp))
            n_layer, d, n_head, d_ff, batch, seq = SHAPES[shape]
            print(f"\nshape {shape}: {n_layer} layers, d_model {d}, {n_head} heads, d_ff {d_ff}, "
                  f"batch {batch} x {seq} tokens, {rounds} rounds x {steps} steps")
            for name, r in res.items():
                ratio = res["keenlm"]["tok_s"] / r["tok_s"]
                print(f"  {name:13s} {r['params'] / 1e6:6.2f}M params  {r['tok_s']:9.0f} tok/s "
                      f"(rounds: {', '.join(f'{v:.0f}' for v in r['all'])})  keenlm/this = {ratio:.3f}")
            floor = compute_floor(shape, 4096)
            best_base = res["transformers"]["tok_s"]
            print(f"  floor: the matmuls alone take {floor['gemm_s'] * 1e3:.0f} ms/step and causal "
                  f"attention {floor['attention_s'] * 1e3:.0f} ms/step, so no fp32 implementation "
                  f"of this model on this machine exceeds {floor['floor_tok_s']:.0f} tok/s = "
                  f"{floor['floor_tok_s'] / best_base:.2f}x transformers; keenlm reaches "
                  f"{res['keenlm']['tok_s'] / floor['floor_tok_s']:.0%} of that ceiling")
            for base, target in TARGETS.items():
                ratio = res["keenlm"]["tok_s"] / res[base]["tok_s"]
                lines.append(bench_line(f"train_throughput_{shape}_vs_{base}", ratio, ">=", target))
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
