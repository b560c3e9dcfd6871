"""Size presets and derived values: one dial (depth) -> width, heads, learning rate.

Following nanochat's single ``--depth`` dial, a model's shape follows from its depth:

    d_model = depth * aspect          (aspect 64 by default: width grows with depth)
    n_head  = d_model / head_dim      (head_dim 64 by default)
    d_ff    = 8/3 * d_model, rounded up to a multiple of 32 (SwiGLU keeps 4x-MLP parameters)
    lr      = 0.03 / sqrt(d_model), capped at 3e-3 (wider models take smaller steps)

The scaling-law sweeps call ``size_preset`` with a range of depths, so every point of a sweep
is a model a user could also train by name. ``resolve`` fills every "0 = derive" field of a
config in one visible place.
"""
from __future__ import annotations

import dataclasses
import math
import os

from keenlm.config import ConfigError, RunConfig, load_file


def default_lr(d_model: int) -> float:
    return min(3e-3, 0.03 / math.sqrt(d_model))


def default_d_ff(d_model: int) -> int:
    return 32 * math.ceil(8 * d_model / 3 / 32)


def size_preset(depth: int, aspect: int = 64, head_dim: int = 64, kv_groups: int = 1) -> dict:
    """Model and optimizer settings for a model of ``depth`` layers (the one dial)."""
    if depth < 1:
        raise ConfigError("depth", depth, "an integer >= 1")
    d_model = max(head_dim, head_dim * round(depth * aspect / head_dim))
    n_head = d_model // head_dim
    if n_head % kv_groups:
        raise ConfigError("kv_groups", kv_groups, f"a divisor of n_head={n_head}")
    return {
        "model": {"n_layer": depth, "d_model": d_model, "n_head": n_head,
                  "n_kv_head": n_head // kv_groups, "d_ff": default_d_ff(d_model)},
        "train": {"optim": {"lr": default_lr(d_model)}},
    }


def _tiny() -> dict:  # ~50K parameters with the byte tokenizer: tests and smoke runs
    return {"model": {"n_layer": 2, "d_model": 48, "n_head": 3, "d_ff": 128, "max_seq_len": 128},
            "data": {"tokenizer": "byte"},
            "train": {"steps": 50, "batch_size": 8, "seq_len": 64, "optim": {"lr": 3e-3},
                      "eval": {"every": 0}}}


def _demo() -> dict:
    """What `keenlm demo` trains: bits/byte < 2 on held-out stdlib files in < 5 min on 2 cores.

    Chosen by measurement on a 2-core CPU, 210 s budget, validation bits/byte (lower is better):
    d 256 x 4 layers, fp32: 1.755; same, bf16: 1.670; d 256 x 3, batch 24, bf16: 1.597;
    d 192 x 4, bf16: 1.551 (batch 16) / 1.587 (batch 32); d 128 x 4, batch 32, bf16: 1.516.
    At this budget (~2e13 FLOPs) a smaller model that sees more tokens wins, as the scaling
    laws predict. dtype auto: bf16 where the CPU multiplies it natively (1.7x faster here).
    """
    p = size_preset(4, aspect=32)  # d_model 128, 2 heads of 64, d_ff 352
    p["model"].update({"max_seq_len": 256})
    p["data"] = {"tokenizer": "bpe", "vocab_size": 4096, "max_bytes": 12_000_000}
    p["train"].update({"steps": 100_000, "batch_size": 32, "seq_len": 256, "time_budget_s": 210,
                       "optim": {"lr": 3e-3},
                       "schedule": {"kind": "wsd", "decay_fraction": 0.25, "warmup_steps": 30},
                       "eval": {"every": 0, "batches": 40}, "runtime": {"dtype": "auto"}})
    return p


def _with_seq(p: dict, seq: int) -> dict:
    p["model"]["max_seq_len"] = seq
    p.setdefault("train", {})["seq_len"] = seq
    return p


PRESETS = {
    "tiny": _tiny,  # ~50K params
    "demo": _demo,  # ~1.3M params (0.8M non-embedding), used by `keenlm demo`
    "small": lambda: _with_seq(size_preset(6), 512),  # ~11M params (d 384)
    "base": lambda: _with_seq(size_preset(12), 1024),  # ~85M non-embedding (d 768)
    "large": lambda: _with_seq(size_preset(24, head_dim=128, kv_groups=4), 2048),  # ~0.7B (d 1536)
}


def preset_dict(name: str) -> dict:
    """A preset by name, or a YAML/JSON file of overrides given by path."""
    if name in PRESETS:
        return PRESETS[name]()
    if os.path.isfile(name):
        return load_file(name)
    raise ConfigError("--preset", name, "one of " + ", ".join(PRESETS) + ", or a YAML/JSON file")


def resolve(cfg: RunConfig, vocab_size: int) -> RunConfig:
    """Fill every derived ("0") field: vocab from the tokenizer, d_ff, lr, warmup."""
    m, t = cfg.model, cfg.train
    if m.vocab_size and m.vocab_size < vocab_size:
        raise ConfigError("model.vocab_size", m.vocab_size, f">= the tokenizer's {vocab_size}")
    model = dataclasses.replace(m, vocab_size=m.vocab_size or vocab_size,
                                d_ff=m.d_ff or default_d_ff(m.d_model))
    if t.seq_len > model.max_seq_len:
        raise ConfigError("train.seq_len", t.seq_len, f"<= model.max_seq_len={model.max_seq_len}")
    optim = dataclasses.replace(t.optim, lr=t.optim.lr or default_lr(m.d_model))
    schedule = dataclasses.replace(t.schedule,
                                   warmup_steps=t.schedule.warmup_steps or max(1, t.steps // 50))
    train = dataclasses.replace(t, optim=optim, schedule=schedule)
    return dataclasses.replace(cfg, model=model, train=train)
