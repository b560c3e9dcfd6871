"""``keenlm study memory``: what the neural memory buys on long-context recall.

The same small model (``d_model`` x ``layers``, sliding-window attention of ``window``
positions) is trained on the recall task (a third of the steps on the shortest length first:
without it the gated variant did not start learning on the mixed lengths within 1000 steps) (``keenlm.data.recall``) with the memory off, as a
layer (MAL) and as a gated branch (MAG), and MAL again with the surprise gate; every pair
lies at least ``window`` tokens before its query, so attention alone cannot see it. Each
model trains on a mix of the context lengths and is evaluated at each length on held-out
sequences (another seed): accuracy (chance: 1 / values), and for the gated one the share of
writes skipped.

Training is the task's own small loop (the task is a token-level classification, not text):
AdamW with keenlm's parameter groups (``train.optim.build_optimizer``), constant learning
rate after a warm-up, gradient clipping, the model's per-step hook (``end_step``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from keenlm.config import MemoryConfig, ModelConfig, OptimConfig
from keenlm.data.recall import Recall, recall_loss_and_accuracy
from keenlm.model import build_model
from keenlm.model.memory import NeuralMemory
from keenlm.presets import default_d_ff
from keenlm.studies.common import Log, finished, record, write_results
from keenlm.train.optim import build_optimizer, init_base_lr, set_lr


@dataclass(frozen=True)
class Options:
    """long-context recall with and without the neural memory"""

    lengths: tuple[int, ...] = (64, 128, 256)  # context lengths
    window: int = 16  # attention window
    mem_steps: int = 1500  # training steps
    gate: float = 0.5  # a gated MAL run skips writes below this x the chunk's mean surprise (0: no gated run)


def run(out, opts: Options) -> dict:
    return memory(out, lengths=opts.lengths, window=opts.window, steps=opts.mem_steps,
                  gate=opts.gate)


def summary(res: dict) -> str:
    return "\n".join(f"{r['name']}: " + ", ".join(f"{L}: {a:.3f}" for L, a in r["accuracy"].items())
                     for r in res["rows"])


def recall_model(kind: str, vocab: int, d_model: int, layers: int, window: int, max_len: int,
                 gate: float = 0.0, chunk: int = 16, depth: int = 1):
    cfg = ModelConfig(vocab_size=vocab, n_layer=layers, d_model=d_model, n_head=max(1, d_model // 32),
                      d_ff=default_d_ff(d_model), max_seq_len=max_len,
                      attention="sdpa", attn_window=window,
                      memory=MemoryConfig(kind=kind, chunk=chunk, gate=gate, depth=depth,
                                          from_layer=1 if layers > 1 else 0))
    return build_model(cfg)


def train_recall(net, tasks, steps: int, batch: int, lr: float, seed: int, log_every: int = 0,
                 curriculum: float = 0.0, log: Log = print) -> list[tuple[int, float, float]]:
    """Train on batches drawn from ``tasks`` in turn, after the first ``curriculum`` share of
    the steps on ``tasks[0]`` (the shortest) alone; returns [(step, loss, accuracy), ...]."""
    opt = build_optimizer(net, OptimConfig(lr=lr, weight_decay=0.0), "cpu")
    init_base_lr(opt)
    warm = max(1, steps // 20)
    curve = []
    net.train()
    for step in range(steps):
        task = tasks[0] if step < curriculum * steps else tasks[step % len(tasks)]
        x, y = task.batch(batch, seed, step)
        set_lr(opt, min(1.0, (step + 1) / warm))
        loss, acc = recall_loss_and_accuracy(net, task, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats = net.end_step()
        curve.append((step + 1, loss.item(), acc, stats.get("memory_skipped")))
        if log_every and (step + 1) % log_every == 0:
            log(f"  step {step + 1}: loss {loss.item():.3f}, accuracy {acc:.2f}")
    return curve


@torch.no_grad()
def evaluate_recall(net, task, n: int, seed: int, batch: int = 64) -> dict:
    net.eval()
    hits = total = 0
    for i in range(0, n, batch):
        x, y = task.batch(min(batch, n - i), seed, i)
        _, acc = recall_loss_and_accuracy(net, task, x, y)
        hits += acc * len(y)
        total += len(y)
    skipped = None
    mems = [m for m in net.modules() if isinstance(m, NeuralMemory)]
    if mems and mems[0].gate > 0:  # the gate's skip rate on held-out data
        net.train()
        net(task.batch(min(batch, n), seed, 10**6)[0])
        skipped = net.end_step().get("memory_skipped")
        net.eval()
    return {"accuracy": hits / total, "skipped": skipped}


def memory(out: str | Path, lengths=(64, 128, 256), window: int = 16, pairs: int = 4,
           d_model: int = 64, layers: int = 2, steps: int = 1500, batch: int = 16,
           lr: float = 3e-3, gate: float = 0.0, eval_n: int = 512, seed: int = 0,
           depth: int = 1, curriculum: float = 1 / 3, log: Log = print) -> dict:
    """Train the four models (resumable per model) and evaluate each at every length."""
    out = Path(out)
    tasks = [Recall(length=L, pairs=pairs, gap=window) for L in lengths]
    vocab = tasks[0].vocab_size
    variants = {"attention only": ("none", 0.0), "memory as a layer (MAL)": ("mal", 0.0),
                "memory as a gated branch (MAG)": ("mag", 0.0)}
    if gate > 0:
        variants[f"MAL, surprise gate {gate:g}"] = ("mal", gate)
    rows = []
    for name, (kind, g) in variants.items():
        folder = out / name.split(" (")[0].replace(" ", "-").replace(",", "")
        settings = {"kind": kind, "gate": g, "lengths": list(lengths), "window": window,
                    "pairs": pairs, "d_model": d_model, "layers": layers, "steps": steps,
                    "batch": batch, "lr": lr, "eval_n": eval_n, "seed": seed, "depth": depth,
                    "curriculum": curriculum}
        rec = finished(folder, settings)
        if rec is None:
            torch.manual_seed(seed)
            net = recall_model(kind, vocab, d_model, layers, window, max(lengths), g, depth=depth)
            t0 = time.perf_counter()
            curve = train_recall(net, tasks, steps, batch, lr, seed, log_every=steps // 5,
                                 curriculum=curriculum, log=log)
            seconds = time.perf_counter() - t0
            evals = {str(t.length): evaluate_recall(net, t, eval_n, seed + 1) for t in tasks}
            params = sum(p.numel() for p in net.parameters())
            folder.mkdir(parents=True, exist_ok=True)
            rec = {"config": settings, "seconds": seconds, "params": params, "evals": evals,
                   "curve": curve[:: max(1, steps // 100)]}
            record(folder, rec)
        row = {"name": name, "params": rec["params"], "seconds": rec["seconds"],
               "accuracy": {L: rec["evals"][L]["accuracy"] for L in rec["evals"]},
               "skipped": {L: rec["evals"][L]["skipped"] for L in rec["evals"]}}
        rows.append(row)
        log(f"{name}: " + ", ".join(f"length {L}: {a:.3f}" for L, a in row["accuracy"].items()))
    results = {"lengths": list(lengths), "window": window, "pairs": pairs, "depth": depth,
               "curriculum": curriculum, "chance":
               1 / tasks[0].values, "steps": steps, "rows": rows}
    write_results(out, results, _table(results))
    return results


def _table(res: dict) -> str:
    Ls = [str(L) for L in res["lengths"]]
    lines = [f"Memory of depth {res.get('depth', 1)}. "
             f"Recall task: {res['pairs']} key-value pairs, each at least {res['window']} tokens "
             f"before the query; attention window {res['window']} positions; chance "
             f"{res['chance']:.3f}; {res['steps']} training steps, the first "
             f"{res.get('curriculum', 0):.0%} on the shortest length, then the lengths mixed.", "",
             "| model | parameters | train s | " + " | ".join(f"accuracy at {L}" for L in Ls)
             + " | writes skipped |", "|---|---|---|" + "---|" * len(Ls) + "---|"]
    for r in res["rows"]:
        sk = [v for v in r["skipped"].values() if v is not None]
        acc = " | ".join(f"{r['accuracy'][L]:.3f}" for L in Ls)
        skipped = f"{sum(sk) / len(sk):.2f}" if sk else "-"
        lines.append(f"| {r['name']} | {r['params']:,} | {r['seconds']:.0f} | {acc} | {skipped} |")
    return "\n".join(lines)
