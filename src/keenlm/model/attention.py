"""Attention backends and the grouped-query attention layer.

Every backend is a plain function with one signature, registered in ``ATTENTION`` and
resolved once when the model is built (no string dispatch inside the forward pass):

    backend(q, k, v, mask) -> out
        q:    (B, H,  T, D)   queries for the T new positions
        k, v: (B, Hk, S, D)   keys/values for all S visible positions (S >= T), Hk divides H
        mask: None            -> plain causal attention with T == S (training, prefill)
              (B, 1, T, S)    bool, True where a query may attend (KV cache, padding)
        out:  (B, H, T, D)

Grouped-query attention (Ainslie et al. 2023, https://arxiv.org/abs/2305.13245): Hk key/value
heads are each shared by H/Hk query heads.

- ``naive``: the textbook formula softmax(q k^T / sqrt(D)) v with an explicit T x S score
  matrix. It is the reference every other backend is tested against.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, which picks PyTorch's fused
  kernels (FlashAttention-style on CPU and CUDA where the inputs allow).
- ``flash``: the FlashAttention-2 algorithm written in PyTorch (keenlm.model.flash).
- ``flash_triton``: the same algorithm as Triton kernels (keenlm.model.flash_triton), CUDA.
- ``auto``: ``flash_triton`` on CUDA GPUs, ``sdpa`` elsewhere.

Legend: B batch, T new positions, S visible key positions, H query heads, Hk key/value heads,
D head dim, C model width.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from keenlm.model import flash
from keenlm.model.layers import apply_rope, fused_projection

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def naive_attention(q, k, v, mask):
    """Reference: explicit scores, explicit causal/padding mask, explicit softmax."""
    B, H, T, D = q.shape
    S, Hk = k.shape[2], k.shape[1]
    if Hk != H:  # share each key/value head among H // Hk query heads
        k = k.repeat_interleave(H // Hk, dim=1)
        v = v.repeat_interleave(H // Hk, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, S)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    # a fully masked row (a padding query) would be NaN; its output is never used, make it 0
    probs = torch.nan_to_num(probs, nan=0.0)
    return probs @ v


def sdpa_attention(q, k, v, mask):
    """PyTorch's fused scaled-dot-product attention (flash / memory-efficient kernels)."""
    gqa = k.shape[1] != q.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    # rows with no visible key (left padding) come out NaN; they are never read, zero them
    return torch.nan_to_num(out, nan=0.0)


def flash_backend(q, k, v, mask):
    """FlashAttention-2 in PyTorch (keenlm.model.flash): blocked, online softmax, recomputing
    backward; memory O(T x block) instead of O(T x S)."""
    return flash.flash_attention(q, k, v, mask, causal=True, block=flash.BLOCK, rows=flash.ROWS)


def flash_triton_backend(q, k, v, mask):
    """FlashAttention-2 as Triton kernels (keenlm.model.flash_triton): CUDA only; a clear
    error elsewhere (on a CPU the tests run it under Triton's interpreter)."""
    from keenlm.model.flash_triton import flash_triton_attention  # imports triton: keenlm[gpu]

    return flash_triton_attention(q, k, v, mask, causal=True)


_said = set()


def auto_backend(q, k, v, mask):
    """The fastest exact backend for the device of the call: the Triton kernel on CUDA GPUs
    (when triton is installed), PyTorch's fused sdpa elsewhere (on this project's 2-core CPU,
    benchmarks/attention.py measures sdpa ahead of flash and naive at every length)."""
    if q.is_cuda:
        from keenlm.model.flash_triton import available, flash_triton_attention  # as above

        if available():
            return flash_triton_attention(q, k, v, mask, causal=True)
        if "triton" not in _said:
            _said.add("triton")
            print("keenlm: triton is not installed; attention 'auto' uses sdpa on this GPU")
    return sdpa_attention(q, k, v, mask)


def check_backend(name: str, device: torch.device) -> None:
    """A backend that cannot run on ``device`` fails here, when a run starts, not in a forward."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)
    if name == "flash_triton" and device.type != "cuda" and not interpreted:
        raise ValueError(f"model.attention=flash_triton runs on CUDA GPUs; this run's device is "
                         f"{device} (use flash, sdpa or auto)")


ATTENTION: dict[str, Backend] = {
    "naive": naive_attention,
    "sdpa": sdpa_attention,
    "flash": flash_backend,
    "flash_triton": flash_triton_backend,
    "auto": auto_backend,
}


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions and an optional KV cache."""

    def __init__(self, cfg, linear, backend: Backend, layer_idx: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.layer_idx = layer_idx
        self.q_proj = linear(cfg.d_model, self.n_head * self.head_dim)
        self.k_proj = linear(cfg.d_model, self.n_kv_head * self.head_dim)
        self.v_proj = linear(cfg.d_model, self.n_kv_head * self.head_dim)
        self.o_proj = linear(self.n_head * self.head_dim, cfg.d_model)
        self.qkv_proj = None  # a converter may install one module computing [q | k | v] at once
        self.backend = backend

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, T, _ = x.shape
        H, Hk, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = (self.qkv_proj(x) if self.qkv_proj is not None
               else fused_projection(x, self.q_proj, self.k_proj, self.v_proj))
        qkv = qkv.view(B, T, H + 2 * Hk, D)
        qk = apply_rope(qkv[:, :, :H + Hk], cos, sin)  # q and k heads rotated in one call
        q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hk:]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = self.backend(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class KVCache:
    """Preallocated keys and values for every layer: (L, B, Hk, max_len, D) each.

    ``update`` writes the new positions at the current length and returns views of everything
    written so far; ``advance`` moves the length once all layers have been updated.
    """

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, device, dtype):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        self._pending = 0

    def update(self, layer, k, v):
        T = k.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        self._pending = T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self):
        self.length += self._pending
        self._pending = 0

    def extend(self, n: int) -> None:
        """Count ``n`` positions that were written in place by another writer (the C decode
        step of keenlm.infer.engine writes every layer's keys and values itself)."""
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache full: {self.length + n} positions > max_len {self.max_len}")
        self.length += n

    def repeat_rows(self, n: int) -> None:
        """Each row becomes ``n`` consecutive rows (one prompt prefilled once, sampled n times)."""
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)


class SharedPrefix:
    """A differentiable stand-in for KVCache: prefixes computed once, read by many rows.

    Pass 1 runs P prefixes (e.g. prompts) through the model with this object as the cache: it
    keeps each layer's keys and values. Pass 2 runs R continuations (e.g. completions); row r
    attends to prefix ``rows[r]``'s keys and values, then to its own. Nothing is written in
    place, so gradients flow into the prefix through every row that read it (GRPO's G
    completions of one prompt share the prompt's forward and backward).
    """

    def __init__(self, rows: torch.Tensor):
        self.rows = rows  # (R,) prefix index of each continuation row
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.length = 0
        self._pending = 0

    def update(self, layer, k, v):
        if self.length == 0:  # pass 1: remember the prefix
            self.k[layer], self.v[layer] = k, v
            self._pending = k.shape[2]
            return k, v
        return (torch.cat([self.k[layer][self.rows], k], dim=2),
                torch.cat([self.v[layer][self.rows], v], dim=2))

    def advance(self):
        self.length += self._pending
        self._pending = 0
