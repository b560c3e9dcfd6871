"""The compute ledger: parameters, FLOPs, tokens and time of a run, in one place.

Every run keeps a ``ledger.json`` next to its metrics so that "smarter per unit of compute" is a
number. FLOPs are counted per token, for a training sequence of T positions:

    forward  = 2 * P_matmul                      # every weight matrix, LM head included
             + n_layer * 4 * T * n_head * head_dim   # q k^T and probs v, full T x T
    backward = 2 * P_matmul + 2 * attention      # grad wrt inputs (attention: wrt q, k and v)
             + 2 * P_trainable                   # + grad wrt the weights that train
                                                 # (= 2 * forward when all train)

With adapters (LoRA) only the adapters' weights train: their backward is about half of full
fine-tuning's, and ``params["trainable"]`` with ``optimizer_bytes`` (AdamW's two fp32 moments
per trainable number) record the memory the optimizer needs.

P_matmul counts the weights used by matrix multiplies per token (the embedding lookup is a
gather, not a matmul; a tied LM head is a matmul). Attention is counted as the full T x T score
matrix, which is what the naive and fused kernels execute and what ``torch.utils.flop_counter``
counts; the causally useful part is half of it (``attn_flops_causal`` records that). Norms,
activations and softmax are not counted (well under 1% at these shapes). The formula is checked
against ``torch.utils.flop_counter.FlopCounterMode`` in tests/test_ledger.py.

Kaplan et al. (2020, https://arxiv.org/abs/2001.08361) give the 6N rule of thumb this refines.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

from torch import nn

from keenlm.runs import atomic_write_text


def count_params(model: nn.Module) -> dict[str, int]:
    """total (unique tensors), embedding, non_embedding, and active per token."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embed = model.embed_tokens.weight.numel()
    head = model.lm_head.weight
    untied_head = head.numel() if head is not model.embed_tokens.weight else 0
    non_embedding = total - embed - untied_head
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()
                                        if p.requires_grad}.values())
    return {
        "total": total,
        "trainable": trainable,
        "optimizer_bytes": 8 * trainable,  # AdamW: two fp32 moments per trainable number
        "embedding": embed + untied_head,
        "non_embedding": non_embedding,
        # weights a token's forward pass multiplies by: every block weight it uses (not the
        # experts its router passes over) plus the LM head
        "active": non_embedding + head.numel() - idle_params(model),
    }


def idle_params(model: nn.Module) -> int:
    """Weights a token's forward pass skips: parts that route (MoE) report their own."""
    return sum(m.idle_params() for m in model.modules() if hasattr(m, "idle_params"))


def _matmuls(model: nn.Module):
    """(weights, trains) of every matrix multiply: nn.Linear layers, and the packed or
    quantized linear layers (keenlm.quant: leaf modules with integer ``in_features`` and
    ``out_features`` holding codes, never trained) -- a QLoRA base multiplies as many weights
    as a dense one."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            yield m.weight.numel(), m.weight.requires_grad
        elif next(m.children(), None) is None and isinstance(getattr(m, "in_features", None), int) \
                and isinstance(getattr(m, "out_features", None), int):
            yield m.in_features * m.out_features, False


def matmul_params(model: nn.Module) -> int:
    """Weights used in matrix multiplies per token: all linear weights incl. the LM head and
    an MoE router, less the experts a token is not routed to."""
    return sum(n for n, _ in _matmuls(model)) - idle_params(model)


def trainable_matmul_params(model: nn.Module) -> int:
    """Weights of matrix multiplies that train (all of them unless parts are frozen)."""
    return sum(n for n, trains in _matmuls(model) if trains) - \
        (idle_params(model) if all(p.requires_grad for p in model.parameters()) else 0)


def flops_per_token(model: nn.Module, seq_len: int) -> dict[str, float]:
    cfg = model.cfg
    linear = 2 * matmul_params(model)
    attn = cfg.n_layer * 4 * seq_len * cfg.n_head * cfg.head_dim
    fwd = linear + attn
    bwd = linear + 2 * attn + 2 * trainable_matmul_params(model)
    return {"forward": float(fwd), "backward": float(bwd), "train": float(fwd + bwd),
            "attn_forward": float(attn), "attn_flops_causal": float(attn) / 2}


def generation_flops(model: nn.Module, prompt_len: int, new_tokens: Sequence[int]) -> float:
    """Forward FLOPs of one prefill of ``prompt_len`` tokens and, for each sample sharing it,
    ``new_tokens[i]`` decode steps: the matrix multiplies of every token plus attention over
    the keys each token sees (q k^T and probs v: 4 x keys x heads x head_dim per layer)."""
    cfg = model.cfg
    linear = 2 * matmul_params(model)
    per_key = cfg.n_layer * 4 * cfg.n_head * cfg.head_dim
    flops = prompt_len * linear + per_key * prompt_len * (prompt_len + 1) / 2
    for n in new_tokens:  # keys seen by decode steps: prompt_len + 1 ... prompt_len + n
        flops += n * linear + per_key * (n * prompt_len + n * (n + 1) / 2)
    return float(flops)


@dataclass
class Ledger:
    params: dict
    seq_len: int
    flops_per_token: dict
    weight_bytes: int  # bytes of weights read per token at decode (dense: all matmul weights)
    tokens_seen: int = 0  # tokens drawn from the data
    tokens_forward: int = 0  # tokens through forward passes (selective backprop's scoring pass too)
    tokens_backward: int = 0  # tokens through backward passes (selective backprop: fewer than seen)
    flops_forward: float = 0.0
    flops_backward: float = 0.0
    wall_time_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: nn.Module, seq_len: int) -> "Ledger":
        p = next(model.parameters())
        return cls(params=count_params(model), seq_len=seq_len,
                   flops_per_token=flops_per_token(model, seq_len),
                   weight_bytes=matmul_params(model) * p.element_size())

    def add_step(self, tokens: int, tokens_backward: int | None = None, seconds: float = 0.0,
                 tokens_forward: int | None = None):
        tb = tokens if tokens_backward is None else tokens_backward
        tf = tokens if tokens_forward is None else tokens_forward
        self.tokens_seen += tokens
        self.tokens_forward += tf
        self.tokens_backward += tb
        self.flops_forward += tf * self.flops_per_token["forward"]
        self.flops_backward += tb * self.flops_per_token["backward"]
        self.wall_time_s += seconds

    def to_dict(self) -> dict:
        d = asdict(self)
        total = self.flops_forward + self.flops_backward
        d["flops_total"] = total
        d["achieved_flops_per_s"] = total / self.wall_time_s if self.wall_time_s > 0 else 0.0
        d["tokens_per_s"] = self.tokens_seen / self.wall_time_s if self.wall_time_s > 0 else 0.0
        d["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Ledger":
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in keys})

    def save(self, path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
